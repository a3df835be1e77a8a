"""The training engine: one loop for every stage, on Accelerate.

A stage hands the engine a *task*: an nn.Module whose forward(video) returns (loss, metrics). The engine owns the
optimizer (AdamW), the schedule (linear warm-up, then cosine from lr to min_lr, as in the paper's Appendix F), gradient
clipping, logging (JSONL + progress bar), and the hand-off to Accelerate (`prepare`, `backward`), so that the same
code runs on one CPU process or under `accelerate launch` on many GPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from genie_core.config import TrainConfig
from genie_core.interfaces import LatentActionModel, DynamicsModel, VideoTokenizer


class TokenizerTask(nn.Module):
    def __init__(self, tokenizer: VideoTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, video):
        out = self.tokenizer.loss(video)
        return out.loss, out.metrics


class WorldModelTask(nn.Module):
    """The paper's co-training of the latent action model and the dynamics model on a frozen tokenizer.

    The dynamics model gets the LAM's action *ids*: no gradient flows from the dynamics loss into the LAM
    (the paper's stop-gradient), while the LAM learns from its own reconstruction loss in the same step.
    """

    def __init__(self, action_model: LatentActionModel, dynamics: DynamicsModel, tokenizer: VideoTokenizer):
        super().__init__()
        self.action_model = action_model
        self.dynamics = dynamics
        # A plain list hides the tokenizer from .parameters(), .state_dict(), the optimizer and .train(): it stays
        # frozen in eval mode, so its codebook is not updated and its tokens are those used at play time.
        self.frozen = [tokenizer]
        tokenizer.requires_grad_(False).eval()

    def forward(self, video):
        with torch.no_grad():
            tokens = self.frozen[0].encode(video)
        lam = self.action_model.loss(video)
        dyn = self.dynamics.loss(tokens, lam.actions)  # integer ids: no gradient reaches the LAM from here
        metrics = {f"lam_{k}": v for k, v in lam.metrics.items()} | {f"dyn_{k}": v for k, v in dyn.metrics.items()}
        return lam.loss + dyn.loss, metrics


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at a step: linear warm-up, then cosine down to cfg.min_lr at cfg.steps."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches_forever(loader):
    """Cycles through the loader epoch after epoch (the dataset shuffles anew each epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(
    accelerator: Accelerator,
    task: nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    seed: int,
    log_path: Path,
    desc: str,
) -> dict:
    """Trains `task` for cfg.steps steps; returns a summary (final metrics, steps/s). The task is trained in place.

    cfg.batch_size is per process: with N processes each optimizer step sees N * batch_size windows.
    """
    torch.manual_seed(seed + accelerator.process_index)  # per-rank randomness (masks); weights were built before
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) >= cfg.batch_size,
        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed),
    )
    model = accelerator.prepare(task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    optimizer, loader = accelerator.prepare(optimizer, loader)
    # Not prepared: Accelerate would step a prepared scheduler once per process, running the schedule N times fast.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.train()
    batches = batches_forever(loader)
    main = accelerator.is_main_process
    if main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    last: dict[str, float] = {}
    start = time.perf_counter()
    log_file = open(log_path, "w") if main else contextlib.nullcontext()
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", dynamic_ncols=True, disable=not accelerator.is_local_main_process)
    with log_file as log, bar:
        for step in range(cfg.steps):
            video = next(batches)
            loss, metrics = model(video)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                last = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                        **{k: float(v) for k, v in metrics.items()}}
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"{desc}: loss is {last['loss']} at step {step}")
                if main:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            bar.update(1)
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drop Accelerate's references to this stage's optimizer and wrapped model
    return {"final": last, "seconds": seconds, "steps_per_second": cfg.steps / seconds}

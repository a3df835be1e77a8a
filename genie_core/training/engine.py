"""The training engine: one loop for every stage, on Accelerate.

A stage hands the engine a *task*: an nn.Module whose forward(video) returns (loss, metrics). The engine owns the
optimizer (AdamW, fused where the device has the kernel), the schedule (linear warm-up, then cosine from lr to min_lr,
as in the paper's Appendix F), gradient accumulation and clipping, the NaN guard, full-state checkpoints and resume,
logging (JSONL, Accelerate's trackers, progress bar), and the hand-off to Accelerate (`prepare`, `backward`), so that
the same code runs on one CPU process or under `accelerate launch` on many GPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from genie_core.config import DynamicsTrainConfig, TrainConfig
from genie_core.errors import GenieError, TrainingDiverged, first_line
from genie_core.interfaces import DynamicsModel, LatentActionModel, VideoTokenizer
from genie_core.io.log import say
from genie_core.nn import as_at_play_time, compile_block_stacks, use_activation_checkpointing
from genie_core.run.folder import CHECKPOINT_STATE, WEIGHT_AVERAGE, complete_checkpoints
from genie_core.world.components import DAMAGE


class Task(nn.Module):
    """What the engine trains: forward(batch) -> (loss, metrics). Holds the models being trained as submodules."""

    def warning(self, metrics: dict[str, float]) -> str | None:
        """Something the user should hear about, from the logged metrics of a step after warm-up; said once per
        stage. None: nothing."""
        return None


class TokenizerTask(Task):
    def __init__(self, tokenizer: VideoTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, video):
        out = self.tokenizer.loss(video)
        return out.loss, out.metrics


LAM_USAGE = "lam_usage"  # the share of its |A| actions the latent action model used in a batch


def lam_collapse(metrics: dict[str, float]) -> str | None:
    """Codebook collapse, a known failure of latent action models: most actions unused."""
    if metrics.get(LAM_USAGE, 1.0) < 0.5:
        return (f"the latent action model used only {metrics[LAM_USAGE]:.0%} of its actions in this batch "
                f"(codebook collapse?)")
    return None


def freeze(module: nn.Module) -> list[nn.Module]:
    """Frozen and in eval mode, inside a plain list: hidden from .parameters(), .state_dict(), the optimizer and
    .train(), so its codebooks are not updated and it gives exactly what it gives at play time (run it under
    `as_at_play_time`)."""
    module.requires_grad_(False).eval()
    return [module]


class LatentActionTask(Task):
    """The latent action model alone, on its reconstruction loss."""

    def __init__(self, action_model: LatentActionModel):
        super().__init__()
        self.action_model = action_model

    def forward(self, video):
        out = self.action_model.loss(video)
        return out.loss, {f"lam_{k}": v for k, v in out.metrics.items()}

    def warning(self, metrics: dict[str, float]) -> str | None:
        return lam_collapse(metrics)


class WorldModelTask(Task):
    """The dynamics model on a frozen tokenizer, co-trained with the latent action model (the paper), or on a
    frozen one (`train_action_model=False`).

    The dynamics model gets the LAM's action *ids*: no gradient flows from the dynamics loss into the LAM
    (the paper's stop-gradient), while in co-training the LAM learns from its own loss in the same step.
    """

    def __init__(self, action_model: LatentActionModel, dynamics: DynamicsModel, tokenizer: VideoTokenizer,
                 train_action_model: bool = True):
        super().__init__()
        self.dynamics = dynamics
        self.frozen = freeze(tokenizer)
        self.trains_action_model = train_action_model
        if train_action_model:
            self.action_model = action_model
        else:
            self.frozen_action_model = freeze(action_model)

    def forward(self, batch):
        """batch: video [B, T, C, H, W], or (video, true actions [B, T - 1]) for an action model that reads them."""
        video, true_actions = batch if isinstance(batch, (tuple, list)) else (batch, None)
        with as_at_play_time(video):
            tokens = self.frozen[0].encode(video)
        if self.trains_action_model:
            lam = self.action_model.loss(video, **self.action_model.true_action_inputs(true_actions))
            loss, actions = lam.loss, lam.actions
            metrics = {f"lam_{k}": v for k, v in lam.metrics.items()}
        else:
            frozen = self.frozen_action_model[0]
            with as_at_play_time(video):
                actions = frozen.infer_actions(video, **frozen.true_action_inputs(true_actions))
            loss, metrics = 0.0, {}
        dyn = self.dynamics.loss(tokens, actions)  # integer ids: no gradient reaches the LAM from here
        return loss + dyn.loss, metrics | {f"dyn_{k}": v for k, v in dyn.metrics.items()}

    def warning(self, metrics: dict[str, float]) -> str | None:
        return lam_collapse(metrics)  # (a frozen LAM logs no usage: nothing to say)


def _in_block_stacks(task: Task, cfg: TrainConfig, desc: str, key: str, use, done: str) -> None:
    """train.*.activation_checkpointing and train.*.compile: `use(task)` on every trained model's block stacks. A
    recipe whose stage has none is refused before any work (run.stages.check_trainable); a model it could not judge
    there, or one phase of a stage (the LAM trained alone), may still have none: said, and trained without."""
    stacks = use(task)
    if stacks:
        say(f"{desc}: {done.format(', '.join(stacks))}")
        return
    key = f"train.{'dynamics' if isinstance(cfg, DynamicsTrainConfig) else 'tokenizer'}.{key}"
    models = ", ".join(f"{name} ({type(m).__module__}.{type(m).__qualname__})" for name, m in task.named_children())
    say(f"warning: {desc}: {key} is true, but no model this stage trains supports it ({models}); it trains "
        f"without", stderr=True)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel for float parameters


def adamw(params: list[nn.Parameter], cfg: TrainConfig, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.AdamW:
    """The stage's optimizer: AdamW with cfg's learning rate, betas and weight decay, fused where every parameter
    sits on a device that has the kernel (`fused=None`): one call updates them all, where torch's default on a CPU
    loops over the parameters with a dozen small operations each (over a thousand a step at the tiny recipe). The same
    update up to float rounding; the optimizer state (and so a checkpoint) is the same either way. `fused=False`
    gives torch's own choice, or its loop (`foreach=False`) or multi-tensor path (`foreach=True`)."""
    if fused is None:
        fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             fused=fused or None, foreach=None if fused else foreach)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at a step: linear warm-up, then cosine down to cfg.min_lr at cfg.steps."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class WeightAverage:
    """train.*.ema_decay: an exponential moving average of the trained parameters, updated after every optimizer
    step. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first steps' weights do not
    linger in it. Kept as tensors beside the prepared model's own parameters rather than as a copy of the model
    (timm's ModelEma, torch's AveragedModel): a copy would duplicate compiled stacks, and under FSDP each process
    averages the shard it trains. Buffers (a quantizer's codebook, kept by its own moving average) are left live.
    `names` (the task's names of the parameters, None where FSDP flattens them) go into a checkpoint with the
    average, so that a world can be played from it (RunFolder.checkpoint_world)."""

    def __init__(self, params: list[nn.Parameter], decay: float, names: list[str] | None = None):
        self.params, self.decay, self.names, self.updates = params, decay, names, 0
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def in_place(self):
        """The parameters hold the average inside the block and their trained values again after it."""
        trained = [p.detach().clone() for p in self.params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], trained)

    @torch.no_grad()
    def apply(self) -> None:
        """Copies the average into the parameters, for good (the end of training)."""
        torch._foreach_copy_([p.detach() for p in self.params], self.average)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "average": self.average, "names": self.names}

    def load_state_dict(self, state: dict) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"{len(state['average'])} averaged tensors for {len(self.average)} parameters")
        with torch.no_grad():
            torch._foreach_copy_(self.average, state["average"])
        self.updates = state["updates"]


class DataPosition:
    """Where training is in the data: the epoch, and how many batches of it were used. Each epoch shuffles with a
    seed derived from (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, loader, generator: torch.Generator, seed: int, epoch: int = 0, used: int = 0):
        self.loader, self.generator, self.seed = loader, generator, seed
        self.epoch, self.used = epoch, used
        self._batches = None

    def next_batch(self):
        while True:
            if self._batches is None:
                self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)
                self._batches = iter(self.loader)
                for _ in range(self.used):  # resuming mid-epoch: pass over the batches already trained on
                    next(self._batches)
            try:
                batch = next(self._batches)
                self.used += 1
                return batch
            except StopIteration:
                self.epoch, self.used, self._batches = self.epoch + 1, 0, None




class Checkpoints:
    """Full-state checkpoints of one stage: model, optimizer and every RNG (through Accelerate's save_state), plus
    the scheduler, the step, the data position and the stage's fingerprint. Each is written under a temporary
    name and renamed when complete; the newest `keep` are kept."""

    def __init__(self, accelerator: Accelerator, folder: Path, keep: int, fingerprint: str, scheduler,
                 average: WeightAverage | None = None):
        self.accelerator, self.folder, self.keep, self.fingerprint = accelerator, Path(folder), keep, fingerprint
        # saved here, not registered with Accelerate, whose registry outlives a stage
        self.scheduler, self.average = scheduler, average

    def _average_file(self, folder: Path) -> Path:  # one per process: under FSDP each averages its own shard
        return folder / WEIGHT_AVERAGE.format(self.accelerator.process_index)

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.folder)

    def save(self, step: int, position: DataPosition) -> None:
        final = self.folder / f"step-{step:09d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))  # every process: each saves its own RNG state
            if self.average is not None:
                torch.save(self.average.state_dict(), self._average_file(tmp))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                state = {"step": step, "epoch": position.epoch, "used": position.used, "fingerprint": self.fingerprint,
                         "processes": self.accelerator.num_processes, "scheduler": self.scheduler.state_dict()}
                (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
                os.replace(tmp, final)
                for old in self.complete()[: -self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as error:  # a read-only folder, a full disk: the checkpoints written before stay usable
            last = self.complete()
            raise GenieError(f"{self.folder}: cannot write the checkpoint of step {step} "
                             f"({error.strerror or error}); "
                             + (f"the last good one is {last[-1]} (fix the folder, then resume with --resume)"
                                if last else "no checkpoint was written yet")) from None
        self.accelerator.wait_for_everyone()

    def load_newest(self) -> dict | None:
        """Restores the newest complete checkpoint that loads; returns its state, or None when there is none. A
        damaged one (a file cut short by a crash or a full disk, or changed since) is set aside as step-N.damaged,
        with a word, and the one before it is tried. What says nothing about the files (out of memory, a folder
        that cannot be read) stops the resume and leaves every checkpoint as it is."""
        found = self.complete()
        for path in reversed(found):
            try:
                state = json.loads((path / CHECKPOINT_STATE).read_text())
                written_under = state["fingerprint"]
            except DAMAGE as error:
                self._set_aside(path, _as_damage(path, error))
                continue
            if written_under != self.fingerprint:
                raise GenieError(f"{path}: this checkpoint was written by a run with other settings (another recipe "
                                 f"or overrides, or an earlier stage since redone); resume with the recipe that wrote "
                                 f"it, or run without --resume")
            # Each process saved its own random state and walked its own share of every epoch: another number of
            # processes would read other batches and find no state for the new ones.
            written_by, now = state.get("processes", self.accelerator.num_processes), self.accelerator.num_processes
            if written_by != now:
                raise GenieError(f"{path}: this checkpoint was written by {written_by} process(es), and this run has "
                                 f"{now}; resume with {written_by} (torchrun --nproc_per_node {written_by}), or run "
                                 f"without --resume")
            try:
                self.accelerator.load_state(str(path))
                self.scheduler.load_state_dict(state["scheduler"])
                if self.average is not None:
                    self.average.load_state_dict(torch.load(self._average_file(path), weights_only=True,
                                                            map_location=self.accelerator.device))
            except DAMAGE as error:
                self._set_aside(path, _as_damage(path, error))
                continue
            return state
        if found:
            raise GenieError(f"{self.folder}: every checkpoint is damaged (each kept as step-N.damaged); run without "
                             f"--resume to start the stage over")
        return None

    def _set_aside(self, path: Path, error: Exception) -> None:
        reason = first_line(error)
        if self.accelerator.is_main_process:
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)  # one set aside before at this step
            os.replace(path, aside)  # kept to look at; no longer a checkpoint
            say(f"{path}: damaged ({reason}); set aside as {path.name}.damaged, trying the checkpoint before it",
                stderr=True)

    def clear(self) -> None:
        if self.accelerator.is_main_process:
            discard_checkpoints(self.folder)
        self.accelerator.wait_for_everyone()


def _as_damage(path: Path, error: Exception) -> Exception:
    """`error`, when it says the checkpoint's files are damaged; otherwise a GenieError to stop on. Running out of
    memory, or a folder this user may not read, says nothing about the files: setting them aside would lose good
    checkpoints one after the other."""
    if isinstance(error, torch.OutOfMemoryError):
        raise GenieError(f"{path}: out of memory while loading this checkpoint ({first_line(error)}); it is kept as "
                         f"it is: free some memory and resume again") from None
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        raise GenieError(f"{path}: cannot read this checkpoint ({error.strerror or first_line(error)}); it is kept "
                         f"as it is: fix the folder and resume again") from None
    return error


def discard_checkpoints(folder: Path) -> None:
    """Deletes a stage's checkpoints (once what they protect is saved, or when a stage starts over). Those a resume
    set aside as damaged stay, to look at. Call it on the main process."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.endswith(".damaged"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _check_finite(loss: torch.Tensor, metrics: dict, desc: str, step: int, checkpoints: Checkpoints) -> None:
    if torch.isfinite(loss):
        return
    bad = [name for name, value in metrics.items() if not torch.isfinite(torch.as_tensor(value)).all()]
    last = checkpoints.complete()
    raise TrainingDiverged(
        f"{desc}: the loss is {loss.item()} at step {step}"
        + (f"; non-finite terms: {', '.join(bad)}" if bad else "")
        + (f"; the last good checkpoint is {last[-1]} (resume with --resume)" if last else "; no checkpoint yet"))


@attrs.frozen
class Checkpointing:
    """Where a stage keeps its full-state checkpoints, the fingerprint of the settings they belong to, and whether
    to continue from the newest one."""

    folder: Path = attrs.field(converter=Path)
    fingerprint: str
    resume: bool = False


def train(accelerator: Accelerator, task: Task, dataset: torch.utils.data.Dataset, cfg: TrainConfig, seed: int,
          log_path: Path, desc: str, checkpointing: Checkpointing, validate=None, validate_live: bool = False) -> dict:
    """Trains `task` for cfg.steps optimizer steps; returns a summary (final metrics, steps/s, the seconds spent
    waiting for batches, and the task's whole state as "weights"). The task is trained in place, and ends holding
    the average of its weights where cfg.ema_decay asks for one. With `checkpointing.resume`, continues from the
    newest complete checkpoint, if any; the checkpoints stay when it returns, for the caller to discard
    (`discard_checkpoints`) once it has saved the result. `validate(step)`, if given, runs on the main process
    every cfg.eval_every steps and returns metrics to log; it must leave the model's state and the global random
    generators as it found them. It sees the average where there is one; with `validate_live`,
    `validate(step, live=True)` then scores the weights as trained too, logged with the prefix "live_".

    cfg.batch_size is per process and per micro-batch: each optimizer step sees
    processes x grad_accum x batch_size windows.
    """
    torch.manual_seed(seed + accelerator.process_index)  # per-rank randomness (masks); weights were built before
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) >= cfg.batch_size,
        num_workers=cfg.num_workers, generator=generator,
    )
    if cfg.activation_checkpointing:
        _in_block_stacks(task, cfg, desc, "activation_checkpointing", use_activation_checkpointing,
                         "activation checkpointing in {}")
    if cfg.compile:
        _in_block_stacks(task, cfg, desc, "compile", compile_block_stacks,
                         "torch.compile of {} (compiling in the first steps)")
    model = accelerator.prepare(task)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg)
    optimizer, loader = accelerator.prepare(optimizer, loader)
    # Not prepared: Accelerate would step a prepared scheduler once per process, running the schedule N times fast.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    average = WeightAverage(params, cfg.ema_decay, _names(task, params)) if cfg.ema_decay else None
    checkpoints = Checkpoints(accelerator, checkpointing.folder, cfg.keep_checkpoints, checkpointing.fingerprint,
                              scheduler, average)
    state = checkpoints.load_newest() if checkpointing.resume else None
    if state is None:
        checkpoints.clear()
        state = {"step": 0, "epoch": 0, "used": 0}
    else:
        say(f"{desc}: resuming at step {state['step']} from {checkpoints.complete()[-1]}")
    position = DataPosition(loader, generator, seed, state["epoch"], state["used"])
    first_step = state["step"]

    model.train()
    main = accelerator.is_main_process
    last: dict[str, float] = {}
    warned = False
    waited = 0.0  # seconds spent getting batches: what the data path costs the stage
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    with _step_log(log_path, first_step, main) as log, bar:
        for step in range(first_step, cfg.steps):
            for micro in range(cfg.grad_accum):
                asked = time.perf_counter()
                video = position.next_batch()
                waited += time.perf_counter() - asked
                # gradients are all-reduced only on the last micro-batch of a step
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    loss, metrics = model(video)
                    _check_finite(loss, metrics, desc, step, checkpoints)
                    accelerator.backward(loss / cfg.grad_accum)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step took, logged with it
            scheduler.step()
            if average is not None:
                average.update()
            optimizer.zero_grad(set_to_none=True)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                last = {"step": step, "loss": loss.item(), "lr": lr,
                        **{k: float(v) for k, v in metrics.items()}}
                _log(accelerator, log, desc, last)
                warning = task.warning(last) if main and not warned and step >= cfg.warmup_steps else None
                if warning:
                    warned = True
                    bar.write(f"warning: {desc} step {step}: {warning}")
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
            bar.update(1)
            if validate is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                _validate(accelerator, model, validate, step, log, desc, bar, average, validate_live)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoints.save(step + 1, position)
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if average is not None:
        average.apply()
    # Every process takes part: under FSDP this gathers the shards. The main process gets the whole state.
    weights = accelerator.get_state_dict(model)
    # The checkpoints stay until the caller has saved what they protect (discard_checkpoints): a process killed in
    # between resumes from them instead of starting over.
    accelerator.free_memory()  # drop Accelerate's references to this stage's optimizer and wrapped model
    steps = cfg.steps - first_step
    return {"final": last, "seconds": seconds, "steps_per_second": steps / seconds if steps else float("nan"),
            "data_seconds": waited, "weights": weights}


def _names(task: Task, params: list[nn.Parameter]) -> list[str] | None:
    """The task's names of the trained parameters (the prepared model's own, unless FSDP flattened them)."""
    names = {id(p): name for name, p in task.named_parameters()}
    return [names[id(p)] for p in params] if all(id(p) in names for p in params) else None


@contextlib.contextmanager
def _step_log(path: Path, first_step: int, main: bool):
    """The stage's JSONL log, open for appending on the main process (None elsewhere). A resumed log keeps the
    lines of the steps its checkpoint covers and goes on from there."""
    if not main:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if first_step and path.is_file():
        kept = [line for line in path.read_text().splitlines() if _step_of(line) < first_step]
    path.write_text("".join(line + "\n" for line in kept))
    with open(path, "a") as log:
        yield log


def _step_of(line: str) -> float:
    """The step a log line records; a line cut short (the process killed while writing it) counts as none."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _log(accelerator: Accelerator, log, desc: str, line: dict) -> None:
    """One line of metrics, into the JSONL log (main process) and Accelerate's trackers."""
    if log is not None:
        log.write(json.dumps(line) + "\n")
        log.flush()
    accelerator.log({f"{desc}/{k}": v for k, v in line.items() if k != "step"}, step=line["step"])


def _validate(accelerator: Accelerator, model: nn.Module, validate, step: int, log, desc: str, bar,
              average: WeightAverage | None, validate_live: bool) -> None:
    """Runs `validate(step + 1)` on the main process, on the whole model (holding the average of its weights where
    there is one), in eval mode; with `validate_live`, on the weights as trained too. Logs and shows the scores."""
    scores = {"step": step}
    with average.in_place() if average is not None else contextlib.nullcontext():
        scores |= _scores(accelerator, model, lambda: validate(step + 1))
    if average is not None and validate_live:
        live = _scores(accelerator, model, lambda: validate(step + 1, live=True))
        scores |= {f"live_{k}": v for k, v in live.items()}
    if accelerator.is_main_process:
        _log(accelerator, log, desc, scores)
        bar.write(f"{desc} step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "step"))
    accelerator.wait_for_everyone()


def _scores(accelerator: Accelerator, model: nn.Module, score) -> dict:
    """`score()` on the main process, on the whole model, in eval mode and without gradients ({} elsewhere)."""
    with gathered_weights(accelerator, model):  # validation calls the modules outside the wrapper
        if not accelerator.is_main_process:
            return {}
        model.eval()
        with torch.no_grad():
            scores = score()
        model.train()
        return scores


def gathered_weights(accelerator: Accelerator, model: nn.Module):
    """Under FSDP each process holds a shard of every weight and the wrapped modules are only whole inside the
    wrapper's forward: gather them (every process) for work that calls the modules directly, such as validation."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def rebuilt(module: nn.Module, weights: dict, prefix: str) -> nn.Module:
    """A fresh copy of a trained component holding `weights[prefix...]` (the gathered state of the task that trained
    it). What a stage saves comes from here, not from the live module, which a sharded run leaves in pieces."""
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global generator alone
        fresh = type(module)(module.config, module.spec)
    fresh.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return fresh

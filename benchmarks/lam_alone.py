"""What a latent action model learns on some footage, in minutes: the action model alone, without the dynamics.

    python benchmarks/lam_alone.py DATA [KEY=VALUE ...] [--recipe recipes/coinrun-tiny.toml] [--steps N]
        [--every 500] [--name NAME] [--out DIR]

The recipe's action model (KEY=VALUE overrides it: action_model.commitment_weight=0.001, ...) is built for the recipe's
LAM + dynamics window and trained alone, with that stage's batch size, optimizer, schedule and steps (or --steps), on
DATA's train split (the stage trains it on its own loss too: the dynamics model's gradient never reaches it) (DATA:
`genie data build ... --out DATA`, or a run's data folder). Every --every steps, each transition of the val split is
labelled by the model (as `genie agent` labels footage) and scored:
    - NMI of the latent actions with the true ones, and the latent -> true map's accuracy beside always answering the
      most frequent action (what behavioural cloning through latent actions can pass on);
    - NMI of the latent actions with the transition's place in its window: codes that follow the place, not what
      happened, are a shortcut through the positional embeddings (1: the codes are the place);
    - the model's reconstruction error beside that of "nothing moves" (x_{t+1} drawn as x_t): how much of the
      change between frames the codes and the history explain.
Compare with `action_signal.py` on the same footage: a supervised probe's NMI is what the frames could give.
Prints each point; saves benchmarks/results/lam-alone-NAME.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from genie_core.agent.cloning import label
from genie_core.data.footage import EpisodeIndex, WindowDataset, true_action_count
from genie_core.eval.metrics import action_agreement
from genie_core.interfaces import VideoSpec
from genie_core.recipe import load_recipe
from genie_core.training.engine import lr_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AGREEMENT = ("nmi", "mapping_accuracy", "majority_baseline")


def agreement(latent: np.ndarray, other: np.ndarray, num_latent: int) -> dict:
    result = action_agreement(torch.from_numpy(latent), torch.from_numpy(other), num_latent)
    return {k: round(float(result[k]), 4) for k in AGREEMENT}


@torch.no_grad()
def score(model, index: EpisodeIndex, val: WindowDataset, windows: int) -> dict:
    """The val split labelled by the model, against the true actions and against each transition's place."""
    model.eval()
    footage = label(model, index, "val")
    latent, true = np.concatenate(footage.latent_actions), np.concatenate(footage.true_actions)
    per_window = model.spec.num_frames - 1
    place = np.concatenate([np.arange(len(a)) % per_window for a in footage.latent_actions])
    known = true >= 0
    video = torch.stack([val[i] for i in np.linspace(0, len(val) - 1, windows).astype(int)])
    recon = model.loss(video).recon
    model.train()
    return {"vs_true": agreement(latent[known], true[known], model.num_actions),
            "vs_place_in_window": agreement(latent, place, model.num_actions),
            "codes_used": int(np.unique(latent).size),
            "reconstruction_mse": float(F.mse_loss(recon, video[:, 1:])),
            "nothing_moves_mse": float(F.mse_loss(video[:, :-1], video[:, 1:]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "coinrun-tiny.toml")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's LAM + dynamics steps)")
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--windows", type=int, default=64, help="val windows the reconstruction error is taken on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results name (default: the data folder's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    index = EpisodeIndex.open(args.data)
    if not true_action_count(index):
        sys.exit(f"error: {args.data}: the footage records no true actions to score the latent ones against")
    choice, train_cfg = recipe.components["action_model"], recipe.train["dynamics"]
    train_cfg = attrs.evolve(train_cfg, steps=args.steps or train_cfg.steps)
    if getattr(choice.info.cls, "needs_tokenizer", False):
        sys.exit(f"error: action model {choice.name} reads a tokenizer's tokens; this benchmark trains pixel-input "
                 f"action models alone")
    resolution = index.manifest["resolution"]
    torch.manual_seed(args.seed)
    model = choice.info.cls(choice.config, VideoSpec(height=resolution, width=resolution,
                                                     num_frames=train_cfg.seq_len))
    train = WindowDataset(index, "train", train_cfg.seq_len)
    val = WindowDataset(index, "val", train_cfg.seq_len)
    loader = torch.utils.data.DataLoader(train, batch_size=train_cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    # The stage's optimizer, schedule and clipping (genie_core.training.engine), for the action model alone.
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                                  weight_decay=train_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))
    points, step = [], 0
    while step < train_cfg.steps:
        for video in loader:
            loss = model.loss(video).loss
            optimizer.zero_grad()
            loss.backward()
            if train_cfg.grad_clip:  # 0 disables clipping, as in the stage
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            if step % args.every == 0 or step == train_cfg.steps:
                points.append({"step": step, **score(model, index, val, args.windows)})
                p = points[-1]
                print(f"step {step}: NMI with the true actions {p['vs_true']['nmi']:.3f} (map "
                      f"{p['vs_true']['mapping_accuracy']:.3f}, majority {p['vs_true']['majority_baseline']:.3f}); "
                      f"with the place in the window {p['vs_place_in_window']['nmi']:.3f}; codes used "
                      f"{p['codes_used']}; reconstruction MSE {p['reconstruction_mse']:.2e} (nothing moves "
                      f"{p['nothing_moves_mse']:.2e})", flush=True)
            if step == train_cfg.steps:
                break
    name = args.name or args.data.name
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lam-alone-{name}.json"
    path.write_text(json.dumps({"data": str(args.data), "recipe": str(args.recipe), "overrides": args.overrides,
                                "action_model": choice.name, "steps": train_cfg.steps, "seed": args.seed,
                                "environment": environment(), "points": points}, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

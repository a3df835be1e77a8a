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
    - NMI of the latent actions with the way the whole scene shifted between the two frames (up, still or down x
      left, still or right; the best whole-pixel shift), and of the true actions with it: in a game whose view
      follows the player the shift is the player's motion, so this says whether the codes are the motion, and how
      much of the actions the motion alone tells;
    - the codes against the footage's action classes (when its source declares them), with their table;
    - the model's reconstruction error beside that of "nothing moves" (x_{t+1} drawn as x_t): how much of the
      change between frames the codes and the history explain.
With --codes true-actions the encoder is left out: the same decoder is trained with the footage's true actions as
its codes. Its reconstruction error beside the latent codes' says whether the objective itself would rather have the
buttons (lower error: the quantizer missed them) or something else (higher: no better quantizer finds them).
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
from genie_core.eval.metrics import action_agreement, action_class_lookup
from genie_core.interfaces import VideoSpec
from genie_core.nn import QuantizerOutput
from genie_core.recipe import load_recipe
from genie_core.training.engine import lr_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AGREEMENT = ("nmi", "mapping_accuracy", "majority_baseline")


def agreement(latent: np.ndarray, other: np.ndarray, num_latent: int, table: bool = False) -> dict:
    result = action_agreement(torch.from_numpy(latent), torch.from_numpy(other), num_latent)
    return {k: round(float(result[k]), 4) for k in AGREEMENT} | ({"table": result["contingency"]} if table else {})


def scene_shift(frames: np.ndarray, largest: int = 4) -> np.ndarray:
    """The whole-pixel shift (dy, dx) that best carries each frame onto the next, [L, H, W, 3] uint8 -> int [L - 1,
    2]: frame t + 1 at (y, x) looks most like frame t at (y + dy, x + dx), so dx > 0 when the view moves right."""
    before, after = frames[:-1].astype(np.float32) / 255, frames[1:].astype(np.float32) / 255
    h, w = frames.shape[1:3]
    best, shift = np.full(len(before), np.inf), np.zeros((len(before), 2), dtype=np.int64)
    for dy in range(-largest, largest + 1):
        for dx in range(-largest, largest + 1):  # compare where the two overlap
            error = ((after[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
                      - before[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]) ** 2).mean(axis=(1, 2, 3))
            better = error < best
            best[better], shift[better] = error[better], (dy, dx)
    return shift


def shift_kinds(shift: np.ndarray) -> dict[str, np.ndarray]:
    """The scene's motion as labels: vertical (0 up, 1 still, 2 down), horizontal (0 left, 1 still, 2 right) and
    both (3 x vertical + horizontal)."""
    vertical, horizontal = np.sign(shift[:, 0]) + 1, np.sign(shift[:, 1]) + 1
    return {"vertical": vertical, "horizontal": horizontal, "both": vertical * 3 + horizontal}


class TrueActionCodes:
    """Turns a pixel-input LAM into one whose codes are the footage's true actions (embedded), read from the batch:
    the same decoder and loss, no encoder or quantizer in the way."""

    def __init__(self, model, num_true: int):
        self.model, self.actions = model, None
        model.true_codes = torch.nn.Embedding(num_true, model.config.dim)
        model._latent_actions = self._codes  # the one place PixelLAM turns frames into codes

    def _codes(self, video: torch.Tensor) -> QuantizerOutput:
        actions = self.actions.clamp_min(0)  # -1 (no action) happens only after an episode's last frame
        zero = video.new_zeros(())
        return QuantizerOutput(self.model.true_codes(actions), actions, zero, zero, zero)


@torch.no_grad()
def score(model, index: EpisodeIndex, val: WindowDataset, windows: int, coded=None, shifts=None) -> dict:
    """The val split labelled by the model, against the true actions, their classes, each transition's place and
    the scene's shift; the reconstruction error on `windows` val windows (with their true actions when `coded`)."""
    model.eval()
    chosen = np.linspace(0, len(val) - 1, windows).astype(int)
    if coded is not None:
        pairs = [val[i] for i in chosen]
        video, coded.actions = torch.stack([v for v, _ in pairs]), torch.stack([a for _, a in pairs])
    else:
        video = torch.stack([val[i] for i in chosen])
    recon = model.loss(video).recon
    errors = {"reconstruction_mse": float(F.mse_loss(recon, video[:, 1:])),
              "nothing_moves_mse": float(F.mse_loss(video[:, :-1], video[:, 1:]))}
    if coded is not None:  # the codes are the true actions: nothing to score them against
        model.train()
        return errors
    footage = label(model, index, "val")
    model.train()
    latent, true = np.concatenate(footage.latent_actions), np.concatenate(footage.true_actions)
    per_window = model.spec.num_frames - 1
    place = np.concatenate([np.arange(len(a)) % per_window for a in footage.latent_actions])
    known = true >= 0
    result = {"vs_true": agreement(latent[known], true[known], model.num_actions),
              "vs_place_in_window": agreement(latent, place, model.num_actions),
              "vs_scene_shift": {kind: agreement(latent, labels, model.num_actions, table=kind == "both")
                                 for kind, labels in shift_kinds(shifts).items()},
              "codes_used": int(np.unique(latent).size)}
    classes = index.manifest.get("action_classes")
    if classes:
        names, lookup = action_class_lookup(classes)
        result["vs_classes"] = {"classes": names} | agreement(latent[known], lookup[true[known]].numpy(),
                                                              model.num_actions, table=True)
    return result | errors


def actions_vs_scene_shift(true: np.ndarray, shifts: np.ndarray) -> dict:
    """How much the scene's shift alone tells of the true actions (NMI of the actions with each kind of shift)."""
    known = true >= 0
    return {kind: agreement(labels[known], true[known], 9)["nmi"] for kind, labels in shift_kinds(shifts).items()}


def describe(point: dict) -> str:
    errors = f"reconstruction MSE {point['reconstruction_mse']:.2e} (nothing moves {point['nothing_moves_mse']:.2e})"
    if "vs_true" not in point:
        return errors
    true, shift = point["vs_true"], point["vs_scene_shift"]
    return (f"NMI with the true actions {true['nmi']:.3f} (map {true['mapping_accuracy']:.3f}, majority "
            f"{true['majority_baseline']:.3f}); with the place in the window {point['vs_place_in_window']['nmi']:.3f}; "
            f"with the scene's shift {shift['both']['nmi']:.3f} (vertical {shift['vertical']['nmi']:.3f}, horizontal "
            f"{shift['horizontal']['nmi']:.3f}); codes used {point['codes_used']}; {errors}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "coinrun-tiny.toml")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's LAM + dynamics steps)")
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--windows", type=int, default=64, help="val windows the reconstruction error is taken on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codes", choices=("latent", "true-actions"), default="latent",
                        help="true-actions: the decoder is trained with the footage's true actions as its codes")
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
    coded = TrueActionCodes(model, true_action_count(index)) if args.codes == "true-actions" else None
    train = WindowDataset(index, "train", train_cfg.seq_len, with_actions=coded is not None)
    val = WindowDataset(index, "val", train_cfg.seq_len, with_actions=coded is not None)
    val_footage = list(index.episode_arrays("val"))
    shifts = np.concatenate([scene_shift(frames) for frames, _ in val_footage])
    shift_tells = actions_vs_scene_shift(np.concatenate([actions for _, actions in val_footage]), shifts)
    del val_footage
    loader = torch.utils.data.DataLoader(train, batch_size=train_cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    # The stage's optimizer, schedule and clipping (genie_core.training.engine), for the action model alone.
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2),
                                  weight_decay=train_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))
    points, step = [], 0
    while step < train_cfg.steps:
        for batch in loader:
            if coded is not None:
                batch, coded.actions = batch
            loss = model.loss(batch).loss
            optimizer.zero_grad()
            loss.backward()
            if train_cfg.grad_clip:  # 0 disables clipping, as in the stage
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            if step % args.every == 0 or step == train_cfg.steps:
                points.append({"step": step, **score(model, index, val, args.windows, coded, shifts)})
                print(f"step {step}: {describe(points[-1])}", flush=True)
            if step == train_cfg.steps:
                break
    name = args.name or args.data.name
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lam-alone-{name}.json"
    path.write_text(json.dumps({"data": str(args.data), "recipe": str(args.recipe), "overrides": args.overrides,
                                "action_model": choice.name, "codes": args.codes, "steps": train_cfg.steps,
                                "seed": args.seed, "true_actions_vs_scene_shift": shift_tells,
                                "environment": environment(), "points": points}, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How a world holds up past the frames it was trained on, with each way its window can move ([world] window).

    python benchmarks/long_rollout.py RUN [--steps 24] [--windows 128] [--data DATA] [--name NAME] [--out DIR]

A world trained on windows of T frames plays a long session with a rolling context ([world] window): "slide" keeps
the last T - 1 frames, so its dynamics cache is rebuilt every step; "block" drops the oldest half of the context at
once and extends its cache in between, so most frames cost one cached step, but the history then holds between
half and all of the context. On --windows evenly spaced windows of --steps + 1 frames of the validation split
(RUN's own footage, or --data), each window's first frame is the prompt and the latent action model infers the
actions from the true frames (in windows of its own length that overlap by one frame); the same actions drive a
rollout with each window, decoded exactly. Scored at every step against the true frames (PSNR), beside the prompt
frame shown again; and block minus slide window by window (paired), over the steps past the trained context, where
the two differ. Point it at a run trained on tuning levels: this is where `[world] window` is chosen.
Prints a table; saves benchmarks/results/long-rollout-NAME.json and .png (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs
import torch

from genie_core.config import WINDOWS
from genie_core.data.footage import EpisodeIndex, WindowDataset, evenly_spaced, overlapping
from genie_core.eval.metrics import mean_and_ci, psnr
from genie_core.run.folder import RunFolder
from genie_core.world.model import infer_actions_in_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

BATCH = 16
LABELS = {"copy_prompt": "the prompt frame again", "slide": "[world] window = slide", "block": "[world] window = block"}


@torch.no_grad()
def scores(world, video: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """PSNR [windows, steps] of each window's rollout per [world] window, and of the prompt shown again."""
    truth = video[:, 1:]
    out = {"copy_prompt": psnr(video[:, :1].expand_as(truth), truth)}
    firsts = range(0, len(video), BATCH)
    actions = torch.cat([infer_actions_in_windows(world.action_model, video[f : f + BATCH]) for f in firsts])
    for window in WINDOWS:  # the same actions and sampling noise for each
        moving = attrs.evolve(world, config=attrs.evolve(world.config, window=window))
        per_batch = []
        for first in firsts:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
            rollout = moving.rollout(video[first : first + BATCH, 0], actions[first : first + BATCH], generator)
            per_batch.append(psnr(rollout[:, 1:], truth[first : first + BATCH]))
        out[window] = torch.cat(per_batch)
    return out


def plot(by_step: dict[str, list[dict]], context: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in by_step.items():
        steps = range(1, len(rows) + 1)
        mean = [r["mean"] for r in rows]
        ci = [r["ci95"] for r in rows]
        ax.plot(steps, mean, label=LABELS.get(name, name), linestyle="--" if name == "copy_prompt" else "-")
        ax.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.15)
    ax.axvline(context - 0.5, color="grey", linewidth=0.8)
    ax.text(context - 0.3, ax.get_ylim()[1], " past the trained context", va="top", fontsize=8, color="grey")
    ax.set_xlabel("generated step t")
    ax.set_ylabel("PSNR against the truth (dB)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, default=24, help="generated steps after the prompt")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--data", type=Path, help="footage to score on (default: the run's own); its val split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="results name (default: the run folder's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    folder = RunFolder.find(args.run)
    world = folder.world()
    context = world.context
    if args.steps < context:
        parser.error(f"--steps {args.steps}: the windows differ only past the world's context of {context} frames")
    data = WindowDataset(EpisodeIndex.open(args.data or folder.data), "val", args.steps + 1)
    chosen = evenly_spaced(data, args.windows)
    shared = overlapping(data, chosen)
    video = torch.stack([data[i] for i in chosen])
    result = scores(world, video, args.seed)
    past = slice(context - 1, None)  # generated steps t >= context: the first whose history was cut
    paired = (result["block"][:, past] - result["slide"][:, past]).mean(dim=1)
    by_step = {name: [mean_and_ci(values[:, k]) for k in range(values.shape[1])] for name, values in result.items()}
    summary = {name: mean_and_ci(values[:, past].mean(dim=1)) for name, values in result.items()}
    print(f"{folder.path}: context {context} frames, {len(video)} windows of {args.steps + 1} frames "
          f"({shared} share frames with the next)")
    print(f"{'t':>3} " + " ".join(f"{name:>16}" for name in result))
    for k in range(args.steps):
        print(f"{k + 1:>3} " + " ".join(f"{by_step[n][k]['mean']:>9.2f} ± {by_step[n][k]['ci95']:>4.2f}"
                                         for n in result))
    block_minus_slide = mean_and_ci(paired)
    print(f"t >= {context}: " + ", ".join(f"{n} {s['mean']:.2f} ± {s['ci95']:.2f} dB" for n, s in summary.items())
          + f"; block minus slide, window by window, {block_minus_slide['mean']:+.2f} ± "
            f"{block_minus_slide['ci95']:.2f} dB")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"long-rollout-{args.name or folder.path.name}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"run": str(folder.path), "data": str(args.data or folder.data), "context": context, "steps": args.steps,
         "windows": len(video), "overlapping_windows": shared, "seed": args.seed,
         "sampler": attrs.asdict(world.sampler.config), "by_step_db": by_step, "past_context_db": summary,
         "block_minus_slide_db": block_minus_slide, "environment": environment()}, indent=2))
    plot(by_step, context, stem.with_suffix(".png"), f"{folder.path.name}: {len(video)} held-out windows")
    print(f"saved {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

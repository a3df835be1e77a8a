"""How much do the frames of some footage say about its actions? An inverse-dynamics probe trained with the labels.

    python benchmarks/action_signal.py DATA [DATA ...] [--context 1] [--steps 1500] [--name NAME]

For each data set (`genie data build ... --out DATA`, or a run's data folder): a small convolutional classifier reads
frames x_{t-context}..x_{t+1} and predicts the action taken at t. It is trained on the train split with the true
actions and scored on the val split: accuracy beside always answering the most frequent action, and the NMI
between its predictions and the true actions, raw and by the source's classes of actions that do the same (the
measure the evaluation reports for latent actions). A latent action model learns without the labels from the same
frames, so the probe's NMI is a rough ceiling for its NMI on that footage: frames in which even a supervised probe
cannot tell the actions apart carry little action signal to discover. Settings of the policy that made the footage
(how long actions are held, which are drawn) can be compared this way in minutes, before any model is trained.
Prints a table; saves benchmarks/results/action-signal-NAME.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from genie_core.data.footage import EpisodeIndex, WindowDataset, evenly_spaced, true_action_count
from genie_core.eval.metrics import action_agreement, action_class_lookup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402


def probe_network(frames: int, actions: int, width: int = 32) -> torch.nn.Module:
    """Frames stacked on the channel axis -> action logits; stride-2 convolutions down to 4x4, then one layer."""
    layers, channels = [], 3 * frames
    for out in (width, width, 2 * width, 2 * width):
        layers += [torch.nn.Conv2d(channels, out, 4, stride=2, padding=1), torch.nn.GELU()]
        channels = out
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(channels * 16, actions))


def windows(index: EpisodeIndex, split: str, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` evenly spaced windows [N, T * 3, H, W] and the action taken between their last two frames [N]."""
    data = WindowDataset(index, split, length, with_actions=True)
    items = [data[i] for i in evenly_spaced(data, count)]
    video = torch.stack([v.flatten(0, 1) for v, _ in items])
    actions = torch.stack([a[-1] for _, a in items])
    known = actions >= 0
    return video[known], actions[known]


def probe(path: Path, context: int, steps: int, batch_size: int, train_windows: int, val_windows: int,
          seed: int) -> dict:
    index = EpisodeIndex.open(path)
    num_actions = true_action_count(index)
    if not num_actions:
        raise SystemExit(f"error: {path}: the footage records no true actions; the probe needs them")
    length = context + 2
    train_x, train_y = windows(index, "train", length, train_windows)
    val_x, val_y = windows(index, "val", length, val_windows)
    torch.manual_seed(seed)
    net = probe_network(length, num_actions)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(net(train_x[batch] * 2 - 1), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(val_x[i:i + 256] * 2 - 1).argmax(1) for i in range(0, len(val_x), 256)])
    raw = action_agreement(predicted, val_y, num_actions)
    result = {"data": str(path), "train_windows": len(train_x), "val_transitions": len(val_y),
              "accuracy": (predicted == val_y).double().mean().item(),
              "majority_baseline": (val_y == torch.bincount(train_y).argmax()).double().mean().item(),
              "nmi": raw["nmi"], "classes_nmi": None}
    classes = index.manifest.get("action_classes")
    if classes:  # the same predictions, both sides read as classes
        names, class_of = action_class_lookup(classes)
        result["classes_nmi"] = action_agreement(class_of[predicted], class_of[val_y], len(names))["nmi"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--context", type=int, default=1, help="frames before x_t the probe also sees")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-windows", type=int, default=8000)
    parser.add_argument("--val-windows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="footage")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'data':40} {'accuracy':>9} {'majority':>9} {'NMI':>6} {'classes NMI':>12}")
    for path in args.data:
        row = probe(path, args.context, args.steps, args.batch_size, args.train_windows, args.val_windows, args.seed)
        rows.append(row)
        classes = "-" if row["classes_nmi"] is None else f"{row['classes_nmi']:.3f}"
        print(f"{path.name:40} {row['accuracy']:9.3f} {row['majority_baseline']:9.3f} {row['nmi']:6.3f} {classes:>12}",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"action-signal-{args.name}.json"
    settings = {k: getattr(args, k) for k in ("context", "steps", "batch_size", "train_windows", "val_windows", "seed")}
    out.write_text(json.dumps({"environment": environment(), "settings": settings, "rows": rows}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How many frames the tokenizer needs to draw each new frame of play: quality against decoding time.

    python benchmarks/decode_frames.py RUN [--frames 1,2,4] [--windows 128] [--repeats 20] [--name NAME] [--out DIR]

Play draws every new frame by decoding its tokens with those of the frames before it (`[world] decode_frames`; 0:
the tokenizer's whole window, as rollouts are decoded). On --windows evenly spaced windows of RUN's validation split,
as long as the tokenizer's window: the last frame's tokens decoded with k frames against the same decoded with the
whole window (PSNR; 100 dB where they are equal), and against the true frame, window by window beside the whole
window's (paired: the same windows); and the median time of one such decode at batch 1 (--repeats of them). Point it
at a run trained on tuning levels, never at the evaluation levels: this is where `[world] decode_frames` is chosen.
Prints a table; saves benchmarks/results/decode-frames-NAME.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from genie_core.data.footage import EpisodeIndex, WindowDataset, evenly_spaced
from genie_core.eval.metrics import mean_and_ci, psnr
from genie_core.run.folder import RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

BATCH = 16


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--frames", default="1,2,4", help="frames to decode with, comma separated")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--name", help="results name (default: the run folder's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    folder = RunFolder.find(args.run)
    world = folder.world()
    window = world.tokenizer.spec.num_frames
    counts = sorted({min(int(k), window) for k in args.frames.split(",")} | {window})
    data = WindowDataset(EpisodeIndex.open(folder.data), "val", window)
    video = torch.stack([data[i] for i in evenly_spaced(data, args.windows)])
    truth = video[:, -1:]
    tokens = torch.cat([world.tokenizer.encode(video[i : i + BATCH]) for i in range(0, len(video), BATCH)])
    drawn = {k: torch.cat([world.decode_last(tokens[i : i + BATCH], k) for i in range(0, len(tokens), BATCH)])
             for k in counts}
    exact_vs_truth = psnr(drawn[window], truth)
    rows = []
    for k in counts:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            world.decode_last(tokens[:1], k)
            times.append(time.perf_counter() - start)
        vs_truth = psnr(drawn[k], truth)
        rows.append({"frames": k, "vs_whole_window_db": mean_and_ci(psnr(drawn[k], drawn[window])),
                     "vs_truth_db": mean_and_ci(vs_truth),
                     "vs_truth_minus_whole_window_db": mean_and_ci(vs_truth - exact_vs_truth),
                     "decode_ms": 1e3 * statistics.median(times)})
    print(f"{folder.path}: the tokenizer's window is {window} frames; {len(video)} windows")
    print(f"{'frames':>6} {'PSNR vs whole window':>21} {'PSNR vs truth':>14} {'minus whole window':>19} "
          f"{'decode ms':>10}")
    for r in rows:
        def cell(x):
            return f"{x['mean']:.2f} ± {x['ci95']:.2f}"
        print(f"{r['frames']:>6} {cell(r['vs_whole_window_db']):>21} {cell(r['vs_truth_db']):>14} "
              f"{cell(r['vs_truth_minus_whole_window_db']):>19} {r['decode_ms']:>10.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-frames-{args.name or folder.path.name}.json"
    path.write_text(json.dumps({"run": str(folder.path), "window": window, "windows": len(video),
                                "environment": environment(), "rows": rows}, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

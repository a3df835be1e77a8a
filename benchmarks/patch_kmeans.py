"""How sharp can a tokenizer with one code per p x p patch be? K-means of the training footage's patches, scored on
held-out frames: a per-patch vector quantizer with K codes and no context, the reference a learned tokenizer of that
patch size and codebook should reach or beat.

    python benchmarks/patch_kmeans.py DATA [--frames 6000] [--sizes 8:256,8:1024,8:4096,4:1024] [--name NAME]

DATA is a data set folder (`genie data build`, or RUN/data). Prints frame PSNR per (patch, codes) and saves JSON
to benchmarks/results/patch-kmeans-NAME.json (NAME: the data folder's name by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genie_core.data.footage import EpisodeIndex
from genie_core.eval.metrics import mean_and_ci

RESULTS = Path(__file__).resolve().parent / "results"


def frames(index: EpisodeIndex, split: str, count: int, seed: int = 0) -> torch.Tensor:
    """`count` frames of a split, drawn at random, as float [N, H, W, C] in [0, 1]."""
    rows = []
    for episode in index.episodes(split):
        data = np.load(index.shard_path(episode["shard"], "frames"), mmap_mode="r")
        rows.append(data[episode["start"]: episode["start"] + episode["length"]])
    every = np.concatenate(rows)
    chosen = np.random.default_rng(seed).choice(len(every), size=min(count, len(every)), replace=False)
    return torch.from_numpy(every[np.sort(chosen)]).float() / 255


def patches(video: torch.Tensor, p: int) -> torch.Tensor:
    n, h, w, c = video.shape
    return video.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)


def kmeans(x: torch.Tensor, k: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    centres = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        counts = torch.bincount(nearest, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
    return centres


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--frames", type=int, default=6000, help="training frames to cluster")
    parser.add_argument("--sizes", default="8:256,8:1024,8:4096,4:1024", help="patch:codes pairs")
    parser.add_argument("--name", help="names the results file (default: the data folder's name)")
    args = parser.parse_args()
    index = EpisodeIndex.open(args.data)
    train, val = frames(index, "train", args.frames), frames(index, "val", 800, seed=1)
    rows = []
    for pair in tqdm(args.sizes.split(","), desc="k-means"):
        p, k = (int(v) for v in pair.split(":"))
        centres = kmeans(patches(train, p), k)
        held = patches(val, p)
        recon = centres[torch.cdist(held, centres).argmin(1)]
        mse = ((recon - held) ** 2).reshape(len(val), -1).mean(1)
        rows.append({"patch": p, "codes": k, "frame_psnr_db": mean_and_ci(10 * torch.log10(1 / mse))})
        stat = rows[-1]["frame_psnr_db"]
        tqdm.write(f"patch {p}, {k} codes: held-out frame PSNR {stat['mean']:.2f} ± {stat['ci95']:.2f} dB")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"patch-kmeans-{args.name or args.data.name}.json"
    out.write_text(json.dumps({"data": str(args.data), "frames": len(train), "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()

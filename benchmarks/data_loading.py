"""Data benchmark: CoinRun generation against procgen's own stepping rate, and loader throughput against what
training consumes, measured side by side in one run.

    python benchmarks/data_loading.py [--levels 40] [--steps-per-level 200] [--batches 200]

Targets (the data issue): generation reaches at least 50% of procgen's raw stepping rate; with the best worker count
the loader delivers at least 5x the windows per second that tiny training consumes. Prints a table and saves
benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, source_identity
from genie_core.interfaces import DataSpec, TokenSpec, VideoSpec
from genie_core.recipe import load_recipe
from genie_core.training.engine import TokenizerTask, WorldModelTask

from stage_throughput import RESULTS, environment, timed_steps

REPO = Path(__file__).resolve().parents[1]


def raw_procgen_rate(source, levels: range) -> float:
    """Frames/s of procgen alone on the same levels and environment count: step with random actions, keep nothing."""
    c = source.config
    steps = 0
    start = time.perf_counter()
    for level in levels:
        env = source.make_env(level, c.num_envs)
        rng = np.random.default_rng(level)
        for _ in range(math.ceil(c.steps_per_level / c.num_envs)):
            env.observe()
            env.act(rng.integers(15, size=c.num_envs))
            steps += c.num_envs
        env.close()
    return steps / (time.perf_counter() - start)


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> dict:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
    seconds = time.perf_counter() - start
    windows = batches * batch_size / seconds
    frame_bytes = int(np.prod(dataset[0].shape[1:]))  # uint8 bytes read per frame
    return {"workers": workers, "windows_per_s": windows, "MB_per_s": windows * dataset.length * frame_bytes / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "coinrun-tiny.toml")
    parser.add_argument("--levels", type=int, default=100)
    parser.add_argument("--steps-per-level", type=int, default=200)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=15)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, [f"source.train_levels={args.levels}", "source.val_levels=1",
                                       f"source.steps_per_level={args.steps_per_level}"])
    choice, data = recipe.components["source"], recipe.data
    source = choice.info.cls(choice.config, DataSpec(resolution=data.resolution))
    folder = Path(tempfile.mkdtemp(prefix="genie-data-bench-"))
    try:
        source.make_env(0, 1).close()  # import procgen and its games before any clock starts
        start = time.perf_counter()
        manifest = build_dataset(source, source_identity(source, choice.name, choice.info.owner), data, folder,
                                 log=lambda *_: None)
        build_rate = manifest["frames"] / (time.perf_counter() - start)
        raw_rate = raw_procgen_rate(source, range(args.levels + 1))

        index = EpisodeIndex.open(folder)
        train = recipe.train
        rows = []
        for stage, cfg in train.items():
            dataset = WindowDataset(index, "train", cfg.seq_len)
            for workers in (0, 1, 2):
                rows.append({"stage_windows": stage, "seq_len": cfg.seq_len,
                             **loader_rate(dataset, cfg.batch_size, workers, args.batches)})

        # What tiny training consumes: windows per second of each stage, random video of the same shape.
        c, res = recipe.components, data.resolution
        tok_cfg, dyn_cfg = train["tokenizer"], train["dynamics"]
        tokenizer = c["tokenizer"].info.cls(c["tokenizer"].config,
                                            VideoSpec(height=res, width=res, num_frames=tok_cfg.seq_len))
        lam = c["action_model"].info.cls(c["action_model"].config,
                                         VideoSpec(height=res, width=res, num_frames=dyn_cfg.seq_len))
        dyn = c["dynamics"].info.cls(c["dynamics"].config,
                                     TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid,
                                               num_frames=dyn_cfg.seq_len, num_actions=lam.num_actions))
        tok_batch = torch.rand(tok_cfg.batch_size, tok_cfg.seq_len, 3, res, res)
        dyn_batch = torch.rand(dyn_cfg.batch_size, dyn_cfg.seq_len, 3, res, res)
        consumes = {
            "tokenizer": tok_cfg.batch_size / timed_steps(TokenizerTask(tokenizer), tok_batch, args.train_steps)[0],
            "dynamics": dyn_cfg.batch_size / timed_steps(WorldModelTask(lam, dyn, tokenizer), dyn_batch,
                                                         args.train_steps)[0],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"generation: {build_rate:,.0f} frames/s recorded vs {raw_rate:,.0f} frames/s procgen alone "
          f"({build_rate / raw_rate:.0%}; target >= 50%)")
    print(f"{'windows of':<12} {'T':>3} {'workers':>8} {'windows/s':>10} {'MB/s':>8} {'x training':>11}")
    for row in rows:
        ratio = row["windows_per_s"] / consumes[row["stage_windows"]]
        row["times_training"] = ratio
        print(f"{row['stage_windows']:<12} {row['seq_len']:>3} {row['workers']:>8} {row['windows_per_s']:>10,.0f} "
              f"{row['MB_per_s']:>8.1f} {ratio:>10.1f}x")
    print("training consumes: " + ", ".join(f"{k} {v:.1f} windows/s" for k, v in consumes.items()))
    best = {stage: max(r["times_training"] for r in rows if r["stage_windows"] == stage) for stage in consumes}
    verdict = {"generation_at_least_half_of_raw": build_rate / raw_rate >= 0.5,
               "loader_at_least_5x_training": all(v >= 5 for v in best.values())}
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in verdict.items()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "data_loading.json"
    out.write_text(json.dumps({"environment": environment(), "args": vars(args) | {"recipe": str(args.recipe)},
                               "frames": manifest["frames"], "generation_frames_per_s": build_rate,
                               "procgen_raw_frames_per_s": raw_rate, "loader": rows,
                               "training_windows_per_s": consumes, "targets": verdict}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Play speed against history length: frames per second of the MaskGIT sampler with and without the key/value cache.

    python benchmarks/play_speed.py recipes/coinrun-tiny.toml [KEY=VALUE ...] [--history 1,2,4,8,16,32]

For each history length h: the time to generate one frame after h frames (the sampler's steps from the recipe),
plus decoding it to pixels through the tokenizer's window, as a play session does; frames/s is the inverse. Weights
are random (speed does not depend on them) and the dynamics model is built with room for the longest history.
Uncached, every MaskGIT step re-runs the whole history; cached, the history runs once per frame and every step costs
one frame. Prints a table, saves JSON and a PNG to benchmarks/results/play-speed-RUNNAME[-cuda].{json,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

from genie_core.interfaces import TokenSpec, VideoSpec  # noqa: E402
from genie_core.recipe import load_recipe  # noqa: E402


def frame_seconds(tokenizer, dynamics, sampler, history_len: int, repeats: int, device) -> float:
    """Median seconds to sample one frame after `history_len` frames and decode it."""
    spec = dynamics.spec
    g = torch.Generator().manual_seed(history_len)
    history = torch.randint(0, spec.vocab_size, (1, history_len, *spec.grid), generator=g).to(device)
    actions = torch.randint(0, spec.num_actions, (1, history_len), generator=g).to(device)
    window = tokenizer.spec.num_frames
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        frame = sampler.sample_next(dynamics, history, actions, torch.Generator(device).manual_seed(i))
        recent = torch.cat([history[:, -(window - 1):], frame[:, None]], dim=1)
        tokenizer.decode(recent)[:, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def plot(rows: list[dict], path: Path, title: str) -> None:
    from genie_core.plots import loglog, plt, save

    fig, ax = plt.subplots(figsize=(6, 4))
    for cached, label in ((False, "uncached"), (True, "cached")):
        points = [r for r in rows if r["cached"] == cached]
        ax.plot([r["history"] for r in points], [r["frames_per_s"] for r in points], "o-", label=label)
    loglog(ax, "history (frames)", "frames per second")
    ax.legend()
    save(fig, path, title, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--history", default="1,2,4,8,16,32", help="history lengths, comma separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is there")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    recipe = load_recipe(args.recipe, args.overrides)
    lengths = [int(h) for h in args.history.split(",")]
    torch.manual_seed(0)
    c, res = recipe.components, recipe.data.resolution
    tok_frames = recipe.train["tokenizer"].seq_len
    tokenizer = c["tokenizer"].info.cls(c["tokenizer"].config, VideoSpec(height=res, width=res, num_frames=tok_frames))
    spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid, num_frames=max(lengths) + 1,
                     num_actions=c["action_model"].config.num_actions)
    dynamics = c["dynamics"].info.cls(c["dynamics"].config, spec)
    tokenizer, dynamics = tokenizer.eval().to(device), dynamics.eval().to(device)
    sampler_cls, sampler_cfg = c["sampler"].info.cls, c["sampler"].config
    if "cache" not in attrs.fields_dict(type(sampler_cfg)):
        sys.exit(f"error: sampler {c['sampler'].name} has no 'cache' option to compare")
    rows = []
    with torch.no_grad():
        for h in lengths:
            for cached in (False, True):
                sampler = sampler_cls(attrs.evolve(sampler_cfg, cache=cached))
                seconds = frame_seconds(tokenizer, dynamics, sampler, h, args.repeats, device)
                rows.append({"history": h, "cached": cached, "seconds": seconds, "frames_per_s": 1 / seconds})
    steps = getattr(sampler_cfg, "steps", None)
    print(f"{recipe.run.name}: {c['dynamics'].name} dynamics, {steps} sampler steps, {device.type}")
    print(f"{'history':>8} {'uncached fps':>13} {'cached fps':>11} {'speed-up':>9}")
    for h in lengths:
        plain, fast = (next(r for r in rows if r["history"] == h and r["cached"] == k) for k in (False, True))
        print(f"{h:>8} {plain['frames_per_s']:>13.2f} {fast['frames_per_s']:>11.2f} "
              f"{plain['seconds'] / fast['seconds']:>8.1f}x")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (f"play-speed-{recipe.run.name}" + ("-cuda" if device.type == "cuda" else ""))
    stem.with_suffix(".json").write_text(json.dumps(
        {"recipe": str(args.recipe), "overrides": args.overrides, "sampler_steps": steps, "device": device.type,
         "environment": environment(), "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"), f"{recipe.run.name}: {steps} MaskGIT steps per frame, {device.type}")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

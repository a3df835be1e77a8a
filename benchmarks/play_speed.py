"""Play speed against history length: frames per second of the MaskGIT sampler with and without the key/value cache.

    python benchmarks/play_speed.py recipes/coinrun-tiny.toml [KEY=VALUE ...] [--history 1,2,4,8,16,32]

For each history length h: a play session (`genie_core.world.Rollout`) that already holds h frames generates the
next frames one action at a time (the sampler's steps from the recipe), each decoded to pixels through the
tokenizer's window, as `genie play` does; frames/s is the inverse of the median time per frame. Weights are random
(speed does not depend on them) and the dynamics model is built with room for the longest history, so the window
never moves. Uncached, every MaskGIT step re-runs the whole history; cached, each frame extends the cache by the
frame before it and every step costs one frame. Prints a table, saves JSON and a PNG to benchmarks/results/play-speed-RUNNAME[-cuda].{json,png}.
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
from genie_core.world import Rollout, World  # noqa: E402


def session(world: World, history_len: int, steps: int, device) -> tuple[Rollout, torch.Tensor]:
    """A play session holding `history_len` random frames, and the actions of those and of `steps` more frames."""
    spec = world.dynamics.spec
    g = torch.Generator().manual_seed(history_len)
    history = torch.randint(0, spec.vocab_size, (1, history_len, *spec.grid), generator=g).to(device)
    actions = torch.randint(0, spec.num_actions, (1, history_len - 1 + steps), generator=g).to(device)
    return Rollout(world, history, actions[:, : history_len - 1]), actions


def frame_seconds(world: World, history_len: int, repeats: int, device) -> tuple[float, float]:
    """Median seconds per frame of a session that holds `history_len` frames: sampling it, and decoding it to
    pixels."""
    rollout, actions = session(world, history_len, repeats + 1, device)
    generator = torch.Generator(device).manual_seed(0)

    def timed(work) -> float:
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    sample, decode = [], []
    for i in range(repeats + 1):  # the first is a warm-up (and builds the cache)
        sample.append(timed(lambda: rollout.step(actions[:, history_len - 1 + i], generator)))
        decode.append(timed(lambda: world.decode_last(rollout.tokens)))
    return statistics.median(sample[1:]), statistics.median(decode[1:])


def profile(world: World, history_len: int, device) -> None:
    """torch.profiler's table of one cached frame (sample and decode) after `history_len` frames."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rollout, actions = session(world, history_len, 2, device)
    rollout.step(actions[:, history_len - 1])  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        rollout.step(actions[:, history_len])
        world.decode_last(rollout.tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"kernel launches in one frame: {sum(e.count for e in prof.key_averages() if e.key == 'cudaLaunchKernel')}")


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
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of one frame")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the models' matrix products (quantizers stay float32)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    recipe = load_recipe(args.recipe, args.overrides)
    lengths = [int(h) for h in args.history.split(",")]
    torch.manual_seed(0)
    c, res = recipe.components, recipe.data.resolution
    tok_frames = recipe.train["tokenizer"].seq_len
    tokenizer = c["tokenizer"].info.cls(c["tokenizer"].config, VideoSpec(height=res, width=res, num_frames=tok_frames))
    spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid, num_frames=max(lengths) + args.repeats + 2,
                     num_actions=c["action_model"].config.num_actions)
    dynamics = c["dynamics"].info.cls(c["dynamics"].config, spec)
    lam_spec = VideoSpec(height=res, width=res, num_frames=recipe.train["dynamics"].seq_len,
                         token_vocab=tokenizer.codebook_size, token_grid=tuple(tokenizer.grid))
    action_model = c["action_model"].info.cls(c["action_model"].config, lam_spec).eval()  # not run: actions are given
    tokenizer, dynamics = tokenizer.eval().to(device), dynamics.eval().to(device)
    sampler_cls, sampler_cfg = c["sampler"].info.cls, c["sampler"].config
    if "cache" not in attrs.fields_dict(type(sampler_cfg)):
        sys.exit(f"error: sampler {c['sampler'].name} has no 'cache' option to compare")
    rows = []
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for h in lengths:
            for cached in (False, True):
                world = World(tokenizer, action_model, dynamics, sampler_cls(attrs.evolve(sampler_cfg, cache=cached)))
                sample, decode = frame_seconds(world, h, args.repeats, device)
                rows.append({"history": h, "cached": cached, "seconds": sample + decode, "sample_seconds": sample,
                             "decode_seconds": decode, "frames_per_s": 1 / (sample + decode)})
        if args.profile:
            profile(world, max(lengths), device)
    steps = getattr(sampler_cfg, "steps", None)
    print(f"{recipe.run.name}: {c['dynamics'].name} dynamics, {steps} sampler steps, {device.type}")
    print(f"{'history':>8} {'uncached fps':>13} {'cached fps':>11} {'speed-up':>9} {'cached: sample ms':>18} "
          f"{'decode ms':>10}")
    for h in lengths:
        plain, fast = (next(r for r in rows if r["history"] == h and r["cached"] == k) for k in (False, True))
        print(f"{h:>8} {plain['frames_per_s']:>13.2f} {fast['frames_per_s']:>11.2f} "
              f"{plain['seconds'] / fast['seconds']:>8.1f}x {fast['sample_seconds'] * 1e3:>18.1f} "
              f"{fast['decode_seconds'] * 1e3:>10.1f}")
    RESULTS.mkdir(exist_ok=True)
    precision = "" if args.precision == "fp32" else f"-{args.precision}"
    stem = RESULTS / (f"play-speed-{recipe.run.name}{precision}" + ("-cuda" if device.type == "cuda" else ""))
    stem.with_suffix(".json").write_text(json.dumps(
        {"recipe": str(args.recipe), "overrides": args.overrides, "sampler_steps": steps, "device": device.type,
         "precision": args.precision,
         "environment": environment(), "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"), f"{recipe.run.name}: {steps} MaskGIT steps per frame, {device.type} {args.precision}")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Play speed against history length: frames per second of the MaskGIT sampler with and without the key/value cache.

    python benchmarks/play_speed.py recipes/coinrun-tiny.toml [KEY=VALUE ...] [--history 1,2,4,8,16,32] [--compile]

For each history length h: a play session (`genie_core.world.model.Rollout`) that already holds h frames generates the
next frames one action at a time (the sampler's steps from the recipe), each decoded to pixels as `genie play` does
(from the recipe's `[world] decode_frames`, by default the tokenizer's window); frames/s is the inverse of the median
time per frame, after 4 frames of warm-up. Weights are random (speed does not depend on them); the dynamics model is
built for h + repeats + 4 frames, so its window never moves and its cache has the room it has in play; with `--context
C` it is built for C frames instead, and histories of C or more play with a moving window (`--window slide`: the cache
is rebuilt before every frame; `block`: every (C - 1) // 2 frames), as long sessions do. The median passes over those
rebuilds and a player does not: sustained frames/s is the frames over the time they all took (time a whole number of
block periods with `--repeats`). Uncached, every MaskGIT step re-runs the whole history; cached, each frame extends the
cache by the frame before it and every step costs one frame (cached-apart: that frame in a pass of its own instead of
in the first step's, the dynamics model's `defer_extend` off, to show what sharing the pass gives); `--compile` adds
the cached sampler with its per-step work compiled by torch.compile, and the shown frame's decoding with `[world]
decode_frames` set, as `genie play --compile` does (compile time reported apart). The speed-ups
compare sampling alone and whole frames (sampling + decoding). Prints a table, saves JSON and a PNG to
benchmarks/results/play-speed-RUNNAME[-contextC-WINDOW][-PRECISION][-compiled[-MODE]][-cuda].{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import attrs
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genie_core.interfaces import TokenSpec, VideoSpec  # noqa: E402
from genie_core.io.machine import keep_freed_memory  # noqa: E402
from genie_core.recipe import load_recipe  # noqa: E402
from genie_core.world.model import Rollout, World  # noqa: E402

from stage_throughput import RESULTS, environment  # noqa: E402

# Untimed frames before the timed ones. The first builds the cache (and compiles the step that draws from it); the
# first frame that extends the cache instead compiles the extending step, and past the trained context a block window
# may rebuild the cache on the second frame too, so the third or fourth is the first to extend.
WARMUP_FRAMES = 4


def session(world: World, history_len: int, steps: int, device) -> tuple[Rollout, torch.Tensor]:
    """A play session holding `history_len` random frames, and the actions of those and of `steps` more frames."""
    spec = world.dynamics.spec
    g = torch.Generator().manual_seed(history_len)
    history = torch.randint(0, spec.vocab_size, (1, history_len, *spec.grid), generator=g).to(device)
    actions = torch.randint(0, spec.num_actions, (1, history_len - 1 + steps), generator=g).to(device)
    return Rollout(world, history, actions[:, : history_len - 1]), actions


def frame_timer(world: World, history_len: int, frames: int, device):
    """A play session that holds `history_len` frames, and a function that plays its next frame (up to `frames`)
    and returns the seconds it took to sample it and to decode it to pixels."""
    rollout, actions = session(world, history_len, frames, device)
    generator = torch.Generator(device).manual_seed(0)
    played = 0

    def timed(work) -> float:
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def next_frame() -> tuple[float, float]:
        nonlocal played
        action = actions[:, history_len - 1 + played]
        played += 1
        return timed(lambda: rollout.step(action, generator)), timed(lambda: world.decode_shown(rollout.tokens))
    return next_frame


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


# "cached-apart": each finished frame extends the cache in a pass of its own (`defer_extend` off) instead of in the
# pass of the next frame's first MaskGIT step: what running the two together gives.
MODES = ("uncached", "cached-apart", "cached", "cached+compiled")


def plot(rows: list[dict], path: Path, title: str) -> None:
    from genie_core.eval.plots import loglog, plt, save

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        points = [r for r in rows if r["mode"] == mode]
        if points:
            ax.plot([r["history"] for r in points], [r["frames_per_s"] for r in points], "o-", label=mode)
    loglog(ax, "history (frames)", "frames per second")
    ax.legend()
    save(fig, path, title, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--history", default="1,2,4,8,16,32", help="history lengths, comma separated")
    parser.add_argument("--context", type=int, default=0,
                        help="frames the dynamics model is built for (its trained length); histories past it play "
                             "with a moving window, as long sessions do (default 0: room for every history)")
    parser.add_argument("--window", choices=("slide", "block"), default="slide",
                        help="with --context: how the window moves ([world] window)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is there")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of one frame")
    parser.add_argument("--compile", action="store_true", help="also measure the cached sampler with compiled steps")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile's mode for --compile (e.g. reduce-overhead: CUDA graphs on a GPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the models' matrix products (quantizers stay float32)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `genie` does (GENIE_KEEP_FREED_MEMORY=0: glibc's default)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    recipe = load_recipe(args.recipe, args.overrides)
    lengths = [int(h) for h in args.history.split(",")]
    torch.manual_seed(0)
    c, res = recipe.components, recipe.data.resolution
    tok_frames = recipe.train["tokenizer"].seq_len
    tokenizer = c["tokenizer"].info.cls(c["tokenizer"].config, VideoSpec(height=res, width=res, num_frames=tok_frames))
    lam_spec = VideoSpec(height=res, width=res, num_frames=recipe.train["dynamics"].seq_len,
                         token_vocab=tokenizer.codebook_size, token_grid=tuple(tokenizer.grid))
    action_model = c["action_model"].info.cls(c["action_model"].config, lam_spec).eval()  # not run: actions are given
    tokenizer = tokenizer.eval().to(device)
    sampler_cls, sampler_cfg = c["sampler"].info.cls, c["sampler"].config
    if "cache" not in attrs.fields_dict(type(sampler_cfg)):
        sys.exit(f"error: sampler {c['sampler'].name} has no 'cache' option to compare")
    modes = [mode for mode in MODES if (args.compile or mode != "cached+compiled")
             and (mode != "cached-apart" or hasattr(c["dynamics"].info.cls, "defer_extend"))]
    rows = []
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for h in lengths:
            spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid,
                             num_frames=args.context or h + args.repeats + WARMUP_FRAMES,
                             num_actions=c["action_model"].config.num_actions)
            torch.manual_seed(0)
            dynamics = c["dynamics"].info.cls(c["dynamics"].config, spec).eval().to(device)
            timers, warm_up = {}, {}
            for mode in modes:
                model = dynamics
                if mode == "cached+compiled":
                    torch._dynamo.reset()  # a new model per history: compile afresh rather than pile up recompiles
                    model = copy.deepcopy(dynamics)
                    model.compile_cached_steps(mode=args.compile_mode)
                elif mode == "cached-apart":
                    model = copy.deepcopy(dynamics)
                    model.defer_extend = False
                sampler = sampler_cls(attrs.evolve(sampler_cfg, cache=mode != "uncached"))
                world = World(tokenizer, action_model, model, sampler,
                              attrs.evolve(recipe.world, window=args.window))
                if mode == "cached+compiled":  # as `genie play --compile`: the shown frame's decoding too
                    world.compile_shown_decoding(mode=args.compile_mode)
                timers[mode] = frame_timer(world, h, args.repeats + WARMUP_FRAMES, device)
                warm_up[mode] = sum(sum(timers[mode]()) for _ in range(WARMUP_FRAMES))
            # The modes take turns frame by frame, so that this machine's drifting speed treats them alike.
            times = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    times[mode].append(timers[mode]())
            for mode in modes:
                sample = statistics.median(t[0] for t in times[mode])
                decode = statistics.median(t[1] for t in times[mode])
                rows.append({"history": h, "mode": mode, "seconds": sample + decode, "sample_seconds": sample,
                             "decode_seconds": decode, "frames_per_s": 1 / (sample + decode),
                             "sustained_frames_per_s": len(times[mode]) / sum(map(sum, times[mode]))}
                            | ({"compile_seconds": warm_up[mode]} if mode == "cached+compiled" else {}))
        if args.profile:
            profile(World(tokenizer, action_model, dynamics, sampler_cls(sampler_cfg)), max(lengths), device)
    steps = getattr(sampler_cfg, "steps", None)
    print(f"{recipe.run.name}: {c['dynamics'].name} dynamics, {steps} sampler steps, {device.type} {args.precision}")
    print(f"{'history':>7} {'mode':>16} {'frames/s':>9} {'sustained':>10} {'sample ms':>10} {'decode ms':>10} "
          f"{'sampling speed-up':>18} {'frame speed-up':>15}")
    for h in lengths:
        plain = next(r for r in rows if r["history"] == h and r["mode"] == "uncached")
        for r in (r for r in rows if r["history"] == h):
            r["sampling_speedup"] = plain["sample_seconds"] / r["sample_seconds"]
            r["frame_speedup"] = plain["seconds"] / r["seconds"]
            print(f"{h:>7} {r['mode']:>16} {r['frames_per_s']:>9.2f} {r['sustained_frames_per_s']:>10.2f} "
                  f"{r['sample_seconds'] * 1e3:>10.1f} "
                  f"{r['decode_seconds'] * 1e3:>10.1f} {r['sampling_speedup']:>17.1f}x {r['frame_speedup']:>14.1f}x")
    compiles = [r["compile_seconds"] for r in rows if "compile_seconds" in r]
    if compiles:
        print(f"compiling the cached steps took {statistics.median(compiles):.1f} s (the warm-up frames; median over "
              f"history lengths)")
    RESULTS.mkdir(exist_ok=True)
    precision = "" if args.precision == "fp32" else f"-{args.precision}"
    compiled = "-compiled" + (f"-{args.compile_mode}" if args.compile_mode else "") if args.compile else ""
    window = f"-context{args.context}-{args.window}" if args.context else ""
    cuda = "-cuda" if device.type == "cuda" else ""
    stem = RESULTS / f"play-speed-{recipe.run.name}{window}{precision}{compiled}{cuda}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"recipe": str(args.recipe), "overrides": args.overrides, "sampler_steps": steps, "device": device.type,
         "precision": args.precision, "compile_mode": args.compile_mode if args.compile else None,
         "context": args.context or None, "window": args.window if args.context else None,
         "environment": environment(), "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"),
         f"{recipe.run.name}: {steps} MaskGIT steps per frame, {device.type} {args.precision}")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory and time of ST attention against full spatiotemporal attention as the clip grows.

    python benchmarks/attention_scaling.py                                   # CPU defaults: the tiny tokenizer's width
    python benchmarks/attention_scaling.py --dim 512 --heads 8 --tokens 256 --batch 4 --precision bf16  # paper, GPU

One training step (forward and backward) of a stack of `STBlock`s (spatial attention within each frame, causal
temporal attention along each position: cost linear in T for a fixed frame) and of a `FullSTTransformer` (every token
attends to every token of its own and earlier frames: cost quadratic in T*N), for T = 4, 8, 16, 32 frames of N tokens.
Each point runs in a fresh process so its peak memory is its own: allocated GPU memory on CUDA, growth of the
resident set on CPU (torch keeps no allocation count there). A point that runs out of memory keeps its row with the
error. Prints a table and saves JSON and a PNG to benchmarks/results/attention-scaling[-cuda].{json,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

KINDS = {"st": "ST (spatial + causal temporal)", "full": "full spatiotemporal (causal in time)"}


def build(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    from genie_core.nn import FullSTTransformer, STTransformer

    if kind == "st":
        return STTransformer(args.dim, args.depth, args.heads)
    return FullSTTransformer(args.dim, args.depth, args.heads)


def measure_point(kind: str, frames: int, args: argparse.Namespace) -> dict:
    """Seconds per forward + backward (median of --repeats) and the peak memory above what model and input hold."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    model = build(kind, args).to(device)
    x = torch.randn(args.batch, frames, args.tokens, args.dim, device=device, requires_grad=True)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x).float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up: kernels, allocator
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"kind": kind, "frames": frames, "tokens": frames * args.tokens, "seconds": statistics.median(times),
            "peak_memory_mib": peak / 2**20, "device": device.type, "error": None}


def run_point(kind: str, frames: int, argv: list[str]) -> dict:
    """One point in a child process (a fresh peak); an out-of-memory or any other failure keeps its row."""
    cmd = [sys.executable, __file__, *argv, "--point", kind, str(frames)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"kind": kind, "frames": frames, "seconds": None, "peak_memory_mib": None,
            "error": lines[-1] if lines else f"exit status {done.returncode}"}


def plot(rows: list[dict], path: Path, title: str) -> None:
    from genie_core.eval.plots import loglog, plt, save

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, label in KINDS.items():
        points = [r for r in rows if r["kind"] == kind and r["error"] is None]
        frames = [r["frames"] for r in points]
        axes[0].plot(frames, [r["seconds"] * 1000 for r in points], "o-", label=label)
        axes[1].plot(frames, [r["peak_memory_mib"] for r in points], "o-", label=label)
    for ax, ylabel in zip(axes, ("ms per training step", "peak memory (MiB)")):
        loglog(ax, "frames T", ylabel)
    axes[0].legend(fontsize=8)
    save(fig, path, title, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="4,8,16,32", help="clip lengths T, comma separated")
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per frame N (64 = 8x8 patches of 64x64 frames)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is there")
    parser.add_argument("--point", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args)))
        return 0

    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    frames = [int(t) for t in args.frames.split(",")]
    rows = [run_point(kind, t, child_argv) for t in frames for kind in KINDS]
    device = next((r["device"] for r in rows if r.get("device")), "cpu")

    print(f"{'T':>3} {'tokens':>7} | {'ST ms':>9} {'full ms':>9} {'x':>6} | {'ST MiB':>9} {'full MiB':>9} {'x':>6}")
    for t in frames:
        st, full = (next(r for r in rows if r["kind"] == k and r["frames"] == t) for k in KINDS)

        def cell(row, key, scale=1.0):
            return f"{row[key] * scale:>9.1f}" if row["error"] is None else f"{'error':>9}"

        def ratio(key, st=st, full=full):  # this row's pair
            ok = st["error"] is None and full["error"] is None and st[key]
            return f"{full[key] / st[key]:>6.1f}" if ok else f"{'-':>6}"

        print(f"{t:>3} {t * args.tokens:>7} | {cell(st, 'seconds', 1000)} {cell(full, 'seconds', 1000)} "
              f"{ratio('seconds')} | "
              f"{cell(st, 'peak_memory_mib')} {cell(full, 'peak_memory_mib')} {ratio('peak_memory_mib')}")
    for row in rows:
        if row["error"]:
            print(f"{row['kind']} T={row['frames']}: {row['error']}")

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / ("attention-scaling" + ("-cuda" if device == "cuda" else ""))
    settings = {k: getattr(args, k) for k in ("dim", "heads", "depth", "tokens", "batch", "repeats", "precision")}
    stem.with_suffix(".json").write_text(json.dumps(
        {"settings": settings, "device": device, "environment": environment(), "rows": rows}, indent=2))
    plot(rows, stem.with_suffix(".png"), f"one training step, {args.depth} blocks of width {args.dim}, {args.tokens} "
         f"tokens per frame, batch {args.batch}, {args.precision}, {device}")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many MaskGIT steps a world needs, and in which order to unmask: quality against play speed.

    python benchmarks/sampler_front.py RUN [--steps 1,2,4,8,25] [--orders confidence,random,noisy-confidence,halton]
        [--temperature T] [--windows 128] [--history 16] [--repeats 9] [--name NAME] [--out DIR]

RUN is a finished run (its world is loaded as trained). For every sampler setting (steps x unmasking order, at the
run's own temperature or --temperature), on --windows evenly spaced windows of the run's validation split: dynamics
PSNR at t=4 with inferred actions beside the prompt frame shown again (and their paired difference), and
dtPSNR(t=4), each with its 95% interval; then frames/s of a play session holding --history frames (sampling and
decoding, as `genie play` does; the median of --repeats frames after four of warm-up, the settings taking turns frame
by frame; the JSON adds the sustained rate, those frames over the time they all took, the moving window's rebuilds
included). Each setting's difference from the best, window by window (paired: the settings share their windows),
decides the front's choice: the fewest steps whose differences in world PSNR and in dtPSNR both have a 95% interval
that reaches 0, in the order that scores best there. Windows are of 5 frames (the prompt and t = 1..4), so they are not
the report's. Point it at a run trained on tuning levels (`source.first_level` set apart), never at the evaluation
levels: this is where a recipe's sampler gets chosen. Prints a table; saves
benchmarks/results/sampler-front-NAME.{json,png} (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator

from genie_core.data.footage import EpisodeIndex
from genie_core.eval.metrics import mean_and_ci
from genie_core.run.folder import RunFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from play_speed import WARMUP_FRAMES, frame_timer  # noqa: E402
from world_curve import RESULTS, point  # noqa: E402

from stage_throughput import environment  # noqa: E402

PAIRED = ("dynamics_psnr_db", "dtpsnr_db")


def front_choice(rows: list[dict]) -> dict:
    """The fastest setting as good as the best, window by window: the fewest steps (a frame's time grows with them;
    measured frames/s differ by noise between orders) whose differences from the best setting in world PSNR and in
    dtPSNR both have a 95% interval that reaches 0; of the orders at that count, the one with the highest world PSNR,
    the first listed on a tie (with one step every order reveals all tokens at once). Needs `paired_with_best`."""
    good = [r for r in rows if all(r["minus_best"][k]["mean"] + r["minus_best"][k]["ci95"] >= 0 for k in PAIRED)]
    fewest = min(r["steps"] for r in good)
    return max((r for r in good if r["steps"] == fewest), key=lambda r: r["dynamics_psnr_db"]["mean"])


def paired_with_best(rows: list[dict]) -> None:
    """Each row's difference from the best row, window by window (the settings share their windows, so this interval
    is that of the difference itself), for world PSNR and dtPSNR; the per-window scores are dropped afterwards."""
    for key in PAIRED:
        best = torch.tensor(max(rows, key=lambda r: r[key]["mean"])["per_window"][key])
        for r in rows:
            r.setdefault("minus_best", {})[key] = mean_and_ci(torch.tensor(r["per_window"][key]) - best)
    for r in rows:
        del r["per_window"]


def plot(rows: list[dict], orders: list[str], path: Path, title: str) -> None:
    from genie_core.eval.plots import plt, save

    fig, (fidelity, control) = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, key, label in ((fidelity, "dynamics_psnr_db", "world PSNR at t=4 (dB)"),
                             (control, "dtpsnr_db", "dtPSNR at t=4 (dB)")):
        for order in orders:
            mine = [r for r in rows if r["order"] == order]
            axis.errorbar([r["frames_per_s"] for r in mine], [r[key]["mean"] for r in mine],
                          yerr=[r[key]["ci95"] for r in mine], marker="o", capsize=3, label=order)
            for r in mine:
                axis.annotate(str(r["steps"]), (r["frames_per_s"], r[key]["mean"]), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
        if key == "dynamics_psnr_db":
            still = rows[0]["copy_prompt_psnr_db"]["mean"]
            axis.axhline(still, color="grey", linestyle="--", label="the prompt frame again")
        axis.set_xlabel("frames/s (labels: MaskGIT steps)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save(fig, path, title)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", default="1,2,4,8,25", help="MaskGIT steps per frame, comma separated")
    parser.add_argument("--orders", default="confidence,random,noisy-confidence,halton",
                        help="unmasking orders, comma separated ([sampler] order)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the run's)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--history", type=int, default=16, help="frames a play session holds when its speed is taken")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--name", help="results name (default: the run folder's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    folder = RunFolder.find(args.run)
    world = folder.world()
    config = world.sampler.config
    if args.temperature is not None:
        config = attrs.evolve(config, temperature=args.temperature)
    if not {"steps", "order"} <= set(attrs.fields_dict(type(config))):
        sys.exit(f"error: {args.run}: its sampler ({type(world.sampler).__name__}) has no steps and order to vary")
    index = EpisodeIndex.open(folder.data)
    accelerator = Accelerator(cpu=True)
    settings = [(order, int(steps)) for order in args.orders.split(",") for steps in args.steps.split(",")]
    samplers = {s: type(world.sampler)(attrs.evolve(config, order=s[0], steps=s[1])) for s in settings}
    rows = []
    with torch.no_grad():
        for (order, steps), sampler in samplers.items():
            world.sampler = sampler
            rows.append({"order": order, "steps": steps,
                         **point(world, index, args.windows, accelerator)})
            print(f"scored {order} x {steps} steps", flush=True)
        # Speed: the settings take turns frame by frame, so that this machine's drifting speed treats them alike.
        device = torch.device("cpu")
        timers = {}
        for s, sampler in samplers.items():
            world.sampler = sampler
            timers[s] = frame_timer(world, args.history, args.repeats + WARMUP_FRAMES, device)
            for _ in range(WARMUP_FRAMES):
                timers[s]()
        times = {s: [] for s in samplers}
        for _ in range(args.repeats):
            for s, sampler in samplers.items():
                world.sampler = sampler
                times[s].append(sum(timers[s]()))
    for row, s in zip(rows, samplers):
        row["frames_per_s"] = 1 / statistics.median(times[s])
        row["sustained_frames_per_s"] = len(times[s]) / sum(times[s])  # the window's rebuilds included
    paired_with_best(rows)
    choice = front_choice(rows)
    print(f"{args.run}: temperature {config.temperature}, {args.windows} windows, play speed at history {args.history}")
    print(f"{'order':>17} {'steps':>5} {'world PSNR':>13} {'minus still':>13} {'dtPSNR':>13} {'frames/s':>9} "
          f"{'world minus best':>17} {'dtPSNR minus best':>18}")
    def cell(row, key):
        return f"{row[key]['mean']:6.2f} ± {row[key]['ci95']:4.2f}"
    for r in rows:
        print(f"{r['order']:>17} {r['steps']:>5} {cell(r, 'dynamics_psnr_db'):>13} "
              f"{cell(r, 'dynamics_minus_copy_prompt_db'):>13} {cell(r, 'dtpsnr_db'):>13} "
              f"{r['frames_per_s']:>9.1f} {cell(r['minus_best'], 'dynamics_psnr_db'):>17} "
              f"{cell(r['minus_best'], 'dtpsnr_db'):>18}" + ("  <- the front's choice" if r is choice else ""))
    print(f"the prompt frame again: {rows[0]['copy_prompt_psnr_db']['mean']:.2f} ± "
          f"{rows[0]['copy_prompt_psnr_db']['ci95']:.2f} dB")
    name = args.name or folder.path.name
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampler-front-{name}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"run": str(folder.path), "temperature": config.temperature, "windows": args.windows,
         "history": args.history, "repeats": args.repeats, "choice": {k: choice[k] for k in ("order", "steps")},
         "environment": environment(), "rows": rows}, indent=2))
    plot(rows, args.orders.split(","), stem.with_suffix(".png"),
         f"{name}: MaskGIT steps and unmasking order (temperature {config.temperature})")
    print(f"saved {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Comparative ablations: one base recipe, a list of variants (each a set of overrides), one flat row per variant.

    python benchmarks/ablate.py benchmarks/ablations/table3-tokenizers.toml [--out DIR] [--only A,B] [KEY=VALUE ...]

The ablation file names the base recipe, overrides shared by every variant, and the variants:

    base = "recipes/coinrun-tiny.toml"
    overrides = ["train.dynamics.steps=600"]          # optional, for every variant
    [[variant]]
    name = "vit"
    overrides = ["tokenizer.name=vit"]

Every variant is a full `genie run` (data, tokenizer, LAM + dynamics, report) in its own process, so a crash or an
out-of-memory keeps its row with the error and the next variant goes on. Variants with the same data settings read
one data set, built once, and all are scored by the same evaluation (the report stage: the same windows and seeds).
Run folders live under --runs (shared by every ablation): a variant whose tokenizer settings match a run finished
there, in this ablation or another, reuses that trained tokenizer (and its later stages if those match too), so
variants differ only in what they change; the row says what was reused.

Row: parameters of each component, peak memory of the variant's process (resident set on CPU, allocated on a GPU),
training steps/s and samples/s of both stages, tokenizer PSNR, dynamics PSNR at the recipe's t beside the
copy-prompt baseline (the prompt frame shown again) and the paired difference of the two, dtPSNR at t, and
latent-vs-true action NMI on raw actions and on the source's classes of actions that do the same thing, and each
training stage's loss at its end (the mean of its last five logged steps). Writes OUT/ablation.json, .csv, .md and
.png, and OUT/ablation-curves.png (every variant's training loss and held-out scores against the step, stage by
stage, from its run folder's logs), with the machine, library versions and git commit. Default OUT:
benchmarks/results/ablations/NAME (NAME: the ablation file's stem).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402

STAGES = ("tokenizer", "dynamics", "report")
LIBRARIES = ("torch", "timm", "vector-quantize-pytorch", "accelerate", "torchmetrics")
COLUMNS = ("variant", "status", "reused", "tokenizer_params", "action_model_params", "dynamics_params",
           "peak_memory_mib", "tokenizer_steps_per_s", "tokenizer_samples_per_s", "dynamics_steps_per_s",
           "dynamics_samples_per_s", "tokenizer_psnr_db", "dynamics_psnr_db", "copy_prompt_psnr_db",
           "dynamics_minus_copy_db", "dtpsnr_db", "actions_nmi", "action_classes_nmi", "tokenizer_end_loss",
           "dynamics_end_loss", "seconds", "error")
LOGGED = ("tokenizer", "dynamics")  # the training stages whose JSONL logs a run folder keeps under logs/
END_STEPS = 5  # a stage's loss at its end: the mean of its last this many logged steps (one step's loss is noisy)


def read_ablation(path: Path) -> dict:
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        sys.exit(f"error: {path}: {error}")
    variants = spec.get("variant", [])
    names = [v.get("name") for v in variants]
    if "base" not in spec or not variants or not all(names) or len(set(names)) != len(names):
        sys.exit(f"error: {path}: needs `base = RECIPE` and [[variant]] tables, each with a unique `name` "
                 f"(and `overrides = [...]`)")
    return spec


def reuse_finished_stages(run_dir: Path, runs_root: Path, recipe) -> dict[str, str]:
    """Copies into a new variant's run folder the stages an earlier run under `runs_root` finished with the same
    settings on the same input (a chain from the data record on: every variant reads the one data set through
    data.path); the pipeline then skips them. Returns {stage: its record id} of what was copied."""
    from genie_core.run.stages import STAGE_FILE, stage_fingerprint

    wanted = {stage: stage_fingerprint(recipe, stage) for stage in ("data", *STAGES)}
    best, source = {}, None  # the run that shares the longest chain of stages
    for other in sorted(p for p in runs_root.iterdir() if p.is_dir() and p != run_dir):
        chain, parent = {}, None
        for stage in wanted:
            record_path = other / stage / STAGE_FILE
            if not record_path.is_file():
                break
            record = json.loads(record_path.read_text())
            if record["fingerprint"] != wanted[stage] or (parent and record["input"] != parent):
                break
            chain[stage] = parent = record["id"]
        if len(chain) > len(best):
            best, source = chain, other
    if len(best) < 2:  # nothing trained to reuse, at most the same data
        return {}
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "data" / STAGE_FILE, run_dir / "data" / STAGE_FILE)  # the record; the data stays put
    for stage in list(best)[1:]:
        shutil.copytree(source / stage, run_dir / stage, dirs_exist_ok=True)
    return best


def run_variant(recipe_path: str, overrides: list[str], run_dir: Path, runs_root: Path) -> dict:
    """One variant, in this (child) process: the pipeline end to end, then its numbers."""
    import torch

    from genie_core.recipe import load_recipe
    from genie_core.run.stages import STAGE_FILE
    from genie_core.training.pipeline import Pipeline

    recipe = load_recipe(recipe_path, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    copied = reuse_finished_stages(run_dir, runs_root, recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    report = Pipeline(recipe, run_dir).run()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = {stage: json.loads((run_dir / stage / STAGE_FILE).read_text()) for stage in STAGES}
    summaries = {stage: records[stage]["summary"] for stage in ("tokenizer", "dynamics")}
    # what the pipeline really skipped: a copied stage it redid has a new id
    reused = [stage for stage in STAGES if stage in copied and records[stage]["id"] == copied[stage]]
    t = recipe.eval.dtpsnr_t
    dyn_params = summaries["dynamics"]["parameters"]
    procs = 1  # the harness runs each variant as one process

    def samples(stage):
        return summaries[stage]["steps_per_second"] * recipe.train[stage].batch_size * procs

    return {
        "reused": ",".join(reused), "tokenizer_params": summaries["tokenizer"]["parameters"],
        "action_model_params": dyn_params["action_model"], "dynamics_params": dyn_params["dynamics"],
        "peak_memory_mib": peak, "tokenizer_steps_per_s": summaries["tokenizer"]["steps_per_second"],
        "tokenizer_samples_per_s": samples("tokenizer"),
        "dynamics_steps_per_s": summaries["dynamics"]["steps_per_second"],
        "dynamics_samples_per_s": samples("dynamics"),
        "tokenizer_psnr_db": report["tokenizer_psnr_db"], "dynamics_psnr_db": report[f"dynamics_psnr_t{t}_db"],
        "copy_prompt_psnr_db": report[f"copy_prompt_psnr_t{t}_db"],
        "dynamics_minus_copy_db": report[f"dynamics_minus_copy_prompt_t{t}_db"],
        "dtpsnr_db": report[f"dtpsnr_t{t}_db"], "actions_nmi": report.get("actions_vs_true_nmi"),
        "action_classes_nmi": report.get("actions_vs_true_classes_nmi"),
    }


def training_curves(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{stage: {metric: [(step, value), ...]}} from a run folder's logs: the training loss every log_every steps and
    the held-out scores (val_*) every eval_every steps. A stage reused from another run has no log here."""
    curves = {}
    for stage in LOGGED:
        path = run_dir / "logs" / f"{stage}.jsonl"
        if not path.is_file():
            continue
        series = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key == "loss" or key.startswith("val_"):
                    series.setdefault(key, []).append((record["step"], value))
        curves[stage] = series
    return curves


def end_losses(curves: dict) -> dict[str, float | None]:
    ends = {}
    for stage in LOGGED:
        last = [value for _, value in curves.get(stage, {}).get("loss", [])[-END_STEPS:]]
        ends[f"{stage}_end_loss"] = sum(last) / len(last) if last else None
    return ends


def mean(value):
    return value["mean"] if isinstance(value, dict) else value


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):  # a mean with its 95% interval
        return f"{value['mean']:.2f} ± {value['ci95']:.2f}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_outputs(out: Path, meta: dict, rows: list[dict], t: int, runs_root: Path) -> bool:
    """The table, its plot and (when a variant trained here) the curves; returns whether the curves were drawn."""
    curves = {}
    for row in rows:
        run_dir = runs_root / f"{meta['name']}-{row['variant']}"
        if row["status"] == "ok" and run_dir.is_dir():
            curves[row["variant"]] = training_curves(run_dir)
            row |= end_losses(curves[row["variant"]])
    (out / "ablation.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: mean(row.get(k)) for k in COLUMNS} for row in rows)
    shown = [("variant", "variant"), ("status", "status"), ("tokenizer_params", "tokenizer params"),
             ("peak_memory_mib", "peak memory (MiB)"), ("tokenizer_steps_per_s", "tokenizer steps/s"),
             ("dynamics_steps_per_s", "LAM+dyn steps/s"), ("tokenizer_psnr_db", "tokenizer PSNR (dB)"),
             ("dynamics_psnr_db", f"dynamics PSNR t={t} (dB)"), ("copy_prompt_psnr_db", f"copy-prompt PSNR t={t} (dB)"),
             ("dynamics_minus_copy_db", "dynamics minus copy-prompt (dB, paired)"), ("dtpsnr_db", f"dtPSNR t={t} (dB)"),
             ("actions_nmi", "actions NMI"), ("action_classes_nmi", "action classes NMI"),
             ("tokenizer_end_loss", "tokenizer loss at the end"), ("dynamics_end_loss", "LAM+dyn loss at the end"),
             ("seconds", "seconds"), ("reused", "reused stages")]
    lines = [f"# Ablation {meta['name']}", "", f"Base recipe `{meta['base']}`, shared overrides "
             f"`{' '.join(meta['overrides']) or 'none'}`; {meta['environment']['machine']}, "
             f"{meta['environment']['gpu'] or 'CPU'}, commit {meta['environment']['git_commit']}.", "",
             "| " + " | ".join(title for _, title in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in shown) + " |" for row in rows]
    lines += ["", "Variants: " + "; ".join(f"**{r['variant']}** " + (f"`{' '.join(r['overrides'])}`" if r["overrides"]
                                                                     else "(the base recipe)") for r in rows)]
    own = [f"**{r['variant']}** `{r['data']}`" for r in rows if r.get("data", meta["footage"]) != meta["footage"]]
    lines += ["", f"Footage: `{meta['footage']}`" + (f", except {'; '.join(own)}" if own else "") + "."]
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"- {r['variant']} failed: {r['error']}" for r in failed]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "ablation.png", meta["name"], t)
    trained_here = {variant: c for variant, c in curves.items() if c}  # a variant that reused every stage has no logs
    if trained_here:
        plot_curves(trained_here, out / "ablation-curves.png", meta["name"])
    return bool(trained_here)


def plot_curves(curves: dict[str, dict], path: Path, title: str) -> None:
    """One panel per (stage, metric): every variant's training loss (log scale) or held-out score against the step."""
    from genie_core.eval.plots import plt, save

    panels = sorted({(stage, metric) for c in curves.values() for stage, series in c.items() for metric in series},
                    key=lambda p: (LOGGED.index(p[0]), p[1] != "loss", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    # one colour per variant in every panel, and one legend for all: a variant that reused a stage has no curve
    # in that stage's panels, which would otherwise shift the others' colours there and drop it from the legend
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {variant: palette[i % len(palette)] for i, variant in enumerate(curves)}
    for ax, (stage, metric) in zip(axes[0], panels):
        for variant, c in curves.items():
            if metric in c.get(stage, {}):
                steps, values = zip(*c[stage][metric])
                ax.plot(steps, values, color=colours[variant], linewidth=1,
                        marker="" if metric == "loss" else "o", markersize=3)
        if metric == "loss":
            ax.set_yscale("log")
        ax.set_title(f"{stage} {metric.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    handles = [plt.Line2D([], [], color=colour, linewidth=1.5) for colour in colours.values()]
    axes[0][0].legend(handles, list(colours), fontsize=7)
    save(fig, path, f"ablation {title}: training curves", dpi=120)


def plot(rows: list[dict], path: Path, title: str, t: int) -> None:
    from genie_core.eval.plots import plt, save

    panels = [("tokenizer_psnr_db", "tokenizer PSNR (dB)"), ("dynamics_minus_copy_db", f"dynamics - copy-prompt t={t}"),
              ("dtpsnr_db", f"dtPSNR t={t} (dB)"), ("actions_nmi", "latent vs true actions NMI"),
              ("peak_memory_mib", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    names = [r["variant"] for r in rows]
    for ax, (key, label) in zip(axes, panels):
        values = [mean(r.get(key)) if r.get(key) is not None else 0.0 for r in rows]
        errors = [r[key]["ci95"] if isinstance(r.get(key), dict) else 0.0 for r in rows]
        ax.bar(names, values, yerr=errors, capsize=3, color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
    save(fig, path, f"ablation {title}", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", type=Path)
    parser.add_argument("overrides", nargs="*", help="more overrides for every variant")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--runs", type=Path, default=RESULTS / "ablations" / "runs",
                        help="run folders of every ablation (trained stages are reused across them)")
    parser.add_argument("--only", help="comma-separated variant names to run (the others keep their earlier rows, "
                                       "if any, and are not run)")
    parser.add_argument("--variant-child", nargs=2, metavar=("NAME", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = read_ablation(args.ablation)
    shared = [*spec.get("overrides", []), *args.overrides]
    out = args.out or RESULTS / "ablations" / args.ablation.stem
    runs_root = args.runs
    names = [v["name"] for v in spec["variant"]]
    only = set(args.only.split(",")) if args.only else None
    if only is not None and (unknown := sorted(only - set(names))):
        print(f"error: --only: no variant {unknown[0]!r} in {args.ablation}; its variants: {', '.join(names)}",
              file=sys.stderr)
        return 2

    if args.variant_child:  # inside the child process of one variant: print its numbers as the last line
        name, run_dir = args.variant_child
        variant = next(v for v in spec["variant"] if v["name"] == name)
        print(json.dumps(run_variant(spec["base"], [*shared, *variant.get("overrides", [])], Path(run_dir), runs_root)))
        return 0

    from genie_core.errors import GenieError
    from genie_core.recipe import load_recipe
    from genie_core.run.stages import stage_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    runs_root.mkdir(parents=True, exist_ok=True)
    base = load_recipe(spec["base"], shared)  # a broken base or shared override stops here, before any training

    def footage(overrides: list[str]) -> Path:
        """The data set of these data settings, built once under runs_root: variants that change the footage (the
        game, the policy, the levels) get their own, the others share the base's."""
        try:
            recipe = load_recipe(spec["base"], [*shared, *overrides])
        except GenieError:  # a broken variant: its own process says what is wrong, in its row
            recipe, overrides = base, []
        data = runs_root / f"data-{stage_fingerprint(recipe, 'data')}"
        if not (data / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "genie_core.cli", "data", "build", spec["base"], *shared,
                            *overrides, "--out", str(data)], check=True)
        return data

    versions = {name: importlib.metadata.version(name) for name in LIBRARIES}
    shown = [o.replace(str(Path.cwd()) + "/", "") for o in shared]  # paths as the user typed them, not absolute
    meta = {"name": args.ablation.stem, "ablation_file": str(args.ablation), "base": spec["base"],
            "overrides": shown, "footage": str(footage([])),  # the base's; a variant that changes it has its own
            "environment": environment() | {"libraries": versions}}
    previous = {}
    if (out / "ablation.json").is_file():
        previous = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    rows = []
    for variant in spec["variant"]:
        name, overrides = variant["name"], variant.get("overrides", [])
        if only is not None and name not in only:  # not run now: its earlier row, if it has one
            if name in previous:
                rows.append(previous[name])
            continue
        print(f"== variant {name}: {' '.join(overrides) or '(the base recipe)'}", flush=True)
        run_dir = runs_root / f"{args.ablation.stem}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        data = footage(overrides)
        cmd = [sys.executable, __file__, str(args.ablation), *args.overrides, f"data.path={data}", "--out", str(out),
               "--runs", str(runs_root), "--variant-child", name, str(run_dir)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        row = {"variant": name, "overrides": overrides, "data": str(data), "seconds": time.perf_counter() - start}
        if done.returncode == 0:
            row |= {"status": "ok", "error": None, **json.loads(done.stdout.strip().splitlines()[-1])}
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            row |= {"status": "failed", "error": lines[-1] if lines else f"exit status {done.returncode}"}
        error = f": {row['error']}" if row["error"] else ""
        print(f"   {row['status']} in {row['seconds']:.0f} s{error}", flush=True)
        rows.append(row)
        # after every variant: a stopped ablation keeps its rows
        write_outputs(out, meta, rows, base.eval.dtpsnr_t, runs_root)

    drew_curves = write_outputs(out, meta, rows, base.eval.dtpsnr_t, runs_root)  # every row, kept ones (--only) too
    print((out / "ablation.md").read_text())
    curves = " and ablation-curves.png" if drew_curves else ""
    print(f"saved {out}/ablation.{{json,csv,md,png}}{curves}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

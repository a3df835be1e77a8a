"""The README's tables of what a recipe measured, written from the run's own report so they cannot go stale.

    python benchmarks/readme_numbers.py RUN [RUN ...] [--update README.md]

For each finished run folder: a Markdown table of its held-out numbers (tokenizer, world, both do-nothing baselines
and the world's paired difference to the prompt frame, dtPSNR, latent vs true action NMI), the wall time of each
stage, and the machine and versions that measured them (from report.json and the stage records). Printed; with
--update, each table replaces the block between `<!-- numbers: NAME -->` and `<!-- /numbers -->` in the file, where
NAME is the run's name in its recipe (`run.name`): the README says which run made each table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from genie_core.eval.report import cell as number
from genie_core.io.machine import summary as machine_summary
from genie_core.run.folder import RunFolder

STAGE_NAMES = {"data": "data", "tokenizer": "tokenizer", "dynamics": "LAM + dynamics", "report": "report"}


def cell(stat: dict, digits: int = 2, unit: str = " dB") -> str:
    return number(stat, digits) + unit


def where_inexact(report: dict, t: int) -> str:
    """The world minus the still frame over the windows where the still frame is not exact (reports from before
    they kept it: nothing)."""
    exact = report.get(f"copy_prompt_exact_t{t}")
    if exact is None:
        return ""
    stat = report[f"dynamics_minus_copy_prompt_inexact_t{t}_db"]
    return f"; in the {stat['n']} windows where it is not exact (it is in {exact}): {cell(stat)}"


def numbers_table(run: Path) -> tuple[str, str]:
    """(the run's name, its table) from RUN/report.json and RUN/*/stage.json."""
    report = json.loads((run / "report.json").read_text())
    t = next(int(k[len("dtpsnr_t"):-len("_db")]) for k in report if re.fullmatch(r"dtpsnr_t\d+_db", k))
    world, copy = report[f"dynamics_psnr_t{t}_db"], report[f"copy_prompt_psnr_t{t}_db"]
    nmi, classes = report.get("actions_vs_true_nmi"), report.get("actions_vs_true_classes_nmi")
    actions = "n/a (the footage has no true actions)" if nmi is None else f"NMI {nmi:.3f}" + (
        f" ({classes:.3f} on classes of actions that do the same thing)" if classes is not None else "")
    seconds = {}
    for stage, label in STAGE_NAMES.items():
        stage_seconds = (RunFolder(run).stage_record(stage) or {}).get("seconds")
        if stage_seconds is not None:
            seconds[label] = stage_seconds
    times = ", ".join(f"{label} {value:.0f} s" for label, value in seconds.items())
    total = f" ({sum(seconds.values()) / 60:.1f} minutes in all)" if len(seconds) == len(STAGE_NAMES) else ""
    rows = [
        ("held-out tokenizer PSNR / SSIM", f"{cell(report['tokenizer_psnr_db'])} / "
         f"{cell(report['tokenizer_ssim'], 3, '')} ({report['tokenizer_psnr_db']['n']:,} frames)"),
        (f"dynamics PSNR at t={t}, inferred actions", f"{cell(world)} ({world['n']} windows)"),
        (f"baseline: the prompt frame shown again, at t={t}",
         f"{cell(copy)}; the world minus it, window by window: "
         f"**{cell(report[f'dynamics_minus_copy_prompt_t{t}_db'])}**" + where_inexact(report, t)),
        (f"baseline: the prompt's tokens shown again, at t={t}", cell(report[f"copy_prompt_tokens_psnr_t{t}_db"])),
        (f"controllability dtPSNR at t={t}", f"**{cell(report[f'dtpsnr_t{t}_db'])}** "
         f"({report[f'dtpsnr_t{t}_db']['n']} windows)"),
        ("latent vs true actions", actions),
        ("time per stage", (times + total) if times else "not recorded"),
        ("measured on", machine_summary(report.get("machine"))),
    ]
    lines = ["| | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return report["run"], "\n".join(lines)


def update(path: Path, tables: dict[str, str]) -> None:
    text = path.read_text()
    for name, table in tables.items():
        block = re.compile(rf"(<!-- numbers: {re.escape(name)} -->\n).*?(\n<!-- /numbers -->)", re.S)
        if not block.search(text):
            sys.exit(f"error: {path}: no block `<!-- numbers: {name} -->` ... `<!-- /numbers -->` for run {name}")
        text = block.sub(lambda m, table=table: m.group(1) + table + m.group(2), text)
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--update", type=Path, metavar="FILE", help="replace the runs' blocks in FILE")
    args = parser.parse_args(argv)
    tables = {}
    for run in args.runs:
        if not (run / "report.json").is_file():
            sys.exit(f"error: {run}: no report.json; give a finished run folder")
        name, table = numbers_table(run)
        tables[name] = table
        print(f"{name}:\n{table}\n")
    if args.update:
        update(args.update, tables)
        print(f"updated {args.update}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

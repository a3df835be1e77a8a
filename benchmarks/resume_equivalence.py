"""Kill a training run with SIGKILL mid-stage, resume it, and compare its losses with a run never interrupted.

    python benchmarks/resume_equivalence.py recipes/coinrun-smoke.toml [KEY=VALUE ...] [--kill-after 13]

Runs the recipe into a scratch folder three times: straight through, straight through again (the control: what two
uninterrupted runs differ by), and killed (SIGKILL) after --kill-after logged rows of the dynamics stage, then
resumed with `genie run --resume`. Every logged row (losses, codebook metrics, validation scores) is compared step by
step. On a CPU with a fixed seed all three are bitwise equal (the test suite asserts it for the resumed run); on a
GPU, kernels that add in a varying order make even two uninterrupted runs drift apart, and the control says by how
much, so the resumed run can be judged against it. Saves JSON to benchmarks/results/resume-equivalence-DEVICE.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_throughput import RESULTS, environment  # noqa: E402


def rows(run: Path) -> list[dict]:
    log = run / "logs" / "dynamics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def differences(a_rows: list[dict], b_rows: list[dict]) -> list[dict]:
    """Every logged number that differs between two runs' rows, step by step, in log order."""
    return [{"step": a.get("step"), "key": k, "a": a[k], "b": b[k], "abs": abs(a[k] - b[k])}
            for a, b in zip(a_rows, b_rows) for k in a
            if isinstance(a[k], float) and isinstance(b.get(k), float) and math.isfinite(a[k]) and a[k] != b[k]]


def compare(a_rows: list[dict], b_rows: list[dict]) -> dict:
    """Bitwise equality, the first difference (where a drift starts) and the largest one."""
    found = differences(a_rows, b_rows)
    return {"bitwise_equal": a_rows == b_rows, "first_difference": found[0] if found else None,
            "largest_difference": max(found, key=lambda d: d["abs"]) if found else None}


def genie_run(recipe: str, overrides: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "genie_core.cli", "run", recipe, *overrides, "--out", str(out), *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--kill-after", type=int, default=13, help="logged dynamics rows before the SIGKILL")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="resume-equivalence-"))
    try:
        reference, control, killed = scratch / "reference", scratch / "control", scratch / "killed"
        for run in (reference, control):
            subprocess.run(genie_run(args.recipe, args.overrides, run), check=True, stdout=subprocess.DEVNULL)

        process = subprocess.Popen(genie_run(args.recipe, args.overrides, killed), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while process.poll() is None and sum("loss" in row for row in rows(killed)) < args.kill_after:
            time.sleep(0.01)
        if process.poll() is not None:
            sys.exit(f"the run ended before {args.kill_after} rows were logged; raise the recipe's steps")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = len(rows(killed))
        resumed = subprocess.run(genie_run(args.recipe, args.overrides, killed, "--resume"), check=True,
                                 capture_output=True, text=True).stdout
        resumed_at = int(resumed.split("resuming at step ")[1].split()[0])

        ref, got = rows(reference), rows(killed)
        result = {
            "recipe": args.recipe, "overrides": args.overrides,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "killed_after_rows": killed_at, "resumed_at_step": resumed_at, "rows_reference": len(ref),
            "rows_resumed": len(got), "steps_match": [r.get("step") for r in ref] == [r.get("step") for r in got],
            "resumed": compare(ref, got), "control": compare(ref, rows(control)),
            "rows": {"reference": ref, "control": rows(control), "resumed": got},
            "environment": environment(),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("environment", "rows")}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    deterministic = any(o.replace(" ", "") == "run.deterministic=true" for o in args.overrides)
    out = RESULTS / f"resume-equivalence{'-deterministic' if deterministic else ''}-{result['device']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return 0 if result["steps_match"] else 1


if __name__ == "__main__":
    sys.exit(main())

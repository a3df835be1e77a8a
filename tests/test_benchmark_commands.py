"""benchmarks/check_commands.py: every command of the GPU script checked against the code as it is, without a GPU, and a
broken command named with what is wrong with it."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

CHECK = REPO / "benchmarks" / "check_commands.py"


def check(script, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def snapshot(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


def test_every_command_of_the_gpu_script_parses_and_its_recipe_loads():
    logs = REPO / "benchmarks" / "results" / "cuda-logs"  # where the script writes by default
    before = snapshot(logs)
    result = check(REPO / "benchmarks" / "cuda_checks.sh")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    commands = [line for line in lines if line.startswith(("ok: ", "FAILED: "))]
    # Every step of the script reached the stand-in python: one line each, and the tally says so.
    steps = re.findall(r"^\s*step ", (REPO / "benchmarks" / "cuda_checks.sh").read_text(), flags=re.M)
    assert len(commands) >= len(steps) + 1 >= 16  # the steps (some in loops) and the version line before them
    assert lines[-1] == f"{len(commands)} of {len(commands)} commands check out"
    assert any("play_speed.py recipes/coinrun-paper.toml" in line for line in commands)
    assert any("-m torch.distributed.run" in line and "genie_core.cli run" in line for line in commands)
    assert snapshot(logs) == before  # what the script writes itself went to a scratch folder


def test_a_broken_command_is_named_with_its_problem(tmp_path):
    script = tmp_path / "lease.sh"
    script.write_text("""PY=${PYTHON:-python3}
$PY benchmarks/play_speed.py recipes/coinrun-tiny.toml tokenizer.dimm=3 --history 16
$PY benchmarks/play_speed.py recipes/coinrun-tiny.toml --historyy 16
$PY -m genie_core.cli run recipes/coinrun-tiny.toml sampler.order=sideways --out "$1"
$PY benchmarks/no_such_benchmark.py
$PY -m torch.distributed.run --nproc_per_node 2 benchmarks/stage_throughput.py recipes/coinrun-smoke.toml --steps 3
$PY -c "import torch"
$PY -m genie_core.cli data build recipes/coinrun-smoke.toml --out "$1/data"
$PY -m genie_core.cli play "$1/no-run-yet" --port 0
""")
    result = check(script, str(tmp_path / "out"))
    assert result.returncode == 2
    out = result.stdout
    assert "FAILED: benchmarks/play_speed.py recipes/coinrun-tiny.toml tokenizer.dimm=3" in out
    assert "unknown key 'dimm'; valid keys: patch_size, dim," in out
    assert "unrecognized arguments: --historyy 16" in out
    assert "'order' must be in ('confidence', 'random', 'noisy-confidence', 'halton') (got 'sideways')" in out
    assert "no script benchmarks/no_such_benchmark.py" in out
    assert "ok: -m torch.distributed.run --nproc_per_node 2 benchmarks/stage_throughput.py" in out
    assert "ok: -c import torch" in out
    assert "ok: -m genie_core.cli data build recipes/coinrun-smoke.toml" in out
    assert "ok: -m genie_core.cli play" in out
    assert out.splitlines()[-1] == "4 of 8 commands check out; 4 would fail"
    assert not (tmp_path / "out").exists()  # checked, never run: no data built, no world played

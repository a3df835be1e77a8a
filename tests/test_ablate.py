"""The ablation harness (benchmarks/ablate.py): one row per variant from full runs, trained stages reused across
variants that share them, a failed variant kept with its error, and every output file written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from conftest import REPO

ABLATE = REPO / "benchmarks" / "ablate.py"


def test_rows_reuse_and_failures(tmp_path):
    ablation = tmp_path / "mini.toml"
    ablation.write_text(f'''
base = "{REPO / "recipes" / "coinrun-smoke.toml"}"
overrides = ["run.trackers=none", "eval.windows=4"]
[[variant]]
name = "base"
[[variant]]
name = "token-lam"
overrides = ["action_model.name=token-lam"]
[[variant]]
name = "broken"
overrides = ["dynamics.depth=0"]
[[variant]]
name = "cooler-token-lam"
overrides = ["action_model.name=token-lam", "sampler.temperature=0.5"]
''')
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--out", str(out), "--runs", str(runs)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]  # one variant failed
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert list(rows) == ["base", "token-lam", "broken", "cooler-token-lam"]
    base, token, broken = rows["base"], rows["token-lam"], rows["broken"]
    assert base["status"] == token["status"] == "ok" and broken["status"] == "failed"
    assert "dynamics" in broken["error"] and "depth" in broken["error"]  # the recipe's own one-line complaint
    assert base["reused"] == "" and token["reused"] == "tokenizer"  # same tokenizer settings: trained once
    # only the sampler differs from token-lam: both trained stages come from that run (not from base, which shares
    # only the tokenizer and comes first)
    assert rows["cooler-token-lam"]["reused"] == "tokenizer,dynamics"
    tokenizer_id = [json.loads((runs / f"mini-{v}" / "tokenizer" / "stage.json").read_text())["id"]
                    for v in ("base", "token-lam")]
    assert tokenizer_id[0] == tokenizer_id[1] and token["tokenizer_psnr_db"] == base["tokenizer_psnr_db"]
    built = [p.parent.name for p in runs.rglob("manifest.json")]
    assert len(built) == 1 and built[0].startswith("data-")  # the footage was built once, beside the runs, and shared
    for row in (base, token):
        assert row["tokenizer_params"] > 0 and row["dynamics_params"] > 0 and row["peak_memory_mib"] > 0
        assert row["tokenizer_steps_per_s"] > 0 and row["dynamics_samples_per_s"] > 0
        assert set(row["dtpsnr_db"]) >= {"mean", "ci95", "n"} and 0 <= row["actions_nmi"] <= 1
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["environment"]["git_commit"] and "vector-quantize-pytorch" in meta["environment"]["libraries"]
    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["base", "token-lam", "broken", "cooler-token-lam"] and table[2]["error"]
    assert "| base | ok |" in (out / "ablation.md").read_text() and (out / "ablation.png").stat().st_size > 0

    # --only reruns just that variant (the others keep their rows); it reuses the tokenizer the token-lam run kept,
    # and the same seeds give the same scores
    again = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--out", str(out), "--runs", str(runs),
                            "--only", "base"], capture_output=True, text=True, cwd=tmp_path)
    rerun = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert again.returncode == 1 and list(rerun) == ["base", "token-lam", "broken", "cooler-token-lam"]
    assert rerun["base"]["reused"] == "tokenizer" and rerun["base"]["dtpsnr_db"] == base["dtpsnr_db"]
    assert rerun["token-lam"] == token


def test_world_curve_scores_the_world_during_training(played_run, tmp_path):
    """benchmarks/world_curve.py: LAM + dynamics trained again on a finished run's tokenizer, scored every N steps
    on the same held-out windows beside the baselines; the run itself is left as it was."""
    before = sorted((p.relative_to(played_run), p.stat().st_mtime_ns) for p in played_run.rglob("*") if p.is_file())
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "world_curve.py"), str(played_run),
                           "train.dynamics.steps=4", "--every", "2", "--windows", "4", "--name", "t", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "world-curve-t.json").read_text())
    points = result["points"]
    assert [p["step"] for p in points] == [2, 4] and result["windows"] == 4
    for p in points:
        assert p["dtpsnr_db"]["n"] == 4 and {"mean", "ci95"} <= set(p["dynamics_psnr_db"])
        world, copy = p["dynamics_psnr_db"]["mean"], p["copy_prompt_psnr_db"]["mean"]
        assert abs(p["dynamics_minus_copy_prompt_db"]["mean"] - (world - copy)) < 1e-6  # paired, same windows
        assert 0 <= p["actions_nmi"] <= 1
    assert points[0]["copy_prompt_psnr_db"] == points[1]["copy_prompt_psnr_db"]  # the baseline does not train
    assert (tmp_path / "world-curve-t.png").stat().st_size > 0
    after = sorted((p.relative_to(played_run), p.stat().st_mtime_ns) for p in played_run.rglob("*") if p.is_file())
    assert after == before

"""The ablation harness (benchmarks/ablate.py): one row per variant from full runs, trained stages reused across
variants that share them, a failed variant kept with its error, and every output file written."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genie_core.io.machine import bf16_units

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
[[variant]]
name = "bigfish"
overrides = ["source.game=bigfish"]
''')
    out, runs = tmp_path / "out", tmp_path / "runs"
    done = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--out", str(out), "--runs", str(runs)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]  # one variant failed
    rows = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert list(rows) == ["base", "token-lam", "broken", "cooler-token-lam", "bigfish"]
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
    built = sorted(p.parent for p in runs.glob("data-*/manifest.json"))
    assert len(built) == 2  # the footage was built once per game, beside the runs, and shared by the coinrun variants
    games = {json.loads((p / "manifest.json").read_text())["source"]["config"]["game"]: p for p in built}
    assert set(games) == {"coinrun", "bigfish"}
    assert rows["bigfish"]["status"] == "ok" and rows["bigfish"]["reused"] == ""
    for variant, game in (("base", "coinrun"), ("bigfish", "bigfish")):  # each trained on its own game's footage
        recipe = json.loads((runs / f"mini-{variant}" / "recipe.json").read_text())
        assert Path(recipe["data"]["path"]) == games[game] and recipe["source"]["game"] == game
    for row in (base, token):
        assert row["tokenizer_params"] > 0 and row["dynamics_params"] > 0 and row["peak_memory_mib"] > 0
        assert row["tokenizer_steps_per_s"] > 0 and row["dynamics_samples_per_s"] > 0
        assert set(row["dtpsnr_db"]) >= {"mean", "ci95", "n"} and 0 <= row["actions_nmi"] <= 1
        assert row["dynamics_end_loss"] > 0
    # the end of the tokenizer's training, from the log of the run that trained it; a reused stage has none here
    logged = [json.loads(line) for line in (runs / "mini-base" / "logs" / "tokenizer.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in logged if "loss" in line]
    assert base["tokenizer_end_loss"] == pytest.approx(np.mean(losses[-5:])) and token["tokenizer_end_loss"] is None
    assert (out / "ablation-curves.png").stat().st_size > 0
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["environment"]["git_commit"] and "vector-quantize-pytorch" in meta["environment"]["libraries"]
    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["base", "token-lam", "broken", "cooler-token-lam", "bigfish"]
    assert table[2]["error"]
    assert "| base | ok |" in (out / "ablation.md").read_text() and (out / "ablation.png").stat().st_size > 0
    # the header names the base's footage, and the variants with footage of their own, not as a shared override
    assert not any(o.startswith("data.path=") for o in meta["overrides"]) and meta["footage"] == str(games["coinrun"])
    footage = f"Footage: `{games['coinrun']}`, except **bigfish** `{games['bigfish']}`."
    assert footage in (out / "ablation.md").read_text()

    # --only reruns just that variant (the others keep their rows); it reuses the tokenizer the token-lam run kept,
    # and the same seeds give the same scores
    again = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--out", str(out), "--runs", str(runs),
                            "--only", "base"], capture_output=True, text=True, cwd=tmp_path)
    rerun = {r["variant"]: r for r in json.loads((out / "ablation.json").read_text())["rows"]}
    assert again.returncode == 1 and list(rerun) == ["base", "token-lam", "broken", "cooler-token-lam", "bigfish"]
    assert rerun["base"]["reused"] == "tokenizer" and rerun["base"]["dtpsnr_db"] == base["dtpsnr_db"]
    assert rerun["token-lam"] == token
    # into a new folder, --only runs just the variants named (the others have no earlier rows to keep); a name the
    # file does not have is refused in one line that lists the ones it has
    alone = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--out", str(tmp_path / "alone"), "--runs",
                            str(runs), "--only", "cooler-token-lam"], capture_output=True, text=True, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert [r["variant"] for r in json.loads((tmp_path / "alone" / "ablation.json").read_text())["rows"]] == [
        "cooler-token-lam"]
    assert not (tmp_path / "alone" / "ablation-curves.png").exists()  # it trained nothing: no curves to draw
    unknown = subprocess.run([sys.executable, str(ABLATE), str(ablation), "--only", "base,nope"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "--only: no variant 'nope'" in unknown.stderr and "base, token-lam, broken" in unknown.stderr


def test_training_curves_give_every_variant_one_colour_and_a_place_in_the_legend(tmp_path, monkeypatch):
    """ablate.plot_curves: a variant that reused its tokenizer has no tokenizer curve; it keeps its colour in the
    other panels and its name in the legend, which lists every variant once."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ablate

    from genie_core.eval import plots

    drawn = {}
    monkeypatch.setattr(plots, "save", lambda fig, path, title, dpi=None: drawn.setdefault("fig", fig))
    loss = {"loss": [(0, 1.0), (10, 0.5)]}
    curves = {"a": {"tokenizer": loss, "dynamics": loss}, "b": {"dynamics": loss}, "c": {"tokenizer": loss,
                                                                                         "dynamics": loss}}
    ablate.plot_curves(curves, tmp_path / "curves.png", "t")
    tokenizer_ax, dynamics_ax = drawn["fig"].axes
    legend = tokenizer_ax.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["a", "b", "c"]
    colours = [handle.get_color() for handle in legend.legend_handles]
    assert len(set(colours)) == 3
    assert [line.get_color() for line in dynamics_ax.get_lines()] == colours  # a, b, c
    assert [line.get_color() for line in tokenizer_ax.get_lines()] == [colours[0], colours[2]]  # b reused it


def test_world_curve_scores_the_world_during_training(played_run, tmp_path):
    """benchmarks/world_curve.py: LAM + dynamics trained again on a finished run's tokenizer, scored every N steps
    on the same held-out windows beside the baselines, in the precision the recipe trains in; the run itself is left
    as it was."""
    from genie_core.io.machine import resolve_mixed_precision

    before = sorted((p.relative_to(played_run), p.stat().st_mtime_ns) for p in played_run.rglob("*") if p.is_file())
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "world_curve.py"), str(played_run),
                           "train.dynamics.steps=4", "run.mixed_precision=auto", "--every", "2", "--windows", "4",
                           "--name", "t", "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "world-curve-t.json").read_text())
    assert result["precision"] == resolve_mixed_precision("auto", cpu=True)[0]  # bf16 where the CPU has bf16 units
    points = result["points"]
    assert [p["step"] for p in points] == [2, 4] and result["windows"] == 4
    for p in points:
        assert p["dtpsnr_db"]["n"] == 4 and {"mean", "ci95"} <= set(p["dynamics_psnr_db"])
        world, copy = p["dynamics_psnr_db"]["mean"], p["copy_prompt_psnr_db"]["mean"]
        assert abs(p["dynamics_minus_copy_prompt_db"]["mean"] - (world - copy)) < 1e-6  # paired, same windows
        assert 0 <= p["actions_nmi"] <= 1
    assert points[0]["copy_prompt_psnr_db"] == points[1]["copy_prompt_psnr_db"]  # the baseline does not train
    for p in points:  # every window's scores, kept for comparisons window by window
        assert {k: len(v) for k, v in p["per_window"].items()} == {
            "dynamics_psnr_db": 4, "dtpsnr_db": 4, "copy_prompt_psnr_db": 4}
        assert abs(sum(p["per_window"]["dtpsnr_db"]) / 4 - p["dtpsnr_db"]["mean"]) < 1e-5
    assert (tmp_path / "world-curve-t.png").stat().st_size > 0
    # with an average of the weights: the average scored, the weights as trained (those of the run above), and the
    # difference window by window; and, --against the run above, the same difference from two curves
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "world_curve.py"), str(played_run),
                           "train.dynamics.steps=4", "run.mixed_precision=auto", "train.dynamics.ema_decay=0.5",
                           "--every", "2", "--windows", "4", "--name", "ema", "--out", str(tmp_path),
                           "--against", str(tmp_path / "world-curve-t.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    averaged = json.loads((tmp_path / "world-curve-ema.json").read_text())["points"]
    for plain, p in zip(points, averaged, strict=True):
        assert p["live"] == {k: plain[k] for k in p["live"]}
        for key in ("dynamics_psnr_db", "dtpsnr_db"):
            difference = p["average_minus_live"][key]
            assert difference["n"] == 4 and abs(difference["mean"] - (p[key]["mean"] - plain[key]["mean"])) < 1e-5
            assert p["minus_against"][key] == pytest.approx(difference)
        assert "per_window" not in p["live"]
    # --against refuses, before it trains, a curve it cannot be compared with
    for windows, every, message in (("3", "2", "scored on 4 windows, this curve on 3; give --windows 4"),
                                    ("4", "3", "scored at steps [2, 4], this curve at [3]: none in common")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "world_curve.py"), str(played_run),
                               "train.dynamics.steps=3", "--every", every, "--windows", windows, "--out",
                               str(tmp_path), "--against", str(tmp_path / "world-curve-t.json")],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    after = sorted((p.relative_to(played_run), p.stat().st_mtime_ns) for p in played_run.rglob("*") if p.is_file())
    assert after == before


def test_sampler_front_scores_every_setting_and_picks_the_fastest_good_one(played_run, tmp_path):
    """benchmarks/sampler_front.py: every (order, steps) setting of the run's world scored on the same held-out
    windows beside the still frame, with its play speed; the choice is inside the best intervals."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sampler_front.py"), str(played_run),
                           "--steps", "1,2", "--orders", "confidence,random", "--temperature", "0", "--windows", "4",
                           "--history", "3", "--repeats", "1", "--name", "t", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "sampler-front-t.json").read_text())
    rows = result["rows"]
    assert [(r["order"], r["steps"]) for r in rows] == [("confidence", 1), ("confidence", 2), ("random", 1),
                                                          ("random", 2)]
    assert len({json.dumps(r["copy_prompt_psnr_db"]) for r in rows}) == 1  # the same windows for every setting
    assert all(r["frames_per_s"] > 0 and r["sustained_frames_per_s"] > 0 and r["dtpsnr_db"]["n"] == 4 for r in rows)
    # One greedy step reveals every token at once: the order cannot matter there.
    assert rows[0]["dynamics_psnr_db"] == rows[2]["dynamics_psnr_db"]
    for key in ("dynamics_psnr_db", "dtpsnr_db"):  # window by window against the best setting
        best = max(rows, key=lambda r: r[key]["mean"])
        assert best["minus_best"][key]["mean"] == 0 and best["minus_best"][key]["ci95"] == 0
        for r in rows:
            assert abs(r["minus_best"][key]["mean"] - (r[key]["mean"] - best[key]["mean"])) < 1e-4
    assert not any("per_window" in r for r in rows)
    chosen = next(r for r in rows if (r["order"], r["steps"]) == (result["choice"]["order"], result["choice"]["steps"]))
    for key in ("dynamics_psnr_db", "dtpsnr_db"):  # as good as the best, window by window
        assert chosen["minus_best"][key]["mean"] + chosen["minus_best"][key]["ci95"] >= 0
    assert "<- the front's choice" in done.stdout
    assert (tmp_path / "sampler-front-t.png").stat().st_size > 0


def test_lam_alone_scores_the_codes_against_the_actions_and_their_place(played_run, tmp_path):
    """benchmarks/lam_alone.py: the recipe's action model trained alone on a run's footage, its codes scored every N
    steps against the true actions and against their place in the window, its error beside "nothing moves"."""
    from genie_core.run.folder import RunFolder

    data = RunFolder.find(played_run).data
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lam_alone.py"), str(data),
                           "action_model.commitment_weight=0.5", "--recipe",
                           str(REPO / "recipes" / "coinrun-smoke.toml"), "--steps", "4", "--every", "2",
                           "--windows", "2", "--name", "t", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "lam-alone-t.json").read_text())
    assert result["overrides"] == ["action_model.commitment_weight=0.5"]
    assert [p["step"] for p in result["points"]] == [2, 4]
    for p in result["points"]:
        scores = [p["vs_true"], p["vs_place_in_window"], p["vs_classes"], *p["vs_scene_shift"].values()]
        for agreement in scores:
            assert 0 <= agreement["nmi"] <= 1 and 0 <= agreement["mapping_accuracy"] <= 1
        assert set(p["vs_scene_shift"]) == {"vertical", "horizontal", "both"}
        table = p["vs_classes"]["table"]  # codes x the footage's action classes, every scored transition once
        assert len(table) == 4 and len(table[0]) == len(p["vs_classes"]["classes"])
        assert 1 <= p["codes_used"] <= 4  # the smoke recipe's |A|
        assert p["nothing_moves_mse"] > 0 and p["reconstruction_mse"] > 0
    assert set(result["true_actions_vs_scene_shift"]) == {"vertical", "horizontal", "both"}
    assert "with the place in the window" in done.stdout

    # The same decoder with the true actions as its codes: only its reconstruction error is scored.
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lam_alone.py"), str(data), "--codes",
                           "true-actions", "--recipe", str(REPO / "recipes" / "coinrun-smoke.toml"), "--steps", "2",
                           "--every", "2", "--windows", "2", "--name", "true", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "lam-alone-true.json").read_text())
    assert result["codes"] == "true-actions"
    assert set(result["points"][0]) == {"step", "reconstruction_mse", "nothing_moves_mse"}


def test_scene_shift_finds_the_shift_that_carries_one_frame_onto_the_next():
    """lam_alone.scene_shift: a textured frame moved by whole pixels is found with the sign convention its doc gives
    (frame t + 1 at (y, x) is frame t at (y + dy, x + dx)); a still frame gives (0, 0)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from lam_alone import scene_shift, shift_kinds

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    frames = np.stack([big[10:26, 10:26], big[12:28, 9:25], big[12:28, 9:25]])  # then (+2, -1), then still
    shift = scene_shift(frames, largest=3)
    assert shift.tolist() == [[2, -1], [0, 0]]
    kinds = shift_kinds(shift)
    assert kinds["vertical"].tolist() == [2, 1] and kinds["horizontal"].tolist() == [0, 1]


def test_decode_frames_measures_each_count_against_the_whole_window(played_run, tmp_path):
    """benchmarks/decode_frames.py: the last frame decoded from k frames against the whole window's decoding and
    against the truth, window by window, with the time of one decode; the whole window is always a row."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_frames.py"), str(played_run),
                           "--frames", "1,2", "--windows", "4", "--repeats", "2", "--name", "t", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "decode-frames-t.json").read_text())
    rows = {r["frames"]: r for r in result["rows"]}
    assert set(rows) == {1, 2, result["window"]} and result["windows"] == 4
    whole = rows[result["window"]]
    assert whole["vs_whole_window_db"]["mean"] == 100.0 and whole["vs_truth_minus_whole_window_db"]["mean"] == 0
    for r in rows.values():
        assert r["decode_ms"] > 0 and r["vs_truth_db"]["n"] == 4
        assert abs(r["vs_truth_minus_whole_window_db"]["mean"]
                   - (r["vs_truth_db"]["mean"] - whole["vs_truth_db"]["mean"])) < 1e-4


class StepSource:
    """Footage of a bright square that each action moves one way (0 still, 1 left, 2 right, 3 down): with
    `shown=False` the square moves at random whatever the action says."""

    def __init__(self, shown: bool):
        self.shown = shown

    def episodes(self, seed: int):
        import numpy as np

        from genie_core.interfaces import Episode

        rng = np.random.default_rng(seed)
        actions = rng.integers(0, 4, 30)
        moves = actions if self.shown else rng.integers(0, 4, 30)
        y, x, frames = 6, 6, []
        for move in moves:
            frame = np.zeros((16, 16, 3), dtype=np.uint8)
            frame[y:y + 4, x:x + 4] = 255
            frames.append(frame)
            x = min(12, max(0, x + {1: -1, 2: 1}.get(int(move), 0)))
            y = (y + (int(move) == 3)) % 12
        yield Episode(frames=np.stack(frames), actions=actions.astype(np.int16))


def test_action_signal_tells_footage_that_shows_its_actions_from_footage_that_does_not(tmp_path):
    """benchmarks/action_signal.py: a probe trained with the labels finds the actions where the frames show them,
    and nothing where they do not."""
    import attrs

    from genie_core.config import DataConfig
    from genie_core.data.footage import build_dataset, source_identity
    from genie_core.interfaces import DataSpec, VideoSource
    from genie_core.registry import Owner

    @attrs.define(frozen=True)
    class Shown:
        shown: bool = True

    class Squares(VideoSource):
        config_class = Shown

        def units(self):
            return {"train": [str(i) for i in range(12)], "val": [str(i) for i in range(12, 16)]}

        def record(self, unit):
            return StepSource(self.config.shown).episodes(int(unit))

        def action_names(self):
            return ["STILL", "LEFT", "RIGHT", "DOWN"]

    paths = []
    for shown in (True, False):
        source = Squares(Shown(shown), DataSpec(resolution=16))
        path = tmp_path / f"shown-{shown}"
        build_dataset(source, source_identity(source, "squares", Owner("squares", "tests", "0")),
                      DataConfig(resolution=16, min_episode_frames=4), path, log=lambda *_: None)
        paths.append(str(path))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "action_signal.py"), *paths, "--steps", "300",
                           "--name", "t", "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shown, hidden = json.loads((tmp_path / "action-signal-t.json").read_text())["rows"]
    assert shown["accuracy"] > 0.8 and shown["nmi"] > 0.5, shown
    assert hidden["nmi"] < 0.1 and hidden["accuracy"] < 0.5, hidden
    assert shown["classes_nmi"] is None  # the source declares no classes


def test_stage_throughput_measures_both_stages_in_one_and_in_two_processes(tmp_path):
    """benchmarks/stage_throughput.py on the smoke recipe: a row per training stage and one for play, with the
    machine that measured them, in one process and under torchrun with two, where the main process times play alone
    after the others are done. (Not --compile: a cold compile of even these models takes over a minute.)"""
    script = [str(REPO / "benchmarks" / "stage_throughput.py"), str(REPO / "recipes" / "coinrun-smoke.toml"),
              "--steps", "1", "--warmup", "1", "--frames", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"1proc": [sys.executable, *script],
            "2proc": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]}
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        result = json.loads((tmp_path / f"throughput-coinrun-smoke-fp32-{name}.json").read_text())
        stages = [row["stage"] for row in result["rows"]]
        assert stages[:2] == ["tokenizer", "lam+dynamics"] and stages[2].startswith("play"), stages
        assert all(row["steps_per_s"] > 0 for row in result["rows"])
        assert result["processes"] == int(name[0]) and not result["compiled"]
        assert result["environment"]["cpu_capability"]
        assert all(row["gflop_per_step"] > 0 and row["warmup_seconds"] > 0 for row in result["rows"][:2])


def test_readme_numbers_come_from_the_run(played_run, tmp_path):
    """benchmarks/readme_numbers.py writes a run's table into its block of a Markdown file, from the run's report:
    the held-out numbers with their intervals, the time of every stage and the machine that measured them."""
    report = json.loads((played_run / "report.json").read_text())
    name = report["run"]
    page = tmp_path / "README.md"
    page.write_text(f"before\n<!-- numbers: {name} -->\nold table\n<!-- /numbers -->\nafter\n")
    script = REPO / "benchmarks" / "readme_numbers.py"
    done = subprocess.run([sys.executable, str(script), str(played_run), "--update", str(page)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert text.startswith(f"before\n<!-- numbers: {name} -->\n| | value |")
    assert text.endswith("<!-- /numbers -->\nafter\n")
    world = report["dynamics_psnr_t4_db"]
    assert f"| dynamics PSNR at t=4, inferred actions | {world['mean']:.2f} ± {world['ci95']:.2f} dB" in text
    assert "old table" not in text and "time per stage | data " in text and "report " in text
    assert f"torch {report['machine']['torch']}" in text
    assert f"vector-quantize-pytorch {report['machine']['packages']['vector-quantize-pytorch']}" in text
    # the CPU's vector instructions (AVX2, AVX512, ...), which set a CPU's speed as much as its core count
    assert report["machine"]["cpu_capability"] and f"{report['machine']['cpu_capability']}, " in text
    # a file without the run's block is refused by name
    page.write_text("no blocks here\n")
    done = subprocess.run([sys.executable, str(script), str(played_run), "--update", str(page)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and f"no block `<!-- numbers: {name} -->`" in done.stderr


def test_the_readme_tables_are_generated_blocks():
    """The README's numbers of the main recipes sit in blocks that readme_numbers.py rewrites from the runs."""
    text = (REPO / "README.md").read_text()
    for name in ("coinrun-tiny", "coinrun-small"):
        assert re.search(rf"<!-- numbers: {name} -->\n\| \| value \|\n.*?\n<!-- /numbers -->", text, re.S), name


def test_long_rollout_compares_the_windows_past_the_trained_context(played_run, tmp_path):
    """benchmarks/long_rollout.py: rollouts longer than the trained context with each [world] window, the same
    inferred actions and seeds: identical until the context is full, then scored against the truth window by window;
    the block-minus-slide summary is the mean of the paired per-window differences past the context."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "long_rollout.py"), str(played_run),
                           "--steps", "8", "--windows", "3", "--name", "t", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "long-rollout-t.json").read_text())
    context, by_step = result["context"], result["by_step_db"]
    assert set(by_step) == {"copy_prompt", "slide", "block"} and result["windows"] == 3
    assert all(len(rows) == 8 for rows in by_step.values())
    for k in range(context - 1):  # the history fits the context: both windows hold every frame
        assert by_step["slide"][k] == by_step["block"][k]
    past = result["past_context_db"]
    assert abs(result["block_minus_slide_db"]["mean"] - (past["block"]["mean"] - past["slide"]["mean"])) < 1e-4
    assert (tmp_path / "long-rollout-t.png").stat().st_size > 0


def test_step_turns_compares_variants_of_the_same_steps_taking_turns(tmp_path):
    """benchmarks/step_turns.py: every variant trains a copy of the same models on the same batch, in turns; each
    gets its steps/s beside the first variant's and its warm-up losses, which a change of speed alone keeps (the
    fused AdamW against torch's loop, float rounding; activation checkpointing, the same values) and bf16 autocast
    only roughly; with --profile, each variant's time split by kind of work. A variant it does not know is refused
    in one line naming the choices."""
    script = REPO / "benchmarks" / "step_turns.py"
    variants = ["recipe", "adamw-loop", "checkpointing+adamw-foreach", "bf16"]
    done = subprocess.run([sys.executable, str(script), str(REPO / "recipes" / "coinrun-smoke.toml"),
                           "--variants", ",".join(variants), "--rounds", "2", "--block", "1", "--warmup", "2",
                           "--profile", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / f"turns-coinrun-smoke-{'-vs-'.join(variants)}.json").read_text())
    assert set(result["stages"]) == {"tokenizer", "dynamics"} and result["environment"]["cpu_capability"]
    # bf16's rate is measured only where bf16 units multiply (emulated, one product takes minutes)
    assert set(result["matmul_gflop_per_s"]) == {"float32"} | ({"bfloat16"} if bf16_units(cpu=True) else set())
    for stage, runs in result["stages"].items():
        assert list(runs) == variants
        assert runs["recipe"]["ratio_to_first"] == 1.0
        reference = runs["recipe"]["warmup_losses"]
        for name, run in runs.items():
            assert len(run["steps_per_s"]) == 2 and all(rate > 0 for rate in run["steps_per_s"]), (stage, name)
            close = pytest.approx(reference, rel=5e-2 if name == "bf16" else 1e-5)
            assert run["warmup_losses"] == close, (stage, name)
            profiled = run["profile"]
            assert profiled["ms_per_step"] > 0 and sum(profiled["shares"].values()) == pytest.approx(1)
            assert profiled["shares"]["matrix products"] > 0 and profiled["top"][0]["ms_per_step"] > 0, (stage, name)
        assert runs["bf16"]["warmup_losses"] != reference, "bf16 autocast really ran"
    assert "matrix products" in done.stdout and "most: " in done.stdout
    refused = subprocess.run([sys.executable, str(script), str(REPO / "recipes" / "coinrun-smoke.toml"),
                              "--variants", "recipe,fast"], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "unknown change 'fast'" in refused.stderr and "adamw-loop" in refused.stderr


def test_commit_turns_times_two_versions_of_the_code_in_turns(tmp_path):
    """benchmarks/commit_turns.py: two git revisions, each exported and trained in processes of its own, taking
    turns; the same code gives the same warm-up losses in every process (bf16 autocast does not), every variant
    gets its steps/s beside the base's plain steps, and a variant both versions ran (--base-variants) the head's over
    the base's; a revision that is not a commit, or an unknown variant, is refused in one line."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: nothing to export")
    script = REPO / "benchmarks" / "commit_turns.py"
    done = subprocess.run([sys.executable, str(script), "HEAD", "--head", "HEAD", "--recipe",
                           "recipes/coinrun-smoke.toml", "--variants", "bf16", "--base-variants", "bf16", "--rounds",
                           "2", "--steps", "1", "--warmup", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    result = json.loads((tmp_path / f"commit-turns-coinrun-smoke-{head}-vs-{head}.json").read_text())
    runs = result["runs"]
    assert list(runs) == [f"base {head} recipe", f"base {head} bf16", f"head {head} bf16"]
    base, base_bf16, bf16 = runs.values()
    for run in runs.values():
        assert set(run["steps_per_s"]) == {"tokenizer", "dynamics"}
        assert all(len(rates) == 2 and min(rates) > 0 for rates in run["steps_per_s"].values())
        assert run["environment"]["cpu_capability"] and "keeps_freed_memory" in run["environment"]
    assert base["ratio_to_first"] == {"tokenizer": 1.0, "dynamics": 1.0}
    assert set(bf16["ratio_to_base_bf16"]) == {"tokenizer", "dynamics"} and "head bf16 over base bf16" in done.stdout
    for stage, losses in base["warmup_losses"].items():
        assert len(losses) == 2 and base_bf16["warmup_losses"][stage] == bf16["warmup_losses"][stage]  # same code
        assert bf16["warmup_losses"][stage] == pytest.approx(losses, rel=5e-2)
        assert bf16["warmup_losses"][stage] != losses, "bf16 autocast really ran"
    assert "speed-up over" in done.stdout
    for bad, says in ((["not-a-revision"], "'not-a-revision' is not a commit"),
                      (["HEAD", "--variants", "recipe,fast"], "unknown change 'fast'"),
                      (["HEAD", "--base-variants", "slow"], "--base-variants: unknown change 'slow'")):
        refused = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr

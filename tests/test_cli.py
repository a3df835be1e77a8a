"""The CLI end to end on the smoke recipe: run every stage, resume, redo only what a change affects, sample."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from genie_core.cli import main
from genie_core.io.machine import keep_freed_memory
from genie_core.io.media import CAPTION_HEIGHT

from conftest import REPO

SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert main(["run", SMOKE, "--out", str(out)]) == 0
    return out


def test_run_writes_checkpoints_report_and_pictures(run_dir):
    for path in ("tokenizer/tokenizer.safetensors", "tokenizer/components.json", "dynamics/dynamics.safetensors",
                 "dynamics/action_model.safetensors", "dynamics/components.json", "report.json", "report.md",
                 "rollout.gif", "rollout.png", "logs/tokenizer.jsonl", "logs/dynamics.jsonl", "recipe.json"):
        assert (run_dir / path).is_file(), path
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tokenizer_psnr_db"]["n"] == 2 * 6  # eval.windows windows of train.tokenizer.seq_len frames
    assert report["dtpsnr_t4_db"]["n"] == 2
    assert all(k in report for k in ("dynamics_psnr_t4_db", "stages", "components"))
    # each training stage counts the time it spent getting batches (the data path), and the report gives its share
    for stage in ("tokenizer", "dynamics"):
        summary = json.loads((run_dir / stage / "stage.json").read_text())["summary"]
        assert 0 < summary["data_seconds"] < summary["seconds"]
    assert (run_dir / "report.md").read_text().count("% of it getting batches)") == 2
    # `genie run` kept the memory it freed, where it can (glibc), and its report says so: had it not asked, this call
    # would ask now and answer True
    assert report["machine"]["keeps_freed_memory"] is keep_freed_memory()
    # the versions of the packages whose releases can move the numbers, in the record and on the report's page
    quantizer = importlib.metadata.version("vector-quantize-pytorch")
    assert report["machine"]["packages"]["vector-quantize-pytorch"] == quantizer
    assert f", vector-quantize-pytorch {quantizer}," in (run_dir / "report.md").read_text()
    with Image.open(run_dir / "rollout.gif") as gif:
        assert gif.n_frames == 3 + 1  # the prompt and rollout_steps generated frames
        # one panel per latent action, 2-pixel gaps, under a bar that names each panel's action
        assert gif.size == (4 * 64 + 3 * 2, CAPTION_HEIGHT + 64)
    assert not list(run_dir.glob("*.tmp")), "no temporary folder is left behind"
    events = list((run_dir / "logs" / "coinrun-smoke").glob("events.out.tfevents.*"))
    assert events, "TensorBoard is the default tracker"


def test_rerun_skips_finished_stages(run_dir, capsys):
    assert main(["run", SMOKE, "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert all(f"stage {s}: done, skipping" in out for s in ("data", "tokenizer", "dynamics", "report"))


def test_changed_setting_redoes_only_the_stages_it_affects(run_dir, capsys):
    before = (run_dir / "tokenizer" / "tokenizer.safetensors").stat().st_mtime_ns
    assert main(["run", SMOKE, "--out", str(run_dir), "eval.rollout_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "stage tokenizer: done, skipping" in out and "stage dynamics: done, skipping" in out
    assert "stage report: its settings or inputs changed since it ran, redoing it" in out
    assert (run_dir / "tokenizer" / "tokenizer.safetensors").stat().st_mtime_ns == before
    with Image.open(run_dir / "rollout.gif") as gif:
        assert gif.n_frames == 3


def test_sample_from_a_prompt_image(run_dir, tmp_path):
    prompt = tmp_path / "prompt.png"
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(prompt)  # any size: resized to 64x64
    out = tmp_path / "play" / "sample.gif"
    out.parent.mkdir()  # (sample writes into folders that exist; it creates none)
    args = ["sample", str(run_dir), "--prompt", str(prompt), "--actions", "0,1,2,3,0", "--out", str(out),
            "--scale", "2"]
    assert main(args) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 6 and gif.size == (128, 128)
    with Image.open(out.with_suffix(".png")) as strip:
        assert strip.size == ((6 * 64 + 5 * 2) * 2, 128)
    # same seed, same frames
    again = tmp_path / "again.gif"
    assert main(args[:-4] + ["--out", str(again), "--scale", "2"]) == 0
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--actions", "0,9"], "action 9 is out of range; this world has actions 0..3"),
    (["--actions", "0,x"], "expected comma-separated integers"),
    (["--prompt", "missing.png"], "image file not found"),
])
def test_sample_bad_input_exits_2(run_dir, tmp_path, capsys, args, message):
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64)).save(prompt)
    base = {"--prompt": str(prompt), "--actions": "0"}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["sample", str(run_dir), "--out", str(tmp_path / "x.gif")] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["play", "--port", "70000"], "argument --port: '70000' is not a port (an integer in 0..65535)"),
    (["play", "--seed", "18446744073709551616"],
     "argument --seed: '18446744073709551616' is not a seed (an integer in 0..18446744073709551615)"),
    (["play", "--seed", "-1"], "argument --seed: '-1' is not a seed"),
    (["play", "--idle-minutes", "0"], "argument --idle-minutes: '0' is not a finite number above 0"),
    (["play", "--idle-minutes", "nan"], "argument --idle-minutes: 'nan' is not a finite number above 0"),
    (["play", "--max-upload-mb", "-5"], "argument --max-upload-mb: '-5' is not a finite number above 0"),
    (["play", "--max-upload-mb", "inf"], "argument --max-upload-mb: 'inf' is not a finite number above 0"),
    (["play", "--max-sessions", "0"], "argument --max-sessions: must be at least 1, got 0"),
    (["sample", "--prompt", "p.png", "--actions", "0", "--seed", "18446744073709551616"],
     "argument --seed: '18446744073709551616' is not a seed (an integer in 0..18446744073709551615)"),
])
def test_play_and_sample_arguments_are_checked_before_anything_loads(tmp_path, capsys, args, message):
    """Refused as the arguments are parsed (status 2, one line), before any world is looked for: the run folder
    here does not even exist."""
    command, *rest = args
    with pytest.raises(SystemExit) as exit_status:
        main([command, str(tmp_path / "no-run"), *rest])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert f"genie {command}: error: {message}" in err and "no-run" not in err


def test_sample_actions_too_large_for_any_world_exit_2(tmp_path, capsys):
    argv = ["sample", str(tmp_path / "no-run"), "--prompt", "p.png", "--actions", "0,99999999999999999999"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: --actions: 99999999999999999999 is not an action id; a world's actions "
                                       "are 0..N-1 for its N actions\n")


def test_a_world_context_of_one_is_refused_by_validate(capsys):
    assert main(["validate", SMOKE, "world.context=1"]) == 2
    assert "[world]: key 'context': 'context' must be 0 (as many frames as the world was trained on) or at least 2" \
        in capsys.readouterr().err


def test_sample_broken_image_and_unfinished_run(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["sample", str(run_dir), "--prompt", str(broken), "--actions", "0"]) == 2
    assert "broken.png: not an image (no image format recognised)" in capsys.readouterr().err
    assert main(["sample", str(tmp_path), "--prompt", str(broken), "--actions", "0"]) == 2
    assert "not a run (no recipe.json or dynamics/components.json in it or above it)" in capsys.readouterr().err
    started = tmp_path / "started"  # a run that has begun: its recipe, no finished stage yet
    started.mkdir()
    shutil.copy(run_dir / "recipe.json", started / "recipe.json")
    assert main(["sample", str(started), "--prompt", str(broken), "--actions", "0"]) == 2
    assert "the tokenizer stage has not finished" in capsys.readouterr().err


def test_tiny_recipe_runs_a_few_steps(tmp_path, capsys):
    """The shipped tiny recipe itself (its real model sizes, its precision, its compiled stacks) through every stage,
    shortened by overrides."""
    tiny = str(REPO / "recipes" / "coinrun-tiny.toml")
    few = ["source.train_levels=2", "source.val_levels=1", "source.steps_per_level=40", "data.min_episode_frames=8",
           "train.tokenizer.steps=2", "train.dynamics.steps=2", "eval.windows=2", "eval.rollout_steps=1"]
    if not (shutil.which("c++") or shutil.which("g++")):  # the recipe is refused then (test_training.py)
        few += ["train.tokenizer.compile=false", "train.dynamics.compile=false"]
    assert main(["run", tiny, "--out", str(tmp_path / "tiny"), *few]) == 0
    assert "dtPSNR(t=4)" in capsys.readouterr().out
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["components"] == {"tokenizer": "st-vivit", "action_model": "pixel-lam", "dynamics": "maskgit",
                                    "sampler": "maskgit", "source": "procgen"}
    assert report["num_actions"] == 6


def test_redone_earlier_stage_makes_later_stages_stale(run_dir, capsys):
    """A later stage trained on an earlier stage's output that has since been redone is redone too."""
    record_path = run_dir / "tokenizer" / "stage.json"
    record = json.loads(record_path.read_text())
    record["id"] = "a-tokenizer-trained-again"
    record_path.write_text(json.dumps(record))
    assert main(["run", SMOKE, "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stage tokenizer: done, skipping" in out
    assert "stage dynamics: its settings or inputs changed since it ran, redoing it" in out
    assert json.loads((run_dir / "dynamics" / "stage.json").read_text())["input"] == "a-tokenizer-trained-again"


def test_sample_out_must_be_a_gif(run_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64)).save(prompt)
    bad = tmp_path / "x.png"
    assert main(["sample", str(run_dir), "--prompt", str(prompt), "--actions", "0", "--out", str(bad)]) == 2
    assert "must end in .gif" in capsys.readouterr().err


def test_sample_rolls_past_the_trained_context(run_dir, tmp_path):
    """More steps than the model's window: the rolling context keeps every step the same cost and shape."""
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(prompt)
    out = tmp_path / "long.gif"
    nine = ",".join(["1"] * 9)
    assert main(["sample", str(run_dir), "--prompt", str(prompt), "--actions", nine, "--out", str(out)]) == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 10


def test_other_quantizers_and_action_tokens_run_end_to_end(tmp_path):
    """The swappable options train, evaluate and play through the same pipeline: FSQ tokens, LFQ actions, and the
    action given to the dynamics model as a prepended token."""
    out = tmp_path / "variants"
    assert main(["run", SMOKE, "tokenizer.quantizer=fsq", "action_model.quantizer=lfq",
                 "dynamics.action_conditioning=token", "run.trackers=none", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_actions"] == 4 and report["tokenizer_psnr_db"]["mean"] > 0


def test_token_input_action_model_trains_saves_and_plays(tmp_path):
    """token-lam reads the frozen tokenizer's tokens: trained co-trained and alone (lam_steps), saved without the
    tokenizer's weights, and handed the tokenizer again when the world is loaded for evaluation and play."""
    out = tmp_path / "token-lam"
    assert main(["run", SMOKE, "action_model.name=token-lam", "train.dynamics.lam_steps=3", "run.trackers=none",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "dynamics" / "components.json").read_text())["action_model"]
    assert manifest["name"] == "token-lam" and manifest["spec"]["token_vocab"] == 32
    assert all(not k.startswith("_tokenizer") for k in load_file(out / "dynamics" / "action_model.safetensors"))
    assert main(["eval", str(out), "--windows", "4"]) == 0
    assert json.loads((out / "eval" / "eval.json").read_text())["actions_vs_true"]["nmi"] >= 0
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64)).save(prompt)
    gif = tmp_path / "t.gif"
    assert main(["sample", str(out), "--prompt", str(prompt), "--actions", "0,1,2", "--out", str(gif)]) == 0


def test_every_tokenizer_and_the_autoregressive_pair_run_end_to_end(tmp_path):
    """C-ViViT and ViT tokenizers, autoregressive dynamics and its sampler, swapped in by name in a recipe."""
    recipe = Path(SMOKE).read_text().replace('[sampler]\nname = "maskgit"\nsteps = 2',
                                             '[sampler]\nname = "autoregressive"\ntop_k = 8')
    path = tmp_path / "swapped.toml"
    path.write_text(recipe)
    for tokenizer in ("c-vivit", "vit"):
        out = tmp_path / tokenizer
        assert main(["run", str(path), f"tokenizer.name={tokenizer}", "dynamics.name=autoregressive",
                     "run.trackers=none", "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["components"]["tokenizer"] == tokenizer
        assert report["components"]["sampler"] == "autoregressive" and (out / "rollout.gif").is_file()


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`genie plugins | head -1`: when the reader closes the pipe before genie has written, genie ends as Unix
    tools do (status 141, as SIGPIPE gives) with no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "genie_core.cli", "plugins"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # long before the registry is loaded and the table printed
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr

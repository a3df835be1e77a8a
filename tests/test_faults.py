"""Faults in run folders: a second writer, damaged weights and records, stages that do not belong together. Each
is refused with one line naming the file or folder (exit status 2 from the CLI), and nothing is lost."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from genie_core.cli import main
from genie_core.errors import GenieError
from genie_core.run.folder import RunFolder
from genie_core.testing import TINY_VIDEO, build, token_spec
from genie_core.world.model import World

from conftest import REPO

SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")
HOLD = """import sys, time
from genie_core.run.folder import RunFolder
with RunFolder(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_has_one_writer_and_a_killed_one_lets_go(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", SMOKE, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run}: in use by genie run (process {holder.pid} on " in err and len(err.strip().splitlines()) == 1
        assert not (run / "recipe.json").exists()  # refused before writing anything
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    with RunFolder(run).lock():  # the operating system let go of the dead holder's lock
        pass


@pytest.fixture
def copied_run(played_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(played_run, run)
    return run


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_weights_are_named_not_a_traceback(copied_run, tmp_path, capsys, damage):
    weights = copied_run / "dynamics" / "dynamics.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 64)
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64)).save(prompt)
    sample = ["sample", str(copied_run), "--prompt", str(prompt), "--actions", "0", "--out", str(tmp_path / "s.gif")]
    commands = [sample,
                ["eval", str(copied_run), "--windows", "2", "--out", str(tmp_path / "ev")],
                ["play", str(copied_run), "--terminal"]]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {weights}: cannot load the dynamics weights") and "\n" not in err, err


def test_a_damaged_stage_record_or_manifest_is_named(copied_run, capsys):
    (copied_run / "tokenizer" / "components.json").write_bytes(b"\xff\xfe not json")
    assert main(["play", str(copied_run), "--terminal"]) == 2
    assert f"{copied_run / 'tokenizer' / 'components.json'}: damaged" in capsys.readouterr().err
    (copied_run / "dynamics" / "stage.json").write_text("{")
    assert main(["play", str(copied_run), "--terminal"]) == 2
    assert f"{copied_run / 'dynamics' / 'stage.json'}: damaged, not JSON" in capsys.readouterr().err


def test_stages_of_different_runs_are_refused(copied_run, capsys):
    """A dynamics stage copied in from a run with another tokenizer: its stage record names another tokenizer."""
    record = json.loads((copied_run / "dynamics" / "stage.json").read_text())
    record["input"] = "0" * 32
    (copied_run / "dynamics" / "stage.json").write_text(json.dumps(record))
    assert main(["play", str(copied_run), "--terminal"]) == 2
    err = capsys.readouterr().err
    assert f"{copied_run / 'dynamics'}: trained on another tokenizer than {copied_run / 'tokenizer'} holds" in err


def test_a_world_of_parts_that_do_not_fit_is_refused():
    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO)  # its own codebook and grid
    action_model = build("action_model", "pixel-lam", TINY_VIDEO)
    dynamics = build("dynamics", "maskgit", token_spec(num_actions=action_model.num_actions + 1))
    with pytest.raises(GenieError, match="not trained together") as refused:
        World(tokenizer, action_model, dynamics, build("sampler", "maskgit"))
    message = str(refused.value)
    assert f"codebook size: 32 for the dynamics model, {tokenizer.codebook_size} for the tokenizer" in message
    assert "number of actions" in message


class Interrupted(Exception):
    pass


def tokenizer_training(folder, stop_at: int | None = None, resume: bool = False):
    """A few tokenizer steps with a checkpoint every 2; `stop_at`: the step at which the process 'dies'."""
    from accelerate import Accelerator

    from genie_core.config import TrainConfig
    from genie_core.training.engine import Checkpointing, TokenizerTask, train

    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO)

    class Dying(TokenizerTask):
        steps = 0

        def forward(self, video):
            Dying.steps += 1
            if stop_at is not None and Dying.steps > stop_at:
                raise Interrupted
            return super().forward(video)

    generator = torch.Generator().manual_seed(0)
    dataset = [torch.rand(TINY_VIDEO.num_frames, 3, 16, 16, generator=generator) for _ in range(8)]
    cfg = TrainConfig(steps=8, batch_size=2, seq_len=6, warmup_steps=1, checkpoint_every=2, keep_checkpoints=3)
    summary = train(Accelerator(cpu=True), Dying(tokenizer), dataset, cfg, 0, folder / "log.jsonl", "tok",
                    Checkpointing(folder / "ckpt", "x", resume))
    return summary["weights"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    reference = tokenizer_training(tmp_path / "reference")
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        tokenizer_training(run, stop_at=7)  # checkpoints at steps 2, 4 and 6
    newest = run / "ckpt" / "step-000000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a crash while it was written
    capsys.readouterr()
    resumed = tokenizer_training(run, resume=True)
    said = capsys.readouterr()
    assert f"{newest}: damaged (" in said.err and "set aside as step-000000006.damaged" in said.err
    assert f"tok: resuming at step 4 from {run / 'ckpt' / 'step-000000004'}" in said.out
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)  # as if never interrupted


def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(tmp_path):
    with pytest.raises(Interrupted):
        tokenizer_training(tmp_path, stop_at=5)
    for state in (tmp_path / "ckpt").glob("step-*/trainer.json"):
        state.write_bytes(b"\xff")
    with pytest.raises(GenieError, match=r"every checkpoint is damaged \(each kept as step-N.damaged\); run without"):
        tokenizer_training(tmp_path, resume=True)
    tokenizer_training(tmp_path)  # starting over, as the error says: the damaged ones are still there to look at
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.damaged")) == ["step-000000002.damaged",
                                                                            "step-000000004.damaged"]


@pytest.mark.parametrize("failure", ["out of memory", "unreadable folder"])
def test_a_checkpoint_that_fails_to_load_for_another_reason_is_kept_as_it_is(tmp_path, monkeypatch, failure):
    """Running out of memory, or a folder this user may not read, says nothing about the files: the resume stops
    with a word and no checkpoint is set aside (setting each aside in turn would end in starting over)."""
    from accelerate import Accelerator

    with pytest.raises(Interrupted):
        tokenizer_training(tmp_path, stop_at=5)  # checkpoints at steps 2 and 4
    raised = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if failure == "out of memory"
              else PermissionError(13, "Permission denied"))

    def load_state(*_args, **_kwargs):
        raise raised

    monkeypatch.setattr(Accelerator, "load_state", load_state)
    said = "out of memory while loading" if failure == "out of memory" else "cannot read this checkpoint (Permission"
    with pytest.raises(GenieError, match=rf"step-000000004: {re.escape(said)}.*it is kept as it is"):
        tokenizer_training(tmp_path, resume=True)
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == ["step-000000002", "step-000000004"]


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    """Each process saved its own random state and read its own share of the data: resuming with another number
    of them would train on other batches, so it is refused with the number to use."""
    with pytest.raises(Interrupted):
        tokenizer_training(tmp_path, stop_at=5)
    state_file = tmp_path / "ckpt" / "step-000000004" / "trainer.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(GenieError, match="written by 2 process\\(es\\), and this run has 1; resume with 2 "
                                         "\\(torchrun --nproc_per_node 2\\)"):
        tokenizer_training(tmp_path, resume=True)


def killed_saving(monkeypatch, stage: str, run, overrides: list[str]) -> None:
    """The smoke recipe run into `run`, the process 'dying' once `stage` has trained, as it saves its output."""
    import genie_core.training.pipeline as pipeline

    real = pipeline.atomic_dir

    def dies_saving(folder):
        if folder.name == stage:
            raise Interrupted
        return real(folder)

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "atomic_dir", dies_saving)
        with pytest.raises(Interrupted):
            main(["run", SMOKE, *overrides, "--out", str(run)])


def test_a_stage_killed_before_its_output_is_saved_resumes_from_its_checkpoints(tmp_path, monkeypatch, capsys):
    """Training done, the output not yet saved: the checkpoints are still there, so --resume goes on from the last
    one instead of starting the stage over."""
    run, few = tmp_path / "run", ["run.trackers=none", "train.tokenizer.checkpoint_every=2"]
    killed_saving(monkeypatch, "tokenizer", run, few)
    capsys.readouterr()
    assert main(["run", SMOKE, *few, "--out", str(run), "--resume"]) == 0
    assert f"tokenizer: resuming at step 2 from {run / 'checkpoints' / 'tokenizer' / 'step-000000002'}" in (
        capsys.readouterr().out)
    assert not (run / "checkpoints" / "tokenizer").exists()  # gone once the output is saved


def test_checkpoints_trained_on_an_earlier_stage_since_redone_are_refused(tmp_path, monkeypatch, capsys):
    """The same settings, but the tokenizer was trained again since the dynamics stage's checkpoints were written:
    they trained on other tokens, so resuming from them is refused."""
    run, few = tmp_path / "run", ["run.trackers=none", "train.dynamics.checkpoint_every=2"]
    killed_saving(monkeypatch, "dynamics", run, few)
    record_path = run / "tokenizer" / "stage.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "id": "a-tokenizer-trained-again"}))
    capsys.readouterr()
    assert main(["run", SMOKE, *few, "--out", str(run), "--resume"]) == 2
    assert "step-000000002: this checkpoint was written by a run with other settings (another recipe or overrides, " \
           "or an earlier stage since redone)" in capsys.readouterr().err


def test_a_latent_action_model_trained_for_other_settings_is_not_reused(tmp_path, monkeypatch, capsys):
    """train.dynamics.lam_steps: the LAM trained first is kept while the dynamics model trains, for a resume.
    It is reused only for the settings and the tokenizer it was trained for."""
    import genie_core.training.pipeline as pipeline

    real = pipeline.train

    def dies_after_the_lam(*args, **kwargs):
        summary = real(*args, **kwargs)
        if args[6] == "dynamics":  # desc: the LAM trained and kept, then the dynamics model
            raise Interrupted
        return summary

    run, few = tmp_path / "run", ["run.trackers=none", "train.dynamics.lam_steps=2"]
    monkeypatch.setattr(pipeline, "train", dies_after_the_lam)
    with pytest.raises(Interrupted):
        main(["run", SMOKE, *few, "--out", str(run)])
    monkeypatch.setattr(pipeline, "train", real)
    assert (run / "checkpoints" / "dynamics-lam-done" / "components.json").is_file()
    capsys.readouterr()
    assert main(["run", SMOKE, *few, "action_model.dim=16", "--out", str(run), "--resume"]) == 2
    assert "dynamics-lam-done: this latent action model was trained under other settings" in capsys.readouterr().err
    assert main(["run", SMOKE, *few, "--out", str(run), "--resume"]) == 0
    assert "the latent action model was trained before the interruption" in capsys.readouterr().out
    assert not (run / "checkpoints" / "dynamics-lam-done").exists()


def test_a_checkpoint_that_cannot_be_written_names_the_folder_and_the_last_good_one(tmp_path, monkeypatch):
    import genie_core.training.engine as engine

    real = engine.os.replace
    written = []

    def replace(src, dst):
        if written:  # the second checkpoint: the folder became read-only
            raise PermissionError(13, "Permission denied")
        written.append(dst)
        return real(src, dst)

    monkeypatch.setattr(engine.os, "replace", replace)
    with pytest.raises(GenieError) as refused:
        tokenizer_training(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'ckpt'}: cannot write the checkpoint of step 4 (Permission denied); ")
    assert f"the last good one is {written[0]}" in message and (written[0] / "trainer.json").is_file()


@pytest.mark.parametrize(("override", "message"), [
    ("tokenizer.dim=1000000000", "the tokenizer's sizes are too large to build at all"),
    ("dynamics.dim=20000", "the dynamics stage needs about"),
    ("dynamics.depth=100000", "key 'depth': 'depth' must be <= 256"),
    ("sampler.steps=100000000000000000000000", "key 'steps': 'steps' must be <= 1024"),
    ("run.name=../../escape", "key 'name': '../../escape' is not a folder name"),
    ("run.name=a/b", "key 'name': 'a/b' is not a folder name"),
])
def test_absurd_or_escaping_settings_are_refused_at_validate(override, message, capsys):
    assert main(["validate", SMOKE, override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_recipe_that_is_not_utf8_is_named(tmp_path, capsys):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes((REPO / "recipes" / "coinrun-smoke.toml").read_bytes() + "# café\n".encode("latin-1"))
    for command in ("validate", "run"):
        assert main([command, str(recipe)]) == 2
        assert f"{recipe}: not UTF-8 text (byte " in capsys.readouterr().err


def test_sample_does_not_create_folders_it_was_not_given(played_run, tmp_path, capsys):
    prompt = tmp_path / "prompt.png"
    Image.new("RGB", (64, 64)).save(prompt)
    out = tmp_path / "missing" / "deeper" / "s.gif"
    assert main(["sample", str(played_run), "--prompt", str(prompt), "--actions", "0", "--out", str(out)]) == 2
    assert f"the folder {out.parent} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_a_shard_changed_after_the_data_stage_stops_training(copied_run, capsys):
    """The data stage records each shard's size and time; a training stage re-hashes a shard whose stamp changed
    and refuses one whose bytes no longer match the manifest, naming it (same shape, so only the hash can tell)."""
    import numpy as np

    shard = sorted((copied_run / "data").rglob("*.frames.npy"))[0]
    frames = np.load(shard)
    frames[0, 0, 0] ^= 255
    np.save(shard, frames)
    assert main(["run", SMOKE, "--out", str(copied_run), "--redo-from", "tokenizer"]) == 2
    assert f"{shard}: sha256 differs from the manifest's" in capsys.readouterr().err
    frames[0, 0, 0] ^= 255
    np.save(shard, frames)  # restored: a new time, the same bytes, so the hash passes
    assert main(["run", SMOKE, "--out", str(copied_run), "--redo-from", "report"]) == 0


# ----------------------------------------------------------------------------------------- kill -9 at random moments

KILLABLE = ["train.tokenizer.steps=20", "train.tokenizer.checkpoint_every=4", "train.tokenizer.log_every=1",
            "train.dynamics.steps=20", "train.dynamics.checkpoint_every=4", "train.dynamics.log_every=1",
            "train.dynamics.eval_every=10", "run.trackers=none"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # bitwise equality holds for one thread count


def logged_rows(run) -> int:
    """How far a run has come: the units its data build journalled and the rows its training logs hold."""
    files = [run / "data" / "journal.jsonl", *(run / "logs").glob("*.jsonl")]
    return sum(len(f.read_text().splitlines()) for f in files if f.is_file())


def run_killed_at(run, threshold: int, resume: bool) -> bool:
    """Starts `genie run` and kills it (SIGKILL) once it has logged `threshold` rows; False if it finished first."""
    cmd = [sys.executable, "-m", "genie_core.cli", "run", SMOKE, *KILLABLE, "--out", str(run)]
    process = subprocess.Popen(cmd + ["--resume"] * resume, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if logged_rows(run) >= threshold:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    assert process.returncode == 0
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert not run_killed_at(run, 10**9, resume=False)
    return run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, seed):
    """Killed twice at random points of the data build and the training stages, then resumed to the end: every
    log row, validation score and reported number equals the uninterrupted run's, bit for bit (CPU)."""
    rng = random.Random(seed)
    total = logged_rows(uninterrupted)
    run = tmp_path / "run"
    first = rng.randint(1, total // 2)
    killed = [run_killed_at(run, first, resume=False), run_killed_at(run, rng.randint(first + 1, total - 1), True)]
    assert all(killed), "the run ended before it could be killed"
    run_killed_at(run, 10**9, resume=True)
    for stage in ("tokenizer", "dynamics"):
        assert (run / "logs" / f"{stage}.jsonl").read_text() == (uninterrupted / "logs" / f"{stage}.jsonl").read_text()
    numbers = [{k: v for k, v in json.loads((r / "report.json").read_text()).items() if k not in ("stages", "machine")}
               for r in (run, uninterrupted)]
    assert numbers[0] == numbers[1]


def test_run_refuses_models_this_machine_cannot_train_before_writing_anything(tmp_path, capsys):
    assert main(["run", SMOKE, "dynamics.dim=20000", "--out", str(tmp_path / "run")]) == 2
    assert "the dynamics stage needs about" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

"""Evaluation: the measurements on worlds whose answers are known, and `genie eval` end to end on a trained run.

The known worlds live in a data set of flat grey frames whose brightness level moves by the true action at every
step (level_{t+1} = level_t + action_t mod LEVELS). Their tokenizer reads the level exactly, their latent action
model reads the action back (under a relabelling), and their sampler either applies the action (a perfect world) or
ignores it and adds sampling noise (a world without control).
"""

from __future__ import annotations

import json
import re
import shutil

import attrs
import numpy as np
import pytest
import torch
from accelerate import Accelerator

from genie_core.cli import main
from genie_core.config import DataConfig
from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, evenly_spaced, source_identity
from genie_core.eval.evaluate import EvalSettings, Evaluation
from genie_core.eval.metrics import psnr
from genie_core.interfaces import (
    DataSpec,
    DynamicsModel,
    Episode,
    LatentActionModel,
    Sampler,
    TokenSpec,
    VideoSource,
    VideoSpec,
    VideoTokenizer,
)
from genie_core.registry import Owner
from genie_core.world.model import World

from conftest import REPO

LEVELS, ACTIONS, RES, FRAMES = 16, 4, 16, 6
SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")


@attrs.define(frozen=True)
class Empty:
    pass


class LevelSource(VideoSource):
    config_class = Empty

    def units(self):
        return {"train": ["0"], "val": ["1", "2"]}

    def record(self, unit):
        rng = np.random.default_rng(int(unit))
        actions = rng.integers(0, ACTIONS, 40)
        yield level_episode(self.changed(actions), rng.integers(0, LEVELS))

    def changed(self, actions):
        return actions


def level_episode(actions, first_level) -> Episode:
    """Frames of one brightness level each, the level moved by each action (0: it stays)."""
    levels = np.cumsum(np.concatenate([[first_level], actions[:-1]])) % LEVELS
    frames = np.repeat((levels * 255 // (LEVELS - 1)).astype(np.uint8)[:, None, None, None], RES, 1)
    return Episode(frames=np.repeat(np.repeat(frames, RES, 2), 3, 3), actions=actions)


def level_of(video):  # [..., C, H, W] -> [...] the brightness level
    return (video.mean(dim=(-3, -2, -1)) * (LEVELS - 1)).round().long()


class LevelTokenizer(VideoTokenizer):
    config_class = Empty
    codebook_size = LEVELS
    grid = (2, 2)

    def encode(self, video):
        return level_of(video)[..., None, None].expand(*video.shape[:2], 2, 2)

    def decode(self, tokens):
        level = tokens[..., :1, :1].float() / (LEVELS - 1)  # [B, T, 1, 1]
        return level[:, :, None].expand(*tokens.shape[:2], 3, RES, RES).clone()

    def loss(self, video):
        raise NotImplementedError


class LevelActions(LatentActionModel):
    """Reads the true action back, relabelled (latent = true + 1 mod |A|): meaning does not need the same names."""

    config_class = Empty
    num_actions = ACTIONS

    def infer_actions(self, video):
        level = level_of(video)
        return ((level[:, 1:] - level[:, :-1]) % LEVELS + 1) % ACTIONS

    def loss(self, video):
        raise NotImplementedError


class NoDynamics(DynamicsModel):
    """The known worlds' samplers do the work; this only carries the spec and a device."""

    config_class = Empty

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, actions, mask=None):
        raise NotImplementedError

    def loss(self, tokens, actions, generator=None):
        raise NotImplementedError


@attrs.define(frozen=True)
class StepConfig:
    obeys_actions: bool = True


class LevelSampler(Sampler):
    config_class = StepConfig

    def sample_next(self, dynamics, history, actions, generator=None):
        last = history[:, -1]
        if self.config.obeys_actions:
            return (last + ((actions[:, -1] - 1) % ACTIONS)[:, None, None]) % LEVELS
        noise = torch.randint(0, 3, (last.shape[0], 1, 1), generator=generator, device=last.device)
        return (last + noise) % LEVELS


class StillSampler(Sampler):
    """Shows the prompt again at every step: the copy-prompt baseline as a world."""

    config_class = Empty

    def sample_next(self, dynamics, history, actions, generator=None):
        return history[:, 0]


@pytest.fixture(scope="module")
def levels(tmp_path_factory):
    source = LevelSource(Empty(), DataSpec(resolution=RES))
    out = tmp_path_factory.mktemp("levels") / "ds"
    build_dataset(source, source_identity(source, "levels", Owner("levels", "tests", "0")),
                  DataConfig(resolution=RES, min_episode_frames=FRAMES), out, log=lambda *_: None)
    return EpisodeIndex.open(out)


def known_world(obeys_actions: bool) -> World:
    video = VideoSpec(height=RES, width=RES, num_frames=FRAMES)
    tokens = TokenSpec(vocab_size=LEVELS, grid=(2, 2), num_frames=FRAMES, num_actions=ACTIONS)
    return World(LevelTokenizer(Empty(), video), LevelActions(Empty(), video), NoDynamics(Empty(), tokens),
                 LevelSampler(StepConfig(obeys_actions)))


def evaluate(world, index, **settings):
    settings = EvalSettings(**({"windows": 12, "batch_size": 5, "dtpsnr_t": (1, 4)} | settings))
    return Evaluation(world, index, "val", settings, Accelerator(cpu=True)).run()


def test_a_perfect_world_scores_perfectly(levels):
    result = evaluate(known_world(obeys_actions=True), levels)
    assert result["tokenizer_psnr_db"]["mean"] == 100.0
    assert result["tokenizer_ssim"]["mean"] == pytest.approx(1.0, abs=1e-3)
    assert result["horizon"] == FRAMES - 1
    assert [s["mean"] for s in result["dynamics_psnr_by_step_db"]] == [100.0] * (FRAMES - 1)
    assert all(s["mean"] == pytest.approx(1.0, abs=1e-3) for s in result["dynamics_ssim_by_step"])
    assert all(result["dtpsnr_db"][t]["mean"] > 10 for t in ("1", "4"))  # random actions land elsewhere
    assert result["dtpsnr_db"]["4"]["n"] == 12
    actions = result["actions_vs_true"]
    assert actions["nmi"] == pytest.approx(1.0)  # a relabelling carries all the information
    assert actions["mapping_accuracy"] == 1.0 and actions["majority_baseline"] < 0.6
    assert actions["latent_to_real"] == [3, 0, 1, 2] and actions["real_to_latent"] == {0: 1, 1: 2, 2: 3, 3: 0}
    assert result["lam_codebook"]["used"] == ACTIONS


def test_a_world_that_ignores_actions_has_exactly_zero_controllability(levels):
    """Both rollouts of a window draw the same sampling noise, so only the actions can make them differ."""
    result = evaluate(known_world(obeys_actions=False), levels)
    assert result["dtpsnr_db"]["1"]["mean"] == 0.0 and result["dtpsnr_db"]["4"]["mean"] == 0.0
    assert result["dynamics_psnr_by_step_db"][0]["mean"] < 100.0


def test_per_window_scores_are_kept_when_asked_and_agree_with_the_summary(levels):
    """EvalSettings(per_window=True): every window's world PSNR and dtPSNR at each t, in window order, for
    comparisons window by window; their means are the summary's. Not kept by default."""
    world = known_world(obeys_actions=False)
    assert "per_window" not in evaluate(world, levels)
    result = evaluate(world, levels, per_window=True)
    for key, summary in (("dynamics_psnr_at_t_db", result["dynamics_psnr_at_t_db"]),
                         ("dtpsnr_db", result["dtpsnr_db"])):
        for t in ("1", "4"):
            values = result["per_window"][key][t]
            assert len(values) == 12
            assert sum(values) / len(values) == pytest.approx(summary[t]["mean"])


def test_baselines_are_the_prompt_shown_again(levels):
    """Copy-prompt scores what the prompt frame scores against each later true frame (measured here directly from
    the footage); a world that only shows the prompt again scores exactly that, and 0 above it."""
    perfect = evaluate(known_world(obeys_actions=True), levels)
    settings = EvalSettings(windows=12, batch_size=5, dtpsnr_t=(1, 4))
    windows = WindowDataset(levels, "val", FRAMES)
    video = torch.stack([windows[i] for i in evenly_spaced(windows, 12)])
    expected = psnr(video[:, :1].expand_as(video[:, 1:]), video[:, 1:])  # [windows, FRAMES - 1]
    assert [s["mean"] for s in perfect["copy_prompt_psnr_by_step_db"]] == pytest.approx(expected.mean(0).tolist())
    # this tokenizer is lossless: the prompt's tokens decoded are the prompt
    assert perfect["copy_prompt_tokens_psnr_by_step_db"] == perfect["copy_prompt_psnr_by_step_db"]
    gain = perfect["dynamics_minus_copy_prompt_at_t_db"]["4"]
    assert gain["mean"] == pytest.approx(100.0 - expected[:, 3].mean().item()) and gain["n"] == 12
    assert not perfect["windows_overlap"]
    # windows where the prompt frame is exact (scored at the cap) are counted, and left out of the second difference
    exact = expected[:, 3] >= 100.0
    assert perfect["copy_prompt_exact_at_t"]["4"] == int(exact.sum())
    inexact = perfect["dynamics_minus_copy_prompt_inexact_at_t_db"]["4"]
    assert inexact["n"] == 12 - int(exact.sum())
    assert inexact["mean"] == pytest.approx(100.0 - expected[~exact, 3].mean().item())

    still = World(*list(attrs.astuple(known_world(True), recurse=False))[:3], StillSampler(Empty()))
    result = Evaluation(still, levels, "val", settings, Accelerator(cpu=True)).run()
    assert result["dynamics_psnr_by_step_db"] == result["copy_prompt_psnr_by_step_db"]
    assert result["dynamics_minus_copy_prompt_at_t_db"]["4"]["mean"] == 0.0
    assert result["dynamics_minus_copy_prompt_inexact_at_t_db"]["4"]["mean"] == 0.0


class PausingSource(LevelSource):
    """LevelSource whose episodes stand still for a stretch: action 0 (no change) for 10 steps."""

    def changed(self, actions):
        return np.concatenate([actions[:5], np.zeros(10, dtype=actions.dtype), actions[15:]])


def test_windows_where_the_prompt_frame_is_exact_are_counted_and_set_apart(tmp_path):
    """Where nothing moved, the prompt frame shown again is exact (the PSNR cap): such windows are counted, and the
    world minus the prompt frame is also given over the other windows alone, window by window."""
    source = PausingSource(Empty(), DataSpec(resolution=RES))
    build_dataset(source, source_identity(source, "pausing", Owner("pausing", "tests", "0")),
                  DataConfig(resolution=RES, min_episode_frames=FRAMES), tmp_path / "ds", log=lambda *_: None)
    index = EpisodeIndex.open(tmp_path / "ds")
    world = known_world(obeys_actions=False)  # its rollouts drift: not exact, even where nothing moved
    result = evaluate(world, index, windows=30, per_window=True)
    world_psnr = torch.tensor(result["per_window"]["dynamics_psnr_at_t_db"]["4"])
    still = torch.tensor(result["per_window"]["copy_prompt_psnr_at_t_db"]["4"])
    exact = still >= 100.0
    assert 0 < int(exact.sum()) < 30 and result["copy_prompt_exact_at_t"]["4"] == int(exact.sum())
    inexact = result["dynamics_minus_copy_prompt_inexact_at_t_db"]["4"]
    assert inexact["n"] == 30 - int(exact.sum())
    assert inexact["mean"] == pytest.approx((world_psnr - still)[~exact].mean().item())
    everything = result["dynamics_minus_copy_prompt_at_t_db"]["4"]["mean"]
    assert everything == pytest.approx((world_psnr - still).mean().item()) and everything < inexact["mean"]


def test_latent_actions_are_scored_on_classes_of_true_actions_too(levels):
    """With the footage's classes of actions that do the same thing, latent actions are scored against the classes
    as well; a latent action that names the class exactly maps onto it without error."""
    assert evaluate(known_world(True), levels)["actions_vs_true_classes"] is None  # this source declares none
    index = EpisodeIndex.open(levels.root)
    index.manifest["action_classes"] = ["EVEN", "ODD", "EVEN", "ODD"]
    result = evaluate(known_world(True), index)
    classes = result["actions_vs_true_classes"]
    assert classes["classes"] == ["EVEN", "ODD"] and classes["mapping_accuracy"] == 1.0
    assert 0 < classes["nmi"] < result["actions_vs_true"]["nmi"] == pytest.approx(1.0)


def test_overlapping_windows_are_flagged(levels):
    """More windows than the split holds apart share frames: their interval would be too narrow."""
    assert evaluate(known_world(True), levels, windows=60)["windows_overlap"]


def test_rollouts_longer_than_the_action_model_reads_are_refused(levels):
    with pytest.raises(Exception, match="trained on 6: lower --horizon or --t to at most 5"):
        evaluate(known_world(True), levels, horizon=6)


# ------------------------------------------------------------------------------------------------ genie eval


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "smoke"
    assert main(["run", SMOKE, "run.trackers=none", "--out", str(out)]) == 0
    return out


def test_eval_writes_results_and_reproduces_the_report(smoke_run, capsys):
    assert main(["eval", str(smoke_run / "dynamics")]) == 0  # a folder inside the run is enough
    captured = capsys.readouterr()
    printed = captured.out
    assert "| dtPSNR t=4 (dB) |" in printed and "| latent vs true actions NMI |" in printed
    assert "eval tokenizer" in captured.err and "eval world" in captured.err  # progress bars, not silence
    folder = smoke_run / "eval"
    for name in ("eval.json", "eval.md", "fidelity_by_step.png", "actions.png"):
        assert (folder / name).is_file(), name
    result = json.loads((folder / "eval.json").read_text())
    report = json.loads((smoke_run / "report.json").read_text())
    # the run's own [eval] settings by default: the same windows and seeds as the report stage
    assert result["tokenizer_psnr_db"] == report["tokenizer_psnr_db"]
    assert result["dtpsnr_db"]["4"] == report["dtpsnr_t4_db"]
    assert result["actions_vs_true"]["transitions"] > 0  # procgen footage carries the true actions
    # the mapping as a table of true actions by name, not a bare list
    names = json.loads((smoke_run / "data" / "manifest.json").read_text())["action_names"]
    text = (folder / "eval.md").read_text()
    assert "| latent action | transitions | true action it maps to |" in text
    assert not re.search(r"\[\d+(, \d+)*\]", text)
    assert f"| 0 | {result['lam_usage'][0]} | {names[result['actions_vs_true']['latent_to_real'][0]]} (" in text
    assert len(result["dynamics_psnr_by_step_db"]) == result["horizon"] == 5


def test_eval_with_fvd_and_other_t(smoke_run, tmp_path):
    from genie_core.eval.fvd import InceptionI3d

    torch.manual_seed(0)
    weights = tmp_path / "i3d.pt"
    torch.save(InceptionI3d().state_dict(), weights)
    out = tmp_path / "with-fvd"
    assert main(["eval", str(smoke_run), "--i3d", str(weights), "--fvd-size", "32", "--t", "1,3",
                 "--windows", "4", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["dtpsnr_db"]) == {"1", "3"} and result["dtpsnr_db"]["1"]["n"] == 4
    fvd = result["fvd"]  # its value is checked in test_fvd.py; here: the path from a run to the number
    assert fvd["videos"] == 4 and fvd["frames"] == 6 and fvd["i3d_format"] == "state_dict" and fvd["size"] == 32
    assert abs(fvd["value"]) < float("inf")
    assert not (smoke_run / "eval.tmp").exists()


def test_several_runs_are_compared_on_the_same_windows(smoke_run, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(smoke_run, twin, ignore=shutil.ignore_patterns("eval"))
    out = tmp_path / "comparison"
    assert main(["eval", str(smoke_run), str(twin), "--windows", "2", "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| metric | smoke | twin |" in table and (out / "comparison.png").is_file()
    both = json.loads((out / "comparison.json").read_text())
    assert both["smoke"]["dtpsnr_db"] == both["twin"]["dtpsnr_db"]  # same weights, same windows, same seeds
    assert (twin / "eval" / "eval.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--i3d", "missing.pt"], "missing.pt: no such file"),
    (["--t", "9"], "lower --horizon or --t to at most 5"),
    (["--split", "test"], "no split 'test'; splits: train, val"),
])
def test_bad_eval_input_is_one_clear_line(smoke_run, capsys, args, message):
    assert main(["eval", str(smoke_run), "--windows", "2", *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_to_replace_a_folder_that_is_not_an_evaluation(smoke_run, tmp_path, capsys):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(["eval", str(smoke_run), "--windows", "2", "--out", str(keep)]) == 2
    assert "holds something other than an evaluation" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run (no recipe.json or dynamics/components.json in it or above it)" in capsys.readouterr().err

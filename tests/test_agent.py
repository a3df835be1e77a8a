"""Agents from unlabeled video: `genie agent RUN` on a tiny run over a scripted expert's footage (Breakout, CoinRun)
labels it with the run's latent actions, clones through them and on the true actions, maps latent to real actions
with N labels, and scores every agent in the real game on seeds (levels) the footage never used."""

from __future__ import annotations

import json
import shutil

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from genie_core.agent.cloning import CloningData, Footage, PolicyNet, fit_latent_to_real
from genie_core.cli import main
from genie_core.config import AgentConfig
from genie_core.data.footage import EpisodeIndex
from genie_core.errors import RecipeError
from genie_core.recipe import load_recipe
from genie_core.run.folder import RunFolder

from conftest import REPO

SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")
BREAKOUT = ["source.name=atari", "source.game=Breakout", "source.policy=breakout-ram-expert",
            "source.train_episodes=3", "source.val_episodes=1", "source.max_steps_per_episode=60", "run.trackers=none"]
COINRUN = ["source.policy=coinrun-lookahead-expert", "source.train_levels=4", "source.val_levels=1",
           "source.steps_per_level=60", "run.trackers=none",  # and what `genie agent` does, from the recipe:
           "agent.labels=[5, 50]", "agent.episodes=2", "agent.max_steps=40", "agent.steps=6"]
AGENT_FLAGS = {"breakout": ["--labels", "5,50", "--episodes", "2", "--max-steps", "40", "--steps", "6"],
               "coinrun": []}


@pytest.fixture(scope="module")
def breakout_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("agent") / "breakout"
    assert main(["run", SMOKE, *BREAKOUT, "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def coinrun_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("agent") / "coinrun"
    assert main(["run", SMOKE, *COINRUN, "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize(("game", "expert"), [("breakout", "breakout-ram-expert"),
                                               ("coinrun", "coinrun-lookahead-expert")])
def test_agent_scores_every_player_on_unseen_seeds(game, expert, request, capsys):
    run = request.getfixturevalue(f"{game}_run")
    assert main(["agent", str(run), *AGENT_FLAGS[game]]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "agent" / "agent.json").read_text())
    index = EpisodeIndex.open(RunFolder.find(run).data)
    taken = np.concatenate([actions for _, actions in index.episode_arrays("train")])
    commonest = index.manifest["action_names"][np.bincount(taken[taken >= 0]).argmax()]
    always = f"always {commonest} (the footage's most frequent action)"
    for name in ("random", always, f"expert ({expert})", "oracle cloning (every true action)",
                 "latent cloning, 5 labels", "latent cloning, 50 labels"):
        assert f"{name}: " in out
    assert all(len(r["scores"]) == 2 for r in report["results"].values())
    assert report["settings"] == {**attrs.asdict(AgentConfig()), "labels": [5, 50], "episodes": 2, "max_steps": 40,
                                  "steps": 6}  # the flags, or the recipe's [agent] table
    assert 0 <= report["latent_vs_true"]["nmi"] <= 1
    assert (run / "agent" / "scores.png").stat().st_size > 0
    with Image.open(run / "agent" / "episode.gif") as gif:
        assert 2 <= gif.n_frames <= 41  # the watched episode: its prompt screen and up to 40 steps
    assert "| latent cloning, 50 labels |" in (run / "agent" / "agent.md").read_text()
    assert not list((run / "checkpoints").glob("agent-*/step-*"))  # gone once trained


def test_agent_refuses_seen_seeds_more_labels_than_recorded_and_footage_of_no_policy(breakout_run, played_run, capsys):
    assert main(["agent", str(breakout_run), "--first-seed", "2", "--steps", "2"]) == 2
    assert "the footage was played from seeds 0..3; score on seeds it never used (from 4 on)" in \
        capsys.readouterr().err
    assert main(["agent", str(breakout_run), "--labels", "20,100000", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "agent labels 100000: the training footage has " in err and " transitions with a recorded action" in err
    assert main(["agent", str(breakout_run), "--first-seed", "-5"]) == 2
    assert "genie agent: 'first_seed' must be >= 0: -5" in capsys.readouterr().err
    assert main(["agent", str(played_run)]) == 2  # procgen footage of the random player, which is no policy
    assert "its footage is played by the random player of action_repeat and action_choice, not a registered " \
        "policy; set source.policy" in capsys.readouterr().err


def test_agent_clones_from_other_footage_with_the_runs_latent_actions(coinrun_run, breakout_run, capsys):
    """--footage DATA: another data set's expert, labelled by this run's latent action model and scored in DATA's
    game (the paper labels expert videos with a latent action model trained on other footage)."""
    expert_data = RunFolder.find(breakout_run).data
    args = ["agent", str(coinrun_run), "--footage", str(expert_data), *AGENT_FLAGS["breakout"]]
    assert main(args) == 0
    assert "expert (breakout-ram-expert): " in capsys.readouterr().out
    out = coinrun_run / f"agent-on-{expert_data.parent.name}-{expert_data.name}"
    report = json.loads((out / "agent.json").read_text())
    assert report["game"] == "Breakout" and report["footage"] == str(expert_data)
    assert report["run"] == str(coinrun_run) and (out / "episode.gif").is_file()
    assert main(["agent", str(coinrun_run), "--footage", str(coinrun_run / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_agent_refuses_footage_that_records_no_actions(breakout_run, tmp_path, capsys):
    copy = tmp_path / "no-actions"
    shutil.copytree(breakout_run, copy, ignore=shutil.ignore_patterns("agent"))
    data = RunFolder.find(copy).data
    for path in data.rglob("*actions*.npy"):  # the copy's footage, as a source without actions would have stored it
        np.save(path, np.full_like(np.load(path), -1))
    assert main(["agent", str(copy), "--steps", "2"]) == 2
    assert "its training footage records no actions; the oracle and the latent -> real map need the true actions" \
        in capsys.readouterr().err


def test_the_agent_table_is_checked_with_the_recipe():
    with pytest.raises(RecipeError) as error:
        load_recipe(SMOKE, ["agent.labels=[20, 0]", "agent.greedy=true"])
    assert str(error.value).count("\n") == 1  # one line per problem
    assert "[agent]: key 'labels': 'labels' must be a non-empty list of positive integers, such as [20, 200]" in \
        str(error.value)
    assert "[agent]: unknown key 'greedy'; valid keys: labels, episodes, first_seed" in str(error.value)
    assert load_recipe(SMOKE, ["agent.labels=[7]"]).agent.labels == (7,)


def test_the_latent_map_takes_each_latent_action_to_its_most_frequent_real_one():
    latent = [np.array([0, 0, 1, 1, 2, 2, 0, 1])]
    real = [np.array([3, 3, 1, 1, 1, 2, 3, 0])]
    footage = Footage(frames=[np.zeros((9, 8, 8, 3), np.uint8)], true_actions=real, latent_actions=latent)
    mapping = fit_latent_to_real(footage, labels=8, num_latent=4)
    assert mapping[:3].tolist() == [3, 1, 1] and mapping[3] == 1  # unseen latent 3: the most frequent real action


def test_cloning_inputs_repeat_the_first_frame_before_an_episode_starts():
    frames = np.stack([np.full((64, 64, 3), k, np.uint8) for k in range(4)])
    footage = Footage(frames=[frames], true_actions=[np.array([0, 1, 2])], latent_actions=[np.array([1, 1, 0])])
    data = CloningData(footage, footage.latent_actions, context=2)
    first, target = data[0]
    assert first.shape == (6, 64, 64) and int(target) == 1
    assert torch.equal(first[:3], first[3:])  # frame 0 stands for the frame before it
    assert PolicyNet(2, 4, 64)(first[None]).shape == (1, 4)

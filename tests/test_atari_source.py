"""The Atari source (plugins/atari_source.py): splits, episodes, determinism, a full build and read-back, bad games."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from genie_core.cli import main
from genie_core.config import DataConfig
from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, source_identity
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec
from genie_core.registry import Owner
from genie_plugins.atari_source import AtariConfig, AtariSource, games, genie_register_components

RES = 32


def make(**changes) -> AtariSource:
    return AtariSource(attrs.evolve(AtariSource.tiny_config(), **changes), DataSpec(resolution=RES))


@pytest.fixture(scope="module")
def source() -> AtariSource:
    return make()


@pytest.fixture(scope="module")
def recorded(source) -> dict[str, list]:
    return {unit: list(source.record(unit)) for units in source.units().values() for unit in units}


def test_registers_as_atari():
    added = {}

    class Registrar:
        def add_source(self, name, cls):
            added[name] = cls

    genie_register_components(Registrar())
    assert added == {"atari": AtariSource}


def test_units_split_disjointly(source):
    c = source.config
    units = source.units()
    assert units == {"train": [f"episode-{i}" for i in range(c.train_episodes)],
                     "val": [f"episode-{c.train_episodes + i}" for i in range(c.val_episodes)]}
    assert not set(units["train"]) & set(units["val"])


def test_episodes_have_the_data_shape_and_actions(source, recorded):
    n_actions = int(source.make_env().action_space.n)
    for unit, episodes in recorded.items():
        assert len(episodes) == 1
        episode = episodes[0]
        frames, actions = np.asarray(episode.frames), np.asarray(episode.actions)
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[1:] == (RES, RES, 3)
        # Pong lasts far longer than the tiny cap, so each episode is cut at max_steps_per_episode steps
        assert len(frames) == source.config.max_steps_per_episode + 1
        assert actions.dtype == np.int16 and actions.shape == (len(frames),)
        assert actions[-1] == -1
        assert ((actions[:-1] >= 0) & (actions[:-1] < n_actions)).all()
        assert frames.std() > 0  # a real screen, not a blank one
        assert episode.meta == {"game": "Pong", "seed": int(unit.removeprefix("episode-")), "policy": "random",
                                "score": 0.0}  # (no point is scored in so few steps)
    seeds = [recorded[u][0].actions for u in recorded]
    assert not np.array_equal(seeds[0], seeds[1])  # each seed draws its own actions


def test_recording_is_deterministic_whatever_the_order(recorded):
    fresh = make()
    later = list(fresh.record("episode-1"))[0]  # played first this time, on a new source
    again = list(fresh.record("episode-0"))[0]  # then played after another episode on the same emulator
    for unit, episode in (("episode-1", later), ("episode-0", again)):
        assert np.array_equal(episode.frames, recorded[unit][0].frames)
        assert np.array_equal(episode.actions, recorded[unit][0].actions)
        assert episode.meta == recorded[unit][0].meta


def test_build_and_read_back_round_trip(source, recorded, tmp_path):
    identity = source_identity(source, "atari", Owner("test", "test", "0"))
    cfg = DataConfig(resolution=RES, min_episode_frames=2, shard_frames=20)  # one shard per episode
    manifest = build_dataset(source, identity, cfg, tmp_path / "data", log=lambda *_: None)
    length = source.config.max_steps_per_episode + 1
    assert manifest["frames"] == length * len(recorded)
    assert manifest["source"]["config"]["game"] == "Pong"
    index = EpisodeIndex.open(tmp_path / "data", verify=True)
    for split, units in source.units().items():
        data = WindowDataset(index, split, length)  # one window: the whole episode
        assert len(data) == len(units)
        for i, unit in enumerate(units):
            episode = recorded[unit][0]
            window = data[i]  # [T, C, H, W] float in [0, 1]
            back = (window.permute(0, 2, 3, 1) * 255).round().byte().numpy()
            assert np.array_equal(back, episode.frames)
            assert np.array_equal(data.actions(i).numpy(), episode.actions[:-1])
            shard, first = data.locate(i)
            stored = np.load(index.shard_path(shard, "actions"))[first: first + length]
            assert np.array_equal(stored, episode.actions)


def test_other_options_reach_the_emulator():
    source = make(game="Breakout", frame_skip=2, full_action_space=True, max_steps_per_episode=5)
    assert source.make_env().action_space.n == 18
    episode = list(source.record("episode-0"))[0]
    assert episode.frames.shape == (6, RES, RES, 3) and episode.meta["game"] == "Breakout"


def test_unknown_game_is_a_clear_error():
    with pytest.raises(GenieError, match=r"'Pongg'.*did you mean 'Pong'.*games: .*Breakout"):
        list(make(game="Pongg").record("episode-0"))
    problems = AtariSource.check_recipe(AtariConfig(game="mspacman"), data=None, train=None)
    assert len(problems) == 1 and "'mspacman'" in problems[0] and "'MsPacman'" in problems[0]
    assert AtariSource.check_recipe(AtariConfig(game="Pong"), data=None, train=None) == []
    assert {"Pong", "Breakout", "MsPacman", "SpaceInvaders"} <= set(games())


@pytest.mark.parametrize("bad", [{"frame_skip": 0}, {"repeat_action_probability": 1.5}, {"train_episodes": 0},
                                 {"val_episodes": -1}, {"max_steps_per_episode": 0}])
def test_config_validators(bad):
    with pytest.raises(ValueError):
        AtariConfig(**bad)


def test_an_episode_ends_when_the_game_ends():
    source = make(max_steps_per_episode=5000)  # a random Pong player loses 21-0 in about a thousand steps
    episode = list(source.record("episode-0"))[0]
    assert 2 <= len(episode.frames) < 5001
    assert episode.actions[-1] == -1 and (episode.actions[:-1] >= 0).all()


def test_a_scripted_expert_plays_breakout_far_better_than_random():
    """`policy = "breakout-ram-expert"` keeps the paddle under the ball; the footage records every episode's score."""
    scores = {}
    for policy in ("random", "breakout-ram-expert"):
        config = AtariConfig(game="Breakout", train_episodes=3, val_episodes=1, max_steps_per_episode=600,
                             policy=policy)
        source = AtariSource(config, DataSpec(resolution=RES))
        scores[policy] = [source.record(unit)[0].meta["score"] for unit in source.units()["train"]]
    assert min(scores["breakout-ram-expert"]) > 5 * max(max(scores["random"]), 1), scores


def test_a_policy_is_checked_by_name_and_game(capsys):
    assert AtariSource.check_recipe(AtariConfig(game="Pong", policy="breakout-ram-expert"), None, None) == [
        "'policy' 'breakout-ram-expert' plays Breakout, not 'Pong'"]
    problem, = AtariSource.check_recipe(AtariConfig(game="Breakout", policy="ace"), None, None)
    assert problem.startswith("'policy': unknown policy 'ace'; registered policy names: ") and "random" in problem
    assert main(["data", "build", "atari", "game=Pong", "policy=breakout-ram-expert", "--out", "x"]) == 2
    assert "plays Breakout, not 'Pong'" in capsys.readouterr().err


def test_expert_footage_keeps_its_scores(tmp_path, capsys):
    out = tmp_path / "breakout"
    assert main(["data", "build", "atari", "game=Breakout", "policy=breakout-ram-expert", "train_episodes=2",
                 "val_episodes=1", "max_steps_per_episode=300", "data.resolution=32", "--out", str(out)]) == 0
    episodes = EpisodeIndex.open(out).manifest["episodes"]
    assert {e["meta"]["policy"] for e in episodes} == {"breakout-ram-expert"}
    assert all(e["meta"]["score"] > 0 for e in episodes)  # the expert scores within 300 steps
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    assert "  train score (breakout-ram-expert): mean " in capsys.readouterr().out

"""Procgen footage played by a registered policy (`source.policy`): one episode per level with its score, the game's
look-ahead a scripted expert reads, the CoinRun expert against random play, and the recipe checks."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from genie_core.config import DataConfig
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec, Policy
from genie_core.registry import get_registry

RIGHT = 7  # procgen's RIGHT, in its 15 button combinations


def procgen_source(**options):
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), backgrounds=False, restrict_themes=True, **options)
    return info.cls(config, DataSpec(resolution=32))


class Peeking(Policy):
    """Runs right, but looks ahead (and back) in the game before every step: the game must not notice."""

    config_class = attrs.make_class("PeekingConfig", {}, frozen=True)

    def reset(self, seed):  # noqa: ARG002 - the Policy signature
        self.tries = []

    def act(self, observation, info):  # noqa: ARG002 - the Policy signature
        game = info["game"]
        before = game.agent_position()
        self.tries.append((before, game.try_actions([RIGHT] * 6)))
        assert game.agent_position() == before
        return RIGHT


def test_a_policy_plays_one_episode_per_level_and_keeps_its_score():
    source = procgen_source(policy="coinrun-lookahead-expert", train_levels=3, steps_per_level=300)
    assert source.units()["train"] == ["level-0", "level-1", "level-2"]
    assert source.footage_seeds() == range(0, 4)
    for unit in ("level-0", "level-1"):
        episode, = source.record(unit)
        assert episode.meta == {"level": int(unit[6:]), "policy": "coinrun-lookahead-expert",
                                "score": episode.meta["score"]}
        assert episode.frames.shape[1:] == (32, 32, 3) and len(episode.actions) == len(episode.frames)
        assert episode.actions[-1] == -1 and 0 <= episode.actions[:-1].min() and episode.actions[:-1].max() < 15
        again, = source.record(unit)
        assert np.array_equal(episode.frames, again.frames) and np.array_equal(episode.actions, again.actions)


def test_an_episode_shows_one_frame_more_than_its_actions_unless_the_game_ended_it():
    source = procgen_source(policy="random")
    frames, actions, score = source.play(100_000, source.policy(), max_steps=5)
    assert (len(frames), len(actions), score) == (6, 5, 0.0)  # cut after 5 steps: the frame they led to is shown
    frames, actions, score = source.play(100_000, source.policy(), max_steps=1000)
    assert len(frames) == len(actions) < 1000  # the game ended it (CoinRun ends a life at its first mistake)
    none, same_actions, same_score = source.play(100_000, source.policy(), keep_frames=False, max_steps=1000)
    assert none is None and (same_actions, same_score) == (actions, score)


def test_looking_ahead_leaves_the_game_as_it_was():
    source = procgen_source(policy="random")
    peeking = Peeking(Peeking.config_class(), source.policy().spec)
    peeked = source.play(3, peeking, max_steps=30)
    assert [a for a in peeked[1]] == [RIGHT] * len(peeked[1])
    running = source.play(3, FixedRight(FixedRight.config_class(), source.policy().spec), max_steps=30)
    assert np.array_equal(peeked[0], running[0]) and peeked[2] == running[2]  # the same episode, frame for frame
    (start, outcome), (later, _) = peeking.tries[0], peeking.tries[3]
    assert later[0] > start[0]  # running right moves the agent right, in tiles
    reward, ended, position = outcome
    assert reward == 0 and not ended and position[0] > later[0]  # as far as 6 steps of it would


class FixedRight(Peeking):
    def act(self, observation, info):  # noqa: ARG002 - the Policy signature
        return RIGHT


def test_the_lookahead_expert_reaches_the_coin_far_more_often_than_random_play():
    source = procgen_source(policy="coinrun-lookahead-expert", steps_per_level=1000)
    random = get_registry().get("policy", "random")
    players = {"expert": source.policy(), "random": random.cls(random.cls.config_class(), source.policy().spec)}
    solved = {name: sum(source.play(seed, player, keep_frames=False)[2] > 0 for seed in range(100_000, 100_010))
              for name, player in players.items()}
    assert solved["expert"] >= 7 and solved["expert"] >= solved["random"] + 4, solved


@pytest.mark.parametrize(("options", "problem"), [
    ({"action_repeat": 4}, "'action_repeat' is the random player's; with 'policy' 'coinrun-lookahead-expert' the "
                           "policy chooses every action"),
    ({"action_choice": "classes", "unstick_after": 2}, "'action_choice' is the random player's"),
    ({"policy": "breakout-ram-expert"}, "'policy' 'breakout-ram-expert' plays Breakout, not 'coinrun'"),
    ({"policy": "nobody"}, "'policy': unknown policy 'nobody'; registered policy names: breakout-ram-expert, "
                           "coinrun-lookahead-expert, random"),
])
def test_a_policy_is_checked_with_the_recipe(options, problem):
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), **{"policy": "coinrun-lookahead-expert", **options})
    found, = info.cls.check_recipe(config, DataConfig(), None)
    assert found.startswith(problem), found


def test_the_random_player_is_no_registered_policy():
    with pytest.raises(GenieError, match="source procgen: its footage is played by the random player of "
                                         "action_repeat and action_choice, not a registered policy; set "
                                         "source.policy"):
        procgen_source().policy()

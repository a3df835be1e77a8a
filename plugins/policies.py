"""Policies that play games for footage: a random player for any game, and a scripted Breakout expert that reads the
console's RAM to keep its paddle under the ball (the expert footage behavioural cloning learns from).

Both draw their randomness from the episode's seed alone (`reset`), so an episode's footage is the same whatever
order episodes are played in.
"""

from __future__ import annotations

import attrs
import numpy as np
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import unit_interval
from genie_core.errors import GenieError
from genie_core.interfaces import Policy


@attrs.define(frozen=True, kw_only=True)
class RandomPolicyConfig:
    pass


class RandomPolicy(Policy):
    """Each action drawn uniformly from the game's, with `np.random.default_rng(seed)` per episode."""

    config_class = RandomPolicyConfig

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observation, info) -> int:  # noqa: ARG002 - the Policy signature
        return int(self.rng.integers(self.spec.num_actions))


# Breakout's RAM (the Atari 2600 has 128 bytes): where the ball and the paddle are, in the game's own coordinates.
BREAKOUT_BALL_X, BREAKOUT_BALL_Y, BREAKOUT_PADDLE_X = 99, 101, 72


@attrs.define(frozen=True, kw_only=True)
class BreakoutExpertConfig:
    # The paddle's centre sits this far right of its RAM position; 8 scored best of 6..10 over 20 episodes (about
    # 47 points against 1 for random play, episodes of 2,000 steps).
    paddle_offset: int = attrs.field(default=8, validator=v.instance_of(int))
    dead_zone: int = attrs.field(default=2, validator=v.ge(0))  # no move while the ball is this close to the centre
    # A share of random actions, so that episodes differ (the emulator is deterministic) and the footage shows what
    # every action does, as expert footage of people does.
    epsilon: float = attrs.field(default=0.1, validator=unit_interval)


class BreakoutExpert(Policy):
    """Keeps the paddle under the ball by reading the RAM; serves (FIRE) whenever no ball is in play."""

    config_class = BreakoutExpertConfig
    games = ("Breakout",)

    def __init__(self, config: BreakoutExpertConfig, spec):
        super().__init__(config, spec)
        names = list(spec.action_names)
        missing = {"NOOP", "FIRE", "RIGHT", "LEFT"} - set(names)
        if missing:
            raise GenieError(f"policy breakout-ram-expert needs the actions NOOP, FIRE, RIGHT and LEFT; this game's "
                             f"are {', '.join(names) or '(unnamed)'}")
        self.noop, self.fire, self.right, self.left = (names.index(n) for n in ("NOOP", "FIRE", "RIGHT", "LEFT"))

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observation, info) -> int:  # noqa: ARG002 - the Policy signature
        c = self.config
        if self.rng.random() < c.epsilon:
            return int(self.rng.integers(self.spec.num_actions))
        ram = info["ram"]
        ball_x, ball_y, paddle = int(ram[BREAKOUT_BALL_X]), int(ram[BREAKOUT_BALL_Y]), int(ram[BREAKOUT_PADDLE_X])
        if ball_y == 0:  # no ball in play
            return self.fire
        gap = ball_x - (paddle + c.paddle_offset)
        return self.right if gap > c.dead_zone else self.left if gap < -c.dead_zone else self.noop


@hookimpl
def genie_register_components(registrar):
    registrar.add_policy("random", RandomPolicy)
    registrar.add_policy("breakout-ram-expert", BreakoutExpert)

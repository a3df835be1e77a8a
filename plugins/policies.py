"""Policies that play games for footage: a random player for any game, and scripted experts (the expert footage
behavioural cloning learns from): one for Breakout that reads the console's RAM to keep its paddle under the ball,
one for CoinRun that looks ahead in the game itself.

All draw their randomness from the episode's seed alone (`reset`), so an episode's footage is the same whatever
order episodes are played in.
"""

from __future__ import annotations

import attrs
import numpy as np
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import unit_interval
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec, Policy, PolicySpec


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


@attrs.define(frozen=True, kw_only=True)
class CoinRunExpertConfig:
    # Steps a chosen move is held before the next look-ahead, and steps each look-ahead plays. Without random
    # actions, these reach the coin in 37 of 40 hard levels (seeds 100,000 on): random play in 9, always jumping
    # right in 23, always running right in none.
    hold: int = attrs.field(default=4, validator=v.ge(1))
    horizon: int = attrs.field(default=16, validator=v.ge(1))
    epsilon: float = attrs.field(default=0.1, validator=unit_interval)  # a share of random actions, as above


# The moves the CoinRun expert weighs, in the order it prefers them when they do equally well.
COINRUN_MOVES = ("RIGHT", "RIGHT+UP", "NOOP", "LEFT", "LEFT+UP")
REACHED_COIN, DIED = 1000.0, -1000.0  # a look-ahead's value, beside the tiles it gained rightwards otherwise


class CoinRunExpert(Policy):
    """Looks ahead in CoinRun itself (procgen's state, `info["game"]`): every `hold` steps it plays each move held
    for `hold` steps, then running or jumping right up to `horizon` steps, and takes the move whose better
    continuation reaches the coin, or else takes the agent furthest right without dying. Ties go to the earlier
    move in COINRUN_MOVES, so it runs unless a jump, a wait or a step back does better."""

    config_class = CoinRunExpertConfig
    games = ("coinrun",)

    def __init__(self, config: CoinRunExpertConfig, spec):
        super().__init__(config, spec)
        names = list(spec.action_names)
        missing = [n for n in COINRUN_MOVES if n not in names]
        if missing:
            raise GenieError(f"policy coinrun-lookahead-expert needs the actions {', '.join(COINRUN_MOVES)}; this "
                             f"game's are {', '.join(names) or '(unnamed)'}")
        self.moves = [names.index(n) for n in COINRUN_MOVES]

    @classmethod
    def contract_inputs(cls, steps: int):
        """CoinRun's level 0 at its start, and the game to look ahead in (looking ahead leaves it there)."""
        from genie_plugins import procgen_source as procgen

        env = procgen.ProcgenSource(procgen.ProcgenConfig(), DataSpec(resolution=64)).make_env(0, 1)
        screen = env.observe()[1]["rgb"][0]
        spec = PolicySpec(game="coinrun", num_actions=len(procgen.ACTION_NAMES), action_names=procgen.ACTION_NAMES)
        return spec, [(screen, {"level": 0, "game": procgen.Lookahead(env)})] * steps

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.held, self.steps_left = self.moves[0], 0

    def act(self, observation, info) -> int:  # noqa: ARG002 - the Policy signature
        c = self.config
        if self.steps_left == 0:
            self.held, self.steps_left = self.best_move(info["game"]), c.hold
        self.steps_left -= 1
        if self.rng.random() < c.epsilon:
            return int(self.rng.integers(self.spec.num_actions))
        return self.held

    def best_move(self, game) -> int:
        c = self.config
        start = game.agent_position()[0]
        best, best_value = self.moves[0], -np.inf
        for move in self.moves:
            value = max(self.value(game.try_actions([move] * c.hold + [then] * (c.horizon - c.hold)), start)
                        for then in self.moves[:2])
            if value > best_value + 1e-6:
                best, best_value = move, value
        return best

    @staticmethod
    def value(outcome, start: float) -> float:
        reward, ended, position = outcome
        if ended:
            return REACHED_COIN if reward > 0 else DIED
        return position[0] - start


@hookimpl
def genie_register_components(registrar):
    registrar.add_policy("random", RandomPolicy)
    registrar.add_policy("breakout-ram-expert", BreakoutExpert)
    registrar.add_policy("coinrun-lookahead-expert", CoinRunExpert)

"""Atari 2600 games (Pong and the other ALE games), through ale-py and gymnasium, played by a registered policy:
`random` (each action drawn uniformly) by default, or an expert such as `breakout-ram-expert`.

A unit is one episode: "episode-N" is played from `env.reset(seed=N)` by the policy reset with seed N, so a unit's
footage is the same whatever order units are built in. Training episodes are seeds [0, train_episodes); validation
episodes are the next val_episodes seeds. Each episode's score (the sum of the game's rewards) is kept in its meta.

Frames are the RGB screen (210x160), resized whole (no crop) to the data resolution. The episode holds the screen
after reset and after every step; actions[t] is the action that turned frame t into frame t + 1 (-1 after the last
frame). An episode ends when the game ends (termination, truncation) or after max_steps_per_episode steps. The ROMs
ship with ale-py: nothing is downloaded.
"""

from __future__ import annotations

import difflib
import functools

import attrs
import numpy as np
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import positive, unit_interval
from genie_core.errors import GenieError
from genie_core.extras import missing_extra, require_extra
from genie_core.interfaces import Episode, Policy, PolicySpec, VideoSource
from genie_core.io.media import resize_frames
from genie_core.registry import make_policy, policy_problem

RESIZE_CHUNK = 256  # native frames held before resizing (a native frame is 100 KB)


@functools.cache
def gymnasium():
    """gymnasium with the ALE environments registered, and the emulator's start-up banner silenced."""
    require_extra("atari", "source 'atari'")
    import ale_py
    import gymnasium as module

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    module.register_envs(ale_py)
    return module


def env_id(game: str) -> str:
    return f"ALE/{game}-v5"


@functools.cache
def games() -> tuple[str, ...]:
    """The games whose ROMs ship with the installed ale-py, as named in environment ids ("Pong", "MsPacman")."""
    registry = gymnasium().registry
    return tuple(sorted(key[len("ALE/") : -len("-v5")] for key in registry
                        if key.startswith("ALE/") and key.endswith("-v5")))


def unknown_game(game: str) -> str | None:
    """None if `game` is an installed game, else a sentence naming it, the closest names and all valid ones."""
    names = games()
    if game in names:
        return None
    lowered = {name.lower(): name for name in names}
    key = game.lower().replace("_", "").replace("-", "").replace(" ", "")
    close = [lowered[key]] if key in lowered else []
    close += [lowered[m] for m in difflib.get_close_matches(key, list(lowered), n=3, cutoff=0.6)
              if lowered[m] not in close]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"'game' {game!r} is not an Atari game of ale-py; {hint}games: {', '.join(names)}"


@attrs.define(frozen=True, kw_only=True)
class AtariConfig:
    """Defaults: Pong with the standard frame skip of 4 and no sticky actions (a random policy then never repeats
    an action it did not draw)."""

    game: str = attrs.field(default="Pong", validator=v.instance_of(str))  # as in the environment id ALE/{game}-v5
    frame_skip: int = attrs.field(default=4, validator=positive)  # emulator frames per step (the action is held)
    repeat_action_probability: float = attrs.field(default=0.0, validator=unit_interval)  # sticky actions
    full_action_space: bool = False  # all 18 joystick actions instead of the game's minimal set
    train_episodes: int = attrs.field(default=1000, validator=positive)
    val_episodes: int = attrs.field(default=50, validator=positive)
    max_steps_per_episode: int = attrs.field(default=1000, validator=positive)  # at most this + 1 frames
    policy: str = attrs.field(default="random", validator=v.instance_of(str))  # a registered policy: who plays


class AtariSource(VideoSource):
    config_class = AtariConfig

    def __init__(self, config, spec):
        require_extra("atari", "source 'atari'")  # registering needs no ale-py; playing it does
        super().__init__(config, spec)

    @classmethod
    def tiny_config(cls):
        return AtariConfig(train_episodes=2, val_episodes=1, max_steps_per_episode=24)

    @staticmethod
    def check_recipe(config, data, train):  # noqa: ARG004 - the check_recipe signature
        if data is not None and data.path:  # footage built before is used as it is: ale-py need not be here
            return []
        missing = missing_extra("atari")
        if missing is not None:
            return [missing]
        problem = unknown_game(config.game) or policy_problem(config.policy, config.game)
        return [] if problem is None else [problem]

    def units(self):
        c = self.config
        return {"train": [f"episode-{i}" for i in range(c.train_episodes)],
                "val": [f"episode-{c.train_episodes + i}" for i in range(c.val_episodes)]}

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_env": None, "_policy": None}  # an emulator does not pickle; a copy makes its own

    def make_env(self):
        """The game's environment, made once per source: reset(seed=N) reloads the ROM and reseeds the emulator, so
        an episode does not depend on the ones played before it."""
        env = self.__dict__.get("_env")
        if env is None:
            c = self.config
            problem = unknown_game(c.game)
            if problem is not None:
                raise GenieError(f"source atari: {problem}")
            env = gymnasium().make(env_id(c.game), obs_type="rgb", frameskip=c.frame_skip,
                                   repeat_action_probability=c.repeat_action_probability,
                                   full_action_space=c.full_action_space)
            self.__dict__["_env"] = env
        return env

    def action_names(self):
        return list(self.make_env().unwrapped.get_action_meanings())  # NOOP, FIRE, UP, RIGHT, LEFT, DOWN, ...

    def policy(self) -> Policy:
        """The player, built once per source from its registered name (its default settings)."""
        policy = self.__dict__.get("_policy")
        if policy is None:
            c = self.config
            problem = policy_problem(c.policy, c.game)
            if problem is not None:
                raise GenieError(f"source atari: {problem}")
            spec = PolicySpec(game=c.game, num_actions=int(self.make_env().action_space.n),
                              action_names=tuple(self.action_names()))
            policy = self.__dict__["_policy"] = make_policy(c.policy, spec)
        return policy

    def record(self, unit):
        seed = int(unit.removeprefix("episode-"))
        frames, actions, score = self.play(seed, self.policy())
        acts = np.asarray(actions + [-1], dtype=np.int16)  # no action leads out of the last frame
        return [Episode(frames=frames, actions=acts,
                        meta={"game": self.config.game, "seed": seed, "policy": self.config.policy, "score": score})]

    def footage_seeds(self) -> range:
        return range(self.config.train_episodes + self.config.val_episodes)

    def play(self, seed: int, policy: Policy, keep_frames: bool = True,
             max_steps: int | None = None) -> tuple[np.ndarray | None, list[int], float]:
        """One episode from `env.reset(seed)` played by `policy` (reset with the same seed) for at most `max_steps`
        (None: max_steps_per_episode): its frames at the data resolution (None unless kept), its actions and its
        score (the sum of the game's rewards)."""
        env = self.make_env()
        policy.reset(seed)  # per episode: the same footage whatever order episodes are built in
        ale = env.unwrapped.ale
        obs, _ = env.reset(seed=seed)
        pending, resized, actions, score = [obs], [], [], 0.0
        for _ in range(max_steps or self.config.max_steps_per_episode):
            action = policy.act(obs, {"ram": ale.getRAM()})
            obs, reward, terminated, truncated, _ = env.step(action)
            score += float(reward)
            actions.append(action)
            if keep_frames:
                pending.append(obs)
                if len(pending) >= RESIZE_CHUNK:
                    resized.append(resize_frames(np.stack(pending), self.spec.resolution))
                    pending = []
            if terminated or truncated:
                break
        if keep_frames and pending:
            resized.append(resize_frames(np.stack(pending), self.spec.resolution))
        return (np.concatenate(resized) if keep_frames else None), actions, score


@hookimpl
def genie_register_components(registrar):
    registrar.add_source("atari", AtariSource)

"""Procgen games (CoinRun and the other 15) played by a uniformly random policy, as in the paper's Appendix F.

A unit is one level seed. Each level is played by `num_envs` environments stepped together in one vectorised call
for steps_per_level steps in all, each choosing a random action and holding it for `action_repeat` steps (1, the
paper's policy: a fresh action at every step). The action is drawn uniformly from the 15 button combinations (the
paper's `action_choice = "buttons"`), or from the classes of combinations that do different things (`"classes"`, for
the games in ACTION_CLASSES: in CoinRun left, right or neither, with or without a jump; then one combination of that
class), so the agent is not idle most of the time (8 of the 15 combinations do nothing in CoinRun); drawn by class,
the idle class can be held for fewer steps than the moves (`idle_repeat`), and a move given up once the frame has
stayed unchanged for a few steps (`unstick_after`: the agent pushes into a wall). Training levels are seeds
[first_level, first_level + train_levels); validation levels are the next val_levels seeds, never trained on.
procgen's rendering options pass through (`backgrounds`, `restrict_themes`, `monochrome_assets`, `center_agent`);
the defaults draw the games as the paper saw them.

With `policy` set to a registered policy (`coinrun-lookahead-expert`, or `random`: each step's combination drawn
uniformly), that policy plays instead: one episode per level, from the level's start until the game ends it or for
steps_per_level steps, with its score (the sum of the game's rewards; CoinRun's coin is worth 10) kept in the
episode's meta. Agents cloned from such footage are scored in the game on levels it never used. A policy reads the
screen and, in `info`, the level's seed ("level") and the game itself ("game", a `Lookahead`: where the agent is,
and what a few actions would lead to), a scripted expert's privilege as the console's RAM is for Atari.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct

import attrs
import numpy as np
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import positive
from genie_core.errors import GenieError
from genie_core.extras import missing_extra, require_extra
from genie_core.interfaces import Episode, Policy, PolicySpec, VideoSource
from genie_core.io.media import resize_frames
from genie_core.registry import make_policy, policy_problem

NATIVE_RESOLUTION = 64  # procgen renders 64x64 observations


def procgen():
    """The procgen module, imported quietly (gym, which it imports, prints a notice about its own age)."""
    require_extra("procgen", "source 'procgen'")
    with contextlib.redirect_stderr(io.StringIO()):
        import procgen as module
        from procgen.env import ENV_NAMES  # noqa: F401 - loads the game list along with the module
    return module


@attrs.define(frozen=True, kw_only=True)
class ProcgenConfig:
    """Defaults: the paper's CoinRun data set (10,000 levels x 1,000 steps, hard mode)."""

    game: str = "coinrun"
    distribution_mode: str = attrs.field(default="hard",
                                         validator=v.in_(("easy", "hard", "extreme", "memory", "exploration")))
    first_level: int = attrs.field(default=0, validator=v.ge(0))  # training levels: [first_level, + train_levels)
    train_levels: int = attrs.field(default=10_000, validator=positive)
    val_levels: int = attrs.field(default=100, validator=positive)
    steps_per_level: int = attrs.field(default=1000, validator=positive)
    num_envs: int = attrs.field(default=8, validator=positive)  # environments stepped together on each level
    # Steps each random action is held for. Procgen's physics changes speed a little per step, so a fresh action at
    # every step (1, the paper's) mostly jitters in place; held actions move the agent as the action says.
    action_repeat: int = attrs.field(default=1, validator=positive)
    action_choice: str = attrs.field(default="buttons", validator=v.in_(("buttons", "classes")))
    # With classes: steps the class that does nothing (NOOP) is held, when it should differ from action_repeat.
    # Moves held long show their buttons best, but NOOP held long freezes the agent (frames a still frame copies).
    idle_repeat: int | None = attrs.field(default=None, validator=v.optional(positive))
    # With classes: a held move is given up once the frame has not changed for this many steps (the agent pushes
    # into a wall), and the next one drawn, as a player turns away; None: every hold runs its length. Long holds show
    # their buttons best, but a move held against a wall freezes the footage.
    unstick_after: int | None = attrs.field(default=None, validator=v.optional(positive))
    # procgen's rendering options (the paper's: all defaults). Without the detailed backgrounds and with one visual
    # theme, the frames hold the agent, the level and little else: fewer details for a small tokenizer to spend its
    # codes on, and the agent's moves stand out instead of the background's texture.
    backgrounds: bool = True
    restrict_themes: bool = False
    monochrome_assets: bool = False
    center_agent: bool = True  # the view follows the agent; False shows the whole level (small at 64x64)
    # A registered policy plays the footage instead of the random player above: one episode per level, its score
    # kept. None: the random player.
    policy: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))


# The random player's options: with a policy, the policy chooses every action and these must stay at their defaults.
RANDOM_PLAYER_OPTIONS = ("action_repeat", "action_choice", "idle_repeat", "unstick_after")


class ProcgenSource(VideoSource):
    config_class = ProcgenConfig

    def __init__(self, config, spec):
        require_extra("procgen", "source 'procgen'")  # registering needs no procgen; playing it does
        super().__init__(config, spec)

    @classmethod
    def tiny_config(cls):
        return ProcgenConfig(train_levels=2, val_levels=1, steps_per_level=24, num_envs=2)

    @staticmethod
    def check_recipe(config, data, train):  # noqa: ARG004 - the check_recipe signature
        if data.path:  # footage built before is used as it is: this source is not run, procgen need not be here
            return []
        missing = missing_extra("procgen")
        if missing is not None:
            return [missing]
        names = procgen().env.ENV_NAMES
        if config.game not in names:
            return [f"'game' {config.game!r} is not a procgen game; games: {', '.join(names)}"]
        if config.policy is not None:
            defaults = ProcgenConfig()
            for key in RANDOM_PLAYER_OPTIONS:
                if getattr(config, key) != getattr(defaults, key):
                    return [f"'{key}' is the random player's; with 'policy' {config.policy!r} the policy chooses "
                            f"every action (drop '{key}', or 'policy' for the random player)"]
            problem = policy_problem(config.policy, config.game)
            return [] if problem is None else [problem]
        for key, why in (("idle_repeat", "which class does nothing is known only then"),
                         ("unstick_after", "it draws its holds by class")):
            if getattr(config, key) is not None and config.action_choice != "classes":
                return [f"'{key}' needs action_choice 'classes' ({why}); got action_choice {config.action_choice!r}"]
        if config.action_choice == "classes" and config.game not in ACTION_CLASSES:
            return [f"'action_choice' 'classes' needs to know which of {config.game}'s buttons do the same; it is "
                    f"known for {', '.join(ACTION_CLASSES)}; use 'buttons' for {config.game}"]
        return []

    def units(self):
        c = self.config
        first_val = c.first_level + c.train_levels
        return {"train": [f"level-{i}" for i in range(c.first_level, first_val)],
                "val": [f"level-{i}" for i in range(first_val, first_val + c.val_levels)]}

    def action_names(self):
        return list(ACTION_NAMES)

    def action_classes(self):
        classes = ACTION_CLASSES.get(self.config.game)
        return list(classes) if classes else None

    def make_env(self, level: int, num: int):
        c = self.config
        module = procgen()
        if c.game not in module.env.ENV_NAMES:  # procgen aborts the whole process on an unknown name: check first
            raise GenieError(f"source procgen: no game '{c.game}'; games: {', '.join(module.env.ENV_NAMES)}")
        return module.ProcgenGym3Env(num=num, env_name=c.game, distribution_mode=c.distribution_mode,
                                     start_level=level, num_levels=1, rand_seed=level,
                                     use_backgrounds=c.backgrounds, restrict_themes=c.restrict_themes,
                                     use_monochrome_assets=c.monochrome_assets, center_agent=c.center_agent)

    def __getstate__(self):
        return {**super().__getstate__(), "_policy": None}  # a copy builds its own player

    def policy(self) -> Policy:
        """The registered policy that plays the footage (`policy`), built once per source with its default settings."""
        policy = self.__dict__.get("_policy")
        if policy is None:
            c = self.config
            if c.policy is None:
                raise GenieError("source procgen: its footage is played by the random player of action_repeat and "
                                 "action_choice, not a registered policy; set source.policy (e.g. 'random', "
                                 "'coinrun-lookahead-expert') to play it with one")
            problem = policy_problem(c.policy, c.game)
            if problem is not None:
                raise GenieError(f"source procgen: {problem}")
            spec = PolicySpec(game=c.game, num_actions=len(ACTION_NAMES), action_names=ACTION_NAMES)
            policy = self.__dict__["_policy"] = make_policy(c.policy, spec)
        return policy

    def footage_seeds(self) -> range:
        c = self.config
        return range(c.first_level, c.first_level + c.train_levels + c.val_levels)

    def play(self, seed: int, policy: Policy, keep_frames: bool = True,
             max_steps: int | None = None) -> tuple[np.ndarray | None, list[int], float]:
        """One episode of level `seed`, from its start, played by `policy` (reset with the same seed) until the game
        ends it or for at most `max_steps` steps (None: steps_per_level): its frames at the data resolution (None
        unless kept), its actions and its score. The frame an ending action leads to is never shown (procgen starts
        the next episode at once), so then the frames are as many as the actions, else one more."""
        env, limit = self.make_env(seed, 1), max_steps or self.config.steps_per_level
        policy.reset(seed)
        lookahead = Lookahead(env)
        frames, actions, score = [], [], 0.0
        for step in range(limit + 1):
            reward, obs, first = env.observe()
            if step > 0:
                score += float(reward[0])
                if first[0]:  # the last action ended the episode
                    break
            if keep_frames:
                frames.append(obs["rgb"][0])
            if step == limit:
                break
            actions.append(int(policy.act(obs["rgb"][0], {"level": seed, "game": lookahead})))
            env.act(np.array(actions[-1:], dtype=np.int32))
        env.close()
        return (resize_frames(np.stack(frames), self.spec.resolution) if keep_frames else None), actions, score

    def record(self, unit):
        level = int(unit.removeprefix("level-"))
        c = self.config
        if c.policy is not None:
            frames, actions, score = self.play(level, self.policy())
            acts = np.asarray(actions[:len(frames) - 1] + [-1], dtype=np.int16)  # -1: nothing shown follows it
            return [Episode(frames=frames, actions=acts,
                            meta={"level": level, "policy": c.policy, "score": score})]
        num = min(c.num_envs, c.steps_per_level)
        steps = math.ceil(c.steps_per_level / num)
        env = self.make_env(level, num)
        rng = np.random.default_rng(level)  # per level: the same footage whatever order levels are built in
        # Step all environments together and keep whole steps; episodes are cut out afterwards, vectorised.
        frames = np.empty((steps, num, NATIVE_RESOLUTION, NATIVE_RESOLUTION, 3), dtype=np.uint8)
        firsts = np.empty((steps, num), dtype=bool)
        if c.unstick_after is None:
            actions = self.policy_actions(rng, steps, num, env.ac_space.eltype.n)
            choose = None
        else:  # the policy watches the frames: drawn step by step
            actions, choose = np.empty((steps, num), dtype=np.int16), self._unsticking_policy(rng, num)
        for step in range(steps):
            _, obs, first = env.observe()
            frames[step], firsts[step] = obs["rgb"], first
            if choose is not None:
                still = step > 0 and ~first & (frames[step] == frames[step - 1]).all(axis=(1, 2, 3))
                actions[step] = choose(np.broadcast_to(still, (num,)))
            env.act(actions[step])
        env.close()
        episodes = []
        for i in range(num):
            # a `first` flag at step s > 0 means the environment reset itself: its previous episode ended at s - 1
            cuts = np.flatnonzero(firsts[1:, i]) + 1
            for start, end in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [steps]])):
                acts = actions[start:end, i].copy()
                acts[-1] = -1  # the last action leads out of the episode
                episodes.append(Episode(frames=resize_frames(frames[start:end, i], self.spec.resolution),
                                        actions=acts, meta={"level": level, "env": i}))
        return episodes

    def policy_actions(self, rng: np.random.Generator, steps: int, num: int, buttons: int) -> np.ndarray:
        """The random policy's actions [steps, num] for one level."""
        c = self.config
        draws = (math.ceil(steps / c.action_repeat), num)
        if c.action_choice == "buttons":
            held = rng.integers(buttons, size=draws)
            return np.repeat(held, c.action_repeat, axis=0)[:steps].astype(np.int16)
        names, by_class, sizes, starts = self._class_table()
        if c.idle_repeat is None:
            chosen, pick = rng.integers(len(names), size=draws), rng.random(draws)
            held = by_class[starts[chosen] + (pick * sizes[chosen]).astype(int)]
            return np.repeat(held, c.action_repeat, axis=0)[:steps].astype(np.int16)
        # holds of two lengths: drawn one after another, each environment its own sequence
        actions = np.empty((steps, num), dtype=np.int16)
        for env in range(num):
            step, holds = 0, self._holds(rng)
            while step < steps:
                combination, hold = next(holds)
                actions[step:step + hold, env] = combination
                step += hold
        return actions

    def _class_table(self):
        """The game's classes of button combinations: their names, the combinations sorted by class (each class a
        run), the size of each class and where its run starts."""
        classes = self.action_classes()
        names = list(dict.fromkeys(classes))
        class_of = np.array([names.index(name) for name in classes])
        by_class, sizes = np.argsort(class_of, kind="stable"), np.bincount(class_of)
        return names, by_class, sizes, np.cumsum(sizes) - sizes

    def _holds(self, rng: np.random.Generator):
        """Endless (button combination, steps to hold it) draws for one environment, by class: a class, then one of
        its combinations; the idle class held idle_repeat steps (if set), the others action_repeat."""
        c = self.config
        names, by_class, sizes, starts = self._class_table()
        idle = names.index("NOOP")
        while True:
            chosen = int(rng.integers(len(names)))
            combination = by_class[starts[chosen] + int(rng.random() * sizes[chosen])]
            yield combination, (c.idle_repeat or c.action_repeat) if chosen == idle else c.action_repeat

    def _unsticking_policy(self, rng: np.random.Generator, num: int):
        """The class policy with holds given up after `unstick_after` steps of a frame that did not change:
        choose(still [num] bool: this step's frame equals the last) -> this step's actions [num]."""
        holds = [self._holds(rng) for _ in range(num)]
        held, left, stuck = np.zeros(num, dtype=np.int16), np.zeros(num, dtype=int), np.zeros(num, dtype=int)

        def choose(still: np.ndarray) -> np.ndarray:
            stuck[:] = np.where(still, stuck + 1, 0)
            for env in np.flatnonzero((left == 0) | (stuck >= self.config.unstick_after)):
                held[env], left[env] = next(holds[env])
                stuck[env] = 0
            left[:] -= 1
            return held.copy()

        return choose


class Lookahead:
    """What a procgen policy may read of the game besides its screen (`info["game"]`): where the agent is, and what
    a few actions from here would lead to, played from the game's own state, which is then put back."""

    def __init__(self, env):
        self.env = env

    def agent_position(self) -> tuple[float, float]:
        """The agent's (x, y) in the level, in tiles, x growing rightwards and y upwards."""
        return agent_position(self.env.get_state()[0])

    def try_actions(self, actions) -> tuple[float, bool, tuple[float, float] | None]:
        """Plays `actions` from the present state, then restores it: (the reward they earned, whether the episode
        ended in them, where the agent is after them, or None if it ended)."""
        state = self.env.get_state()
        reward, ended = 0.0, False
        try:
            for action in actions:
                self.env.act(np.array([action], dtype=np.int32))
                rewards, _, first = self.env.observe()
                reward += float(rewards[0])
                if first[0]:
                    ended = True
                    break
            position = None if ended else self.agent_position()
        finally:
            self.env.set_state(state)
        return reward, ended, position


def agent_position(state: bytes) -> tuple[float, float]:
    """The agent's (x, y) from a procgen game's serialised state (`get_state`): the header's fields are skipped to
    the entity list, whose first entity is the agent (procgen/src/basic-abstract-game.cpp writes them in this order)."""
    offset = 4  # the format's version
    offset += 4 + struct.unpack_from("i", state, offset)[0]  # the game's name: its length, then its bytes
    offset += 4 * 12 + 4 * 5  # the 12 options, then grid_step, the level seed range, game_type and game_n
    for _ in range(2):  # two random generators: a "seeded" flag, then their state as a string
        offset += 4
        offset += 4 + struct.unpack_from("i", state, offset)[0]
    offset += 4 * 3 + 4 * 12  # the last step's reward, done, level_complete; then the episode's bookkeeping
    offset += 4 + 4  # grid_size, then the number of entities
    return struct.unpack_from("ff", state, offset)


# procgen's 15 button combinations, in the order of its discrete actions (the same for every game)
ACTION_NAMES = ("LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
                "D", "A", "W", "S", "Q", "E")


# What the buttons do, for the games whose code was read (procgen/src/games/*.cpp): which combinations do the same.
# Platformers (CoinRun, Jumper): left, right or neither, with or without a jump; DOWN and the special keys D..E do
# nothing.
PLATFORMER_CLASSES = ("LEFT", "LEFT", "LEFT+JUMP", "NOOP", "NOOP", "JUMP", "RIGHT", "RIGHT", "RIGHT+JUMP",
                      "NOOP", "NOOP", "NOOP", "NOOP", "NOOP", "NOOP")
# Eight-way movers without special moves (BigFish): every direction is its own class; the special keys do nothing.
EIGHT_WAY_CLASSES = (*ACTION_NAMES[:4], "NOOP", *ACTION_NAMES[5:9], "NOOP", "NOOP", "NOOP", "NOOP", "NOOP", "NOOP")
ACTION_CLASSES = {"coinrun": PLATFORMER_CLASSES, "jumper": PLATFORMER_CLASSES, "bigfish": EIGHT_WAY_CLASSES}


@hookimpl
def genie_register_components(registrar):
    registrar.add_source("procgen", ProcgenSource)

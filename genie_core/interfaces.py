"""The four component kinds of a Genie world model, and the one tensor layout they all share.

Tensor layout (every component, every plugin):

    video    float  [B, T, C, H, W]   pixel values in [0, 1], frames in time order
    tokens   long   [B, T, h, w]      one grid of codebook ids per frame (h = H / patch, w = W / patch)
    actions  long   [B, T - 1]        actions[:, t] is the latent action that turns frame t into frame t + 1
    logits   float  [B, T, h, w, V]   logits[:, t] predicts tokens[:, t] from frames < t, actions < t and,
                                      for masked models, the unmasked tokens of frame t itself

Frame 0 is the prompt: a dynamics model never predicts it, and no action precedes it.

Components are `torch.nn.Module`s built from two things: their own frozen attrs config (the recipe's options,
paper defaults) and a spec (shapes the pipeline derives: resolution, vocabulary, number of actions). A component
registers under a name through the `genie_register_components` hook (see `genie_core.hookspecs`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import numpy as np
import torch
from torch import nn

# --------------------------------------------------------------------------------------------------- specs


@attrs.define(frozen=True, kw_only=True)
class VideoSpec:
    """Shape of the video a component sees."""

    channels: int = 3
    height: int
    width: int
    num_frames: int  # the longest window the component is trained on (temporal positions)
    # For components that read the tokenizer's tokens of this video (`needs_tokenizer`): its vocabulary and grid.
    token_vocab: int = 0
    token_grid: tuple[int, int] = (0, 0)
    # How many ground-truth actions the footage records (its source's action names), for action models that read
    # them (`reads_true_actions`); 0 when the footage has none.
    true_actions: int = 0


@attrs.define(frozen=True, kw_only=True)
class TokenSpec:
    """Shape of the token sequences a dynamics model sees."""

    vocab_size: int  # the tokenizer's codebook size
    grid: tuple[int, int]  # (h, w) tokens per frame
    num_frames: int
    num_actions: int  # the latent action model's |A|


@attrs.define(frozen=True, kw_only=True)
class DataSpec:
    """What every video source must deliver, whatever it reads: square RGB frames of this size."""

    resolution: int
    channels: int = 3


@attrs.define(frozen=True, kw_only=True)
class PolicySpec:
    """What a policy plays: the game and its actions (their number and, where the environment names them, names)."""

    game: str
    num_actions: int
    action_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------- results


@attrs.define(frozen=True, kw_only=True)
class Episode:
    """One uninterrupted stretch of footage from a source. Windows for training never cross two episodes."""

    frames: Any  # numpy uint8 [L, H, W, C]
    actions: Any = None  # numpy int [L]: the ground-truth action taken after each frame, -1 after the last; or None
    meta: dict[str, Any] = attrs.field(factory=dict)  # JSON-able facts: level seed, file, episode index


@attrs.define(frozen=True, kw_only=True)
class TokenizerOutput:
    loss: torch.Tensor  # scalar, what the optimizer minimises
    recon: torch.Tensor  # [B, T, C, H, W]
    tokens: torch.Tensor  # [B, T, h, w]
    metrics: dict[str, torch.Tensor] = attrs.field(factory=dict)  # detached scalars for logging


@attrs.define(frozen=True, kw_only=True)
class ActionModelOutput:
    loss: torch.Tensor
    actions: torch.Tensor  # [B, T - 1]
    recon: torch.Tensor  # [B, T - 1, C, H, W], the reconstruction of frames 1..T-1
    metrics: dict[str, torch.Tensor] = attrs.field(factory=dict)


@attrs.define(frozen=True, kw_only=True)
class DynamicsOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # [B, T, h, w, V]
    metrics: dict[str, torch.Tensor] = attrs.field(factory=dict)


# --------------------------------------------------------------------------------------------------- kinds


class Component(nn.Module):
    """Base of every registered component: holds its config; subclasses name their config class."""

    config_class: ClassVar[type]

    @classmethod
    def tiny_config(cls) -> Any:
        """A config small enough for the CPU contract tests (tests/test_contracts.py), which run on every registered
        component. The default is the config's defaults; override it when those are large (the paper's sizes)."""
        return cls.config_class()

    @classmethod
    def tiny_variants(cls) -> dict[str, Any]:
        """More small configs the contract tests run, one per option that changes the computation (another
        quantizer, another way of conditioning on actions), by variant name. None by default."""
        return {}

    def __init__(self, config: Any):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config


class VideoTokenizer(Component, abc.ABC):
    """Video <-> discrete tokens. Causal in time: tokens of frame t depend only on frames <= t."""

    def __init__(self, config: Any, spec: VideoSpec):
        super().__init__(config)
        self.spec = spec

    @property
    @abc.abstractmethod
    def codebook_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def grid(self) -> tuple[int, int]:
        """(h, w): tokens per frame."""

    @abc.abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] in [0, 1] -> token ids [B, T, h, w]."""

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T, h, w] -> video [B, T, C, H, W] in [0, 1]."""

    @abc.abstractmethod
    def loss(self, video: torch.Tensor) -> TokenizerOutput: ...


class LatentActionModel(Component, abc.ABC):
    """Discovers |A| discrete actions from video alone. At play time only the action ids are used."""

    def __init__(self, config: Any, spec: VideoSpec):
        super().__init__(config)
        self.spec = spec

    # True when the model reads the tokenizer's tokens rather than pixels: it is then built with a VideoSpec that
    # names them (token_vocab, token_grid) and handed the frozen tokenizer through `use_tokenizer`.
    needs_tokenizer: ClassVar[bool] = False

    def use_tokenizer(self, tokenizer: VideoTokenizer) -> None:
        """Receives the trained, frozen tokenizer (the pipeline and `World` call this on every action model). Only
        a model with `needs_tokenizer` keeps it, outside its own weights; the default ignores it."""

    # True when the model reads the ground-truth actions stored with the footage instead of (or besides) inferring
    # them: its infer_actions and loss then take them as `true_actions` [B, T - 1] (what `true_action_inputs` gives
    # the callers). Training and evaluation hand them over; play needs none (the player chooses the actions).
    reads_true_actions: ClassVar[bool] = False

    def true_action_inputs(self, true_actions: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The keyword arguments of infer_actions and loss for these true actions: none for a model that does not
        read them, so models written without `true_actions` keep working."""
        if not self.reads_true_actions:
            return {}
        if true_actions is None:
            raise ValueError(f"{type(self).__name__} reads the footage's true actions; none were given")
        return {"true_actions": true_actions}

    @property
    @abc.abstractmethod
    def num_actions(self) -> int: ...

    @abc.abstractmethod
    def infer_actions(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] -> action ids [B, T - 1]; actions[:, t] explains frame t -> t + 1."""

    @abc.abstractmethod
    def loss(self, video: torch.Tensor) -> ActionModelOutput: ...


class DynamicsModel(Component, abc.ABC):
    """Predicts the next frame's tokens from past tokens and actions. Causal in time."""

    # True when forward() accepts a `mask` that hides tokens of the frame being predicted (MaskGIT style).
    supports_masking: ClassVar[bool] = False
    # True when the logits of each token depend only on the tokens before it in raster order (frame by frame, row by
    # row): an autoregressive sampler can then draw a frame token by token with placeholders for the rest.
    causal_in_raster_order: ClassVar[bool] = False

    def __init__(self, config: Any, spec: TokenSpec):
        super().__init__(config)
        self.spec = spec

    @abc.abstractmethod
    def forward(
        self, tokens: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T, h, w], actions [B, T - 1], mask bool [B, T, h, w] (True = hidden) -> logits [B, T, h, w, V]."""

    @abc.abstractmethod
    def loss(self, tokens: torch.Tensor, actions: torch.Tensor,
             generator: torch.Generator | None = None) -> DynamicsOutput:
        """The training loss on a window of tokens and the actions between its frames."""


class Sampler(Component, abc.ABC):
    """Turns a dynamics model into a next-frame generator. Holds no weights; its config holds the knobs."""

    # True when the sampler drives the dynamics model through `mask` (it then needs `supports_masking`).
    needs_masking: ClassVar[bool] = False

    @abc.abstractmethod
    def sample_next(
        self,
        dynamics: DynamicsModel,
        history: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """history tokens [B, t, h, w] and actions [B, t] (the last one leads to the new frame) -> tokens [B, h, w]."""

    # Cached sampling, optional. A dynamics model that keeps its history declares `genie_core.capabilities.
    # CachedDynamics` (MaskGIT's does); a sampler that can continue from such a cache says so here and implements
    # sample_cached. `Rollout` then extends the cache by one frame per step instead of running the whole history
    # again, and rebuilds it in place when the window moves if the cache is a `RefillableCache`
    # (genie_core.nn.FrameCache is). Such a dynamics model may also be `CompilableCachedSteps`: torch.compile of its
    # per-step work (`genie play --compile`).
    def can_use_cache(self, dynamics: DynamicsModel) -> bool:
        return False

    def sample_cached(self, dynamics: DynamicsModel, cache: Any, action: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The next frame's tokens [B, h, w] after the frames in `cache`, reached by `action` [B]: the same tokens
        sample_next gives for that history. Leaves the cache as it was."""
        raise NotImplementedError(f"{type(self).__name__} does not sample from a cache")


class VideoSource(Component, abc.ABC):
    """Where footage comes from: a game played by a policy, a folder of videos, ...

    A source divides its footage into *units* (a level seed, a file): the unit of splitting, of resuming an
    interrupted build, and of skipping bad input. Units are assigned to splits by the source, deterministically, so
    evaluation never sees a training level or file. Ground-truth actions, where the source has them, are kept for
    evaluation only.
    """

    def __init__(self, config: Any, spec: DataSpec):
        super().__init__(config)
        self.spec = spec

    @abc.abstractmethod
    def units(self) -> dict[str, list[str]]:
        """Split name ("train", "val") -> the unit keys of that split, in a fixed order."""

    def action_names(self) -> list[str] | None:
        """The names of the ground-truth actions (index -> name, e.g. LEFT, UP), if the source has actions: kept in
        the data set's manifest, so `genie play` can put arrow keys on the latent actions that match them."""
        return None

    def action_classes(self) -> list[str] | None:
        """For each ground-truth action (index -> class name), the class of actions that do the same thing, e.g.
        LEFT+DOWN and LEFT both move left in a platformer. Evaluation scores the latent actions against these
        classes too, beside the raw actions. None: every action is its own class."""
        return None

    @abc.abstractmethod
    def record(self, unit: str) -> Iterator[Episode]:
        """The episodes of one unit, at spec.resolution. Raise GenieError naming the file (and frame) on bad input."""


class Policy(Component, abc.ABC):
    """Chooses the actions a source plays to make footage: a random player, a scripted expert, a trained agent.

    `reset(seed)` starts an episode: the policy's own randomness is seeded from it, so an episode's footage does not
    depend on the order episodes are played in. `act(observation, info)` gives the next action in
    [0, spec.num_actions): `observation` is the screen (numpy uint8 [H, W, 3] at the environment's own size), `info`
    what the environment offers besides (Atari: the console's 128 bytes of RAM as "ram"; procgen: the level's seed
    as "level" and the game as "game", a look-ahead that tells where the agent is and what a few actions would
    lead to).
    """

    # The games a policy can play (a scripted expert reads one game's RAM); None: any game.
    games: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: Any, spec: PolicySpec):
        super().__init__(config)
        self.spec = spec

    @classmethod
    def contract_inputs(cls, steps: int) -> tuple[PolicySpec, list[tuple[Any, dict[str, Any]]]]:
        """The game and `steps` (observation, info) pairs the contract tests play the policy on. The default: a game
        of 4 Atari actions, random 210x160 screens and random RAM; override it for a policy that reads more (a
        scripted expert that looks into its game)."""
        rng = np.random.default_rng(0)
        spec = PolicySpec(game=cls.games[0] if cls.games else "AnyGame", num_actions=4,
                          action_names=("NOOP", "FIRE", "RIGHT", "LEFT"))
        return spec, [(rng.integers(0, 256, (210, 160, 3), dtype=np.uint8),
                       {"ram": rng.integers(0, 256, 128, dtype=np.uint8)}) for _ in range(steps)]

    @abc.abstractmethod
    def reset(self, seed: int) -> None: ...

    @abc.abstractmethod
    def act(self, observation: Any, info: dict[str, Any]) -> int: ...


# The components a recipe chooses, one table each.
KINDS: dict[str, type[Component]] = {
    "tokenizer": VideoTokenizer,
    "action_model": LatentActionModel,
    "dynamics": DynamicsModel,
    "sampler": Sampler,
    "source": VideoSource,
}
# Everything a plugin can register: the recipe's kinds, and policies, which sources name.
REGISTERED_KINDS: dict[str, type[Component]] = {**KINDS, "policy": Policy}

"""Optional capabilities a component may declare beside its kind's interface (`genie_core.interfaces`).

Each one is a runtime-checkable Protocol: a component has it when it defines the methods, and the core asks with
`isinstance` (or `issubclass` for static methods, asked of the class). The contract tests (`genie_core.testing`)
check every registered component that declares one against what the capability promises, so a third party's cached
dynamics model is held to the same equality with uncached sampling as the built-in one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ChecksRecipe(Protocol):
    """A component (or source) that checks the rest of the recipe it is used in, e.g. that its patch size tiles
    data.resolution. Called on the class, at `genie validate`; returns one sentence per problem."""

    @staticmethod
    def check_recipe(config: Any, data: Any, train: dict) -> list[str]: ...


@runtime_checkable
class CachedDynamics(Protocol):
    """A dynamics model that keeps its history: the history runs once (`prefill`), then every step costs one frame.

    Promised (and checked by the contract tests): `next_frame_logits(prefill(h, a), frame, action, mask)` equals the
    last frame's logits of `forward` on the history followed by that frame; `extend(cache, frame, action)` leaves
    the cache as `prefill` of the longer history would, as far as later logits can tell (it may defer the work to
    the next `next_frame_logits` and run both in one pass); neither changes its inputs."""

    def prefill(self, history: torch.Tensor, actions: torch.Tensor) -> Any:
        """history [B, t, h, w] and the actions between its frames [B, t - 1] -> a cache of them."""

    def next_frame_logits(self, cache: Any, frame: torch.Tensor, action: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, h, w, V] of the frame after the cached history, given its tokens [B, h, w] (hidden where
        `mask`, for a model that supports masking) and the action leading to it [B]."""

    def extend(self, cache: Any, frame: torch.Tensor, action: torch.Tensor) -> None:
        """Adds a finished frame [B, h, w], reached by `action` [B], to the cache in place."""


@runtime_checkable
class CompilableCachedSteps(Protocol):
    """A cached dynamics model whose per-step work can be compiled (`genie play --compile`): its step runs the same
    shapes on the same tensors at any history, tensors only."""

    def compile_cached_steps(self, **torch_compile_options: Any) -> None: ...


@runtime_checkable
class RefillableCache(Protocol):
    """A cache that takes another one's contents into its own tensors (`genie_core.nn.FrameCache`), so compiled
    steps that captured its addresses keep replaying when the window moves. Returns False when it cannot."""

    def refill(self, other: Any) -> bool: ...


@runtime_checkable
class PlaysEpisodes(Protocol):
    """A source that is a game played by a registered policy (the Atari source is): agents trained on its footage
    can be scored in the real game."""

    def policy(self) -> Any:
        """The policy its footage is played by."""

    def footage_seeds(self) -> range:
        """The episode seeds its footage is played from (an agent is scored on others)."""

    def play(self, seed: int, policy: Any, keep_frames: bool = True,
             max_steps: int | None = None) -> tuple[Any, list[int], float]:
        """One episode from `seed` played by `policy` (for at most `max_steps`; None: the source's own limit): its
        frames at the data resolution (None unless kept), its actions and its score."""

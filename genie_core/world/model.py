"""A trained world: tokenizer + latent action model + dynamics model + sampler, and how to roll it out.

The dynamics model and the tokenizer were trained on windows of a fixed number of frames; a rollout longer than that
keeps a rolling context of the most recent frames (`WorldConfig`: how many, and whether the window slides one frame
at a time or moves in blocks), so any number of steps can be played. `Rollout` plays one action at a time and keeps
the dynamics model's cache of the history from step to step.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch

from genie_core.capabilities import RefillableCache
from genie_core.config import WorldConfig, checked_config, config_to_dict
from genie_core.errors import GenieError
from genie_core.interfaces import DynamicsModel, LatentActionModel, Sampler, VideoTokenizer
from genie_core.nn import compile_fixed_shapes


@torch.no_grad()
def infer_actions_in_windows(action_model: LatentActionModel, video: torch.Tensor) -> torch.Tensor:
    """video [B, T, C, H, W] of any length -> the actions [B, T - 1] the action model infers, read in windows of the
    length it was trained on that overlap by one frame: each transition once, with the frames before it in its
    window."""
    length, transitions = action_model.spec.num_frames, video.shape[1] - 1
    actions = torch.zeros(video.shape[0], max(0, transitions), dtype=torch.long, device=video.device)
    for first in range(0, transitions, length - 1):
        clip = video[:, first : first + length]
        actions[:, first : first + clip.shape[1] - 1] = action_model.infer_actions(clip)
    return actions


def history_start(frames: int, keep: int, stride: int) -> int:
    """The first frame of the history the next frame is generated from, when `frames` frames exist: the most recent
    `keep` at most, the window's start moving in multiples of `stride` (1: sliding)."""
    over = frames - keep
    return 0 if over <= 0 else -(-over // stride) * stride


@attrs.define
class World:
    tokenizer: VideoTokenizer
    action_model: LatentActionModel
    dynamics: DynamicsModel
    sampler: Sampler
    config: WorldConfig = WorldConfig()
    _shown_decoder: Callable[[torch.Tensor], torch.Tensor] | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self):
        self._check_parts_fit()
        self.action_model.use_tokenizer(self.tokenizer)  # a token-input action model reads through it
        if self.config.context > self.trained_context:
            raise GenieError(f"[world] context {self.config.context} is longer than the {self.trained_context} frames "
                             f"this world was trained on")

    def _check_parts_fit(self) -> None:
        """The dynamics model reads this tokenizer's tokens and this action model's actions: parts of different
        runs (another codebook, another grid, another |A|) are refused here rather than failing deep in a rollout."""
        spec, tokenizer = self.dynamics.spec, self.tokenizer
        differences = [f"{what}: {theirs} for the dynamics model, {ours} for the {whose}"
                       for what, theirs, ours, whose in (
                           ("codebook size", spec.vocab_size, tokenizer.codebook_size, "tokenizer"),
                           ("token grid", tuple(spec.grid), tuple(tokenizer.grid), "tokenizer"),
                           ("number of actions", spec.num_actions, self.action_model.num_actions, "action model"))
                       if theirs != ours]
        if differences:
            raise GenieError(f"the parts of this world were not trained together ({'; '.join(differences)})")

    @property
    def num_actions(self) -> int:
        return self.action_model.num_actions

    @property
    def trained_context(self) -> int:
        return self.dynamics.spec.num_frames  # (the tokenizer decodes with its own window: `decode_last`)

    @property
    def context(self) -> int:
        """Frames the dynamics model sees per generated frame: the history and the new one."""
        return self.config.context or self.trained_context

    @property
    def device(self) -> torch.device:
        return next(self.dynamics.parameters()).device

    def check_actions(self, actions: torch.Tensor, batch: int | None = None, one_step: bool = False) -> None:
        """actions [B, S] (or [B] for `one_step`): a tensor of integers (a float would be truncated by one sampler
        and refused by another), one row per prompt (`batch`: how many prompts), each within this world's range."""
        shape = "[B]" if one_step else "[B, S]"
        if not isinstance(actions, torch.Tensor):
            raise GenieError(f"actions must be a tensor of integers {shape}, got {type(actions).__name__}")
        if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
            raise GenieError(f"actions must be integers (torch.long), got {actions.dtype}")
        if actions.ndim != (1 if one_step else 2):
            raise GenieError(f"actions have shape {list(actions.shape)}; expected {shape}, "
                             f"{'one per prompt' if one_step else 'a row of actions per prompt'}")
        if batch is not None and actions.shape[0] != batch:
            raise GenieError(f"actions are for a batch of {actions.shape[0]}, the prompt's is {batch}; "
                             f"expected {shape} with B = {batch}")
        bad = actions[(actions < 0) | (actions >= self.num_actions)]
        if bad.numel():
            raise GenieError(f"action {int(bad[0])} is out of range; this world has actions 0..{self.num_actions - 1}")

    @torch.no_grad()
    def generate_tokens(self, prompt_tokens: torch.Tensor, actions: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt tokens [B, 1, h, w] and actions [B, S] -> tokens [B, S + 1, h, w] (the prompt first)."""
        self.check_actions(actions, prompt_tokens.shape[0])
        rollout = Rollout(self, prompt_tokens)
        for step in range(actions.shape[1]):
            rollout.step(actions[:, step], generator)
        return rollout.tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, h, w] -> video [B, T, C, H, W], decoding frame t from at most `context` frames up to t."""
        t = tokens.shape[1]
        if t <= self.tokenizer.spec.num_frames:
            return self.tokenizer.decode(tokens)
        window = self.tokenizer.spec.num_frames
        head = self.tokenizer.decode(tokens[:, :window])
        tail = [self.decode_last(tokens[:, : i + 1]) for i in range(window, t)]
        return torch.cat([head, *tail], dim=1)

    @torch.no_grad()
    def decode_last(self, tokens: torch.Tensor, frames: int = 0, decoder=None) -> torch.Tensor:
        """The last frame of tokens [B, T, h, w] as pixels [B, 1, C, H, W], decoded with the frames before it that
        fit the tokenizer's window (with `frames`, at most that many frames, itself included; `decoder`: another
        function than the tokenizer's decode)."""
        window = self.tokenizer.spec.num_frames
        return (decoder or self.tokenizer.decode)(tokens[:, -min(frames or window, window):])[:, -1:]

    @torch.no_grad()
    def decode_shown(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last frame as play shows it: decoded from `[world] decode_frames` frames (0: the whole window), by
        the compiled decoder after `compile_shown_decoding`."""
        return self.decode_last(tokens, self.config.decode_frames, self._shown_decoder)

    def compile_shown_decoding(self, **torch_compile_options) -> bool:
        """Runs the decoding of the frame play shows (`decode_shown`) through torch.compile (`torch_compile_options`:
        its keyword arguments, e.g. mode="reduce-overhead" for CUDA graphs), when `[world] decode_frames` is set:
        it then decodes the same number of frames every time (fewer only before a session has that many), so it
        compiles once for each count up to decode_frames (once for the recipes' 2). With 0 (the whole window, which
        grows over a session's first frames) it stays eager, and so do rollouts and evaluation, whose inputs have
        every length. Returns whether it compiled."""
        if not self.config.decode_frames:
            return False
        self._shown_decoder = compile_fixed_shapes(self.tokenizer.decode, **torch_compile_options)
        return True

    @torch.no_grad()
    def rollout(self, prompt: torch.Tensor, actions: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """prompt frames [B, C, H, W] and actions [B, S] -> video [B, S + 1, C, H, W]; frame 0 is the decoded prompt."""
        self.check_actions(actions, prompt.shape[0])  # before the prompt is encoded
        return self.decode(self.generate_tokens(self.encode_prompt(prompt), actions.to(self.device), generator))

    @torch.no_grad()
    def encode_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt frames [B, C, H, W] in [0, 1] -> tokens [B, 1, h, w]."""
        return self.tokenizer.encode(prompt[:, None].to(self.device))

    def sampler_with(self, options: dict) -> Sampler:
        """The world's sampler with some settings changed (a new one; the world's stays as it is), checked as a
        recipe's [sampler] table would be: types (2.5 steps is not a number of steps) and ranges."""
        if not options:
            return self.sampler
        current = self.sampler.config
        return type(self.sampler)(checked_config(type(current), {**config_to_dict(current), **options},
                                                 "sampler option"))

    def to(self, device) -> "World":
        for module in (self.tokenizer, self.action_model, self.dynamics, self.sampler):
            module.to(device)
        return self


class Rollout:
    """A world played one action at a time: the tokens [B, T, h, w] and actions [B, T - 1] so far, and, when the
    sampler and the dynamics model support it, the dynamics model's cache of the current history. Each step extends
    the cache by the frame generated before it; the cache is rebuilt only when the window's start moves (every step
    once a sliding window is full, every half window with "block"). The tokens are those of the uncached path."""

    def __init__(self, world: World, prompt_tokens: torch.Tensor, actions: torch.Tensor | None = None):
        """prompt_tokens [B, T, h, w]: one frame, or a history to go on from with its actions [B, T - 1]."""
        self.world = world
        self.tokens = prompt_tokens
        self.actions = prompt_tokens.new_zeros(prompt_tokens.shape[0], 0) if actions is None else actions
        self._cache = None
        self._cache_span = (0, 0)  # the frames [start, end) the cache holds
        self.prefills = 0  # how often the cache was rebuilt (for tests and benchmarks)

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]

    @torch.no_grad()
    def step(self, action: torch.Tensor, generator: torch.Generator | None = None,
             sampler: Sampler | None = None) -> torch.Tensor:
        """action [B] -> the new frame's tokens [B, h, w], appended to the rollout. `sampler`: another one than the
        world's for this step (other steps or temperature); the cache does not depend on it."""
        world = self.world
        sampler = sampler or world.sampler
        world.check_actions(action, self.tokens.shape[0], one_step=True)
        keep = world.context - 1
        stride = 1 if world.config.window == "slide" else max(1, keep // 2)
        t = self.frames
        start = history_start(t, keep, stride)
        actions = torch.cat([self.actions, action[:, None].to(self.actions)], dim=1)
        if sampler.can_use_cache(world.dynamics):
            frame = sampler.sample_cached(world.dynamics, self._history_cache(start), action, generator)
        else:
            frame = sampler.sample_next(world.dynamics, self.tokens[:, start:], actions[:, start:], generator)
        self.tokens = torch.cat([self.tokens, frame[:, None]], dim=1)
        self.actions = actions
        return frame

    def _history_cache(self, start: int):
        t, dynamics = self.frames, self.world.dynamics
        cached_start, cached_end = self._cache_span
        if self._cache is not None and cached_start == start and cached_end == t - 1:
            dynamics.extend(self._cache, self.tokens[:, t - 1], self.actions[:, t - 2])  # the frame made last step
        elif self._cache is None or self._cache_span != (start, t):
            fresh = dynamics.prefill(self.tokens[:, start:], self.actions[:, start:])
            # Into the old cache's tensors when it can take them (a FrameCache can): compiled steps that captured
            # CUDA graphs on those addresses go on replaying across windows, undo and reset.
            if not (isinstance(self._cache, RefillableCache) and self._cache.refill(fresh)):
                self._cache = fresh
            self.prefills += 1
        self._cache_span = (start, t)
        return self._cache

    def truncate(self, frames: int) -> None:
        """Keeps the first `frames` frames (at least the prompt): undo and reset."""
        frames = max(1, frames)
        self.tokens, self.actions = self.tokens[:, :frames], self.actions[:, : frames - 1]
        if self._cache_span[1] > frames:
            self._cache_span = (-1, -1)  # stale: the next step rebuilds it (into the same tensors)

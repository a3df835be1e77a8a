"""MaskGIT dynamics (the paper's): a causal ST-transformer over token frames, trained to fill in masked tokens of
frames 1..T-1 given all earlier frames and the latent actions, and its iterative sampler."""

from __future__ import annotations

import functools
import math

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from genie_core import hookimpl
from genie_core.capabilities import CachedDynamics
from genie_core.config import check_heads, layers, positive, unit_interval
from genie_core.interfaces import DynamicsModel, DynamicsOutput, Sampler, TokenSpec
from genie_core.nn import FrameCache, SpaceTimePositions, STTransformer, compile_fixed_shapes, draw_categorical

MAX_STEPS = 1024  # sampling steps per frame (the paper: 25)
UNMASKING_ORDERS = ("confidence", "random", "noisy-confidence", "halton")


def radical_inverse(index: int, base: int) -> float:
    """The index-th number (from 1) of van der Corput's sequence in `base`: index's digits mirrored after the point."""
    value, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        value += digit * scale
        scale /= base
    return value


@functools.cache
def halton_order(h: int, w: int) -> torch.Tensor:
    """Every cell of an h x w grid, in the order the 2D Halton sequence (bases 2 and 3) first lands in them [h * w]
    (raster indices): however many come first, they are spread evenly over the grid, far from one another."""
    order, seen, index = [], set(), 1
    while len(order) < h * w:
        cell = int(radical_inverse(index, 3) * h) * w + int(radical_inverse(index, 2) * w)
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
        index += 1
    return torch.tensor(order)


@functools.cache
def halton_priority(h: int, w: int) -> torch.Tensor:
    """Each cell's place in `halton_order` as a sampler priority [h * w]: the first cell highest."""
    priority = torch.empty(h * w)
    priority[halton_order(h, w)] = torch.arange(h * w, 0, -1.0)
    return priority


@attrs.define(frozen=True, kw_only=True)
class MaskGITDynamicsConfig:
    """Defaults: the paper's CoinRun dynamics model (Appendix F)."""

    dim: int = attrs.field(default=512, validator=positive)
    depth: int = attrs.field(default=12, validator=layers)
    heads: int = attrs.field(default=8, validator=positive)
    qk_norm: bool = True
    mask_rate_min: float = attrs.field(default=0.5, validator=unit_interval)  # per-sample rate ~ U(min, max)
    mask_rate_max: float = attrs.field(default=1.0, validator=unit_interval)
    # How a_t reaches frame t + 1: "add" its embedding to every token of the frame (the paper), or "token": prepend
    # it as one extra token that the frame's spatial attention reads (reported essential on CoinRun by a later
    # reimplementation).
    action_conditioning: str = attrs.field(default="add", validator=v.in_(("add", "token")))

    def __attrs_post_init__(self):
        check_heads(self)
        if self.mask_rate_min > self.mask_rate_max:
            raise ValueError(f"'mask_rate_min' ({self.mask_rate_min}) exceeds 'mask_rate_max' ({self.mask_rate_max})")


class MaskGITDynamics(DynamicsModel):
    config_class = MaskGITDynamicsConfig
    supports_masking = True

    @classmethod
    def tiny_config(cls):
        return MaskGITDynamicsConfig(dim=32, depth=2, heads=2)

    @classmethod
    def tiny_variants(cls):
        return {"action-token": attrs.evolve(cls.tiny_config(), action_conditioning="token")}

    def __init__(self, config: MaskGITDynamicsConfig, spec: TokenSpec):
        super().__init__(config, spec)
        d = config.dim
        self.mask_id = spec.vocab_size  # one extra embedding row stands for "hidden"
        self.token_embed = torch.nn.Embedding(spec.vocab_size + 1, d)
        self.action_embed = torch.nn.Embedding(spec.num_actions, d)
        self.prepend_action = config.action_conditioning == "token"
        if self.prepend_action:
            self.no_action = torch.nn.Parameter(torch.randn(d) * 0.02)  # frame 0's action token: nothing led to it
        self.positions = SpaceTimePositions(d, spec.grid[0] * spec.grid[1] + self.prepend_action, spec.num_frames)
        self.transformer = STTransformer(d, config.depth, config.heads, qk_norm=config.qk_norm)
        self.head = torch.nn.Linear(d, spec.vocab_size)

    def forward(self, tokens, actions, mask=None):
        b, t, h, w = tokens.shape
        x = self.transformer(self._frames(tokens, mask, self._incoming(actions)))
        return self._logits(x, (h, w))

    def _incoming(self, actions: torch.Tensor) -> torch.Tensor:
        """Action a_t explains frame t -> t + 1, so it conditions frame t + 1; frame 0 gets none (nothing added, or
        the learned no-action token). actions [B, T - 1] -> what enters each frame [B, T, D]."""
        act = self.action_embed(actions)
        if self.prepend_action:
            first = self.no_action.expand(act.shape[0], 1, -1)
        else:
            first = act.new_zeros(act.shape[0], 1, act.shape[2])
        return torch.cat([first, act], dim=1)

    def _frames(self, tokens, mask, incoming, first_frame: int | torch.Tensor = 0) -> torch.Tensor:
        """Token frames [B, T, h, w] (hidden where `mask`), each with the action entering it [B, T, D], as the
        transformer's input [B, T, N (+1), D] for frames first_frame.. of the sequence."""
        b, t, h, w = tokens.shape
        if mask is not None:
            tokens = tokens.masked_fill(mask, self.mask_id)
        x = self.token_embed(tokens.reshape(b, t, h * w))  # [B, T, N, D]
        x = torch.cat([incoming[:, :, None], x], dim=2) if self.prepend_action else x + incoming[:, :, None]
        return self.positions(x, first_frame)

    def _logits(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.prepend_action:
            x = x[:, :, 1:]  # the action token is read, never predicted
        return self.head(x).reshape(x.shape[0], x.shape[1], *grid, -1)

    # Cached sampling: the history runs once, then every MaskGIT step costs one frame. A finished frame waits in the
    # cache (`extend`) and runs in the same pass as the next frame's first step: two frames in one pass cost a small
    # model far less than two passes (its time goes to streaming weights and per-call overhead; on a GPU a pass is
    # bound by its kernel launches), so a frame of 2 MaskGIT steps takes two passes, not three.
    defer_extend = True  # False: extend runs the frame at once, in a pass of its own (benchmarks compare the two)

    def prefill(self, history: torch.Tensor, actions: torch.Tensor) -> FrameCache:
        """history [B, t, h, w] and the actions between its frames [B, t - 1] -> their temporal keys and values."""
        x = self._frames(history, None, self._incoming(actions))
        return self.transformer.prefill(x, capacity=self.spec.num_frames)[1]

    def next_frame_logits(self, cache: FrameCache, frame: torch.Tensor, action: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, h, w, V] of the frame after the cached history, given its tokens [B, h, w] (hidden where
        `mask`) and the action leading to it [B]: what forward() gives for the last frame, at one frame's cost (in
        one pass with the finished frame `extend` left waiting, if there is one)."""
        self._check_room(cache)
        frames, actions, masks = frame[:, None], action[:, None], None if mask is None else mask[:, None]
        if not cache.deferred:
            return self._cached_step(cache, frames, actions, masks, True)
        done_frame, done_action = cache.deferred[0]  # given whole: nothing of it is hidden
        logits = self._cached_step(cache, torch.cat([done_frame[:, None], frames], dim=1),
                                   torch.cat([done_action[:, None], actions], dim=1),
                                   None if masks is None else torch.cat([torch.zeros_like(masks), masks], dim=1), True)
        cache.deferred.clear()
        cache.commit()  # the finished frame; the new one stays uncommitted
        return logits

    def extend(self, cache: FrameCache, frame: torch.Tensor, action: torch.Tensor) -> None:
        """Adds a finished frame [B, h, w], reached by `action` [B], to the cache: what prefill of the longer
        history would give. It runs with the next `next_frame_logits` (`defer_extend`), or at once at one frame's
        cost (no logits: nothing is predicted) when another frame is already waiting or deferring is off."""
        self._check_room(cache)
        if cache.deferred:  # a frame waits already: it runs alone
            self._extend_now(cache, *cache.deferred.pop())
        if self.defer_extend:
            cache.deferred.append((frame.clone(), action.clone()))  # the caller's tensors may change meanwhile
        else:
            self._extend_now(cache, frame, action)

    def _extend_now(self, cache: FrameCache, frame: torch.Tensor, action: torch.Tensor) -> None:
        self._cached_step(cache, frame[:, None], action[:, None], None, False)
        cache.commit()

    def _check_room(self, cache: FrameCache) -> None:
        held = cache.frames + len(cache.deferred)
        if held >= self.spec.num_frames:
            raise ValueError(f"the cache holds {held} frames; this model was built for {self.spec.num_frames} in all")

    def compile_cached_steps(self, **options) -> None:
        """Compiles the per-step work of cached sampling with torch.compile (`options`: its keyword arguments, e.g.
        mode="reduce-overhead" for CUDA graphs). The step's shapes never change, so it compiles once per batch size
        and model; the prefill of a history stays eager (it runs once per window)."""
        # One graph per number of frames. A captured CUDA graph writes into the cache's buffers: a Rollout refills
        # them in place when its window moves, so one session replays the same graphs; another cache records its own.
        self._cached_step = compile_fixed_shapes(self._cached_step, lambda cache, *_: (*cache.keys, *cache.values),
                                                 **options)

    def _cached_step(self, cache: FrameCache, frames, actions, masks, logits: bool) -> torch.Tensor:
        """Frames [B, F, h, w] (hidden where masks), reached by actions [B, F], through the model against the cache:
        tensors only, the same shapes every step (`compile_cached_steps` compiles it). Returns the last frame's
        logits [B, h, w, V], or (logits=False) the transformer's output."""
        x = self._frames(frames, masks, self.action_embed(actions), first_frame=cache.slot)
        x = self.transformer.next_frame_tensors(x, cache)
        return self._logits(x, frames.shape[2:])[:, -1] if logits else x

    def loss(self, tokens, actions, generator=None):
        b = tokens.shape[0]
        cfg = self.config
        rate = cfg.mask_rate_min + (cfg.mask_rate_max - cfg.mask_rate_min) * torch.rand(
            b, 1, 1, 1, device=tokens.device, generator=generator)
        mask = torch.rand(tokens.shape, device=tokens.device, generator=generator) < rate
        mask[:, 0] = False  # the first frame is always given
        logits = self(tokens, actions, mask)
        masked_logits, targets = logits[mask], tokens[mask]
        ce = F.cross_entropy(masked_logits.float(), targets)
        accuracy = (masked_logits.argmax(-1) == targets).float().mean()
        return DynamicsOutput(loss=ce, logits=logits, metrics={"ce": ce.detach(), "accuracy": accuracy.detach()})


@attrs.define(frozen=True, kw_only=True)
class MaskGITSamplerConfig:
    """Defaults: the paper's CoinRun sampling (25 steps, temperature 1.0)."""

    # at most MAX_STEPS: each step reveals at least one token, and play computes every step of every frame
    steps: int = attrs.field(default=25, validator=[positive, v.le(MAX_STEPS)])
    temperature: float = attrs.field(default=1.0, validator=v.ge(0))  # 0 = greedy
    # Run the history once per frame and keep its keys and values (when the dynamics model offers `prefill`), instead
    # of once per step: the same tokens, several times faster. False: the plain full-sequence path, for comparison.
    cache: bool = True
    # Which sampled tokens each step keeps: "confidence" (the paper's: the most probable first), "random" (a random
    # order, drawn afresh every step) or "noisy-confidence" (MaskGIT's: log-confidence plus Gumbel noise scaled by
    # `order_noise`, annealed to 0 over the steps, so early steps are not all spent on the easiest tokens) or
    # "halton" (a fixed order over the frame's grid that spreads each step's tokens evenly over it, whatever the
    # model's confidence: Besnier et al. 2025, so that the tokens fixed together in one step depend little on
    # one another).
    order: str = attrs.field(default="confidence", validator=v.in_(UNMASKING_ORDERS))
    order_noise: float = attrs.field(default=4.5, validator=v.ge(0))  # MaskGIT's choice temperature


class MaskGITSampler(Sampler):
    """Iterative decoding: start from a fully masked frame; at each step sample every hidden token, keep the ones
    first in the unmasking order (the most confident, by default), and hide the rest again, following a cosine
    schedule until no token is hidden."""

    config_class = MaskGITSamplerConfig
    needs_masking = True

    @classmethod
    def tiny_config(cls):
        return MaskGITSamplerConfig(steps=4)

    @torch.no_grad()
    def sample_next(self, dynamics, history, actions, generator=None):
        if self.can_use_cache(dynamics):
            return self.sample_cached(dynamics, dynamics.prefill(history, actions[:, :-1]), actions[:, -1], generator)
        self._check(dynamics)
        b, t, h, w = history.shape
        given = torch.zeros_like(history, dtype=torch.bool)

        def frame_logits(frame, hidden):
            tokens = torch.cat([history, frame[:, None]], dim=1)
            return dynamics(tokens, actions, torch.cat([given, hidden[:, None]], dim=1))[:, -1]
        return self._decode(frame_logits, (b, h, w), history.device, generator)

    def can_use_cache(self, dynamics) -> bool:
        """Whether to sample from the dynamics model's cache of past frames: when it has one and `cache` is on."""
        return self.config.cache and isinstance(dynamics, CachedDynamics)

    @torch.no_grad()
    def sample_cached(self, dynamics, cache, action, generator=None):
        self._check(dynamics)
        grid = dynamics.spec.grid

        def frame_logits(frame, hidden):
            return dynamics.next_frame_logits(cache, frame, action, hidden)
        return self._decode(frame_logits, (action.shape[0], *grid), action.device, generator)

    @staticmethod
    def _check(dynamics) -> None:
        if not dynamics.supports_masking:
            raise TypeError(f"the maskgit sampler needs a dynamics model that supports masking; "
                            f"{type(dynamics).__name__} does not")

    def _decode(self, frame_logits, shape, device, generator) -> torch.Tensor:
        """The MaskGIT loop: frame_logits(tokens [B, h, w], hidden [B, h, w]) -> logits [B, h, w, V]."""
        b, h, w = shape
        n = h * w
        steps, temperature = self.config.steps, self.config.temperature
        frame = torch.zeros(b, n, dtype=torch.long, device=device)
        hidden = torch.ones(b, n, dtype=torch.bool, device=device)
        for step in range(steps):
            logits = frame_logits(frame.reshape(b, h, w), hidden.reshape(b, h, w)).reshape(b, n, -1).float()
            probs = torch.softmax(logits / (temperature or 1), dim=-1)
            sampled = draw_categorical(probs, generator) if temperature > 0 else probs.argmax(-1)
            priority = self._priority(probs.gather(-1, sampled[..., None]).squeeze(-1), step, (h, w), generator)
            priority = priority.masked_fill(~hidden, math.inf)  # tokens already fixed stay fixed
            still_hidden = math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps))
            to_hide = priority.argsort(dim=-1)[:, :still_hidden]
            keep_hidden = torch.zeros_like(hidden).scatter_(1, to_hide, True)
            frame = torch.where(hidden & ~keep_hidden, sampled, frame)
            hidden = keep_hidden
        return frame.reshape(b, h, w)

    def _priority(self, confidence: torch.Tensor, step: int, grid: tuple[int, int], generator) -> torch.Tensor:
        """Each sampled token's place in the unmasking order [B, n]: the highest are kept, the lowest hidden again."""
        order = self.config.order
        if order == "confidence":
            return confidence
        if order == "halton":
            return halton_priority(*grid).to(confidence.device).expand_as(confidence)
        uniform = torch.rand(confidence.shape, generator=generator, device=confidence.device)
        if order == "random":
            return uniform
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
        noise = self.config.order_noise * (1 - (step + 1) / self.config.steps)
        return confidence.clamp_min(1e-30).log() + noise * gumbel


@hookimpl
def genie_register_components(registrar):
    registrar.add_dynamics("maskgit", MaskGITDynamics)
    registrar.add_sampler("maskgit", MaskGITSampler)

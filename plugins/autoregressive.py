"""Autoregressive dynamics: the alternative to MaskGIT. Every frame's tokens are predicted one at a time in raster
order by a causal transformer over the whole token sequence, and the sampler draws them in that same order.

Token (t, i) is predicted from all tokens of frames < t, the tokens of frame t before position i, and the actions
a_<t. Compared with MaskGIT this trains on every token of every predicted frame (no mask rate to tune) and, at
temperature 1, samples exactly from the model's joint distribution over a frame; the price is attention over the
whole T*N window (quadratic) and one forward pass per token at play time.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from genie_core import hookimpl
from genie_core.config import check_heads, layers, positive
from genie_core.interfaces import DynamicsModel, DynamicsOutput, Sampler, TokenSpec
from genie_core.nn import AttentionBlock, SpaceTimePositions, draw_categorical, run_block


@attrs.define(frozen=True, kw_only=True)
class AutoregressiveDynamicsConfig:
    """Defaults: the sizes of the paper's CoinRun dynamics model (Appendix F), as for MaskGIT."""

    dim: int = attrs.field(default=512, validator=positive)
    depth: int = attrs.field(default=12, validator=layers)
    heads: int = attrs.field(default=8, validator=positive)
    qk_norm: bool = True

    def __attrs_post_init__(self):
        check_heads(self)


class AutoregressiveDynamics(DynamicsModel):
    """A decoder-only transformer over the T*N tokens of a window in raster order (frame by frame, row by row).

    The input at sequence position p is the token at p - 1 (a learned start embedding at p = 0), plus the space and
    time position of p, plus the embedding of action a_{t-1} for every position of frame t (frame 0 gets none), so
    the output at p, which predicts token p, never sees token p or anything after it. Attention covers the whole
    window: quadratic in T*N, unlike the factorised ST-transformer of MaskGIT.
    """

    config_class = AutoregressiveDynamicsConfig
    supports_masking = False
    activation_checkpointing = False  # its blocks run through run_block: train.*.activation_checkpointing applies
    # logits at raster position i of a frame do not depend on that frame's tokens at positions >= i, so a sampler
    # may leave those positions as placeholders (see AutoregressiveSampler).
    causal_in_raster_order: ClassVar[bool] = True

    @classmethod
    def tiny_config(cls):
        return AutoregressiveDynamicsConfig(dim=32, depth=2, heads=2)

    def __init__(self, config: AutoregressiveDynamicsConfig, spec: TokenSpec):
        super().__init__(config, spec)
        d = config.dim
        self.token_embed = nn.Embedding(spec.vocab_size, d)
        self.start = nn.Parameter(torch.randn(d) * 0.02)  # stands in for the token before the first one
        self.action_embed = nn.Embedding(spec.num_actions, d)  # additive conditioning, as in MaskGIT
        self.positions = SpaceTimePositions(d, spec.grid[0] * spec.grid[1], spec.num_frames)
        self.blocks = nn.ModuleList(AttentionBlock(d, config.heads, qk_norm=config.qk_norm)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, spec.vocab_size)

    def forward(self, tokens, actions, mask=None):
        if mask is not None:
            raise ValueError("the autoregressive dynamics model does not support masking (supports_masking is False)")
        b, t, h, w = tokens.shape
        n = h * w
        previous = self.token_embed(tokens.reshape(b, t * n)[:, :-1])  # the tokens each position conditions on
        x = torch.cat([self.start.expand(b, 1, -1), previous], dim=1).reshape(b, t, n, -1)
        # Action a_{t-1} explains frame t-1 -> t, so it is added to every position of frame t; frame 0 gets none.
        x = x + F.pad(self.action_embed(actions), (0, 0, 1, 0))[:, :, None]
        x = self.positions(x).reshape(b, t * n, -1)
        for block in self.blocks:
            x = run_block(self, block, x, is_causal=True)  # raster order: position p sees positions <= p
        return self.head(self.norm(x)).reshape(b, t, h, w, -1)

    def loss(self, tokens, actions, generator=None):
        """Next-token cross-entropy over frames 1..T-1; frame 0 is the prompt, never predicted. Deterministic:
        `generator` is accepted for the interface and unused."""
        logits = self(tokens, actions)
        predicted, targets = logits[:, 1:].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
        ce = F.cross_entropy(predicted, targets)
        accuracy = (predicted.argmax(-1) == targets).float().mean()
        return DynamicsOutput(loss=ce, logits=logits, metrics={"ce": ce.detach(), "accuracy": accuracy.detach()})


@attrs.define(frozen=True, kw_only=True)
class AutoregressiveSamplerConfig:
    """Defaults: plain ancestral sampling (temperature 1.0, no top-k), which draws from the model's distribution."""

    temperature: float = attrs.field(default=1.0, validator=v.ge(0))  # 0 = greedy argmax
    top_k: int = attrs.field(default=0, validator=v.ge(0))  # sample among the k most likely tokens; 0 = all


class AutoregressiveSampler(Sampler):
    """Draws the new frame's tokens one by one in raster order, each from the dynamics' logits given the history
    and the tokens drawn so far.

    Cost: h*w forward passes of the dynamics model per frame, each over the whole window (no KV cache yet).

    It drives an autoregressive dynamics model (`causal_in_raster_order`) with placeholders for the tokens not yet
    drawn, and a masking one (MaskGIT's) by hiding them, which is MaskGIT decoding one token per step in raster
    order. Any other dynamics model would see the placeholders, so it is refused.
    """

    config_class = AutoregressiveSamplerConfig
    needs_masking = False

    @torch.no_grad()
    def sample_next(self, dynamics, history, actions, generator=None):
        uses_mask = dynamics.supports_masking
        if not (uses_mask or dynamics.causal_in_raster_order):
            raise ValueError(f"the autoregressive sampler needs a dynamics model that is causal in raster order or "
                             f"supports masking; {type(dynamics).__name__} is neither")
        b, t, h, w = history.shape
        n = h * w
        tokens = torch.cat([history, history.new_zeros(b, 1, h, w)], dim=1)
        mask = None
        if uses_mask:
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[:, -1] = True
        for i in range(n):
            logits = dynamics(tokens, actions, mask)[:, -1].reshape(b, n, -1)[:, i].float()
            row, col = divmod(i, w)
            tokens[:, -1, row, col] = self.pick(logits, generator)
            if mask is not None:
                mask[:, -1, row, col] = False
        return tokens[:, -1]

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """logits [B, V] -> one token id per row: argmax at temperature 0, else a draw from the top-k softmax."""
        if self.config.temperature == 0:
            return logits.argmax(-1)
        top_k = self.config.top_k
        if 0 < top_k < logits.shape[-1]:
            kept = logits.topk(top_k, dim=-1).indices
            logits = torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        return draw_categorical(probs, generator)


@hookimpl
def genie_register_components(registrar):
    registrar.add_dynamics("autoregressive", AutoregressiveDynamics)
    registrar.add_sampler("autoregressive", AutoregressiveSampler)

"""The two tokenizers Genie's Table 3 compares ST-ViViT against: C-ViViT (full space-time attention, causal in time)
and a per-frame ViT (spatial attention only). Both are VQ-VAEs on patches of each frame and share
`PatchTransformerTokenizer`, which differs between them only in the transformer (and positions) it builds."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from genie_core import hookimpl
from genie_core.nn import FullSTTransformer, STTransformer
from genie_plugins.patch_tokenizer import TINY, PatchTokenizerConfig, PatchTransformerTokenizer


@attrs.define(frozen=True, kw_only=True)
class CViViTConfig(PatchTokenizerConfig):
    """C-ViViT's options. Defaults: the paper's CoinRun tokenizer sizes."""


@attrs.define(frozen=True, kw_only=True)
class ViTTokenizerConfig(PatchTokenizerConfig):
    """The per-frame ViT's options. Defaults: the paper's CoinRun tokenizer sizes."""


class CViViTTokenizer(PatchTransformerTokenizer):
    """C-ViViT (Villegas et al., Phenaki) as Genie's Table 3 uses it: encoder and decoder attend over all tokens of
    the clip at once, causally in time (`FullSTTransformer`), so any token sees any earlier token directly, at a cost
    quadratic in T*N.

    Tubelets are 1 frame deep (plain p x p patches of each frame), where Phenaki's merges frames after the first into
    deeper tubelets: one token grid per frame is the layout every dynamics model here reads.
    """

    config_class = CViViTConfig

    @classmethod
    def tiny_config(cls):
        return CViViTConfig(**TINY)

    def make_transformer(self, depth: int) -> nn.Module:
        return FullSTTransformer(self.config.dim, depth, self.config.heads, qk_norm=self.config.qk_norm)


class SpatialPositions(nn.Module):
    """Learned spatial position embeddings only, added to [B, T, N, D]: a frame's code does not depend on its time
    index, and clips of any length fit."""

    def __init__(self, dim: int, num_positions: int):
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(num_positions, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.spatial[None, None]


class ViTTokenizer(PatchTransformerTokenizer):
    """Per-frame ViT: spatial attention only, and no temporal positions, so each frame is encoded and decoded on its
    own, as an image, the same frame always to the same tokens. The baseline that shows what time buys ST-ViViT."""

    config_class = ViTTokenizerConfig

    @classmethod
    def tiny_config(cls):
        return ViTTokenizerConfig(**TINY)

    def make_transformer(self, depth: int) -> nn.Module:
        return STTransformer(self.config.dim, depth, self.config.heads, qk_norm=self.config.qk_norm, temporal=False)

    def make_positions(self, num_patches: int) -> nn.Module:
        return SpatialPositions(self.config.dim, num_patches)


@hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("c-vivit", CViViTTokenizer)
    registrar.add_tokenizer("vit", ViTTokenizer)

"""ST-ViViT video tokenizer (the paper's): a VQ-VAE whose encoder and decoder are ST-transformers, causal in time."""

from __future__ import annotations

import attrs
from torch import nn

from genie_core import hookimpl
from genie_core.nn import STTransformer
from genie_plugins.patch_tokenizer import TINY, PatchTokenizerConfig, PatchTransformerTokenizer


@attrs.define(frozen=True, kw_only=True)
class STViViTConfig(PatchTokenizerConfig):
    """ST-ViViT's options. Defaults: the paper's CoinRun tokenizer (Appendix F)."""


class STViViTTokenizer(PatchTransformerTokenizer):
    """Spatial attention inside each frame, then causal temporal attention at each patch position: memory grows
    linearly with the number of frames for the dominant spatial part (the paper's choice)."""

    config_class = STViViTConfig

    @classmethod
    def tiny_config(cls):
        return STViViTConfig(**TINY)

    def make_transformer(self, depth: int) -> nn.Module:
        return STTransformer(self.config.dim, depth, self.config.heads, qk_norm=self.config.qk_norm)


@hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("st-vivit", STViViTTokenizer)

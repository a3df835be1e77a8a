"""ST-ViViT video tokenizer: a VQ-VAE whose encoder and decoder are ST-transformers, causal in time."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from genie_core import hookimpl
from genie_core.config import check_heads, check_patch_divides_resolution, positive
from genie_core.interfaces import TokenizerOutput, VideoSpec, VideoTokenizer
from genie_core.nn import Quantizer, SpaceTimePositions, STTransformer, patchify, unpatchify



@attrs.define(frozen=True, kw_only=True)
class STViViTConfig:
    """Defaults: the paper's CoinRun tokenizer (Appendix F)."""

    patch_size: int = attrs.field(default=4, validator=positive)
    dim: int = attrs.field(default=512, validator=positive)
    encoder_depth: int = attrs.field(default=8, validator=positive)
    decoder_depth: int = attrs.field(default=8, validator=positive)
    heads: int = attrs.field(default=8, validator=positive)
    codebook_size: int = attrs.field(default=1024, validator=v.ge(2))
    code_dim: int = attrs.field(default=32, validator=positive)
    commitment_weight: float = attrs.field(default=0.25, validator=v.ge(0))
    dead_code_threshold: float = attrs.field(default=2.0, validator=v.ge(0))  # 0 disables dead-code restarts
    qk_norm: bool = True

    def __attrs_post_init__(self):
        check_heads(self)


class STViViTTokenizer(VideoTokenizer):
    config_class = STViViTConfig
    check_recipe = staticmethod(check_patch_divides_resolution)

    @classmethod
    def tiny_config(cls):
        return STViViTConfig(patch_size=4, dim=32, encoder_depth=1, decoder_depth=1, heads=2, codebook_size=64, code_dim=8)

    def __init__(self, config: STViViTConfig, spec: VideoSpec):
        super().__init__(config, spec)
        p, d = config.patch_size, config.dim
        self._grid = (spec.height // p, spec.width // p)
        num_patches = self._grid[0] * self._grid[1]
        patch_dim = spec.channels * p * p
        self.patch_embed = torch.nn.Linear(patch_dim, d)
        self.encoder_positions = SpaceTimePositions(d, num_patches, spec.num_frames)
        self.encoder = STTransformer(d, config.encoder_depth, config.heads, qk_norm=config.qk_norm)
        self.quantizer = Quantizer(d, config.codebook_size, config.code_dim, config.commitment_weight,
                                   config.dead_code_threshold)
        self.decoder_positions = SpaceTimePositions(d, num_patches, spec.num_frames)
        self.decoder = STTransformer(d, config.decoder_depth, config.heads, qk_norm=config.qk_norm)
        self.to_pixels = torch.nn.Linear(d, patch_dim)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    def _encode(self, video: torch.Tensor):
        x = self.patch_embed(patchify(video * 2 - 1, self.config.patch_size))  # [B, T, N, D]
        return self.quantizer(self.encoder(self.encoder_positions(x)))

    def _decode(self, quantized: torch.Tensor) -> torch.Tensor:
        x = self.decoder(self.decoder_positions(quantized))  # [B, T, N, D]
        patches = self.to_pixels(x)
        return unpatchify(patches, self.config.patch_size, self._grid, self.spec.channels) * 0.5 + 0.5

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        indices = self._encode(video).indices  # [B, T, N]
        return indices.reshape(*indices.shape[:2], *self._grid)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape[:2]
        quantized = self.quantizer.embed(tokens.reshape(b, t, -1))
        return self._decode(quantized).clamp(0, 1)

    def loss(self, video: torch.Tensor) -> TokenizerOutput:
        q = self._encode(video)
        recon = self._decode(q.quantized)
        mse = F.mse_loss(recon, video)
        tokens = q.indices.reshape(*q.indices.shape[:2], *self._grid)
        metrics = {"mse": mse.detach(), "commit": q.aux_loss.detach(), "perplexity": q.perplexity, "usage": q.usage}
        return TokenizerOutput(loss=mse + q.aux_loss, recon=recon, tokens=tokens, metrics=metrics)


@hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("st-vivit", STViViTTokenizer)

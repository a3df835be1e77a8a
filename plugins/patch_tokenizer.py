"""What the patch tokenizers (ST-ViViT, C-ViViT, ViT) share: a VQ-VAE on p x p patches of every frame whose
encoder and decoder are transformers. The three differ only in the transformer (and positions) they build, so a
Table 3 comparison changes nothing else."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch import nn

from genie_core.config import check_heads, check_patch_divides_resolution, layers, positive
from genie_core.interfaces import TokenizerOutput, VideoSpec, VideoTokenizer
from genie_core.nn import Quantizer, SpaceTimePositions, check_quantizer, patchify, unpatchify


@attrs.define(frozen=True, kw_only=True)
class PatchTokenizerConfig:
    """Defaults: the paper's CoinRun tokenizer (Appendix F), as for ST-ViViT, so the three compare at equal width,
    depth and codebook."""

    patch_size: int = attrs.field(default=4, validator=positive)
    dim: int = attrs.field(default=512, validator=positive)
    encoder_depth: int = attrs.field(default=8, validator=layers)
    decoder_depth: int = attrs.field(default=8, validator=layers)
    heads: int = attrs.field(default=8, validator=positive)
    codebook_size: int = attrs.field(default=1024, validator=v.ge(2))
    code_dim: int = attrs.field(default=32, validator=positive)  # the VQ codebook's width; unused by fsq and lfq
    commitment_weight: float = attrs.field(default=0.25, validator=v.ge(0))
    dead_code_threshold: float = attrs.field(default=2.0, validator=v.ge(0))  # vq only; 0 disables dead-code restarts
    qk_norm: bool = True
    quantizer: str = "vq"  # vq (the paper's), fsq or lfq: see genie_core.nn.Quantizer

    def __attrs_post_init__(self):
        check_heads(self)
        check_quantizer(self.quantizer, self.codebook_size)



TINY = dict(patch_size=4, dim=32, encoder_depth=1, decoder_depth=1, heads=2, codebook_size=64, code_dim=8)
OTHER_QUANTIZERS = ("fsq", "lfq")  # the contract tests run each as a tiny variant


class PatchTransformerTokenizer(VideoTokenizer):
    """A VQ-VAE on 1 x p x p patches of every frame: patch embedding, positions, encoder transformer, quantizer,
    decoder transformer, linear map back to pixels. Loss: pixel MSE plus the quantizer's own loss.

    Subclasses choose the transformer (`make_transformer`) and may choose the positions (`make_positions`); whether
    the tokenizer is causal in time, or frame-independent, is decided by those alone.
    """

    check_recipe = staticmethod(check_patch_divides_resolution)

    @classmethod
    def tiny_variants(cls):
        return {kind: attrs.evolve(cls.tiny_config(), quantizer=kind) for kind in OTHER_QUANTIZERS}

    def make_transformer(self, depth: int) -> nn.Module:
        """A transformer mapping [B, T, N, D] -> [B, T, N, D]; tokens of frame t may depend on frames <= t only."""
        raise NotImplementedError

    def make_positions(self, num_patches: int) -> nn.Module:
        return SpaceTimePositions(self.config.dim, num_patches, self.spec.num_frames)

    def __init__(self, config: PatchTokenizerConfig, spec: VideoSpec):
        super().__init__(config, spec)
        p, d = config.patch_size, config.dim
        self._grid = (spec.height // p, spec.width // p)
        num_patches = self._grid[0] * self._grid[1]
        patch_dim = spec.channels * p * p
        self.patch_embed = nn.Linear(patch_dim, d)
        self.encoder_positions = self.make_positions(num_patches)
        self.encoder = self.make_transformer(config.encoder_depth)
        self.quantizer = Quantizer(d, config.codebook_size, config.code_dim, config.commitment_weight,
                                   config.dead_code_threshold, kind=config.quantizer)
        self.decoder_positions = self.make_positions(num_patches)
        self.decoder = self.make_transformer(config.decoder_depth)
        self.to_pixels = nn.Linear(d, patch_dim)

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

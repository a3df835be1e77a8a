"""Building blocks shared by the first-party plugins and open to third-party ones.

- `STTransformer`: the paper's spatiotemporal transformer. Each block runs spatial attention inside every frame,
  then causal temporal attention across frames at every token position, then an MLP. Cost is linear in T for the
  dominant spatial part. Attention and MLP layers come from timm (fused SDPA attention, optional QK-norm).
- `Quantizer`: the one adapter over vector-quantize-pytorch that every tokenizer and action model uses.
- `patchify` / `unpatchify`: frames <-> flattened non-overlapping patches.
"""

from __future__ import annotations

import attrs
import torch
from einops import rearrange
from timm.layers import Attention, Mlp
from torch import nn
from vector_quantize_pytorch import VectorQuantize


def patchify(video: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, (H/p)*(W/p), C*p*p]."""
    return rearrange(video, "b t c (h p1) (w p2) -> b t (h w) (c p1 p2)", p1=patch, p2=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """[B, T, h*w, C*p*p] -> [B, T, C, h*p, w*p]."""
    h, w = grid
    return rearrange(patches, "b t (h w) (c p1 p2) -> b t c (h p1) (w p2)", h=h, w=w, c=channels, p1=patch, p2=patch)


class STBlock(nn.Module):
    """Spatial attention (per frame), causal temporal attention (per position), MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, temporal: bool = True):
        super().__init__()
        self.norm_spatial = nn.LayerNorm(dim)
        self.spatial = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.temporal = None
        if temporal:  # False gives a per-frame ViT block: no information moves between frames
            self.norm_temporal = nn.LayerNorm(dim)
            self.temporal = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape  # [B, T, N, D]
        x = x + self.spatial(self.norm_spatial(x).reshape(b * t, n, d)).reshape(b, t, n, d)
        if self.temporal is not None:
            y = self.norm_temporal(x).transpose(1, 2).reshape(b * n, t, d)  # [B*N, T, D]
            y = self.temporal(y, is_causal=True)
            x = x + y.reshape(b, n, t, d).transpose(1, 2)
        return x + self.mlp(self.norm_mlp(x))


class STTransformer(nn.Module):
    """A stack of STBlocks with a final LayerNorm. Input and output [B, T, N, D]."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, temporal: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(STBlock(dim, heads, mlp_ratio, qk_norm, temporal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SpaceTimePositions(nn.Module):
    """Learned spatial and temporal position embeddings, added to [B, T, N, D]."""

    def __init__(self, dim: int, num_positions: int, max_frames: int):
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        self.temporal = nn.Parameter(torch.randn(max_frames, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.temporal.shape[0]:
            raise ValueError(f"sequence of {t} frames is longer than the {self.temporal.shape[0]} this model was built for")
        return x + self.spatial[None, None] + self.temporal[None, :t, None]


@attrs.define(frozen=True)
class QuantizerOutput:
    quantized: torch.Tensor  # [..., D], straight-through
    indices: torch.Tensor  # [...]
    aux_loss: torch.Tensor  # scalar: commitment (and any codebook) loss
    perplexity: torch.Tensor  # scalar, detached: exp(entropy of code usage in this batch)
    usage: torch.Tensor  # scalar, detached: the fraction of the codebook used in this batch


class Quantizer(nn.Module):
    """Vector quantization over the last dimension, from vector-quantize-pytorch.

    EMA codebook updates, k-means initialisation on the first batch, and dead-code restarts: a code whose
    exponentially averaged usage falls below `dead_code_threshold` is replaced by a random vector of the batch.
    Always runs in float32, also under mixed precision: code assignment by distance is fragile in bf16, and the same
    input must get the same code in training (autocast) and at play time (no autocast).
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, commitment_weight: float = 0.25,
                 dead_code_threshold: float = 2.0, kmeans_init: bool = True):
        super().__init__()
        self.codebook_size = codebook_size
        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim,
            commitment_weight=commitment_weight,
            threshold_ema_dead_code=dead_code_threshold,
            kmeans_init=kmeans_init,
            decay=0.8,
        )

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        shape = x.shape
        flat = x.float().reshape(shape[0], -1, shape[-1])  # VectorQuantize wants [B, L, D]
        with torch.autocast(device_type=x.device.type, enabled=False):
            quantized, indices, aux_loss = self.vq(flat)
        indices = indices.reshape(shape[:-1])
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()).detach()
        usage = (counts > 0).float().mean()
        return QuantizerOutput(quantized.reshape(shape), indices, aux_loss.sum(), perplexity, usage)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids [...] -> the quantized vectors [..., D] the decoder consumes."""
        shape = indices.shape
        with torch.autocast(device_type=indices.device.type, enabled=False):
            out = self.vq.get_output_from_indices(indices.reshape(shape[0], -1))
        return out.reshape(*shape, out.shape[-1])

"""Building blocks shared by the first-party plugins and open to third-party ones.

- `STTransformer`: the paper's spatiotemporal transformer. Each block runs spatial attention inside every frame,
  then causal temporal attention across frames at every token position, then an MLP. Cost is linear in T for the
  dominant spatial part. Attention and MLP layers come from timm (fused SDPA attention, optional QK-norm).
- `FullSTTransformer`: full spatiotemporal attention over all T*N tokens, causal in time (C-ViViT's); quadratic in
  T*N. `AttentionBlock` is its block, also used with plain causal order by the autoregressive dynamics model.
- `Quantizer`: the one adapter over vector-quantize-pytorch that every tokenizer and action model uses; the
  quantizer is chosen by name (`QUANTIZERS`): VQ with a learned codebook, FSQ or LFQ.
- `patchify` / `unpatchify`: frames <-> flattened non-overlapping patches.
"""

from __future__ import annotations

import attrs
import torch
from einops import rearrange
from timm.layers import Attention, Mlp
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

QUANTIZERS = ("vq", "fsq", "lfq")


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


def fsq_levels(codebook_size: int) -> list[int]:
    """FSQ levels whose product is exactly `codebook_size`: its prime factors merged into levels of at most 8
    (e.g. 1024 -> [8, 8, 8, 2], 6 -> [3, 2]), so a recipe's codebook_size means the same for every quantizer."""
    factors, n, f = [], codebook_size, 2
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    levels: list[int] = []
    for factor in sorted(factors, reverse=True):
        smallest = min(range(len(levels)), key=levels.__getitem__, default=None)
        if smallest is not None and levels[smallest] * factor <= 8:
            levels[smallest] *= factor
        else:
            levels.append(factor)
    return sorted(levels, reverse=True)


def check_quantizer(kind: str, codebook_size: int) -> None:
    """For a component config's __attrs_post_init__: the named quantizer exists and can have this many codes."""
    if kind not in QUANTIZERS:
        raise ValueError(f"'quantizer' is '{kind}'; valid choices: {', '.join(QUANTIZERS)}")
    if kind == "lfq" and codebook_size & (codebook_size - 1):
        raise ValueError(f"'quantizer' lfq needs a power-of-two number of codes, got {codebook_size}")


class Quantizer(nn.Module):
    """Quantization over the last dimension, from vector-quantize-pytorch, chosen by `kind`:

    - "vq": a learned codebook (VQ-VAE, the paper's), EMA updates, k-means initialisation on the first batch, and
      dead-code restarts: a code whose exponentially averaged usage falls below `dead_code_threshold` is replaced by
      a random vector of the batch; commitment loss.
    - "fsq": finite scalar quantization, no codebook to learn or collapse; levels from `fsq_levels`.
    - "lfq": lookup-free quantization (sign of log2(codebook_size) projected dimensions) with its entropy loss.

    Always runs in float32, also under mixed precision: code assignment is fragile in bf16, and the same input must
    get the same code in training (autocast) and at play time (no autocast).
    """

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, commitment_weight: float = 0.25,
                 dead_code_threshold: float = 2.0, kmeans_init: bool = True, kind: str = "vq"):
        super().__init__()
        check_quantizer(kind, codebook_size)
        self.codebook_size, self.kind = codebook_size, kind
        if kind == "vq":
            self.vq = VectorQuantize(
                dim=dim,
                codebook_size=codebook_size,
                codebook_dim=codebook_dim,
                commitment_weight=commitment_weight,
                threshold_ema_dead_code=dead_code_threshold,
                kmeans_init=kmeans_init,
                decay=0.8,
            )
        elif kind == "fsq":
            self.fsq = FSQ(levels=fsq_levels(codebook_size), dim=dim)
        else:
            self.lfq = LFQ(dim=dim, codebook_size=codebook_size, commitment_loss_weight=commitment_weight)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        shape = x.shape
        flat = x.float().reshape(shape[0], -1, shape[-1])  # the quantizers want [B, L, D]
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.kind == "vq":
                quantized, indices, aux_loss = self.vq(flat)
            elif self.kind == "fsq":
                quantized, indices = self.fsq(flat)
                aux_loss = flat.new_zeros(())  # nothing to commit to: the grid is fixed
            else:
                quantized, indices, aux_loss = self.lfq(flat)
        indices = indices.reshape(shape[:-1]).long()  # FSQ gives int32; the token layout is int64
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum()).detach()
        usage = (counts > 0).float().mean()
        return QuantizerOutput(quantized.reshape(shape), indices, aux_loss.sum(), perplexity, usage)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids [...] -> the quantized vectors [..., D] the decoder consumes."""
        shape = indices.shape
        flat = indices.reshape(shape[0], -1)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            if self.kind == "vq":
                out = self.vq.get_output_from_indices(flat)
            else:
                out = (self.fsq if self.kind == "fsq" else self.lfq).indices_to_codes(flat)
        return out.reshape(*shape, out.shape[-1])


def block_causal_mask(frames: int, tokens_per_frame: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [T*N, T*N], True where attention is allowed: a token sees every token of its own frame and of all earlier
    frames, and nothing of later ones. Frame-major order: token i belongs to frame i // N."""
    frame_of = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame)
    return frame_of[:, None] >= frame_of[None, :]


class AttentionBlock(nn.Module):
    """Self-attention over one flat token sequence [B, L, D], then an MLP; pre-norm residuals. What may attend to
    what is the caller's: a boolean `mask` [L, L] (True = allowed) or plain causal order (`is_causal`)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x), attn_mask=mask, is_causal=is_causal)
        return x + self.mlp(self.norm_mlp(x))


class FullSTTransformer(nn.Module):
    """Full spatiotemporal attention, causal in time (C-ViViT's): every token attends to every token of its own frame
    and of all earlier frames. Input and output [B, T, N, D], like `STTransformer`.

    Cost is quadratic in T*N per block, against the ST-transformer's per-frame spatial (quadratic in N, linear in T)
    plus per-position temporal attention (quadratic in T): the price of letting any token see any earlier token
    directly. The boolean mask also keeps SDPA off its flash kernel on GPUs.
    """

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape
        mask = block_causal_mask(t, n, x.device)
        x = x.reshape(b, t * n, d)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x).reshape(b, t, n, d)

"""C-ViViT and the per-frame ViT tokenizer, built directly from their tiny configs, and the full spatiotemporal
transformer under C-ViViT: what each lets a frame's tokens depend on is the whole difference between them."""

from __future__ import annotations

import attrs
import pytest
import torch

from genie_core.nn import FullSTTransformer, Quantizer, STTransformer, block_causal_mask
from genie_core.testing import TINY_VIDEO, video
from genie_plugins.vit_tokenizers import CViViTConfig, CViViTTokenizer, ViTTokenizer, ViTTokenizerConfig

TOKENIZERS = {"c-vivit": CViViTTokenizer, "vit": ViTTokenizer}


def tiny(name: str, quantizer: str = "vq", seed: int = 0):
    cls = TOKENIZERS[name]
    torch.manual_seed(seed)
    return cls(attrs.evolve(cls.tiny_config(), quantizer=quantizer), TINY_VIDEO)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_shapes(name):
    tok = tiny(name).eval()
    x = video()
    tokens = tok.encode(x)
    assert tok.grid == (4, 4)
    assert tokens.shape == (2, TINY_VIDEO.num_frames, 4, 4) and tokens.dtype == torch.long
    assert tok.decode(tokens).shape == x.shape
    out = tok.loss(x)
    assert out.recon.shape == x.shape and out.tokens.shape == tokens.shape and out.loss.ndim == 0


def test_c_vivit_tokens_of_frame_t_ignore_later_frames():
    tok = tiny("c-vivit").eval()
    x = video()
    t = 2
    y = x.clone()
    y[:, t + 1 :] = torch.rand_like(y[:, t + 1 :])
    tx, ty = tok.encode(x), tok.encode(y)
    assert torch.equal(tx[:, : t + 1], ty[:, : t + 1])
    assert not torch.equal(tx, ty)


def test_vit_tokens_of_frame_t_ignore_every_other_frame():
    tok = tiny("vit").eval()
    x = video()
    t = 2
    y = torch.rand_like(x)
    y[:, t] = x[:, t]  # every frame but t changes, earlier ones included
    assert torch.equal(tok.encode(x)[:, t], tok.encode(y)[:, t])
    # no temporal positions either: the same frame gets the same tokens wherever it stands in the clip
    assert torch.equal(tok.encode(x)[:, t], tok.encode(x[:, t : t + 1])[:, 0])


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
def test_each_quantizer_trains(quantizer):
    tok = tiny("c-vivit", quantizer)
    assert tok.quantizer.kind == quantizer
    out = tok.loss(video(frames=2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert tok.patch_embed.weight.grad is not None and tok.patch_embed.weight.grad.abs().sum() > 0
    assert 0 <= out.tokens.min() and out.tokens.max() < tok.codebook_size


@pytest.mark.parametrize("codes", [6, 256, 1024])
def test_fsq_takes_sizes_with_a_level_of_two(codes):
    """6 actions ([3, 2]) and 1024 codes ([8, 8, 8, 2]): FSQ needs its symmetric grid for a level of 2."""
    quantizer = Quantizer(16, codes, 8, kind="fsq")
    out = quantizer(torch.randn(2, 40, 16))
    assert 0 <= out.indices.min() and out.indices.max() < codes
    assert torch.equal(quantizer.embed(out.indices), out.quantized)


@pytest.mark.parametrize("config_class", [CViViTConfig, ViTTokenizerConfig])
def test_lfq_needs_a_power_of_two_codebook(config_class):
    with pytest.raises(ValueError, match="power-of-two"):
        config_class(quantizer="lfq", codebook_size=48)
    with pytest.raises(ValueError, match="valid choices"):
        config_class(quantizer="rvq")
    config_class(quantizer="fsq", codebook_size=48)  # fsq takes any size


def test_block_causal_mask():
    mask = block_causal_mask(frames=3, tokens_per_frame=2)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_full_attention_is_causal_in_time_but_mixes_frames():
    """Frame t's output ignores later frames and depends on earlier ones; the spatial-only ViT stack depends on
    neither."""
    torch.manual_seed(0)
    full = FullSTTransformer(dim=16, depth=2, heads=2).eval()
    spatial = STTransformer(dim=16, depth=2, heads=2, temporal=False).eval()
    x = torch.randn(2, 4, 5, 16)  # [B, T, N, D]
    t = 2
    later, earlier = x.clone(), x.clone()
    later[:, t + 1 :] = torch.randn_like(later[:, t + 1 :])
    earlier[:, :t] = torch.randn_like(earlier[:, :t])
    with torch.no_grad():
        out = full(x)
        assert out.shape == x.shape
        assert torch.allclose(out[:, : t + 1], full(later)[:, : t + 1], atol=1e-6)
        assert not torch.allclose(out[:, t], full(earlier)[:, t], atol=1e-3)
        assert torch.allclose(spatial(x)[:, t], spatial(earlier)[:, t], atol=1e-6)

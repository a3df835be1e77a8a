"""Cached sampling: the history's temporal keys and values, kept once per frame, give the same logits and the same
sampled tokens as re-running the whole sequence at every MaskGIT step."""

from __future__ import annotations

import attrs
import pytest
import torch

from conftest import build, token_spec
from genie_core.nn import STTransformer
from genie_plugins.maskgit import MaskGITSampler, MaskGITSamplerConfig

VARIANTS = ["maskgit", "maskgit:action-token"]


def history_and_actions(frames: int, seed: int = 0, spec=token_spec()):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, spec.vocab_size, (2, frames, *spec.grid), generator=g)
    actions = torch.randint(0, spec.num_actions, (2, frames), generator=g)  # the last one leads to the new frame
    return history, actions


def test_prefill_and_next_frame_match_forward():
    torch.manual_seed(0)
    model = STTransformer(dim=32, depth=2, heads=2).eval()
    x = torch.randn(2, 5, 6, 32)
    full = model(x)
    out, cache = model.prefill(x[:, :4])
    assert torch.allclose(out, full[:, :4], atol=1e-6) and cache.frames == 4
    assert torch.allclose(model.next_frame(x[:, 4:], cache), full[:, 4:], atol=1e-5)
    assert cache.frames == 4  # left as it was
    with pytest.raises(ValueError, match="one frame"):
        model.next_frame(x[:, 3:], cache)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("frames", [1, 3, 5])
def test_cached_logits_equal_full_sequence_logits(name, frames):
    dynamics = build("dynamics", name, token_spec()).eval()
    history, actions = history_and_actions(frames)
    frame = torch.randint(0, 32, (2, 4, 4))
    mask = torch.rand(2, 4, 4) < 0.5
    tokens = torch.cat([history, frame[:, None]], dim=1)
    full_mask = torch.cat([torch.zeros_like(history, dtype=torch.bool), mask[:, None]], dim=1)
    with torch.no_grad():
        full = dynamics(tokens, actions, full_mask)[:, -1]
        cached = dynamics.next_frame_logits(dynamics.prefill(history, actions[:, :-1]), frame, actions[:, -1], mask)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_cached_sampler_gives_identical_tokens(name, temperature):
    dynamics = build("dynamics", name, token_spec()).eval()
    config = MaskGITSamplerConfig(steps=4, temperature=temperature)
    plain, cached = MaskGITSampler(config), MaskGITSampler(attrs.evolve(config, cache=True))
    for frames in (1, 2, 5):
        history, actions = history_and_actions(frames, seed=frames)
        a = plain.sample_next(dynamics, history, actions, torch.Generator().manual_seed(7))
        b = cached.sample_next(dynamics, history, actions, torch.Generator().manual_seed(7))
        assert torch.equal(a, b)


def test_world_rollout_past_its_context_is_the_same_cached():
    """A rollout longer than the dynamics model's window slides the window every frame; the cached sampler prefills
    the window it is given, so the frames are the same."""
    from conftest import TINY_VIDEO
    from genie_core.world import World

    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO).eval()
    lam = build("action_model", "pixel-lam", TINY_VIDEO).eval()
    spec = attrs.evolve(token_spec(), vocab_size=tokenizer.codebook_size, grid=tokenizer.grid)
    dynamics = build("dynamics", "maskgit", spec).eval()
    prompt = torch.rand(2, 3, 16, 16)
    actions = torch.randint(0, lam.num_actions, (2, 2 * TINY_VIDEO.num_frames))
    videos = []
    for cache in (False, True):
        world = World(tokenizer, lam, dynamics, MaskGITSampler(MaskGITSamplerConfig(steps=3, cache=cache)))
        videos.append(world.rollout(prompt, actions, torch.Generator().manual_seed(1)))
    assert videos[0].shape[1] == 2 * TINY_VIDEO.num_frames + 1
    assert torch.equal(videos[0], videos[1])

"""The autoregressive dynamics model and its sampler: strict causality in raster order (the property the sampler
relies on), action timing, the loss, and that sampling is greedy, reproducible and top-k bounded as configured."""

from __future__ import annotations

import pytest
import torch

from genie_core.interfaces import TokenSpec
from genie_plugins.autoregressive import (
    AutoregressiveDynamics,
    AutoregressiveDynamicsConfig,
    AutoregressiveSampler,
    AutoregressiveSamplerConfig,
)
from genie_plugins.maskgit import MaskGITDynamics

SPEC = TokenSpec(vocab_size=32, grid=(4, 4), num_frames=4, num_actions=4)
N = SPEC.grid[0] * SPEC.grid[1]


def dynamics(seed: int = 0) -> AutoregressiveDynamics:
    torch.manual_seed(seed)
    return AutoregressiveDynamics(AutoregressiveDynamics.tiny_config(), SPEC).eval()


def sampler(**options) -> AutoregressiveSampler:
    return AutoregressiveSampler(AutoregressiveSamplerConfig(**options))


def window(frames: int = SPEC.num_frames, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SPEC.vocab_size, (batch, frames, *SPEC.grid), generator=g)
    actions = torch.randint(0, SPEC.num_actions, (batch, frames - 1), generator=g)
    return tokens, actions


def flat_logits(dyn, tokens, actions) -> torch.Tensor:
    with torch.no_grad():
        logits = dyn(tokens, actions)
    return logits.reshape(logits.shape[0], -1, logits.shape[-1])  # [B, T*N, V] in raster order


def test_logits_shape():
    tokens, actions = window()
    logits = dynamics()(tokens, actions)
    assert logits.shape == (2, SPEC.num_frames, *SPEC.grid, SPEC.vocab_size) and logits.dtype == torch.float32


def test_tiny_config_is_small_and_defaults_are_the_papers():
    assert AutoregressiveDynamics.tiny_config() == AutoregressiveDynamicsConfig(dim=32, depth=2, heads=2)
    assert AutoregressiveDynamicsConfig() == AutoregressiveDynamicsConfig(dim=512, depth=12, heads=8, qk_norm=True)


@pytest.mark.parametrize(("frame", "position"), [(0, 0), (1, 5), (1, N - 1), (2, 0), (3, N - 2)])
def test_logits_never_see_their_own_token_or_later_ones(frame, position):
    """Logits at raster position p predict token p: changing token p leaves positions <= p unchanged and changes
    p + 1 (the next frame's first position when p ends a frame)."""
    dyn = dynamics()
    tokens, actions = window()
    changed = tokens.clone()
    row, col = divmod(position, SPEC.grid[1])
    changed[:, frame, row, col] = (tokens[:, frame, row, col] + 1) % SPEC.vocab_size
    a, b = flat_logits(dyn, tokens, actions), flat_logits(dyn, changed, actions)
    p = frame * N + position
    assert torch.allclose(a[:, : p + 1], b[:, : p + 1], atol=1e-6)
    if p + 1 < a.shape[1]:
        assert not torch.allclose(a[:, p + 1], b[:, p + 1])


@pytest.mark.parametrize("frame", [1, 2, 3])
def test_action_before_a_frame_steers_that_frame_and_later_ones_only(frame):
    """a_{t-1} explains frame t-1 -> t: it leaves frames < t alone and changes frame t from its first token on."""
    dyn = dynamics()
    tokens, actions = window()
    other = actions.clone()
    other[:, frame - 1] = (actions[:, frame - 1] + 1) % SPEC.num_actions
    with torch.no_grad():
        a, b = dyn(tokens, actions), dyn(tokens, other)
    assert torch.allclose(a[:, :frame], b[:, :frame], atol=1e-6)
    assert not torch.allclose(a[:, frame, 0, 0], b[:, frame, 0, 0])


def test_masking_is_refused():
    tokens, actions = window()
    with pytest.raises(ValueError, match="masking"):
        dynamics()(tokens, actions, torch.zeros_like(tokens, dtype=torch.bool))


def test_loss_is_cross_entropy_on_frames_after_the_prompt():
    dyn = dynamics()
    tokens, actions = window()
    out = dyn.loss(tokens, actions)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 1:].reshape(-1, SPEC.vocab_size),
                                                 tokens[:, 1:].reshape(-1))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, expected)
    assert set(out.metrics) == {"ce", "accuracy"}


def test_loss_falls_when_overfitting_one_batch():
    dyn = dynamics().train()
    tokens, actions = window(frames=3)
    optimizer = torch.optim.Adam(dyn.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = dyn.loss(tokens, actions).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert dyn.loss(tokens, actions).loss.item() < first / 1.5


def test_greedy_sample_is_the_argmax_continuation():
    """At temperature 0 every token is its position's argmax given the history and the tokens before it, which a
    model causal in raster order shows in one pass over the finished frame."""
    dyn = dynamics()
    tokens, actions = window(frames=3)
    frame = sampler(temperature=0.0).sample_next(dyn, tokens[:, :2], actions)
    logits = dyn(torch.cat([tokens[:, :2], frame[:, None]], dim=1), actions)
    assert torch.equal(frame, logits[:, -1].argmax(-1))


def test_top_1_is_greedy():
    dyn = dynamics()
    tokens, actions = window(frames=3)
    greedy = sampler(temperature=0.0).sample_next(dyn, tokens[:, :2], actions)
    top_1 = sampler(temperature=1.0, top_k=1).sample_next(dyn, tokens[:, :2], actions, torch.Generator().manual_seed(0))
    assert torch.equal(top_1, greedy)


def test_top_k_draws_only_among_the_k_most_likely():
    dyn = dynamics()
    tokens, actions = window(frames=3)
    frame = sampler(temperature=5.0, top_k=3).sample_next(dyn, tokens[:, :2], actions, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = dyn(torch.cat([tokens[:, :2], frame[:, None]], dim=1), actions)[:, -1]
    top_3 = logits.topk(3, dim=-1).indices
    assert (top_3 == frame[..., None]).any(-1).all()


def test_samples_follow_the_generator_only():
    dyn = dynamics()
    tokens, actions = window(frames=3)
    history, before = tokens[:, :2], tokens[:, :2].clone()
    draw = sampler()
    torch.manual_seed(1)
    a = draw.sample_next(dyn, history, actions, torch.Generator().manual_seed(0))
    torch.manual_seed(2)  # the global RNG plays no part
    b = draw.sample_next(dyn, history, actions, torch.Generator().manual_seed(0))
    c = draw.sample_next(dyn, history, actions, torch.Generator().manual_seed(1))
    assert a.shape == (2, *SPEC.grid) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(history, before)


def test_one_forward_pass_per_token():
    dyn = dynamics()
    calls = []
    original = dyn.forward

    def counting(tokens, actions, mask=None):
        calls.append(tokens.shape)
        return original(tokens, actions, mask)

    dyn.forward = counting
    tokens, actions = window(frames=3)
    sampler(temperature=0.0).sample_next(dyn, tokens[:, :2], actions)
    assert calls == [torch.Size([2, 3, *SPEC.grid])] * N


def test_drives_a_masking_model_by_hiding_the_tokens_not_yet_drawn():
    """With MaskGIT dynamics the first greedy token is the argmax of the fully hidden frame."""
    torch.manual_seed(0)
    dyn = MaskGITDynamics(MaskGITDynamics.tiny_config(), SPEC).eval()
    tokens, actions = window(frames=3)
    frame = sampler(temperature=0.0).sample_next(dyn, tokens[:, :2], actions)
    query = torch.cat([tokens[:, :2], torch.zeros_like(tokens[:, :1])], dim=1)
    mask = torch.zeros_like(query, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        first = dyn(query, actions, mask)[:, -1, 0, 0].argmax(-1)
    assert torch.equal(frame[:, 0, 0], first)


def test_refuses_a_model_that_would_see_the_placeholders():
    class FullAttentionDynamics(torch.nn.Module):
        supports_masking = False
        causal_in_raster_order = False  # (what every DynamicsModel declares)

    tokens, actions = window(frames=3)
    with pytest.raises(ValueError, match="raster order"):
        sampler().sample_next(FullAttentionDynamics(), tokens[:, :2], actions)

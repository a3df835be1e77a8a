"""Contract tests: every registered component of every kind, built from its tiny config, keeps the interface's
promises and those of the capabilities it declares (`genie_core.testing.contracts`): shapes and dtypes, determinism
under a seed, the encode/decode round trip, causality in time, that it can learn, cached sampling equal to uncached.
A third-party plugin installed here is tested too; its own package runs the same checks with one decorator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from genie_core.testing import build, parametrize_contracts, token_spec, tokens_and_actions


@parametrize_contracts()
def test_contract(contract):
    contract()


# ------------------------------------------------------------------------------------------------ MaskGIT's own


def test_maskgit_single_greedy_step_is_argmax():
    """With one step at temperature 0, MaskGIT fills the fully hidden frame with each position's argmax."""
    from genie_plugins.maskgit import MaskGITSampler, MaskGITSamplerConfig

    dyn = build("dynamics", "maskgit", token_spec()).eval()
    tokens, actions = tokens_and_actions(frames=3)
    sampled = MaskGITSampler(MaskGITSamplerConfig(steps=1, temperature=0.0)).sample_next(dyn, tokens[:, :2], actions)
    query = torch.cat([tokens[:, :2], torch.zeros_like(tokens[:, :1])], dim=1)
    mask = torch.zeros_like(query, dtype=torch.bool)
    mask[:, -1] = True
    with torch.no_grad():
        expected = dyn(query, actions, mask)[:, -1].argmax(-1)
    assert torch.equal(sampled, expected)


@pytest.mark.parametrize("order", ["confidence", "random", "noisy-confidence", "halton"])
@pytest.mark.parametrize("cache", [False, True])
def test_maskgit_schedule_reveals_every_token_and_keeps_revealed_ones(cache, order):
    """Each step reveals tokens following the cosine schedule; a revealed token is never resampled (with the
    key/value cache, where each step runs only the new frame, and without, where it runs the whole sequence)."""
    from genie_plugins.maskgit import MaskGITSampler, MaskGITSamplerConfig

    dyn = build("dynamics", "maskgit", token_spec()).eval()
    seen = []
    if cache:
        original = dyn.next_frame_logits

        def spy(kv, frame, action, mask=None):
            seen.append((frame.clone(), mask.clone()))
            return original(kv, frame, action, mask)

        dyn.next_frame_logits = spy
    else:
        original = dyn.forward

        def spy(tokens, actions, mask=None):
            seen.append((tokens[:, -1].clone(), mask[:, -1].clone()))
            return original(tokens, actions, mask)

        dyn.forward = spy
    tokens, actions = tokens_and_actions(frames=3)
    config = MaskGITSamplerConfig(steps=4, cache=cache, order=order)
    result = MaskGITSampler(config).sample_next(dyn, tokens[:, :2], actions, torch.Generator().manual_seed(0))
    hidden_counts = [int(mask[0].sum()) for _, mask in seen]
    assert hidden_counts == [16, 14, 11, 6]  # 16 * cos(pi/2 * s/4) for s = 0..3, floored
    for (frame, mask), (next_frame, _) in zip(seen, seen[1:] + [(result, None)]):
        assert torch.equal(frame[~mask], next_frame[~mask])


def _first_step_revealed(order: str, seed: int, **options) -> torch.Tensor:
    """Which positions the first of 4 greedy MaskGIT steps reveals [B, h, w], for an unmasking order."""
    from genie_plugins.maskgit import MaskGITSampler, MaskGITSamplerConfig

    dyn = build("dynamics", "maskgit", token_spec()).eval()
    seen = []
    original = dyn.next_frame_logits

    def spy(kv, frame, action, mask=None):
        seen.append(mask.clone())
        return original(kv, frame, action, mask)

    dyn.next_frame_logits = spy
    tokens, actions = tokens_and_actions(frames=3)
    config = MaskGITSamplerConfig(steps=4, temperature=0.0, order=order, **options)
    MaskGITSampler(config).sample_next(dyn, tokens[:, :2], actions, torch.Generator().manual_seed(seed))
    return ~seen[1]  # hidden before the second step: what the first one kept


def test_maskgit_unmasking_orders_choose_which_tokens_each_step_keeps():
    """Greedy sampling: "confidence" keeps the same tokens whatever the seed, "random" keeps different ones for
    different seeds, and "noisy-confidence" with no noise is "confidence"."""
    confident = _first_step_revealed("confidence", 0)
    assert torch.equal(confident, _first_step_revealed("confidence", 1))
    assert int(confident[0].sum()) == 2  # 16 - 14 tokens, the cosine schedule's first step
    assert not torch.equal(_first_step_revealed("random", 0), _first_step_revealed("random", 1))
    assert torch.equal(_first_step_revealed("noisy-confidence", 1, order_noise=0.0), confident)


def test_halton_order_keeps_cells_spread_over_the_frame_whatever_the_model_says():
    """"halton": the first step keeps the first cells of the 2D Halton sequence, for every window and seed, and every
    prefix of that order is spread over the grid (its first 8 cells of an 8 x 8 grid: each in a row and a column of
    its own, two in each quadrant)."""
    from genie_plugins.maskgit import halton_order

    order = halton_order(8, 8)
    assert sorted(order.tolist()) == list(range(64))
    rows, columns = order[:8] // 8, order[:8] % 8
    assert len(set(rows.tolist())) == len(set(columns.tolist())) == 8
    assert sorted(Counter(zip((rows // 4).tolist(), (columns // 4).tolist())).values()) == [2, 2, 2, 2]
    assert sorted(halton_order(3, 5).tolist()) == list(range(15))  # any grid, not only square ones
    revealed = _first_step_revealed("halton", 0)
    assert torch.equal(revealed, _first_step_revealed("halton", 1))
    first_two = torch.zeros(16, dtype=torch.bool)
    first_two[halton_order(4, 4)[:2]] = True  # the tiny config's 4 x 4 grid: 16 - 14 tokens kept first
    assert all(torch.equal(frame.flatten(), first_two) for frame in revealed)

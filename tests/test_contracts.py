"""Contract tests: every registered component of every kind, built from its tiny config, keeps the interface's
promises: shapes and dtypes, determinism under a seed, the encode/decode round trip, causality in time, and that it
can learn (one batch, loss falls by the stated factor). A third-party plugin installed here is tested too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_VIDEO, build, names, token_spec, video
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec
from genie_core.registry import get_registry

OVERFIT_STEPS = 60
OVERFIT_FACTOR = 2.0  # the loss on one repeated batch must fall at least this much


def overfit(module, loss_fn, steps: int = OVERFIT_STEPS, lr: float = 3e-3) -> tuple[float, float]:
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, loss_fn().item()


# ------------------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize("name", names("tokenizer"))
class TestTokenizer:
    def test_shapes_and_dtypes(self, name):
        tok = build("tokenizer", name, TINY_VIDEO).eval()
        x = video()
        tokens = tok.encode(x)
        h, w = tok.grid
        assert tokens.shape == (2, TINY_VIDEO.num_frames, h, w) and tokens.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < tok.codebook_size
        frames = tok.decode(tokens)
        assert frames.shape == x.shape and frames.dtype == torch.float32
        assert 0 <= frames.min() and frames.max() <= 1
        out = tok.loss(x)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.recon.shape == x.shape and out.tokens.shape == tokens.shape

    def test_deterministic_under_seed(self, name):
        a, b = build("tokenizer", name, TINY_VIDEO, seed=3), build("tokenizer", name, TINY_VIDEO, seed=3)
        x = video()
        torch.manual_seed(0)
        la = a.loss(x).loss
        torch.manual_seed(0)
        lb = b.loss(x).loss
        assert torch.equal(la, lb)
        assert torch.equal(a.eval().encode(x), b.eval().encode(x))

    def test_round_trip_matches_training_path(self, name):
        """decode(encode(x)) is exactly the reconstruction the training loss sees."""
        tok = build("tokenizer", name, TINY_VIDEO)
        x = video()
        tok.loss(x)  # first call initialises data-dependent codebooks (k-means)
        tok.eval()
        with torch.no_grad():
            assert torch.allclose(tok.decode(tok.encode(x)), tok.loss(x).recon.clamp(0, 1), atol=1e-5)

    def test_causal_in_time(self, name):
        tok = build("tokenizer", name, TINY_VIDEO).eval()
        x = video()
        y = x.clone()
        y[:, 3:] = torch.rand_like(y[:, 3:])  # change every frame after t = 2
        tx, ty = tok.encode(x), tok.encode(y)
        assert torch.equal(tx[:, :3], ty[:, :3])
        assert not torch.equal(tx, ty)
        # the decoder too: frames <= t decode the same whatever the later tokens are
        assert torch.allclose(tok.decode(tx)[:, :3], tok.decode(ty)[:, :3], atol=1e-6)

    def test_overfits_one_batch(self, name):
        tok = build("tokenizer", name, TINY_VIDEO)
        x = video(frames=2)
        first, last = overfit(tok, lambda: tok.loss(x).loss)
        assert last < first / OVERFIT_FACTOR, (first, last)


# ------------------------------------------------------------------------------------------------ action models


def true_actions(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Recorded actions for video x [B, T, ...]: [B, T - 1] in 0..TINY_VIDEO.true_actions - 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VIDEO.true_actions, (x.shape[0], x.shape[1] - 1), generator=g)


@pytest.mark.parametrize("name", names("action_model"))
class TestActionModel:
    """Models that read the footage's true actions (`reads_true_actions`) are handed them, as training does."""

    def test_shapes_and_dtypes(self, name):
        lam = build("action_model", name, TINY_VIDEO).eval()
        x = video()
        given = lam.true_action_inputs(true_actions(x))
        actions = lam.infer_actions(x, **given)
        assert actions.shape == (2, TINY_VIDEO.num_frames - 1) and actions.dtype == torch.long
        assert 0 <= actions.min() and actions.max() < lam.num_actions
        out = lam.loss(x, **given)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert torch.equal(out.actions, actions)
        assert out.recon.shape == (2, TINY_VIDEO.num_frames - 1, 3, 16, 16)

    def test_deterministic_under_seed(self, name):
        a, b = build("action_model", name, TINY_VIDEO, seed=5), build("action_model", name, TINY_VIDEO, seed=5)
        x = video()
        given = a.true_action_inputs(true_actions(x))
        torch.manual_seed(0)
        la = a.loss(x, **given).loss
        torch.manual_seed(0)
        lb = b.loss(x, **given).loss
        assert torch.equal(la, lb)

    def test_causal_in_time(self, name):
        """Action t explains frame t -> t+1: it depends on frames <= t+1 and on nothing later."""
        lam = build("action_model", name, TINY_VIDEO).eval()
        x = video()
        y = x.clone()
        y[:, 4:] = torch.rand_like(y[:, 4:])
        given_x, given_y = (lam.true_action_inputs(a) for a in (true_actions(x), true_actions(x, seed=1)))
        if given_y:  # the recorded actions after t change too
            given_y["true_actions"][:, :3] = given_x["true_actions"][:, :3]
        lam.loss(x, **given_x)
        assert torch.equal(lam.infer_actions(x, **given_x)[:, :3], lam.infer_actions(y, **given_y)[:, :3])
        # the decoder's predictions of frames 1..3 use frames 0..2 and actions 0..2 only
        recon_x, recon_y = lam.loss(x, **given_x).recon, lam.loss(y, **given_y).recon
        assert torch.allclose(recon_x[:, :3], recon_y[:, :3], atol=1e-5)

    def test_overfits_one_batch(self, name):
        lam = build("action_model", name, TINY_VIDEO)
        if not any(p.requires_grad for p in lam.parameters()):
            pytest.skip(f"{name} has no weights: nothing to learn")
        x = video(frames=3)
        given = lam.true_action_inputs(true_actions(x))
        first, last = overfit(lam, lambda: lam.loss(x, **given).loss)
        assert last < first / OVERFIT_FACTOR, (first, last)


# ------------------------------------------------------------------------------------------------ dynamics


def tokens_and_actions(batch=2, frames=TINY_VIDEO.num_frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = token_spec()
    tokens = torch.randint(0, spec.vocab_size, (batch, frames, *spec.grid), generator=g)
    actions = torch.randint(0, spec.num_actions, (batch, frames - 1), generator=g)
    return tokens, actions


@pytest.mark.parametrize("name", names("dynamics"))
class TestDynamics:
    def test_shapes_and_dtypes(self, name):
        dyn = build("dynamics", name, token_spec()).eval()
        tokens, actions = tokens_and_actions()
        logits = dyn(tokens, actions)
        assert logits.shape == (*tokens.shape, token_spec().vocab_size) and logits.dtype == torch.float32
        out = dyn.loss(tokens, actions, torch.Generator().manual_seed(0))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)

    def test_deterministic_under_seed(self, name):
        a, b = build("dynamics", name, token_spec(), seed=7), build("dynamics", name, token_spec(), seed=7)
        tokens, actions = tokens_and_actions()
        la = a.loss(tokens, actions, torch.Generator().manual_seed(1)).loss
        lb = b.loss(tokens, actions, torch.Generator().manual_seed(1)).loss
        assert torch.equal(la, lb)

    def test_causal_in_time(self, name):
        """Logits for frame t depend on frames <= t and actions < t only (no leak from the future)."""
        dyn = build("dynamics", name, token_spec()).eval()
        tokens, actions = tokens_and_actions()
        other_tokens, other_actions = tokens_and_actions(seed=1)
        t = 2
        tokens2, actions2 = tokens.clone(), actions.clone()
        tokens2[:, t + 1 :] = other_tokens[:, t + 1 :]
        actions2[:, t:] = other_actions[:, t:]
        with torch.no_grad():
            a, b = dyn(tokens, actions), dyn(tokens2, actions2)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
        assert not torch.allclose(a, b)

    def test_action_t_steers_frame_t_plus_1(self, name):
        """actions[:, k] explains frame k -> k+1: it changes the logits of frame k+1 and of no earlier frame."""
        dyn = build("dynamics", name, token_spec()).eval()
        tokens, actions = tokens_and_actions()
        k = 2
        other = actions.clone()
        other[:, k] = (actions[:, k] + 1) % token_spec().num_actions
        with torch.no_grad():
            a, b = dyn(tokens, actions), dyn(tokens, other)
        assert torch.allclose(a[:, : k + 1], b[:, : k + 1], atol=1e-5)
        assert not torch.allclose(a[:, k + 1], b[:, k + 1])

    def test_overfits_one_batch(self, name):
        dyn = build("dynamics", name, token_spec())
        tokens, actions = tokens_and_actions(frames=3)
        first, last = overfit(dyn, lambda: dyn.loss(tokens, actions, torch.Generator().manual_seed(0)).loss)
        assert last < first / OVERFIT_FACTOR, (first, last)


# ------------------------------------------------------------------------------------------------ samplers


def _fits(sampler: str, dynamics: str) -> bool:
    """What recipe validation allows: a sampler that drives masking needs a dynamics model that supports it."""
    registry = get_registry()
    needs = registry.get("sampler", sampler.partition(":")[0]).cls.needs_masking
    return not needs or registry.get("dynamics", dynamics.partition(":")[0]).cls.supports_masking


def sampler_pairs():
    """Every sampler with every dynamics model a recipe may pair it with."""
    return [(s, d) for s in names("sampler") for d in names("dynamics") if _fits(s, d)]


def test_a_sampler_refuses_a_dynamics_model_it_cannot_drive():
    unfit = [(s, d) for s in names("sampler") for d in names("dynamics") if not _fits(s, d)]
    for sampler_name, dynamics_name in unfit:
        sampler, dyn = build("sampler", sampler_name), build("dynamics", dynamics_name, token_spec()).eval()
        tokens, actions = tokens_and_actions(frames=3)
        with pytest.raises((TypeError, ValueError), match="masking"):
            sampler.sample_next(dyn, tokens[:, :2], actions[:, :2], torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("sampler_name", "dynamics_name"), sampler_pairs())
class TestSampler:
    def test_next_frame_shape_and_determinism(self, sampler_name, dynamics_name):
        sampler = build("sampler", sampler_name)
        dyn = build("dynamics", dynamics_name, token_spec()).eval()
        tokens, actions = tokens_and_actions(frames=3)
        history, before = tokens[:, :2], tokens[:, :2].clone()
        a = sampler.sample_next(dyn, history, actions[:, :2], torch.Generator().manual_seed(0))
        b = sampler.sample_next(dyn, history, actions[:, :2], torch.Generator().manual_seed(0))
        assert a.shape == (2, *token_spec().grid) and a.dtype == torch.long
        assert 0 <= a.min() and a.max() < token_spec().vocab_size
        assert torch.equal(a, b)
        assert torch.equal(history, before)  # the history is not modified


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


@pytest.mark.parametrize("cache", [False, True])
def test_maskgit_schedule_reveals_every_token_and_keeps_revealed_ones(cache):
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
    config = MaskGITSamplerConfig(steps=4, cache=cache)
    result = MaskGITSampler(config).sample_next(dyn, tokens[:, :2], actions, torch.Generator().manual_seed(0))
    hidden_counts = [int(mask[0].sum()) for _, mask in seen]
    assert hidden_counts == [16, 14, 11, 6]  # 16 * cos(pi/2 * s/4) for s = 0..3, floored
    for (frame, mask), (next_frame, _) in zip(seen, seen[1:] + [(result, None)]):
        assert torch.equal(frame[~mask], next_frame[~mask])


# ------------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("name", names("source"))
def test_source_contract(name):
    """Disjoint splits; episodes of uint8 frames at the asked resolution; actions, if any, one per frame; the same
    unit gives the same footage twice."""
    source = build("source", name, DataSpec(resolution=16))
    try:
        units = source.units()
    except GenieError as error:
        pytest.skip(f"{name} needs input files, its own tests make them: {error}")
    assert set(units) == {"train", "val"} and set(units["train"]).isdisjoint(units["val"])
    unit = units["val"][0]
    episodes, again = list(source.record(unit)), list(source.record(unit))
    assert episodes
    for episode, twin in zip(episodes, again):
        assert episode.frames.dtype == np.uint8 and episode.frames.shape[1:] == (16, 16, 3)
        assert episode.actions is None or len(episode.actions) == len(episode.frames)
        assert np.array_equal(episode.frames, twin.frames)

"""What every component of each kind promises, and what each declared capability promises, as checks.

A check takes the registered name (NAME or NAME:VARIANT) of the component it checks, builds it from its tiny config
and asserts: shapes and dtypes, determinism under a seed, the encode/decode round trip, causality in time, that it
can learn (one repeated batch, the loss falls by OVERFIT_FACTOR), that activation checkpointing keeps its training
step's loss and gradients, and, for a `CachedDynamics`, that the cache gives
what the whole sequence gives. `contract_checks` lists them for the components of one package.
"""

from __future__ import annotations

import copy
from typing import Callable

import attrs
import numpy as np
import pytest
import torch

from genie_core.capabilities import CachedDynamics
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec
from genie_core.nn import compile_block_stacks, saved_activation_bytes, use_activation_checkpointing
from genie_core.registry import Registry, get_registry
from genie_core.testing import TINY_VIDEO, build, names, token_spec, tokens_and_actions, video

OVERFIT_STEPS = 60
OVERFIT_FACTOR = 2.0  # the loss on one repeated batch must fall at least this much


@attrs.frozen
class Contract:
    """One check of one component (or of a sampler with a dynamics model it drives)."""

    kind: str
    names: tuple[str, ...]
    check: Callable[..., None]

    @property
    def id(self) -> str:
        return f"{self.check.__name__}({' with '.join(self.names)})"

    def __call__(self) -> None:
        self.check(*self.names)


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


def _training_step(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One forward and backward pass of `model`: its loss, every weight's gradient, and the bytes autograd kept for
    the backward pass."""
    torch.manual_seed(0)  # the same data-dependent codebook initialisation and masks for every copy
    loss, kept = saved_activation_bytes(lambda: loss_fn(model), model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kept


def _same_loss_and_gradients(a, b) -> None:
    """Two `_training_step` results agree to float rounding: the loss, and the gradient of every weight, compared as
    a whole (the norm of the difference against the gradient's norm). Not entry by entry: another attention kernel
    rounds differently (a compiled step's written-out attention, or SDPA's own math kernel against its fused one),
    and a sharp loss such as LFQ's entropy term carries that rounding to single entries of small gradients by more
    than 1e-4 of their size, while the whole tensor moves by 5e-5 of its norm."""
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        off, size = (grad - grads_b[name]).norm().item(), grad.norm().item()
        assert off <= 1e-4 * size + 1e-6, f"{name}: gradients {off:.3g} apart, of norm {size:.3g}"


def same_training_step_with_activation_checkpointing(module, loss_fn) -> None:
    """train.*.activation_checkpointing changes what a step costs, not what it computes: a copy of `module` with it
    on gives the same loss and the same gradient for every weight, while keeping less for the backward pass.
    Skipped for a component that supports none (declares no `activation_checkpointing`)."""
    plain, checkpointed = copy.deepcopy(module).train(), copy.deepcopy(module).train()
    if not use_activation_checkpointing(checkpointed):
        pytest.skip(f"{type(module).__name__} supports no activation checkpointing")
    a, b = _training_step(plain, loss_fn), _training_step(checkpointed, loss_fn)
    _same_loss_and_gradients(a, b)
    assert b[2] < a[2], (a[2], b[2])


def same_training_step_compiled(module, loss_fn) -> None:
    """train.*.compile changes what a step costs, not what it computes: a copy of `module` with its block stacks
    through torch.compile gives the same loss and the same gradient for every weight. The kit traces with dynamo and
    AOT autograd as training does, then runs the traced graphs as they are (backend "aot_eager"), which keeps it
    fast: no kernels are generated. Skipped for a component that has no block stack."""
    from torch._dynamo.testing import CompileCounterWithBackend

    plain, compiled = copy.deepcopy(module).train(), copy.deepcopy(module).train()
    torch._dynamo.reset()  # every component's stacks compile afresh, not from another's cache entries
    traced = CompileCounterWithBackend("aot_eager")
    if not compile_block_stacks(compiled, backend=traced):
        pytest.skip(f"{type(module).__name__} has no block stack to compile")
    a, b = _training_step(plain, loss_fn), _training_step(compiled, loss_fn)
    assert traced.frame_count > 0  # the step ran through the compiled stacks
    _same_loss_and_gradients(a, b)


# ------------------------------------------------------------------------------------------------ tokenizers


def tokenizer_shapes_and_dtypes(name):
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


def tokenizer_deterministic_under_seed(name):
    a, b = build("tokenizer", name, TINY_VIDEO, seed=3), build("tokenizer", name, TINY_VIDEO, seed=3)
    x = video()
    torch.manual_seed(0)
    la = a.loss(x).loss
    torch.manual_seed(0)
    lb = b.loss(x).loss
    assert torch.equal(la, lb)
    assert torch.equal(a.eval().encode(x), b.eval().encode(x))


def tokenizer_round_trip_matches_training_path(name):
    """decode(encode(x)) is exactly the reconstruction the training loss sees."""
    tok = build("tokenizer", name, TINY_VIDEO)
    x = video()
    tok.loss(x)  # first call initialises data-dependent codebooks (k-means)
    tok.eval()
    with torch.no_grad():
        assert torch.allclose(tok.decode(tok.encode(x)), tok.loss(x).recon.clamp(0, 1), atol=1e-5)


def tokenizer_causal_in_time(name):
    tok = build("tokenizer", name, TINY_VIDEO).eval()
    x = video()
    y = x.clone()
    y[:, 3:] = torch.rand_like(y[:, 3:])  # change every frame after t = 2
    tx, ty = tok.encode(x), tok.encode(y)
    assert torch.equal(tx[:, :3], ty[:, :3])
    assert not torch.equal(tx, ty)
    # the decoder too: frames <= t decode the same whatever the later tokens are
    assert torch.allclose(tok.decode(tx)[:, :3], tok.decode(ty)[:, :3], atol=1e-6)


def _tokenizer_training_step(name):
    """A tiny tokenizer and its training loss on a tiny video."""
    x = video()
    return build("tokenizer", name, TINY_VIDEO), lambda m: m.loss(x).loss


def tokenizer_activation_checkpointing_keeps_the_step(name):
    same_training_step_with_activation_checkpointing(*_tokenizer_training_step(name))


def tokenizer_compile_keeps_the_step(name):
    same_training_step_compiled(*_tokenizer_training_step(name))


def tokenizer_overfits_one_batch(name):
    tok = build("tokenizer", name, TINY_VIDEO)
    x = video(frames=2)
    first, last = overfit(tok, lambda: tok.loss(x).loss)
    assert last < first / OVERFIT_FACTOR, (first, last)


# ------------------------------------------------------------------------------------------------ action models
# Models that read the footage's true actions (`reads_true_actions`) are handed them, as training does.


def true_actions(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Recorded actions for video x [B, T, ...]: [B, T - 1] in 0..TINY_VIDEO.true_actions - 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VIDEO.true_actions, (x.shape[0], x.shape[1] - 1), generator=g)


def action_model_shapes_and_dtypes(name):
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


def action_model_deterministic_under_seed(name):
    a, b = build("action_model", name, TINY_VIDEO, seed=5), build("action_model", name, TINY_VIDEO, seed=5)
    x = video()
    given = a.true_action_inputs(true_actions(x))
    torch.manual_seed(0)
    la = a.loss(x, **given).loss
    torch.manual_seed(0)
    lb = b.loss(x, **given).loss
    assert torch.equal(la, lb)


def action_model_causal_in_time(name):
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


def _action_model_training_step(name):
    """A tiny action model and its training loss on a tiny video (with its true actions, for one that reads them)."""
    lam = build("action_model", name, TINY_VIDEO)
    x = video()
    given = lam.true_action_inputs(true_actions(x))
    return lam, lambda m: m.loss(x, **given).loss


def action_model_activation_checkpointing_keeps_the_step(name):
    same_training_step_with_activation_checkpointing(*_action_model_training_step(name))


def action_model_compile_keeps_the_step(name):
    same_training_step_compiled(*_action_model_training_step(name))


def action_model_overfits_one_batch(name):
    lam = build("action_model", name, TINY_VIDEO)
    if not any(p.requires_grad for p in lam.parameters()):
        pytest.skip(f"{name} has no weights: nothing to learn")
    x = video(frames=3)
    given = lam.true_action_inputs(true_actions(x))
    first, last = overfit(lam, lambda: lam.loss(x, **given).loss)
    assert last < first / OVERFIT_FACTOR, (first, last)


# ------------------------------------------------------------------------------------------------ dynamics


def dynamics_shapes_and_dtypes(name):
    dyn = build("dynamics", name, token_spec()).eval()
    tokens, actions = tokens_and_actions()
    logits = dyn(tokens, actions)
    assert logits.shape == (*tokens.shape, token_spec().vocab_size) and logits.dtype == torch.float32
    out = dyn.loss(tokens, actions, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def dynamics_deterministic_under_seed(name):
    a, b = build("dynamics", name, token_spec(), seed=7), build("dynamics", name, token_spec(), seed=7)
    tokens, actions = tokens_and_actions()
    la = a.loss(tokens, actions, torch.Generator().manual_seed(1)).loss
    lb = b.loss(tokens, actions, torch.Generator().manual_seed(1)).loss
    assert torch.equal(la, lb)


def dynamics_causal_in_time(name):
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


def dynamics_action_t_steers_frame_t_plus_1(name):
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


def _dynamics_training_step(name):
    """A tiny dynamics model and its training loss on random tokens and actions, masks drawn from a fixed seed."""
    tokens, actions = tokens_and_actions()
    return (build("dynamics", name, token_spec()),
            lambda m: m.loss(tokens, actions, torch.Generator().manual_seed(0)).loss)


def dynamics_activation_checkpointing_keeps_the_step(name):
    same_training_step_with_activation_checkpointing(*_dynamics_training_step(name))


def dynamics_compile_keeps_the_step(name):
    same_training_step_compiled(*_dynamics_training_step(name))


def dynamics_overfits_one_batch(name):
    dyn = build("dynamics", name, token_spec())
    tokens, actions = tokens_and_actions(frames=3)
    first, last = overfit(dyn, lambda: dyn.loss(tokens, actions, torch.Generator().manual_seed(0)).loss)
    assert last < first / OVERFIT_FACTOR, (first, last)


def cached_logits_equal_whole_sequence_logits(name):
    """`CachedDynamics`: the logits of the frame after a prefilled history, and after a history extended frame by
    frame, are the logits `forward` gives for that frame; prefill and extend leave their inputs as they were."""
    dyn = build("dynamics", name, token_spec()).eval()
    tokens, actions = tokens_and_actions()
    g = torch.Generator().manual_seed(3)
    for t in (1, 3, tokens.shape[1] - 1):  # history lengths: the new frame is frame t
        mask = (torch.rand(tokens.shape[0], *tokens.shape[2:], generator=g) < 0.5) if dyn.supports_masking else None
        full_mask = None
        if mask is not None:
            full_mask = torch.zeros_like(tokens[:, : t + 1], dtype=torch.bool)
            full_mask[:, t] = mask
        history, before = tokens[:, :t], tokens[:, :t].clone()
        with torch.no_grad():
            full = dyn(tokens[:, : t + 1], actions[:, :t], full_mask)[:, t]
            cache = dyn.prefill(history, actions[:, : t - 1])
            cached = dyn.next_frame_logits(cache, tokens[:, t], actions[:, t - 1], mask)
        assert torch.equal(history, before)
        assert cached.shape == full.shape and torch.allclose(cached, full, atol=1e-4), (t, (cached - full).abs().max())
    with torch.no_grad():  # one frame at a time from the prompt
        cache = dyn.prefill(tokens[:, :1], actions[:, :0])
        for t in range(1, tokens.shape[1]):
            full = dyn(tokens[:, : t + 1], actions[:, :t])[:, t]
            assert torch.allclose(dyn.next_frame_logits(cache, tokens[:, t], actions[:, t - 1]), full, atol=1e-4), t
            if t < tokens.shape[1] - 1:
                dyn.extend(cache, tokens[:, t], actions[:, t - 1])


# ------------------------------------------------------------------------------------------------ samplers


def fits(sampler: str, dynamics: str, registry: Registry | None = None) -> bool:
    """What recipe validation allows: a sampler that drives masking needs a dynamics model that supports it."""
    registry = registry or get_registry()
    needs = registry.get("sampler", sampler.partition(":")[0]).cls.needs_masking
    return not needs or registry.get("dynamics", dynamics.partition(":")[0]).cls.supports_masking


def sampler_next_frame_shape_and_determinism(sampler_name, dynamics_name):
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


class WithoutCache:
    """A dynamics model seen without its cache: what a sampler does with a model that keeps no history."""

    def __init__(self, dynamics):
        self.dynamics = dynamics
        self.spec, self.supports_masking = dynamics.spec, dynamics.supports_masking
        self.causal_in_raster_order = dynamics.causal_in_raster_order

    def __call__(self, *args, **kwargs):
        return self.dynamics(*args, **kwargs)


def sampler_cached_gives_the_uncached_tokens(sampler_name, dynamics_name):
    """A sampler that samples from a dynamics model's cache draws exactly the tokens it draws from the whole
    history of a model without one, with the same generator."""
    sampler = build("sampler", sampler_name)
    dyn = build("dynamics", dynamics_name, token_spec()).eval()
    if not sampler.can_use_cache(dyn):
        pytest.skip(f"{sampler_name}'s tiny config does not sample from the cache")
    tokens, actions = tokens_and_actions()
    for t in (1, 2, tokens.shape[1] - 1):
        with torch.no_grad():
            whole = sampler.sample_next(WithoutCache(dyn), tokens[:, :t], actions[:, :t],
                                        torch.Generator().manual_seed(t))
            cache = dyn.prefill(tokens[:, :t], actions[:, : t - 1])
            cached = sampler.sample_cached(dyn, cache, actions[:, t - 1], torch.Generator().manual_seed(t))
        assert torch.equal(whole, cached), t


def sampler_refuses_a_dynamics_model_it_cannot_drive(sampler_name, dynamics_name):
    sampler, dyn = build("sampler", sampler_name), build("dynamics", dynamics_name, token_spec()).eval()
    tokens, actions = tokens_and_actions(frames=3)
    with pytest.raises((TypeError, ValueError), match="masking"):
        sampler.sample_next(dyn, tokens[:, :2], actions[:, :2], torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ sources


def source_contract(name):
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


# ------------------------------------------------------------------------------------------------ policies


def policy_acts_within_its_actions_and_repeats_under_a_seed(name):
    """Every action in [0, num_actions); the same seed, observations and info give the same actions."""
    info = get_registry().get("policy", name.partition(":")[0])
    spec, inputs = info.cls.contract_inputs(40)
    policy = build("policy", name, spec)
    played = []
    for _ in range(2):
        policy.reset(7)
        played.append([policy.act(observation, extra) for observation, extra in inputs])
    assert all(isinstance(a, int) and 0 <= a < spec.num_actions for a in played[0]), played[0]
    assert played[0] == played[1]


# ------------------------------------------------------------------------------------------------ the list

CHECKS = {
    "tokenizer": [tokenizer_shapes_and_dtypes, tokenizer_deterministic_under_seed,
                  tokenizer_round_trip_matches_training_path, tokenizer_causal_in_time, tokenizer_overfits_one_batch,
                  tokenizer_activation_checkpointing_keeps_the_step, tokenizer_compile_keeps_the_step],
    "action_model": [action_model_shapes_and_dtypes, action_model_deterministic_under_seed,
                     action_model_causal_in_time, action_model_overfits_one_batch,
                     action_model_activation_checkpointing_keeps_the_step, action_model_compile_keeps_the_step],
    "dynamics": [dynamics_shapes_and_dtypes, dynamics_deterministic_under_seed, dynamics_causal_in_time,
                 dynamics_action_t_steers_frame_t_plus_1, dynamics_overfits_one_batch,
                 dynamics_activation_checkpointing_keeps_the_step, dynamics_compile_keeps_the_step],
    "source": [source_contract],
    "policy": [policy_acts_within_its_actions_and_repeats_under_a_seed],
}
CAPABILITY_CHECKS = {"dynamics": [(CachedDynamics, cached_logits_equal_whole_sequence_logits)]}


def contract_checks(package: str | None = None, registry: Registry | None = None) -> list[Contract]:
    """Every check of every component registered by `package` (a distribution name; None: every installed one),
    for each tiny variant; samplers are checked with every dynamics model a recipe may pair them with, and a pair
    belongs to a package when either of its components does."""
    registry = registry or get_registry()

    def ours(kind: str, name: str) -> bool:
        return package is None or registry.get(kind, name.partition(":")[0]).owner.package == package

    out = []
    for kind, checks in CHECKS.items():
        for name in names(kind, registry):
            if not ours(kind, name):
                continue
            cls = registry.get(kind, name.partition(":")[0]).cls
            declared = [check for capability, check in CAPABILITY_CHECKS.get(kind, []) if issubclass(cls, capability)]
            out += [Contract(kind, (name,), check) for check in checks + declared]
    for sampler in names("sampler", registry):
        for dynamics in names("dynamics", registry):
            if not (ours("sampler", sampler) or ours("dynamics", dynamics)):
                continue
            if fits(sampler, dynamics, registry):
                checks = [sampler_next_frame_shape_and_determinism]
                if issubclass(registry.get("dynamics", dynamics.partition(":")[0]).cls, CachedDynamics):
                    checks.append(sampler_cached_gives_the_uncached_tokens)
            else:
                checks = [sampler_refuses_a_dynamics_model_it_cannot_drive]
            out += [Contract("sampler", (sampler, dynamics), check) for check in checks]
    return out

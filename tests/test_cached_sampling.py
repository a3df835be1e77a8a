"""Cached sampling: the history's temporal keys and values, kept once per frame, give the same logits and the same
sampled tokens as re-running the whole sequence at every MaskGIT step."""

from __future__ import annotations

import attrs
import pytest
import torch

from genie_core.nn import STTransformer
from genie_core.testing import build, token_spec
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


def test_a_cache_extended_frame_by_frame_matches_forward_past_its_room():
    """Frames appended one at a time (past the buffers' first room, which then grows) see the same keys and values
    as the whole sequence run at once."""
    torch.manual_seed(0)
    model = STTransformer(dim=32, depth=2, heads=2).eval()
    x = torch.randn(2, 14, 6, 32)
    full = model(x)
    _, cache = model.prefill(x[:, :1])
    for t in range(1, 14):
        assert torch.allclose(model.next_frame(x[:, t : t + 1], cache), full[:, t : t + 1], atol=1e-5)  # a peek
        assert cache.frames == t
        assert torch.allclose(model.next_frame(x[:, t : t + 1], cache, extend=True), full[:, t : t + 1], atol=1e-5)
        assert cache.frames == t + 1
    assert cache.keys[0].shape[2] >= 14


def test_a_few_frames_after_the_cache_run_in_one_pass_as_forward_runs_them():
    """Two and three new frames in one pass: each sees the cache, the new ones before it and itself, so their
    outputs are forward's; `commit` keeps the first, and the next frame after it still matches forward."""
    torch.manual_seed(0)
    model = STTransformer(dim=32, depth=2, heads=2).eval()
    x = torch.randn(2, 7, 6, 32)
    full = model(x)
    for new in (2, 3):
        _, cache = model.prefill(x[:, :3], capacity=7)
        with torch.no_grad():
            out = model.next_frame_tensors(x[:, 3 : 3 + new], cache)
        assert torch.allclose(out, full[:, 3 : 3 + new], atol=1e-5), new
        cache.commit()
        assert cache.frames == 4
        assert torch.allclose(model.next_frame(x[:, 4:5], cache), full[:, 4:5], atol=1e-5)


def test_maskgit_runs_a_finished_frame_with_the_next_step_and_gives_the_logits_it_would_alone():
    """extend() leaves the frame waiting in the cache; the next next_frame_logits runs it and the new frame in one
    pass (one call of the transformer, not two) and gives the logits running it alone gives. A second extend while
    one waits runs the first alone. A waiting frame counts against the model's room."""
    dynamics = build("dynamics", "maskgit", token_spec()).eval()
    tokens, actions = history_and_actions(token_spec().num_frames, seed=1)
    mask = torch.rand(tokens.shape[0], *tokens.shape[2:], generator=torch.Generator().manual_seed(2)) < 0.5
    passes = []
    run = dynamics.transformer.next_frame_tensors
    dynamics.transformer.next_frame_tensors = lambda x, cache: passes.append(x.shape[1]) or run(x, cache)
    logits = {}
    with torch.no_grad():
        for defer in (False, True):
            dynamics.defer_extend = defer
            cache = dynamics.prefill(tokens[:, :2], actions[:, :1])
            passes.clear()
            dynamics.extend(cache, tokens[:, 2], actions[:, 1])
            dynamics.extend(cache, tokens[:, 3], actions[:, 2])
            steps = [dynamics.next_frame_logits(cache, tokens[:, 4], actions[:, 3], mask) for _ in range(2)]
            logits[defer] = (steps, list(passes), cache.frames)
    assert logits[False][1] == [1, 1, 1, 1] and logits[True][1] == [1, 2, 1]
    assert logits[False][2] == logits[True][2] == 4
    for alone, together in zip(logits[False][0], logits[True][0]):
        assert torch.allclose(alone, together, atol=1e-5), (alone - together).abs().max()
    with torch.no_grad():
        n = token_spec().num_frames
        cache = dynamics.prefill(tokens[:, : n - 1], actions[:, : n - 2])
        dynamics.extend(cache, tokens[:, n - 1], actions[:, n - 2])
        with pytest.raises(ValueError, match=f"the cache holds {n} frames"):
            dynamics.next_frame_logits(cache, tokens[:, n - 1], actions[:, n - 1])


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


def tiny_world(cache: bool, window: str = "slide", context: int = 0, dynamics_name: str = "maskgit"):
    from genie_core.config import WorldConfig
    from genie_core.testing import TINY_VIDEO
    from genie_core.world.model import World

    torch.manual_seed(0)
    tokenizer = build("tokenizer", "st-vivit", TINY_VIDEO).eval()
    lam = build("action_model", "pixel-lam", TINY_VIDEO).eval()
    spec = attrs.evolve(token_spec(), vocab_size=tokenizer.codebook_size, grid=tokenizer.grid)
    dynamics = build("dynamics", dynamics_name, spec).eval()
    sampler = MaskGITSampler(MaskGITSamplerConfig(steps=3, cache=cache))
    return World(tokenizer, lam, dynamics, sampler, WorldConfig(context=context, window=window))


@pytest.mark.parametrize("window", ["slide", "block"])
@pytest.mark.parametrize("dynamics_name", VARIANTS)
def test_world_rollout_past_its_context_is_the_same_cached(window, dynamics_name):
    """Three windows' worth of frames: the cache is extended frame by frame and rebuilt when the window moves; the
    frames equal those of the uncached sampler, which re-runs the history at every MaskGIT step."""
    videos = []
    for cache in (False, True):
        world = tiny_world(cache, window, dynamics_name=dynamics_name)
        prompt = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        actions = torch.randint(0, world.num_actions, (2, 3 * world.context),
                                generator=torch.Generator().manual_seed(4))
        videos.append(world.rollout(prompt, actions, torch.Generator().manual_seed(1)))
    assert videos[0].shape[1] == 3 * world.context + 1
    assert torch.equal(videos[0], videos[1])


@pytest.mark.parametrize("window, context, expected_prefills", [
    ("slide", 0, 1 + 12),  # context 6: the first 5 new frames extend one cache; then the window moves every step
    ("block", 0, 1 + 6),  # keep 5, stride 2: the window's start moves at frames 6, 8, 10, ... (every other step)
    ("slide", 3, 1 + 15),
])
def test_rollout_extends_its_cache_until_the_window_moves(window, context, expected_prefills):
    from genie_core.world.model import Rollout, history_start

    world = tiny_world(True, window, context)
    keep = world.context - 1
    rollout = Rollout(world, torch.randint(0, 32, (1, 1, 4, 4)))
    starts, history = [], []
    for step in range(17):
        starts.append(history_start(rollout.frames, keep, 1 if window == "slide" else max(1, keep // 2)))
        history.append(rollout.frames - starts[-1])
        rollout.step(torch.tensor([step % world.num_actions]))
    assert rollout.frames == 18 and rollout.actions.shape == (1, 17)
    assert rollout.prefills == expected_prefills == 1 + sum(a != b for a, b in zip(starts, starts[1:]))
    assert max(history) == keep and min(history[keep:]) == (keep if window == "slide" else keep - keep // 2 + 1)


def test_rollout_undo_then_replay_gives_the_same_frames():
    from genie_core.world.model import Rollout

    world = tiny_world(True)
    prompt = torch.randint(0, 32, (1, 1, 4, 4))
    first = Rollout(world, prompt)
    for action in (0, 1, 2, 3):
        first.step(torch.tensor([action]), torch.Generator().manual_seed(action))
    kept = first.tokens.clone()
    first.truncate(3)  # undo two frames
    assert first.frames == 3 and first.actions.tolist() == [[0, 1]]
    for action in (2, 3):
        first.step(torch.tensor([action]), torch.Generator().manual_seed(action))
    assert torch.equal(first.tokens, kept)
    first.truncate(0)  # reset keeps the prompt
    assert torch.equal(first.tokens, prompt) and first.actions.shape == (1, 0)


@pytest.mark.parametrize("window", ["slide", "block"])
def test_rollout_rebuilds_its_cache_in_its_own_tensors(window):
    """Moving windows, an undo and a reset rebuild the cache into the tensors it had (the addresses a captured CUDA
    graph reads and writes), and the frames still equal those of the uncached sampler."""
    from genie_core.world.model import Rollout

    prompt = torch.randint(0, 32, (1, 1, 4, 4), generator=torch.Generator().manual_seed(2))
    uncached, cached = (Rollout(tiny_world(cache, window), prompt) for cache in (False, True))
    addresses = None
    for step in range(16):
        if step in (10, 13):  # undo three frames, then reset
            for rollout in (uncached, cached):
                rollout.truncate(rollout.frames - 3 if step == 10 else 0)
        for rollout in (uncached, cached):
            rollout.step(torch.tensor([step % 4]), torch.Generator().manual_seed(step))
        cache = cached._cache
        now = [t.data_ptr() for t in (*cache.keys, *cache.values, cache.slot)]
        addresses = addresses or now
        assert now == addresses, f"step {step}: the cache moved"
    assert cached.prefills >= 5
    assert torch.equal(uncached.tokens, cached.tokens)


def test_a_cache_refills_only_from_one_of_its_shape():
    torch.manual_seed(0)
    model = STTransformer(dim=32, depth=2, heads=2).eval()
    x = torch.randn(2, 6, 6, 32)
    _, cache = model.prefill(x[:, :2], capacity=6)
    _, longer = model.prefill(x[:, 1:5], capacity=6)
    assert cache.refill(longer) and cache.frames == 4 and int(cache.slot) == 4
    assert all(torch.equal(a, b) for a, b in zip(cache.keys + cache.values, longer.keys + longer.values))
    assert torch.allclose(model.next_frame(x[:, 5:], cache), model(x[:, 1:])[:, 4:], atol=1e-5)
    _, other_batch = model.prefill(x[:1, :2], capacity=6)
    _, other_room = model.prefill(x[:, :2], capacity=8)
    _, other_depth = STTransformer(dim=32, depth=3, heads=2).eval().prefill(x[:, :2], capacity=6)
    assert not any(cache.refill(other) for other in (other_batch, other_room, other_depth)) and cache.frames == 4


def test_world_context_longer_than_trained_is_refused():
    from genie_core.errors import GenieError

    with pytest.raises(GenieError, match="context 7 is longer than the 6 frames"):
        tiny_world(True, context=7)


def test_a_world_context_of_one_frame_is_refused():
    """A context of 1 holds the new frame alone: no history, so neither the prompt nor the action would reach it."""
    from genie_core.config import WorldConfig, checked_config
    from genie_core.errors import RecipeError

    with pytest.raises(RecipeError) as refused:
        checked_config(WorldConfig, {"context": 1}, "recipe.toml [world]")
    assert refused.value.problems == ["recipe.toml [world]: key 'context': 'context' must be 0 (as many frames as the "
                                      "world was trained on) or at least 2 (the new frame and one before it): 1"]
    with pytest.raises(ValueError, match="'context' must be 0"):
        WorldConfig(context=1)
    assert [WorldConfig(context=n).context for n in (0, 2)] == [0, 2]


@pytest.mark.parametrize("cache", [False, True])
def test_actions_of_another_type_or_shape_are_refused(cache):
    """Float actions (truncated by the uncached sampler, a dtype error in the cached one), a batch other than the
    prompt's (a torch.cat error) and one-dimensional actions (an IndexError) are refused up front, by name."""
    from genie_core.errors import GenieError
    from genie_core.world.model import Rollout

    world = tiny_world(cache)
    prompt = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    tokens = world.encode_prompt(prompt)
    cases = [
        (torch.tensor([[1.0, 2.0], [0.0, 3.0]]), "actions must be integers (torch.long), got torch.float32"),
        (torch.tensor([[True], [False]]), "actions must be integers (torch.long), got torch.bool"),
        (torch.tensor([1, 2]), "actions have shape [2]; expected [B, S], a row of actions per prompt"),
        (torch.tensor([[1, 2]]), "actions are for a batch of 1, the prompt's is 2; expected [B, S] with B = 2"),
        ([[1, 2], [0, 3]], "actions must be a tensor of integers [B, S], got list"),
        (torch.tensor([[1, 9], [0, 3]]), "action 9 is out of range; this world has actions 0..3"),
    ]
    for actions, message in cases:
        with pytest.raises(GenieError) as refused:
            world.generate_tokens(tokens, actions)
        assert str(refused.value) == message
        with pytest.raises(GenieError) as refused:
            world.rollout(prompt, actions)
        assert str(refused.value) == message
    rollout = Rollout(world, tokens)
    for action, message in [(torch.tensor([1.0, 2.0]), "actions must be integers (torch.long), got torch.float32"),
                            (torch.tensor([[1], [2]]), "actions have shape [2, 1]; expected [B], one per prompt"),
                            (torch.tensor([1]), "actions are for a batch of 1, the prompt's is 2; expected [B] "
                                                "with B = 2")]:
        with pytest.raises(GenieError) as refused:
            rollout.step(action)
        assert str(refused.value) == message
    assert rollout.frames == 1
    assert world.generate_tokens(tokens, torch.tensor([[1, 2], [0, 3]], dtype=torch.int32)).shape[1] == 3


def test_draw_categorical_follows_the_probabilities():
    from genie_core.nn import draw_categorical

    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0],  # zeros first, between and last
                          [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    draws = draw_categorical(probs[:, None].expand(3, 100_000, 6), torch.Generator().manual_seed(0))
    assert draws.shape == (3, 100_000) and draws.dtype == torch.long
    for row, p in zip(draws, probs):
        freq = torch.bincount(row, minlength=6).float() / row.numel()
        assert torch.allclose(freq, p, atol=0.01)
        assert (freq[p == 0] == 0).all()  # never an impossible entry
    again = draw_categorical(probs[:, None].expand(3, 100_000, 6), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def rollout_tokens(world, steps: int = 14) -> torch.Tensor:
    from genie_core.world.model import Rollout

    rollout = Rollout(world, torch.randint(0, 32, (2, 1, 4, 4), generator=torch.Generator().manual_seed(5)))
    actions = torch.randint(0, world.num_actions, (2, steps), generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        rollout.step(actions[:, step], generator)
    return rollout.tokens


@pytest.mark.parametrize("window", ["slide", "block"])
def test_compiled_cached_steps_trace_once_whatever_the_history(window):
    """A step's shapes never change: over two windows' worth of frames (the cache extended, rebuilt, extended
    again) the compiled step is traced once for the logits and once for extending, never again."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    eager, compiled = tiny_world(True, window), tiny_world(True, window)
    counter = CompileCounter()
    compiled.dynamics.compile_cached_steps(backend=counter)
    assert torch.equal(rollout_tokens(eager), rollout_tokens(compiled))
    assert counter.frame_count == 2


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_cached_steps_give_the_same_tokens(mode):
    """torch.compile's generated kernels (inductor) against the eager model: the same frames. (reduce-overhead
    captures CUDA graphs on a GPU; on the CPU it runs the same wrapper without them.)"""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    eager, compiled = tiny_world(True), tiny_world(True)
    compiled.dynamics.compile_cached_steps(mode=mode)
    assert torch.equal(rollout_tokens(eager), rollout_tokens(compiled))


@pytest.mark.parametrize("backend", ["count", "inductor"])
def test_the_shown_frames_decoding_compiles_once_and_draws_the_eager_pixels(backend):
    """`World.compile_shown_decoding` (`genie play --compile`): with `[world] decode_frames` set, every frame of a
    session decodes the same number of frames, so one graph serves them all (traced once) and its pixels are the
    eager decoder's (also through inductor's generated kernels); with 0 (the whole window, growing) it stays eager."""
    import shutil

    from torch._dynamo.testing import CompileCounter

    from genie_core.world.model import Rollout

    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    world = tiny_world(True)
    assert not world.compile_shown_decoding()  # decode_frames = 0
    world.config = attrs.evolve(world.config, decode_frames=2)
    counter = CompileCounter()
    assert world.compile_shown_decoding(backend=counter if backend == "count" else backend)
    rollout = Rollout(world, torch.randint(0, 32, (1, 1, 4, 4), generator=torch.Generator().manual_seed(5)))
    for step in range(2 * world.tokenizer.spec.num_frames):  # past the tokenizer's window
        rollout.step(torch.tensor([step % world.num_actions]))
        shown = world.decode_shown(rollout.tokens)
        eager = world.tokenizer.decode(rollout.tokens[:, -2:])[:, -1:]
        assert shown.shape == eager.shape and torch.allclose(shown, eager, atol=1e-5), step
    assert counter.frame_count == (1 if backend == "count" else 0)


def test_a_step_past_the_models_length_is_refused():
    dynamics = build("dynamics", "maskgit", token_spec()).eval()
    n = token_spec().num_frames
    history, actions = history_and_actions(n)
    with torch.no_grad():
        cache = dynamics.prefill(history, actions[:, :-1])
        with pytest.raises(ValueError, match=f"the cache holds {n} frames; this model was built for {n} in all"):
            dynamics.next_frame_logits(cache, history[:, -1], actions[:, -1])


def test_play_draws_each_new_frame_from_the_decode_frames_it_is_given():
    """`[world] decode_frames`: play decodes a new frame from that many frames (itself included); 0 or more than the
    tokenizer's window is the whole window, exactly as rollouts are decoded. The tokens are not touched."""
    world = tiny_world(cache=True)
    window = world.tokenizer.spec.num_frames
    tokens = world.generate_tokens(world.encode_prompt(torch.rand(1, 3, 16, 16)),
                                   torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0, 1]]))  # more frames than the window
    assert tokens.shape[1] > window
    exact = world.decode(tokens)[:, -1:]
    assert torch.equal(world.decode_shown(tokens), exact)  # decode_frames = 0: the whole window
    for frames, expected in ((1, world.tokenizer.decode(tokens[:, -1:])),
                             (2, world.tokenizer.decode(tokens[:, -2:])[:, -1:]), (window + 5, exact)):
        world.config = attrs.evolve(world.config, decode_frames=frames)
        assert torch.equal(world.decode_shown(tokens), expected)
    assert not torch.equal(world.tokenizer.decode(tokens[:, -1:]), exact)  # the context does change the pixels

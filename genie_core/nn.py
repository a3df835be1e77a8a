"""Building blocks shared by the first-party plugins and open to third-party ones.

- `STTransformer`: the paper's spatiotemporal transformer. Each block runs spatial attention inside every frame,
  then causal temporal attention across frames at every token position, then an MLP. Cost is linear in T for the
  dominant spatial part. Attention and MLP layers come from timm (optional QK-norm); every attention runs through
  `scaled_dot_product_attention` (torch's fused SDPA; on a CPU, written out in compiled training steps and kept in
  float32 elsewhere under autocast, where SDPA's bf16 backward pass is slower).
  Past frames never see later ones, so their temporal keys and values can be kept: `prefill` runs the history once
  and returns them (`FrameCache`), `next_frame` runs one more frame against them (cached sampling), and
  `next_frame_tensors` any few more frames in one pass.
- `FullSTTransformer`: full spatiotemporal attention over all T*N tokens, causal in time (C-ViViT's); quadratic in
  T*N. `AttentionBlock` is its block, also used with plain causal order by the autoregressive dynamics model.
- `Quantizer`: the one adapter over vector-quantize-pytorch that every tokenizer and action model uses; the
  quantizer is chosen by name (`QUANTIZERS`): VQ with a learned codebook, FSQ or LFQ.
- `patchify` / `unpatchify`: frames <-> flattened non-overlapping patches.
- `draw_categorical`: one sample per row of a probability table, for the samplers.
- `run_block` / `use_activation_checkpointing`: activation checkpointing for any module that runs blocks in
  sequence (`train.*.activation_checkpointing`): each block's activations are recomputed in the backward pass
  instead of kept, so a batch needs about one block's activations instead of the whole stack's;
  `saved_activation_bytes` measures what a step keeps for its backward pass, on any device.
  `compile_block_stacks`: the same stacks' training forward through torch.compile (`train.*.compile`);
  `compile_fixed_shapes`: play's per-frame work through torch.compile (and CUDA graphs), one graph per shape.
- `as_at_play_time`: a frozen model inside a training step computes as at play time (float32, no gradients).
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import TYPE_CHECKING

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

if TYPE_CHECKING:
    from timm.layers import Attention

# timm and vector-quantize-pytorch are imported where a layer is built, not here: importing timm takes seconds (it
# brings torchvision and torch._dynamo), which every `genie` command that loads the plugins would otherwise pay.

QUANTIZERS = ("vq", "fsq", "lfq")


def run_block(owner: nn.Module, block: nn.Module, *args, **kwargs):
    """block(*args, **kwargs), or the same under activation checkpointing when `owner` has it on and gradients are
    being recorded: the block keeps only its inputs for the backward pass and runs again there. The values and
    gradients are the same either way; a frozen model (no gradients recorded) never recomputes."""
    if owner.activation_checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


@contextlib.contextmanager
def as_at_play_time(like: torch.Tensor):
    """For a frozen model inside a training step: no gradients and no autocast, so in a bf16 or fp16 run it still
    computes in float32, as at play time, and what it hands the trained models (tokens, actions) is what they are
    given there. `like`: a tensor on the step's device."""
    with torch.no_grad(), torch.autocast(like.device.type, enabled=False):
        yield


def block_stacks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, submodule) for every submodule of `module` that runs transformer blocks in sequence: those that declare
    an `activation_checkpointing` attribute (and run their blocks through `run_block`)."""
    return [(name, sub) for name, sub in module.named_modules() if hasattr(sub, "activation_checkpointing")]


def use_activation_checkpointing(module: nn.Module) -> list[str]:
    """Turns on activation checkpointing in every block stack of `module` (`block_stacks`); returns their names."""
    stacks = block_stacks(module)
    for _, stack in stacks:
        stack.activation_checkpointing = True
    return [name for name, _ in stacks]


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." line. A CUDA build of torch says it once per
    process when the compiler builds its first CPU kernel on a machine with a CUDA toolkit and no GPU: nothing is
    wrong (the kernels are C++), but the line lands in the middle of a progress bar and reads like an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _quiet_cuda_runtime_note() -> None:
    """Installs `_NoCudaRuntimeNote` on the logger of torch's C++ builder (once), before anything compiles."""
    builder = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in builder.filters):
        builder.addFilter(_NoCudaRuntimeNote())


def _forward_compiled_in_training(self, *args, **kwargs):
    """The forward of a block stack that `compile_block_stacks` compiled."""
    if self.training and torch.is_grad_enabled():
        return self._compiled_forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def compile_block_stacks(module: nn.Module, **torch_compile_options) -> list[str]:
    """Runs the forward of every block stack of `module` (`block_stacks`) through torch.compile while it trains (in
    train mode, gradients recorded); returns their names. Evaluation, validation and sampling keep the eager forward:
    each of their modes and shapes would compile again, for a few calls. What is compiled is the stacks alone: the
    quantizers (vector-quantize-pytorch's codebook updates stop dynamo), losses and optimizer stay eager. Weights
    and state_dict keys are unchanged, so a checkpoint loads either way."""
    _quiet_cuda_runtime_note()
    stacks = block_stacks(module)
    for _, stack in stacks:
        if "forward" not in vars(stack):  # not compiled yet
            stack._compiled_forward = torch.compile(type(stack).forward,
                                                    **({"dynamic": False} | torch_compile_options))
            stack.forward = types.MethodType(_forward_compiled_in_training, stack)  # a copy of the module rebinds it
    return [name for name, _ in stacks]


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that capture CUDA graphs


def compile_fixed_shapes(fn, static=None, **torch_compile_options):
    """`fn` through torch.compile for calls whose shapes never change (play's per-frame work), as a function taking
    the same arguments. Compiled code is guarded on its inputs' strides, and play's inputs are often slices of growing
    tensors: every tensor argument is passed as a fresh contiguous copy, so every call stays on one graph. Under the
    modes that capture CUDA graphs, `static(*args)` names the tensors the graph may write into (their addresses must
    hold from call to call), and the output is copied out, since the next replay overwrites it."""
    _quiet_cuda_runtime_note()
    compiled = torch.compile(fn, **({"dynamic": False} | torch_compile_options))
    graphs = torch_compile_options.get("mode") in CUDA_GRAPH_MODES

    def call(*args):
        fresh = [a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a for a in args]
        if not graphs:
            return compiled(*fresh)
        for buffer in static(*args) if static else ():
            torch._dynamo.mark_static_address(buffer, guard=False)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*fresh).clone()
    return call


def saved_activation_bytes(step, module: nn.Module | None = None):
    """Runs step() and returns (its result, the bytes autograd keeps for the backward pass meanwhile): every distinct
    tensor saved for backward, `module`'s own weights excepted. What a training step holds between forward and
    backward, counted the same way on any device (activation checkpointing keeps each block's inputs only)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and tensor.device.type != "meta":
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    return result, sum(kept.values())


def patchify(video: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, (H/p)*(W/p), C*p*p]."""
    return rearrange(video, "b t c (h p1) (w p2) -> b t (h w) (c p1 p2)", p1=patch, p2=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """[B, T, h*w, C*p*p] -> [B, T, C, h*p, w*p]."""
    h, w = grid
    return rearrange(patches, "b t (h w) (c p1 p2) -> b t c (h p1) (w p2)", h=h, w=w, c=channels, p1=patch, p2=patch)


def draw_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs [..., V] (rows summing to about 1) -> one index per row [...], drawn with probability probs[i].

    Inverse-CDF sampling: one uniform number per row, found in the row's running sum (in float64, so rounding
    cannot step into a zero-probability entry). torch.multinomial draws one exponential number per entry instead
    (16k per frame of 64 tokens over 256 codes: most of a cached sampling step on a CPU) and checks its input with
    two device syncs per call on a GPU."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(*probs.shape[:-1], 1, generator=generator, device=probs.device, dtype=torch.float64)
    # Boundaries between entries: an index counts the boundaries at or below u * total, so it lies in 0..V-1.
    return torch.searchsorted(cdf[..., :-1].contiguous(), u * cdf[..., -1:], right=True).squeeze(-1)


class STBlock(nn.Module):
    """Spatial attention (per frame), causal temporal attention (per position), MLP; pre-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, temporal: bool = True):
        from timm.layers import Attention, Mlp

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
        return self.run(x)[0]  # [B, T, N, D]

    def run(self, x: torch.Tensor, with_past=None):
        """The block, with its temporal attention written out for cached sampling. Returns the output and this
        block's temporal keys and values of x's frames (None without temporal attention). With `with_past`, x is
        one frame, or a few, that follow earlier ones: with_past(k, v) gives the keys and values of those and of x,
        and a bool mask [F, S] of the ones each of x's F frames attends to."""
        b, t, n, d = x.shape
        x = x + self_attention(self.spatial, self.norm_spatial(x).reshape(b * t, n, d)).reshape(b, t, n, d)
        kv = None
        if self.temporal is not None:
            q, k, v = _heads(self.temporal, self.norm_temporal(x).transpose(1, 2).reshape(b * n, t, d))
            kv = (k, v)
            if with_past is None:
                y = _attend(self.temporal, q, k, v, is_causal=True)
            else:  # each new frame sees every earlier frame and itself
                k, v, visible = with_past(k, v)
                y = _attend(self.temporal, q, k, v, mask=visible)
            x = x + y.reshape(b, n, t, d).transpose(1, 2)
        return x + self.mlp(self.norm_mlp(x)), kv


def _heads(attention: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm Attention's queries, keys and values for [L, S, D]: each [L, heads, S, head_dim], keys and queries
    normed."""
    qkv = attention.qkv(x).reshape(x.shape[0], x.shape[1], 3, attention.num_heads, attention.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention.q_norm(q), attention.k_norm(k), v


def _attend(attention: Attention, q, k, v, is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention and timm Attention's output projection: [L, heads, S, hd] -> [L, S, D]."""
    out = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return attention.proj(attention.norm(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], attention.attn_dim)))


def self_attention(attention: Attention, x: torch.Tensor, mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    """What timm's `attention(x, attn_mask=mask, is_causal=is_causal)` computes for [L, S, D] (no dropout), through
    `scaled_dot_product_attention`."""
    return _attend(attention, *_heads(attention, x), is_causal=is_causal, mask=mask)


# How a compiled training step on a CPU attends: "written-out" (the products, mask and softmax as plain operations,
# which inductor fuses with the code around them) or "sdpa" (torch's fused kernel, an opaque call). benchmarks/
# step_turns.py sets "sdpa" for its `compiled-sdpa` variant, to compare.
COMPILED_CPU_TRAINING_ATTENTION = "written-out"


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                                 is_causal: bool = False) -> torch.Tensor:
    """torch's SDPA, except on a CPU:
    - in a compiled training step (`compile_block_stacks`), attention written out (`written_out_attention`) at
      autocast's precision: SDPA's fused CPU kernel is an opaque call the compiler cannot fuse, and its backward
      pass is 3 to 4 times slower in bf16 than in float32; written out, the compiler fuses the scale, mask and
      softmax with the code around them, and bf16 products run at the CPU's bf16 rate (the tiny bf16 steps 1.41x
      and 1.34x of float32 against 1.31x and 1.27x; float32 steps as before: benchmarks/README.md, "What is left to
      take, by profile");
    - elsewhere under autocast, SDPA on the float32 inputs, for the same slow bf16 backward pass. The products
      around it keep autocast's precision.
    Sampling and play (no gradients) and a GPU (whose flash kernels are fastest in half precision) run SDPA as
    autocast runs it."""
    on_cpu = q.device.type == "cpu"
    if (on_cpu and COMPILED_CPU_TRAINING_ATTENTION == "written-out" and torch.compiler.is_compiling()
            and torch.is_grad_enabled()):
        return written_out_attention(q, k, v, mask=mask, is_causal=is_causal)
    if on_cpu and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal)
        return out.to(torch.get_autocast_dtype("cpu"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                          is_causal: bool = False) -> torch.Tensor:
    """What SDPA computes (bool `mask`: True where a query may attend; `is_causal`: each query the keys up to its
    own position), as plain operations: the products at the inputs' precision (autocast's), the softmax in float32."""
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(v.dtype) @ v


class FrameCache:
    """Per block, the temporal keys and values of the frames run so far, in buffers of fixed room
    ([B*N, heads, capacity, hd] each). New frames are written in place from `slot` on and attention reads the whole
    buffer under a mask of the filled slots, so every step of a frame runs the same shapes on the same tensors (what
    torch.compile and CUDA graphs need: nothing is re-traced or re-captured from frame to frame). The room doubles
    only when a committed frame fills it.

    `deferred` holds a model's inputs for finished frames it was asked to add but has not run yet (opaque to the
    cache): a model may run them together with its next step, one pass of a few frames instead of a pass for each,
    which on a small model costs far less than a pass for each (its time goes to streaming weights and per-call
    overhead, not arithmetic)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], capacity: int = 0):
        """keys and values [B*N, heads, T, hd] per block; room for `capacity` frames (at least T + 1)."""
        self.frames = keys[0].shape[2]
        self.capacity = max(capacity, self.frames + 1)
        self.keys = [self._room(k, self.capacity) for k in keys]
        self.values = [self._room(v, self.capacity) for v in values]
        self.slot = torch.tensor(self.frames, device=keys[0].device)  # where the next frame goes, as a tensor
        self._slots = torch.arange(self.capacity, device=keys[0].device)
        self.deferred: list = []

    @staticmethod
    def _room(x: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = x.new_zeros(*x.shape[:2], capacity, x.shape[3])  # zeros: masked slots must not hold NaN (0 * NaN)
        buffer[:, :, : x.shape[2]] = x
        return buffer

    def next_slots(self, frames: int = 1) -> torch.Tensor:
        """The slots of the next `frames` frames after the cached ones, [frames], as a tensor."""
        return self.slot + torch.arange(frames, device=self.slot.device)

    def visible(self, frames: int = 1) -> torch.Tensor:
        """Bool [frames, capacity]: the slots each of the next `frames` frames attends to (the cached frames, the new
        ones before it, and its own)."""
        return self._slots[None] <= self.next_slots(frames)[:, None]

    def with_next(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's key and value buffers with the next frames' (k, v [B*N, heads, F, hd]) written into the F
        slots after the cached frames (overwritten by the next call until `commit`). Read them under `visible(F)`.
        The room must be there: capacity >= frames + F."""
        slots = self.next_slots(k.shape[2])
        self.keys[block].index_copy_(2, slots, k)
        self.values[block].index_copy_(2, slots, v)
        return self.keys[block], self.values[block]

    def refill(self, other: "FrameCache") -> bool:
        """Takes `other`'s frames into this cache's own tensors, when their shapes match (False when not): a window
        rebuilt in place keeps the addresses a captured CUDA graph reads and writes, so it replays instead of
        recording again for every new window."""
        mine, theirs = (*self.keys, *self.values), (*other.keys, *other.values)
        if self.capacity != other.capacity or len(mine) != len(theirs) or any(
                (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device) for a, b in zip(mine, theirs)):
            return False
        for a, b in zip(mine, theirs):
            a.copy_(b)
        self.frames, self.deferred = other.frames, list(other.deferred)
        self.slot.copy_(other.slot)
        return True

    def commit(self) -> None:
        """The first frame last written by `with_next` joins the cached frames (any after it stay uncommitted)."""
        self.frames += 1
        self.slot += 1
        if self.frames == self.capacity:  # full: double the room of every block
            self.capacity *= 2
            self.keys = [self._room(x, self.capacity) for x in self.keys]
            self.values = [self._room(x, self.capacity) for x in self.values]
            self._slots = torch.arange(self.capacity, device=self.slot.device)


class STTransformer(nn.Module):
    """A stack of STBlocks with a final LayerNorm. Input and output [B, T, N, D]."""

    activation_checkpointing = False  # `use_activation_checkpointing` turns it on for training

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 temporal: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(STBlock(dim, heads, mlp_ratio, qk_norm, temporal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = run_block(self, block, x)
        return self.norm(x)

    def prefill(self, x: torch.Tensor, capacity: int = 0) -> tuple[torch.Tensor, FrameCache]:
        """`forward` of frames [B, T, N, D] that also returns every block's temporal keys and values, in a cache
        with room for `capacity` frames."""
        keys, values = [], []
        for block in self.blocks:
            x, (k, v) = block.run(x)
            keys.append(k)
            values.append(v)
        return self.norm(x), FrameCache(keys, values, capacity)

    def next_frame(self, x: torch.Tensor, cache: FrameCache, extend: bool = False) -> torch.Tensor:
        """One more frame [B, 1, N, D] after the frames in `cache`: the same output `forward` would give for it as
        the last frame of the whole sequence, at the cost of one frame. With `extend`, the frame's keys and values
        join the cache (a finished frame that later frames will see); without, the cached frames stay as they were."""
        if x.shape[1] != 1:
            raise ValueError(f"next_frame takes one frame, got {x.shape[1]}")
        x = self.next_frame_tensors(x, cache)
        if extend:
            cache.commit()
        return x

    def next_frame_tensors(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        """`next_frame` without its checks and its commit: tensor work only, the same every step (what a compiled
        or graph-captured step runs). x may hold a few frames [B, F, N, D] that follow the cached ones, run in one
        pass: each sees the cache and those before it, as `forward` would, and their keys and values fill the F
        slots after the cached frames (`commit` keeps the first). The cache must have room for them."""
        visible = cache.visible(x.shape[1])
        for i, block in enumerate(self.blocks):
            x, _ = block.run(x, lambda k, v, i=i: (*cache.with_next(i, k, v), visible))
        return self.norm(x)


class SpaceTimePositions(nn.Module):
    """Learned spatial and temporal position embeddings, added to [B, T, N, D]."""

    def __init__(self, dim: int, num_positions: int, max_frames: int):
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        self.temporal = nn.Parameter(torch.randn(max_frames, dim) * 0.02)

    def forward(self, x: torch.Tensor, first_frame: int | torch.Tensor = 0) -> torch.Tensor:
        """x holds frames first_frame, first_frame + 1, ... of a sequence. A tensor first_frame (a cache's slot) is
        read as a tensor: nothing for a compiled step to specialise on."""
        if isinstance(first_frame, torch.Tensor):
            frames = first_frame.view(1) + torch.arange(x.shape[1], device=first_frame.device)
            return x + self.spatial[None, None] + self.temporal.index_select(0, frames)[None, :, None]
        end = first_frame + x.shape[1]
        if end > self.temporal.shape[0]:
            raise ValueError(f"sequence of {end} frames is longer than the {self.temporal.shape[0]} this model was "
                             f"built for")
        return x + self.spatial[None, None] + self.temporal[None, first_frame:end, None]


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
        from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

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
            levels = fsq_levels(codebook_size)
            # A level of 2 needs FSQ's symmetric grid (vector-quantize-pytorch refuses it otherwise): 6 actions are
            # [3, 2], 1024 codes [8, 8, 8, 2].
            self.fsq = FSQ(levels=levels, dim=dim, preserve_symmetry=2 in levels)
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
        from timm.layers import Attention, Mlp

        super().__init__()
        self.norm_attention = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self_attention(self.attention, self.norm_attention(x), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.norm_mlp(x))


class FullSTTransformer(nn.Module):
    """Full spatiotemporal attention, causal in time (C-ViViT's): every token attends to every token of its own frame
    and of all earlier frames. Input and output [B, T, N, D], like `STTransformer`.

    Cost is quadratic in T*N per block, against the ST-transformer's per-frame spatial (quadratic in N, linear in T)
    plus per-position temporal attention (quadratic in T): the price of letting any token see any earlier token
    directly. The boolean mask also keeps SDPA off its flash kernel on GPUs.
    """

    activation_checkpointing = False

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, n, d = x.shape
        mask = block_causal_mask(t, n, x.device)
        x = x.reshape(b, t * n, d)
        for block in self.blocks:
            x = run_block(self, block, x, mask)
        return self.norm(x).reshape(b, t, n, d)

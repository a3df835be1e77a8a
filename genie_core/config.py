"""Typed configs (frozen attrs classes) and the checker that builds one from a recipe table, collecting every problem.

Config fields carry plain types (int, float, bool, str) and attrs validators; `build_config` checks each key on its
own so that `genie validate` can report all problems of a recipe at once instead of stopping at the first.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
from attrs import validators as v

positive = v.gt(0)
non_negative = v.ge(0)
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes (`genie play` and `sample` check theirs)
MAX_LAYERS = 256  # transformer layers per stack (the paper's largest has 36; GPT-3 has 96): beyond is a typo
layers = [positive, v.le(MAX_LAYERS)]


def unit_interval(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"'{attribute.name}' must be in [0, 1]: {value}")


def folder_name(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    """One folder name: the run stays inside out_dir (no separators, no '..')."""
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError(f"{value!r} is not a folder name (one name, no '/', '\\' or '..': the run folder is "
                         f"out_dir/name)")


def check_heads(config) -> None:
    """For a component config's __attrs_post_init__: attention heads must split the width evenly."""
    if config.dim % config.heads:
        raise ValueError(f"'dim' ({config.dim}) must be divisible by 'heads' ({config.heads})")


def check_patch_divides_resolution(config, data, train) -> list[str]:  # noqa: ARG001 - the check_recipe signature
    """A component's `check_recipe`: its patch size must tile the data's frames."""
    if data.resolution % config.patch_size:
        return [f"'patch_size' {config.patch_size} does not divide data.resolution {data.resolution}"]
    return []


def tracker_names(trackers: str) -> list[str]:
    return [name for name in (t.strip() for t in trackers.split(",")) if name not in ("", "none")]


def check_trackers(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    """`run.trackers`: Accelerate's tracker names (whether they are installed is checked where a run starts)."""
    from accelerate.utils import LoggerType  # deferred: only a recipe that names trackers needs it

    known = [t.value for t in LoggerType if t is not LoggerType.ALL]
    for name in tracker_names(value):
        if name not in known:
            raise ValueError(f"unknown tracker {name!r}; trackers: none, {', '.join(known)}")


def trackers_not_installed(trackers: str) -> list[str]:
    """One problem per tracker the recipe names that is not installed here: it would log nothing."""
    names = tracker_names(trackers)
    if not names:
        return []
    from accelerate.tracking import get_available_trackers

    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    return [f"tracker {name!r} is not installed here (pip install {name}); installed: "
            f"{', '.join(sorted(installed)) or 'none'}" for name in names if name not in installed]


@functools.cache
def _resolved_fields(cls: type) -> tuple[attrs.Attribute, ...]:
    attrs.resolve_types(cls)
    return attrs.fields(cls)


def _type_problem(value: Any, expected: Any) -> str | None:
    """Recipes hold TOML values; accept ints for floats, nothing else loosely (True is not 1)."""
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected in (bool, str):
        ok = isinstance(value, expected)
    else:
        return None  # types we do not check by hand are left to the field's validator
    return None if ok else f"expected {expected.__name__}, got {type(value).__name__} {value!r}"


def build_config(cls: type, table: dict[str, Any], where: str, problems: list[str]) -> Any | None:
    """Builds `cls(**table)`; appends one sentence per problem (prefixed by `where`) and returns None on any."""
    fields = {f.name: f for f in _resolved_fields(cls)}
    kwargs: dict[str, Any] = {}
    start = len(problems)
    for key, value in table.items():
        field = fields.get(key)
        if field is None:
            problems.append(f"{where}: unknown key '{key}'; valid keys: {', '.join(fields) or '(none)'}")
            continue
        problem = _type_problem(value, field.type)
        if problem is None and field.validator is not None:
            try:
                field.validator(None, field, value)
            except (ValueError, TypeError) as error:
                problem = str(error.args[0]) if error.args else str(error)  # attrs' in_() adds more args
        if problem is not None:
            problems.append(f"{where}: key '{key}': {problem}")
            continue
        kwargs[key] = float(value) if field.type is float else value
    missing = [f.name for f in fields.values() if f.default is attrs.NOTHING and f.name not in table]
    for name in missing:
        problems.append(f"{where}: missing required key '{name}'")
    if len(problems) > start:
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # cross-field checks in __attrs_post_init__
        problems.append(f"{where}: {error}")
        return None


def checked_config(cls: type, table: dict[str, Any], where: str) -> Any:
    """`build_config` for one table on its own: every problem raised at once as a RecipeError."""
    from genie_core.errors import RecipeError

    problems: list[str] = []
    config = build_config(cls, table, where, problems)
    if problems:
        raise RecipeError(problems)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return attrs.asdict(config, recurse=True)


# --------------------------------------------------------------------------------------------------- core configs


@attrs.define(frozen=True, kw_only=True)
class RunConfig:
    name: str = attrs.field(default="genie", validator=folder_name)  # the run folder: out_dir/name
    seed: int = 0
    out_dir: str = "runs"  # the run folder is out_dir/name unless `genie run --out` says otherwise
    # "auto": bf16 where the device has bf16 units (a GPU that supports it, a CPU with AMX or AVX-512 BF16), else
    # float32 ("no"); the stage records say which one trained (genie_core.io.machine.resolve_mixed_precision).
    mixed_precision: str = attrs.field(default="no", validator=v.in_(("no", "bf16", "fp16", "auto")))
    cpu: bool = False  # force CPU even when a GPU is present
    distributed: str = attrs.field(default="ddp", validator=v.in_(("ddp", "fsdp")))  # under several processes
    # Accelerate's trackers, comma-separated (tensorboard, wandb, mlflow, ...; each must be installed); "none" for none.
    # Training logs go to the run's logs/ folder as JSON lines whatever is chosen here.
    trackers: str = attrs.field(default="tensorboard", validator=check_trackers)
    # Deterministic kernels (torch.use_deterministic_algorithms): a rerun, or a kill and --resume, repeats a GPU run
    # bit for bit, at some cost in speed. CPU runs are repeatable without it.
    deterministic: bool = False


@attrs.define(frozen=True, kw_only=True)
class DataConfig:
    """How footage is stored and cut, whatever the [source] table says it comes from."""

    resolution: int = attrs.field(default=64, validator=positive)  # square frames, as in the paper
    min_episode_frames: int = attrs.field(default=16, validator=positive)  # shorter episodes are dropped
    shard_frames: int = attrs.field(default=10_000, validator=positive)  # frames per shard file (~120 MB at 64x64)
    skip_bad: bool = False  # skip (and record) units with corrupt input instead of stopping
    path: str = ""  # a dataset built before (`genie data build`) to use instead of building one in the run folder


@attrs.define(frozen=True, kw_only=True)
class TrainConfig:
    """One training stage. Defaults: the paper's tokenizer settings (Appendix F)."""

    steps: int = attrs.field(default=300_000, validator=positive)
    batch_size: int = attrs.field(default=48, validator=positive)
    seq_len: int = attrs.field(default=16, validator=v.ge(2))
    lr: float = attrs.field(default=3e-4, validator=positive)
    min_lr: float = attrs.field(default=3e-4, validator=non_negative)  # cosine decays lr -> min_lr after warm-up
    warmup_steps: int = attrs.field(default=10_000, validator=non_negative)
    beta1: float = attrs.field(default=0.9, validator=unit_interval)
    beta2: float = attrs.field(default=0.9, validator=unit_interval)
    weight_decay: float = attrs.field(default=1e-4, validator=non_negative)
    grad_clip: float = attrs.field(default=1.0, validator=non_negative)  # 0 disables clipping
    grad_accum: int = attrs.field(default=1, validator=positive)  # micro-batches per optimizer step
    checkpoint_every: int = attrs.field(default=1000, validator=non_negative)  # full-state checkpoints; 0: none
    eval_every: int = attrs.field(default=5000, validator=non_negative)  # held-out PSNR + a sample GIF; 0: none
    keep_checkpoints: int = attrs.field(default=2, validator=positive)
    log_every: int = attrs.field(default=50, validator=positive)
    num_workers: int = attrs.field(default=0, validator=non_negative)
    # Recompute each transformer block's activations in the backward pass instead of keeping them: a fifth to a
    # twentieth of the activation memory for a fifth to a quarter more arithmetic, the same losses
    # (genie_core.nn.run_block; measured in benchmarks/README.md).
    activation_checkpointing: bool = False
    # Run the trained models' transformer stacks through torch.compile while they train: the same losses to float
    # rounding, at the cost of compiling in the first steps (genie_core.nn.compile_block_stacks; measured in
    # benchmarks/README.md: it pays where a step is launch- or memory-bound and the run is long).
    compile: bool = False
    # Keep an exponential moving average of the trained weights, with this decay per step (0: none): the stage
    # validates and saves the average while the weights themselves train as before (engine.WeightAverage).
    ema_decay: float = attrs.field(default=0.0, validator=[non_negative, v.lt(1.0)])

    def __attrs_post_init__(self):
        if self.min_lr > self.lr:
            raise ValueError(f"'min_lr' ({self.min_lr}) must not exceed 'lr' ({self.lr})")


@attrs.define(frozen=True, kw_only=True)
class DynamicsTrainConfig(TrainConfig):
    """The world-model stage. Defaults: the paper's co-training of LAM and dynamics (Appendix F)."""

    steps: int = attrs.field(default=200_000, validator=positive)
    batch_size: int = attrs.field(default=36, validator=positive)
    lr: float = attrs.field(default=3e-5, validator=positive)
    min_lr: float = attrs.field(default=3e-6, validator=non_negative)
    warmup_steps: int = attrs.field(default=5_000, validator=non_negative)
    # 0: the paper's co-training. N > 0: train the latent action model alone for N steps first, then the dynamics
    # model alone for `steps` steps on the frozen LAM (an ablation, and a way to reuse one LAM).
    lam_steps: int = attrs.field(default=0, validator=non_negative)


WINDOWS = ("slide", "block")


def context_frames(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    """`[world] context`: 0 (as many as trained on) or at least 2. A context of 1 holds no history, only the new
    frame: no prompt and no action would reach it."""
    if not (value == 0 or value >= 2):
        raise ValueError(f"'{attribute.name}' must be 0 (as many frames as the world was trained on) or at least 2 "
                         f"(the new frame and one before it): {value}")


@attrs.define(frozen=True, kw_only=True)
class WorldConfig:
    """How a trained world rolls out past the number of frames it was trained on ([world] in a recipe): it keeps a
    rolling context of the most recent frames.

    - window "slide": every new frame sees the `context` - 1 frames before it, the training windows' shape; once the
      context is full, the window moves one frame per step, so the dynamics model's cache is rebuilt every step.
    - window "block": when the context is full, the oldest half of it is dropped at once; between drops every new
      frame extends the cache, so a long session costs about one frame per MaskGIT step. The history then varies
      between half and all of the context.
    - decode_frames: how many frames the tokenizer's decoder reads to draw each new frame of play.
    """

    context: int = attrs.field(default=0, validator=context_frames)  # frames seen per new frame; 0: as trained
    window: str = attrs.field(default="slide", validator=v.in_(WINDOWS))
    # Frames the tokenizer decodes each new frame of play with (the frame and those just before it); 0: its whole
    # window, exactly as rollouts are decoded. Fewer cost less per frame, for a measured difference in the pixels
    # shown (benchmarks/decode_frames.py); the tokens, and so the world's future, are the same.
    decode_frames: int = attrs.field(default=0, validator=v.ge(0))


def positive_ints(instance, attribute, value):  # noqa: ARG001 - attrs validator signature
    """A non-empty list of positive integers (a TOML array)."""
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)):
        raise ValueError(f"'{attribute.name}' must be a non-empty list of positive integers, such as [20, 200]: "
                         f"{value!r}")


@attrs.define(frozen=True, kw_only=True)
class AgentConfig:
    """What `genie agent RUN` does with a finished run ([agent] in a recipe; its command-line flags override it):
    how the cloned policy networks train, how many labelled transitions map latent to real actions, and how the
    agents are scored in the real game."""

    labels: tuple[int, ...] = attrs.field(default=(20, 200, 2000), converter=tuple, validator=positive_ints)
    episodes: int = attrs.field(default=20, validator=positive)  # scored episodes per agent
    first_seed: int = attrs.field(default=100_000, validator=v.ge(0))  # scored from this seed on: none the footage's
    max_steps: int = attrs.field(default=2000, validator=positive)  # steps per scored episode at most
    context: int = attrs.field(default=2, validator=positive)  # frames the policy network sees
    steps: int = attrs.field(default=2000, validator=positive)  # training steps of each network
    batch_size: int = attrs.field(default=64, validator=positive)
    lr: float = attrs.field(default=1e-3, validator=positive)
    seed: int = 0


@attrs.define(frozen=True, kw_only=True)
class EvalConfig:
    windows: int = attrs.field(default=64, validator=positive)  # held-out windows for PSNR and dtPSNR
    batch_size: int = attrs.field(default=16, validator=positive)
    dtpsnr_t: int = attrs.field(default=4, validator=positive)  # generated steps after the prompt
    rollout_steps: int = attrs.field(default=12, validator=positive)  # length of the rollout GIF
    gif_scale: int = attrs.field(default=3, validator=positive)  # nearest-neighbour upscaling of GIF frames
    seed: int = 1234

"""The stages of `genie run` and what each one's output depends on.

    data       footage from the recipe's [source] -> data/ (manifest + shards; resumable), or data.path if given
    tokenizer  trains the video tokenizer                  -> tokenizer/  (safetensors + components.json)
    dynamics   co-trains latent actions and dynamics      -> dynamics/
    report     held-out tokenizer PSNR, dtPSNR, rollouts  -> report.json, report.md, rollout.gif, rollout.png,
                                                             report/ (the sampler, for `genie sample`)

A stage's fingerprint hashes every setting its output depends on; a stage whose recorded fingerprint differs from
the recipe's is stale. The models of the dynamics stage are built here too, so that a world can be rebuilt from a
checkpoint of that stage exactly as the stage built it.
"""

from __future__ import annotations

import hashlib
import json

from genie_core.data.footage import EpisodeIndex, true_action_count
from genie_core.interfaces import DynamicsModel, LatentActionModel, TokenSpec, VideoSpec
from genie_core.io.machine import resolve_mixed_precision
from genie_core.recipe import Recipe

STAGES = ("data", "tokenizer", "dynamics", "report")
STAGE_FILE = "stage.json"

# Settings that change how a stage reports or what it costs, not what it produces.
COSMETIC = {"log_every", "num_workers", "gif_scale", "checkpoint_every", "keep_checkpoints", "trackers",
            "activation_checkpointing", "compile"}
# Settings added after runs were made; at these values they leave the fingerprint as it was, so those runs stay current.
HASHED_ONLY_IF_SET = {"ema_decay": 0.0}


def stage_settings(recipe: Recipe, stage: str) -> dict:
    """Everything a stage's output depends on (cumulative: a stage depends on all the settings of earlier ones)."""
    d = _drop_cosmetic(recipe.describe())
    d["versions"] = {kind: f"{c.info.owner.package} {c.info.owner.version}" for kind, c in recipe.components.items()}
    settings = {"data": d["data"], "source": d["source"]}
    if stage in ("tokenizer", "dynamics", "report"):
        # the precision it trains in: "auto" is bf16 on one machine and float32 on another
        precision, _ = resolve_mixed_precision(recipe.run.mixed_precision, recipe.run.cpu)
        settings |= {"seed": d["run"]["seed"], "tokenizer": d["tokenizer"], "train.tokenizer": d["train"]["tokenizer"],
                     "precision": precision}
    if stage in ("dynamics", "report"):
        settings |= {"action_model": d["action_model"], "dynamics": d["dynamics"],
                     "train.dynamics": d["train"]["dynamics"]}
    if stage == "report":
        settings |= {"sampler": d["sampler"], "eval": d["eval"], "world": d["world"]}
    # the plugin versions that produced it: the source's for the data, every component's after that
    settings["versions"] = {"source": d["versions"]["source"]} if stage == "data" else d["versions"]
    return settings


def _drop_cosmetic(value):
    if isinstance(value, dict):
        return {k: _drop_cosmetic(v) for k, v in value.items()
                if k not in COSMETIC and not (k in HASHED_ONLY_IF_SET and v == HASHED_ONLY_IF_SET[k])}
    return value


def upstream(stage: str) -> str | None:
    """The stage whose output this one consumes."""
    index = STAGES.index(stage)
    return STAGES[index - 1] if index else None


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(recipe: Recipe, stage: str) -> str:
    return fingerprint(stage_settings(recipe, stage))


def video_spec(recipe: Recipe, stage: str, tokenizer=None, true_actions: int = 0) -> VideoSpec:
    """The video a stage's models see; with the trained tokenizer, also its tokens (for token-input models), and
    the number of true actions its footage records."""
    res = recipe.data.resolution
    tokens = {"token_vocab": tokenizer.codebook_size, "token_grid": tuple(tokenizer.grid)} if tokenizer else {}
    return VideoSpec(channels=3, height=res, width=res, num_frames=recipe.train[stage].seq_len,
                     true_actions=true_actions, **tokens)


FOOTPRINT_TRUE_ACTIONS = 18  # what a model sized by the footage's true actions is counted with (Atari's most)
BYTES_PER_TRAINED_PARAMETER = 16  # float32 weights, gradients and AdamW's two moments
BYTES_PER_FROZEN_PARAMETER = 4


def models_on_meta(recipe: Recipe) -> dict[str, object]:
    """The recipe's tokenizer, action model and dynamics model, built on PyTorch's meta device (nothing is allocated,
    whatever the sizes): None for a model that cannot be built there (a plugin may need real tensors in its
    constructor), -1 for one whose tensors are too large to even describe (over 2**63 bytes)."""
    import torch

    components, built = recipe.components, {}

    def build(kind: str, make) -> None:
        try:
            with torch.device("meta"):
                built[kind] = make()
        except RuntimeError as error:
            built[kind] = -1 if "overflow" in str(error) else None
        except Exception:  # noqa: BLE001 - a plugin that cannot be built on the meta device is simply not counted
            built[kind] = None

    tok, lam, dyn = components["tokenizer"], components["action_model"], components["dynamics"]
    build("tokenizer", lambda: tok.info.cls(tok.config, video_spec(recipe, "tokenizer")))
    tokenizer = built["tokenizer"] if isinstance(built["tokenizer"], torch.nn.Module) else None
    build("action_model", lambda: lam.info.cls(lam.config, video_spec(
        recipe, "dynamics", lam.info.cls.needs_tokenizer and tokenizer, FOOTPRINT_TRUE_ACTIONS)))
    if tokenizer is not None and isinstance(built["action_model"], torch.nn.Module):
        spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid,
                         num_frames=recipe.train["dynamics"].seq_len, num_actions=built["action_model"].num_actions)
        build("dynamics", lambda: dyn.info.cls(dyn.config, spec))
    else:
        built["dynamics"] = None
    return built


def parameter_counts(recipe: Recipe, models: dict | None = None) -> dict[str, int | None]:
    """The parameters of the recipe's tokenizer, action model and dynamics model (`models_on_meta`, or `models` as it
    returned them): None for a model that cannot be built on the meta device, -1 for one too large to describe."""
    models = models_on_meta(recipe) if models is None else models
    return {kind: m if m in (None, -1) else sum(p.numel() for p in m.parameters()) for kind, m in models.items()}


TRAINED_IN = {"tokenizer": ("tokenizer",), "dynamics": ("action_model", "dynamics")}


def block_stack_problems(recipe: Recipe, models: dict, where: str) -> list[str]:
    """A stage set to checkpoint activations or compile (train.STAGE.activation_checkpointing, train.STAGE.compile)
    whose trained models have no block stack to do it in: one sentence per stage and key. A model that cannot be
    built on the meta device is not judged here; the training engine says so when its stage starts."""
    from genie_core.nn import block_stacks

    problems = []
    for stage, kinds in TRAINED_IN.items():
        asked = [key for key in ("activation_checkpointing", "compile") if getattr(recipe.train[stage], key)]
        if not asked or any(models[k] in (None, -1) for k in kinds) or any(block_stacks(models[k]) for k in kinds):
            continue
        named = ", ".join(f"{kind.replace('_', ' ')} '{recipe.components[kind].name}' (package "
                          f"{recipe.components[kind].info.owner.package})" for kind in kinds)
        problems += [f"{where}: train.{stage}.{key} is true, but no model that stage trains supports it ({named}); "
                     f"set it to false, or see CONTRIBUTING.md on run_block" for key in asked]
    return problems


def compiler_problems(recipe: Recipe, where: str) -> list[str]:
    """A stage set to compile (train.STAGE.compile) on a CPU with no C++ compiler, which torch.compile's CPU kernels
    are built with: one sentence per stage, before any work rather than a compiler error at the first step."""
    import shutil

    import torch

    on_gpu = torch.cuda.is_available() and not recipe.run.cpu
    if on_gpu or shutil.which("c++") or shutil.which("g++"):
        return []
    return [f"{where}: train.{stage}.compile is true, but torch.compile on the CPU needs a C++ compiler and none was "
            f"found (c++, g++); install one (e.g. apt-get install g++), or set it to false"
            for stage in TRAINED_IN if recipe.train[stage].compile]


def footprint_problems(recipe: Recipe, memory_bytes: int, where: str, models: dict | None = None) -> list[str]:
    """A recipe whose models could not even be trained in `memory_bytes` (their weights, gradients and optimizer
    state alone, before any activation): one sentence per problem, with the estimate."""
    counts = parameter_counts(recipe, models)
    huge = [kind for kind, n in counts.items() if n == -1]
    if huge:
        return [f"{where}: the {kind.replace('_', ' ')}'s sizes are too large to build at all (its tensors would "
                f"exceed 2**63 bytes); lower them" for kind in huge]
    known = {kind: n or 0 for kind, n in counts.items()}  # an uncounted model counts as nothing: a lower bound
    stages = {"tokenizer": known["tokenizer"] * BYTES_PER_TRAINED_PARAMETER,
              "dynamics": (known["action_model"] + known["dynamics"]) * BYTES_PER_TRAINED_PARAMETER
              + known["tokenizer"] * BYTES_PER_FROZEN_PARAMETER}
    stage, need = max(stages.items(), key=lambda item: item[1])
    if need <= memory_bytes:
        return []
    sizes = ", ".join(f"{kind.replace('_', ' ')} {n:,}" for kind, n in known.items())
    return [f"{where}: the models hold {sum(known.values()):,} parameters ({sizes}); the {stage} stage needs about "
            f"{need / 2**30:,.1f} GiB for weights, gradients and optimizer state alone, more than the "
            f"{memory_bytes / 2**30:,.1f} GiB this machine has; lower the sizes"]


def check_trainable(recipe: Recipe) -> None:
    """Refuses (RecipeError) a recipe whose models could not be trained here, before any work: models too large for
    this machine's memory, activation checkpointing or compiling asked of a stage whose models support neither, or
    compiling on a CPU with no C++ compiler."""
    from genie_core.errors import RecipeError
    from genie_core.io.machine import memory_bytes

    models = models_on_meta(recipe)
    problems = (footprint_problems(recipe, memory_bytes(recipe.run.cpu), recipe.source, models)
                + block_stack_problems(recipe, models, recipe.source) + compiler_problems(recipe, recipe.source))
    if problems:
        raise RecipeError(problems)


def world_models(recipe: Recipe, tokenizer, index: EpisodeIndex) -> tuple[LatentActionModel, DynamicsModel]:
    """The latent action and dynamics models of a recipe's dynamics stage, freshly built on its trained tokenizer
    for the footage of `index`."""
    lam_choice, dyn_choice = recipe.components["action_model"], recipe.components["dynamics"]
    reads_tokens = lam_choice.info.cls.needs_tokenizer
    spec = video_spec(recipe, "dynamics", reads_tokens and tokenizer, true_action_count(index))
    action_model = lam_choice.info.cls(lam_choice.config, spec)
    action_model.use_tokenizer(tokenizer)
    token_spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid,
                           num_frames=recipe.train["dynamics"].seq_len, num_actions=action_model.num_actions)
    return action_model, dyn_choice.info.cls(dyn_choice.config, token_spec)

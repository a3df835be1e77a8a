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
from genie_core.recipe import Recipe

STAGES = ("data", "tokenizer", "dynamics", "report")
STAGE_FILE = "stage.json"

# Settings that change how a stage reports, not what it produces.
COSMETIC = {"log_every", "num_workers", "gif_scale", "checkpoint_every", "keep_checkpoints", "trackers"}


def stage_settings(recipe: Recipe, stage: str) -> dict:
    """Everything a stage's output depends on (cumulative: a stage depends on all the settings of earlier ones)."""
    d = _drop_cosmetic(recipe.describe())
    d["versions"] = {kind: f"{c.info.owner.package} {c.info.owner.version}" for kind, c in recipe.components.items()}
    settings = {"data": d["data"], "source": d["source"]}
    if stage in ("tokenizer", "dynamics", "report"):
        settings |= {"seed": d["run"]["seed"], "tokenizer": d["tokenizer"], "train.tokenizer": d["train"]["tokenizer"],
                     "precision": d["run"]["mixed_precision"]}
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
        return {k: _drop_cosmetic(v) for k, v in value.items() if k not in COSMETIC}
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

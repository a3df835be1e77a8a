"""genie: generative interactive environments on a pluggable core.

The public API, importable from `genie_core` itself:

- for users: `load_recipe` and `Pipeline` (what `genie run` does), `RunFolder`, `load_world` and `open_world` (a
  trained world from a run folder or a training checkpoint), `World` and `Rollout` (play it from Python),
  `EpisodeIndex` and `WindowDataset` (footage), `evaluate_runs`, `Evaluation` and `EvalSettings` (held-out
  scores), `imitate` and `AgentConfig` (what `genie agent` does), `load_image` and `save_gif`;
- for plugin authors: `hookimpl`, the component kinds and their specs and outputs (`genie_core.interfaces`), the
  optional capabilities (`genie_core.capabilities`), the errors, and `get_registry`; the attrs validators recipes
  use are in `genie_core.config`, the shared layers in `genie_core.nn`, the contract kit in `genie_core.testing`.

Names load on first use, so `import genie_core` stays cheap (the command line answers `genie --help` without
importing torch).
"""

from __future__ import annotations

import importlib

from genie_core.hookspecs import hookimpl

__version__ = "0.1.0"

_EXPORTS = {
    # users
    "load_recipe": "genie_core.recipe",
    "Recipe": "genie_core.recipe",
    "Pipeline": "genie_core.training.pipeline",
    "RunFolder": "genie_core.run.folder",
    "load_world": "genie_core.run.folder",
    "open_world": "genie_core.run.folder",
    "World": "genie_core.world.model",
    "Rollout": "genie_core.world.model",
    "evaluate_runs": "genie_core.eval.evaluate",
    "Evaluation": "genie_core.eval.evaluate",
    "EvalSettings": "genie_core.eval.evaluate",
    "EpisodeIndex": "genie_core.data.footage",
    "WindowDataset": "genie_core.data.footage",
    "imitate": "genie_core.agent.imitate",
    "AgentConfig": "genie_core.config",
    "load_image": "genie_core.io.media",
    "save_gif": "genie_core.io.media",
    # plugin authors
    "VideoTokenizer": "genie_core.interfaces",
    "LatentActionModel": "genie_core.interfaces",
    "DynamicsModel": "genie_core.interfaces",
    "Sampler": "genie_core.interfaces",
    "VideoSource": "genie_core.interfaces",
    "Policy": "genie_core.interfaces",
    "PolicySpec": "genie_core.interfaces",
    "VideoSpec": "genie_core.interfaces",
    "TokenSpec": "genie_core.interfaces",
    "DataSpec": "genie_core.interfaces",
    "Episode": "genie_core.interfaces",
    "TokenizerOutput": "genie_core.interfaces",
    "ActionModelOutput": "genie_core.interfaces",
    "DynamicsOutput": "genie_core.interfaces",
    "ChecksRecipe": "genie_core.capabilities",
    "CachedDynamics": "genie_core.capabilities",
    "CompilableCachedSteps": "genie_core.capabilities",
    "RefillableCache": "genie_core.capabilities",
    "PlaysEpisodes": "genie_core.capabilities",
    "get_registry": "genie_core.registry",
    "GenieError": "genie_core.errors",
    "RecipeError": "genie_core.errors",
    "PluginError": "genie_core.errors",
}

__all__ = ["hookimpl", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'genie_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

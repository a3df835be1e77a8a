"""Recipes: TOML files that compose registered components by name, plus data, training and evaluation settings.

    [tokenizer]            # one table per component kind: `name` picks the registered component,
    name = "st-vivit"      # every other key is an option of that component's config
    patch_size = 4
    [train.tokenizer]      # one table per training stage (genie_core.config.TrainConfig)
    steps = 1000

Command-line overrides use dotted keys with TOML values: `tokenizer.patch_size=8 run.name="ablation"`.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import attrs

from genie_core.capabilities import ChecksRecipe
from genie_core.config import (
    AgentConfig,
    DataConfig,
    DynamicsTrainConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    WorldConfig,
    build_config,
    config_to_dict,
    trackers_not_installed,
)
from genie_core.errors import PluginError, RecipeError
from genie_core.interfaces import KINDS
from genie_core.registry import ComponentInfo, Registry, get_registry

CORE_SECTIONS = {"run": RunConfig, "data": DataConfig, "eval": EvalConfig, "world": WorldConfig,
                 "agent": AgentConfig}
TRAIN_TABLES = {"tokenizer": TrainConfig, "dynamics": DynamicsTrainConfig}  # [train.STAGE] -> its config class


@attrs.define(frozen=True)
class ComponentChoice:
    kind: str
    info: ComponentInfo
    config: Any

    @property
    def name(self) -> str:
        return self.info.name


@attrs.define(frozen=True)
class Recipe:
    source: str  # the file it came from, for messages
    table: dict[str, Any]  # the TOML after overrides: what gets saved beside a run
    run: RunConfig
    data: DataConfig
    eval: EvalConfig
    components: dict[str, ComponentChoice]  # kind -> choice
    train: dict[str, TrainConfig]  # stage -> config
    world: WorldConfig = WorldConfig()
    agent: AgentConfig = AgentConfig()  # read by `genie agent`, no stage of `genie run`

    def describe(self) -> dict[str, Any]:
        return {
            "run": config_to_dict(self.run),
            "data": config_to_dict(self.data),
            "eval": config_to_dict(self.eval),
            "world": config_to_dict(self.world),
            "agent": config_to_dict(self.agent),
            **{kind: {"name": c.name, **config_to_dict(c.config)} for kind, c in self.components.items()},
            "train": {stage: config_to_dict(cfg) for stage, cfg in self.train.items()},
        }


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `tokenizer.name=st-vivit`


def apply_overrides(table: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    table = copy.deepcopy(table)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"{source}: override '{item}' is not of the form key.sub=value")
            continue
        node = table
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{source}: override '{item}': '{part}' is a value, not a table")
                break
            node = child
        else:
            node[parts[-1]] = _parse_value(text.strip())
    if problems:
        raise RecipeError(problems)
    return table


def read_recipe_table(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:  # TOML is UTF-8
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise RecipeError([f"{path}: not UTF-8 text (byte {error.start}, line {line}); TOML recipes are UTF-8"]
                          ) from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError([f"{path}: not valid TOML: {error}"]) from None


def load_recipe(path: str | Path, overrides: list[str] = (), registry: Registry | None = None,
                notes: list[str] | None = None) -> Recipe:
    """Reads, overrides and checks a recipe to run here. Raises RecipeError listing every problem; builds no model.
    Options dropped by a component swap are added to `notes`."""
    recipe = recipe_with_overrides(read_recipe_table(path), list(overrides), str(path), registry, notes)
    missing = trackers_not_installed(recipe.run.trackers)  # a run folder loads without them; a new run needs them
    if missing:
        raise RecipeError([f"{path} [run]: key 'trackers': {problem}" for problem in missing])
    return recipe


def recipe_with_overrides(written: dict[str, Any], overrides: list[str], source: str,
                          registry: Registry | None = None, notes: list[str] | None = None) -> Recipe:
    """A recipe table (a file's, or a run's recipe.json) with dotted overrides applied, component swaps included,
    and checked."""
    registry = registry or get_registry()
    table = apply_overrides(written, overrides, source)
    drop_options_of_swapped_components(written, table, overrides, source, registry, notes)
    return recipe_from_table(table, source, registry)


def drop_options_of_swapped_components(written: dict, table: dict, overrides: list[str], source: str,
                                       registry: Registry, notes: list[str] | None) -> None:
    """An override that swaps a component for another (`action_model.name=true-actions`) leaves behind the options
    written for the old one, in the file or in overrides before the swap, that the new one does not take (they
    belong to the old one's config); options both take (st-vivit and c-vivit share theirs) and options given after
    the swap stay. What is dropped is added to `notes`."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    for kind in KINDS:
        before, after = written.get(kind), table.get(kind)
        if not (isinstance(before, dict) and isinstance(after, dict)) or before.get("name") == after.get("name"):
            continue
        try:
            accepted = {field.name for field in attrs.fields(registry.get(kind, after.get("name")).cls.config_class)}
        except (PluginError, TypeError):
            continue  # an unknown name: recipe_from_table says so, with the valid names
        swap = max((i for i, key in enumerate(keys) if key == f"{kind}.name"), default=-1)
        given_for_new = set(keys[swap + 1:])
        dropped = sorted(k for k in after if k != "name" and k not in accepted and f"{kind}.{k}" not in given_for_new)
        for key in dropped:
            del after[key]
        if dropped and notes is not None:
            notes.append(f"{source} [{kind}]: '{after.get('name')}' replaces '{before.get('name')}'; the options "
                         f"{', '.join(dropped)} are not its own and are dropped")


def recipe_from_table(table: dict[str, Any], source: str, registry: Registry | None = None) -> Recipe:
    registry = registry or get_registry()
    problems: list[str] = []
    known = set(CORE_SECTIONS) | set(KINDS) | {"train"}
    for key in table:
        if key not in known:
            problems.append(f"{source}: unknown table [{key}]; valid tables: {', '.join(sorted(known))}")

    def section(name: str) -> dict[str, Any]:
        value = table.get(name, {})
        if not isinstance(value, dict):
            problems.append(f"{source}: '{name}' must be a table, got {type(value).__name__}")
            return {}
        return value

    core = {name: build_config(cls, section(name), f"{source} [{name}]", problems)
            for name, cls in CORE_SECTIONS.items()}

    components = {}
    for kind in KINDS:
        options = dict(section(kind))
        registered = f"registered {kind} names: {', '.join(registry.names(kind))}"
        if kind not in table:
            problems.append(f"{source}: missing table [{kind}]; {registered}")
            continue
        name = options.pop("name", None)
        if not isinstance(name, str):
            problems.append(f"{source} [{kind}]: missing key 'name'; {registered}")
            continue
        try:
            info = registry.get(kind, name)
        except PluginError as error:
            problems.append(f"{source} [{kind}]: {error}")
            continue
        config = build_config(info.cls.config_class, options, f"{source} [{kind}] ({name})", problems)
        if config is not None:
            components[kind] = ComponentChoice(kind, info, config)

    train_table = section("train")
    train = {}
    for key in train_table:
        if key not in TRAIN_TABLES:
            problems.append(f"{source}: unknown table [train.{key}]; valid stages: {', '.join(TRAIN_TABLES)}")
    for stage, config_class in TRAIN_TABLES.items():
        stage_table = train_table.get(stage, {})
        if not isinstance(stage_table, dict):
            problems.append(f"{source}: 'train.{stage}' must be a table")
            continue
        train[stage] = build_config(config_class, stage_table, f"{source} [train.{stage}]", problems)

    if core["data"] is not None:
        problems += check_compatibility(components, core["data"], train, source)
    problems += check_lengths(train, core["eval"], source)
    world, dynamics_train = core["world"], train.get("dynamics")
    if world is not None and dynamics_train is not None and world.context > dynamics_train.seq_len:
        problems.append(f"{source} [world]: context {world.context} exceeds train.dynamics.seq_len "
                        f"{dynamics_train.seq_len}, the longest window the dynamics model is trained on")
    if problems:
        raise RecipeError(problems)
    return Recipe(source, table, core["run"], core["data"], core["eval"], components, train, core["world"],
                  core["agent"])


def check_lengths(train: dict, eval_cfg: EvalConfig | None, source: str) -> list[str]:
    """Window lengths must nest: the dynamics stage encodes its windows with the trained tokenizer, and dtPSNR at t
    needs windows of t + 1 frames from the latent action model."""
    tok, dyn = train.get("tokenizer"), train.get("dynamics")
    if tok is None or dyn is None:
        return []
    problems = []
    if dyn.seq_len > tok.seq_len:
        problems.append(f"{source} [train.dynamics]: seq_len {dyn.seq_len} exceeds train.tokenizer.seq_len "
                        f"{tok.seq_len}; the tokenizer must be trained on windows at least as long")
    if eval_cfg is not None and eval_cfg.dtpsnr_t + 1 > dyn.seq_len:
        problems.append(f"{source} [eval]: dtpsnr_t {eval_cfg.dtpsnr_t} needs windows of {eval_cfg.dtpsnr_t + 1} "
                        f"frames, longer than train.dynamics.seq_len {dyn.seq_len}")
    return problems


def check_compatibility(components: dict[str, ComponentChoice], data: DataConfig, train: dict,
                        source: str) -> list[str]:
    """Checks that need more than one table: each component's `check_recipe` hook, if it has one, and that the
    sampler can drive the dynamics model."""
    problems = []
    sampler, dynamics = components.get("sampler"), components.get("dynamics")
    if sampler and dynamics and sampler.info.cls.needs_masking and not dynamics.info.cls.supports_masking:
        problems.append(f"{source} [sampler] ({sampler.name}): needs a dynamics model that supports masking; "
                        f"dynamics '{dynamics.name}' does not")
    for kind, choice in components.items():
        check = choice.info.cls.check_recipe if issubclass(choice.info.cls, ChecksRecipe) else None
        if check is not None:
            for problem in check(choice.config, data=data, train=train):
                problems.append(f"{source} [{kind}] ({choice.name}): {problem}")
    return problems

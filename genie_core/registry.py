"""Plugin loading on pluggy, and the registry of components it fills.

Built-in plugins are a tuple of module names registered through the same hook as third-party plugins, which come from
the `genie.plugins` entry-point group. Third-party plugins load one at a time: a broken one is reported (its name,
package and error) and the rest keep working, unless GENIE_STRICT_PLUGINS=1 makes any plugin failure fatal.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
import warnings
from typing import Any

import attrs
import pluggy

from genie_core import hookspecs
from genie_core.errors import PluginError
from genie_core.interfaces import REGISTERED_KINDS, Component

ENTRY_POINT_GROUP = "genie.plugins"
STRICT_ENV = "GENIE_STRICT_PLUGINS"
BUILTIN_PLUGINS = (
    "genie_plugins.st_vivit",
    "genie_plugins.vit_tokenizers",
    "genie_plugins.pixel_lam",
    "genie_plugins.true_actions",
    "genie_plugins.maskgit",
    "genie_plugins.autoregressive",
    "genie_plugins.procgen_source",
    "genie_plugins.atari_source",
    "genie_plugins.video_folder_source",
    "genie_plugins.policies",
)


@attrs.define(frozen=True)
class Owner:
    """Who registered something: the plugin's name and the distribution that ships it."""

    plugin: str
    package: str
    version: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' (package {self.package} {self.version})"


@attrs.define(frozen=True)
class ComponentInfo:
    kind: str
    name: str
    cls: type[Component]
    owner: Owner


@attrs.define(frozen=True)
class BrokenPlugin:
    owner: Owner
    error: str

    def __str__(self) -> str:
        return f"{self.owner} failed to load: {self.error}"


class Registrar:
    """Handed to `genie_register_components`; collects one plugin's components for the registry to commit."""

    def __init__(self, owner: Owner):
        self.owner = owner
        self.staged: list[ComponentInfo] = []

    def add_tokenizer(self, name: str, cls: type[Component]) -> None:
        self._add("tokenizer", name, cls)

    def add_action_model(self, name: str, cls: type[Component]) -> None:
        self._add("action_model", name, cls)

    def add_dynamics(self, name: str, cls: type[Component]) -> None:
        self._add("dynamics", name, cls)

    def add_sampler(self, name: str, cls: type[Component]) -> None:
        self._add("sampler", name, cls)

    def add_source(self, name: str, cls: type[Component]) -> None:
        self._add("source", name, cls)

    def add_policy(self, name: str, cls: type[Component]) -> None:
        self._add("policy", name, cls)

    def _add(self, kind: str, name: str, cls: Any) -> None:
        base = REGISTERED_KINDS[kind]
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.owner} registered a {kind} with an empty or non-string name: {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{self.owner} registered {kind} '{name}' as {cls!r}, which is not a {base.__name__}")
        config_class = getattr(cls, "config_class", None)
        if not attrs.has(config_class):
            raise PluginError(f"{self.owner} registered {kind} '{name}': {cls.__name__}.config_class must be an "
                              f"attrs class")
        for info in self.staged:
            if (info.kind, info.name) == (kind, name):
                raise PluginError(f"duplicate {kind} '{name}': registered twice by {self.owner}")
        self.staged.append(ComponentInfo(kind, name, cls, self.owner))


@attrs.define
class Registry:
    components: dict[tuple[str, str], ComponentInfo] = attrs.field(factory=dict)
    broken: list[BrokenPlugin] = attrs.field(factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self.components if k == kind)

    def get(self, kind: str, name: str) -> ComponentInfo:
        try:
            return self.components[(kind, name)]
        except KeyError:
            raise PluginError(
                f"unknown {kind} '{name}'; registered {kind} names: {', '.join(self.names(kind)) or '(none)'}"
            ) from None

    def commit(self, registrar: Registrar) -> None:
        """Adds a plugin's staged components, or none of them if one name is already taken."""
        for info in registrar.staged:
            taken = self.components.get((info.kind, info.name))
            if taken is not None:
                raise PluginError(f"duplicate {info.kind} '{info.name}': registered by {taken.owner} and by "
                                  f"{info.owner}")
        for info in registrar.staged:
            self.components[(info.kind, info.name)] = info


def policy_problem(name: str, game: str) -> str | None:
    """None if `name` is a registered policy that plays `game`, else a sentence naming the valid choices (for the
    sources whose footage a policy plays)."""
    try:
        info = get_registry().get("policy", name)
    except PluginError as error:
        return f"'policy': {error}"
    if info.cls.games is not None and game not in info.cls.games:
        return f"'policy' {name!r} plays {', '.join(info.cls.games)}, not {game!r}"
    return None


def make_policy(name: str, spec: Any) -> Any:
    """The registered policy `name` with its default settings, for the game `spec` (a PolicySpec) describes."""
    info = get_registry().get("policy", name)
    return info.cls(info.cls.config_class(), spec)


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.cache
def _installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _declared_distribution_of(top: str) -> tuple[str, str] | None:
    """The first installed distribution whose top_level.txt names the package `top`. Reading those files takes tens
    of milliseconds; packages_distributions() also lists the files of every distribution without one (a tenth of a
    second or more, on every `genie` command), so it is asked only when no distribution declares the package."""
    for dist in importlib.metadata.distributions():
        if top in (dist.read_text("top_level.txt") or "").split():
            return dist.metadata["Name"], dist.version
    return None


def _distribution_of(module_name: str) -> tuple[str, str]:
    top = module_name.split(".")[0]
    declared = _declared_distribution_of(top)
    if declared is not None:
        return declared
    for dist in _installed_distributions().get(top, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(not installed)", "-"


def load_registry(builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool = True) -> Registry:
    """Loads every plugin and returns the filled registry. Use `get_registry()` for the cached process-wide one."""
    strict = _strict()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    owners: dict[int, Owner] = {}

    def fail(owner: Owner, error: BaseException, third_party: bool) -> None:
        broken = BrokenPlugin(owner, f"{type(error).__name__}: {error}")
        if strict or not third_party:
            raise PluginError(str(broken)) from error
        registry.broken.append(broken)
        warnings.warn(f"genie: {broken} (set {STRICT_ENV}=1 to make this an error)", RuntimeWarning, stacklevel=3)

    builtin_ids = set()
    for module_name in builtins:
        package, version = _distribution_of(module_name)
        owner = Owner(module_name, package, version)
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        owners[id(module)] = owner
        builtin_ids.add(id(module))

    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            owner = Owner(ep.name, dist.name if dist else "(unknown)", dist.version if dist else "-")
            try:
                plugin = ep.load()
                if pm.is_registered(plugin):  # the same module exposed twice: once is enough
                    continue
                pm.register(plugin, name=f"{owner.package}:{ep.name}")
                owners[id(plugin)] = owner
            except Exception as error:  # noqa: BLE001 - any import-time failure of a third-party plugin
                fail(owner, error, third_party=True)

    while True:  # check_pending stops at the first plugin with an unknown hook: repeat until none is left
        try:
            pm.check_pending()  # a hookimpl whose name matches no hook (a typo) is an error, not a silent no-op
            break
        except pluggy.PluginValidationError as error:
            plugin = error.plugin
            owner = owners.get(id(plugin), Owner(str(plugin), "(unknown)", "-"))
            pm.unregister(plugin)
            fail(owner, error, third_party=id(plugin) not in builtin_ids)

    # Call each plugin's hook on its own (through pluggy, so its calling conventions hold) so that a failure is
    # attributed to that plugin and to nothing else. Registration order: built-ins first, so a third-party plugin
    # can never take their names.
    order = list(owners)  # registration order
    plugins = sorted((plugin for _, plugin in pm.list_name_plugin()), key=lambda p: order.index(id(p)))
    for plugin in plugins:
        owner = owners[id(plugin)]
        registrar = Registrar(owner)
        only_this = pm.subset_hook_caller("genie_register_components", [p for p in plugins if p is not plugin])
        try:
            only_this(registrar=registrar)
            registry.commit(registrar)
        except Exception as error:  # noqa: BLE001
            fail(owner, error, third_party=id(plugin) not in builtin_ids)
    for plugin in plugins:  # loaded but silent: most often a hook function without @hookimpl
        owner = owners[id(plugin)]
        if not any(info.owner == owner for info in registry.components.values()) and not any(
                b.owner == owner for b in registry.broken):
            fail(owner, PluginError("registered no component; is its genie_register_components marked @hookimpl?"),
                 third_party=id(plugin) not in builtin_ids)
    return registry


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    return load_registry()


def print_plugin_table(registry: Registry, file=None) -> None:
    file = sys.stdout if file is None else file  # looked up per call, so redirection (capsys, contextlib) works
    rows = [("KIND", "NAME", "PACKAGE", "VERSION", "PLUGIN")]
    for (kind, name), info in sorted(registry.components.items()):
        rows.append((kind, name, info.owner.package, info.owner.version, info.owner.plugin))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=file)
    for broken in registry.broken:
        print(f"BROKEN  {broken}", file=file)

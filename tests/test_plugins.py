"""Plugin loading, against the real machinery: pluggy, `importlib.metadata` entry points, `genie_core.registry`.

Fake third-party plugins are real distributions: each test writes a `<name>-<version>.dist-info` (METADATA and
entry_points.txt) plus the plugin's module into tmp_path and puts tmp_path on sys.path, so they are found exactly as
an installed package would be. Tests call `load_registry()` (never the cached `get_registry()`) so none leaks state.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import genie_core.cli
from genie_core import hookspecs
from genie_core.errors import PluginError
from genie_core.registry import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    STRICT_ENV,
    Owner,
    Registrar,
    get_registry,
    load_registry,
)

from conftest import REPO

BUILTIN_PACKAGE = "genie-world"
EXAMPLE_PACKAGE = "genie-example-plugin"
EXAMPLE_TOKENIZER = "example-conv-vq"
INSTALL_EXAMPLE = f"{EXAMPLE_PACKAGE} is not installed; run `pip install -e examples/genie-example-plugin`"

# A module body that defines a registrable tokenizer class `Tok` (never instantiated: registration only type-checks).
TOKENIZER_CLASS = """
import attrs
import genie_core
from genie_core.interfaces import VideoTokenizer

@attrs.define(frozen=True, kw_only=True)
class TokConfig:
    patch_size: int = 4

class Tok(VideoTokenizer):
    config_class = TokConfig
"""


# --------------------------------------------------------------------------------------------------- helpers


class FakeSite:
    """A site-packages directory on sys.path that holds fake distributions with real entry points."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def add(self, package: str, modules: dict[str, str], version: str = "1.0"):
        """Writes the distribution `package` with these module sources and one entry point (named like it) per
        module."""
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        dist_info = self.root / f"{package.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{module} = {module}" for module in modules)]
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def _not_strict(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = FakeSite(tmp_path)
    yield fake
    for module in fake.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def load_quietly():
    """load_registry() for setups that must produce no broken plugin: any warning is turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return load_registry()


def load_reporting():
    """load_registry() that must not raise (no strict mode): returns it and the RuntimeWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            registry = load_registry()
        except PluginError as error:
            pytest.fail(f"a broken third-party plugin must be reported, not stop loading: {error}")
    return registry, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def builtin_names(registry) -> set[tuple[str, str]]:
    return {key for key, info in registry.components.items() if info.owner.package == BUILTIN_PACKAGE}


def expected_signature_line(function) -> str:
    """`def NAME(ARGS) -> RET` as inspect gives it, with the (postponed, string) annotations written unquoted."""

    class Raw(str):
        def __repr__(self) -> str:
            return str(self)

    def raw(annotation):
        return Raw(annotation) if isinstance(annotation, str) else annotation

    signature = inspect.signature(function)
    signature = signature.replace(
        parameters=[p.replace(annotation=raw(p.annotation)) for p in signature.parameters.values()],
        return_annotation=raw(signature.return_annotation),
    )
    return f"def {function.__name__}{signature}"


def hook_functions():
    return [(name, fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("genie_")]


# --------------------------------------------------------------------------------------------------- built-ins


def test_builtins_are_registered_with_package_genie_world():
    registry = load_registry(entry_points=False)
    assert registry.broken == []
    assert registry.components, "no built-in components registered"
    version = importlib.metadata.version(BUILTIN_PACKAGE)
    for (kind, name), info in registry.components.items():
        assert (info.kind, info.name) == (kind, name)
        assert info.owner.package == BUILTIN_PACKAGE, f"{kind} '{name}' owned by {info.owner}"
        assert info.owner.version == version
        assert info.owner.plugin in BUILTIN_PLUGINS
    assert {info.owner.plugin for info in registry.components.values()} == set(BUILTIN_PLUGINS)
    assert {("tokenizer", "st-vivit"), ("action_model", "pixel-lam"), ("dynamics", "maskgit"),
            ("sampler", "maskgit")} <= set(registry.components)
    # The full load (entry points included) keeps every built-in under the same owner.
    assert builtin_names(load_quietly()) == set(registry.components)


def test_cli_plugins_prints_kind_name_package_version(capsys):
    get_registry.cache_clear()  # the CLI uses the cached registry: build it from this process's current state
    try:
        assert genie_core.cli.main(["plugins"]) == 0
    finally:
        get_registry.cache_clear()
    lines = capsys.readouterr().out.splitlines()
    assert lines, "`genie plugins` printed nothing to sys.stdout (print_plugin_table must look sys.stdout up per call)"
    assert lines[0].split()[:4] == ["KIND", "NAME", "PACKAGE", "VERSION"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:] if not line.startswith("BROKEN")}
    version = importlib.metadata.version(BUILTIN_PACKAGE)
    for kind, name in builtin_names(load_registry(entry_points=False)):
        assert rows[(kind, name)][2:4] == [BUILTIN_PACKAGE, version], rows[(kind, name)]


# ------------------------------------------------------------------------------------------------ the example package


def test_example_plugin_is_found_through_its_installed_entry_point():
    try:
        dist = importlib.metadata.distribution(EXAMPLE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(INSTALL_EXAMPLE)
    eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
    assert [(ep.name, ep.value) for ep in eps] == [("example", "genie_example_plugin")]
    assert any(ep.dist.name == EXAMPLE_PACKAGE for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    registry = load_quietly()
    info = registry.get("tokenizer", EXAMPLE_TOKENIZER)
    assert info.owner == Owner("example", EXAMPLE_PACKAGE, dist.version)
    assert info.cls.__module__ == "genie_example_plugin"
    assert builtin_names(registry) == set(load_registry(entry_points=False).components)


def test_example_tokenizer_round_trips_through_the_same_code_path():
    import torch

    from genie_core.interfaces import VideoSpec

    try:
        cls = load_quietly().get("tokenizer", EXAMPLE_TOKENIZER).cls
    except PluginError:
        pytest.fail(INSTALL_EXAMPLE)
    torch.manual_seed(0)
    tokenizer = cls(cls.tiny_config(), VideoSpec(height=16, width=24, num_frames=3)).eval()
    video = torch.rand(2, 3, 3, 16, 24)
    with torch.no_grad():
        out = tokenizer.loss(video)
        tokens = tokenizer.encode(video)
        recon = tokenizer.decode(tokens)
    h, w = tokenizer.grid
    assert (h, w) == (16 // cls.tiny_config().patch_size, 24 // cls.tiny_config().patch_size)
    assert tokens.dtype == torch.long and tokens.shape == (2, 3, h, w)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tokenizer.codebook_size
    assert torch.equal(tokens, out.tokens)
    assert recon.shape == video.shape and 0 <= float(recon.min()) and float(recon.max()) <= 1
    torch.testing.assert_close(recon, out.recon.clamp(0, 1))


# --------------------------------------------------------------------------------------------------- failures


BROKEN = """
raise ImportError("fake_broken_plugin cannot find libfoo")
"""

GOOD = TOKENIZER_CLASS + """
@genie_core.hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("fake-good-tok", Tok)
"""


def test_broken_plugin_is_reported_and_the_rest_keep_working(site):
    site.add("fake-broken-pkg", {"fake_broken_plugin": BROKEN}, version="2.3")
    site.add("fake-good-pkg", {"fake_good_plugin": GOOD})
    registry, messages = load_reporting()
    assert len(messages) == 1 and re.search(r"fake-broken-pkg.*cannot find libfoo", messages[0]), messages

    assert len(registry.broken) == 1
    broken = registry.broken[0]
    assert broken.owner == Owner("fake_broken_plugin", "fake-broken-pkg", "2.3")
    assert "ImportError" in broken.error and "cannot find libfoo" in broken.error
    message = str(broken)
    assert "fake_broken_plugin" in message and "fake-broken-pkg" in message and "cannot find libfoo" in message

    assert registry.get("tokenizer", "fake-good-tok").owner.package == "fake-good-pkg"
    assert builtin_names(registry) == set(load_registry(entry_points=False).components)


def test_broken_plugin_is_fatal_in_strict_mode(site, monkeypatch):
    site.add("fake-broken-pkg", {"fake_broken_plugin": BROKEN})
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match=r"fake-broken-pkg.*cannot find libfoo"):
        load_registry()


DUPLICATE = TOKENIZER_CLASS + """
@genie_core.hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("fake-unique-tok", Tok)
    registrar.add_tokenizer("st-vivit", Tok)
"""


def test_duplicate_name_is_reported_naming_both_owners_and_nothing_of_that_plugin_is_kept(site):
    site.add("fake-dup-pkg", {"fake_dup_plugin": DUPLICATE})
    registry, messages = load_reporting()
    assert len(messages) == 1 and "duplicate tokenizer 'st-vivit'" in messages[0], messages

    assert len(registry.broken) == 1
    broken = registry.broken[0]
    assert broken.owner.package == "fake-dup-pkg"
    assert "duplicate tokenizer 'st-vivit'" in broken.error
    assert BUILTIN_PACKAGE in broken.error and "fake-dup-pkg" in broken.error, broken.error
    # The built-in keeps its name; the offending plugin keeps nothing, not even its unique name.
    assert registry.get("tokenizer", "st-vivit").owner.package == BUILTIN_PACKAGE
    assert "fake-unique-tok" not in registry.names("tokenizer")
    assert all(info.owner.package != "fake-dup-pkg" for info in registry.components.values())
    assert builtin_names(registry) == set(load_registry(entry_points=False).components)


def test_duplicate_name_is_fatal_in_strict_mode(site, monkeypatch):
    site.add("fake-dup-pkg", {"fake_dup_plugin": DUPLICATE})
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match="duplicate tokenizer 'st-vivit'") as info:
        load_registry()
    assert BUILTIN_PACKAGE in str(info.value) and "fake-dup-pkg" in str(info.value)
    culprit = str(info.value).split("failed to load")[0]
    assert "fake-dup-pkg" in culprit, f"the error must blame the plugin that came second, not the built-in: " \
                                      f"{info.value}"


def test_duplicate_between_two_third_party_plugins_names_both(site):
    site.add("fake-good-pkg", {"fake_good_plugin": GOOD})
    site.add("fake-copy-pkg", {"fake_copy_plugin": GOOD})
    registry, messages = load_reporting()
    assert len(messages) == 1 and "duplicate tokenizer 'fake-good-tok'" in messages[0], messages
    assert len(registry.broken) == 1
    error = registry.broken[0].error
    assert "fake-good-pkg" in error and "fake-copy-pkg" in error, error
    assert registry.get("tokenizer", "fake-good-tok").owner.package in {"fake-good-pkg", "fake-copy-pkg"}


TYPO = TOKENIZER_CLASS + """
@genie_core.hookimpl
def genie_register_component(registrar):  # typo: the hook is genie_register_components
    registrar.add_tokenizer("fake-typo-tok", Tok)
"""


def test_hookimpl_with_a_misspelled_name_is_reported(site):
    site.add("fake-typo-pkg", {"fake_typo_plugin": TYPO})
    registry, messages = load_reporting()
    assert len(messages) == 1 and "genie_register_component" in messages[0], messages
    assert len(registry.broken) == 1
    broken = registry.broken[0]
    assert broken.owner.package == "fake-typo-pkg"
    assert "unknown hook 'genie_register_component'" in broken.error
    assert "fake-typo-tok" not in registry.names("tokenizer")
    assert builtin_names(registry) == set(load_registry(entry_points=False).components)


def test_every_plugin_with_a_misspelled_hook_is_reported(site):
    # Both typo'd plugins also implement the real hook: neither may contribute anything.
    for letter in "ab":
        source = TYPO.replace("fake-typo-tok", f"fake-typo-tok-{letter}") + f"""
@genie_core.hookimpl
def genie_register_components(registrar):
    registrar.add_tokenizer("fake-half-right-{letter}", Tok)
"""
        site.add(f"fake-typo-{letter}-pkg", {f"fake_typo_{letter}_plugin": source})
    registry, messages = load_reporting()
    assert sorted(b.owner.package for b in registry.broken) == ["fake-typo-a-pkg", "fake-typo-b-pkg"], registry.broken
    assert len(messages) == 2, messages
    assert not [name for name in registry.names("tokenizer") if name.startswith("fake-")]


def test_hookimpl_with_a_misspelled_name_is_fatal_in_strict_mode(site, monkeypatch):
    site.add("fake-typo-pkg", {"fake_typo_plugin": TYPO})
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(PluginError, match=r"fake-typo-pkg.*unknown hook 'genie_register_component'"):
        load_registry()


def test_registering_a_class_that_is_not_the_interface_is_a_clear_error():
    from genie_core.interfaces import Sampler

    registrar = Registrar(Owner("fake", "fake-pkg", "1.0"))
    with pytest.raises(PluginError, match=r"fake-pkg.*tokenizer 'not-a-tok'.*not a VideoTokenizer"):
        registrar.add_tokenizer("not-a-tok", object)
    with pytest.raises(PluginError, match=r"tokenizer 'a-sampler'.*not a VideoTokenizer"):
        registrar.add_tokenizer("a-sampler", Sampler)
    with pytest.raises(PluginError, match=r"dynamics 'an-instance'.*not a DynamicsModel"):
        registrar.add_dynamics("an-instance", 42)
    assert registrar.staged == []


# --------------------------------------------------------------------------------------------------- docs


def test_every_hook_is_documented_here_and_in_contributing():
    hooks = hook_functions()
    assert hooks, "genie_core.hookspecs defines no genie_* hook"
    for name, function in hooks:
        assert inspect.getdoc(function), f"hook {name} in genie_core/hookspecs.py has no docstring"
    contributing = REPO / "CONTRIBUTING.md"
    assert contributing.is_file(), (
        f"{contributing} is missing; it must document every hook, with these signature lines: "
        + "; ".join(expected_signature_line(function) for _, function in hooks)
    )
    text = contributing.read_text(encoding="utf-8")
    for name, function in hooks:
        line = expected_signature_line(function)
        assert line in text, f"CONTRIBUTING.md does not contain the signature of hook {name}: {line!r}"


def test_plugin_without_hookimpl_marker_is_reported(site):
    site.add("fake-unmarked", {"fake_unmarked": TOKENIZER_CLASS + """
def genie_register_components(registrar):  # forgot @genie_core.hookimpl: pluggy ignores it
    registrar.add_tokenizer("unmarked", Tok)
"""})
    registry, warned = load_reporting()
    [broken] = [b for b in registry.broken if b.owner.package == "fake-unmarked"]
    assert "registered no component" in broken.error and "@hookimpl" in broken.error
    assert any("fake-unmarked" in message for message in warned)

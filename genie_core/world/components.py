"""Saving and loading trained components: weights in safetensors, and beside them the registered name, config and
spec needed to rebuild each one. Folders are written under a temporary name and renamed when complete."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import attrs
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from genie_core.config import config_to_dict
from genie_core.errors import GenieError, PluginError, first_line
from genie_core.interfaces import Component, TokenSpec, VideoSpec
from genie_core.registry import Registry, get_registry

MANIFEST = "components.json"
# What reading a damaged checkpoint or weights file raises: cut-short or changed JSON, safetensors, pickles and torch
# archives.
DAMAGE = (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
SPECS = {"VideoSpec": VideoSpec, "TokenSpec": TokenSpec}


def save_components(folder: Path, components: dict[str, tuple[str, Component]],
                    registry: Registry | None = None) -> None:
    """components: kind -> (registered name, module). Writes KIND.safetensors for each, and the manifest, which
    names the package (and version) that registered each component: where it comes back from is then known."""
    registry = registry or get_registry()
    manifest = {}
    for kind, (name, module) in components.items():
        if module.state_dict():  # samplers hold no weights
            save_model(module, str(folder / f"{kind}.safetensors"))
        spec = getattr(module, "spec", None)
        registered = registry.components.get((kind, name))  # None for a module built outside the registry
        owner = registered.owner if registered else None
        manifest[kind] = {
            "name": name,
            "package": owner.package if owner else None,
            "version": owner.version if owner else None,
            "config": config_to_dict(module.config),
            "spec": None if spec is None else {"type": type(spec).__name__, **attrs.asdict(spec)},
        }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_components(folder: Path, registry: Registry | None = None) -> dict[str, Component]:
    """Rebuilds every component saved in `folder` from its registered name, config and weights (in eval mode)."""
    registry = registry or get_registry()
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise GenieError(f"{folder}: no {MANIFEST}; not a genie checkpoint folder")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenieError(f"{path}: damaged, not a JSON manifest ({error}); run the stage that wrote it again") from None
    if not isinstance(manifest, dict) or not all(isinstance(e, dict) and "name" in e for e in manifest.values()):
        raise GenieError(f"{path}: damaged, not a components manifest; run the stage that wrote it again")
    out = {}
    for kind, entry in manifest.items():
        try:
            info = registry.get(kind, entry["name"])
        except PluginError as error:
            if not entry.get("package"):
                raise
            raise GenieError(f"{path}: {error}; it was registered by package {entry['package']} "
                             f"{entry.get('version')}: install that package to load this run") from None
        try:
            config = info.cls.config_class(**entry["config"])
        except (TypeError, ValueError) as error:
            raise GenieError(f"{path}: the saved {kind} config does not fit {info.name} from {info.owner}: "
                             f"{error}") from None
        args = [config]
        if entry["spec"] is not None:
            spec = dict(entry["spec"])
            spec_cls = SPECS[spec.pop("type")]
            for key in ("grid", "token_grid"):  # JSON gives lists
                if key in spec:
                    spec[key] = tuple(spec[key])
            args.append(spec_cls(**spec))
        module = info.cls(*args)
        if module.state_dict():
            weights = Path(folder) / f"{kind}.safetensors"
            try:
                load_model(module, str(weights))
            except (OSError, RuntimeError, SafetensorError) as error:  # missing, damaged, or of another shape
                raise GenieError(f"{weights}: cannot load the {kind} weights into {info.name} ({first_line(error)}); "
                                 f"run the stage that wrote them again") from None
        out[kind] = module.eval()
    return out

"""Checkpoint folders appear complete or not at all; saved components load back identical."""

from __future__ import annotations

import json

import pytest
import torch

from genie_core.errors import GenieError
from genie_core.io.atomic import atomic_dir
from genie_core.registry import get_registry
from genie_core.testing import TINY_VIDEO, build, video
from genie_core.world.components import load_components, save_components


def test_failed_write_leaves_the_previous_folder_untouched(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as folder:
        (folder / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(final) as folder:
        (folder / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_leftover_old_folder_does_not_block_the_next_save(tmp_path):
    final = tmp_path / "stage"
    with atomic_dir(final) as folder:
        (folder / "a.txt").write_text("first")
    (tmp_path / "stage.old").mkdir()  # a previous save died while removing it
    (tmp_path / "stage.old" / "junk").write_text("x")
    with atomic_dir(final) as folder:
        (folder / "a.txt").write_text("second")
    assert (final / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]


def test_components_round_trip(tmp_path):
    tok = build("tokenizer", "st-vivit", TINY_VIDEO)
    x = video()
    tok.loss(x)  # initialises the codebook
    tok.eval()
    save_components(tmp_path, {"tokenizer": ("st-vivit", tok)})
    loaded = load_components(tmp_path)["tokenizer"]
    assert loaded.config == tok.config and loaded.spec == tok.spec
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_a_missing_plugin_is_named_by_its_package(tmp_path):
    """components.json records who registered each component, so a run whose plugin is gone says what to install."""
    tok = build("tokenizer", "st-vivit", TINY_VIDEO)
    save_components(tmp_path, {"tokenizer": ("st-vivit", tok)})
    manifest = json.loads((tmp_path / "components.json").read_text())
    owner = get_registry().get("tokenizer", "st-vivit").owner
    assert (manifest["tokenizer"]["package"], manifest["tokenizer"]["version"]) == (owner.package, owner.version)
    manifest["tokenizer"].update(name="fancy-tokenizer", package="genie-fancy", version="0.3")
    (tmp_path / "components.json").write_text(json.dumps(manifest))
    with pytest.raises(GenieError, match=r"unknown tokenizer 'fancy-tokenizer'; registered tokenizer names: .*"
                                         r"registered by package genie-fancy 0.3: install that package"):
        load_components(tmp_path)


def test_missing_weights_is_a_clear_error(tmp_path):
    tok = build("tokenizer", "st-vivit", TINY_VIDEO)
    save_components(tmp_path, {"tokenizer": ("st-vivit", tok)})
    (tmp_path / "tokenizer.safetensors").unlink()
    with pytest.raises(GenieError, match="tokenizer.safetensors: cannot load the tokenizer weights"):
        load_components(tmp_path)
    with pytest.raises(GenieError, match="not a genie checkpoint folder"):
        load_components(tmp_path / "nowhere")

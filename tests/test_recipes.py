"""Every shipped recipe validates; bad recipes get the documented messages, all at once, naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from genie_core.cli import main
from genie_core.errors import RecipeError
from genie_core.recipe import apply_overrides, load_recipe

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert set(recipe.components) == {"tokenizer", "action_model", "dynamics", "sampler", "source"}
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# genie run recipes/"), "each recipe starts with the command that runs it"


def problems_of(tmp_path: Path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    assert all(str(path) in p for p in info.value.problems), "every message names the file"
    return info.value.problems


GOOD = (REPO / "recipes" / "coinrun-tiny.toml").read_text()


def test_unknown_component_lists_registered_ones(tmp_path):
    [problem] = problems_of(tmp_path, GOOD.replace('name = "st-vivit"', 'name = "st-vivt"'))
    assert "unknown tokenizer 'st-vivt'" in problem and "st-vivit" in problem.split("names:")[1]


def test_unknown_key_lists_valid_keys(tmp_path):
    [problem] = problems_of(tmp_path, GOOD, ["tokenizer.patchsize=4"])
    assert "unknown key 'patchsize'" in problem and "patch_size" in problem and "[tokenizer]" in problem


def test_wrong_type_and_range(tmp_path):
    problems = problems_of(tmp_path, GOOD, ["train.tokenizer.steps=1.5", "train.dynamics.lr=-1", "run.seed=true"])
    assert len(problems) == 3
    text = "\n".join(problems)
    assert "key 'steps': expected int, got float" in text
    assert "'lr' must be > 0" in text
    assert "key 'seed': expected int, got bool" in text


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(tmp_path, GOOD + "\n[trian]\nsteps = 1\n",
                           ["dynamics.name=nope", "tokenizer.heads=5", "sampler.steps=0", "source.game=3"])
    text = "\n".join(problems)
    assert len(problems) == 5, text
    for expected in ("unknown table [trian]", "unknown dynamics 'nope'", "'dim' (96) must be divisible by 'heads' (5)",
                     "'steps' must be > 0", "key 'game': expected str"):
        assert expected in text


def test_cross_table_check_patch_must_tile_resolution(tmp_path):
    [problem] = problems_of(tmp_path, GOOD, ["tokenizer.patch_size=5"])
    assert "'patch_size' 5 does not divide data.resolution 64" in problem


def test_missing_table_and_bad_toml(tmp_path):
    problems = problems_of(tmp_path, GOOD.replace("[sampler]", "[not_sampler]"))
    assert any("missing table [sampler]" in p for p in problems)
    [problem] = problems_of(tmp_path, "[run\n")
    assert "not valid TOML" in problem


def test_overrides_parse_toml_values_and_bare_words():
    table = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=1e-3", "a.d=st-vivit", 'a.e="x y"', "f.g=true"], "r.toml")
    assert table == {"a": {"b": 2, "c": 1e-3, "d": "st-vivit", "e": "x y"}, "f": {"g": True}}
    with pytest.raises(RecipeError, match="not of the form"):
        apply_overrides({}, ["novalue"], "r.toml")


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = REPO / "recipes" / "coinrun-tiny.toml"
    assert main(["validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["validate", str(good), "tokenizer.name=nope", "eval.windows=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert main(["validate", str(tmp_path / "missing.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_sampler_must_fit_the_dynamics_model(tmp_path):
    """A MaskGIT sampler with a dynamics model that cannot mask is caught by validation, not after training."""
    from genie_core.registry import Owner, Registrar, load_registry
    from genie_plugins.maskgit import MaskGITDynamics

    class NoMasking(MaskGITDynamics):
        supports_masking = False

    registry = load_registry()
    registrar = Registrar(Owner("test", "tests", "0"))
    registrar.add_dynamics("no-masking", NoMasking)
    registry.commit(registrar)
    path = tmp_path / "r.toml"
    path.write_text(GOOD)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["dynamics.name=no-masking"], registry=registry)
    [problem] = info.value.problems
    expected = "[sampler] (maskgit): needs a dynamics model that supports masking; dynamics 'no-masking' does not"
    assert expected in problem


def test_dynamics_windows_must_fit_the_tokenizer_and_eval(tmp_path):
    problems = problems_of(tmp_path, GOOD, ["train.dynamics.seq_len=12", "eval.dtpsnr_t=12"])
    text = "\n".join(problems)
    assert "seq_len 12 exceeds train.tokenizer.seq_len 8" in text
    assert "dtpsnr_t 12 needs windows of 13 frames" in text


def test_quantizer_choice_is_checked(capsys):
    smoke = str(REPO / "recipes" / "coinrun-smoke.toml")
    assert main(["validate", smoke, "tokenizer.quantizer=fsq", "action_model.quantizer=lfq"]) == 0
    assert main(["validate", smoke, "tokenizer.quantizer=lfq", "tokenizer.codebook_size=48",
                 "action_model.quantizer=pq"]) == 2
    err = capsys.readouterr().err
    assert "'quantizer' lfq needs a power-of-two number of codes, got 48" in err
    assert "'quantizer' is 'pq'; valid choices: vq, fsq, lfq" in err


def test_swapping_a_component_drops_the_old_ones_options(capsys):
    """`action_model.name=true-actions` on a recipe written for pixel-lam: pixel-lam's options are not the new
    component's, so they are dropped (and named), also when an override before the swap set them (an ablation's
    shared overrides, then its variant's swap). Options both take (st-vivit and c-vivit share theirs) and options
    given after the swap stay."""
    smoke = str(REPO / "recipes" / "coinrun-smoke.toml")
    assert main(["validate", smoke, "action_model.name=true-actions"]) == 0
    err = capsys.readouterr().err
    assert "'true-actions' replaces 'pixel-lam'; the options code_dim, decoder_depth, dim, encoder_depth, " \
           "heads, num_actions, patch_size are not its own and are dropped" in err
    written = load_recipe(smoke).components["tokenizer"].config
    swapped = load_recipe(smoke, ["tokenizer.name=c-vivit"]).components["tokenizer"].config
    assert swapped.dim == written.dim and swapped.patch_size == written.patch_size  # shared options carried over
    notes: list[str] = []
    recipe = load_recipe(smoke, ["dynamics.name=autoregressive", "dynamics.dim=16", "sampler.name=autoregressive"],
                         notes=notes)
    assert recipe.components["dynamics"].config.dim == 16 and not any("'dim'" in n for n in notes)
    notes = []
    load_recipe(smoke, ["action_model.dim=64", "action_model.name=true-actions"], notes=notes)  # no "unknown key"
    assert any("'true-actions' replaces 'pixel-lam'" in n and " dim," in n for n in notes)
    with pytest.raises(RecipeError, match="unknown key 'dim'"):
        load_recipe(smoke, ["action_model.name=true-actions", "action_model.dim=64"])  # meant for the new one


def test_trackers_are_known_and_installed(capsys):
    """A tracker that is misspelt, or not installed, would log nothing: the recipe check says so and names the
    choices. run.trackers=none and the installed tensorboard pass."""
    smoke = str(REPO / "recipes" / "coinrun-smoke.toml")
    assert main(["validate", smoke, "run.trackers=none"]) == 0
    assert main(["validate", smoke, "run.trackers=tensorboard"]) == 0
    capsys.readouterr()
    assert main(["validate", smoke, "run.trackers=tensorbord"]) == 2
    err = capsys.readouterr().err
    assert "key 'trackers': unknown tracker 'tensorbord'" in err and "tensorboard, wandb" in err
    from accelerate.tracking import is_wandb_available

    if not is_wandb_available():
        assert main(["validate", smoke, "run.trackers=tensorboard,wandb"]) == 2
        assert "tracker 'wandb' is not installed here (pip install wandb)" in capsys.readouterr().err

"""Shared fixtures: the repository root, and one finished smoke run for the tests that only read it. The tiny
shapes and components come from the contract kit, `genie_core.testing`."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def played_run(tmp_path_factory):
    """A finished smoke-recipe run, for the tests that only read it (play): trained once per test session."""
    from genie_core.cli import main

    out = tmp_path_factory.mktemp("played") / "smoke"
    assert main(["run", str(REPO / "recipes" / "coinrun-smoke.toml"), "--out", str(out)]) == 0
    return out

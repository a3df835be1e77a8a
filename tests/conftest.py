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


@pytest.fixture(scope="module")
def play(played_run):
    """The smoke run's world, loaded as `genie play` loads it."""
    from genie_core.play.session import PlayWorld

    return PlayWorld.load(played_run)


@pytest.fixture()
def server(play):
    """A play server for it on a free port of this machine, closed after the test."""
    from genie_core.play.server import PlayServer

    with PlayServer(play) as running:
        yield running

"""Shared fixtures: tiny shapes, and the registered components built from their tiny configs."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from genie_core.interfaces import TokenSpec, VideoSpec
from genie_core.registry import get_registry

REPO = Path(__file__).resolve().parents[1]
TINY_VIDEO = VideoSpec(channels=3, height=16, width=16, num_frames=6, true_actions=4)  # footage with 4 true actions


def names(kind: str) -> list[str]:
    """Every registered component of `kind`, and each of its tiny variants as NAME:VARIANT."""
    registry = get_registry()
    return [f"{name}{suffix}" for name in registry.names(kind)
            for suffix in ["", *(f":{v}" for v in registry.get(kind, name).cls.tiny_variants())]]


def build(kind: str, name: str, spec=None, seed: int = 0):
    """The registered component `name` (or `name:variant`) of `kind`, from its tiny config (or that variant's),
    with weights drawn from `seed`."""
    name, _, variant = name.partition(":")
    info = get_registry().get(kind, name)
    torch.manual_seed(seed)
    config = info.cls.tiny_variants()[variant] if variant else info.cls.tiny_config()
    if getattr(info.cls, "needs_tokenizer", False):  # a token-input action model reads a tiny tokenizer's tokens
        tokenizer = build("tokenizer", "st-vivit", spec, seed).eval()
        torch.manual_seed(seed)
        model = info.cls(config, attrs.evolve(spec, token_vocab=tokenizer.codebook_size, token_grid=tokenizer.grid))
        model.use_tokenizer(tokenizer)
        return model
    return info.cls(config) if spec is None else info.cls(config, spec)


def video(batch: int = 2, frames: int = TINY_VIDEO.num_frames, seed: int = 0) -> torch.Tensor:
    """A smooth random video (moving blobs are easier to overfit than white noise), [B, T, 3, 16, 16] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 1, 3, 4, 4, generator=g)
    base = torch.nn.functional.interpolate(base.flatten(0, 1), size=(16, 16), mode="bilinear").unflatten(0, (batch, 1))
    shifts = [torch.roll(base, shifts=t, dims=-1) for t in range(frames)]
    return torch.cat(shifts, dim=1).clamp(0, 1)


def token_spec(num_actions: int = 4) -> TokenSpec:
    return TokenSpec(vocab_size=32, grid=(4, 4), num_frames=TINY_VIDEO.num_frames, num_actions=num_actions)


@pytest.fixture(scope="session")
def played_run(tmp_path_factory):
    """A finished smoke-recipe run, for the tests that only read it (play): trained once per test session."""
    from genie_core.cli import main

    out = tmp_path_factory.mktemp("played") / "smoke"
    assert main(["run", str(REPO / "recipes" / "coinrun-smoke.toml"), "--out", str(out)]) == 0
    return out

"""The contract kit: the promises every component of a kind keeps, as checks any package can run in its own tests.

One line in a plugin package's tests checks every component that package registers (and each of their tiny
variants) against its kind's contract and the capabilities it declares:

    from genie_core.testing import parametrize_contracts

    @parametrize_contracts(package="my-genie-plugin")   # the distribution name; None: every installed component
    def test_contract(contract):
        contract()

Each check builds the component from its `tiny_config()` (and each `tiny_variants()` entry) at the tiny shapes
below, so the whole kit runs on a CPU in seconds per component. Needs pytest.
"""

from __future__ import annotations

import attrs
import torch

from genie_core.interfaces import TokenSpec, VideoSpec
from genie_core.registry import Registry, get_registry

# Footage of 16x16 frames, 6 per window, with 4 true actions recorded: what the checks feed the video models.
TINY_VIDEO = VideoSpec(channels=3, height=16, width=16, num_frames=6, true_actions=4)


def names(kind: str, registry: Registry | None = None) -> list[str]:
    """Every registered component of `kind`, and each of its tiny variants as NAME:VARIANT."""
    registry = registry or get_registry()
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
    """The tokens the dynamics checks use: a 4x4 grid of 32 codes, 6 frames, `num_actions` actions."""
    return TokenSpec(vocab_size=32, grid=(4, 4), num_frames=TINY_VIDEO.num_frames, num_actions=num_actions)


def tokens_and_actions(batch: int = 2, frames: int = TINY_VIDEO.num_frames, seed: int = 0):
    """Random tokens [B, frames, 4, 4] and the actions between them [B, frames - 1], at `token_spec()`."""
    g = torch.Generator().manual_seed(seed)
    spec = token_spec()
    tokens = torch.randint(0, spec.vocab_size, (batch, frames, *spec.grid), generator=g)
    actions = torch.randint(0, spec.num_actions, (batch, frames - 1), generator=g)
    return tokens, actions


def parametrize_contracts(package: str | None = None, registry: Registry | None = None):
    """A pytest decorator: the test runs once per contract check of every component `package` registered (every
    installed component when None), each test id naming the kind, the component and the check."""
    import pytest

    from genie_core.testing.contracts import contract_checks

    checks = contract_checks(package, registry)
    if not checks:
        owners = sorted({info.owner.package for info in (registry or get_registry()).components.values()})
        raise ValueError(f"no registered component comes from package '{package}'; installed packages with "
                         f"components: {', '.join(owners)}")
    return pytest.mark.parametrize("contract", checks, ids=[check.id for check in checks])


__all__ = ["TINY_VIDEO", "build", "names", "parametrize_contracts", "token_spec", "tokens_and_actions", "video"]

"""The paper's metrics and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from genie_core.config import TrainConfig
from genie_core.metrics import PSNR_CAP_DB, delta_psnr, mean_and_ci, psnr
from genie_core.training import lr_lambda


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_known_values():
    x = torch.full((2, 3, 3, 8, 8), 0.5)
    assert torch.all(psnr(x, x) == PSNR_CAP_DB)  # identical frames: capped, not infinite
    y = x + 0.1  # mse 0.01 -> 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2, 3), 20.0), atol=1e-4)


def test_delta_psnr_is_zero_when_actions_are_ignored_and_positive_when_they_steer():
    target = torch.rand(4, 3, 8, 8)
    same = target + 0.05
    assert torch.allclose(delta_psnr(target, same, same), torch.zeros(4))
    assert torch.all(delta_psnr(target, target + 0.01, target + 0.2) > 0)


def test_mean_and_ci():
    stats = mean_and_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stats["mean"] == 2.5 and stats["n"] == 4
    assert stats["ci95"] == pytest.approx(1.96 * torch.tensor([1.0, 2, 3, 4]).std().item() / 2)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    constant = lr_lambda(TrainConfig(steps=100, lr=3e-4, min_lr=3e-4, warmup_steps=10))  # the paper's tokenizer
    assert constant(50) == pytest.approx(1.0)

"""The paper's metrics and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from genie_core.config import TrainConfig
from genie_core.eval.metrics import PSNR_CAP_DB, action_agreement, codebook_stats, delta_psnr, mean_and_ci, psnr, ssim
from genie_core.training.engine import lr_lambda

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


def test_ssim_is_one_for_identical_frames_and_falls_with_noise():
    x = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x).shape == (2, 3) and torch.allclose(ssim(x, x), torch.ones(2, 3))
    noisy = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    assert ssim(x[..., :8, :8], x[..., :8, :8]).shape == (2, 3)  # frames smaller than the 11-pixel window


def test_codebook_stats():
    assert codebook_stats(torch.tensor([5, 5, 5, 5])) == {"size": 4, "used": 4, "usage": 1.0,
                                                         "perplexity": pytest.approx(4.0)}
    one = codebook_stats(torch.tensor([0, 9, 0, 0]))
    assert one["used"] == 1 and one["usage"] == 0.25 and one["perplexity"] == pytest.approx(1.0)


def test_action_agreement_on_known_cases():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 5, (2000,), generator=g)
    perfect = action_agreement(real, real, 5)
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["mapping_accuracy"] == 1.0
    relabelled = action_agreement((real + 2) % 5, real, 5)  # names need not match, meaning must
    assert relabelled["nmi"] == pytest.approx(1.0) and relabelled["latent_to_real"] == [3, 4, 0, 1, 2]
    coarse = action_agreement(real // 2, real, 5)  # two true actions share one latent action
    assert 0.5 < coarse["nmi"] < 1 and coarse["mapping_accuracy"] == pytest.approx(0.6, abs=0.05)
    noise = action_agreement(torch.randint(0, 5, (2000,), generator=g), real, 5)
    assert noise["nmi"] < 0.02 and abs(noise["mapping_accuracy"] - noise["majority_baseline"]) < 0.1
    assert noise["labelled"] == 200 and noise["scored"] == 1800


def test_action_agreement_leaves_out_unknown_true_actions():
    latent = torch.tensor([0, 1, 0, 1, 2, 2])
    real = torch.tensor([3, 4, 3, 4, -1, -1])
    result = action_agreement(latent, real, 3, labelled_fraction=0.5)
    assert result["transitions"] == 4 and result["nmi"] == pytest.approx(1.0)
    assert action_agreement(latent, torch.full((6,), -1), 3) is None


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

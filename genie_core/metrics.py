"""The paper's metrics. PSNR comes from torchmetrics; dtPSNR is built on it as the paper defines it.

PSNR is computed per frame over [C, H, W] with data range 1. Identical frames would give infinity: PSNR is capped at
100 dB so that averages stay finite.

dtPSNR at t: the prompt is frame 0 and t counts generated frames after it (t = 4: four actions, four new frames).
In the paper's notation, where the prompt is x_1, this is its x_{t+1}.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

PSNR_CAP_DB = 100.0


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB: [..., C, H, W] x2 -> [...]."""
    lead = pred.shape[:-3]
    pred = pred.reshape(-1, *pred.shape[-3:]).float().clamp(0, 1)
    target = target.reshape(-1, *target.shape[-3:]).float()
    values = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB).reshape(lead)


def delta_psnr(target: torch.Tensor, with_inferred: torch.Tensor, with_random: torch.Tensor) -> torch.Tensor:
    """The paper's controllability metric, per window:
    dtPSNR = PSNR(x_t, xhat_t) - PSNR(x_t, xhat'_t), where xhat_t was generated with the latent actions the LAM
    inferred from the real video and xhat'_t with random latent actions. Positive when actions steer the model."""
    return psnr(with_inferred, target) - psnr(with_random, target)


def mean_and_ci(values: torch.Tensor) -> dict[str, float]:
    """Mean with a normal-approximation 95% confidence interval."""
    values = values.double().flatten()
    n = values.numel()
    mean = values.mean().item()
    half = 1.96 * values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": half, "n": n}

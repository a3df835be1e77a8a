"""The paper's metrics and the ones its readers ask for. PSNR, SSIM and NMI come from torchmetrics; dtPSNR is built on
PSNR as the paper defines it; FVD lives in genie_core.eval.fvd.

PSNR and SSIM are computed per frame over [C, H, W] with data range 1. Identical frames would give infinite PSNR: it is
capped at 100 dB so that averages stay finite.

dtPSNR at t: the prompt is frame 0 and t counts generated frames after it (t = 4: four actions, four new frames).
In the paper's notation, where the prompt is x_1, this is its x_{t+1}.
"""

from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.functional.clustering import normalized_mutual_info_score
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB: [..., C, H, W] x2 -> [...]."""
    lead = pred.shape[:-3]
    pred = pred.reshape(-1, *pred.shape[-3:]).float().clamp(0, 1)
    target = target.reshape(-1, *target.shape[-3:]).float()
    values = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB).reshape(lead)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM: [..., C, H, W] x2 -> [...]. Gaussian window of 11 pixels (sigma 1.5), smaller for tiny frames."""
    lead = pred.shape[:-3]
    pred = pred.reshape(-1, *pred.shape[-3:]).float().clamp(0, 1)
    target = target.reshape(-1, *target.shape[-3:]).float()
    side = min(11, min(pred.shape[-2:]) - (1 - min(pred.shape[-2:]) % 2))  # odd, no larger than the frame
    values = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none",
                                                 kernel_size=side, sigma=1.5 * side / 11)
    return values.reshape(lead)


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


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """How a codebook is used, from how often each code was chosen: codes used, their share of the codebook, and the
    perplexity exp(entropy) (= the codebook size when every code is equally likely, 1 when one code is always used)."""
    counts = counts.double().flatten()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"size": counts.numel(), "used": used, "usage": used / counts.numel(), "perplexity": math.exp(entropy)}


def action_class_lookup(classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct class names (in first-seen order) and a lookup tensor from true action to class index; index -1
    (no action) maps to -1."""
    names = list(dict.fromkeys(classes))
    return names, torch.tensor([names.index(c) for c in classes] + [-1])


def action_agreement(latent: torch.Tensor, real: torch.Tensor, num_latent: int, labelled_fraction: float = 0.1,
                     seed: int = 0) -> dict | None:
    """Do the discovered actions mean anything? Latent actions against the true ones of the same transitions.

    - nmi: normalised mutual information (arithmetic mean normalisation); 1 for a one-to-one relabelling, 0 for
      independent labels.
    - mapping_accuracy: as in the paper's behavioural cloning, each latent action is mapped to the real action it
      co-occurs with most often on a small labelled subset (`labelled_fraction` of the transitions, random with
      `seed`); the mapping is scored on the rest. majority_baseline is the accuracy of always answering the most
      frequent real action of the labelled subset: a mapping that means something beats it.
    - latent_to_real / real_to_latent: the fitted mapping, and the latent action most often seen with each real one
      (what a player's keys map to).
    Transitions whose real action is unknown (-1) are left out; None when none is known.
    """
    latent, real = latent.flatten().long().cpu(), real.flatten().long().cpu()
    known = real >= 0
    latent, real = latent[known], real[known]
    n = real.numel()
    if n < 2:
        return None
    num_real = int(real.max()) + 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_labelled = min(n - 1, max(1, round(n * labelled_fraction)))
    labelled, scored = order[:n_labelled], order[n_labelled:]

    def contingency(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # [num_latent, num_real] counts
        return torch.bincount(rows * num_real + cols, minlength=num_latent * num_real).reshape(num_latent, num_real)

    fit = contingency(latent[labelled], real[labelled])
    majority = int(fit.sum(0).argmax())
    latent_to_real = torch.where(fit.sum(1) > 0, fit.argmax(1), torch.full((num_latent,), majority))
    table = contingency(latent, real)
    seen = table.sum(0) > 0
    with warnings.catch_warnings():  # torchmetrics builds a sparse tensor and torch warns about unchecked invariants
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        nmi = float(normalized_mutual_info_score(latent, real))
    return {
        "transitions": n,
        "nmi": nmi,
        "mapping_accuracy": (latent_to_real[latent[scored]] == real[scored]).double().mean().item(),
        "majority_baseline": (real[scored] == majority).double().mean().item(),
        "labelled": n_labelled,
        "scored": n - n_labelled,
        "latent_to_real": latent_to_real.tolist(),
        "real_to_latent": {int(a): int(table[:, a].argmax()) for a in range(num_real) if seen[a]},
        "contingency": table.tolist(),
    }

"""Charts of evaluation and benchmark results (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: Path, title: str, dpi: int = 100) -> None:
    """Title, tight layout, PNG, and the figure's memory released."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def loglog(ax, xlabel: str, ylabel: str) -> None:
    """Axes for scaling curves: x in powers of two, y logarithmic, both labelled, light grid."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _by_step(ax, series: dict[str, list[dict]], ylabel: str) -> None:
    for label, stats in series.items():
        steps = list(range(1, len(stats) + 1))
        mean = [s["mean"] for s in stats]
        half = [0.0 if s["ci95"] != s["ci95"] else s["ci95"] for s in stats]  # NaN CI (one window) draws no band
        ax.plot(steps, mean, marker="o", label=label)
        ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], alpha=0.2)
    ax.set_xlabel("generated frame t (after the prompt)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def fidelity_by_step(psnr: dict[str, list[dict]], ssim: dict[str, list[dict]], path: Path, title: str,
                     baselines: dict[str, list[dict]] | None = None) -> None:
    """PSNR and SSIM of generated frames against the truth at each rollout step, one line per run, 95% CI bands;
    `baselines` (PSNR by step, e.g. the prompt frame shown again) are drawn as grey dashed reference lines."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _by_step(left, psnr, "PSNR (dB)")
    _by_step(right, ssim, "SSIM")
    for (label, stats), style in zip((baselines or {}).items(), ("--", ":", "-.")):
        steps = range(1, len(stats) + 1)
        left.plot(steps, [s["mean"] for s in stats], style, color="grey", label=label)
    if len(psnr) > 1 or baselines:
        left.legend(fontsize=8)
    save(fig, path, title)


def action_usage(usage: list[int], contingency: list[list[int]] | None, path: Path, title: str,
                 true_names: list[str] | None = None) -> None:
    """How often each latent action was inferred, and (when the data has true actions) which true actions each
    latent action came with, as a share of that latent action's transitions; true actions by name when the source
    names them."""
    panels = 2 if contingency else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 4), squeeze=False)
    bars = axes[0][0]
    bars.bar(range(len(usage)), usage)
    bars.set_xlabel("latent action")
    bars.set_ylabel("transitions")
    bars.set_xticks(range(len(usage)))
    bars.set_title("latent action usage")
    if contingency:
        heat = axes[0][1]
        rows = [[c / max(1, sum(row)) for c in row] for row in contingency]
        image = heat.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        heat.set_xlabel("true action")
        heat.set_ylabel("latent action")
        heat.set_yticks(range(len(rows)))
        if true_names and len(true_names) == len(rows[0]):
            heat.set_xticks(range(len(true_names)), true_names, rotation=90, fontsize=7)
        heat.set_title("P(true action | latent action)")
        fig.colorbar(image, ax=heat)
    save(fig, path, title)

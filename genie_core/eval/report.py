"""The Markdown and JSON an evaluation leaves for people: `genie eval`'s eval.md and comparison, the report stage's
report.md. One number format for all of them (`cell`)."""

from __future__ import annotations

import json
from pathlib import Path

from genie_core.io.machine import summary as machine_summary


def cell(stat: dict | None, digits: int = 2, unit: str | None = None) -> str:
    """'16.81 ± 0.75' for a mean_and_ci result (no interval when it has none), with '(n=128 windows)' after it when
    given the unit it counts."""
    if stat is None:
        return "n/a"
    ci = "" if stat["ci95"] != stat["ci95"] else f" ± {stat['ci95']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{ci}" + (f" (n={stat['n']} {unit})" if unit else "")


def inexact(stat: dict, exact: int) -> str:
    """The world minus the prompt frame shown again over the windows where that frame is not exact, and how many
    windows it is exact in (where it scores the PSNR cap)."""
    return f"{cell(stat, unit='windows')}; exact in {exact}"


def waiting(stage: dict) -> str:
    """" (0.3% of it getting batches)": the share of a training stage's time its data path took (none where the
    stage's record predates that count)."""
    if "data_seconds" not in stage or not stage["seconds"]:
        return ""
    return f" ({100 * stage['data_seconds'] / stage['seconds']:.1f}% of it getting batches)"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of the short table `genie eval` prints and compares."""
    rows = [("tokenizer PSNR (dB)", cell(result["tokenizer_psnr_db"])),
            ("tokenizer SSIM", cell(result["tokenizer_ssim"], 3))]
    for t, stat in result["dtpsnr_db"].items():
        rows.append((f"dtPSNR t={t} (dB)", cell(stat, 3)))
    for t, stat in result["dynamics_psnr_at_t_db"].items():
        rows += [(f"dynamics PSNR t={t} (dB)", cell(stat)),
                 (f"copy-prompt PSNR t={t} (dB)", cell(result["copy_prompt_psnr_at_t_db"][t])),
                 (f"copy-prompt tokens PSNR t={t} (dB)", cell(result["copy_prompt_tokens_psnr_at_t_db"][t])),
                 (f"dynamics minus copy-prompt t={t} (dB)", cell(result["dynamics_minus_copy_prompt_at_t_db"][t]))]
        if "copy_prompt_exact_at_t" in result:  # (evaluations from before kept no count)
            rows.append((f"dynamics minus copy-prompt where it is not exact t={t} (dB)",
                         inexact(result["dynamics_minus_copy_prompt_inexact_at_t_db"][t],
                                 result["copy_prompt_exact_at_t"][t])))
    last = result["horizon"]
    rows.append((f"dynamics SSIM t={last}", cell(result["dynamics_ssim_by_step"][-1], 3)))
    fvd = result.get("fvd")
    rows.append((f"FVD ({fvd['videos']} clips of {fvd['frames']})" if fvd else "FVD",
                 f"{fvd['value']:.1f}" if fvd else "not measured (no --i3d)"))
    scored = ((result["actions_vs_true"], "actions"), (result.get("actions_vs_true_classes"), "action classes"))
    for actions, what in scored:
        if actions:
            rows += [(f"latent vs true {what} NMI", f"{actions['nmi']:.3f}"),
                     (f"latent -> true {what} mapping accuracy",
                      f"{actions['mapping_accuracy']:.3f} (majority {actions['majority_baseline']:.3f})")]
    if not result["actions_vs_true"]:
        rows.append(("latent vs true actions", "n/a (no true actions in the data)"))
    for name in ("tokenizer", "lam"):
        book = result[f"{name}_codebook"]
        rows.append((f"{name} codes used / perplexity", f"{book['used']}/{book['size']} / {book['perplexity']:.1f}"))
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_run(result: dict, folder: Path, name: str) -> None:
    """eval.json, eval.md and the PNGs of one run into `folder` (which the caller creates atomically)."""
    from genie_core.eval.plots import action_usage, fidelity_by_step

    (folder / "eval.json").write_text(json.dumps(result, indent=2))
    fidelity_by_step({name: result["dynamics_psnr_by_step_db"]}, {name: result["dynamics_ssim_by_step"]},
                     folder / "fidelity_by_step.png", f"{name}: rollouts with inferred actions", baselines(result))
    actions = result["actions_vs_true"]
    names = result.get("true_action_names")
    action_usage(result["lam_usage"], actions["contingency"] if actions else None, folder / "actions.png",
                 f"{name}: latent actions", names)
    settings = result["settings"]
    lines = [f"# Evaluation: {name}", "",
             f"Data `{result['data']}` split `{result['split']}`: {settings['windows']} windows (evenly spaced), "
             f"seed {settings['seed']}; rollouts of {result['horizon']} steps from the first frame, driven by the "
             "actions the latent action model infers from the true frames.", "",
             table(["metric", "value (95% CI)"], [list(row) for row in summary_rows(result)]), "",
             "## Fidelity by step", "",
             table(["t", "PSNR (dB)", "copy-prompt PSNR (dB)", "copy-prompt tokens PSNR (dB)", "SSIM"],
                   [[str(k + 1), cell(p), cell(c), cell(ct), cell(s, 3)] for k, (p, c, ct, s) in
                    enumerate(zip(result["dynamics_psnr_by_step_db"], result["copy_prompt_psnr_by_step_db"],
                                  result["copy_prompt_tokens_psnr_by_step_db"], result["dynamics_ssim_by_step"]))]),
             "", "Copy-prompt shows the prompt frame again at every step; copy-prompt tokens shows the tokenizer's "
             "reconstruction of it. A world that does not beat them has learned less than a still frame.", "",
             "![fidelity](fidelity_by_step.png)", "", "## Latent actions", "", "![actions](actions.png)", ""]
    if actions:
        lines += [f"Each latent action mapped to the true action it came with most often, on {actions['labelled']} "
                  f"labelled transitions (scored on the other {actions['scored']}):", "",
                  table(["latent action", "transitions", "true action it maps to"],
                        [[str(latent), str(count), true_action_name(real, names)] for latent, (count, real) in
                         enumerate(zip(result["lam_usage"], actions["latent_to_real"]))]), ""]
    (folder / "eval.md").write_text("\n".join(lines))


def true_action_name(action: int, names: list[str] | None) -> str:
    """'LEFT (1)' where the source names its actions, else the number."""
    return f"{names[action]} ({action})" if names and 0 <= action < len(names) else str(action)


def baselines(result: dict) -> dict[str, list[dict]]:
    """The do-nothing baselines by step, as reference lines for the fidelity charts."""
    return {"copy-prompt": result["copy_prompt_psnr_by_step_db"],
            "copy-prompt tokens": result["copy_prompt_tokens_psnr_by_step_db"]}


def comparison_table(results: dict[str, dict]) -> str:
    """The summary rows of several evaluations side by side, one column per run."""
    rows = [dict(summary_rows(result)) for result in results.values()]
    metrics = list(dict.fromkeys(metric for row in rows for metric in row))
    return table(["metric", *results], [[m, *(row.get(m, "n/a") for row in rows)] for m in metrics])


def write_comparison(results: dict[str, dict], folder: Path) -> str:
    """One side-by-side table (and chart) of several runs evaluated on the same windows; returns the table."""
    from genie_core.eval.plots import fidelity_by_step

    side_by_side = comparison_table(results)
    first = next(iter(results.values()))
    (folder / "comparison.json").write_text(json.dumps(results, indent=2))
    fidelity_by_step({n: r["dynamics_psnr_by_step_db"] for n, r in results.items()},
                     {n: r["dynamics_ssim_by_step"] for n, r in results.items()},
                     folder / "comparison.png", "rollouts with inferred actions", baselines(first))
    (folder / "comparison.md").write_text("\n".join([
        "# Comparison", "",
        f"Every run on the same {first['settings']['windows']} windows of `{first['data']}` split "
        f"`{first['split']}`, seed {first['settings']['seed']}.", "", side_by_side, "",
        "![fidelity by step](comparison.png)", ""]))
    return side_by_side

def report_markdown(report: dict, t: int) -> str:
    train_tok = report["stages"]["tokenizer"]
    train_dyn = report["stages"]["dynamics"]
    nmi = "n/a (no true actions)" if report["actions_vs_true_nmi"] is None else f"{report['actions_vs_true_nmi']:.3f}"
    if report.get("actions_vs_true_classes_nmi") is not None:
        nmi += f"; {report['actions_vs_true_classes_nmi']:.3f} on classes of actions that do the same thing"
    lam = report["lam_codebook"]
    lines = [
        f"# Run report: {report['run']}",
        "",
        f"Recipe `{report['recipe']}`; components: "
        + ", ".join(f"{kind} `{name}`" for kind, name in report["components"].items()) + ".",
        "",
        "| metric (held-out levels) | value, 95% CI |",
        "|---|---|",
        f"| tokenizer reconstruction PSNR (dB) | {cell(report['tokenizer_psnr_db'], unit='frames')} |",
        f"| controllability dtPSNR at t={t} (dB) | {cell(report[f'dtpsnr_t{t}_db'], unit='windows')} |",
        f"| dynamics PSNR at t={t}, inferred actions (dB) | {cell(report[f'dynamics_psnr_t{t}_db'], unit='windows')} |",
        f"| baseline: the prompt frame again, PSNR at t={t} (dB) | "
        f"{cell(report[f'copy_prompt_psnr_t{t}_db'], unit='windows')} |",
        f"| baseline: the prompt's tokens again, PSNR at t={t} (dB) | "
        f"{cell(report[f'copy_prompt_tokens_psnr_t{t}_db'], unit='windows')} |",
        f"| dynamics minus the prompt frame again, at t={t} (dB, paired) | "
        f"{cell(report[f'dynamics_minus_copy_prompt_t{t}_db'], unit='windows')} |",
        f"| the same, where the prompt frame again is not exact (dB, paired) | "
        f"{inexact(report[f'dynamics_minus_copy_prompt_inexact_t{t}_db'], report[f'copy_prompt_exact_t{t}'])} |",
        f"| tokenizer reconstruction SSIM | {cell(report['tokenizer_ssim'], 3, unit='frames')} |",
        f"| latent vs true actions NMI | {nmi} |",
        f"| latent actions used / perplexity | {lam['used']}/{lam['size']} / {lam['perplexity']:.2f} |",
        "",
        f"Training: tokenizer {train_tok['steps_per_second']:.2f} steps/s{waiting(train_tok)}, "
        f"final loss {train_tok['final']['loss']:.4f}; "
        f"LAM + dynamics {train_dyn['steps_per_second']:.2f} steps/s{waiting(train_dyn)}, "
        f"final loss {train_dyn['final']['loss']:.4f}.",
        "",
        f"Measured on {machine_summary(report.get('machine'))}.",
        "",
        *(["**Warning**: the evaluation windows overlap (more windows than the held-out footage holds apart), so "
           "these intervals are narrower than they should be; build more validation footage.", ""]
          if report["windows_overlap"] else []),
        f"![rollout](rollout.gif) One held-out prompt frame; panel k holds latent action k "
        f"(of {report['num_actions']}) at every step.",
        "",
        "More (SSIM and PSNR at every step, FVD, latent vs true actions, charts): `genie eval RUN_FOLDER`.",
        "",
    ]
    return "\n".join(lines)

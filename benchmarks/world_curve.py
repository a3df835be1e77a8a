"""How the world improves with training: the latent action and dynamics models of a recipe trained on a run's
tokenizer, scored every N steps on the run's held-out split against the cheapest baselines.

    python benchmarks/world_curve.py RUN [KEY=VALUE ...] [--every 400] [--windows 64] [--name NAME] [--out DIR]

RUN is a finished run (or ablation variant) whose data and tokenizer stages are reused; KEY=VALUE overrides its
recipe for the dynamics stage (steps, model sizes, action model, sampler). Scores at every --every steps, on
--windows evenly spaced windows of the run's validation split: dynamics PSNR at t=4 with inferred actions, the
prompt frame again, the prompt's tokens again, dtPSNR(t=4) with its 95% interval, and latent vs true action NMI.
Trains with the stage's own training loop (`genie_core.training.engine.train`), one process, in the recipe's
precision (`run.mixed_precision`) and with its compiled stacks if it compiles them (`train.dynamics.compile`).
With `train.dynamics.ema_decay` set, each point scores the average of the weights (what the stage saves) and the
weights as trained, and their difference window by window with its 95% interval: one training run settles whether
the average helps.
Point it at footage for tuning (a run with `source.first_level` set apart), never at the evaluation levels: this is
where settings get chosen. Prints each point; saves JSON and a PNG to benchmarks/results/world-curve-NAME.{json,png}
(or --out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator

from genie_core.data.footage import EpisodeIndex, WindowDataset
from genie_core.eval.evaluate import EvalSettings, Evaluation
from genie_core.eval.metrics import mean_and_ci
from genie_core.eval.plots import save
from genie_core.io.machine import describe as describe_machine
from genie_core.io.machine import resolve_mixed_precision
from genie_core.recipe import recipe_with_overrides
from genie_core.run.folder import RunFolder
from genie_core.run.stages import world_models
from genie_core.training.engine import Checkpointing, WorldModelTask, train
from genie_core.world.model import World

RESULTS = Path(__file__).resolve().parent / "results"
T = 4  # generated frames after the prompt, the paper's dtPSNR horizon
PAIRED = ("dynamics_psnr_db", "dtpsnr_db")  # compared window by window between the average and the live weights


def point(world: World, index: EpisodeIndex, windows: int, accelerator: Accelerator,
          per_window: bool = False) -> dict:
    """One world's held-out scores at t = T, each a mean with its 95% interval (and with `per_window`, every
    window's world PSNR and dtPSNR, for comparisons window by window)."""
    settings = EvalSettings(windows=windows, horizon=T, per_window=per_window)
    result = Evaluation(world, index, "val", settings, accelerator).world_model()
    at = str(T)
    scores = {"dynamics_psnr_db": result["dynamics_psnr_at_t_db"][at],
              "copy_prompt_psnr_db": result["copy_prompt_psnr_at_t_db"][at],
              "copy_prompt_tokens_psnr_db": result["copy_prompt_tokens_psnr_at_t_db"][at],
              "dynamics_minus_copy_prompt_db": result["dynamics_minus_copy_prompt_at_t_db"][at],
              "dtpsnr_db": result["dtpsnr_db"][at],
              "actions_nmi": (result["actions_vs_true"] or {}).get("nmi")}
    if per_window:
        windows = result["per_window"]
        scores["per_window"] = {"dynamics_psnr_db": windows["dynamics_psnr_at_t_db"][at],
                                "dtpsnr_db": windows["dtpsnr_db"][at]}
    return scores


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    live = all("live" in p for p in points)  # the weights as trained, beside their average
    weights = ", averaged weights" if live else ""
    fig, (fidelity, control) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, style in (("dynamics_psnr_db", f"world, inferred actions{weights}", "-o"),
                              ("copy_prompt_psnr_db", "the prompt frame again", "--"),
                              ("copy_prompt_tokens_psnr_db", "the prompt's tokens again", ":")):
        means = [p[key]["mean"] for p in points]
        if style == "-o":  # the world's interval; the paired difference to the baseline is in the JSON
            half = [p[key]["ci95"] for p in points]
            fidelity.fill_between(steps, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                                  alpha=0.15)
        fidelity.plot(steps, means, style, label=label, color=None if style == "-o" else "grey")
    if live:
        fidelity.plot(steps, [p["live"]["dynamics_psnr_db"]["mean"] for p in points], "-.x",
                      label="world, inferred actions, live weights")
    fidelity.set(xlabel="training step", ylabel=f"PSNR at t={T} (dB)")
    fidelity.legend(fontsize=8)
    means = [p["dtpsnr_db"]["mean"] for p in points]
    control.errorbar(steps, means, yerr=[p["dtpsnr_db"]["ci95"] for p in points], fmt="-o", capsize=3,
                     label=f"dtPSNR(t={T}), 95% interval{weights}")
    if live:
        control.plot(steps, [p["live"]["dtpsnr_db"]["mean"] for p in points], "-.x", label="dtPSNR, live weights")
    control.axhline(0, color="grey", lw=0.8)
    if all(p["actions_nmi"] is not None for p in points):
        control.plot(steps, [p["actions_nmi"] for p in points], "-s", label="latent vs true actions NMI")
    control.set(xlabel="training step", ylabel="dB / NMI")
    control.legend(fontsize=8)
    save(fig, path, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--every", type=int, default=400, help="score every this many training steps")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows per score")
    parser.add_argument("--name", help="names the results files (default: the run folder's name)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files")
    args = parser.parse_args()
    name = args.name or args.run.name
    notes: list[str] = []
    recipe = recipe_with_overrides(json.loads((args.run / "recipe.json").read_text()), args.overrides,
                                   str(args.run / "recipe.json"), notes=notes)
    for note in notes:
        print(f"note: {note}")
    cfg = recipe.train["dynamics"]
    tokenizer = RunFolder(args.run).components("tokenizer")["tokenizer"]
    index = EpisodeIndex.open(RunFolder(args.run).data)
    torch.manual_seed(recipe.run.seed + 1)  # as the dynamics stage
    action_model, dynamics = world_models(recipe, tokenizer, index)
    sampler = recipe.components["sampler"]
    world = World(tokenizer, action_model, dynamics, sampler.info.cls(sampler.config), recipe.world)
    # the precision the dynamics stage trains in (a recipe's "auto" is bf16 on some machines, float32 on others)
    cpu = not torch.cuda.is_available()
    precision, _ = resolve_mixed_precision(recipe.run.mixed_precision, cpu)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    points: list[dict] = []

    averaged = cfg.ema_decay > 0

    def validate(step: int, live: bool = False) -> dict:
        """train() calls it in eval mode, without gradients, on the average of the weights where there is one (then
        again with `live`, on the weights as trained), and logs what it returns."""
        rng = torch.get_rng_state()  # and asks it to leave the global generator as it found it
        p = point(world, index, args.windows, accelerator, per_window=averaged)
        torch.set_rng_state(rng)
        if live:
            average = points[-1]
            averaged_windows, live_windows = average.pop("per_window"), p.pop("per_window")
            average["live"] = p
            average["average_minus_live"] = {
                key: mean_and_ci(torch.tensor(averaged_windows[key]) - torch.tensor(live_windows[key]))
                for key in PAIRED}
        else:
            points.append({"step": step, **p})
        return {"world_psnr_db": p["dynamics_psnr_db"]["mean"], "copy_prompt_psnr_db": p["copy_prompt_psnr_db"]["mean"],
                "world_minus_copy_db": p["dynamics_minus_copy_prompt_db"]["mean"],
                "dtpsnr_db": p["dtpsnr_db"]["mean"], "dtpsnr_ci95_db": p["dtpsnr_db"]["ci95"],
                "actions_nmi": float("nan") if p["actions_nmi"] is None else p["actions_nmi"]}

    data = WindowDataset(index, "train", cfg.seq_len, action_model.reads_true_actions)
    with tempfile.TemporaryDirectory() as scratch:  # its log and checkpoints are not kept: the curve is the result
        train(accelerator, WorldModelTask(action_model, dynamics, tokenizer), data,
              attrs.evolve(cfg, eval_every=args.every, checkpoint_every=0), recipe.run.seed + 1,
              Path(scratch) / "log.jsonl", "lam+dynamics", Checkpointing(Path(scratch) / "checkpoints", "world-curve"),
              validate, validate_live=averaged)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"run": str(args.run), "overrides": args.overrides, "windows": args.windows, "t": T,
           "precision": precision, "machine": describe_machine(), "points": points}
    (args.out / f"world-curve-{name}.json").write_text(json.dumps(out, indent=2))
    plot(points, args.out / f"world-curve-{name}.png", f"{name}: held-out world against the baselines")
    print(f"saved {args.out / f'world-curve-{name}.json'} and .png")


if __name__ == "__main__":
    main()

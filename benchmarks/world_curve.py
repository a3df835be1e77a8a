"""How the world improves with training: the latent action and dynamics models of a recipe trained on a run's
tokenizer, scored every N steps on the run's held-out split against the cheapest baselines.

    python benchmarks/world_curve.py RUN [KEY=VALUE ...] [--every 400] [--windows 64] [--name NAME] [--out DIR]
                                     [--against CURVE.json]

RUN is a finished run (or ablation variant) whose data and tokenizer stages are reused; KEY=VALUE overrides its
recipe for the dynamics stage (steps, model sizes, action model, sampler). Scores at every --every steps, on
--windows evenly spaced windows of the run's validation split: dynamics PSNR at t=4 with inferred actions, the
prompt frame again, the prompt's tokens again, dtPSNR(t=4) with its 95% interval, and latent vs true action NMI.
Trains with the stage's own training loop (`genie_core.training.engine.train`), one process, in the recipe's
precision (`run.mixed_precision`) and with its compiled stacks if it compiles them (`train.dynamics.compile`).
With `train.dynamics.ema_decay` set, each point scores the average of the weights (what the stage saves) and the
weights as trained, and their difference window by window with its 95% interval: one training run settles whether
the average helps. With `--against CURVE.json`, an earlier curve scored on the same windows (a run that shares this
one's footage, through `data.path`, and --windows), each point also gets its difference to that curve's point of the
same step, window by window with its 95% interval (`minus_against`): far tighter than the two intervals side by side,
where the windows' own spread dominates. Every point keeps its windows' scores (`per_window`) for such comparisons.
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
PAIRED = ("dynamics_psnr_db", "dtpsnr_db")  # compared window by window: average and live weights, two curves


def point(world: World, index: EpisodeIndex, windows: int, accelerator: Accelerator) -> dict:
    """One world's held-out scores at t = T, each a mean with its 95% interval, and every window's world PSNR,
    dtPSNR and prompt frame again (`per_window`, for comparisons window by window)."""
    settings = EvalSettings(windows=windows, horizon=T, per_window=True)
    result = Evaluation(world, index, "val", settings, accelerator).world_model()
    at = str(T)
    scores = {"dynamics_psnr_db": result["dynamics_psnr_at_t_db"][at],
              "copy_prompt_psnr_db": result["copy_prompt_psnr_at_t_db"][at],
              "copy_prompt_tokens_psnr_db": result["copy_prompt_tokens_psnr_at_t_db"][at],
              "dynamics_minus_copy_prompt_db": result["dynamics_minus_copy_prompt_at_t_db"][at],
              "dtpsnr_db": result["dtpsnr_db"][at],
              "actions_nmi": (result["actions_vs_true"] or {}).get("nmi")}
    windows = result["per_window"]
    scores["per_window"] = {"dynamics_psnr_db": windows["dynamics_psnr_at_t_db"][at],
                            "dtpsnr_db": windows["dtpsnr_db"][at],
                            "copy_prompt_psnr_db": windows["copy_prompt_psnr_at_t_db"][at]}
    return scores


def paired(ours: dict, theirs: dict) -> dict:
    """Two sets of per_window scores on the same windows: each PAIRED score's difference, ours minus theirs, window
    by window, as a mean with its 95% interval."""
    return {key: mean_and_ci(torch.tensor(ours[key]) - torch.tensor(theirs[key])) for key in PAIRED}


def earlier_curve(path: Path, windows: int) -> dict[int, dict]:
    """--against: an earlier curve's per_window scores by step, refused in one line unless it was scored on the same
    number of windows and kept them."""
    try:
        text = path.read_text()
    except OSError as error:
        raise SystemExit(f"error: --against {path}: cannot read it ({error.strerror})")
    try:
        earlier = json.loads(text)
        scored_on, points = earlier["windows"], earlier["points"]
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --against {path}: not a world curve ({error!r})")
    if any("per_window" not in p for p in points):
        raise SystemExit(f"error: --against {path}: its points keep no per_window scores (saved before curves kept "
                         "them); score it again")
    if scored_on != windows:
        raise SystemExit(f"error: --against {path}: scored on {scored_on} windows, this curve on {windows}; "
                         f"give --windows {scored_on}")
    return {p["step"]: p["per_window"] for p in points}


def same_windows(ours: dict, theirs: dict) -> bool:
    """Whether two points were scored on the same windows: the prompt frame shown again scores each window the same
    whatever the world, so equal scores there mean the same footage and windows."""
    return torch.allclose(torch.tensor(ours["copy_prompt_psnr_db"]), torch.tensor(theirs["copy_prompt_psnr_db"]))


def plot(points: list[dict], path: Path, title: str, against: dict[int, dict] | None = None) -> None:
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
    if against:
        earlier = sorted(against.items())
        fidelity.plot([step for step, _ in earlier], [sum(w["dynamics_psnr_db"]) / len(w["dynamics_psnr_db"])
                                                      for _, w in earlier], "-.+", label="world, the --against curve")
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
    parser.add_argument("--against", type=Path, metavar="CURVE.json",
                        help="an earlier curve on the same windows: each point also gets its paired difference to it")
    args = parser.parse_args()
    against = earlier_curve(args.against, args.windows) if args.against else {}
    name = args.name or args.run.name
    notes: list[str] = []
    recipe = recipe_with_overrides(json.loads((args.run / "recipe.json").read_text()), args.overrides,
                                   str(args.run / "recipe.json"), notes=notes)
    for note in notes:
        print(f"note: {note}")
    cfg = recipe.train["dynamics"]
    scored = {*range(args.every, cfg.steps + 1, args.every), cfg.steps}  # the steps train() validates at
    if against and not scored & against.keys():
        raise SystemExit(f"error: --against {args.against}: scored at steps {sorted(against)}, this curve at "
                         f"{sorted(scored)}: none in common")
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
        p = point(world, index, args.windows, accelerator)
        torch.set_rng_state(rng)
        if live:
            average = points[-1]
            average["live"] = p
            average["average_minus_live"] = paired(average["per_window"], p.pop("per_window"))
        else:
            if step in against:
                if not same_windows(p["per_window"], against[step]):
                    raise SystemExit(f"error: --against {args.against}: its windows are not this run's (the prompt "
                                     "frame again scores them differently); compare runs that share footage")
                p["minus_against"] = paired(p["per_window"], against[step])
            points.append({"step": step, **p})
        earlier = {f"world_minus_against_{k}": p["minus_against"]["dynamics_psnr_db"][k] for k in ("mean", "ci95")
                   } if "minus_against" in p else {}
        return {"world_psnr_db": p["dynamics_psnr_db"]["mean"], "copy_prompt_psnr_db": p["copy_prompt_psnr_db"]["mean"],
                "world_minus_copy_db": p["dynamics_minus_copy_prompt_db"]["mean"],
                "dtpsnr_db": p["dtpsnr_db"]["mean"], "dtpsnr_ci95_db": p["dtpsnr_db"]["ci95"],
                "actions_nmi": float("nan") if p["actions_nmi"] is None else p["actions_nmi"], **earlier}

    data = WindowDataset(index, "train", cfg.seq_len, action_model.reads_true_actions)
    with tempfile.TemporaryDirectory() as scratch:  # its log and checkpoints are not kept: the curve is the result
        train(accelerator, WorldModelTask(action_model, dynamics, tokenizer), data,
              attrs.evolve(cfg, eval_every=args.every, checkpoint_every=0), recipe.run.seed + 1,
              Path(scratch) / "log.jsonl", "lam+dynamics", Checkpointing(Path(scratch) / "checkpoints", "world-curve"),
              validate, validate_live=averaged)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"run": str(args.run), "overrides": args.overrides, "against": args.against and str(args.against),
           "windows": args.windows, "t": T,
           "precision": precision, "machine": describe_machine(), "points": points}
    (args.out / f"world-curve-{name}.json").write_text(json.dumps(out, indent=2))
    plot(points, args.out / f"world-curve-{name}.png", f"{name}: held-out world against the baselines", against)
    print(f"saved {args.out / f'world-curve-{name}.json'} and .png")


if __name__ == "__main__":
    main()

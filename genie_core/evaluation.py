"""Measuring a trained world on held-out windows: what `genie eval` writes and the report stage of `genie run` prints.

    tokenizer    reconstruction PSNR and SSIM per frame; codebook usage and perplexity
    fidelity     PSNR and SSIM of generated frames against the truth at each step t = 1..horizon, the rollout driven
                 by the actions the LAM infers from the true frames
    baselines    what doing nothing scores at each step t: the prompt frame shown again (copy-prompt), and the
                 tokenizer's reconstruction of the prompt shown again (copy-prompt tokens); and the world's PSNR minus
                 copy-prompt's, window by window (a world below 0 has learned less than a still frame)
    dtPSNR       the paper's controllability metric at each requested t (genie_core.metrics.delta_psnr)
    FVD          Frechet Video Distance between true windows and rollouts, on I3D features from a local file
    actions      the LAM's actions against the data's true ones (NMI, mapping accuracy) and its codebook usage

Windows are chosen evenly over the split, batches get random generators seeded from their position only, and the
work is shared among processes and gathered back in order: the numbers depend on the windows and the seed, not on
the number of processes, and two runs evaluated with the same settings see exactly the same windows and seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from genie_core.data import EpisodeIndex, WindowDataset, evenly_spaced
from genie_core.errors import GenieError
from genie_core.metrics import action_agreement, action_class_lookup, codebook_stats, mean_and_ci, psnr, ssim
from genie_core.world import World

Measure = Callable[[torch.Tensor, torch.Generator, list[int]], list[torch.Tensor]]


@attrs.frozen(kw_only=True)
class EvalSettings:
    windows: int = 64  # held-out windows, evenly spaced over the split
    batch_size: int = 16
    seed: int = 1234
    dtpsnr_t: tuple[int, ...] = (4,)  # generated frames after the prompt
    horizon: int | None = None  # rollout steps for per-step fidelity and FVD; default: the world's context - 1
    labelled_fraction: float = 0.1  # share of transitions used to fit the latent -> true action mapping


@torch.no_grad()
def over_windows(accelerator: Accelerator, dataset: WindowDataset, settings: EvalSettings,
                 measure: Measure, desc: str = "eval") -> list[torch.Tensor]:
    """Runs `measure(video, generator, window_indices) -> [tensor [B, ...], ...]` over the evaluation windows, split
    across processes and put back together in window order with gather_for_metrics. The main process shows a
    progress bar of its batches."""
    indices = evenly_spaced(dataset, settings.windows)
    batches = [indices[i : i + settings.batch_size] for i in range(0, len(indices), settings.batch_size)]
    rank, world_size = accelerator.process_index, accelerator.num_processes
    mine = []
    for number, batch in tqdm(list(enumerate(batches))[rank::world_size], desc=desc, unit="batch", leave=False,
                              dynamic_ncols=True, disable=not accelerator.is_main_process):
        video = torch.stack([dataset[i] for i in batch]).to(accelerator.device)
        generator = torch.Generator(device=accelerator.device).manual_seed(settings.seed * 1_000_003 + number)
        mine.append((number, [values.cpu() for values in measure(video, generator, batch)]))
    gathered = accelerator.gather_for_metrics(mine, use_gather_object=True)
    ordered = [values for _, values in sorted(gathered, key=lambda item: item[0])]
    return [torch.cat([values[k] for values in ordered]) for k in range(len(ordered[0]))]


def _by_step(values: torch.Tensor) -> list[dict]:
    """[windows, steps] -> mean and CI per step."""
    return [mean_and_ci(values[:, k]) for k in range(values.shape[1])]


class Evaluation:
    """One world measured on one split of one data set."""

    def __init__(self, world: World, index: EpisodeIndex, split: str, settings: EvalSettings,
                 accelerator: Accelerator, i3d=None):
        spec = world.tokenizer.spec
        if index.manifest["resolution"] != spec.height or spec.height != spec.width:
            raise GenieError(f"{index.root}: frames are {index.manifest['resolution']} pixels square; this world "
                             f"works at {spec.height}x{spec.width}")
        if split not in index.manifest["splits"]:
            raise GenieError(f"{index.root}: no split '{split}'; splits: {', '.join(index.manifest['splits'])}")
        self.world, self.index, self.split, self.settings = world, index, split, settings
        self.accelerator, self.i3d = accelerator, i3d
        self.horizon = settings.horizon or world.context - 1
        self.steps = max(self.horizon, *settings.dtpsnr_t)  # rollout length with inferred actions
        lam_frames = world.action_model.spec.num_frames
        if self.steps + 1 > lam_frames:
            raise GenieError(f"rollouts of {self.steps} steps need the latent action model to read {self.steps + 1} "
                             f"frames; it was trained on {lam_frames}: lower --horizon or --t to at most "
                             f"{lam_frames - 1}")

    def tokenizer(self) -> dict:
        tokenizer = self.world.tokenizer
        dataset = WindowDataset(self.index, self.split, tokenizer.spec.num_frames)

        def measure(video, generator, batch):  # noqa: ARG001 - the Measure signature
            tokens = tokenizer.encode(video)
            recon = tokenizer.decode(tokens)
            counts = torch.stack([torch.bincount(t.flatten(), minlength=tokenizer.codebook_size) for t in tokens])
            return [psnr(recon, video), ssim(recon, video), counts]

        frame_psnr, frame_ssim, counts = over_windows(self.accelerator, dataset, self.settings, measure,
                                                      "eval tokenizer")
        return {"tokenizer_psnr_db": mean_and_ci(frame_psnr), "tokenizer_ssim": mean_and_ci(frame_ssim),
                "tokenizer_codebook": codebook_stats(counts.sum(0))}

    def world_model(self) -> dict:
        world, settings, ts = self.world, self.settings, self.settings.dtpsnr_t
        dataset = WindowDataset(self.index, self.split, self.steps + 1)
        device = self.accelerator.device

        def measure(video, generator, batch):
            true_actions = torch.stack([dataset.actions(i) for i in batch]).to(device)
            lam = world.action_model
            inferred = lam.infer_actions(video, **lam.true_action_inputs(true_actions))  # [B, steps]
            random = torch.randint(0, world.num_actions, (video.shape[0], max(ts)), device=device,
                                   generator=generator)
            # Both rollouts draw the same sampling noise (common random numbers): their difference is the effect of
            # the actions alone, so a world that ignores actions scores exactly 0 and the estimate varies less.
            noise = generator.get_state()
            with_inferred = world.rollout(video[:, 0], inferred, generator)  # [B, steps + 1, C, H, W]
            generator.set_state(noise)
            with_random = world.rollout(video[:, 0], random, generator)
            deltas = [psnr(with_inferred[:, t], video[:, t]) - psnr(with_random[:, t], video[:, t]) for t in ts]
            # The cheapest baselines: the prompt again (its pixels, and its tokens decoded) at every step.
            future = video[:, 1:]
            still = video[:, :1].expand_as(future)
            still_tokens = world.decode(world.encode_prompt(video[:, 0]).expand(-1, self.steps + 1, -1, -1))[:, 1:]
            out = [psnr(with_inferred[:, 1:], future), ssim(with_inferred[:, 1:], future),
                   torch.stack(deltas, dim=1), inferred, true_actions, psnr(still, future), psnr(still_tokens, future)]
            if self.i3d is not None:  # clips of prompt + horizon frames, the truth and the rollout
                clip = self.horizon + 1
                out += [self.i3d(video[:, :clip]), self.i3d(with_inferred[:, :clip])]
            return out

        step_psnr, step_ssim, deltas, inferred, true_actions, copy_psnr, copy_tokens_psnr, *features = over_windows(
            self.accelerator, dataset, settings, measure, "eval world")
        horizon = self.horizon
        usage = torch.bincount(inferred.flatten(), minlength=world.num_actions)
        result = {
            "horizon": horizon,
            "dynamics_psnr_by_step_db": _by_step(step_psnr[:, :horizon]),
            "dynamics_ssim_by_step": _by_step(step_ssim[:, :horizon]),
            "dtpsnr_db": {str(t): mean_and_ci(deltas[:, k]) for k, t in enumerate(ts)},
            "dynamics_psnr_at_t_db": {str(t): mean_and_ci(step_psnr[:, t - 1]) for t in ts},
            "copy_prompt_psnr_by_step_db": _by_step(copy_psnr[:, :horizon]),
            "copy_prompt_tokens_psnr_by_step_db": _by_step(copy_tokens_psnr[:, :horizon]),
            "copy_prompt_psnr_at_t_db": {str(t): mean_and_ci(copy_psnr[:, t - 1]) for t in ts},
            "copy_prompt_tokens_psnr_at_t_db": {str(t): mean_and_ci(copy_tokens_psnr[:, t - 1]) for t in ts},
            # paired, window by window: the same windows, so the interval is that of the difference itself
            "dynamics_minus_copy_prompt_at_t_db": {str(t): mean_and_ci(step_psnr[:, t - 1] - copy_psnr[:, t - 1])
                                                   for t in ts},
            "windows_overlap": self.windows_overlap(dataset),
            "lam_codebook": codebook_stats(usage),
            "lam_usage": usage.tolist(),
            "actions_vs_true": action_agreement(inferred, true_actions, world.num_actions,
                                                settings.labelled_fraction, settings.seed),
            "actions_vs_true_classes": self.agreement_with_classes(inferred, true_actions),
            "true_action_names": self.index.manifest.get("action_names"),  # None when the source names none
        }
        if features:
            from genie_core.fvd import frechet_distance

            real, fake = features
            result["fvd"] = {"value": frechet_distance(real, fake), "videos": real.shape[0], "frames": horizon + 1,
                             "i3d": str(self.i3d.path), "i3d_format": self.i3d.kind, "size": self.i3d.size}
        return result

    def agreement_with_classes(self, inferred: torch.Tensor, true_actions: torch.Tensor) -> dict | None:
        """Latent actions against the classes of true actions that do the same thing (the source's
        `action_classes`, kept in the manifest), with the class names; None when the footage declares none."""
        classes = self.index.manifest.get("action_classes")
        if not classes:
            return None
        names, class_of = action_class_lookup(classes)
        result = action_agreement(inferred, class_of[true_actions], self.world.num_actions,
                                  self.settings.labelled_fraction, self.settings.seed)
        return None if result is None else result | {"classes": names}

    def windows_overlap(self, dataset: WindowDataset) -> bool:
        """Whether evenly spaced windows share frames (too many windows for the split): the windows are then not
        independent, and the 95% intervals come out narrower than they are."""
        starts = [dataset.locate(i) for i in evenly_spaced(dataset, self.settings.windows)]
        return any(a[0] == b[0] and b[1] - a[1] < dataset.length for a, b in zip(starts, starts[1:]))

    def run(self) -> dict:
        return {"data": str(self.index.root), "split": self.split, "settings": attrs.asdict(self.settings),
                **self.tokenizer(), **self.world_model()}


# ----------------------------------------------------------------------------------------------- writing results


def _cell(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "n/a"
    ci = "" if stat["ci95"] != stat["ci95"] else f" ± {stat['ci95']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}{ci}"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of the short table `genie eval` prints and compares."""
    rows = [("tokenizer PSNR (dB)", _cell(result["tokenizer_psnr_db"])),
            ("tokenizer SSIM", _cell(result["tokenizer_ssim"], 3))]
    for t, stat in result["dtpsnr_db"].items():
        rows.append((f"dtPSNR t={t} (dB)", _cell(stat, 3)))
    for t, stat in result["dynamics_psnr_at_t_db"].items():
        rows += [(f"dynamics PSNR t={t} (dB)", _cell(stat)),
                 (f"copy-prompt PSNR t={t} (dB)", _cell(result["copy_prompt_psnr_at_t_db"][t])),
                 (f"copy-prompt tokens PSNR t={t} (dB)", _cell(result["copy_prompt_tokens_psnr_at_t_db"][t])),
                 (f"dynamics minus copy-prompt t={t} (dB)", _cell(result["dynamics_minus_copy_prompt_at_t_db"][t]))]
    last = result["horizon"]
    rows.append((f"dynamics SSIM t={last}", _cell(result["dynamics_ssim_by_step"][-1], 3)))
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
    from genie_core.plots import action_usage, fidelity_by_step

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
                   [[str(k + 1), _cell(p), _cell(c), _cell(ct), _cell(s, 3)] for k, (p, c, ct, s) in
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


def write_comparison(results: dict[str, dict], folder: Path) -> str:
    """One side-by-side table (and chart) of several runs evaluated on the same windows; returns the table."""
    from genie_core.plots import fidelity_by_step

    names = list(results)
    rows = [dict(summary_rows(r)) for r in results.values()]
    metrics = list(dict.fromkeys(metric for row in rows for metric in row))
    side_by_side = table(["metric", *names], [[m, *(row.get(m, "n/a") for row in rows)] for m in metrics])
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


# ------------------------------------------------------------------------------------------------ `genie eval`


def resolve_run(path: Path) -> Path:
    """A run folder, given it or any folder inside it (a stage folder such as RUN/dynamics)."""
    path = Path(path)
    for candidate in (path, *path.parents[:2]):
        if (candidate / "dynamics" / "components.json").is_file() and (candidate / "tokenizer").is_dir():
            return candidate
    raise GenieError(f"{path}: not a finished run (no dynamics/components.json in it or above it); give the folder "
                     "`genie run` wrote")


def recipe_eval_settings(run_dir: Path) -> dict:
    """The [eval] settings the run's recipe used for its report, so `genie eval` reproduces the report's numbers."""
    recipe = run_dir / "recipe.json"
    table = json.loads(recipe.read_text()).get("eval", {}) if recipe.is_file() else {}
    settings = {key: table[key] for key in ("windows", "batch_size", "seed") if key in table}
    if "dtpsnr_t" in table:
        settings["dtpsnr_t"] = (table["dtpsnr_t"],)
    return settings


def run_data(run_dir: Path) -> Path:
    """The data set a run trained on: its recipe's data.path, or the data stage inside it."""
    recipe = run_dir / "recipe.json"
    path = json.loads(recipe.read_text()).get("data", {}).get("path") if recipe.is_file() else None
    return Path(path) if path else run_dir / "data"


def evaluate_runs(runs: list[Path], data: Path | None, split: str, settings: dict, out: Path | None,
                  i3d_path: Path | None = None, fvd_size: int = 224, cpu: bool = False, log=print) -> dict:
    """Evaluates each run on the same windows of one data set (`data`, or the first run's own), writes each run's
    eval folder and, for several runs, a side-by-side comparison. Returns {run name: result}."""
    from accelerate.state import AcceleratorState

    from genie_core.atomic import atomic_dir
    from genie_core.world import load_world

    run_dirs = [resolve_run(run) for run in runs]
    if out is not None and out.exists() and any(out.iterdir()) and not any(
            (out / f).is_file() for f in ("eval.json", "comparison.json")):
        raise GenieError(f"--out {out}: exists and holds something other than an evaluation; results replace the "
                         "whole folder, so name a new one")
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]  # same folder name in different places: tell them apart by path
    settings = EvalSettings(**(recipe_eval_settings(run_dirs[0]) | settings))
    index = EpisodeIndex.open(data or run_data(run_dirs[0]))
    AcceleratorState._reset_state()  # a fresh mixed-precision setting; the distributed state is kept
    accelerator = Accelerator(cpu=cpu)
    i3d = None
    if i3d_path is not None:
        from genie_core.fvd import load_i3d

        i3d = load_i3d(i3d_path, size=fvd_size).to(accelerator.device)
    worlds = {name: load_world(d).to(accelerator.device) for name, d in zip(names, run_dirs)}
    if settings.horizon is None and len(worlds) > 1:  # one horizon for all, so every run sees the same windows
        settings = attrs.evolve(settings, horizon=min(w.context for w in worlds.values()) - 1)
    results = {}
    for (name, world), run_dir in zip(worlds.items(), run_dirs):
        if accelerator.is_main_process:
            log(f"genie eval: {name} on {index.root} ({split}, {settings.windows} windows)")
        results[name] = Evaluation(world, index, split, settings, accelerator, i3d).run()
        if accelerator.is_main_process:
            folder = out if (out is not None and len(run_dirs) == 1) else run_dir / "eval"
            with atomic_dir(folder) as tmp:
                write_run(results[name], tmp, name)
            log(f"  wrote {folder / 'eval.md'}")
    if len(run_dirs) > 1 and accelerator.is_main_process:
        folder = out or run_dirs[0].parent / "comparison"
        with atomic_dir(folder) as tmp:
            write_comparison(results, tmp)
        log(f"  wrote {folder / 'comparison.md'}")
    return results

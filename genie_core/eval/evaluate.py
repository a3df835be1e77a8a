"""Measuring a trained world on held-out windows: what `genie eval` writes and the report stage of `genie run` prints.

    tokenizer    reconstruction PSNR and SSIM per frame; codebook usage and perplexity
    fidelity     PSNR and SSIM of generated frames against the truth at each step t = 1..horizon, the rollout driven
                 by the actions the LAM infers from the true frames
    baselines    what doing nothing scores at each step t: the prompt frame shown again (copy-prompt), and the
                 tokenizer's reconstruction of the prompt shown again (copy-prompt tokens); and the world's PSNR minus
                 copy-prompt's, window by window (a world below 0 has learned less than a still frame)
    dtPSNR       the paper's controllability metric at each requested t (genie_core.eval.metrics.delta_psnr)
    FVD          Frechet Video Distance between true windows and rollouts, on I3D features from a local file
    actions      the LAM's actions against the data's true ones (NMI, mapping accuracy) and its codebook usage

Windows are chosen evenly over the split, batches get random generators seeded from their position only, and the
work is shared among processes and gathered back in order: the numbers depend on the windows and the seed, not on
the number of processes, and two runs evaluated with the same settings see exactly the same windows and seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from genie_core.config import EvalConfig
from genie_core.data.footage import EpisodeIndex, WindowDataset, evenly_spaced, overlapping
from genie_core.errors import GenieError
from genie_core.eval.metrics import (
    PSNR_CAP_DB,
    action_agreement,
    action_class_lookup,
    codebook_stats,
    delta_psnr,
    mean_and_ci,
    psnr,
    ssim,
)
from genie_core.run.folder import RunFolder
from genie_core.world.model import World

Measure = Callable[[torch.Tensor, torch.Generator, list[int]], list[torch.Tensor]]


_RECIPE = attrs.fields(EvalConfig)  # a recipe's [eval] table: the defaults of the settings they share


@attrs.frozen(kw_only=True)
class EvalSettings:
    """What one evaluation measures: a recipe's [eval] table (`from_config`) and the options `genie eval` adds."""

    windows: int = _RECIPE.windows.default  # held-out windows, evenly spaced over the split
    batch_size: int = _RECIPE.batch_size.default
    seed: int = _RECIPE.seed.default
    dtpsnr_t: tuple[int, ...] = (_RECIPE.dtpsnr_t.default,)  # generated frames after the prompt
    horizon: int | None = None  # rollout steps for per-step fidelity and FVD; default: the world's context - 1
    labelled_fraction: float = 0.1  # share of transitions used to fit the latent -> true action mapping
    per_window: bool = False  # also keep every window's scores at t, for comparisons window by window

    @classmethod
    def from_config(cls, config: EvalConfig, **changes) -> "EvalSettings":
        """The settings a recipe's [eval] table gives its report, with `changes` on top."""
        recipe = {"windows": config.windows, "batch_size": config.batch_size, "seed": config.seed,
                  "dtpsnr_t": (config.dtpsnr_t,)}
        return cls(**(recipe | changes))


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
            deltas = [delta_psnr(video[:, t], with_inferred[:, t], with_random[:, t]) for t in ts]
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
            # Where nothing moved (or the frame came back to the prompt's), the prompt frame shown again is exact and
            # scores the PSNR cap: a handful of such windows decide the mean difference above. The count, and the
            # difference over the other windows, say how much.
            "copy_prompt_exact_at_t": {str(t): int((copy_psnr[:, t - 1] >= PSNR_CAP_DB).sum()) for t in ts},
            "dynamics_minus_copy_prompt_inexact_at_t_db": {
                str(t): mean_and_ci((step_psnr[:, t - 1] - copy_psnr[:, t - 1])[copy_psnr[:, t - 1] < PSNR_CAP_DB])
                for t in ts},
            "windows_overlap": self.windows_overlap(dataset),
            "lam_codebook": codebook_stats(usage),
            "lam_usage": usage.tolist(),
            "actions_vs_true": action_agreement(inferred, true_actions, world.num_actions,
                                                settings.labelled_fraction, settings.seed),
            "actions_vs_true_classes": self.agreement_with_classes(inferred, true_actions),
            "true_action_names": self.index.manifest.get("action_names"),  # None when the source names none
        }
        if settings.per_window:
            result["per_window"] = {
                "dynamics_psnr_at_t_db": {str(t): step_psnr[:, t - 1].tolist() for t in ts},
                "copy_prompt_psnr_at_t_db": {str(t): copy_psnr[:, t - 1].tolist() for t in ts},
                "dtpsnr_db": {str(t): deltas[:, k].tolist() for k, t in enumerate(ts)}}
        if features:
            from genie_core.eval.fvd import frechet_distance

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
        return overlapping(dataset, evenly_spaced(dataset, self.settings.windows)) > 0

    def run(self) -> dict:
        return {"data": str(self.index.root), "split": self.split, "settings": attrs.asdict(self.settings),
                **self.tokenizer(), **self.world_model()}


# ------------------------------------------------------------------------------------------------ `genie eval`


def evaluate_runs(runs: list[Path], data: Path | None, split: str, settings: dict, out: Path | None,
                  i3d_path: Path | None = None, fvd_size: int = 224, cpu: bool = False, log=print) -> dict:
    """Evaluates each run on the same windows of one data set (`data`, or the first run's own), writes each run's
    eval folder and, for several runs, a side-by-side comparison. Returns {run name: result}."""
    from accelerate.state import AcceleratorState

    from genie_core.eval.report import write_comparison, write_run
    from genie_core.io.atomic import atomic_dir

    folders = [RunFolder.find(run) for run in runs]
    run_dirs = [run.path for run in folders]
    if out is not None and out.exists() and any(out.iterdir()) and not any(
            (out / f).is_file() for f in ("eval.json", "comparison.json")):
        raise GenieError(f"--out {out}: exists and holds something other than an evaluation; results replace the "
                         "whole folder, so name a new one")
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]  # same folder name in different places: tell them apart by path
    settings = EvalSettings.from_config(folders[0].eval_config(), **settings)
    index = EpisodeIndex.open(data or folders[0].data)
    AcceleratorState._reset_state()  # a fresh mixed-precision setting; the distributed state is kept
    accelerator = Accelerator(cpu=cpu)
    i3d = None
    if i3d_path is not None:
        from genie_core.eval.fvd import load_i3d

        i3d = load_i3d(i3d_path, size=fvd_size).to(accelerator.device)
    worlds = {name: run.world().to(accelerator.device) for name, run in zip(names, folders)}
    if settings.horizon is None and len(worlds) > 1:  # one horizon for all, so every run sees the same windows
        settings = attrs.evolve(settings, horizon=min(w.context for w in worlds.values()) - 1)
    results = {}
    for (name, world), run in zip(worlds.items(), folders):
        if accelerator.is_main_process:
            log(f"genie eval: {name} on {index.root} ({split}, {settings.windows} windows)")
        results[name] = Evaluation(world, index, split, settings, accelerator, i3d).run()
        if accelerator.is_main_process:
            folder = out if (out is not None and len(folders) == 1) else run.eval_dir
            with atomic_dir(folder) as tmp:
                write_run(results[name], tmp, name)
            log(f"  wrote {folder / 'eval.md'}")
    if len(run_dirs) > 1 and accelerator.is_main_process:
        folder = out or run_dirs[0].parent / "comparison"
        with atomic_dir(folder) as tmp:
            write_comparison(results, tmp)
        log(f"  wrote {folder / 'comparison.md'}")
    return results

"""`genie run`: a recipe, stage by stage (`genie_core.run.stages`), into one run folder (`genie_core.run.folder`).

Each stage folder is written under a temporary name and renamed when complete, with a `stage.json` holding a
fingerprint of the recipe settings (and plugin versions) it depends on and the id of the stage output it consumed.
Re-running skips every complete stage that still matches both, so an interrupted run resumes at the stage it was in,
and a changed recipe, or a redone earlier stage, redoes exactly what it affects.

Under several processes (`accelerate launch`, `torchrun`) every process trains and evaluates its share; only the
main one writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.state import AcceleratorState
from torch.distributed.fsdp import MixedPrecision

from genie_core.config import config_to_dict, tracker_names
from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, evenly_spaced, source_identity
from genie_core.errors import GenieError
from genie_core.eval.evaluate import EvalSettings, Evaluation
from genie_core.eval.metrics import psnr
from genie_core.eval.report import report_markdown
from genie_core.interfaces import DataSpec
from genie_core.io.atomic import atomic_dir
from genie_core.io.log import say
from genie_core.io.machine import describe as describe_machine
from genie_core.io.machine import resolve_mixed_precision
from genie_core.io.media import save_gif, save_strip, tile
from genie_core.recipe import Recipe
from genie_core.run.folder import RunFolder
from genie_core.run.stages import (
    STAGE_FILE,
    STAGES,
    check_trainable,
    stage_fingerprint,
    stage_settings,
    upstream,
    video_spec,
    world_models,
)
from genie_core.training.engine import (
    Checkpointing,
    LatentActionTask,
    TokenizerTask,
    WorldModelTask,
    discard_checkpoints,
    rebuilt,
    train,
)
from genie_core.world.components import MANIFEST, load_components, save_components
from genie_core.world.model import World

# Beside a latent action model trained before its dynamics model: the settings and tokenizer it was trained for.
LAM_TRAINED_FOR = "trained-for.json"


def _read_json(path: Path) -> dict:
    """A small JSON file's object; {} when it is missing or damaged (what it vouched for is then redone)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: trackers take flat hyper-parameter tables of plain values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic kernels for the stages of a run.deterministic run, the process's setting restored after."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable results
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


class Pipeline:
    def __init__(self, recipe: Recipe, run_dir: Path, log=say):
        self.recipe = recipe
        self.folder = RunFolder(run_dir)
        self.log = log
        self._stage_start = time.perf_counter()  # when the stage in progress started: its record keeps the time
        self.stages = {"data": self.stage_data, "tokenizer": self.stage_tokenizer, "dynamics": self.stage_dynamics,
                       "report": self.stage_report}
        # Set by run(): the processes' Accelerator, whether this is the main one, whether to resume from checkpoints.
        self.accelerator: Accelerator | None = None
        self.main = True
        self.resume = False
        self._index: EpisodeIndex | None = None  # the footage, opened on first use

    # ------------------------------------------------------------------------------------------ bookkeeping

    def status(self, stage: str) -> str:
        """'done', 'stale' (finished under other settings, or on an earlier stage's output since redone) or
        'missing'."""
        record = self.folder.stage_record(stage)
        if record is None:
            return "missing"
        if record.get("fingerprint") != stage_fingerprint(self.recipe, stage):
            return "stale"
        before = upstream(stage)
        if before is not None and record.get("input") != (self.folder.stage_record(before) or {}).get("id"):
            return "stale"
        return "done"

    def _finish(self, folder: Path, stage: str, summary: dict, **more) -> None:
        before = upstream(stage)
        record = {"stage": stage, "id": uuid.uuid4().hex, "input": before and self.folder.stage_record(before)["id"],
                  "fingerprint": stage_fingerprint(self.recipe, stage),
                  "settings": stage_settings(self.recipe, stage), "summary": summary,
                  "seconds": round(time.perf_counter() - self._stage_start, 1),  # this process's wall time
                  **more}
        (folder / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str))

    def run(self, redo_from: str | None = None, resume: bool = False) -> dict:
        """Runs every stage that is not done. With `resume`, a training stage that was interrupted continues from
        its newest full-state checkpoint instead of starting over."""
        self.resume = resume
        if redo_from is not None and redo_from not in STAGES:
            raise GenieError(f"--redo-from '{redo_from}': no such stage; stages: {', '.join(STAGES)}")
        check_trainable(self.recipe)
        run_cfg = self.recipe.run
        # One writer per run folder, held before anything is written (the recipe, the trackers' logs); under several
        # processes the main one holds it for all.
        main = PartialState(cpu=run_cfg.cpu).is_main_process
        with self.folder.lock() if main else contextlib.nullcontext():
            return self._run_holding_the_folder(redo_from)

    def _run_holding_the_folder(self, redo_from: str | None) -> dict:
        run_cfg = self.recipe.run
        trackers = tracker_names(run_cfg.trackers)
        # Accelerate keeps one mixed-precision setting per process; a new run in the same process (a notebook, the
        # tests) may ask for another. The distributed state (PartialState) is kept.
        AcceleratorState._reset_state()
        fsdp = None
        if run_cfg.distributed == "fsdp":
            # Precision by autocast, as under DDP: FSDP's own policy would cast every parameter to bf16/fp16, the
            # quantizers' too, which must assign codes in float32.
            full = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
            fsdp = FullyShardedDataParallelPlugin(mixed_precision_policy=full)
        # Built before any model: vector-quantize-pytorch decides codebook syncing when a model is constructed.
        precision, why = resolve_mixed_precision(run_cfg.mixed_precision, run_cfg.cpu)
        self.accelerator = Accelerator(cpu=run_cfg.cpu, mixed_precision=precision, fsdp_plugin=fsdp,
                                       log_with=trackers or None, project_dir=str(self.folder.logs))
        if trackers:
            self.accelerator.init_trackers(run_cfg.name, config=_flat(self.recipe.describe()))
        self.main = self.accelerator.is_main_process
        if self.main:
            self.folder.path.mkdir(parents=True, exist_ok=True)
            self.folder.recipe_path.write_text(json.dumps(self.recipe.table, indent=2))
        several = self.accelerator.num_processes > 1
        if fsdp is not None and self.accelerator.distributed_type.value != "FSDP" and several:
            # Accelerate shards with FSDP only on GPUs; on CPU processes it falls back to DDP without a word.
            self.log(f"run.distributed = 'fsdp': Accelerate runs FSDP on GPUs only; these "
                     f"{self.accelerator.num_processes} {self.accelerator.device.type} processes use DDP")
        if run_cfg.mixed_precision == "auto":
            self.log(f"run.mixed_precision = 'auto': {'bf16' if precision == 'bf16' else 'float32'}, {why}")
        if run_cfg.mixed_precision == "fp16" and not self.accelerator.native_amp:
            # Accelerate runs fp16 (autocast + gradient scaler) on GPUs only; elsewhere it trains in float32 silently.
            self.log(f"run.mixed_precision = 'fp16': needs a GPU; on {self.accelerator.device.type} this run trains in "
                     f"float32 (bf16 works on CPUs)")
        with _deterministic(run_cfg.deterministic):
            self._run_stages(redo_from)
        self.accelerator.end_training()
        return json.loads(self.folder.report_path.read_text())

    def _run_stages(self, redo_from: str | None) -> None:
        redo = False
        for stage in STAGES:
            redo = redo or stage == redo_from
            state = self.status(stage)
            if state == "done" and not redo:
                self.log(f"stage {stage}: done, skipping ({self.folder.stage(stage)})")
                continue
            if state == "stale":
                self.log(f"stage {stage}: its settings or inputs changed since it ran, redoing it")
            redo = True  # everything after a redone stage depends on it
            self._stage_start = time.perf_counter()
            self.stages[stage]()
            self.accelerator.wait_for_everyone()  # no process reads a stage before the main one has written it
            self.log(f"stage {stage}: finished in {time.perf_counter() - self._stage_start:.1f} s")

    # ------------------------------------------------------------------------------------------ stages

    @property
    def data_root(self) -> Path:
        return Path(self.recipe.data.path) if self.recipe.data.path else self.folder.stage("data")

    def stage_data(self) -> None:
        if not self.main:
            return
        cfg = self.recipe.data
        if cfg.path:  # built before: check it, every byte (new to this run), and use it in place
            manifest = EpisodeIndex.open(cfg.path, verify=True).manifest
            built, choice = manifest.get("source") or {}, self.recipe.components["source"]
            if (built.get("name"), built.get("config")) != (choice.name, config_to_dict(choice.config)):
                self.log(f"note: data.path {cfg.path} was built by source '{built.get('name')}' with "
                         f"{built.get('config')}; this recipe's [source] table does not describe that footage")
        else:
            choice = self.recipe.components["source"]
            source = choice.info.cls(choice.config, DataSpec(resolution=cfg.resolution))
            manifest = build_dataset(source, source_identity(source, choice.name, choice.info.owner), cfg,
                                     self.folder.stage("data"), skip_bad=cfg.skip_bad, log=self.log)
        if manifest["resolution"] != cfg.resolution:
            raise GenieError(f"{self.data_root}: frames are {manifest['resolution']} pixels square, the recipe's "
                             f"data.resolution is {cfg.resolution}")
        self.folder.stage("data").mkdir(parents=True, exist_ok=True)
        splits = {k: {"episodes": v["episodes"], "frames": v["frames"]} for k, v in manifest["splits"].items()}
        # The shard files' sizes and times, now that they are known good: the training stages re-hash any that change.
        stamps = EpisodeIndex.open(self.data_root).file_stamps()
        self._finish(self.folder.stage("data"), "data", {"root": str(self.data_root), "frames": manifest["frames"],
                                                       "splits": splits, "skipped": manifest["skipped"]},
                     shard_stamps=stamps)

    @property
    def index(self) -> EpisodeIndex:
        if self._index is None:
            index = EpisodeIndex.open(self.data_root)  # checks every shard's shape
            index.verify_changed((self.folder.stage_record("data") or {}).get("shard_stamps", {}))
            self._index = index
        return self._index

    def dataset(self, split: str, length: int, with_actions: bool = False) -> WindowDataset:
        return WindowDataset(self.index, split, length, with_actions)

    def _checkpointing(self, stage: str, phase: str | None = None) -> Checkpointing:
        """A stage's checkpoints (or those of a phase of it, such as "dynamics-lam"), tied to the stage's settings
        and to the output of the stage before it: one redone since was not what they trained on."""
        return Checkpointing(self.folder.checkpoints(phase or stage), self.folder.checkpoint_key(self.recipe, stage),
                             self.resume)

    def _discard_checkpoints(self, *phases: str) -> None:
        """Once a stage's output is saved: the checkpoints that protected it (and a phase's kept result)."""
        for phase in phases:
            discard_checkpoints(self.folder.checkpoints(phase))

    def stage_tokenizer(self) -> None:
        choice = self.recipe.components["tokenizer"]
        cfg = self.recipe.train["tokenizer"]
        torch.manual_seed(self.recipe.run.seed)
        tokenizer = choice.info.cls(choice.config, video_spec(self.recipe, "tokenizer"))
        val = self._validation_batch(cfg.seq_len)

        def validate(step: int) -> dict:  # held-out reconstruction, and a GIF of it: truth | reconstruction
            recon = tokenizer.decode(tokenizer.encode(val))
            save_gif(tile([val[0].cpu(), recon[0].cpu()]), self._sample_path(f"tokenizer-{step:07d}.gif"), scale=2,
                     captions=["truth", "reconstruction"])
            return {"val_psnr_db": psnr(recon, val).mean().item()}

        summary = train(self.accelerator, TokenizerTask(tokenizer), self.dataset("train", cfg.seq_len), cfg,
                        self.recipe.run.seed, self.folder.logs / "tokenizer.jsonl", "tokenizer",
                        self._checkpointing("tokenizer"), validate)
        weights = summary.pop("weights")
        if not self.main:
            return
        tokenizer = rebuilt(tokenizer, weights, "tokenizer.")
        summary["parameters"] = sum(p.numel() for p in tokenizer.parameters())
        with atomic_dir(self.folder.stage("tokenizer")) as folder:
            save_components(folder, {"tokenizer": (choice.name, tokenizer)})
            self._finish(folder, "tokenizer", summary)
        self._discard_checkpoints("tokenizer")

    def stage_dynamics(self) -> None:
        components = self.recipe.components
        cfg = self.recipe.train["dynamics"]
        tokenizer = self.folder.components("tokenizer")["tokenizer"].to(self.accelerator.device)
        torch.manual_seed(self.recipe.run.seed + 1)
        lam_choice, dyn_choice = components["action_model"], components["dynamics"]
        action_model, dynamics = world_models(self.recipe, tokenizer, self.index)
        data = self.dataset("train", cfg.seq_len, with_actions=action_model.reads_true_actions)
        seed = self.recipe.run.seed + 1
        if cfg.lam_steps:  # the LAM alone first, then dynamics on it, frozen
            action_model = self._train_action_model_alone(lam_choice.name, action_model, tokenizer, data, cfg, seed)
        validate = self._world_validator(tokenizer, action_model, dynamics, cfg.seq_len)
        task = WorldModelTask(action_model, dynamics, tokenizer, train_action_model=not cfg.lam_steps)
        summary = train(self.accelerator, task, data, cfg, seed, self.folder.logs / "dynamics.jsonl",
                        "dynamics" if cfg.lam_steps else "lam+dynamics", self._checkpointing("dynamics"), validate)
        weights = summary.pop("weights")
        if not self.main:
            return
        if not cfg.lam_steps:
            action_model = rebuilt(action_model, weights, "action_model.")
        action_model, dynamics = action_model.cpu(), rebuilt(dynamics, weights, "dynamics.")
        summary["parameters"] = {"action_model": sum(p.numel() for p in action_model.parameters()),
                                 "dynamics": sum(p.numel() for p in dynamics.parameters())}
        with atomic_dir(self.folder.stage("dynamics")) as folder:
            save_components(folder, {"action_model": (lam_choice.name, action_model),
                                     "dynamics": (dyn_choice.name, dynamics)})
            self._finish(folder, "dynamics", summary)
        self._discard_checkpoints("dynamics", "dynamics-lam", self.folder.lam_done.name)

    def _validation_batch(self, length: int) -> torch.Tensor:
        return self._validation_windows(length)[0]

    def _validation_windows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Four held-out windows, spread over the split, and their true actions."""
        val = self.dataset("val", length)
        chosen = evenly_spaced(val, 4)
        device = self.accelerator.device
        return (torch.stack([val[i] for i in chosen]).to(device),
                torch.stack([val.actions(i) for i in chosen]).to(device))

    def _sample_path(self, name: str) -> Path:
        folder = self.folder.samples
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def _world_validator(self, tokenizer, action_model, dynamics, length: int):
        """Held-out LAM reconstruction PSNR and the next frame generated with inferred actions, plus a GIF of the
        truth next to a rollout from its first frame. Uses its own random generator, not the global ones."""
        val, val_actions = self._validation_windows(length)
        choice = self.recipe.components["sampler"]
        world = World(tokenizer, action_model, dynamics, choice.info.cls(choice.config), self.recipe.world)

        def validate(step: int) -> dict:
            generator = torch.Generator(device=val.device).manual_seed(0)
            lam = action_model.loss(val, **action_model.true_action_inputs(val_actions))  # eval mode: infer_actions
            actions, lam_recon = lam.actions, lam.recon
            steps = min(4, val.shape[1] - 1)
            rollout = world.rollout(val[:, 0], actions[:, :steps], generator)
            save_gif(tile([val[0, : steps + 1].cpu(), rollout[0].cpu()]), self._sample_path(f"world-{step:07d}.gif"),
                     scale=2, captions=["truth", "generated"])
            return {"val_lam_psnr_db": psnr(lam_recon, val[:, 1:]).mean().item(),
                    "val_next_frame_psnr_db": psnr(rollout[:, 1], val[:, 1]).mean().item()}

        return validate

    def _train_action_model_alone(self, name: str, action_model, tokenizer, data, cfg, seed: int):
        """First phase of a separate LAM/dynamics stage; returns the trained LAM, whole on every process. Its result
        is kept beside the stage's checkpoints, so a resumed stage does not train the LAM again."""
        done, trained_for = self.folder.lam_done, self.folder.checkpoint_key(self.recipe, "dynamics")
        kept = self.resume and (done / MANIFEST).is_file()
        if kept and _read_json(done / LAM_TRAINED_FOR).get("trained_for") != trained_for:
            raise GenieError(f"{done}: this latent action model was trained under other settings (another recipe or "
                             f"overrides) or on a tokenizer since trained again; resume with the recipe that trained "
                             f"it, or run without --resume")
        if kept:
            self.log(f"dynamics: the latent action model was trained before the interruption ({done}); reusing it")
        else:
            lam_cfg = attrs.evolve(cfg, steps=cfg.lam_steps, warmup_steps=min(cfg.warmup_steps, cfg.lam_steps))
            summary = train(self.accelerator, LatentActionTask(action_model), data, lam_cfg, seed,
                            self.folder.logs / "lam.jsonl", "lam", self._checkpointing("dynamics", "dynamics-lam"))
            if self.main:
                with atomic_dir(done) as folder:
                    save_components(folder, {"action_model": (name, rebuilt(action_model, summary["weights"],
                                                                            "action_model."))})
                    (folder / LAM_TRAINED_FOR).write_text(json.dumps({"trained_for": trained_for}))
                self._discard_checkpoints("dynamics-lam")
            self.accelerator.wait_for_everyone()
        action_model = load_components(done)["action_model"].to(self.accelerator.device)
        action_model.use_tokenizer(tokenizer)
        return action_model

    @torch.no_grad()
    def stage_report(self) -> None:
        choice = self.recipe.components["sampler"]
        sampler = choice.info.cls(choice.config)
        world = World(**self.folder.components("tokenizer", "dynamics"), sampler=sampler,
                      config=self.recipe.world).to(self.accelerator.device)
        ev = self.recipe.eval
        device = self.accelerator.device
        t = ev.dtpsnr_t  # the recipe checks that t + 1 frames fit the action model's windows
        settings = EvalSettings.from_config(ev)
        evaluation = Evaluation(world, self.index, "val", settings, self.accelerator)
        measured = evaluation.tokenizer() | evaluation.world_model()
        if not self.main:
            return
        tokenizer_psnr, dtpsnr = measured["tokenizer_psnr_db"], measured["dtpsnr_db"][str(t)]
        windows = self.dataset("val", t + 1)

        # One held-out prompt frame, every latent action held for rollout_steps: one panel per action.
        generator = torch.Generator(device=device).manual_seed(ev.seed)
        prompt = windows[0][0][None].to(device)
        panels = []
        for action in range(world.num_actions):
            actions = torch.full((1, ev.rollout_steps), action, device=device)
            panels.append(world.rollout(prompt, actions, generator)[0].cpu())
        save_gif(tile(panels), self.folder.path / "rollout.gif", scale=ev.gif_scale,
                 captions=[f"action {action}" for action in range(world.num_actions)])
        save_strip(panels[0], self.folder.path / "rollout.png", scale=ev.gif_scale)

        stages = {s: self.folder.stage_record(s)["summary"] for s in STAGES[:-1]}
        report = {
            "run": self.recipe.run.name,
            "recipe": self.recipe.source,
            "components": {k: c.name for k, c in self.recipe.components.items()},
            "tokenizer_psnr_db": tokenizer_psnr,
            "tokenizer_ssim": measured["tokenizer_ssim"],
            f"dtpsnr_t{t}_db": dtpsnr,
            f"dynamics_psnr_t{t}_db": measured["dynamics_psnr_at_t_db"][str(t)],
            f"copy_prompt_psnr_t{t}_db": measured["copy_prompt_psnr_at_t_db"][str(t)],
            f"copy_prompt_tokens_psnr_t{t}_db": measured["copy_prompt_tokens_psnr_at_t_db"][str(t)],
            f"dynamics_minus_copy_prompt_t{t}_db": measured["dynamics_minus_copy_prompt_at_t_db"][str(t)],
            f"copy_prompt_exact_t{t}": measured["copy_prompt_exact_at_t"][str(t)],
            f"dynamics_minus_copy_prompt_inexact_t{t}_db":
                measured["dynamics_minus_copy_prompt_inexact_at_t_db"][str(t)],
            "windows_overlap": measured["windows_overlap"],
            "actions_vs_true_nmi": (measured["actions_vs_true"] or {}).get("nmi"),
            "actions_vs_true_classes_nmi": (measured["actions_vs_true_classes"] or {}).get("nmi"),
            "lam_codebook": measured["lam_codebook"],
            "num_actions": world.num_actions,
            "rollout_gif": "rollout.gif (one panel per latent action, each held for every step)",
            "stages": stages,
            "machine": describe_machine(),
        }
        self.folder.report_path.write_text(json.dumps(report, indent=2, default=str))
        (self.folder.path / "report.md").write_text(report_markdown(report, t))
        with atomic_dir(self.folder.stage("report")) as folder:
            save_components(folder, {"sampler": (choice.name, sampler)})
            self._finish(folder, "report", {"tokenizer_psnr_db": tokenizer_psnr["mean"], "dtpsnr_db": dtpsnr["mean"]})

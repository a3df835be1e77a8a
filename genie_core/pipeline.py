"""`genie run`: a recipe, stage by stage, into one run folder.

    data       footage from the recipe's [source] -> data/ (manifest + shards; resumable), or data.path if given
    tokenizer  trains the video tokenizer                  -> tokenizer/  (safetensors + components.json)
    dynamics   co-trains latent actions and dynamics      -> dynamics/
    report     held-out tokenizer PSNR, dtPSNR, rollouts  -> report.json, report.md, rollout.gif, rollout.png,
                                                             report/ (the sampler, for `genie sample`)

Each stage folder is written under a temporary name and renamed when complete, with a `stage.json` holding a
fingerprint of the recipe settings (and plugin versions) it depends on and the id of the stage output it consumed.
Re-running skips every complete stage that still matches both, so an interrupted run resumes at the stage it was in,
and a changed recipe, or a redone earlier stage, redoes exactly what it affects.

Under several processes (`accelerate launch`, `torchrun`) every process trains and evaluates its share; only the
main one writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import attrs
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.distributed.fsdp import MixedPrecision

from genie_core.atomic import atomic_dir
from genie_core.checkpoint import load_components, save_components
from genie_core.config import config_to_dict
from genie_core.data import (EpisodeIndex, WindowDataset, build_dataset, evenly_spaced, source_identity,
                             true_action_count)
from genie_core.errors import GenieError
from genie_core.evaluation import EvalSettings, Evaluation, run_data
from genie_core.interfaces import DataSpec, DynamicsModel, LatentActionModel, TokenSpec, VideoSpec
from genie_core.machine import describe as describe_machine
from genie_core.media import save_gif, save_strip, tile
from genie_core.metrics import psnr
from genie_core.recipe import Recipe, recipe_from_table
from genie_core.registry import Registry
from genie_core.training import STATE_FILE as CHECKPOINT_STATE
from genie_core.training import LatentActionTask, TokenizerTask, WorldModelTask, rebuilt, train
from genie_core.world import World, load_stages

STAGES = ("data", "tokenizer", "dynamics", "report")
STAGE_FILE = "stage.json"


# Settings that change how a stage reports, not what it produces.
COSMETIC = {"log_every", "num_workers", "gif_scale", "checkpoint_every", "keep_checkpoints", "trackers"}


def stage_settings(recipe: Recipe, stage: str) -> dict:
    """Everything a stage's output depends on (cumulative: a stage depends on all the settings of earlier ones)."""
    d = _drop_cosmetic(recipe.describe())
    d["versions"] = {kind: f"{c.info.owner.package} {c.info.owner.version}" for kind, c in recipe.components.items()}
    settings = {"data": d["data"], "source": d["source"]}
    if stage in ("tokenizer", "dynamics", "report"):
        settings |= {"seed": d["run"]["seed"], "tokenizer": d["tokenizer"], "train.tokenizer": d["train"]["tokenizer"],
                     "precision": d["run"]["mixed_precision"]}
    if stage in ("dynamics", "report"):
        settings |= {"action_model": d["action_model"], "dynamics": d["dynamics"],
                     "train.dynamics": d["train"]["dynamics"]}
    if stage == "report":
        settings |= {"sampler": d["sampler"], "eval": d["eval"], "world": d["world"]}
    # the plugin versions that produced it: the source's for the data, every component's after that
    settings["versions"] = {"source": d["versions"]["source"]} if stage == "data" else d["versions"]
    return settings


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: trackers take flat hyper-parameter tables of plain values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _drop_cosmetic(value):
    if isinstance(value, dict):
        return {k: _drop_cosmetic(v) for k, v in value.items() if k not in COSMETIC}
    return value


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


def _upstream(stage: str) -> str | None:
    """The stage whose output this one consumes."""
    index = STAGES.index(stage)
    return STAGES[index - 1] if index else None


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def video_spec(recipe: Recipe, stage: str, tokenizer=None, true_actions: int = 0) -> VideoSpec:
    """The video a stage's models see; with the trained tokenizer, also its tokens (for token-input models), and
    the number of true actions its footage records."""
    res = recipe.data.resolution
    tokens = {"token_vocab": tokenizer.codebook_size, "token_grid": tuple(tokenizer.grid)} if tokenizer else {}
    return VideoSpec(channels=3, height=res, width=res, num_frames=recipe.train[stage].seq_len,
                     true_actions=true_actions, **tokens)


def world_models(recipe: Recipe, tokenizer, index: EpisodeIndex) -> tuple[LatentActionModel, DynamicsModel]:
    """The latent action and dynamics models of a recipe's dynamics stage, freshly built on its trained tokenizer
    for the footage of `index`."""
    lam_choice, dyn_choice = recipe.components["action_model"], recipe.components["dynamics"]
    reads_tokens = lam_choice.info.cls.needs_tokenizer
    spec = video_spec(recipe, "dynamics", reads_tokens and tokenizer, true_action_count(index))
    action_model = lam_choice.info.cls(lam_choice.config, spec)
    action_model.use_tokenizer(tokenizer)
    token_spec = TokenSpec(vocab_size=tokenizer.codebook_size, grid=tokenizer.grid,
                           num_frames=recipe.train["dynamics"].seq_len, num_actions=action_model.num_actions)
    return action_model, dyn_choice.info.cls(dyn_choice.config, token_spec)


def training_checkpoint(path: Path) -> Path | None:
    """The full-state training checkpoint `path` names (RUN/checkpoints/STAGE/step-N), or the newest complete one
    in a stage's checkpoint folder (RUN/checkpoints/STAGE); None when it is neither."""
    path = Path(path)
    if (path / CHECKPOINT_STATE).is_file():
        return path
    found = sorted(p for p in path.glob("step-*") if p.suffix != ".tmp" and (p / CHECKPOINT_STATE).is_file())
    return found[-1] if found else None


def load_checkpoint_world(checkpoint: Path, registry: Registry | None = None) -> tuple[World, Path, int]:
    """The world as it stood at a checkpoint of a dynamics stage still training (or interrupted): the run's trained
    tokenizer, the latent action and dynamics weights of that step, the recipe's sampler and [world] table.
    Returns the world, the run folder and the step."""
    checkpoint = Path(checkpoint)
    stage, run_dir = checkpoint.parent.name, checkpoint.parents[2]
    if stage != "dynamics":
        raise GenieError(f"{checkpoint}: a checkpoint of the {stage} stage; only the dynamics stage's checkpoints hold "
                         f"a world to play (give RUN/checkpoints/dynamics or one of its step folders)")
    recipe_path = run_dir / "recipe.json"
    if not recipe_path.is_file():
        raise GenieError(f"{checkpoint}: no {recipe_path}; a checkpoint is read inside the run folder that wrote it")
    recipe = recipe_from_table(json.loads(recipe_path.read_text()), str(recipe_path), registry)
    state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
    if state.get("fingerprint") != fingerprint(stage_settings(recipe, "dynamics")):
        raise GenieError(f"{checkpoint}: written under other settings than {recipe_path} records (the run was "
                         f"restarted with another recipe since); it cannot be rebuilt from it")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise GenieError(f"{checkpoint}: no model.safetensors (an FSDP run saves its weights in shards); play the "
                         f"finished run instead")
    tokenizer = load_stages(run_dir, ("tokenizer",), registry)["tokenizer"]
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global generator alone
        action_model, dynamics = world_models(recipe, tokenizer, EpisodeIndex.open(run_data(run_dir)))
    saved = load_file(str(weights))  # the training task's state: "dynamics.*", and "action_model.*" if co-trained
    parts = {prefix: {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
             for prefix in ("dynamics.", "action_model.")}
    dynamics.load_state_dict(parts["dynamics."])
    if parts["action_model."]:  # co-trained with the dynamics model
        action_model.load_state_dict(parts["action_model."])
    else:  # trained alone before the dynamics model, and kept beside the stage's checkpoints while it trains
        done = checkpoint.parents[1] / "dynamics-lam-done"
        if not (done / "components.json").is_file():
            raise GenieError(f"{checkpoint}: its latent action model, trained before the dynamics model, is no longer "
                             f"in {done} (the stage has finished); play the finished run")
        action_model = load_components(done, registry)["action_model"]
        action_model.use_tokenizer(tokenizer)
    sampler = recipe.components["sampler"].info.cls(recipe.components["sampler"].config)
    world = World(tokenizer, action_model.eval(), dynamics.eval(), sampler, recipe.world)
    return world, run_dir, state["step"]


class Pipeline:
    def __init__(self, recipe: Recipe, run_dir: Path, log=print):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.log = log
        self._stage_start = time.perf_counter()  # when the stage in progress started: its record keeps the time

    # ------------------------------------------------------------------------------------------ bookkeeping

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def _record(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / STAGE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def status(self, stage: str) -> str:
        """'done', 'stale' (finished under other settings, or on an earlier stage's output since redone) or
        'missing'."""
        record = self._record(stage)
        if record is None:
            return "missing"
        if record.get("fingerprint") != fingerprint(stage_settings(self.recipe, stage)):
            return "stale"
        upstream = _upstream(stage)
        if upstream is not None and record.get("input") != (self._record(upstream) or {}).get("id"):
            return "stale"
        return "done"

    def _finish(self, folder: Path, stage: str, summary: dict) -> None:
        upstream = _upstream(stage)
        record = {"stage": stage, "id": uuid.uuid4().hex, "input": upstream and self._record(upstream)["id"],
                  "fingerprint": fingerprint(stage_settings(self.recipe, stage)),
                  "settings": stage_settings(self.recipe, stage), "summary": summary,
                  "seconds": round(time.perf_counter() - self._stage_start, 1)}  # this process's wall time
        (folder / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str))

    def run(self, redo_from: str | None = None, resume: bool = False) -> dict:
        """Runs every stage that is not done. With `resume`, a training stage that was interrupted continues from
        its newest full-state checkpoint instead of starting over."""
        self.resume = resume
        if redo_from is not None and redo_from not in STAGES:
            raise GenieError(f"--redo-from '{redo_from}': no such stage; stages: {', '.join(STAGES)}")
        run_cfg = self.recipe.run
        trackers = [t.strip() for t in run_cfg.trackers.split(",") if t.strip() and t.strip() != "none"]
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
        self.accelerator = Accelerator(cpu=run_cfg.cpu, mixed_precision=run_cfg.mixed_precision, fsdp_plugin=fsdp,
                                       log_with=trackers or None, project_dir=str(self.run_dir / "logs"))
        if trackers:
            self.accelerator.init_trackers(run_cfg.name, config=_flat(self.recipe.describe()))
        self.main = self.accelerator.is_main_process
        if not self.main:
            self.log = lambda *_: None
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.json").write_text(json.dumps(self.recipe.table, indent=2))
        several = self.accelerator.num_processes > 1
        if fsdp is not None and self.accelerator.distributed_type.value != "FSDP" and several:
            # Accelerate shards with FSDP only on GPUs; on CPU processes it falls back to DDP without a word.
            self.log(f"run.distributed = 'fsdp': Accelerate runs FSDP on GPUs only; these "
                     f"{self.accelerator.num_processes} {self.accelerator.device.type} processes use DDP")
        if run_cfg.mixed_precision == "fp16" and not self.accelerator.native_amp:
            # Accelerate runs fp16 (autocast + gradient scaler) on GPUs only; elsewhere it trains in float32 silently.
            self.log(f"run.mixed_precision = 'fp16': needs a GPU; on {self.accelerator.device.type} this run trains in "
                     f"float32 (bf16 works on CPUs)")
        with _deterministic(run_cfg.deterministic):
            self._run_stages(redo_from)
        self.accelerator.end_training()
        return json.loads((self.run_dir / "report.json").read_text())

    def _run_stages(self, redo_from: str | None) -> None:
        redo = False
        for stage in STAGES:
            redo = redo or stage == redo_from
            state = self.status(stage)
            if state == "done" and not redo:
                self.log(f"stage {stage}: done, skipping ({self.stage_dir(stage)})")
                continue
            if state == "stale":
                self.log(f"stage {stage}: its settings or inputs changed since it ran, redoing it")
            redo = True  # everything after a redone stage depends on it
            self._stage_start = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.accelerator.wait_for_everyone()  # no process reads a stage before the main one has written it
            self.log(f"stage {stage}: finished in {time.perf_counter() - self._stage_start:.1f} s")

    # ------------------------------------------------------------------------------------------ stages

    @property
    def data_root(self) -> Path:
        return Path(self.recipe.data.path) if self.recipe.data.path else self.stage_dir("data")

    def stage_data(self) -> None:
        if not self.main:
            return
        cfg = self.recipe.data
        if cfg.path:  # built before: check it, use it in place
            manifest = EpisodeIndex.open(cfg.path).manifest
            built, choice = manifest.get("source") or {}, self.recipe.components["source"]
            if (built.get("name"), built.get("config")) != (choice.name, config_to_dict(choice.config)):
                self.log(f"note: data.path {cfg.path} was built by source '{built.get('name')}' with "
                         f"{built.get('config')}; this recipe's [source] table does not describe that footage")
        else:
            choice = self.recipe.components["source"]
            source = choice.info.cls(choice.config, DataSpec(resolution=cfg.resolution))
            manifest = build_dataset(source, source_identity(source, choice.name, choice.info.owner), cfg,
                                     self.stage_dir("data"), skip_bad=cfg.skip_bad, log=self.log)
        if manifest["resolution"] != cfg.resolution:
            raise GenieError(f"{self.data_root}: frames are {manifest['resolution']} pixels square, the recipe's "
                             f"data.resolution is {cfg.resolution}")
        self.stage_dir("data").mkdir(parents=True, exist_ok=True)
        splits = {k: {"episodes": v["episodes"], "frames": v["frames"]} for k, v in manifest["splits"].items()}
        self._finish(self.stage_dir("data"), "data", {"root": str(self.data_root), "frames": manifest["frames"],
                                                       "splits": splits, "skipped": manifest["skipped"]})

    @property
    def index(self) -> EpisodeIndex:
        if getattr(self, "_index", None) is None:
            self._index = EpisodeIndex.open(self.data_root)
        return self._index

    def dataset(self, split: str, length: int, with_actions: bool = False) -> WindowDataset:
        return WindowDataset(self.index, split, length, with_actions)

    def _checkpointing(self, stage: str) -> dict:
        return {"checkpoint_dir": self.run_dir / "checkpoints" / stage, "resume": self.resume,
                "fingerprint": fingerprint(stage_settings(self.recipe, stage))}

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
                        self.recipe.run.seed, self.run_dir / "logs" / "tokenizer.jsonl", "tokenizer",
                        validate=validate, **self._checkpointing("tokenizer"))
        weights = summary.pop("weights")
        if not self.main:
            return
        tokenizer = rebuilt(tokenizer, weights, "tokenizer.")
        summary["parameters"] = sum(p.numel() for p in tokenizer.parameters())
        with atomic_dir(self.stage_dir("tokenizer")) as folder:
            save_components(folder, {"tokenizer": (choice.name, tokenizer)})
            self._finish(folder, "tokenizer", summary)

    def stage_dynamics(self) -> None:
        components = self.recipe.components
        cfg = self.recipe.train["dynamics"]
        tokenizer = load_stages(self.run_dir, ("tokenizer",))["tokenizer"].to(self.accelerator.device)
        torch.manual_seed(self.recipe.run.seed + 1)
        lam_choice, dyn_choice = components["action_model"], components["dynamics"]
        action_model, dynamics = world_models(self.recipe, tokenizer, self.index)
        data = self.dataset("train", cfg.seq_len, with_actions=action_model.reads_true_actions)
        seed, logs, ckpt = self.recipe.run.seed + 1, self.run_dir / "logs", self._checkpointing("dynamics")
        if cfg.lam_steps:  # the LAM alone first, then dynamics on it, frozen
            action_model = self._train_action_model_alone(lam_choice.name, action_model, tokenizer, data, cfg, seed,
                                                          ckpt)
        ckpt["validate"] = self._world_validator(tokenizer, action_model, dynamics, cfg.seq_len)
        task = WorldModelTask(action_model, dynamics, tokenizer, train_action_model=not cfg.lam_steps)
        summary = train(self.accelerator, task, data, cfg, seed, logs / "dynamics.jsonl",
                        "dynamics" if cfg.lam_steps else "lam+dynamics", **ckpt)
        weights = summary.pop("weights")
        if not self.main:
            return
        if not cfg.lam_steps:
            action_model = rebuilt(action_model, weights, "action_model.")
        action_model, dynamics = action_model.cpu(), rebuilt(dynamics, weights, "dynamics.")
        summary["parameters"] = {"action_model": sum(p.numel() for p in action_model.parameters()),
                                 "dynamics": sum(p.numel() for p in dynamics.parameters())}
        with atomic_dir(self.stage_dir("dynamics")) as folder:
            save_components(folder, {"action_model": (lam_choice.name, action_model),
                                     "dynamics": (dyn_choice.name, dynamics)})
            self._finish(folder, "dynamics", summary)
        shutil.rmtree(self.run_dir / "checkpoints" / "dynamics-lam-done", ignore_errors=True)

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
        folder = self.run_dir / "samples"
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

    def _train_action_model_alone(self, name: str, action_model, tokenizer, data, cfg, seed: int, ckpt: dict):
        """First phase of a separate LAM/dynamics stage; returns the trained LAM, whole on every process. Its result
        is kept beside the stage's checkpoints, so a resumed stage does not train the LAM again."""
        done = ckpt["checkpoint_dir"].parent / "dynamics-lam-done"
        if self.resume and (done / "components.json").is_file():
            self.log(f"dynamics: the latent action model was trained before the interruption ({done}); reusing it")
        else:
            lam_cfg = attrs.evolve(cfg, steps=cfg.lam_steps, warmup_steps=min(cfg.warmup_steps, cfg.lam_steps))
            summary = train(self.accelerator, LatentActionTask(action_model), data, lam_cfg, seed,
                            self.run_dir / "logs" / "lam.jsonl", "lam", resume=self.resume,
                            checkpoint_dir=ckpt["checkpoint_dir"].parent / "dynamics-lam",
                            fingerprint=ckpt["fingerprint"])
            if self.main:
                with atomic_dir(done) as folder:
                    save_components(folder, {"action_model": (name, rebuilt(action_model, summary["weights"],
                                                                            "action_model."))})
            self.accelerator.wait_for_everyone()
        action_model = load_components(done)["action_model"].to(self.accelerator.device)
        action_model.use_tokenizer(tokenizer)
        return action_model

    @torch.no_grad()
    def stage_report(self) -> None:
        choice = self.recipe.components["sampler"]
        sampler = choice.info.cls(choice.config)
        world = World(**load_stages(self.run_dir, ("tokenizer", "dynamics")), sampler=sampler,
                      config=self.recipe.world).to(self.accelerator.device)
        ev = self.recipe.eval
        device = self.accelerator.device
        t = ev.dtpsnr_t  # the recipe checks that t + 1 frames fit the action model's windows
        settings = EvalSettings(windows=ev.windows, batch_size=ev.batch_size, seed=ev.seed, dtpsnr_t=(t,))
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
        save_gif(tile(panels), self.run_dir / "rollout.gif", scale=ev.gif_scale,
                 captions=[f"action {action}" for action in range(world.num_actions)])
        save_strip(panels[0], self.run_dir / "rollout.png", scale=ev.gif_scale)

        stages = {s: json.loads((self.stage_dir(s) / STAGE_FILE).read_text())["summary"] for s in STAGES[:-1]}
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
            "windows_overlap": measured["windows_overlap"],
            "actions_vs_true_nmi": (measured["actions_vs_true"] or {}).get("nmi"),
            "actions_vs_true_classes_nmi": (measured["actions_vs_true_classes"] or {}).get("nmi"),
            "lam_codebook": measured["lam_codebook"],
            "num_actions": world.num_actions,
            "rollout_gif": "rollout.gif (one panel per latent action, each held for every step)",
            "stages": stages,
            "machine": describe_machine(),
        }
        (self.run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (self.run_dir / "report.md").write_text(report_markdown(report, t))
        with atomic_dir(self.stage_dir("report")) as folder:
            save_components(folder, {"sampler": (choice.name, sampler)})
            self._finish(folder, "report", {"tokenizer_psnr_db": tokenizer_psnr["mean"], "dtpsnr_db": dtpsnr["mean"]})




def _fmt(stat: dict, unit: str, digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['ci95']:.{digits}f} (n={stat['n']} {unit})"


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
        f"| tokenizer reconstruction PSNR (dB) | {_fmt(report['tokenizer_psnr_db'], 'frames')} |",
        f"| controllability dtPSNR at t={t} (dB) | {_fmt(report[f'dtpsnr_t{t}_db'], 'windows')} |",
        f"| dynamics PSNR at t={t}, inferred actions (dB) | {_fmt(report[f'dynamics_psnr_t{t}_db'], 'windows')} |",
        f"| baseline: the prompt frame again, PSNR at t={t} (dB) | "
        f"{_fmt(report[f'copy_prompt_psnr_t{t}_db'], 'windows')} |",
        f"| baseline: the prompt's tokens again, PSNR at t={t} (dB) | "
        f"{_fmt(report[f'copy_prompt_tokens_psnr_t{t}_db'], 'windows')} |",
        f"| dynamics minus the prompt frame again, at t={t} (dB, paired) | "
        f"{_fmt(report[f'dynamics_minus_copy_prompt_t{t}_db'], 'windows')} |",
        f"| tokenizer reconstruction SSIM | {_fmt(report['tokenizer_ssim'], 'frames', 3)} |",
        f"| latent vs true actions NMI | {nmi} |",
        f"| latent actions used / perplexity | {lam['used']}/{lam['size']} / {lam['perplexity']:.2f} |",
        "",
        f"Training: tokenizer {train_tok['steps_per_second']:.2f} steps/s, "
        f"final loss {train_tok['final']['loss']:.4f}; "
        f"LAM + dynamics {train_dyn['steps_per_second']:.2f} steps/s, final loss {train_dyn['final']['loss']:.4f}.",
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

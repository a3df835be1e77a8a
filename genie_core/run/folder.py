"""A run folder: the only code that knows how `genie run` lays one out.

    RUN/recipe.json                  the recipe as run (overrides applied)
    RUN/data/                        the footage, unless the recipe's data.path names a data set built elsewhere
    RUN/STAGE/                       each finished stage: stage.json (fingerprint, summary) and its components
    RUN/checkpoints/STAGE/step-N/    full-state training checkpoints (trainer.json beside Accelerate's files)
    RUN/checkpoints/dynamics-lam-done/   a latent action model trained before the dynamics model, while it trains
    RUN/logs/, RUN/samples/          training logs and validation GIFs
    RUN/report.json, report.md, rollout.gif, rollout.png      the report stage's results
    RUN/eval/                        what `genie eval RUN` writes

Evaluation, play and sampling load worlds from here; the training pipeline writes here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

from genie_core.config import EvalConfig, WorldConfig, checked_config
from genie_core.errors import GenieError, first_line
from genie_core.interfaces import Sampler
from genie_core.registry import Registry, get_registry
from genie_core.run.stages import STAGE_FILE, fingerprint, stage_fingerprint, upstream, world_models
from genie_core.world.components import DAMAGE, MANIFEST, load_components
from genie_core.world.model import World

LOCK_FILE = ".genie-run.lock"  # held by the `genie run` writing the folder (an OS lock: it dies with its process)
CHECKPOINT_STATE = "trainer.json"  # in a training checkpoint, beside Accelerate's files: step, data position, ...
WEIGHT_AVERAGE = "weight-average-{}.pt"  # and with train.*.ema_decay, each process's average of the weights


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete full-state checkpoints in one stage's checkpoint folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # (step-N.tmp: being written; step-N.damaged: set aside by a resume that could not read it)
    return sorted(p for p in folder.glob("step-*") if not p.suffix and (p / CHECKPOINT_STATE).is_file())


def training_checkpoint(path: Path) -> Path | None:
    """The full-state training checkpoint `path` names (RUN/checkpoints/STAGE/step-N), or the newest complete one
    in a stage's checkpoint folder (RUN/checkpoints/STAGE); None when it is neither."""
    path = Path(path)
    if (path / CHECKPOINT_STATE).is_file():
        return path
    found = complete_checkpoints(path)
    return found[-1] if found else None


@attrs.frozen
class RunFolder:
    path: Path = attrs.field(converter=Path)

    @classmethod
    def find(cls, path: Path) -> "RunFolder":
        """The run folder `path` is, or is inside (a stage folder such as RUN/dynamics): the nearest with the recipe
        it ran, or with finished tokenizer and dynamics stages."""
        path = Path(path)
        for candidate in (path, *path.parents[:2]):
            run = cls(candidate)
            if run.recipe_path.is_file() or ((run.stage("dynamics") / MANIFEST).is_file() and
                                             run.stage("tokenizer").is_dir()):
                return run
        raise GenieError(f"{path}: not a run (no recipe.json or dynamics/{MANIFEST} in it or above it); give the "
                         "folder `genie run` wrote")

    @property
    def name(self) -> str:
        return self.path.resolve().name

    # ------------------------------------------------------------------------------------------ where things are

    def stage(self, stage: str) -> Path:
        return self.path / stage

    def checkpoints(self, stage: str) -> Path:
        """Where a stage (or a phase of one, "dynamics-lam") keeps its full-state training checkpoints."""
        return self.path / "checkpoints" / stage

    @property
    def lam_done(self) -> Path:
        """A latent action model trained before its dynamics model, kept while the dynamics model trains."""
        return self.path / "checkpoints" / "dynamics-lam-done"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.json"

    @property
    def data(self) -> Path:
        """The data set the run trained on: its recipe's data.path, or the data stage inside it."""
        path = self.recipe_table().get("data", {}).get("path")
        return Path(path) if path else self.stage("data")

    # ------------------------------------------------------------------------------------------ what it records

    def stage_record(self, stage: str) -> dict | None:
        """A finished stage's stage.json (fingerprint, input, settings, summary, seconds), or None."""
        path = self.stage(stage) / STAGE_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise GenieError(f"{path}: damaged, not JSON ({error}); delete the {stage} folder and run `genie run` to "
                             f"redo the stage") from None

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder for one writer: a second `genie run` on it refuses at once, naming the holder. The lock is
        the operating system's (flock), so a process that dies, even by kill -9, lets go of it."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise GenieError(f"{self.path}: in use by {holder}; wait for it to finish or stop it (two runs writing "
                             f"one folder would mix their checkpoints and logs)") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"genie run (process {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def recipe_table(self) -> dict:
        """The recipe as run, as written (empty for a folder without one)."""
        if not self.recipe_path.is_file():
            return {}
        try:
            return json.loads(self.recipe_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise GenieError(f"{self.recipe_path}: damaged, not JSON ({error}); `genie run` writes it again from its "
                             f"recipe") from None

    def recipe(self, registry: Registry | None = None):
        """The recipe as run, validated against the installed plugins."""
        from genie_core.recipe import recipe_from_table

        if not self.recipe_path.is_file():
            raise GenieError(f"{self.path}: no recipe.json; not a folder `genie run` wrote")
        return recipe_from_table(self.recipe_table(), str(self.recipe_path), registry)

    def _table(self, name: str) -> tuple[dict, str]:
        return self.recipe_table().get(name, {}), f"{self.recipe_path} [{name}]"

    def eval_config(self) -> EvalConfig:
        """The recipe's [eval] table, which the report used: `genie eval` starts from it to reproduce the report's
        numbers (defaults for a run without one)."""
        return checked_config(EvalConfig, *self._table("eval"))

    def world_config(self) -> WorldConfig:
        """The recipe's [world] table (defaults for a run without one)."""
        return checked_config(WorldConfig, *self._table("world"))

    def recipe_sampler(self, registry: Registry | None = None) -> Sampler:
        """The sampler the run's recipe names, built from its [sampler] table."""
        table, where = self._table("sampler")
        options = dict(table)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise GenieError(f"{where}: no sampler name; finish the run's report stage (`genie run`) or fix its recipe")
        info = (registry or get_registry()).get("sampler", name)
        return info.cls(checked_config(info.cls.config_class, options, where))

    # ------------------------------------------------------------------------------------------ what it holds

    def components(self, *stages: str, registry: Registry | None = None) -> dict:
        """The components saved by the given finished stages, by kind."""
        parts = {}
        for stage in stages:
            folder = self.stage(stage)
            if not (folder / MANIFEST).is_file():
                raise GenieError(f"{self.path}: the {stage} stage has not finished (no {folder / MANIFEST}); "
                                 f"run `genie run` on its recipe first")
            parts |= load_components(folder, registry or get_registry())
        return parts

    def world(self, registry: Registry | None = None) -> World:
        """The trained world: tokenizer, action and dynamics models, the sampler it was evaluated with (saved by the
        report stage; the recipe's when that stage has not run) and the recipe's [world] settings."""
        registry = registry or get_registry()
        self._check_stages_belong_together()
        if (self.stage("report") / MANIFEST).is_file():
            parts = self.components("tokenizer", "dynamics", "report", registry=registry)
        else:
            parts = self.components("tokenizer", "dynamics", registry=registry)
            parts["sampler"] = self.recipe_sampler(registry)
        return World(**parts, config=self.world_config())

    def _check_stages_belong_together(self) -> None:
        """Each stage records the output it was trained on; stage folders copied in from another run do not match."""
        tokenizer, dynamics = self.stage_record("tokenizer"), self.stage_record("dynamics")
        if tokenizer and dynamics and dynamics.get("input") != tokenizer.get("id"):
            raise GenieError(f"{self.stage('dynamics')}: trained on another tokenizer than {self.stage('tokenizer')} "
                             f"holds (its stage.json names tokenizer output {dynamics.get('input')}, the tokenizer's "
                             f"is {tokenizer.get('id')}); run `genie run` on the recipe to redo the dynamics stage")

    def checkpoint_key(self, recipe, stage: str) -> str:
        """What a stage's training checkpoints belong to: its settings, and the output of the stage before it as
        this folder holds it now (one redone since is not what they trained on)."""
        before = upstream(stage)
        return fingerprint({"settings": stage_fingerprint(recipe, stage),
                            "input": before and (self.stage_record(before) or {}).get("id")})

    def checkpoint_world(self, checkpoint: Path, registry: Registry | None = None) -> tuple[World, int]:
        """The world as it stood at a full-state checkpoint of this run's dynamics stage, still training or
        interrupted: the trained tokenizer, the latent action and dynamics weights of that step, the recipe's
        sampler and [world] table. Returns the world and the step."""
        from genie_core.data.footage import EpisodeIndex

        checkpoint = Path(checkpoint)
        try:
            state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
            step = int(state["step"])
        except DAMAGE as error:
            raise GenieError(f"{checkpoint}: damaged or gone ({first_line(error)}); play another checkpoint or the "
                             f"finished run") from None
        recipe = self.recipe(registry)
        if state.get("fingerprint") != self.checkpoint_key(recipe, "dynamics"):
            raise GenieError(f"{checkpoint}: written under other settings than {self.recipe_path} records, or on a "
                             f"tokenizer since trained again (the run was restarted since); it cannot be rebuilt "
                             f"from it")
        weights = checkpoint / "model.safetensors"
        if not weights.is_file():
            raise GenieError(f"{checkpoint}: no model.safetensors (an FSDP run saves its weights in shards); play the "
                             f"finished run instead")
        tokenizer = self.components("tokenizer", registry=registry)["tokenizer"]
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global generator alone
            action_model, dynamics = world_models(recipe, tokenizer, EpisodeIndex.open(self.data))
        try:
            saved = load_file(str(weights))  # the task's state: "dynamics.*", and "action_model.*" if co-trained
            average = checkpoint / WEIGHT_AVERAGE.format(0)
            if average.is_file():  # train.dynamics.ema_decay: the stage would save the average, so it is played
                kept = torch.load(average, weights_only=True)
                saved |= dict(zip(kept["names"], kept["average"], strict=True))
            parts = {prefix: {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
                     for prefix in ("dynamics.", "action_model.")}
            dynamics.load_state_dict(parts["dynamics."])
            if parts["action_model."]:  # co-trained with the dynamics model
                action_model.load_state_dict(parts["action_model."])
        except DAMAGE as error:  # cut short, removed by training meanwhile, or of another shape
            raise GenieError(f"{weights}: cannot load ({first_line(error)}); play another checkpoint or the finished "
                             f"run") from None
        if not parts["action_model."]:  # trained alone before the dynamics model, kept beside the checkpoints
            if not (self.lam_done / MANIFEST).is_file():
                raise GenieError(f"{checkpoint}: its latent action model, trained before the dynamics model, is no "
                                 f"longer in {self.lam_done} (the stage has finished); play the finished run")
            action_model = load_components(self.lam_done, registry or get_registry())["action_model"]
            action_model.use_tokenizer(tokenizer)
        sampler = recipe.components["sampler"].info.cls(recipe.components["sampler"].config)
        return World(tokenizer, action_model.eval(), dynamics.eval(), sampler, recipe.world), step


def open_world(path: Path, registry: Registry | None = None) -> tuple[World, RunFolder, str]:
    """The world at `path`: a run folder (or a folder inside one, such as RUN/dynamics), or a training checkpoint
    of its dynamics stage (RUN/checkpoints/dynamics/step-N, or RUN/checkpoints/dynamics for the newest), so a world
    can be played while it trains. Returns the world, its run folder and a name to show."""
    checkpoint = training_checkpoint(Path(path).resolve())  # (its run folder is two levels up)
    if checkpoint is None:
        run = RunFolder.find(path)
        return run.world(registry), run, run.name
    stage, run = checkpoint.parent.name, RunFolder(checkpoint.parents[2])
    if stage != "dynamics":
        raise GenieError(f"{checkpoint}: a checkpoint of the {stage} stage; only the dynamics stage's checkpoints hold "
                         f"a world to play (give RUN/checkpoints/dynamics or one of its step folders)")
    if not run.recipe_path.is_file():
        raise GenieError(f"{checkpoint}: no {run.recipe_path}; a checkpoint is read inside the run folder that wrote "
                         f"it")
    world, step = run.checkpoint_world(checkpoint, registry)
    return world, run, f"{run.name} at step {step}"


def load_world(run: Path, registry: Registry | None = None) -> World:
    """The trained world of a run folder (or of a folder inside one, such as RUN/dynamics)."""
    return RunFolder.find(run).world(registry)


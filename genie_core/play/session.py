"""A world played by a person, one action at a time: a `PlaySession` holds the rollout (with the dynamics model's
cache kept from frame to frame), the decoded frames, undo and reset, and the session as a GIF. `PlayWorld` is what
every session of one loaded world shares: the world, its keys, the prompts of its validation data."""

from __future__ import annotations

import io
import json
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import attrs
import numpy as np
import torch

from genie_core.capabilities import CompilableCachedSteps
from genie_core.errors import GenieError
from genie_core.interfaces import Sampler
from genie_core.io.media import resize_frames, save_gif, to_uint8
from genie_core.run.folder import RunFolder, open_world
from genie_core.world.model import Rollout, World

ARROWS = {"ArrowLeft": "LEFT", "ArrowRight": "RIGHT", "ArrowUp": "UP", "ArrowDown": "DOWN"}
SAMPLER_KNOBS = ("steps", "temperature")  # what the page's sliders set, where the sampler has them
MAX_PROMPTS = 12


def arrow_keys(run: RunFolder, eval_dir: Path | None = None) -> dict[str, int]:
    """Arrow key -> latent action, through the latent <-> true action mapping that `genie eval` fits (eval.json in
    `eval_dir`, by default RUN/eval) and the true actions' names in the run's data set. Empty when either is
    missing, except a named `eval_dir` without eval.json: that is an error."""
    if eval_dir is not None and not (Path(eval_dir) / "eval.json").is_file():
        raise GenieError(f"--eval {eval_dir}: no eval.json there; give the folder `genie eval RUN --out DIR` wrote")
    eval_json = Path(eval_dir or run.eval_dir) / "eval.json"
    manifest = run.data / "manifest.json"
    if not (eval_json.is_file() and manifest.is_file()):
        return {}
    mapping = (json.loads(eval_json.read_text()).get("actions_vs_true") or {}).get("real_to_latent", {})
    names = json.loads(manifest.read_text()).get("action_names") or []
    keys = {}
    for key, wanted in ARROWS.items():
        real = next((i for i, name in enumerate(names) if name == wanted), None)
        if real is not None and str(real) in mapping:
            keys[key] = int(mapping[str(real)])
    return keys


def validation_prompts(run: RunFolder, resolution: int, count: int = MAX_PROMPTS) -> list[torch.Tensor]:
    """First frames [C, H, W] of up to `count` evenly spaced validation episodes of the run's data set (none when
    the data set is not there)."""
    from genie_core.data.footage import EpisodeIndex

    try:
        index = EpisodeIndex.open(run.data)
    except GenieError:
        return []
    split = "val" if "val" in index.manifest["splits"] else "train"
    episodes = index.episodes(split)
    n = min(count, len(episodes))
    prompts = []
    for episode in (episodes[round(i * (len(episodes) - 1) / max(1, n - 1))] for i in range(n)):
        frames = np.load(index.shard_path(episode["shard"], "frames"), mmap_mode="r")
        first = resize_frames(np.array(frames[episode["start"] : episode["start"] + 1]), resolution)[0]
        prompts.append(torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    return prompts


class Compute:
    """Where a world's frames are computed: one job at a time, whoever asks (one model, one device). Torch's CPU
    thread pools belong to the thread that uses them, and frames computed on a web server's handler threads, beside
    the pool of the thread that loaded the model, ran at half speed on a 2-core machine. So `serve()` lets one
    thread (the CLI's main thread, which loaded the model) do every job; until it does, or without it, `run` does the
    job on the caller's thread."""

    def __init__(self):
        self._lock = threading.RLock()
        self._jobs: queue.Queue | None = None
        self._serving: int | None = None  # the thread doing the jobs

    def run(self, job, *args):
        """job(*args) under torch.no_grad(), and its result (or its exception)."""
        jobs = self._jobs
        if jobs is None or threading.get_ident() == self._serving:  # (a job that runs another: no waiting on itself)
            with self._lock, torch.no_grad():
                return job(*args)
        done: Future = Future()
        jobs.put((job, args, done))
        return done.result()

    def serve(self, stop: threading.Event) -> None:
        """Does every job on the calling thread until `stop` is set (or Ctrl+C)."""
        self._jobs, self._serving = queue.Queue(), threading.get_ident()
        jobs = self._jobs
        try:
            while not stop.is_set():
                try:
                    job, args, done = jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    with self._lock, torch.no_grad():
                        done.set_result(job(*args))
                except Exception as error:  # noqa: BLE001 - the caller's to handle
                    done.set_exception(error)
        finally:
            self._jobs, self._serving = None, None
            while not jobs.empty():  # jobs that came too late still get an answer
                jobs.get_nowait()[2].set_exception(GenieError("the server is stopping"))


@attrs.define
class PlayWorld:
    """A loaded world and what its players share."""

    world: World
    name: str
    keys: dict[str, int] = attrs.field(factory=dict)  # arrow key -> latent action
    prompts: list[torch.Tensor] = attrs.field(factory=list)  # [C, H, W] each
    # One frame is generated at a time, whoever asks: sessions share the model and the device.
    compute: Compute = attrs.field(factory=Compute)

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", eval_dir: Path | None = None) -> "PlayWorld":
        """The world of a run folder (or of a folder inside one, such as RUN/dynamics), or of a training checkpoint
        of its dynamics stage (RUN/checkpoints/dynamics/step-N, or RUN/checkpoints/dynamics for the newest): a
        world can be played while it trains. `eval_dir`: where `genie eval` wrote the action mapping the arrow
        keys follow (default RUN/eval)."""
        world, run, name = open_world(path)
        world.to(device)
        for module in (world.tokenizer, world.action_model, world.dynamics):
            module.eval()
        return cls(world, name, arrow_keys(run, eval_dir), validation_prompts(run, world.tokenizer.spec.height))

    def compile_steps(self, mode: str | None = None) -> float:
        """Compiles the dynamics model's cached sampling step (torch.compile; `mode` e.g. "reduce-overhead") and
        plays two frames from a blank prompt so that the compiling happens now, not on a player's first key.
        Returns the seconds it took."""
        world = self.world
        dynamics = type(world.dynamics).__name__
        if not isinstance(world.dynamics, CompilableCachedSteps):
            raise GenieError(f"--compile: the dynamics model {dynamics} has no compiled cached steps; play without it")
        if not world.sampler.can_use_cache(world.dynamics):
            raise GenieError(f"--compile: the sampler {type(world.sampler).__name__} does not sample from the "
                             f"dynamics model's cache here, so there is nothing to compile; play without it")
        start = time.perf_counter()
        world.dynamics.compile_cached_steps(mode=mode)
        blank = torch.zeros(1, 1, *world.dynamics.spec.grid, dtype=torch.long, device=world.device)

        def two_frames():  # the first frame compiles the logits step, the second the extending one
            rollout = Rollout(world, blank)
            for _ in range(2):
                rollout.step(torch.zeros(1, dtype=torch.long, device=world.device))
        try:
            self.compute.run(two_frames)
        except Exception as error:  # noqa: BLE001 (the compiler's failures are many: no C++ compiler, no Triton, ...)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise GenieError(f"--compile: torch.compile failed ({reason}); play without --compile") from None
        return time.perf_counter() - start

    @property
    def resolution(self) -> tuple[int, int]:
        return self.world.tokenizer.spec.height, self.world.tokenizer.spec.width

    def sampler_options(self) -> dict:
        """The sampler's knobs the page offers, with the run's values."""
        fields = attrs.fields_dict(type(self.world.sampler.config))
        return {k: getattr(self.world.sampler.config, k) for k in SAMPLER_KNOBS if k in fields}

    def sampler(self, options: dict) -> Sampler:
        """The world's sampler with some knobs changed (a fresh one: the world's stays as it is)."""
        unknown = set(options) - set(self.sampler_options())
        if unknown:
            raise GenieError(f"sampler option {', '.join(sorted(unknown))} is not one of this sampler's: "
                             f"{', '.join(self.sampler_options()) or '(none)'}")
        return self.world.sampler_with(options)


class PlaySession:
    """One player's session: the prompt, every frame since, and the actions that led to them."""

    def __init__(self, play: PlayWorld, prompt: torch.Tensor, seed: int = 0):
        """prompt [C, H, W] in [0, 1], at the world's resolution."""
        self.id = secrets.token_urlsafe(12)
        self.play = play
        world = play.world
        def encode():
            tokens = world.encode_prompt(prompt[None])
            return tokens, to_uint8(world.decode(tokens)[0])[0]  # the prompt as the world sees it, after its tokenizer
        tokens, first = play.compute.run(encode)
        self.rollout = Rollout(world, tokens)
        self.frames = [first]  # [H, W, 3] each
        self.generator = torch.Generator(world.device).manual_seed(seed)
        self.lock = threading.Lock()  # one change at a time per session
        self.last_used = time.monotonic()
        self.seconds: list[float] = []  # time per generated frame, recent ones

    @property
    def actions(self) -> list[int]:
        return self.rollout.actions[0].tolist()

    def fps(self) -> float | None:
        recent = self.seconds[-10:]
        return len(recent) / sum(recent) if recent else None

    def step(self, action: int, options: dict | None = None) -> np.ndarray:
        """Generates and returns the next frame [H, W, 3] uint8."""
        if not isinstance(action, int) or isinstance(action, bool) or not 0 <= action < self.play.world.num_actions:
            raise GenieError(f"action {action!r} is out of range; this world has actions "
                             f"0..{self.play.world.num_actions - 1}")
        sampler = self.play.sampler(options or {})
        world = self.play.world
        start = time.perf_counter()

        def next_frame():
            self.rollout.step(torch.tensor([action], device=world.device), self.generator, sampler)
            return to_uint8(world.decode_last(self.rollout.tokens)[0])[0]
        self.frames.append(self.play.compute.run(next_frame))
        self.seconds = self.seconds[-9:] + [time.perf_counter() - start]
        return self.frames[-1]

    def undo(self) -> None:
        """Takes the last frame back (the prompt stays)."""
        if len(self.frames) > 1:
            self.rollout.truncate(len(self.frames) - 1)
            self.frames.pop()

    def reset(self) -> None:
        """Back to the prompt."""
        self.rollout.truncate(1)
        del self.frames[1:]

    def gif(self, scale: int = 4, fps: int = 8) -> bytes:
        def encode() -> bytes:
            video = torch.from_numpy(np.stack(self.frames)).permute(0, 3, 1, 2).float() / 255
            buffer = io.BytesIO()
            save_gif(video, buffer, scale=scale, fps=fps)
            return buffer.getvalue()
        return self.play.compute.run(encode)

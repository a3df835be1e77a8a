"""A world played by a person, one action at a time: a `PlaySession` holds the rollout (with the dynamics model's
cache kept from frame to frame), its most recent decoded frames, undo and reset, and the session as a GIF.
`PlayWorld` is what every session of one loaded world shares: the world, its keys, the prompts of its validation
data."""

from __future__ import annotations

import io
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from pathlib import Path

import attrs
import numpy as np
import torch

from genie_core.capabilities import CompilableCachedSteps
from genie_core.errors import GenieError, first_line
from genie_core.interfaces import Sampler
from genie_core.io.media import resize_frames, save_gif, to_uint8
from genie_core.run.folder import RunFolder, open_world
from genie_core.world.model import Rollout, World

ARROWS = {"ArrowLeft": "LEFT", "ArrowRight": "RIGHT", "ArrowUp": "UP", "ArrowDown": "DOWN"}
SAMPLER_KNOBS = ("steps", "temperature")  # what the page's sliders set, where the sampler has them
MAX_TEMPERATURE = 2.0  # the most a player may set (the page's slider), unless the served sampler's is higher
MAX_PROMPTS = 12
NEW_SESSIONS = "new sessions"  # whose turn encoding a new session's prompt is: all new sessions share one
# A session's most recent frames kept for its GIF and undo (`Limits.max_frames`): a session played for hours holds no
# more than this (12 MB at 64x64).
MAX_FRAMES = 1000


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


class Abandoned(Exception):
    """A job whose client went away before its turn came: it was dropped, not run."""


@attrs.define
class _Job:
    call: Callable
    args: tuple
    abandoned: Callable[[], bool] | None
    done: Future = attrs.field(factory=Future)


class Compute:
    """Where a world's frames are computed: one job at a time, whoever asks (one model, one device). Torch's CPU
    thread pools belong to the thread that uses them, and frames computed on a web server's handler threads, beside
    the pool of the thread that loaded the model, ran at half speed on a 2-core machine. So `serve()` lets one
    thread (the CLI's main thread, which loaded the model) do every job; until it does, or without it, the callers
    take turns doing the jobs on their own threads.

    Jobs wait in lines, one per owner (a session, or `NEW_SESSIONS`), and the lines take turns, one job each: a
    player who sends many requests delays another's frame by at most one of its own jobs. A job whose
    `abandoned()` is true when its turn comes (its client has gone) is dropped: its caller gets `Abandoned`."""

    def __init__(self):
        self._turns = threading.Condition()  # guards _lines and _serving
        self._lines: dict[Hashable, deque[_Job]] = {}  # owner -> its waiting jobs; the dict's order is the turns'
        self._serving: int | None = None  # the thread doing every job, while one does
        self._busy = threading.Lock()  # held while a job runs
        self._running: int | None = None  # the thread running a job now

    def run(self, job, *args, owner: Hashable = None, abandoned: Callable[[], bool] | None = None):
        """job(*args) under torch.no_grad(), in its owner's turn, and its result (or its exception)."""
        if threading.get_ident() == self._running:  # a job that runs another: no waiting on itself
            return job(*args)
        waiting = _Job(job, args, abandoned)
        with self._turns:
            self._lines.setdefault(owner, deque()).append(waiting)
            self._turns.notify_all()
        while not waiting.done.done():
            with self._turns:
                if self._serving is not None:
                    break
            with self._busy:  # nobody serves: do the next job in turn (maybe another caller's) on this thread
                if not waiting.done.done():
                    self._run_next()
        return waiting.done.result()

    def pending(self) -> int:
        """How many jobs are waiting for their turn."""
        with self._turns:
            return sum(len(line) for line in self._lines.values())

    def serve(self, stop: threading.Event) -> None:
        """Does every job on the calling thread until `stop` is set (or Ctrl+C)."""
        with self._turns:
            self._serving = threading.get_ident()
        try:
            while not stop.is_set():
                with self._turns:
                    if not self._lines:
                        self._turns.wait(timeout=0.2)
                        continue
                with self._busy:
                    self._run_next()
        finally:
            with self._turns:
                self._serving = None
                late = [job for line in self._lines.values() for job in line]
                self._lines.clear()
            for job in late:  # jobs that came too late still get an answer
                job.done.set_exception(GenieError("the server is stopping"))

    def _run_next(self) -> None:
        """Runs the first job of the line whose turn it is; that line goes to the back. Call with `_busy` held."""
        with self._turns:
            if not self._lines:
                return
            owner = next(iter(self._lines))
            line = self._lines.pop(owner)
            job = line.popleft()
            if line:
                self._lines[owner] = line
        if job.abandoned is not None and job.abandoned():
            job.done.set_exception(Abandoned("the client went away before its turn"))
            return
        self._running = threading.get_ident()
        try:
            with torch.no_grad():
                job.done.set_result(job.call(*job.args))
        except Exception as error:  # noqa: BLE001 - the caller's to handle
            job.done.set_exception(error)
        finally:
            self._running = None


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
        """Compiles the dynamics model's cached sampling step and, with `[world] decode_frames` set, the decoding of
        the shown frame (torch.compile; `mode` e.g. "reduce-overhead"), and plays frames from a blank prompt until
        every shape play will meet has been compiled (two frames, or decode_frames - 1), so that the compiling
        happens now, not on a player's first keys. Returns the seconds it took."""
        world = self.world
        dynamics = type(world.dynamics).__name__
        if not isinstance(world.dynamics, CompilableCachedSteps):
            raise GenieError(f"--compile: the dynamics model {dynamics} has no compiled cached steps; play without it")
        if not world.sampler.can_use_cache(world.dynamics):
            raise GenieError(f"--compile: the sampler {type(world.sampler).__name__} does not sample from the "
                             f"dynamics model's cache here, so there is nothing to compile; play without it")
        start = time.perf_counter()
        world.dynamics.compile_cached_steps(mode=mode)
        world.compile_shown_decoding(mode=mode)
        blank = torch.zeros(1, 1, *world.dynamics.spec.grid, dtype=torch.long, device=world.device)

        # The first frame compiles the one-frame step, the second the one that also runs the first; the decoder
        # compiles once for each count of frames it decodes until there are decode_frames.
        frames = max(2, min(world.config.decode_frames, world.tokenizer.spec.num_frames) - 1)

        def warm_up():
            rollout = Rollout(world, blank)
            for _ in range(frames):
                rollout.step(torch.zeros(1, dtype=torch.long, device=world.device))
                world.decode_shown(rollout.tokens)
        try:
            self.compute.run(warm_up)
        except Exception as error:  # noqa: BLE001 (the compiler's failures are many: no C++ compiler, no Triton, ...)
            reason = first_line(error)
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

    def knob_ranges(self) -> dict[str, list]:
        """What a player may set each knob to, [low, high]: steps up to the served sampler's (the run's, or
        `genie play --steps N`), so that no player makes a frame cost more than the one who serves chose; the
        temperature up to MAX_TEMPERATURE, or the served one if higher."""
        served = self.sampler_options()
        ranges = {}
        if "steps" in served:
            ranges["steps"] = [1, served["steps"]]
        if "temperature" in served:
            ranges["temperature"] = [0.0, max(MAX_TEMPERATURE, served["temperature"])]
        return ranges

    def player_sampler(self, options: dict) -> Sampler:
        """`sampler(options)` for a player: the sampler's own checks, then the ranges of `knob_ranges()`."""
        sampler = self.sampler(options)
        for name, (low, high) in self.knob_ranges().items():
            if name in options and not low <= options[name] <= high:
                raise GenieError(f"sampler option {name} {options[name]!r} is out of range; this server allows "
                                 f"{low}..{high}" + (" (`genie play --steps N` raises it)" if name == "steps" else ""))
        return sampler


class PlaySession:
    """One player's session: the prompt, its most recent frames (at most `max_frames`: what its GIF shows and how far
    undo goes back), and the actions that led to them."""

    def __init__(self, play: PlayWorld, prompt: torch.Tensor, seed: int = 0,
                 abandoned: Callable[[], bool] | None = None, max_frames: int = MAX_FRAMES):
        """prompt [C, H, W] in [0, 1], at the world's resolution. `abandoned`: tells whether whoever asked has gone
        (then the prompt is not encoded: `Abandoned`). `max_frames`: how many of the most recent frames are kept."""
        if not isinstance(max_frames, int) or max_frames < 1:
            raise GenieError(f"max_frames {max_frames!r}: a session keeps at least 1 frame")
        self.id = secrets.token_urlsafe(12)
        self.play = play
        world = play.world
        def encode():
            tokens = world.encode_prompt(prompt[None])
            return tokens, to_uint8(world.decode(tokens)[0])[0]  # the prompt as the world sees it, after its tokenizer
        tokens, first = play.compute.run(encode, owner=NEW_SESSIONS, abandoned=abandoned)
        self.rollout = Rollout(world, tokens)
        self.prompt_frame = first  # kept apart: reset shows it however long ago it left `frames`
        self.frames: deque[np.ndarray] = deque([first], maxlen=max_frames)  # [H, W, 3] each, the last max_frames
        self.seed = seed
        self.generator = torch.Generator(world.device).manual_seed(seed)
        self.lock = threading.Lock()  # one change at a time per session
        self.last_used = time.monotonic()
        self.seconds: list[float] = []  # time per generated frame, recent ones

    @property
    def actions(self) -> list[int]:
        return self.rollout.actions[0].tolist()

    def recent_actions(self, count: int) -> list[int]:
        """The last `count` actions (a long session's whole list is long)."""
        return self.rollout.actions[0, -count:].tolist() if count > 0 else []

    @property
    def frame_count(self) -> int:
        """Frames since the prompt, the prompt included: all of them, not only the kept ones."""
        return self.rollout.frames

    def fps(self) -> float | None:
        recent = self.seconds[-10:]
        return len(recent) / sum(recent) if recent else None

    def step(self, action: int, options: dict | None = None,
             abandoned: Callable[[], bool] | None = None) -> np.ndarray:
        """Generates and returns the next frame [H, W, 3] uint8, with the sampler's knobs `options` (within
        `PlayWorld.knob_ranges()`). `abandoned`: as for the constructor."""
        if not isinstance(action, int) or isinstance(action, bool) or not 0 <= action < self.play.world.num_actions:
            shown = repr(action) if len(repr(action)) <= 40 else repr(action)[:37] + "..."
            raise GenieError(f"action {shown} is out of range; this world has actions "
                             f"0..{self.play.world.num_actions - 1}")
        sampler = self.play.player_sampler(options or {})
        world = self.play.world
        start = time.perf_counter()

        def next_frame():
            self.rollout.step(torch.tensor([action], device=world.device), self.generator, sampler)
            return to_uint8(world.decode_shown(self.rollout.tokens)[0])[0]
        self.frames.append(self.play.compute.run(next_frame, owner=self.id, abandoned=abandoned))
        self.seconds = self.seconds[-9:] + [time.perf_counter() - start]
        return self.frames[-1]

    def undo(self) -> None:
        """Takes the last frame back. The prompt stays, and so does the oldest kept frame: only the last
        `max_frames` frames are kept, so undo stops there (reset still goes back to the prompt)."""
        if len(self.frames) > 1:
            self.rollout.truncate(self.rollout.frames - 1)
            self.frames.pop()

    def reset(self) -> None:
        """Back to the prompt, with the random generator seeded again with the session's seed: the same actions
        then give the frames a new session with this seed gives."""
        self.rollout.truncate(1)
        self.frames.clear()
        self.frames.append(self.prompt_frame)
        self.generator.manual_seed(self.seed)

    def gif(self, scale: int = 4, fps: int = 8, abandoned: Callable[[], bool] | None = None) -> bytes:
        """The kept frames as a GIF. Encoded on the calling thread, never through `play.compute` (every player's
        frames wait there), from the frames as they were when asked: they are taken under the session's lock, so a
        step waits for that only. `abandoned`: asked before each frame; once true, the encoding stops (`Abandoned`)."""
        with self.lock:
            frames = list(self.frames)

        def unless_abandoned():
            for frame in frames:
                if abandoned is not None and abandoned():
                    raise Abandoned("the client went away while its GIF was encoded")
                yield frame
        buffer = io.BytesIO()
        save_gif(unless_abandoned(), buffer, scale=scale, fps=fps)
        return buffer.getvalue()

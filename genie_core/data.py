"""Game footage on disk and windows of it for training.

Format (one folder per split): `frames.npy`, every frame of every episode back to back, uint8 [N, H, W, C], read
memory-mapped so that loaders touch only the windows they need; `actions.npy`, int16 [N], the ground-truth action
taken after each frame (-1 after an episode's last frame), kept for evaluation only; `episodes.json`, each episode's
start, length and level seed. A window of T frames never crosses an episode boundary. A split is written into a
temporary folder and renamed when complete, so an interrupted build never leaves a half split behind.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genie_core.atomic import atomic_dir
from genie_core.config import DataConfig
from genie_core.errors import GenieError

FRAMES, ACTIONS, EPISODES = "frames.npy", "actions.npy", "episodes.json"


def split_levels(cfg: DataConfig) -> dict[str, range]:
    """Train and validation use disjoint level seeds, so evaluation never sees a training level."""
    return {"train": range(0, cfg.train_levels), "val": range(cfg.train_levels, cfg.train_levels + cfg.val_levels)}


def _procgen_env(game: str, mode: str, level: int):
    with contextlib.redirect_stderr(io.StringIO()):  # gym, which procgen imports, prints a notice of its age
        from procgen import ProcgenGym3Env
        from procgen.env import ENV_NAMES
    if game not in ENV_NAMES:  # procgen aborts the whole process on an unknown name: check first
        raise GenieError(f"data.game: procgen has no game '{game}'; games: {', '.join(ENV_NAMES)}")
    return ProcgenGym3Env(num=1, env_name=game, distribution_mode=mode, start_level=level, num_levels=1,
                          rand_seed=level)


def record_levels(cfg: DataConfig, levels: range, seed: int, desc: str):
    """Plays each level with a uniformly random policy (a fresh action every step, as in the paper's Appendix F).
    Yields episodes as (frames uint8 [L, H, W, C], actions int16 [L], level)."""
    rng = np.random.default_rng(seed)
    for level in tqdm(levels, desc=desc, unit="level", dynamic_ncols=True):
        env = _procgen_env(cfg.game, cfg.distribution_mode, level)
        num_actions = env.ac_space.eltype.n
        frames, actions = [], []
        for _ in range(cfg.steps_per_level):
            _, obs, first = env.observe()
            if first[0] and frames:  # the env reset itself: the episode ended
                yield _episode(frames, actions, cfg), level
                frames, actions = [], []
            frames.append(obs["rgb"][0])
            action = rng.integers(num_actions)
            actions.append(action)
            env.act(np.array([action]))
        if frames:
            yield _episode(frames, actions, cfg), level
        env.close()


def _episode(frames: list[np.ndarray], actions: list[int], cfg: DataConfig):
    video = np.stack(frames)  # [L, 64, 64, 3]
    if video.shape[1] != cfg.resolution:
        t = torch.from_numpy(video).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(cfg.resolution, cfg.resolution), mode="area")
        video = t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    acts = np.asarray(actions, dtype=np.int16)
    acts[-1] = -1  # the last action leads out of the episode
    return video, acts


def build_split(cfg: DataConfig, out: Path, split: str, seed: int) -> dict:
    """Records one split into `out` (atomically). Returns its summary."""
    levels = split_levels(cfg)[split]
    with atomic_dir(out) as tmp:
        return _record_split(cfg, tmp, levels, split, seed)


def _record_split(cfg: DataConfig, tmp: Path, levels: range, split: str, seed: int) -> dict:
    episodes, frame_chunks, action_chunks, start, dropped = [], [], [], 0, 0
    for (video, acts), level in record_levels(cfg, levels, seed, desc=f"data {split}"):
        if len(video) < cfg.min_episode_frames:
            dropped += 1
            continue
        episodes.append({"start": start, "length": len(video), "level": level})
        frame_chunks.append(video)
        action_chunks.append(acts)
        start += len(video)
    if not episodes:
        raise GenieError(f"data: no episode of {split} reached min_episode_frames={cfg.min_episode_frames}; "
                         f"raise data.steps_per_level or lower data.min_episode_frames")
    np.save(tmp / FRAMES, np.concatenate(frame_chunks))
    np.save(tmp / ACTIONS, np.concatenate(action_chunks))
    summary = {"split": split, "game": cfg.game, "levels": [levels.start, levels.stop], "frames": start,
               "episodes": len(episodes), "dropped_short_episodes": dropped, "resolution": cfg.resolution}
    (tmp / EPISODES).write_text(json.dumps({"summary": summary, "episodes": episodes}))
    return summary


class EpisodeStore:
    """A built split, memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / EPISODES
        if not index.is_file():
            raise GenieError(f"{self.path}: not a genie data split (no {EPISODES}); build it with `genie run`")
        meta = json.loads(index.read_text())
        self.summary = meta["summary"]
        self.episodes = meta["episodes"]
        self.frames = np.load(self.path / FRAMES, mmap_mode="r")
        self.actions = np.load(self.path / ACTIONS, mmap_mode="r")
        if len(self.frames) != sum(e["length"] for e in self.episodes):
            raise GenieError(f"{self.path / FRAMES}: holds {len(self.frames)} frames but {EPISODES} lists "
                             f"{sum(e['length'] for e in self.episodes)}; rebuild the split")


class WindowDataset(torch.utils.data.Dataset):
    """Every window of `length` consecutive frames inside one episode, as float video [T, C, H, W] in [0, 1]."""

    def __init__(self, store: EpisodeStore, length: int):
        self.store, self.length = store, length
        starts, counts = [], []
        for episode in store.episodes:
            n = episode["length"] - length + 1
            if n > 0:
                starts.append(episode["start"])
                counts.append(n)
        if not counts:
            raise GenieError(f"{store.path}: no episode has {length} frames; lower the recipe's seq_len")
        self.episode_starts = np.asarray(starts)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # window i lives in episode searchsorted(i)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def frame_index(self, i: int) -> int:
        """Index into frames.npy of window i's first frame."""
        episode = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return int(self.episode_starts[episode] + i - self.offsets[episode])

    def __getitem__(self, i: int) -> torch.Tensor:
        first = self.frame_index(i)
        clip = np.array(self.store.frames[first : first + self.length])  # [T, H, W, C] uint8
        return torch.from_numpy(clip).permute(0, 3, 1, 2).float().div_(255)

    def actions(self, i: int) -> torch.Tensor:
        """The ground-truth actions between window i's frames, [T - 1] (evaluation only)."""
        first = self.frame_index(i)
        return torch.from_numpy(np.asarray(self.store.actions[first : first + self.length - 1]).astype(np.int64))


def evenly_spaced(dataset: WindowDataset, count: int) -> list[int]:
    """Fixed, spread-out window indices, so every evaluation of every run looks at the same windows."""
    count = min(count, len(dataset))
    return np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()

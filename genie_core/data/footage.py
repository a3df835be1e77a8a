"""The on-disk footage format, its resumable builder, and windows of it for training.

Format: a folder with `manifest.json` and, per split, shards `SPLIT/shard-NNNNN.frames.npy` (uint8 [N, H, W, C]:
the frames of whole episodes back to back) and `.actions.npy` (int16 [N]: the ground-truth action after each
frame, -1 where there is none; evaluation only). Plain .npy files because they memory-map: a loader touches only
the windows it reads, any number of workers and processes share the page cache, and there is nothing to install or
decode. Shards bound the file size and are the unit of atomic writing.

The manifest records the source (name, package, version, config), the resolution, the units of each split (level
seeds, files), every episode (shard, offset, length, unit, facts), bad units skipped, and a sha256 per shard file.

Building is resumable: shards are written under a temporary name and renamed, then appended to `journal.jsonl`
with the units they complete. A re-run skips journalled units and redoes the rest, so an interrupted build
finishes without duplicating or losing an episode. The manifest is written last: a folder without one is unfinished.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tqdm.auto import tqdm

from genie_core.config import DataConfig, config_to_dict
from genie_core.errors import GenieError
from genie_core.interfaces import VideoSource
from genie_core.io.log import say
from genie_core.io.media import tile

MANIFEST, JOURNAL = "manifest.json", "journal.jsonl"
FORMAT = "genie-episodes/1"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingFile:
    """A write-only file that hashes what passes through it, so a shard is not read back to be checksummed."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Writes atomically (temporary name, fsync, rename); returns the file's sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        hashing = _HashingFile(file)
        np.save(hashing, array)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return hashing.digest.hexdigest()


def source_identity(source: VideoSource, name: str, owner) -> dict[str, Any]:
    return {"name": name, "package": owner.package, "version": owner.version, "config": config_to_dict(source.config)}


# --------------------------------------------------------------------------------------------------- building


class _ShardWriter:
    """Collects whole units' episodes of one split and writes them out as shards of about `shard_frames` frames.

    Shards are written by one background thread, in order, so the disk works while the source records the next
    units; a shard enters the journal only once its files are complete.
    """

    def __init__(self, root: Path, split: str, first_index: int, shard_frames: int, journal):
        self.root, self.split, self.index = root, split, first_index
        self.shard_frames, self.journal = shard_frames, journal
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.pending: list[concurrent.futures.Future] = []
        self._reset()

    def _reset(self) -> None:
        self.frames: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.episodes: list[dict] = []
        self.units: list[str] = []
        self.count = 0
        self.dropped = 0

    def add_unit(self, unit: str, episodes: list[tuple[np.ndarray, np.ndarray, dict]], dropped: int) -> None:
        self.dropped += dropped
        for frames, actions, meta in episodes:
            self.episodes.append({"split": self.split, "start": self.count, "length": len(frames), "unit": unit,
                                  "meta": meta})
            self.frames.append(frames)
            self.actions.append(actions)
            self.count += len(frames)
        self.units.append(unit)
        if self.count >= self.shard_frames:
            self.flush()

    def flush(self) -> None:
        if not self.units:
            return
        name = f"{self.split}/shard-{self.index:05d}"
        entry: dict[str, Any] = {"shard": name, "split": self.split, "frames": self.count, "units": self.units,
                                 "dropped_short_episodes": self.dropped, "episodes": self.episodes}
        self.pending.append(self.pool.submit(self._write, name, entry, self.frames, self.actions))
        self.index += 1 if self.count else 0
        self._reset()
        for future in [f for f in self.pending if f.done()]:  # surface a failed write early
            future.result()

    def _write(self, name: str, entry: dict, frames: list, actions: list) -> None:
        if entry["frames"]:
            (self.root / self.split).mkdir(exist_ok=True)
            entry["sha256"] = {
                "frames": _save_npy(self.root / f"{name}.frames.npy", np.concatenate(frames)),
                "actions": _save_npy(self.root / f"{name}.actions.npy", np.concatenate(actions)),
            }
        self.journal.write(json.dumps(entry) + "\n")
        self.journal.flush()
        os.fsync(self.journal.fileno())

    def skip(self, unit: str, bad: dict) -> None:
        """Journals a bad unit as done (and skipped), in order with the shards."""
        entry = {"split": self.split, "frames": 0, "units": [unit], "episodes": [], "skipped": [bad]}
        self.pending.append(self.pool.submit(self._write, "", entry, [], []))

    def close(self) -> None:
        """Writes what is left and waits for every shard; re-raises a failed write."""
        self.flush()
        self.pool.shutdown(wait=True)
        for future in self.pending:
            future.result()


def _as_episode(episode, spec_resolution: int, unit: str) -> tuple[np.ndarray, np.ndarray, dict]:
    frames = np.asarray(episode.frames)
    if frames.ndim != 4 or frames.shape[1:3] != (spec_resolution, spec_resolution) or frames.dtype != np.uint8:
        raise GenieError(f"source unit {unit}: episode frames are {frames.dtype} {list(frames.shape)}, expected "
                         f"uint8 [L, {spec_resolution}, {spec_resolution}, C]")
    if episode.actions is None:
        actions = np.full(len(frames), -1, dtype=np.int16)
    else:
        actions = np.asarray(episode.actions, dtype=np.int16)
    return frames, actions, dict(episode.meta)


def build_dataset(source: VideoSource, identity: dict, cfg: DataConfig, out: Path, skip_bad: bool = False,
                  log=say) -> dict:
    """Builds (or finishes building) the dataset of `source` in `out`. Returns the manifest."""
    out = Path(out)
    manifest_path = out / MANIFEST
    header = {"format": FORMAT, "source": identity, "resolution": cfg.resolution,
              "min_episode_frames": cfg.min_episode_frames}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in header} == header:
            log(f"{out}: already built ({manifest['frames']} frames); nothing to do")
            return manifest
        raise GenieError(f"{out}: holds a finished dataset of another source or settings; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    journal_path, header_path = out / JOURNAL, out / "build.json"
    if header_path.is_file() and json.loads(header_path.read_text()) != header:
        raise GenieError(f"{out}: holds an unfinished build of another source or settings; choose another folder "
                         f"or delete it")
    header_path.write_text(json.dumps(header, indent=2))
    done = [json.loads(line) for line in journal_path.read_text().splitlines()] if journal_path.is_file() else []
    finished_units = {unit for entry in done for unit in entry["units"]}
    units = source.units()
    todo = {split: [u for u in keys if u not in finished_units] for split, keys in units.items()}
    total = sum(len(v) for v in todo.values())
    if finished_units:
        log(f"{out}: resuming an interrupted build; {len(finished_units)} units done, {total} to go")
    with open(journal_path, "a") as journal, tqdm(total=total, desc="data build", unit="unit",
                                                  dynamic_ncols=True) as bar:
        for split, keys in todo.items():
            first = sum(1 for entry in done if entry["split"] == split and entry["frames"])
            writer = _ShardWriter(out, split, first, cfg.shard_frames, journal)
            try:
                for unit in keys:
                    try:
                        episodes = [_as_episode(e, cfg.resolution, unit) for e in source.record(unit)]
                    except GenieError as error:
                        if not skip_bad:
                            raise
                        bad = {"unit": unit, "error": str(error)}
                        writer.skip(unit, bad)
                        log(f"skipped bad input: {error}")
                        bar.update(1)
                        continue
                    kept = [e for e in episodes if len(e[0]) >= cfg.min_episode_frames]
                    writer.add_unit(unit, kept, dropped=len(episodes) - len(kept))
                    bar.update(1)
                    bar.set_postfix(frames=writer.count, refresh=False)
            finally:  # on an error too: the complete units already handed over are written and journalled
                writer.close()
    done = [json.loads(line) for line in journal_path.read_text().splitlines()]
    manifest = {**header, **_assemble(done, units),
                "skipped": [bad for entry in done for bad in entry.get("skipped", [])],
                "dropped_short_episodes": sum(entry.get("dropped_short_episodes", 0) for entry in done),
                "action_names": source.action_names(), "action_classes": source.action_classes()}
    if manifest["frames"] == 0:
        raise GenieError(f"{out}: the source gave no episode of at least data.min_episode_frames="
                         f"{cfg.min_episode_frames} frames")
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return manifest


def _assemble(journal: list[dict], units: dict[str, list[str]]) -> dict:
    shards, episodes = [], []
    for entry in journal:
        if not entry["frames"]:
            continue
        index = len(shards)
        shards.append({"file": entry["shard"], "split": entry["split"], "frames": entry["frames"],
                       "sha256": entry["sha256"]})
        episodes += [{**e, "shard": index} for e in entry["episodes"]]
    splits = {}
    for split, keys in units.items():
        eps = [e for e in episodes if e["split"] == split]
        splits[split] = {"units": keys, "episodes": len(eps), "frames": sum(e["length"] for e in eps)}
    return {"frames": sum(s["frames"] for s in shards), "splits": splits, "shards": shards, "episodes": episodes}


# --------------------------------------------------------------------------------------------------- reading


@attrs.define
class EpisodeIndex:
    """A built dataset, opened and checked against its manifest (no frame is read until asked for)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path, verify: bool = False) -> "EpisodeIndex":
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            hint = "an unfinished build: run `genie data build` again" if (root / JOURNAL).is_file() else \
                "build one with `genie data build` or `genie run`"
            raise GenieError(f"{root}: no {MANIFEST} ({hint})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise GenieError(f"{manifest_path}: not valid JSON ({error})") from None
        if manifest.get("format") != FORMAT:
            raise GenieError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
        index = cls(root, manifest)
        index.check(verify)
        return index

    def check(self, verify: bool) -> None:
        """Every shard exists and holds the frames the manifest says, at its resolution (and, if asked, its hash)."""
        res = self.manifest["resolution"]
        for shard in self.manifest["shards"]:
            for part in ("frames", "actions"):
                path = self.root / f"{shard['file']}.{part}.npy"
                if not path.is_file():
                    raise GenieError(f"{path}: missing; the manifest lists it")
                try:
                    array = np.load(path, mmap_mode="r")
                except ValueError as error:
                    raise GenieError(f"{path}: not a readable .npy file ({error})") from None
                expected = (shard["frames"], res, res) if part == "frames" else (shard["frames"],)
                if array.shape[: len(expected)] != expected:
                    raise GenieError(f"{path}: holds shape {list(array.shape)} but the manifest says "
                                     f"{list(expected)}{' x C' if part == 'frames' else ''}")
                if verify:
                    self._check_hash(path, shard["sha256"][part])

    def _check_hash(self, path: Path, expected: str) -> None:
        if _sha256(path) != expected:
            raise GenieError(f"{path}: sha256 differs from the manifest's; the file changed after the build (rebuild "
                             f"the footage, or restore the file)")

    def _shard_files(self):
        for shard in self.manifest["shards"]:
            for part in ("frames", "actions"):
                yield self.root / f"{shard['file']}.{part}.npy", shard["sha256"][part]

    def file_stamps(self) -> dict[str, list[int]]:
        """Size and modification time of every shard file, by path in the data set: what `verify_changed` compares."""
        return {str(path.relative_to(self.root)): [path.stat().st_size, path.stat().st_mtime_ns]
                for path, _ in self._shard_files()}

    def verify_changed(self, stamps: dict[str, list[int]]) -> None:
        """Hashes every shard file whose size or modification time differs from `stamps` (taken when the footage
        was last hashed) against the manifest: a changed shard is found without hashing the footage every time."""
        for path, expected in self._shard_files():
            if stamps.get(str(path.relative_to(self.root))) != [path.stat().st_size, path.stat().st_mtime_ns]:
                self._check_hash(path, expected)

    def episodes(self, split: str) -> list[dict]:
        if split not in self.manifest["splits"]:
            raise GenieError(f"{self.root}: no split '{split}'; splits: {', '.join(self.manifest['splits'])}")
        return [e for e in self.manifest["episodes"] if e["split"] == split]

    def shard_path(self, shard: int, part: str) -> Path:
        return self.root / f"{self.manifest['shards'][shard]['file']}.{part}.npy"

    def episode_arrays(self, split: str):
        """Each episode of the split, in order, as (frames uint8 [L, H, W, C], actions int64 [L - 1]), read whole."""
        for episode in self.episodes(split):
            start, count = episode["start"], episode["length"]
            frames = np.load(self.shard_path(episode["shard"], "frames"), mmap_mode="r")[start : start + count]
            actions = np.load(self.shard_path(episode["shard"], "actions"), mmap_mode="r")[start : start + count - 1]
            yield np.array(frames), np.array(actions, dtype=np.int64)


class WindowDataset(torch.utils.data.Dataset):
    """Every window of `length` consecutive frames inside one episode of a split, as float video [T, C, H, W] in
    [0, 1]. Shards are memory-mapped lazily in each process, so the dataset pickles cheaply into loader workers."""

    def __init__(self, index: EpisodeIndex, split: str, length: int, with_actions: bool = False):
        """with_actions: items are (video, the true actions between its frames [T - 1]) instead of video alone."""
        self.index, self.split, self.length, self.with_actions = index, split, length, with_actions
        self.episodes = [e for e in index.episodes(split) if e["length"] >= length]
        if not self.episodes:
            raise GenieError(f"{index.root}: no {split} episode has {length} frames; lower the recipe's seq_len")
        counts = [e["length"] - length + 1 for e in self.episodes]
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # window i lives in episode searchsorted(i)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, first frame in that shard) of window i."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        episode = self.episodes[k]
        return episode["shard"], episode["start"] + i - int(self.offsets[k])

    def _map(self, shard: int, part: str) -> np.ndarray:
        key = (shard, part)
        if key not in self._maps:
            self._maps[key] = np.load(self.index.shard_path(shard, part), mmap_mode="r")
        return self._maps[key]

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shard, first = self.locate(i)
        clip = np.array(self._map(shard, "frames")[first : first + self.length])  # [T, H, W, C] uint8, a copy
        video = torch.from_numpy(clip).permute(0, 3, 1, 2).float().div_(255)
        return (video, self.actions(i)) if self.with_actions else video

    def actions(self, i: int) -> torch.Tensor:
        """The ground-truth actions between window i's frames, [T - 1]; -1 where the source has none."""
        shard, first = self.locate(i)
        return torch.from_numpy(np.array(self._map(shard, "actions")[first : first + self.length - 1], dtype=np.int64))


def true_action_count(index: EpisodeIndex) -> int:
    """How many ground-truth actions the footage records (its source's action names); 0 when it has none."""
    return len(index.manifest.get("action_names") or [])


def evenly_spaced(dataset: WindowDataset, count: int) -> list[int]:
    """Fixed, spread-out window indices, so every evaluation of every run looks at the same windows."""
    count = min(count, len(dataset))
    return np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()


def overlapping(dataset: WindowDataset, indices: list[int]) -> int:
    """How many of the windows (in index order) share frames with the next one: windows that do are not
    independent, and 95% intervals over them come out narrower than they are."""
    starts = [dataset.locate(i) for i in indices]
    return sum(a[0] == b[0] and b[1] - a[1] < dataset.length for a, b in zip(starts, starts[1:]))


# --------------------------------------------------------------------------------------------------- inspecting


def length_histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) rows over the episode lengths, equal-width bins."""
    if not lengths:
        return []
    edges = np.linspace(min(lengths), max(lengths) + 1, bins + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(lo), int(hi) - 1, int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts) if hi > lo]


def contact_sheet(index: EpisodeIndex, rows: int = 6, columns: int = 8) -> torch.Tensor:
    """[C, H', W'] image: frames of evenly spaced episodes (one row each), evenly spaced in time."""
    episodes = index.manifest["episodes"]
    picked = [episodes[i] for i in np.linspace(0, len(episodes) - 1, min(rows, len(episodes))).round().astype(int)]
    lines = []
    for episode in picked:
        frames = np.load(index.shard_path(episode["shard"], "frames"), mmap_mode="r")
        at = episode["start"] + np.linspace(0, episode["length"] - 1, columns).round().astype(int)
        clip = torch.from_numpy(np.array(frames[at])).permute(0, 3, 1, 2).float() / 255  # [columns, C, H, W]
        lines.append(tile(list(clip[:, None]))[0])  # one row: [C, H, W * columns + gaps]
    gap = torch.ones(lines[0].shape[0], 2, lines[0].shape[-1])
    return torch.cat([part for line in lines for part in (line, gap)][:-1], dim=1)


def describe(index: EpisodeIndex) -> str:
    m = index.manifest
    source = m["source"]
    lines = [f"{index.root}: {m['frames']} frames of {m['resolution']}x{m['resolution']} from source "
             f"'{source['name']}' ({source['package']} {source['version']})"]
    for split, info in m["splits"].items():
        lines.append(f"  {split}: {info['episodes']} episodes, {info['frames']} frames, {len(info['units'])} units")
    for split in m["splits"]:  # what the policy scored, where the source keeps scores (Atari)
        scores = [e["meta"]["score"] for e in m["episodes"] if e["split"] == split and "score" in e.get("meta", {})]
        if scores:
            policies = sorted({str(e["meta"].get("policy")) for e in m["episodes"] if "score" in e.get("meta", {})})
            lines.append(f"  {split} score ({', '.join(policies)}): mean {sum(scores) / len(scores):.2f} over "
                         f"{len(scores)} episodes, from {min(scores):g} to {max(scores):g}")
    lengths = [e["length"] for e in m["episodes"]]
    lines.append(f"  shards: {len(m['shards'])}; dropped short episodes: {m['dropped_short_episodes']}; "
                 f"skipped bad units: {len(m['skipped'])}")
    for bad in m["skipped"]:
        lines.append(f"    skipped {bad['unit']}: {bad['error']}")
    lines.append("  episode lengths:")
    top = max((n for _, _, n in length_histogram(lengths)), default=1)
    for lo, hi, n in length_histogram(lengths):
        lines.append(f"    {lo:>7}-{hi:<7} {n:>6}  {'#' * max(1 if n else 0, round(30 * n / top))}")
    return "\n".join(lines)

"""The footage format: build -> read round trip, windows inside episodes, splits, resumable builds, bad input,
`genie data build/info`, and two processes reading disjoint windows."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import attrs
import numpy as np
import pytest
import torch

from genie_core.cli import main
from genie_core.config import DataConfig
from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, source_identity
from genie_core.errors import GenieError
from genie_core.interfaces import DataSpec, Episode, VideoSource
from genie_core.registry import Owner, get_registry

from conftest import REPO

RES = 8


def frame_ids(ids) -> np.ndarray:
    """Frames that say who they are: pixel (0, 0) holds id % 256 and id // 256 in its first two channels."""
    frames = np.zeros((len(ids), RES, RES, 3), dtype=np.uint8)
    frames[:, 0, 0, 0] = np.asarray(ids) % 256
    frames[:, 0, 0, 1] = np.asarray(ids) // 256
    return frames


def ids_of(video: torch.Tensor) -> list[int]:
    """Inverse of frame_ids for float video [..., T, C, H, W]."""
    pixel = (video[..., :2, 0, 0] * 255).round().long()
    return (pixel[..., 0] + 256 * pixel[..., 1]).flatten().tolist()


@attrs.define(frozen=True, kw_only=True)
class FakeConfig:
    lengths: str = "5,2,4"  # episode lengths of every unit
    units_per_split: int = 2
    fail_unit: str = ""  # this unit raises a GenieError, as a corrupt file would


class FakeSource(VideoSource):
    """Units u0, u1, ... ; unit k's episodes have frames numbered from 1000 * k."""

    config_class = FakeConfig
    recorded: list[str] = []

    def units(self):
        n = self.config.units_per_split
        return {"train": [f"u{i}" for i in range(n)], "val": [f"u{i}" for i in range(n, 2 * n)]}

    def record(self, unit):
        FakeSource.recorded.append(unit)
        if unit == self.config.fail_unit:
            raise GenieError(f"{unit}.mp4: cannot decode frame 3: invalid data")
        k, start = int(unit[1:]), 0
        for length in map(int, self.config.lengths.split(",")):
            ids = np.arange(1000 * k + start, 1000 * k + start + length)
            yield Episode(frames=frame_ids(ids), actions=ids % 7, meta={"unit": unit})
            start += length


def build(tmp_path, config=FakeConfig(), data=DataConfig(resolution=RES, min_episode_frames=3, shard_frames=6), **kw):
    source = FakeSource(config, DataSpec(resolution=RES))
    return build_dataset(source, source_identity(source, "fake", Owner("fake", "tests", "0")), data, tmp_path / "ds",
                         log=lambda *_: None, **kw)


def test_round_trip_gives_the_source_frames_back(tmp_path):
    manifest = build(tmp_path)
    index = EpisodeIndex.open(tmp_path / "ds", verify=True)
    ds = WindowDataset(index, "train", 3)
    # episodes of 5 and 4 frames per unit (the 2-frame one is dropped): 3 + 2 windows per unit, 2 train units
    assert len(ds) == 2 * (3 + 2)
    windows = [ids_of(ds[i]) for i in range(len(ds))]
    assert windows[:5] == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [7, 8, 9], [8, 9, 10]]
    assert windows[5] == [1000, 1001, 1002]
    assert torch.equal(ds.actions(0), torch.tensor([0, 1]))  # the T - 1 actions between the 3 frames
    assert manifest["dropped_short_episodes"] == 4 and len(manifest["shards"]) >= 2  # shards of ~6 frames
    assert manifest["splits"]["train"]["units"] == ["u0", "u1"] and manifest["splits"]["val"]["units"] == ["u2", "u3"]


def test_windows_never_cross_an_episode_and_splits_are_disjoint(tmp_path):
    build(tmp_path)
    index = EpisodeIndex.open(tmp_path / "ds")
    seen = {}
    for split in ("train", "val"):
        ds = WindowDataset(index, split, 4)
        seen[split] = set()
        for i in range(len(ds)):
            ids = ids_of(ds[i])
            assert ids == list(range(ids[0], ids[0] + 4)), "consecutive frames of one episode"
            seen[split] |= set(ids)
    assert seen["train"].isdisjoint(seen["val"])
    with pytest.raises(GenieError, match="no train episode has 6 frames"):
        WindowDataset(index, "train", 6)


def test_interrupted_build_resumes_without_duplicates_or_losses(tmp_path):
    whole = build(tmp_path / "a")

    class Interrupt(Exception):
        pass

    class Flaky(FakeSource):
        calls = 0

        def record(self, unit):
            Flaky.calls += 1
            if Flaky.calls == 3:  # killed while recording the third unit
                raise Interrupt
            return super().record(unit)

    source = Flaky(FakeConfig(), DataSpec(resolution=RES))
    identity = source_identity(source, "fake", Owner("fake", "tests", "0"))
    data = DataConfig(resolution=RES, min_episode_frames=3, shard_frames=6)
    with pytest.raises(Interrupt):
        build_dataset(source, identity, data, tmp_path / "b" / "ds", log=lambda *_: None)
    assert not (tmp_path / "b" / "ds" / "manifest.json").exists()
    with pytest.raises(GenieError, match="an unfinished build"):
        EpisodeIndex.open(tmp_path / "b" / "ds")
    FakeSource.recorded = []
    resumed = build_dataset(source, identity, data, tmp_path / "b" / "ds", log=lambda *_: None)
    assert "u0" not in FakeSource.recorded and "u1" not in FakeSource.recorded  # journalled units are not redone
    key = lambda m: [(e["split"], e["unit"], e["length"], e["meta"]) for e in m["episodes"]]  # noqa: E731
    assert key(resumed) == key(whole)
    a = WindowDataset(EpisodeIndex.open(tmp_path / "a" / "ds"), "val", 3)
    b = WindowDataset(EpisodeIndex.open(tmp_path / "b" / "ds", verify=True), "val", 3)
    assert [ids_of(a[i]) for i in range(len(a))] == [ids_of(b[i]) for i in range(len(b))]


def test_finished_build_is_not_redone_and_other_settings_are_refused(tmp_path):
    build(tmp_path)
    FakeSource.recorded = []
    build(tmp_path)
    assert FakeSource.recorded == []
    with pytest.raises(GenieError, match="holds a finished dataset of another source or settings"):
        build(tmp_path, config=FakeConfig(lengths="9"))


def test_bad_unit_stops_the_build_or_is_skipped_and_recorded(tmp_path):
    with pytest.raises(GenieError, match="u1.mp4: cannot decode frame 3"):
        build(tmp_path / "strict", config=FakeConfig(fail_unit="u1"))
    manifest = build(tmp_path / "skip", config=FakeConfig(fail_unit="u1"), skip_bad=True)
    assert manifest["skipped"] == [{"unit": "u1", "error": "u1.mp4: cannot decode frame 3: invalid data"}]
    assert {e["unit"] for e in manifest["episodes"]} == {"u0", "u2", "u3"}


def test_damaged_data_sets_are_clear_errors(tmp_path):
    build(tmp_path)
    root = tmp_path / "ds"
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / f"{manifest['shards'][0]['file']}.frames.npy"
    original = np.load(shard)
    np.save(shard, original[:-1])  # a shard that no longer matches the manifest
    with pytest.raises(GenieError, match=r"shard-00000.frames.npy: holds shape \[\d+, 8, 8, 3\] but the manifest says"):
        EpisodeIndex.open(root)
    original[0, 0, 0, 0] ^= 1
    np.save(shard, original)  # right shape, changed content: only --verify notices
    EpisodeIndex.open(root)
    with pytest.raises(GenieError, match="sha256 differs from the manifest's"):
        EpisodeIndex.open(root, verify=True)
    shard.unlink()
    with pytest.raises(GenieError, match="shard-00000.frames.npy: missing; the manifest lists it"):
        EpisodeIndex.open(root)
    (root / "manifest.json").unlink()
    (root / "journal.jsonl").unlink()
    with pytest.raises(GenieError, match="no manifest.json"):
        EpisodeIndex.open(root)


def test_procgen_source_records_disjoint_levels_with_parallel_envs():
    info = get_registry().get("source", "procgen")
    source = info.cls(info.cls.tiny_config(), DataSpec(resolution=32))
    units = source.units()
    assert units == {"train": ["level-0", "level-1"], "val": ["level-2"]}
    episodes = list(source.record("level-2"))
    assert sum(len(e.frames) for e in episodes) == 24  # steps_per_level, over num_envs=2 environments
    assert {e.meta["env"] for e in episodes} == {0, 1} and all(e.meta["level"] == 2 for e in episodes)
    assert episodes[0].frames.shape[1:] == (32, 32, 3) and episodes[0].frames.dtype == np.uint8
    assert all(e.actions[-1] == -1 and 0 <= e.actions[:-1].min() and e.actions[:-1].max() < 15 for e in episodes)
    again = list(source.record("level-2"))
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(episodes, again)), "deterministic per level"


def test_procgen_policy_can_hold_its_actions():
    """action_repeat=k: each random action is held for k steps, in every environment, from the episode's start
    (1, the paper's policy, draws a fresh action every step, exactly as it always did)."""
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), steps_per_level=40, num_envs=1, action_repeat=4)
    held = list(info.cls(config, DataSpec(resolution=32)).record("level-0"))
    start, changes = 0, []
    for episode in held:  # one environment: its episodes in step order
        known = episode.actions[:-1]  # the last one leads out of the episode (-1)
        changes += [start + j for j in range(1, len(known)) if known[j] != known[j - 1]]
        start += len(episode.frames)
    assert changes and all(step % 4 == 0 for step in changes), changes
    fresh = info.cls(attrs.evolve(config, action_repeat=1), DataSpec(resolution=32))
    rng = np.random.default_rng(0)  # level 0's generator: the paper's policy is unchanged
    assert np.array_equal(next(iter(fresh.record("level-0"))).actions[:5], rng.integers(15, size=(40, 1))[:5, 0])
    assert source_classes_cover_every_action(fresh)
    # drawn by class: every class of actions comes up about as often, NOOP no longer 8 times in 15
    by_class = info.cls(attrs.evolve(config, steps_per_level=240, action_choice="classes"), DataSpec(resolution=32))
    drawn = np.concatenate([e.actions[:-1] for e in by_class.record("level-0")])
    classes = np.array(by_class.action_classes())[drawn]
    shares = {name: (classes == name).mean() for name in set(by_class.action_classes())}
    assert all(share > 0 for share in shares.values()) and shares["NOOP"] < 0.35, shares


def test_procgen_policy_can_hold_idling_for_less():
    """idle_repeat: the class that does nothing is held for its own number of steps, moves for action_repeat; the
    footage without it is what it always was. It needs classes (only then is the idle class known)."""
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), steps_per_level=400, num_envs=2, action_choice="classes",
                          action_repeat=8)
    source = info.cls(attrs.evolve(config, idle_repeat=2), DataSpec(resolution=32))
    actions = source.policy_actions(np.random.default_rng(0), 400, 2, 15)
    classes = np.array(source.action_classes())
    for env in range(2):
        runs, start = [], 0  # (class, length) of each hold; a class drawn twice in a row makes one longer run
        names = classes[actions[:, env]]
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start] or actions[i, env] != actions[start, env]:
                runs.append((names[start], i - start, i == len(names)))
                start = i
        idle = [n for name, n, last in runs if name == "NOOP" and not last]
        moves = [n for name, n, last in runs if name != "NOOP" and not last]
        assert idle and moves and all(n % 2 == 0 for n in idle) and all(n % 8 == 0 for n in moves), runs
        assert min(idle) == 2 and min(moves) == 8
    plain = info.cls(config, DataSpec(resolution=32))
    rng = np.random.default_rng(0)
    again = plain.policy_actions(np.random.default_rng(0), 400, 2, 15)
    assert np.array_equal(again, plain.policy_actions(rng, 400, 2, 15))
    assert all(n % 8 == 0 for n in np.diff(np.flatnonzero(np.diff(again[:, 0]) != 0)))
    problem, = info.cls.check_recipe(attrs.evolve(config, action_choice="buttons", idle_repeat=2), DataConfig(), None)
    assert "'idle_repeat' needs action_choice 'classes'" in problem and "'buttons'" in problem


def test_procgen_policy_gives_up_a_move_that_leaves_the_frame_still():
    """unstick_after=k: the class policy's holds, except that once the frame has not changed for k steps the hold is
    cut and the next one drawn; with no still frames it is the policy without the option. It needs classes."""
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), steps_per_level=60, num_envs=1, action_choice="classes",
                          action_repeat=8, idle_repeat=1, unstick_after=2)
    source = info.cls(config, DataSpec(resolution=32))
    plain = source.policy_actions(np.random.default_rng(0), 60, 1, 15)[:, 0]
    choose = source._unsticking_policy(np.random.default_rng(0), 1)
    assert [int(choose(np.array([False]))[0]) for _ in range(60)] == plain.tolist()

    holds = list(itertools.islice(source._holds(np.random.default_rng(0)), 30))
    starts = np.cumsum([0] + [n for _, n in holds])
    move = next(j for j, (_, n) in enumerate(holds) if n == 8 and starts[j] >= 4)  # a move held 8 steps
    cut = int(starts[move]) + 2  # its frame unchanged at its 2nd and 3rd steps: given up at the 3rd
    choose = source._unsticking_policy(np.random.default_rng(0), 1)
    got = [int(choose(np.array([cut - 1 <= step <= cut]))[0]) for step in range(60)]
    assert got[:cut] == plain[:cut].tolist()
    combination, length = holds[move + 1]  # the next draw starts at once, and is held its own length
    assert got[cut : cut + length] == [combination] * length
    assert got != plain.tolist()  # (so this case tells the two policies apart)

    episodes = list(source.record("level-0"))  # in the game: deterministic, actions in range
    again = list(source.record("level-0"))
    assert all(np.array_equal(a.actions, b.actions) for a, b in zip(episodes, again))
    assert all(0 <= e.actions[:-1].min() and e.actions[:-1].max() < 15 for e in episodes)
    problem, = info.cls.check_recipe(attrs.evolve(config, action_choice="buttons", idle_repeat=None), DataConfig(),
                                     None)
    assert "'unstick_after' needs action_choice 'classes'" in problem


def test_procgen_rendering_options_reach_the_game():
    """backgrounds=false, restrict_themes=true: the same level and actions drawn over black, one look for every
    level. The agent and the level are the same; only what is drawn behind them changes."""
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), steps_per_level=8, num_envs=1)
    plain_config = attrs.evolve(config, backgrounds=False, restrict_themes=True)
    drawn, plain = (next(iter(info.cls(c, DataSpec(resolution=64)).record("level-0"))) for c in (config, plain_config))
    assert np.array_equal(drawn.actions, plain.actions)
    black = (plain.frames == 0).all(-1).mean()
    assert black > 0.15 and (drawn.frames == 0).all(-1).mean() < 0.01, black  # a black sky instead of a picture
    again = next(iter(info.cls(plain_config, DataSpec(resolution=64)).record("level-0")))
    assert np.array_equal(plain.frames, again.frames)


def test_procgen_classes_follow_the_game():
    """Which buttons do the same depends on the game: a platformer's jump, a fish's eight directions. A game whose
    classes are not known has none, and drawing by class there is refused with the games that have them."""
    info = get_registry().get("source", "procgen")
    config = attrs.evolve(info.cls.tiny_config(), steps_per_level=120, num_envs=1, action_choice="classes")
    assert info.cls(attrs.evolve(config, game="jumper"), DataSpec(resolution=32)).action_classes()[:3] == [
        "LEFT", "LEFT", "LEFT+JUMP"]
    fish = info.cls(attrs.evolve(config, game="bigfish"), DataSpec(resolution=32))
    assert set(fish.action_classes()) == {"LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN",
                                          "RIGHT", "RIGHT+UP"}
    drawn = np.concatenate([e.actions[:-1] for e in fish.record("level-0")])
    assert set(np.array(fish.action_classes())[drawn]) == set(fish.action_classes())  # every direction, and none
    maze = attrs.evolve(config, game="maze")
    assert info.cls(maze, DataSpec(resolution=32)).action_classes() is None
    problem, = info.cls.check_recipe(maze, DataConfig(), None)
    assert "'action_choice' 'classes'" in problem and "coinrun, jumper, bigfish" in problem and "'buttons'" in problem


def source_classes_cover_every_action(source) -> bool:
    return len(source.action_classes()) == len(source.action_names()) == 15 and set(source.action_classes()) == {
        "LEFT", "LEFT+JUMP", "NOOP", "JUMP", "RIGHT", "RIGHT+JUMP"}


def test_cli_data_build_and_info(tmp_path, capsys):
    out = tmp_path / "bigfish"
    args = ["data", "build", "procgen", "game=bigfish", "train_levels=2", "val_levels=1", "steps_per_level=12",
            "num_envs=2", "data.min_episode_frames=4", "--out", str(out)]
    assert main(args) == 0
    assert main(["data", "info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "36 frames of 64x64 from source 'procgen'" in text and "train: 4 episodes, 24 frames, 2 units" in text
    assert "episode lengths:" in text and (out / "contact_sheet.png").is_file()
    assert main(["data", "build", "procgen", "game=nope", "--out", str(tmp_path / "x")]) == 2
    assert "'game' 'nope' is not a procgen game; games: bigfish" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


TWO_RANKS = """
import json, sys
import torch
from accelerate import Accelerator
from genie_core.data.footage import EpisodeIndex, WindowDataset
sys.path.insert(0, {tests!r})
from test_data import ids_of

accelerator = Accelerator(cpu=True)
ds = WindowDataset(EpisodeIndex.open({root!r}), "train", 3)
loader = accelerator.prepare(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True,
                                                         generator=torch.Generator().manual_seed(0)))
firsts = [ids_of(video[:, :1]) for video in loader]
with open({out!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
    json.dump({{"world": accelerator.num_processes, "firsts": sum(firsts, [])}}, f)
accelerator.end_training()  # close the process group before exit: gloo threads alive at exit can abort a rank
"""


def test_two_processes_read_disjoint_windows(tmp_path):
    build(tmp_path, config=FakeConfig(lengths="12,10", units_per_split=2))  # 36 windows: 9 steps of 2 x 2
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS.format(tests=str(REPO / "tests"), root=str(tmp_path / "ds"),
                                                       out=str(tmp_path))))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun, str(script)], capture_output=True, text=True, timeout=240, env=env)
    inherited = {k: v for k, v in env.items() if k.startswith(("ACCELERATE", "RANK", "WORLD", "MASTER", "LOCAL"))}
    assert result.returncode == 0, (inherited, result.stderr[-3000:])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    a, b = set(ranks[0]["firsts"]), set(ranks[1]["firsts"])
    assert a and b and a.isdisjoint(b), (sorted(a), sorted(b), result.stderr[-2000:])
    total = len(WindowDataset(EpisodeIndex.open(tmp_path / "ds"), "train", 3))
    assert len(a | b) == total  # together they read every window once (the epoch divides evenly here)


def test_a_run_uses_a_data_set_built_before_and_checks_its_resolution(tmp_path, capsys):
    smoke = str(REPO / "recipes" / "coinrun-smoke.toml")
    data = tmp_path / "coinrun"
    assert main(["data", "build", smoke, "--out", str(data)]) == 0
    assert main(["run", smoke, f"data.path={str(data)!r}", "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "data" / "stage.json").read_text())
    assert record["summary"]["root"] == str(data) and not (tmp_path / "run" / "data" / "manifest.json").exists()
    assert "note: data.path" not in capsys.readouterr().out  # the footage is what the recipe's [source] describes
    # a [source] table that does not describe the footage is said to be unused (the footage is used as it is)
    assert main(["run", smoke, f"data.path={str(data)!r}", "source.game=jumper", "--out", str(tmp_path / "r1")]) == 0
    assert f"note: data.path {data} was built by source 'procgen' with {{'game': 'coinrun'" in capsys.readouterr().out
    assert main(["run", smoke, f"data.path={str(data)!r}", "data.resolution=32", "--out", str(tmp_path / "r2")]) == 2
    assert "frames are 64 pixels square, the recipe's data.resolution is 32" in capsys.readouterr().err

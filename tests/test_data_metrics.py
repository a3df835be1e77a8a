"""Game footage on disk, windows that never cross an episode, the paper's metrics, and the learning-rate schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genie_core.config import DataConfig, TrainConfig
from genie_core.data import EpisodeStore, WindowDataset, build_split, split_levels
from genie_core.errors import GenieError
from genie_core.metrics import PSNR_CAP_DB, delta_psnr, mean_and_ci, psnr
from genie_core.training import lr_lambda


@pytest.fixture(scope="module")
def coinrun(tmp_path_factory):
    cfg = DataConfig(train_levels=2, val_levels=1, steps_per_level=30, min_episode_frames=4)
    root = tmp_path_factory.mktemp("data")
    summaries = {split: build_split(cfg, root / split, split, seed=0) for split in ("train", "val")}
    return cfg, root, summaries


def test_build_records_levels_atomically(coinrun):
    cfg, root, summaries = coinrun
    store = EpisodeStore(root / "train")
    assert store.frames.shape == (summaries["train"]["frames"], 64, 64, 3) and store.frames.dtype == np.uint8
    assert {e["level"] for e in store.episodes} == {0, 1}
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]  # no temporary folder left
    # ground-truth actions: one per frame, -1 where an episode ends, procgen's 15 actions otherwise
    last = [e["start"] + e["length"] - 1 for e in store.episodes]
    assert (store.actions[last] == -1).all()
    assert 0 <= np.delete(store.actions, last).min() and np.delete(store.actions, last).max() < 15


def test_splits_use_disjoint_levels(coinrun):
    cfg, root, _ = coinrun
    levels = split_levels(cfg)
    assert set(levels["train"]).isdisjoint(levels["val"])
    train = {e["level"] for e in EpisodeStore(root / "train").episodes}
    val = {e["level"] for e in EpisodeStore(root / "val").episodes}
    assert train.isdisjoint(val) and val == {2}


def test_windows_never_cross_an_episode():
    # a hand-made store: episodes of 5, 2 (too short for T=3) and 4 frames, each frame filled with its episode id
    class Store:
        episodes = [{"start": 0, "length": 5}, {"start": 5, "length": 2}, {"start": 7, "length": 4}]
        frames = np.concatenate([np.full((5, 2, 2, 3), 0), np.full((2, 2, 2, 3), 1), np.full((4, 2, 2, 3), 2)]).astype(np.uint8)
        actions = np.zeros(11, dtype=np.int16)
        path = "hand-made"

    ds = WindowDataset(Store(), 3)
    assert len(ds) == (5 - 2) + (4 - 2)
    firsts = [ds.frame_index(i) for i in range(len(ds))]
    assert firsts == [0, 1, 2, 7, 8]
    for i in range(len(ds)):
        assert len(torch.unique(ds[i])) == 1  # every frame of a window comes from the same episode
    with pytest.raises(GenieError, match="no episode has 6 frames"):
        WindowDataset(Store(), 6)


def test_store_rejects_mismatched_index(coinrun, tmp_path):
    _, root, _ = coinrun
    meta = json.loads((root / "val" / "episodes.json").read_text())
    meta["episodes"][0]["length"] += 1
    broken = tmp_path / "val"
    broken.mkdir()
    for name in ("frames.npy", "actions.npy"):
        (broken / name).write_bytes((root / "val" / name).read_bytes())
    (broken / "episodes.json").write_text(json.dumps(meta))
    with pytest.raises(GenieError, match="frames.npy: holds"):
        EpisodeStore(broken)
    with pytest.raises(GenieError, match="not a genie data split"):
        EpisodeStore(tmp_path / "nowhere")


def test_unknown_game_is_a_clear_error(tmp_path):
    with pytest.raises(GenieError, match="data.game: procgen has no game 'nosuchgame'; games: bigfish, .*coinrun"):
        build_split(DataConfig(game="nosuchgame", train_levels=1, val_levels=1, steps_per_level=2), tmp_path / "t", "train", 0)
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.tmp").exists()


# ------------------------------------------------------------------------------------------------ metrics


def test_psnr_known_values():
    x = torch.full((2, 3, 3, 8, 8), 0.5)
    assert torch.all(psnr(x, x) == PSNR_CAP_DB)  # identical frames: capped, not infinite
    y = x + 0.1  # mse 0.01 -> 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2, 3), 20.0), atol=1e-4)


def test_delta_psnr_is_zero_when_actions_are_ignored_and_positive_when_they_steer():
    target = torch.rand(4, 3, 8, 8)
    same = target + 0.05
    assert torch.allclose(delta_psnr(target, same, same), torch.zeros(4))
    assert torch.all(delta_psnr(target, target + 0.01, target + 0.2) > 0)


def test_mean_and_ci():
    stats = mean_and_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert stats["mean"] == 2.5 and stats["n"] == 4
    assert stats["ci95"] == pytest.approx(1.96 * torch.tensor([1.0, 2, 3, 4]).std().item() / 2)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    constant = lr_lambda(TrainConfig(steps=100, lr=3e-4, min_lr=3e-4, warmup_steps=10))  # the paper's tokenizer
    assert constant(50) == pytest.approx(1.0)

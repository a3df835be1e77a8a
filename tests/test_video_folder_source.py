"""The video-folder source on tiny videos made here: every format, the split, frame-rate conversion, cutting,
bad input, read-only access, and a whole build read back through the dataset classes."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
from PIL import Image  # noqa: E402

from genie_core.config import DataConfig  # noqa: E402
from genie_core.data.footage import EpisodeIndex, WindowDataset, build_dataset, source_identity  # noqa: E402
from genie_core.errors import GenieError  # noqa: E402
from genie_core.interfaces import DataSpec  # noqa: E402
from genie_core.registry import Owner  # noqa: E402
from genie_plugins.video_folder_source import VideoFolderConfig, VideoFolderSource, split_of  # noqa: E402

SPEC = DataSpec(resolution=32)
N_VIDEO, N_GIF, N_SEQ = 30, 10, 12  # frames in the test videos
GIF_MS = [100] * 5 + [200] * 5  # the GIF's frame delays: 1.5 s in all


def level(i: int) -> int:
    """The grey level of source frame i: flat frames, so lossy codecs keep it to within a step or two."""
    return 20 + 6 * i


def indices(frames: np.ndarray) -> list[int]:
    """Which source frame each decoded frame shows, from its mean grey level."""
    return [int(round((float(f.mean()) - 20) / 6)) for f in frames]


def grey(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), level(i), dtype=np.uint8)


def write_video(path: Path, codec: str, frames, fps: int = 30, options=None, gop: int | None = None,
                rotation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = list(frames)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000  # plenty for tiny flat frames: every grey step survives
        if gop is not None:
            stream.gop_size = gop
        if rotation is not None:
            if not hasattr(stream, "set_display_rotation"):
                pytest.skip("this PyAV cannot write a display rotation")
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_gif(path: Path) -> None:
    images = [Image.fromarray(grey(i)) for i in range(N_GIF)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_MS, loop=0)


def write_sequence(folder: Path, frames) -> None:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):  # unpadded names: frame_10 must come after frame_9
        Image.fromarray(frame).save(folder / f"frame_{i}.png")


def make_folder(root: Path) -> Path:
    mp4 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    write_video(root / "good.mp4", mp4, (grey(i) for i in range(N_VIDEO)))
    if "libvpx" in av.codecs_available:
        write_video(root / "clip.webm", "libvpx", (grey(i) for i in range(N_VIDEO)))
    write_gif(root / "anim.gif")
    write_sequence(root / "seq", (grey(i) for i in range(N_SEQ)))
    write_video(root / "nested" / "deep.mp4", "mpeg4", (grey(i) for i in range(N_VIDEO)))
    (root / "notes.txt").write_text("not a video")
    (root / ".hidden.mp4").write_bytes(b"not a video either, and hidden")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("videos"))


def source(path: Path, **options) -> VideoFolderSource:
    options.setdefault("fps", 0)
    return VideoFolderSource(VideoFolderConfig(path=str(path), **options), SPEC)


def one_episode(src: VideoFolderSource, unit: str) -> np.ndarray:
    episodes = list(src.record(unit))
    assert len(episodes) == 1
    return episodes[0].frames


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_units(folder: Path) -> set[str]:
    units = {"file:good.mp4", "file:anim.gif", "images:seq", "file:nested/deep.mp4"}
    return units | ({"file:clip.webm"} if (folder / "clip.webm").exists() else set())


# --------------------------------------------------------------------------------------------------- units


def test_units_are_sorted_disjoint_and_stable(folder, tmp_path):
    units = source(folder, val_fraction=0.5).units()
    assert set(units) == {"train", "val"}
    assert set(units["train"]).isdisjoint(units["val"])
    assert set(units["train"]) | set(units["val"]) == expected_units(folder)  # no text file, no hidden file
    assert all(keys == sorted(keys) for keys in units.values())
    assert source(folder, val_fraction=0.5).units() == units
    # the split is a hash of the relative path, pinned so a dataset keeps its split across versions
    assert units["val"] == sorted({"file:clip.webm", "file:nested/deep.mp4", "images:seq"} & expected_units(folder))
    assert [split_of(r, 0.5) for r in ("good.mp4", "seq", "a/b/c.mkv")] == ["train", "val", "train"]
    # whatever else is in the folder, and whatever order it was made in
    other = tmp_path / "other"
    other.mkdir()
    for name in reversed(["good.mp4", "anim.gif"]):
        shutil.copy(folder / name, other / name)
    shutil.copy(folder / "good.mp4", other / "zzz.mp4")
    again = source(other, val_fraction=0.5).units()
    assert ("file:good.mp4" in again["train"]) == ("file:good.mp4" in units["train"])
    assert ("file:anim.gif" in again["train"]) == ("file:anim.gif" in units["train"])
    assert source(folder, val_fraction=0.0).units()["val"] == []
    assert source(folder, val_fraction=1.0).units()["train"] == []
    small, large = source(folder, val_fraction=0.3).units()["val"], source(folder, val_fraction=0.9).units()["val"]
    assert set(small) <= set(large)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(GenieError, match="nowhere"):
        source(tmp_path / "nowhere").units()
    with pytest.raises(GenieError, match="path"):
        VideoFolderSource(VideoFolderConfig(), SPEC).units()
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenieError, match="no video"):
        source(tmp_path / "empty").units()


def test_check_recipe(folder, tmp_path):
    data = DataConfig(resolution=32, min_episode_frames=4)

    def check(**options):
        return VideoFolderSource.check_recipe(VideoFolderConfig(**options), data=data, train={})

    assert check(path=str(folder), val_fraction=0.5) == []
    assert "empty" in check()[0]
    assert "not found" in check(path=str(tmp_path / "nowhere"))[0]
    (tmp_path / "empty").mkdir()
    assert "no video" in check(path=str(tmp_path / "empty"))[0]
    assert any("val split" in p for p in check(path=str(folder), val_fraction=0.0))
    assert any("min_episode_frames" in p for p in check(path=str(folder), val_fraction=0.5, max_frames_per_episode=2))


def test_config_validators():
    for bad in ({"fps": -1}, {"val_fraction": 1.5}, {"max_frames_per_episode": -2}, {"crop": "left"}):
        with pytest.raises((ValueError, TypeError)):
            VideoFolderConfig(path="x", **bad)
    assert VideoFolderSource.tiny_config().max_frames_per_episode > 0


# --------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("unit, count", [("file:good.mp4", N_VIDEO), ("file:clip.webm", N_VIDEO),
                                         ("file:nested/deep.mp4", N_VIDEO), ("file:anim.gif", N_GIF),
                                         ("images:seq", N_SEQ)])
def test_each_format_decodes_every_frame_in_order(folder, unit, count):
    if not (folder / unit.partition(":")[2]).exists():
        pytest.skip("this PyAV has no libvpx encoder")
    src = source(folder)
    (episode,) = src.record(unit)
    assert episode.frames.shape == (count, 32, 32, 3) and episode.frames.dtype == np.uint8
    assert episode.actions is None
    assert indices(episode.frames) == list(range(count))
    assert episode.meta["file"] == unit.partition(":")[2] and episode.meta["part"] == 0
    expected_fps = {"file:anim.gif": round(N_GIF / 1.5, 3), "images:seq": None}.get(unit, 30.0)
    assert episode.meta["source_fps"] == expected_fps


@pytest.mark.parametrize("unit", ["file:good.mp4", "file:clip.webm"])
def test_half_the_frame_rate_keeps_every_other_frame(folder, unit):
    if not (folder / unit.partition(":")[2]).exists():
        pytest.skip("this PyAV has no libvpx encoder")
    assert indices(one_episode(source(folder, fps=30), unit)) == list(range(N_VIDEO))
    assert indices(one_episode(source(folder, fps=15), unit)) == list(range(0, N_VIDEO, 2))
    assert indices(one_episode(source(folder, fps=60), unit)) == [i // 2 for i in range(2 * N_VIDEO)]


def test_gif_frame_rate_follows_its_frame_delays(folder):
    # 5 frames of 100 ms then 5 of 200 ms, sampled every 100 ms: the slow frames show twice
    slow = [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    assert indices(one_episode(source(folder, fps=10), "file:anim.gif")) == [0, 1, 2, 3, 4] + slow
    assert indices(one_episode(source(folder, fps=5), "file:anim.gif")) == [0, 2, 4, 5, 6, 7, 8, 9]


def test_image_sequence_counts_as_already_at_the_target_rate(folder):
    episode = next(iter(source(folder, fps=7).record("images:seq")))
    assert indices(episode.frames) == list(range(N_SEQ)) and episode.meta["source_fps"] == 7.0


def test_long_videos_are_cut_into_parts(folder):
    whole = one_episode(source(folder), "file:good.mp4")
    parts = list(source(folder, max_frames_per_episode=8).record("file:good.mp4"))
    assert [len(p.frames) for p in parts] == [8, 8, 8, 6]
    assert [p.meta["part"] for p in parts] == [0, 1, 2, 3]
    assert all(p.meta["file"] == "good.mp4" for p in parts)
    np.testing.assert_array_equal(np.concatenate([p.frames for p in parts]), whole)


def test_center_crop_drops_the_sides_and_none_squashes(tmp_path):
    frame = np.full((48, 64, 3), 128, dtype=np.uint8)
    frame[:, :8] = (255, 0, 0)  # red and blue bands outside the centred 48x48 square
    frame[:, -8:] = (0, 0, 255)
    write_sequence(tmp_path / "bands", [frame, frame])
    cropped = one_episode(source(tmp_path, crop="center"), "images:bands")
    squashed = one_episode(source(tmp_path, crop="none"), "images:bands")
    assert (cropped == 128).all()
    assert squashed[0, :, 0, 0].min() > 200 and squashed[0, :, -1, 2].min() > 200  # the bands, squeezed in


def test_rotated_video_is_turned_upright(tmp_path):
    frame = np.zeros((32, 64, 3), dtype=np.uint8)
    frame[:, :16] = 255  # a white band on the left; a quarter turn counter-clockwise puts it at the bottom
    write_video(tmp_path / "phone.mp4", "mpeg4", [frame] * 3, rotation=90)
    upright = one_episode(source(tmp_path, crop="none"), "file:phone.mp4")[0].mean(axis=(1, 2))
    assert upright[-4:].min() > 200 and upright[:16].max() < 50


# --------------------------------------------------------------------------------------------------- bad input


def cut_in_half(path: Path, to: Path) -> Path:
    data = path.read_bytes()
    to.write_bytes(data[: len(data) // 2])
    return to


def test_truncated_and_garbage_files_raise_naming_the_file(folder, tmp_path):
    cut_in_half(folder / "good.mp4", tmp_path / "cut.mp4")  # moov atom at the end: it no longer opens
    (tmp_path / "garbage.mkv").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.avi").write_bytes(b"")
    src = source(tmp_path)
    for name in ("cut.mp4", "garbage.mkv", "empty.avi"):
        with pytest.raises(GenieError, match=re.escape(name)):
            list(src.record(f"file:{name}"))


def test_failing_part_way_names_the_frame(folder, tmp_path):
    # index at the front (faststart), every frame a key frame: the first half of the file still decodes
    noise = np.random.default_rng(0).integers(0, 256, (N_VIDEO, 64, 64, 3), dtype=np.uint8)
    full = write_video(tmp_path / "full" / "noise.mp4", "mpeg4", noise, gop=1, options={"movflags": "faststart"})
    cut_in_half(full, tmp_path / "noise.mp4")
    cut_in_half(folder / "anim.gif", tmp_path / "anim.gif")
    units = ["file:noise.mp4", "file:anim.gif"]
    if (folder / "clip.webm").exists():
        cut_in_half(folder / "clip.webm", tmp_path / "clip.webm")
        units.append("file:clip.webm")
    src = source(tmp_path)
    for unit in units:
        with pytest.raises(GenieError) as caught:
            list(src.record(unit))
        message = str(caught.value)
        assert unit.partition(":")[2] in message
        frame = re.search(r"cannot decode frame (\d+)", message)
        assert frame and 0 < int(frame.group(1)) < N_VIDEO, message


def test_broken_image_in_a_sequence_names_the_frame(folder, tmp_path):
    shutil.copytree(folder / "seq", tmp_path / "seq")
    cut_in_half(tmp_path / "seq" / "frame_3.png", tmp_path / "seq" / "frame_3.png")
    with pytest.raises(GenieError, match=r"seq.*frame 3 \(frame_3\.png\)"):
        list(source(tmp_path).record("images:seq"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own note on opening the header
def test_a_frame_too_large_is_refused_before_it_is_decoded(folder, tmp_path):
    """An image sequence whose frame claims 12000 x 12000 pixels: refused from its header, never decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    shutil.copytree(folder / "seq", tmp_path / "seq")
    header = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)  # RGB, 8 bits: 432 MB once decoded
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "seq" / "frame_2.png").write_bytes(bomb)
    with pytest.raises(GenieError, match=r"seq: frame 2 \(frame_2\.png\) is 12000x12000 pixels, more than the "
                                         r"50,000,000 a frame may have"):
        list(source(tmp_path).record("images:seq"))


def test_video_without_frames_raises(tmp_path):
    with av.open(str(tmp_path / "none.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height = 64, 48
        if not hasattr(container, "start_encoding"):
            pytest.skip("this PyAV cannot write a file without frames")
        container.start_encoding()
    with pytest.raises(GenieError, match="none.mp4"):
        list(source(tmp_path).record("file:none.mp4"))


def test_recording_leaves_the_folder_untouched(folder):
    before = snapshot(folder)
    src = source(folder, fps=15, max_frames_per_episode=8)
    for keys in src.units().values():
        for unit in keys:
            list(src.record(unit))
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------------- a build


@pytest.fixture
def mixed(folder, tmp_path) -> Path:
    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("good.mp4", "clip.webm", "anim.gif"):
        if (folder / name).exists():
            shutil.copy(folder / name, root / name)
    shutil.copytree(folder / "seq", root / "seq")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    return root


def build(src: VideoFolderSource, out: Path, skip_bad: bool) -> dict:
    identity = source_identity(src, "video-folder", Owner("test", "test", "0"))
    return build_dataset(src, identity, DataConfig(resolution=32, min_episode_frames=2), out, skip_bad=skip_bad,
                         log=lambda *_: None)


def test_build_skips_the_bad_file_and_reads_back_identical_frames(mixed, tmp_path):
    before = snapshot(mixed)
    src = source(mixed, fps=15, val_fraction=0.5, max_frames_per_episode=8)
    manifest = build(src, tmp_path / "data", skip_bad=True)
    assert snapshot(mixed) == before
    assert [bad["unit"] for bad in manifest["skipped"]] == ["file:broken.mp4"]
    assert "broken.mp4" in manifest["skipped"][0]["error"]
    good = {u for keys in src.units().values() for u in keys} - {"file:broken.mp4"}
    assert {e["unit"] for e in manifest["episodes"]} == good
    index = EpisodeIndex.open(tmp_path / "data", verify=True)
    for split in ("train", "val"):
        for episode in index.episodes(split):
            windows = WindowDataset(index, split, episode["length"])  # exactly one window covers this episode
            first = int(windows.offsets[windows.episodes.index(episode)])
            stored = (windows[first] * 255).round().byte().permute(0, 2, 3, 1).numpy()
            expected = [e for e in src.record(episode["unit"]) if e.meta["part"] == episode["meta"]["part"]]
            np.testing.assert_array_equal(stored, expected[0].frames)
            assert episode["meta"]["file"] == episode["unit"].partition(":")[2]


def test_build_without_skip_bad_names_the_bad_file(mixed, tmp_path):
    with pytest.raises(GenieError, match="broken.mp4"):
        build(source(mixed, fps=15, val_fraction=0.5), tmp_path / "data", skip_bad=False)

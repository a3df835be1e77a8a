"""The sources' libraries are pip extras: without one, its source still registers, and validating or building with it
ends with one line naming the extra to install (exit status 2). A missing library is simulated the way Python itself
blocks an import: None in sys.modules. `genie plugins` imports none of the heavy libraries."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from genie_core.cli import main
from genie_core.config import DataConfig
from genie_core.errors import GenieError
from genie_core.extras import EXTRAS, missing_extra, require_extra
from genie_core.interfaces import DataSpec
from genie_plugins.atari_source import AtariConfig, AtariSource
from genie_plugins.procgen_source import ProcgenConfig, ProcgenSource
from genie_plugins.video_folder_source import VideoFolderConfig, VideoFolderSource

from conftest import REPO

TINY = str(REPO / "recipes" / "coinrun-tiny.toml")
SMOKE = str(REPO / "recipes" / "coinrun-smoke.toml")
PROCGEN_LINE = 'needs the procgen extra (procgen2, gym<1, gym3, numpy<2): pip install "genie-world[procgen]"'
ATARI_LINE = 'needs the atari extra (ale-py, gymnasium): pip install "genie-world[atari]"'
VIDEO_LINE = 'needs the video extra (av): pip install "genie-world[video]"'


def hide(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError


def test_installed_extras_are_not_missing():
    assert all(missing_extra(extra) is None for extra in EXTRAS)  # the test environment has [all]
    require_extra("procgen", "source 'procgen'")
    with pytest.raises(ValueError, match="unknown extra 'games'; extras: procgen, atari, video"):
        missing_extra("games")


def test_validate_names_the_missing_procgen_extra_in_one_line(monkeypatch, capsys):
    hide(monkeypatch, "procgen")
    assert main(["validate", TINY]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {TINY} [source] (procgen): {PROCGEN_LINE}"]


def test_footage_built_before_needs_no_procgen(monkeypatch, capsys):
    hide(monkeypatch, "procgen", "gym", "gym3")
    assert main(["validate", TINY, "data.path='data/coinrun'"]) == 0
    assert "ok" in capsys.readouterr().out


def test_building_from_a_source_name_names_the_missing_extra(monkeypatch, tmp_path, capsys):
    hide(monkeypatch, "gym3")
    assert main(["data", "build", "procgen", "--out", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: source procgen: {PROCGEN_LINE}"]
    assert not (tmp_path / "data").exists()


def test_atari_validate_names_its_extra(monkeypatch, capsys):
    hide(monkeypatch, "ale_py")
    assert main(["validate", SMOKE, "source.name=atari"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {SMOKE} [source] (atari): {ATARI_LINE}"


@pytest.mark.parametrize("cls, config, extra, line", [
    (ProcgenSource, ProcgenConfig(), "procgen", f"source 'procgen' {PROCGEN_LINE}"),
    (AtariSource, AtariConfig(), "ale_py", f"source 'atari' {ATARI_LINE}"),
])
def test_constructing_a_source_without_its_extra_says_which(monkeypatch, cls, config, extra, line):
    hide(monkeypatch, extra)
    with pytest.raises(GenieError) as caught:
        cls(config, DataSpec(resolution=16))
    assert str(caught.value) == line


def test_video_files_need_the_video_extra_and_folders_of_frames_do_not(monkeypatch, tmp_path):
    from PIL import Image

    hide(monkeypatch, "av")
    frames = tmp_path / "frames" / "clip"
    frames.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(frames / f"{i}.png")
    data = DataConfig(resolution=8, min_episode_frames=2)
    only_frames = VideoFolderConfig(path=str(tmp_path / "frames"), val_fraction=0.0)
    assert not any("extra" in p for p in VideoFolderSource.check_recipe(only_frames, data=data, train={}))
    assert VideoFolderSource(only_frames, DataSpec(resolution=8)).units()["train"] == ["images:clip"]

    (tmp_path / "frames" / "game.mp4").write_bytes(b"not decoded: its name is enough")
    problems = VideoFolderSource.check_recipe(only_frames, data=data, train={})
    assert f"'path' {only_frames.path!r} holds video files; decoding them {VIDEO_LINE}" in problems
    with pytest.raises(GenieError, match=r"source 'video-folder' \(.* holds video files\) needs the video extra"):
        VideoFolderSource(only_frames, DataSpec(resolution=8)).units()


def test_plugins_register_without_any_extra_and_import_no_heavy_library():
    """In a fresh process, as a user without the extras: every source is listed, and listing imported neither the
    extras nor the libraries whose import takes seconds (timm brings torchvision and torch._dynamo)."""
    blocked = sorted({module for _, modules in EXTRAS.values() for module in modules})
    script = textwrap.dedent(f"""
        import sys
        sys.modules.update(dict.fromkeys({blocked!r}))
        from genie_core.cli import main
        assert main(["plugins"]) == 0
        heavy = ("timm", "torchvision", "vector_quantize_pytorch", "accelerate", "safetensors", "matplotlib",
                 "tensorboard", "torchmetrics")
        print("imported:", sorted(name for name in heavy if sys.modules.get(name) is not None))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {tuple(line.split()[:2]) for line in result.stdout.splitlines()}
    assert {("source", "procgen"), ("source", "atari"), ("source", "video-folder")} <= rows
    assert "imported: []" in result.stdout

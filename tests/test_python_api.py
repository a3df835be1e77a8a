"""The README's "From Python" example runs as written against a trained run."""

from __future__ import annotations

import re

from PIL import Image

from conftest import REPO


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_rolls_out_a_world(played_run, tmp_path, monkeypatch):
    code = readme_python_example().replace("runs/coinrun-tiny", str(played_run))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (From Python)", "exec"), scope)
    video, actions = scope["video"], scope["actions"]
    assert video.shape[:2] == (1, actions.shape[1] + 1) and 0 <= float(video.min()) <= float(video.max()) <= 1
    with Image.open(tmp_path / "rollout.gif") as gif:
        assert gif.n_frames == actions.shape[1] + 1


def test_every_public_name_loads_and_import_stays_light():
    """`genie_core` exports what its docstring promises; importing it does not import torch (the CLI's speed)."""
    import subprocess
    import sys

    import genie_core

    for name in genie_core.__all__:
        assert getattr(genie_core, name) is not None, name
    probe = "import sys, genie_core; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"

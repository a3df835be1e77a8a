"""GIFs of results say what each panel is."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from genie_core.io.media import CAPTION_HEIGHT, save_gif, tile


def test_captions_go_above_their_panels(tmp_path):
    dark = torch.tensor([0.0, 0.25, 0.5])[:, None, None, None].expand(3, 3, 16, 24)  # a new shade each frame
    light = torch.ones(3, 3, 16, 24)
    save_gif(tile([dark, light]), tmp_path / "plain.gif", scale=4)
    save_gif(tile([dark, light]), tmp_path / "captioned.gif", scale=4, captions=["truth", "generated"])
    plain, captioned = Image.open(tmp_path / "plain.gif"), Image.open(tmp_path / "captioned.gif")
    assert captioned.n_frames == plain.n_frames == 3
    assert captioned.size == (plain.width, plain.height + CAPTION_HEIGHT)
    frame = np.asarray(captioned.convert("L"))
    bar, video = frame[:CAPTION_HEIGHT], frame[CAPTION_HEIGHT:]
    assert np.array_equal(video, np.asarray(plain.convert("L")))  # the frames themselves are untouched
    panel = 24 * 4  # each caption is written over its own panel, in black on white
    for start in (0, panel + 2 * 4):
        assert (bar[:, start:start + panel] < 128).any()
    assert (bar[:, panel:panel + 2 * 4] > 128).all()  # nothing over the gap

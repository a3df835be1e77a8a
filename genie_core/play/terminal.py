"""`genie play RUN --terminal`: play without a browser. Frames are drawn as coloured half-blocks (24-bit ANSI
colour, two pixels per character cell; only when the output is a terminal, so no colour codes land in a file or a
pipe) and can also be saved as PNGs, numbered in the order they were shown (an undo or reset never overwrites one);
commands are read line by line, so a session can also be scripted
(`printf '1 1 3\\nq\\n' | genie play RUN --terminal`)."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from genie_core.errors import GenieError
from genie_core.play.session import ARROWS, PlaySession, PlayWorld

WORDS = {name.lower(): key for key, name in ARROWS.items()}  # "left" -> "ArrowLeft"


def half_blocks(frame: np.ndarray, width: int) -> str:
    """uint8 [H, W, 3] -> lines of '▀' whose foreground is the upper pixel and background the lower one, at most
    `width` characters wide (nearest-neighbour down-sampling keeps the pixels crisp)."""
    h, w = frame.shape[:2]
    step = max(1, -(-w // width))
    small = frame[::step, ::step]
    if small.shape[0] % 2:
        small = np.concatenate([small, np.zeros_like(small[:1])])
    lines = []
    for top, bottom in zip(small[0::2], small[1::2]):
        cells = "".join(f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m▀" for a, b in zip(top, bottom))
        lines.append(cells + "\x1b[0m")
    return "\n".join(lines)


def play_in_terminal(play: PlayWorld, prompt: torch.Tensor, seed: int, options: dict, stdin: TextIO,
                     stdout: TextIO, frames_dir: Path | None = None, blocks: bool = True, width: int = 64) -> int:
    """Reads commands until 'q' or the end of input; returns the number of frames generated."""
    session = PlaySession(play, prompt, seed)
    arrows = {word: play.keys[key] for word, key in WORDS.items() if key in play.keys}
    if frames_dir is not None:
        frames_dir.mkdir(parents=True, exist_ok=True)

    shown = 0  # frames shown so far: the saved files' numbers, so that none is written twice

    def show(note: str) -> None:
        nonlocal shown
        index = session.frame_count - 1  # all frames, not only the ones a session keeps
        if blocks:
            stdout.write(half_blocks(session.frames[-1], width) + "\n")
        if frames_dir is not None:
            Image.fromarray(session.frames[-1]).save(frames_dir / f"frame-{shown:04d}.png")
        shown += 1
        fps = session.fps()
        stdout.write(f"frame {index}{' · ' + note if note else ''}{f' · {fps:.1f} frames/s' if fps else ''}\n")
        stdout.flush()

    stdout.write(f"{play.name}: actions 0..{play.world.num_actions - 1}"
                 + (f", {', '.join(f'{w} = {a}' for w, a in arrows.items())}" if arrows else "")
                 + "; several per line (e.g. 1 1 3); u undo, r reset, q quit\n")
    show("prompt")
    generated = 0
    for line in stdin:
        for word in line.split():
            word = word.lower()
            if word in ("q", "quit"):
                return _finish(session, frames_dir, stdout, generated)
            if word in ("u", "undo"):
                session.undo()
                show("undo")
            elif word in ("r", "reset"):
                session.reset()
                show("reset")
            else:
                action = arrows.get(word)
                if action is None:
                    try:
                        action = int(word)
                    except ValueError:
                        stdout.write(f"'{word}' is not a command: give an action 0..{play.world.num_actions - 1}"
                                     f"{', ' + ', '.join(arrows) if arrows else ''}, u, r or q\n")
                        continue
                try:
                    session.step(action, options)
                except GenieError as error:
                    stdout.write(f"{error}\n")
                    continue
                generated += 1
                show(f"action {action}")
    return _finish(session, frames_dir, stdout, generated)


def _finish(session: PlaySession, frames_dir: Path | None, stdout: TextIO, generated: int) -> int:
    if frames_dir is not None:
        (frames_dir / "session.gif").write_bytes(session.gif())
        stdout.write(f"saved the frames and session.gif in {frames_dir}\n")
    return generated

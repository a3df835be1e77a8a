"""Folders that appear complete or not at all: a crash never leaves a half-written checkpoint or data split under
the final name. Only one process may write a given folder (multi-process runs write from the main process)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path):
    """Yields a temporary folder; on success it takes the place of `final` (the old one is moved aside, then removed),
    on failure it is removed and `final` is left as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # left over if a previous save died while removing it
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

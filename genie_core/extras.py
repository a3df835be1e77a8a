"""Optional dependencies, installed as pip extras of genie-world (`pip install "genie-world[procgen]"`).

The sources that play games or decode video files need libraries the rest of genie does not (procgen pins numpy
below 2). A source asks here before it imports one, so a missing extra is one line naming what to install, at
`genie validate` already, instead of an ImportError from deep inside a data build. Finding a module costs no import.
"""

from __future__ import annotations

import importlib.util
import sys

from genie_core.errors import GenieError

DISTRIBUTION = "genie-world"

# extra -> (what pip installs for it, the modules that must then be importable); pyproject.toml lists the same
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "procgen": (("procgen2", "gym<1", "gym3", "numpy<2"), ("procgen", "gym", "gym3")),
    "atari": (("ale-py", "gymnasium"), ("ale_py", "gymnasium")),
    "video": (("av",), ("av",)),
}


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there means an import of it failed, or was blocked on purpose
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def missing_extra(extra: str) -> str | None:
    """None when the extra's libraries are installed, else what to install, as the end of a sentence whose subject
    is the thing that needs them: 'needs the procgen extra (procgen2, gym<1, gym3, numpy<2): pip install ...'."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra '{extra}'; extras: {', '.join(EXTRAS)}")
    packages, modules = EXTRAS[extra]
    if all(_installed(module) for module in modules):
        return None
    return f"needs the {extra} extra ({', '.join(packages)}): pip install \"{DISTRIBUTION}[{extra}]\""


def require_extra(extra: str, user: str) -> None:
    """Raises GenieError, one line, when `user` (e.g. "source 'procgen'") cannot run without the missing extra."""
    problem = missing_extra(extra)
    if problem is not None:
        raise GenieError(f"{user} {problem}")

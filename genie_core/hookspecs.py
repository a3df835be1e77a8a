"""Every hook a genie plugin can implement. This module is the plugin API: each hook is documented here, and
CONTRIBUTING.md repeats each signature (a test keeps the two in step).

A plugin is any module (or object) with functions marked `@genie_core.hookimpl` whose names match the hooks below.
First-party plugins (genie_core.registry.BUILTIN_PLUGINS) load through exactly the same hooks as third-party ones,
which are found through the `genie.plugins` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from genie_core.registry import Registrar

PROJECT = "genie"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def genie_register_components(registrar: Registrar) -> None:
    """Register components by calling the registrar.

    ``registrar.add_tokenizer(name, cls)``, ``add_action_model``, ``add_dynamics``, ``add_sampler``, ``add_source``
    and ``add_policy`` each take the name recipes (or sources, for policies) use and a subclass of the matching
    interface in ``genie_core.interfaces`` whose ``config_class`` is a frozen attrs class. A name already taken by
    another plugin is an error naming both. Registration is all-or-nothing per plugin: if this hook raises, none of
    the plugin's components are kept.
    """

"""genie: generative interactive environments on a pluggable core.

The public API for plugins: `hookimpl`, the interfaces in `genie_core.interfaces`, the layers in `genie_core.nn`.
"""

from genie_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"

"""What a measurement ran on: written beside every number that depends on the machine (run reports, benchmarks)."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def describe() -> dict:
    """Architecture, CPU threads torch uses, the GPU if one is visible, and the versions that shape the numbers."""
    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"machine": platform.machine(), "processor": platform.processor(), "cpu_cores": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "genie": version("genie-world")}

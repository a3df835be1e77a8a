"""What a measurement ran on: written beside every number that depends on the machine (run reports, benchmarks)."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (Linux), else what the platform says; "" when neither says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def describe() -> dict:
    """Architecture, the CPU (its model and the widest vector instructions torch's kernels use on it: two CPUs of
    one name can differ twofold in speed by these), the CPU threads torch uses, the GPU if one is visible, and the
    versions that shape the numbers."""
    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"machine": platform.machine(), "processor": platform.processor(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_cores": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "genie": version("genie-world")}


def memory_bytes(cpu: bool = False) -> int:
    """The memory training gets on this machine: the GPUs' together when they are used, else the main memory."""
    import torch

    if torch.cuda.is_available() and not cpu:
        return sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

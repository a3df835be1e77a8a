"""What a measurement ran on: written beside every number that depends on the machine (run reports, benchmarks)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys


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


# Packages besides torch whose releases can move a run's numbers: a new release of vector-quantize-pytorch once
# rewrote its EMA codebook, and the same recipe, seed and machine then measured a world 0.85 dB apart.
NUMERICS_PACKAGES = ("vector-quantize-pytorch", "torch-einops-utils", "timm", "accelerate", "torchmetrics", "einops",
                     "numpy")


def package_version(package: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """Architecture, the CPU (its model and the widest vector instructions torch's kernels use on it: two CPUs of
    one name can differ twofold in speed by these), the CPU threads torch uses, whether the process keeps the memory
    it frees (keep_freed_memory), the GPU if one is visible, and the versions that shape the numbers: Python, torch,
    genie and NUMERICS_PACKAGES (under "packages")."""
    import torch

    return {"machine": platform.machine(), "processor": platform.processor(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_cores": os.cpu_count(),
            "cpu_threads": torch.get_num_threads(), "keeps_freed_memory": _kept,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "genie": package_version("genie-world"),
            "packages": {name: package_version(name) for name in NUMERICS_PACKAGES}}


def summary(machine: dict | None) -> str:
    """A `describe()` record in one line, for reports and tables: the machine, its device, and the versions that
    shape the numbers (a record from before it kept the packages: Python and torch only)."""
    if not machine:
        return "not recorded (a run from before reports kept it)"
    threads = machine["cpu_threads"]
    cpu = ", ".join(filter(None, [machine.get("cpu"), machine.get("cpu_capability")]))  # records from before: none
    device = machine["gpu"] or (f"CPU ({cpu + ', ' if cpu else ''}{machine['cpu_cores']} cores, "
                                f"{threads} thread{'s' * (threads != 1)})")
    packages = "".join(f", {name} {version}" for name, version in machine.get("packages", {}).items() if version)
    return f"{machine['machine']}, {device}; Python {machine['python']}, torch {machine['torch']}{packages}"


def bf16_units(cpu: bool = False) -> str | None:
    """What multiplies bf16 matrices natively where a run trains (on the GPU when one is visible and `cpu` is not
    set, as Accelerate places it): "AMX", "AVX-512 BF16", "CUDA", or None. A CPU without such units emulates bf16
    products, and then bf16 trains slower than float32."""
    import torch

    if torch.cuda.is_available() and not cpu:
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else None


def resolve_mixed_precision(setting: str, cpu: bool = False) -> tuple[str, str]:
    """run.mixed_precision as a run trains with it, and why: "auto" is bf16 where the device has bf16 units
    (bf16_units), else "no" (float32); any other setting is itself."""
    if setting != "auto":
        return setting, "as the recipe says"
    units = bf16_units(cpu)
    return ("bf16", f"this device has bf16 units ({units})") if units else ("no", "this device has no bf16 units")


def memory_bytes(cpu: bool = False) -> int:
    """The memory training gets on this machine: the GPUs' together when they are used, else the main memory."""
    import torch

    if torch.cuda.is_available() and not cpu:
        return sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_TRIM_BYTES = 1 << 30  # free memory at the top of the heap kept for reuse, up to this much
KEPT_MMAP_BYTES = 32 << 20  # blocks below this come from the heap (glibc's largest accepted value on 64 bits)
KEEP_FREED_MEMORY = "GENIE_KEEP_FREED_MEMORY"  # "0" leaves the allocator as the C library sets it
_kept = False  # whether keep_freed_memory set glibc's allocator in this process


def keep_freed_memory() -> bool:
    """Asks glibc's allocator to keep the memory a process frees for its next allocations, as a training loop frees
    and allocates the same activations step after step. By default glibc hands the top of its heap back to the
    system when a step frees it, and maps some blocks afresh: every step then faults its activations in again, a page
    at a time (on a CPU, thousands of faults and tens of milliseconds of system time a step; benchmarks/README.md).
    Peak memory stays what it was; memory just does not shrink between steps.

    Does nothing off Linux/glibc, when the environment already sets glibc's malloc (GLIBC_TUNABLES, MALLOC_*
    variables), or with GENIE_KEEP_FREED_MEMORY=0. Returns whether the process keeps freed memory now. For
    launchers (the `genie` command, the benchmarks): a library leaves the process's allocator to whoever runs it."""
    global _kept
    env = os.environ
    told = (env.get(KEEP_FREED_MEMORY, "1") == "0" or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or any(name.startswith("MALLOC_") for name in env))
    if _kept or told or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return _kept
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return False
    # Both or neither: a fixed trim threshold alone turns off glibc's adaptive mmap threshold, and then every block
    # over 128 KiB is mapped afresh (a tiny LAM + dynamics step: 140,000 faults, against 1,200 to 25,600 by default).
    _kept = bool(mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_BYTES))
    return _kept

"""Facts about this machine and its libraries: the one collector every report and check reads.

:func:`package_versions` gives the installed version of each named distribution (``None`` when missing);
:func:`machine_facts` gives Python, the OS, the CPU, memory, torch, CUDA and each visible GPU. The callers pick
what they record and keep their own keys: ``doctor`` (:func:`medgemma_lib.setup.env.collect_environment`), the
demo conversion's manifest (:func:`medgemma_lib.models.loading.library_versions`), the benchmarks
(:func:`medgemma_lib.checks.bench.environment`) and the quality report
(:func:`medgemma_lib.evaluation.quality.environment`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each distribution in ``names``, in order; ``None`` for one that is missing."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def ram_gib() -> float | None:
    """Total memory of this machine in GiB (Linux ``/proc/meminfo``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict:
    """This machine: ``python``, ``platform``, ``cpu``, ``cpu_count``, ``ram_gib``, ``torch`` and ``cuda`` (versions,
    ``None`` without torch or CUDA) and ``gpus``: one ``{"name", "memory_gib", "compute_capability"}`` per visible
    CUDA device, device 0 first (``[]`` on CPU)."""
    facts: dict = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "ram_gib": ram_gib(),
        "torch": None,
        "cuda": None,
        "gpus": [],
    }
    try:
        import torch  # here, not at the top: `doctor` must still report on a machine without a working torch
    except ImportError:
        return facts
    facts["torch"] = torch.__version__
    facts["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            facts["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "compute_capability": (props.major, props.minor),
                }
            )
    return facts

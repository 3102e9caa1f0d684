"""What hardware a measurement ran on, in words, for results files and model cards."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["hardware_name"]


def _cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else ``platform.processor()`` or the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: str | torch.device = "cpu") -> str:
    """E.g. ``"AMD EPYC, 2 torch threads"`` or ``"NVIDIA H100 80GB HBM3"``.

    Timings from different machines differ several-fold for the same code (seen here: 2,200 vs 640 training
    images/s on two 2-core CPUs), so every timing written to a results file says where it was taken.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} torch threads"

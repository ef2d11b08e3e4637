"""What a results file records about the machine, and process-level measurements (memory)."""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from continual_transformer.version import __version__

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine a result was measured on: host, platform, library versions, cores and threads, device (and
    the GPU's name and CUDA version on a CUDA device). The one helper every results file uses."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def meta(model_name: str, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model_name,
        "device": str(device),
        "settings": settings,
        "version": __version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(device),
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's peak RSS on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reset: CUDA allocated bytes, or peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if _STATUS.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

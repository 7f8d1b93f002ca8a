"""Provenance: what produced a result (code, libraries, machine, date, command), for run folders
and benchmark files. One function, ``provenance``; callers add what is theirs (seed, preset...)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from ._version import __version__


def git_commit() -> str | None:
    """The commit of the cgclora_lite checkout in use (with "+dirty" if the package's files
    changed), or None when the package is not a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cgclora_lite"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            name = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def provenance(model: nn.Module | None = None, device: torch.device | str | None = None,
               **extra) -> dict:
    """A JSON-friendly record of what produced a result.

    Keys: ``cgclora_lite`` (version) and ``git_commit``; ``python``, ``torch``, ``transformers``,
    ``peft`` (versions, None if not installed); ``platform``, ``device`` and ``device_name``,
    ``cpu_count``, ``cpu_threads``; with ``model``, its ``model`` name and ``dtype`` (and its
    device, unless ``device`` is given); ``date`` (UTC) and ``command``; then ``extra`` as given.
    """
    record = {
        "cgclora_lite": __version__, "git_commit": git_commit(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "peft": _version("peft"),
        "platform": platform.platform(),
    }
    if model is not None:
        first = next(model.parameters())
        record["model"] = getattr(model, "name_or_path", None)
        record["dtype"] = str(first.dtype).removeprefix("torch.")
        device = device if device is not None else first.device
    device = torch.device(device if device is not None else "cpu")
    record.update({
        "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m cgclora_lite"] + sys.argv[1:]) if sys.argv else None,
    })
    return {**record, **extra}

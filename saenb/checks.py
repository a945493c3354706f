"""A user's request checked before any work starts: sizes, devices, output folders. Each failure is a `UsageError`
naming the value received and the fix; the command line prints it as `error: ...` with exit code 2."""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch


class UsageError(ValueError):
    """A request the package cannot serve: the message names the value and the fix (no traceback on the command
    line: `error: ...`, exit code 2)."""


def positive_int(name: str, value, fix: str = "") -> int:
    """`value` as an int when it is a positive integer (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{name}={value!r} must be a positive integer{fix}")
    return int(value)


def device(spec: str | torch.device) -> torch.device:
    """'auto' (CUDA when present, else the CPU) or a torch device that exists on this machine."""
    if str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {spec!r} is not a torch device; use auto, cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU found"
            raise UsageError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, {build}); "
                             "use cpu, or auto (CUDA when present)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {spec!r}: MPS is not available here; use cpu, or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {spec!r}: saenb runs on cpu, cuda or mps (or auto)")
    return dev


def writable_folder(path: str | Path, name: str) -> Path:
    """`path` as a folder that exists or can be made, and can be written to: its nearest existing ancestor must be a
    writable folder (not a file)."""
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"lies beneath {ancestor}, a file"
                raise UsageError(f"{name} {path} {where}, not a folder; pass a folder path")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UsageError(f"{name} {path}: {ancestor} is not writable; pass a folder you can write to")
            return path
    return path

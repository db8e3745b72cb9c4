"""Atomic writes: a result or checkpoint is either complete on disk or absent, never half-written."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results and checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_bytes(data: bytes, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def save_torch(obj: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    return _atomic(path, write)

"""Atomic writes: a result or checkpoint is either complete on disk or absent, never half-written. A lock for
what is built once and shared (a cached synthetic set), so that runs starting together do not all build it."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

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


@contextlib.contextmanager
def exclusive(path: str | Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock named after `path` (a hidden `.NAME.lock` beside it) until the block ends; another
    process asking for it waits, and `waiting`, if given, is printed once before the wait. The lock goes with the
    process, so a killed holder never leaves it taken."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


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

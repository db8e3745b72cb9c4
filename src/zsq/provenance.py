"""Which code made a result: recorded in every result.json and in the bench store, so numbers stay traceable."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

VERSION = "0.2.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe --always --dirty` of the checkout zsq runs from, else the package version (a wheel install)."""
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return f"zsq {VERSION}"
    return f"git {proc.stdout.strip()}" if proc.returncode == 0 and proc.stdout.strip() else f"zsq {VERSION}"

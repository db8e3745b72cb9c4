"""Which code made a result, and on what: recorded in every result.json and in the bench store, so numbers (and
wall times) stay traceable."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

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


@functools.lru_cache(maxsize=4)
def hardware(device: str) -> str:
    """The processor a run's wall time was measured on: the GPU's name, or the CPU's model, its widest vector unit
    and its core count (the same device string, "cpu", covers machines 2× apart: with AVX-512 and without)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    unit = next((f" ({name})" for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    return f"{names[0] if names else platform.processor() or platform.machine()}{unit}, {os.cpu_count()} cores"


class RunClock:
    """A run's wall and CPU seconds so far, the part before a resume included. The CPU time is the process's (all
    its threads): unlike the wall time it does not count minutes the process was stopped (SIGSTOP) or waiting for
    a core taken by other work, so a run's cost stays readable when its machine was shared. `cpu_before` None: the
    run was resumed from a checkpoint written before zsq counted CPU time, which stays unknown."""

    def __init__(self, wall_before: float = 0.0, cpu_before: float | None = 0.0) -> None:
        self.wall_before, self.cpu_before = wall_before, cpu_before
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0

    def cpu(self) -> float | None:
        return None if self.cpu_before is None else self.cpu_before + time.process_time() - self.cpu0

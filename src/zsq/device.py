"""Device and precision choices as strings, resolved in one place."""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but CUDA is not available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device '{name}': use auto, cpu or cuda[:N]")
    return name


def resolve_precision(name: str, device: str) -> str:
    """`auto`: bf16 where the hardware computes it natively (a CUDA device with bf16, a CPU with AVX-512), else
    fp32: on an AVX2-only CPU (this project's 2-core AMD EPYC) bf16 autocast made a ResNet-20 teacher's training
    step about 5× slower than fp32 (tests/test_cli.py's 8-epoch run: 47.8 s against 9.4 s at 1 thread)."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) else "fp32"


# Elementwise functions that ATen computes in parallel chunks, on x86 builds through MKL's vector math (our reading
# of the symptom, not verified in torch's source). On this torch (2.13.0 CPU), a process's first parallel call of
# one of them can give a worker thread's chunk a less accurate result:
# `torch.tanh` on 8,192 floats with 2 threads differed from every later call in 1 to 2 of 100 fresh processes,
# by up to 8e-6 on exactly the second thread's half (the generator's output layer is a tanh). A throwaway call
# of each, first on one thread and then on all, makes every later call of the process agree.
_VML_FUNCTIONS = (torch.tanh, torch.exp, torch.log, torch.log2, torch.log10, torch.log1p, torch.expm1, torch.sqrt,
                  torch.erf, torch.erfc, torch.sin, torch.cos, torch.tan, torch.asin, torch.acos, torch.atan,
                  torch.trunc)


def deterministic() -> None:
    """Deterministic algorithms, with MKL's vector math initialised before the first result that counts, so that
    two processes with the same seed compute the same bits (a resumed run then ends identical to an
    uninterrupted one)."""
    torch.use_deterministic_algorithms(True)
    x = torch.linspace(0.1, 0.9, 1 << 16)
    threads = torch.get_num_threads()
    for n in (1, threads):
        torch.set_num_threads(n)
        for f in _VML_FUNCTIONS:
            f(x)


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked (BatchNorm and losses stay fp32 under autocast); a no-op for fp32."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be fp32 or bf16, got '{precision}'")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

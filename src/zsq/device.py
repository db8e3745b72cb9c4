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


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked (BatchNorm and losses stay fp32 under autocast); a no-op for fp32."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be fp32 or bf16, got '{precision}'")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

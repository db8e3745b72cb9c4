"""The asymmetric uniform fake quantizer of the ZSQ lineage (spec: quantizer.md), with its straight-through
backward.

For a range [l, u] and k bits:  S = max((u − l) / (2ᵏ − 1), 1e-8),  Z = round(−l / S),
q = clamp(round(x / S) + Z, 0, 2ᵏ − 1),  x̂ = S · (q − Z).
x / S is computed as x · (1 / S), as torch's `fake_quantize_per_*_affine` kernels do: the two differ by one float
step for some x, which at a rounding tie picks the other code, and the codes must be torch's bit for bit.
"""
from __future__ import annotations

import torch

SCALE_EPS = 1e-8
STE_MODES = ("identity", "clipped")


def quant_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale S, zero point Z) for ranges lo/hi of any broadcastable shape."""
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=SCALE_EPS)
    return scale, torch.round(-lo / scale)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes q in [0, 2ᵏ − 1], still as a float tensor: a new one, which every step after the first
    changes in place (a copy per step was most of the quantizer's time on a 25 M-weight model)."""
    return torch.mul(x, scale.reciprocal()).round_().add_(zero).clamp_(0, 2**bits - 1)


class _FakeQuantize(torch.autograd.Function):
    """x̂ forward, the straight-through gradient backward, in one autograd node: written as x̂ + (x − x.detach())
    with torch.clamp for the clipped STE, the same values and gradients took 1.4 times as long over
    ResNet-50's weights (benchmarks/quantizer_speed.py), in passes over every weight that each allocated a copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, clipped: bool) -> torch.Tensor:
        scale, zero = quant_params(lo, hi, bits)
        ctx.clipped = clipped
        if clipped:
            ctx.save_for_backward(x, lo, hi)
        return quantize_int(x, scale, zero, bits).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.clipped:
            x, lo, hi = ctx.saved_tensors
            grad = torch.where((x >= lo) & (x <= hi), grad, 0.0)
        return grad, None, None, None, None


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  ste: str = "identity") -> torch.Tensor:
    """x̂ in the forward pass, exactly the grid value S·(q − Z); the straight-through estimator backward.

    `ste="identity"` passes the gradient everywhere (the lineage's choice); `"clipped"` passes it inside [l, u],
    ends included, and zeroes it outside (torch.minimum and torch.maximum would split it in half at the ends,
    where each channel's smallest and largest weight always lies). l and u never receive a gradient: they are
    min/max statistics, not parameters.
    """
    return _FakeQuantize.apply(x, lo.detach(), hi.detach(), bits, ste == "clipped")


def per_channel_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each output channel (dim 0), shaped to broadcast against w."""
    flat = w.detach().flatten(1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return flat.amin(1).view(shape), flat.amax(1).view(shape)

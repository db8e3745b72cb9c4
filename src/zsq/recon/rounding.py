"""Learned weight rounding for post-training quantization: AdaRound's soft bits (Nagel et al. 2020) with Genie-M's
jointly learned per-channel step (Jeon et al., CVPR 2023). Spec: ../shared/specs/ptq.md §3.1.

Each weight is s·(clamp(B + h(V) + z, 0, 2ᵏ − 1) − z) with the base integer B = ⌊W/s₀⌋ fixed at the initial step
s₀: B does not move when s does (Genie's change), so s and the soft bits h(V) can be learned together. V starts
where hard rounding is round-to-nearest; the regulariser pushes every h(V) to 0 or 1 as β falls from 20 to 2.
"""
from __future__ import annotations

import math

import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches exactly 0 and 1 at finite V
LP_NORM = 2.4  # the error norm of the initial range search (BRECQ, Genie, QDrop)
RATIOS = 100  # candidate ranges r·[min, max], r = 1.00, 0.99, …, 0.01


def soft_bit(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def rounding_penalty(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ (1 − |2h(V) − 1|^β): 0 when every soft bit is 0 or 1, largest at h = ½."""
    return (1 - (2 * soft_bit(v) - 1).abs().pow(beta)).sum()


def beta_at(t: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """β at iteration t: `start` through the warm-up (where the penalty is off), then linearly down to `end`."""
    t0 = warmup * iters
    if t < t0:
        return start
    return end + (start - end) * max(0.0, 1 - (t - t0) / (iters - t0))


def _per_channel(x: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.ndim - 1)


@torch.no_grad()
def search_range(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s₀, z) per output channel: of the ranges r·[min(W_c, 0), max(W_c, 0)], the one whose round-to-nearest
    weights have the lowest mean |W − Ŵ|^2.4, channel by channel."""
    n = 2**bits - 1
    flat = w.detach().flatten(1).float()
    lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
    best = torch.full_like(lo, math.inf)
    scale, zero = torch.ones_like(lo), torch.zeros_like(lo)
    for i in range(RATIOS):
        r = 1 - i / RATIOS
        s = ((hi - lo) * r / n).clamp_min(1e-8)
        z = torch.round(-lo * r / s)
        q = torch.clamp(torch.round(flat / s[:, None]) + z[:, None], 0, n)
        err = (flat - s[:, None] * (q - z[:, None])).abs().pow(LP_NORM).mean(1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale.view(_per_channel(w)), zero.view(_per_channel(w))


class LearnedRounding(nn.Module):
    """The quantized weight of one layer as a function of its learned soft bits V and step s (Genie-M), or of V
    alone with s fixed at s₀ (AdaRound, BRECQ, QDrop: `learn_step=False`)."""

    def __init__(self, weight: torch.Tensor, bits: int, learn_step: bool = True) -> None:
        super().__init__()
        self.bits = bits
        s0, z = search_range(weight, bits)
        w = weight.detach().float()
        base = torch.floor(w / s0)
        frac = (w / s0 - base).clamp(0, 1 - 1e-6)  # h(V₀) = W/s₀ − B: hard rounding starts at round-to-nearest
        self.register_buffer("base", base)
        self.register_buffer("zero", z)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.scale = nn.Parameter(s0.clone(), requires_grad=learn_step)

    def forward(self, hard: bool = False) -> torch.Tensor:
        """The quantized weight with soft bits h(V), or with each bit rounded to 1[V ≥ 0] (`hard`)."""
        h = (self.v >= 0).to(self.v.dtype) if hard else soft_bit(self.v)
        return self.scale * (torch.clamp(self.base + h + self.zero, 0, 2**self.bits - 1) - self.zero)

    def penalty(self, beta: float) -> torch.Tensor:
        return rounding_penalty(self.v, beta)

    def weight_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[lo, hi] per channel, whose grid (the lineage's asymmetric quantizer) is exactly s and z."""
        s = self.scale.detach()
        return -s * self.zero, s * (2**self.bits - 1 - self.zero)

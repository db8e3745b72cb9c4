"""The activation quantizer of post-training reconstruction: a learned step (LSQ, Esser et al. 2020, without
its gradient scale, as Genie), initialised by the L2.4 range search, with QDrop's random bypass (Wei et al. 2022).
Spec: ../shared/specs/ptq.md §3.2.

Symmetric without a zero point: unsigned codes 0 … 2ᵏ − 1 when the first batch it sees has no negative value
(a ReLU's output), else signed −2ᵏ⁻¹ … 2ᵏ⁻¹ − 1. Both are the lineage's asymmetric grid with lo = Q_N·s and
hi = Q_P·s, which is how the finished quantizer is written back into the student's `ActQuantizer`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import ActQuantizer
from .rounding import LP_NORM, RATIOS


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LsqAct(nn.Module):
    """Stands in for one `ActQuantizer` of the student while its unit is reconstructed.

    `enabled` False passes x through (the FP teacher's pass); `drop` > 0 leaves each element at full precision
    with that probability (QDrop), only while the unit is being optimised."""

    def __init__(self, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.quantizer, self.bits = quantizer, quantizer.bits
        self.scale = nn.Parameter(torch.ones(()))
        # Set by the range search on the first batch this quantizer sees; buffers, so that a resumed
        # reconstruction finds them, mirrored in Python so that the forward never syncs to read them.
        self.register_buffer("signed_", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ready_", torch.zeros((), dtype=torch.bool))
        self.signed = self.ready = False
        self.enabled = True
        self.drop = 0.0

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.signed, self.ready = bool(self.signed_), bool(self.ready_)

    def limits(self) -> tuple[int, int]:
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.signed else (0, 2**self.bits - 1)

    def _grid(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        qn, qp = self.limits()
        return s * round_ste(torch.clamp(x / s, qn, qp))

    @torch.no_grad()
    def init_step(self, x: torch.Tensor) -> None:
        """The step of the ratio r·max|x| (r = 1.00 … 0.01) whose quantized x has the lowest mean |x − x̂|^2.4."""
        self.signed = bool(x.min() < 0)
        top = x.abs().max().clamp_min(1e-8)
        qn, qp = self.limits()
        steps = [top * (1 - i / RATIOS) / qp for i in range(RATIOS)]
        # _grid's operations, in place in one buffer per candidate (no gradient here, so round needs no STE): the
        # same errors bit for bit, 1.5–2.4 times faster than through _grid (it was 40 % of a short PTQ run)
        errors = torch.stack([torch.div(x, s).clamp_(qn, qp).round_().mul_(s).sub_(x).abs_().pow_(LP_NORM).mean()
                              for s in steps])
        self.scale.copy_(steps[int(errors.argmin())])  # the first of equal errors: the largest step, as before
        self.ready = True
        self.signed_.fill_(self.signed)
        self.ready_.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.ready:
            self.init_step(x.detach())
        xq = self._grid(x, self.scale)
        if self.drop > 0:
            return torch.where(torch.rand_like(x) < self.drop, x, xq)
        return xq

    @torch.no_grad()
    def write_back(self) -> ActQuantizer:
        """The student's quantizer, its frozen range now this step's grid."""
        q, (qn, qp) = self.quantizer, self.limits()
        q.reset()
        q.lo.fill_(qn * self.scale.item())
        q.hi.fill_(qp * self.scale.item())
        q.calibrated, q.observing = True, False
        return q

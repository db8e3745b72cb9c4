"""HAST's transfer loss (hast.md §2): weighted logit KD + channel-attention alignment over residual units.

The sample-difficulty promotion (FGSM) that HAST adds is not part of the loss: it is the loop's `--promote ε`
pass, so that any transfer loss can use it; the `hast` presets switch it on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .akt import Maps, match_maps, resolve_layers
from .base import LOSSES, TransferInputs, TransferLoss
from .logits import KDOptions, kd_loss


def l2_channel_attention(f: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] → [B,C]: the spatial mean of f², L2-normalised per sample (HAST's attention; AKT uses softmax)."""
    return F.normalize(f.float().pow(2).mean((2, 3)), dim=1, eps=1e-12)


def fa_loss(teacher_feats: Maps, student_feats: Maps) -> torch.Tensor:
    """Σ over maps of mean((a(Fˢ) − a(Fᵀ))²) with a = `l2_channel_attention`; the teacher side is detached."""
    pairs = match_maps(teacher_feats, student_feats)
    if not pairs:
        raise ValueError("feature alignment needs at least one pair of feature maps")
    return sum(F.mse_loss(l2_channel_attention(s), l2_channel_attention(t.detach())) for t, s in pairs)


def fgsm_promote(x: torch.Tensor, loss: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·sign(∂loss/∂x), detached: one step that makes the batch harder (x must require grad; the graph of
    `loss` is kept for its own backward)."""
    (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
    return (x + eps * grad.sign()).detach()


@dataclass
class WeightedKDOptions(KDOptions):
    hast_kd_weight: float = field(default=20.0, metadata={
        "help": "multiplier of T²·KD in the hast and synq losses (code: 20)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hast_kd_weight < 0:
            raise UserError(f"hast-kd-weight must be ≥ 0, got {self.hast_kd_weight}")


@dataclass
class HASTLossOptions(WeightedKDOptions):
    hast_fa_weight: float = field(default=1000.0, metadata={"help": "λ of the channel-attention alignment (code: 1000)"})
    hast_layers: str = field(default="units", metadata={
        "help": "maps aligned by the hast loss: units (every residual branch before its add, as the HAST and "
                "SynQ codes), stages, or module names"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hast_fa_weight < 0:
            raise UserError(f"hast-fa-weight must be ≥ 0, got {self.hast_fa_weight}")


class HASTLoss(TransferLoss):
    def __init__(self, opts: HASTLossOptions) -> None:
        super().__init__()
        self.opts = opts
        self.layers: list[str] = []

    def feature_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        self.layers = resolve_layers(model, example, self.opts.hast_layers, "--hast-layers")
        return self.layers

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kd = kd_loss(inp.t_logits, inp.q_logits, self.opts.kd_temperature, self.opts.kd_reduction)
        fa = fa_loss([inp.t_feats[n] for n in self.layers], [inp.q_feats[n] for n in self.layers])
        return self.opts.hast_kd_weight * kd + self.opts.hast_fa_weight * fa, {"kd": kd, "fa": fa}


@LOSSES.register("hast", options=HASTLossOptions)
def hast(opts: HASTLossOptions) -> HASTLoss:
    """HAST's loss: T²-scaled KD plus feature alignment of the residual branches."""
    return HASTLoss(opts)

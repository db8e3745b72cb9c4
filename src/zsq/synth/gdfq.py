"""GDFQ's generator (Xu et al., 2020): fool-the-teacher CE on sampled labels + BN-statistics matching."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import SOURCES, SourceContext
from .generator import GeneratorOptions, GeneratorSource


@dataclass
class GDFQOptions(GeneratorOptions):
    bns_weight: float = field(default=0.1, metadata={"help": "weight of the BN-statistics loss (GDFQ 0.1, AdaDFQ γ = 1)"})


class GDFQSource(GeneratorSource):
    """L_G = CE(T(G(z, y)), y) + bns_weight · BNS."""

    def __init__(self, ctx: SourceContext, opts: GDFQOptions) -> None:
        super().__init__(ctx, opts)
        self.opts = opts

    def generator_loss(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                       qmodel: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(t_logits.float(), y)
        bns = self.bns.loss()
        return ce + self.opts.bns_weight * bns, {"g_ce": ce, "g_bns": bns}


@SOURCES.register("gdfq", options=GDFQOptions)
def gdfq(ctx: SourceContext, opts: GDFQOptions) -> GDFQSource:
    """GDFQ's label-conditional generator (Xu et al. 2020), trained beside the Q model: CE on the teacher plus
    BatchNorm-statistics matching."""
    return GDFQSource(ctx, opts)

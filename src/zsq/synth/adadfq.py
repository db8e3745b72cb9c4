"""AdaDFQ's generator (Qian et al., 2023): samples whose teacher−Q disagreement stays in an entropy band.

Spec gdfq_adadfq.md §3. With d = z_t − z_q and s = z_t + z_q:
    L_G = L_band + β·(α_ds·CE(d, y) + α_as·CE(s, y)) + γ·BNS,
    L_band = mean relu(λ_l − h') + mean relu(h' − λ_u),  h' = (H(softmax d) − min H) / (log C − min H),
where the batch minimum is not detached, as in the paper's code. The Q model runs on the generator's batch
with gradients flowing through it (STE) into the generator; its weights are not stepped here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import SOURCES, SourceContext
from .generator import GeneratorOptions, GeneratorSource


@dataclass
class AdaDFQOptions(GeneratorOptions):
    bns_weight: float = field(default=1.0, metadata={"help": "weight of the BN-statistics loss (GDFQ 0.1, AdaDFQ γ = 1)"})
    alpha_ds: float = field(default=0.2, metadata={"help": "AdaDFQ weight of the disagreement CE"})
    alpha_as: float = field(default=0.1, metadata={"help": "AdaDFQ weight of the agreement CE"})
    lambda_l: float = field(default=0.1, metadata={"help": "AdaDFQ lower edge of the entropy band"})
    lambda_u: float = field(default=0.8, metadata={"help": "AdaDFQ upper edge of the entropy band"})
    balance_weight: float = field(default=1.0, metadata={"help": "AdaDFQ β, weight of the balance term"})


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per row, in nats."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def band_loss(t_logits: torch.Tensor, q_logits: torch.Tensor, lambda_l: float, lambda_u: float) -> torch.Tensor:
    h = entropy(t_logits - q_logits)
    h_min = h.min()
    hn = (h - h_min) / (math.log(t_logits.shape[1]) - h_min)
    return F.relu(lambda_l - hn).mean() + F.relu(hn - lambda_u).mean()


class AdaDFQSource(GeneratorSource):
    def __init__(self, ctx: SourceContext, opts: AdaDFQOptions) -> None:
        super().__init__(ctx, opts)
        self.opts = opts

    def generator_loss(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                       qmodel: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.opts
        t, q = t_logits.float(), qmodel(x).float()
        band = band_loss(t, q, o.lambda_l, o.lambda_u)
        ds = F.cross_entropy(t - q, y)
        agree = F.cross_entropy(t + q, y)
        bns = self.bns.loss()
        loss = band + o.balance_weight * (o.alpha_ds * ds + o.alpha_as * agree) + o.bns_weight * bns
        return loss, {"g_band": band, "g_ds": ds, "g_as": agree, "g_bns": bns}


@SOURCES.register("adadfq", options=AdaDFQOptions)
def adadfq(ctx: SourceContext, opts: AdaDFQOptions) -> AdaDFQSource:
    """AdaDFQ's generator (Qian et al. 2023): GDFQ's losses plus the entropy band and the agreement/disagreement terms
    computed with the Q model."""
    return AdaDFQSource(ctx, opts)

"""AKT: refined feature distillation (spatial + channel attention) on top of any logit transfer loss.

Each chosen feature map is reduced to two attention vectors per sample (where the energy is in the image, and in
which channels); the student matches the teacher's by a temperature-softened KL. The KLs are tiny (1e-7..1e-5 per
map at τ=8), so λ is of order 10⁵ per map: the default reproduces the official code's effective weight
(lam 1000 × batch 200 × summed maps), see ../shared/specs/akt.md §2.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..graph import residual_branches
from .base import LOSSES, TransferInputs, TransferLoss, current_option
from .logits import GDFQLossOptions

PARTS = ("spatial", "channel")
OFFICIAL_LAM, OFFICIAL_BATCH = 1000.0, 200  # the official code's lam, on KLs summed over its batch of 200
OFFICIAL_MAP_WEIGHT = OFFICIAL_LAM * OFFICIAL_BATCH  # the same weight per map, in batch-mean terms


def spatial_attention(f: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] → [B,H·W]: channel mean of f², L2-normalised per sample (Eq. 6)."""
    return F.normalize(f.double().pow(2).mean(1).flatten(1), dim=1, eps=1e-12)


def channel_attention(f: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] → [B,C]: softmax over channels of the spatial mean of f² (Eq. 7)."""
    return f.double().pow(2).mean((2, 3)).softmax(1)


ATTENTIONS = {"spatial": spatial_attention, "channel": channel_attention}


def attention_kl(u: torch.Tensor, v: torch.Tensor, tau: float, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(u/τ) ‖ softmax(v/τ)) summed over the vector, computed in float64 and returned in float32 (which
    holds a small value to full precision); batch mean or, as the official code, batch sum."""
    logp, logq = F.log_softmax(u.double() / tau, 1), F.log_softmax(v.double() / tau, 1)
    kl = (logp.exp() * (logp - logq)).sum(1)
    if reduction == "batchmean":
        return kl.mean().float()
    if reduction == "sum":
        return kl.sum().float()
    raise UserError(f"rfd reduction must be batchmean or sum, got '{reduction}'")


Maps = Sequence[torch.Tensor] | Mapping[str, torch.Tensor]  # feature maps in order, or by module name


def match_maps(teacher_feats: Maps, student_feats: Maps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(teacher_feats, Mapping):
        return [(teacher_feats[k], student_feats[k]) for k in teacher_feats]
    return list(zip(teacher_feats, student_feats, strict=True))  # unequal counts raise


def rfd_terms(teacher_feats: Maps, student_feats: Maps, tau: float = 8.0, parts: Sequence[str] = PARTS,
              reduction: str = "batchmean") -> dict[str, torch.Tensor]:
    """Per attention part, the KL averaged over the N maps (unweighted): the pieces `rfd_loss` adds up."""
    pairs = match_maps(teacher_feats, student_feats)
    if not pairs:
        raise ValueError("rfd needs at least one pair of feature maps")
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)}")
    out = {}
    for part in parts:
        att = ATTENTIONS[part]
        out[part] = sum(attention_kl(att(t.detach()), att(s), tau, reduction) for t, s in pairs) / len(pairs)
    return out


def rfd_loss(teacher_feats: Maps, student_feats: Maps, lam: float = 1.0, tau: float = 8.0,
             parts: Sequence[str] = PARTS, reduction: str = "batchmean") -> torch.Tensor:
    """Eq. 8: (λ/N) Σₙ [KL(Aᵀ_sp ‖ Aˢ_sp) + KL(Aᵀ_ch ‖ Aˢ_ch)] over N matched maps (lists, or dicts by name).
    The teacher maps are detached: the loss only moves the student."""
    return lam * sum(rfd_terms(teacher_feats, student_feats, tau, parts, reduction).values())


# ---- which maps: found on any nn.Module by one probing forward pass ----------------------------------------

Call = tuple[str, nn.Module, torch.Tensor | None, torch.Tensor]  # name, module, its input, its output


def _calls(model: nn.Module, example: torch.Tensor) -> list[Call]:
    """Every submodule called exactly once, with its input and output tensors, in the order their forwards end."""
    calls: list[Call] = []
    count: dict[str, int] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: object) -> None:
            count[name] = count.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                calls.append((name, module, x, output))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [c for c in calls if count[c[0]] == 1]


def finish_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, output shape) of every submodule called exactly once, in the order their forwards end."""
    return [(name, module, tuple(y.shape)) for name, module, _, y in _calls(model, example)]


def _area(t: torch.Tensor | None) -> int:
    return t.shape[2] * t.shape[3] if t is not None and t.ndim == 4 else 0


def find_stages(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The output of each stage before global pooling, in forward order: wherever a module down-samples its input
    map, the module that produced that input (the last to finish with it: `layer1`, not `layer1.2.relu3`). When
    several nested modules down-sample one resolution (a ResNet stage, its first block, a bottleneck's strided 3×3
    after its 1×1, an inverted residual's strided depthwise after its expansion), the outermost decides, so a
    block's inner layers never stand for a stage. An ImageNet-style stem counts as its own resolution; a final map
    pooled by a function rather than a module is the last 4-D output with more than one pixel."""
    calls = _calls(model, example)
    producer = {id(y): (i, name) for i, (name, _, _, y) in enumerate(calls)}  # the last finisher wins
    chosen: dict[tuple[int, ...], tuple[int, int, str]] = {}  # resolution: (depth, finish index, producer)
    for name, _, x, y in calls:
        if _area(x) > 1 and 0 < _area(y) < _area(x) or (_area(x) > 1 and y.ndim == 2):  # down-sampling or pooling
            if id(x) in producer:
                depth, (index, source) = name.count("."), producer[id(x)]
                res = tuple(x.shape[2:])
                if res not in chosen or depth < chosen[res][0]:
                    chosen[res] = (depth, index, source)
    last = [(i, name, tuple(y.shape[2:])) for i, (name, _, _, y) in enumerate(calls) if _area(y) > 1]
    if last and last[-1][2] not in chosen:
        i, name, res = last[-1]
        chosen[res] = (0, i, name)
    return [source for _, _, source in sorted(chosen.values(), key=lambda c: c[1])]


def find_units(model: nn.Module) -> list[str]:
    """Every residual unit's branch output (conv + BN before the add, in full precision), found on the traced
    graph: what the HAST, AKT and SynQ codes hook (hast.md §2, synq.md §5), not the whole block, whose output has
    passed the add, the ReLU and, in the Q model, the activation quantizer."""
    return residual_branches(model)


def resolve_layers(model: nn.Module, example: torch.Tensor, layers: str, flag: str = "--akt-layers") -> list[str]:
    """`stages`, `units`, or comma-separated module names (checked against the model); `flag` names the option in
    error messages."""
    if layers == "stages":
        found = find_stages(model, example)
    elif layers == "units":
        found = find_units(model)
    else:
        found = [n.strip() for n in layers.split(",") if n.strip()]
        modules = dict(model.named_modules())
        missing = [n for n in found if n not in modules]
        if missing:
            raise UserError(f"{flag}: no module named {', '.join(missing)} in {type(model).__name__} "
                            f"(stages here: {', '.join(find_stages(model, example))})")
    if not found:
        raise UserError(f"{flag} {layers}: no such feature maps in {type(model).__name__}; name the modules "
                        f"explicitly, e.g. {flag} {','.join(find_stages(model, example)) or 'features'}")
    return found


# ---- the transfer loss ----------------------------------------------------------------------------------------


@dataclass
class RFDOptions:
    """The refined feature distillation's own options, shared by `akt` and `akt+synq`."""

    akt_lambda: float | None = field(default=None, metadata={
        "help": f"λ of Eq. 8, on the KLs as --akt-reduction reduces them; default: the official code's weight, "
                f"{OFFICIAL_MAP_WEIGHT:.0e}·N maps under batchmean, {OFFICIAL_LAM:.0f}·N under sum"})
    akt_tau: float = field(default=8.0, metadata={"help": "temperature of the attention KLs"})
    akt_layers: str = field(default="stages", metadata={
        "help": "stages (last block per resolution, paper), units (every residual branch before its add, official "
                "code) or "
                "comma-separated module names"})
    akt_reduction: str = field(default="batchmean", metadata={
        "help": "batchmean, or sum over the batch as the official code (a given λ then weighs B times more)"})

    def check_rfd(self) -> None:
        if self.akt_lambda is not None and self.akt_lambda < 0:
            raise UserError(f"akt-lambda must be ≥ 0, got {self.akt_lambda}")
        if self.akt_tau <= 0:
            raise UserError(f"akt-tau must be > 0, got {self.akt_tau}")
        if self.akt_reduction not in ("batchmean", "sum"):
            raise UserError(f"akt-reduction must be batchmean or sum, got '{self.akt_reduction}'")

    def rfd_weight(self, n_maps: int) -> float:
        """λ: the given one, or the official effective weight for the chosen reduction (the official lam per map
        on batch sums; under batchmean, lam × its batch)."""
        if self.akt_lambda is not None:
            return self.akt_lambda
        per_map = OFFICIAL_LAM if self.akt_reduction == "sum" else OFFICIAL_MAP_WEIGHT
        return per_map * max(n_maps, 1)


AKT_BASES = ("kd", "kd+ce", "gap-entropy")  # the logit losses AKT's RFD is added to


@dataclass
class AKTOptions(GDFQLossOptions, RFDOptions):
    akt_alpha: float = field(default=0.5, metadata={"help": "weight α of the logit part: α·KD + (1−α)·RFD (convex)"})
    akt_combine: str = field(default="convex", metadata={
        "help": "convex: α·KD + (1−α)·RFD (paper Eq. 9); sum: KD + RFD (official code)"})
    akt_base: str = field(default="kd", metadata={"help": "logit loss under AKT: kd, kd+ce or gap-entropy"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_rfd()
        if not 0 <= self.akt_alpha <= 1:
            raise UserError(f"akt-alpha must be in [0, 1], got {self.akt_alpha}")
        if self.akt_combine not in ("convex", "sum"):
            raise UserError(f"akt-combine must be convex or sum, got '{self.akt_combine}'")
        self.akt_base = current_option("akt_base", self.akt_base)
        if self.akt_base not in AKT_BASES:
            raise UserError(f"akt-base must be {', '.join(AKT_BASES)}, got '{self.akt_base}'")

    def unused(self) -> dict[str, str]:
        """The options these choices leave without effect, each with what it applies to."""
        out = {}
        if self.akt_base != "kd+ce":
            out["ce_weight"] = "--akt-base kd+ce"
        if self.akt_base == "gap-entropy":
            out["kd_reduction"] = "--akt-base kd or kd+ce"
        if self.akt_combine == "sum":
            out["akt_alpha"] = "--akt-combine convex"
        return out


class AKTLoss(TransferLoss):
    """α·L_base + (1−α)·L_RFD (or their plain sum); logs the base terms, each attention KL and the weighted RFD."""

    def __init__(self, opts: AKTOptions, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.opts, self.parts = opts, parts
        base_cls = LOSSES.options_class(opts.akt_base)
        self.base = LOSSES.get(opts.akt_base)(base_cls(**{f.name: getattr(opts, f.name) for f in fields(base_cls)}))
        self.layers: list[str] = []

    def feature_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        self.layers = resolve_layers(model, example, self.opts.akt_layers)
        return self.layers

    @property
    def lam(self) -> float:
        return self.opts.rfd_weight(len(self.layers))

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        base, terms = self.base(inp)
        kls = rfd_terms([inp.t_feats[n] for n in self.layers], [inp.q_feats[n] for n in self.layers],
                        self.opts.akt_tau, self.parts, self.opts.akt_reduction)
        rfd = self.lam * sum(kls.values())
        a = self.opts.akt_alpha if self.opts.akt_combine == "convex" else None
        loss = base + rfd if a is None else a * base + (1 - a) * rfd
        return loss, {**terms, "base": base, **kls, "rfd": rfd}


@LOSSES.register("akt", options=AKTOptions)
def akt(opts: AKTOptions) -> AKTLoss:
    """AKT (arXiv 2412.19125): a logit loss plus refined feature distillation, spatial and channel attention KLs."""
    return AKTLoss(opts, ("spatial", "channel"))


@LOSSES.register("akt-spatial", options=AKTOptions)
def akt_spatial(opts: AKTOptions) -> AKTLoss:
    """AKT's ablation with the spatial-attention KL only."""
    return AKTLoss(opts, ("spatial",))


@LOSSES.register("akt-channel", options=AKTOptions)
def akt_channel(opts: AKTOptions) -> AKTLoss:
    """AKT's ablation with the channel-attention KL only."""
    return AKTLoss(opts, ("channel",))

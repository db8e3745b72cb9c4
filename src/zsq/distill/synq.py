"""SynQ (ICLR 2025, ../shared/specs/synq.md): HAST's transfer on low-pass filtered batches, plus Grad-CAM
alignment and difficulty-selective CE; `akt+synq` puts AKT's RFD in place of HAST's channel-attention MSE.

Three parts, each switchable (`--synq-parts lpf,cam,selce`):
- lpf: every Q-step batch is Gaussian low-pass filtered (after augmentation, before both models), since synthetic
  images carry high-frequency noise that real images lack (§2);
- cam: the Q model's Grad-CAM saliency at the last spatial conv follows the teacher's (§3);
- selce: CE on the synthetic labels, for the samples the teacher finds easy only (§4).
HAST's promotion is the loop's `--promote` pass (on by default in the synq presets): its direction is the gradient
of KD + λ_CE·selective CE + the alignment, and on the promoted batch the selective CE keeps the samples chosen on
the clean batch (synq.md §5); the CAM term is computed on the clean batch only and stays out of the direction, as
in the official code. The promoted batch's loss keeps the alignment term, as HAST's and SynQ's ImageNet code do;
SynQ's CIFAR code drops it there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .akt import RFDOptions, finish_order, resolve_layers, rfd_terms
from .base import LOSSES, TransferInputs, TransferLoss
from .hast import HASTLossOptions, WeightedKDOptions, fa_loss
from .logits import kd_loss

SYNQ_PARTS = ("lpf", "cam", "selce")
CAM_EPS = 1e-8  # min-max normalisation of a flat map gives 0, not 0/0


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---- low-pass filter (§2, Eq. 4) --------------------------------------------------------------------------------


def lowpass_mask(height: int, width: int, d0: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """G[v,u] = exp(−((u−W//2)² + (v−H//2)²) / (2·D0²)): a Gaussian centred on DC in the fftshift-ed spectrum."""
    v = torch.arange(height, device=device, dtype=torch.float32) - height // 2
    u = torch.arange(width, device=device, dtype=torch.float32) - width // 2
    return torch.exp(-(u[None, :] ** 2 + v[:, None] ** 2) / (2 * d0 * d0))


def low_pass(x: torch.Tensor, d0: float) -> torch.Tensor:
    """real(ifft2(ifftshift(G ⊙ fftshift(fft2(x))))) over the last two dims of a [..., H, W] batch, all images and
    channels at once. Shifting the mask instead of the spectrum is the same product, one permutation cheaper."""
    h, w = x.shape[-2:]
    mask = torch.fft.ifftshift(lowpass_mask(h, w, d0, x.device))
    out = torch.fft.ifft2(torch.fft.fft2(_at_least_fp32(x)) * mask).real
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


# ---- Grad-CAM (§3, Eq. 5) ---------------------------------------------------------------------------------------


def find_cam_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last convolution to run whose output is still spatial (> 1×1): Grad-CAM's usual layer. A classifier
    written as a 1×1 conv after pooling (MobileNetV2) is skipped, where the official code's last-conv rule gives
    a 1×1 map and so a CAM loss of 0."""
    convs = [name for name, module, shape in finish_order(model, example)
             if isinstance(module, nn.Conv2d) and len(shape) == 4 and shape[2] * shape[3] > 1]
    if not convs:
        raise UserError(f"no spatial convolution in {type(model).__name__} for Grad-CAM; name one with --cam-layer")
    return convs[-1]


def cam_score(logits: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """Σ over the batch of the logit Grad-CAM explains: the label's (paper) or the model's own top class (code).
    Samples do not interact (BN in eval mode), so one backward gives every sample's gradient."""
    idx = labels if target == "label" else logits.detach().argmax(1)
    return logits.float().gather(1, idx[:, None]).sum()


def cam_weights(acts: torch.Tensor, grads: torch.Tensor, kind: str = "gradcam") -> torch.Tensor:
    """[B,K,h,w] activations and ∂score/∂activations → [B,K] channel weights (constants).

    gradcam: the spatial mean of the gradient. gradcampp: Σ_hw α·ReLU(g) with α = g²/(2g² + Σ_hw A·g³) (zero
    denominators → 1). Grad-CAM++ weighs exp(score)·g; exp(score) is a positive per-sample factor that the min-max
    normalisation removes, and dropping it avoids the overflow to Inf at large logits."""
    a, g = _at_least_fp32(acts.detach()), _at_least_fp32(grads)
    if kind == "gradcam":
        return g.mean((2, 3))
    if kind == "gradcampp":
        g2 = g * g
        denom = 2 * g2 + (a * g2 * g).sum((2, 3), keepdim=True)
        alpha = g2 / torch.where(denom == 0, torch.ones_like(denom), denom)
        return (alpha * g.clamp(min=0)).sum((2, 3))
    raise UserError(f"cam-type must be gradcam or gradcampp, got '{kind}'")


def saliency(acts: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU(Σ_k w_k A_k), bilinearly upsampled to the input size and min-max normalised per sample: [B,1,H,W].
    Differentiable in `acts`; `weights` are constants."""
    s = F.relu((weights[:, :, None, None] * _at_least_fp32(acts)).sum(1, keepdim=True))
    s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
    lo = s.amin((2, 3), keepdim=True)
    hi = s.amax((2, 3), keepdim=True)
    return (s - lo) / (hi - lo + CAM_EPS)


def grad_cam(acts: torch.Tensor, score: torch.Tensor, size: tuple[int, int], kind: str = "gradcam",
             keep_graph: bool = False) -> torch.Tensor:
    """The saliency of `score` at `acts` (which must be in score's graph). `keep_graph` retains the graph, for a
    model whose loss still backpropagates through it (the Q model)."""
    (grads,) = torch.autograd.grad(score, acts, retain_graph=keep_graph)
    return saliency(acts, cam_weights(acts, grads, kind), size)


# ---- difficulty-selective CE (§4) -------------------------------------------------------------------------------


def selective_ce(t_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor,
                 tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/B)·Σ over samples with difficulty 1 − p_teacher(y) < τ of CE(Q(x), y), and the mask. The mean runs over
    the whole batch, as in the code: hard samples count as zeros."""
    p = F.softmax(t_logits.detach().float(), 1).gather(1, labels[:, None]).squeeze(1)
    keep = (1 - p) < tau
    ce = F.cross_entropy(q_logits.float(), labels, reduction="none")
    return (ce * keep).sum() / len(labels), keep


# ---- the transfer losses ----------------------------------------------------------------------------------------


@dataclass
class SynQPartOptions:
    """SynQ's own options, shared by `synq` and `akt+synq`."""

    synq_parts: str = field(default="lpf,cam,selce", metadata={
        "help": "comma-separated parts on top of the base transfer: lpf, cam, selce (or none)"})
    synq_d0: float = field(default=12.0, metadata={
        "help": "cut-off D0 of the Gaussian low-pass, in frequency pixels (12: measured for 32×32, "
                "benchmarks/lpf_d0.py; the code's 80 is for 224×224 and barely filters 32×32)"})
    synq_tau: float = field(default=0.5, metadata={"help": "difficulty threshold τ of the selective CE"})
    synq_ce_weight: float = field(default=5.0, metadata={"help": "λ_CE of the selective CE"})
    synq_cam_weight: float = field(default=200.0, metadata={"help": "λ_CAM of the Grad-CAM alignment"})
    cam_target: str = field(default="label", metadata={
        "help": "class Grad-CAM explains: label (paper Eq. 5) or pred, each model's own top class (code)"})
    cam_type: str = field(default="gradcam", metadata={"help": "gradcam or gradcampp"})
    cam_layer: str = field(default="auto", metadata={
        "help": "module whose output Grad-CAM reads: auto (last spatial conv) or a module name"})

    def check_synq(self) -> None:
        unknown = set(self.parts) - set(SYNQ_PARTS)
        if unknown:
            raise UserError(f"synq-parts: unknown part(s) {', '.join(sorted(unknown))}; choose from "
                            f"{', '.join(SYNQ_PARTS)} or none")
        if self.synq_d0 <= 0:
            raise UserError(f"synq-d0 must be > 0, got {self.synq_d0}")
        if not 0 <= self.synq_tau <= 1:
            raise UserError(f"synq-tau must be in [0, 1], got {self.synq_tau}")
        if self.synq_ce_weight < 0 or self.synq_cam_weight < 0:
            raise UserError("synq-ce-weight and synq-cam-weight must be ≥ 0")
        if self.cam_target not in ("label", "pred"):
            raise UserError(f"cam-target must be label or pred, got '{self.cam_target}'")
        if self.cam_type not in ("gradcam", "gradcampp"):
            raise UserError(f"cam-type must be gradcam or gradcampp, got '{self.cam_type}'")

    def unused(self) -> dict[str, str]:
        """The options of the parts switched off, each with what it applies to."""
        by_part = {"lpf": ("synq_d0",), "cam": ("synq_cam_weight", "cam_target", "cam_type", "cam_layer"),
                   "selce": ("synq_tau", "synq_ce_weight")}
        return {name: f"--synq-parts with {part}" for part, names in by_part.items() if part not in self.parts
                for name in names}

    @property
    def parts(self) -> tuple[str, ...]:
        names = [p.strip() for p in self.synq_parts.split(",") if p.strip()]
        return () if names == ["none"] else tuple(names)


@dataclass
class SynQOptions(HASTLossOptions, SynQPartOptions):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_synq()


@dataclass
class AKTSynQOptions(WeightedKDOptions, RFDOptions, SynQPartOptions):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_rfd()
        self.check_synq()


class SynQLoss(TransferLoss):
    """w_KD·T²·KD + alignment + λ_CE·selective CE + λ_CAM·MSE(CAMᵀ, CAMˢ), on the low-pass filtered batch.

    The alignment is HAST's λ_FA·channel-attention MSE over `--hast-layers` (`synq`) or AKT's λ·RFD over
    `--akt-layers` (`akt+synq`); the terms are summed, as the SynQ code does."""

    def __init__(self, opts: SynQOptions, align: str) -> None:
        super().__init__()
        self.opts, self.align, self.parts = opts, align, opts.parts
        self.layers: list[str] = []
        self.cam_layer = ""

    def feature_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        if self.align == "rfd":
            self.layers = resolve_layers(model, example, self.opts.akt_layers, "--akt-layers")
        else:
            self.layers = resolve_layers(model, example, self.opts.hast_layers, "--hast-layers")
        if "cam" not in self.parts:
            return self.layers
        layer = self.opts.cam_layer
        if layer == "auto":
            layer = find_cam_layer(model, example)
        elif layer not in dict(model.named_modules()):
            raise UserError(f"--cam-layer: no module named {layer} in {type(model).__name__} "
                            f"(the automatic choice would be {find_cam_layer(model, example)})")
        self.cam_layer, self.teacher_grad_layers = layer, (layer,)
        return list(dict.fromkeys([*self.layers, layer]))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return low_pass(x, self.opts.synq_d0) if "lpf" in self.parts else x

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.opts
        t_logits = inp.t_logits.detach()
        kd = kd_loss(t_logits, inp.q_logits, o.kd_temperature, o.kd_reduction)
        t_maps, q_maps = [inp.t_feats[n] for n in self.layers], [inp.q_feats[n] for n in self.layers]
        if self.align == "rfd":
            kls = rfd_terms(t_maps, q_maps, o.akt_tau, ("spatial", "channel"), o.akt_reduction)
            align = o.rfd_weight(len(self.layers)) * sum(kls.values())
            terms = {"kd": kd, **kls, "rfd": align}
        else:
            fa = fa_loss(t_maps, q_maps)
            align, terms = o.hast_fa_weight * fa, {"kd": kd, "fa": fa}
        loss = o.hast_kd_weight * kd + align
        if "selce" in self.parts:
            chooser = (inp.clean or inp).t_logits  # the promoted batch keeps the clean batch's easy samples
            ce, keep = selective_ce(chooser, inp.q_logits, inp.labels, o.synq_tau)
            loss = loss + o.synq_ce_weight * ce
            terms.update(selce=ce, selce_kept=keep.float().mean())
        return loss, terms

    def clean_only(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if "cam" not in self.parts:
            return None
        cam = self.cam_loss(inp)
        return self.opts.synq_cam_weight * cam, {"cam": cam}

    def cam_loss(self, inp: TransferInputs) -> torch.Tensor:
        """MSE between the teacher's and the Q model's saliency maps (mean over B×H×W); only the Q model's
        activations carry the gradient."""
        size = tuple(inp.x.shape[-2:])
        o = self.opts
        t_cam = grad_cam(inp.t_feats[self.cam_layer], cam_score(inp.t_logits, inp.labels, o.cam_target), size,
                         o.cam_type)
        q_cam = grad_cam(inp.q_feats[self.cam_layer], cam_score(inp.q_logits, inp.labels, o.cam_target), size,
                         o.cam_type, keep_graph=True)
        return F.mse_loss(q_cam, t_cam.detach())


@LOSSES.register("synq", options=SynQOptions)
def synq(opts: SynQOptions) -> SynQLoss:
    """SynQ (ICLR 2025): low-pass-filtered inputs, Grad-CAM alignment and difficulty-selective CE on HAST's feature
    alignment."""
    return SynQLoss(opts, "fa")


@LOSSES.register("akt+synq", options=AKTSynQOptions)
def akt_synq(opts: AKTSynQOptions) -> SynQLoss:
    """SynQ's terms with AKT's refined feature distillation in place of HAST's feature alignment."""
    return SynQLoss(opts, "rfd")

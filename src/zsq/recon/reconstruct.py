"""Post-training quantization by block reconstruction (BRECQ, Li et al. 2021) with learned rounding (AdaRound),
Genie-M's jointly learned weight steps, LSQ activation steps and QDrop, on a small set of images (synthetic:
Genie-D, HAST, ZeroQ; or real, as an upper bound). Spec: ../shared/specs/ptq.md §4.

The student is built by `zsq.quant.quantize_model` (so its quantizers sit where QAT's do, by the chosen placement)
with fixed weight ranges; each unit, in forward order, is fitted so that its output on the quantized prefix's
input matches the FP teacher's, then frozen at hard rounding. The result is an ordinary zsq student.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import UserError
from ..quant import QuantAct, QuantConfig, QuantConv2d, QuantLinear, quantize_model
from .lsq import LsqAct
from .rounding import LearnedRounding, beta_at
from ..graph import trace
from .units import Unit, block_names, find_units

WEIGHT_STEPS = ("learned", "fixed")
LOSSES = ("mse", "fisher")
# The fields whose user-facing name (keyword of zsq.ptq, CLI flag) differs from the field's.
USER_NAMES = {"iters": "iters_per_unit", "loss": "recon_loss"}


@dataclass
class ReconConfig:
    """Reconstruction, per unit. Defaults: Genie's official code (spec §4.3); BRECQ/QDrop use `lam` 0.01 and a
    fixed weight step."""
    iters: int = 20000  # optimisation steps per unit; 0: none (round-to-nearest at the searched steps: RTN)
    batch_size: int = 32
    warmup: float = 0.2  # share of the steps before the rounding penalty starts (β held at its start)
    beta_start: float = 20.0
    beta_end: float = 2.0
    lam: float = 1.0  # weight of the rounding penalty (Genie 1.0; BRECQ and QDrop 0.01)
    lr_round: float = 1e-3  # Adam on the soft bits V
    lr_weight_step: float = 1e-4  # Adam, cosine, on the per-channel weight steps (Genie-M)
    lr_act_step: float = 4e-5  # Adam, cosine, on the activation steps, jointly with V
    weight_step: str = "learned"  # "learned" (Genie-M) or "fixed" at the L2.4 search's step (AdaRound, BRECQ)
    qdrop: float = 0.5  # probability that an element stays at full precision while a unit is fitted (0: off)
    init_images: int = 32  # images the activation steps' range search sees
    # "mse" (all three official codes) or "fisher" (BRECQ's paper: errors weighted by (|∂KL/∂z| + 1)²)
    loss: str = "mse"

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1 or self.init_images < 1:
            raise UserError("PTQ iterations per unit must be ≥ 0, batch size and init images ≥ 1")
        if not 0 <= self.warmup < 1:
            raise UserError(f"PTQ warm-up is a share of the iterations in [0, 1), got {self.warmup}")
        if not 0 <= self.qdrop < 1:
            raise UserError(f"QDrop probability must be in [0, 1), got {self.qdrop}")
        if self.weight_step not in WEIGHT_STEPS:
            raise UserError(f"weight step must be one of {', '.join(WEIGHT_STEPS)}, got '{self.weight_step}'")
        if self.loss not in LOSSES:
            raise UserError(f"reconstruction loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.lam < 0:
            raise UserError(f"rounding penalty weight must be >= 0, got {self.lam}")
        fitted = {f.name for f in dataclasses.fields(self)} - {"iters", "init_images"}
        idle = {"lr_weight_step"} if self.weight_step == "fixed" else set()
        idle |= fitted if self.iters == 0 else set()
        given = sorted(name for name in idle if getattr(self, name) != getattr(ReconConfig, name))
        if given:
            why = "--iters-per-unit 0 (RTN fits nothing)" if self.iters == 0 else "--weight-step fixed"
            flag = USER_NAMES.get(given[0], given[0]).replace("_", "-")
            raise UserError(f"--{flag} does not apply with {why}")


class ReconLayer(nn.Module):
    """Stands in for one quantized conv or linear layer while the student is reconstructed: `mode` is "fp" (the
    teacher's weight), "soft" (learned soft bits) or "hard" (bits rounded to 0/1)."""

    def __init__(self, layer: QuantConv2d | QuantLinear, learn_step: bool) -> None:
        super().__init__()
        self.layer, self.learn_step = layer, learn_step
        self.rounding: LearnedRounding | None = None  # made when first quantized: its range search is costly
        self.mode = "hard"

    def quantizer(self) -> LearnedRounding:
        if self.rounding is None:
            self.rounding = LearnedRounding(self.layer.weight, self.layer.wbits, self.learn_step)
        return self.rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            w = self.layer.weight
        else:
            w = self.quantizer()(hard=self.mode == "hard").to(x.dtype)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    @torch.no_grad()
    def write_back(self) -> QuantConv2d | QuantLinear:
        """The student's layer with the hard-rounded weight and its fixed range."""
        rounding = self.quantizer()
        self.layer.weight.copy_(rounding(hard=True))
        lo, hi = rounding.weight_range()
        self.layer.w_lo.copy_(lo)
        self.layer.w_hi.copy_(hi)
        return self.layer


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _swap_in(student: nn.Module, learn_step: bool) -> None:
    """Replace the student's weight layers by ReconLayers and its activation quantizers by LsqActs, in place."""
    for name, m in list(student.named_modules()):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            _set_child(student, name, ReconLayer(m, learn_step))
    for m in student.modules():
        if isinstance(m, QuantAct):
            m.quant = LsqAct(m.quant)
            for i, q in enumerate(m.more):
                m.more[i] = LsqAct(q)


def _swap_out(student: nn.Module) -> None:
    for name, m in list(student.named_modules()):
        if isinstance(m, ReconLayer):
            _set_child(student, name, m.write_back())
    for m in student.modules():
        if isinstance(m, QuantAct):
            m.quant = m.quant.write_back()
            for i, q in enumerate(m.more):
                m.more[i] = q.write_back()


def _set_mode(modules: list[nn.Module], fp: bool) -> list[tuple[nn.Module, object]]:
    """Switch weight layers and activation quantizers to full precision (or back); returns what to restore."""
    saved: list[tuple[nn.Module, object]] = []
    for m in modules:
        if isinstance(m, ReconLayer):
            saved.append((m, m.mode))
            m.mode = "fp" if fp else m.mode
        elif isinstance(m, LsqAct):
            saved.append((m, m.enabled))
            m.enabled = not fp
    return saved


def _restore(saved: list[tuple[nn.Module, object]]) -> None:
    for m, value in saved:
        if isinstance(m, ReconLayer):
            m.mode = value
        else:
            m.enabled = value


def _reset_calls(units: list[Unit]) -> None:
    for u in units:
        for m in u.module.modules():
            if isinstance(m, QuantAct):
                m.call = 0


@torch.no_grad()
def _run(units: list[Unit], images: torch.Tensor, upto: int, fp: bool, chunk: int) -> torch.Tensor:
    """The input of unit `upto` for every image: through the FP teacher (`fp`) or the quantized prefix."""
    saved = _set_mode([m for u in units for m in u.module.modules()], fp)
    try:
        out = []
        for x in images.split(chunk):
            for u in units[:upto]:
                _reset_calls([u])
                x = u.module(x)
            out.append(x)
        return torch.cat(out)
    finally:
        _restore(saved)


def _unit_error(unit: Unit, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """Mean over images and positions of the channel-summed squared error of the unit's output."""
    with torch.no_grad():
        total = 0.0
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            _reset_calls([unit])
            total += float(_reconstruction_loss(unit.module(xs), ys)) * len(xs)
    return total / len(x)


def _reconstruction_loss(out: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over channels (dim 1) of the squared error, each element weighted by its squared output gradient `grad`
    if given (BRECQ's diagonal Fisher), averaged over images and positions."""
    err = (out - target).pow(2)
    return (err if grad is None else err * grad.pow(2)).sum(1).mean()


def output_gradients(units: list[Unit], x_q: torch.Tensor, log_p_fp: torch.Tensor, k: int,
                     chunk: int) -> torch.Tensor:
    """BRECQ's Fisher weights of unit k's output z, per image: |∂KL(p_fp ‖ p_q)/∂z| + 1, with the network
    quantized up to and including unit k (at its current rounding) and full precision after it. `x_q`: unit k's
    input from the quantized prefix; `log_p_fp`: the teacher's log-probabilities on the same images. Each image's
    KL is differentiated on its own; BRECQ's code takes the batch mean over 32 images, which scales g by 1/32 and
    ties the weights to its batch size."""
    rest = [m for u in units[k + 1:] for m in u.module.modules()]
    grads = []
    for x, p_fp in zip(x_q.split(chunk), log_p_fp.split(chunk), strict=True):
        with torch.no_grad():
            z = _run([units[k]], x, 1, fp=False, chunk=chunk)
        z.requires_grad_(True)
        saved = _set_mode(rest, fp=True)
        try:
            with torch.enable_grad():
                y = z
                for u in units[k + 1:]:
                    _reset_calls([u])
                    y = u.module(y)
                kl = F.kl_div(F.log_softmax(y, dim=1), p_fp, reduction="sum", log_target=True)
                (g,) = torch.autograd.grad(kl, z)
        finally:
            _restore(saved)
        grads.append(g.abs() + 1.0)
    return torch.cat(grads)


UnitDone = Callable[[int, dict, dict], None]  # (unit index, its record, the state to resume from)


def reconstruct_unit(unit: Unit, x_q: torch.Tensor, x_fp: torch.Tensor, y_fp: torch.Tensor, cfg: ReconConfig,
                     gen: torch.Generator, progress: bool = False,
                     fisher: Callable[[], torch.Tensor] | None = None) -> dict:
    """Fit one unit (its soft bits, weight and activation steps) to the FP output, then freeze it hard. `fisher`
    gives the output gradients that weight the loss (cfg.loss "fisher"), once the activation steps are set."""
    layers = [m for m in unit.module.modules() if isinstance(m, ReconLayer)]
    acts = [m for m in unit.module.modules() if isinstance(m, LsqAct)]
    for m in layers:
        m.mode = "hard"  # hard rounding at its initial V is round-to-nearest
    _reset_calls([unit])
    with torch.no_grad():
        unit.module(x_q[: cfg.init_images])  # each activation step found by the range search on its first input
    grad = fisher() if cfg.loss == "fisher" else None  # type: ignore[misc] - given whenever the loss is fisher
    before = _unit_error(unit, x_q, y_fp, 256)
    groups = [{"params": [m.rounding.v for m in layers], "lr": cfg.lr_round}]
    w_steps = [m.rounding.scale for m in layers if m.rounding.scale.requires_grad]
    step_groups = [{"params": w_steps, "lr": cfg.lr_weight_step}] if w_steps else []
    step_groups += [{"params": [m.scale for m in acts], "lr": cfg.lr_act_step}] if acts else []
    opt_v = torch.optim.Adam(groups) if layers else None
    opt_s = torch.optim.Adam(step_groups) if step_groups else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, cfg.iters, eta_min=0.0) if opt_s else None
    for m in layers:
        m.mode = "soft"
    for m in acts:
        m.drop = cfg.qdrop
    n = len(x_q)
    bar = tqdm(range(cfg.iters), desc=unit.name, disable=not progress, leave=False)
    try:
        for t in bar:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
            x = x_q[idx]
            if cfg.qdrop > 0:
                x = torch.where(torch.rand(x.shape, generator=gen) < cfg.qdrop, x_fp[idx], x)
            _reset_calls([unit])
            rec = _reconstruction_loss(unit.module(x), y_fp[idx], None if grad is None else grad[idx])
            loss = rec
            if t >= cfg.warmup * cfg.iters and layers:
                beta = beta_at(t, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
                loss = loss + cfg.lam * sum(m.rounding.penalty(beta) for m in layers)
            if not math.isfinite(float(loss.detach())):
                raise UserError(f"unit {unit.name}: the reconstruction loss is {float(loss.detach())} at iteration "
                                f"{t}: lower the learning rates (lr_act_step, lr_weight_step) or check the images")
            for opt in (opt_v, opt_s):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_v, opt_s):
                if opt is not None:
                    opt.step()
            if sched is not None:
                sched.step()
            if progress and t % 50 == 0:
                bar.set_postfix(rec=f"{float(rec.detach()):.4g}")
    finally:
        bar.close()
        for m in layers:
            m.mode = "hard"
        for m in acts:
            m.drop = 0.0
    after = _unit_error(unit, x_q, y_fp, 256)
    return {"name": unit.name, "mse_before": before, "mse_after": after, "layers": len(layers), "acts": len(acts)}


def prepare(teacher: nn.Module, quant: QuantConfig, recon: ReconConfig, units: list[str] | None = None
            ) -> tuple[nn.Module, list[Unit]]:
    """The student under reconstruction (weight layers and activation quantizers swapped for their learnable
    stand-ins) and its units in forward order. `units` names the blocks; by default they are read from the graph."""
    if quant.weight_range != "fixed":
        raise UserError("post-training quantization learns fixed weight ranges: QuantConfig(weight_range='fixed')")
    student = quantize_model(teacher, cfg=quant).eval()
    if quant.first_last == "8bit":
        edges = {site: 8 for site in edge_sites(student) if site not in quant.act_bits}
        student = quantize_model(teacher, cfg=dataclasses.replace(quant, act_bits={**quant.act_bits, **edges}))
    _swap_in(student, recon.weight_step == "learned")
    blocks = units if units is not None else block_names(teacher)
    return student, find_units(student, blocks, (ReconLayer, QuantAct), (ReconLayer,))


def edge_sites(qmodel: nn.Module) -> list[str]:
    """The activation quantizers whose tensors enter the second layer and the last one (through pooling): at 8 bits
    with 8-bit first and last layers, as Genie's and BRECQ's tables have the first block's and the classifier's
    inputs."""
    graph = trace(qmodel, (QuantAct,))
    if graph is None:
        raise UserError(f"{type(qmodel).__name__} cannot be traced by torch.fx: its first and last activations cannot "
                        f"be found for the 8-bit first/last policy (use first_last='same')")
    modules = dict(qmodel.named_modules())
    calls = [(n, modules[n.target]) for n in graph.nodes if n.op == "call_module"]
    layers = [i for i, (_, m) in enumerate(calls) if isinstance(m, (nn.Conv2d, nn.Linear))]
    acts = [i for i, (_, m) in enumerate(calls) if isinstance(m, QuantAct)]
    first = next((i for i in acts if i > layers[0]), None)
    last = next((i for i in reversed(acts) if i < layers[-1]), None)
    return list(dict.fromkeys(str(calls[i][0].target) for i in (first, last) if i is not None))


def finish(student: nn.Module) -> nn.Module:
    """The reconstructed student as an ordinary zsq student (QuantConv2d/QuantLinear, ActQuantizer)."""
    _swap_out(student)
    return student.eval()


def reconstruct(teacher: nn.Module, images: torch.Tensor, quant: QuantConfig, recon: ReconConfig,
                units: list[str] | None = None, seed: int = 0, progress: bool = False,
                on_unit: UnitDone | None = None, resume: dict[str, Any] | None = None) -> nn.Module:
    """A post-training quantized copy of `teacher`, reconstructed unit by unit on `images` (N, C, H, W).

    After each unit, `on_unit(k, record, state)` gets its record (output error before and after) and the state
    from which `resume=state` continues with unit k + 1, as if never stopped."""
    student, parts = prepare(teacher, quant, recon, units)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if resume is not None:
        start = _load_progress(student, parts, resume)
        gen.set_state(resume["rng"])
        torch.set_rng_state(resume["torch_rng"])
    # the teacher's log-probabilities, which every unit's Fisher weights compare against
    log_p_fp = (F.log_softmax(_run(parts, images, len(parts), fp=True, chunk=256), dim=1)
                if recon.loss == "fisher" else None)
    for k in range(start, len(parts)):
        unit = parts[k]
        x_fp = _run(parts, images, k, fp=True, chunk=256)
        y_fp = _run([unit], x_fp, 1, fp=True, chunk=256)
        x_q = _run(parts, images, k, fp=False, chunk=256)
        record = reconstruct_unit(unit, x_q, x_fp, y_fp, recon, gen, progress,
                                  lambda: output_gradients(parts, x_q, log_p_fp, k, chunk=256))
        if on_unit is not None:
            on_unit(k, record, {"units_done": k + 1, "student": student.state_dict(), "rng": gen.get_state(),
                                "torch_rng": torch.get_rng_state()})
    return finish(student)


def _load_progress(student: nn.Module, parts: list[Unit], state: dict[str, Any]) -> int:
    """Restore the fitted units of an interrupted reconstruction; returns how many there are."""
    done = state["units_done"]
    if not 0 < done <= len(parts):
        raise UserError(f"the saved reconstruction has {done} units done, this model {len(parts)} units")
    for unit in parts[:done]:
        for m in unit.module.modules():
            if isinstance(m, ReconLayer):
                m.quantizer()  # made before loading, as the fitted layers had them
    try:
        student.load_state_dict(state["student"])
    except RuntimeError as e:
        raise UserError(f"the saved reconstruction does not match this model ({str(e).splitlines()[0]})") from None
    return done

"""Build a fake-quantized copy of any classifier by module swap, and calibrate its activation ranges."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import torch
from torch import nn

from ..errors import UserError
from ..graph import module_calls, trace
from .fake import STE_MODES
from .modules import ActQuantizer, QuantAct, QuantConv2d, QuantLinear, count_calls
from .placement import check_placement, default_placement, place_deployable

FP_BITS = 32
ACTIVATIONS = (nn.ReLU, nn.ReLU6)
WEIGHT_RANGES = ("minmax", "fixed")


def check_bits(bits: int, what: str) -> None:
    if not (isinstance(bits, int) and (2 <= bits <= 8 or bits == FP_BITS)):
        raise UserError(f"{what} must be in 2..8 (or 32 for full precision), got {bits}")


@dataclass
class QuantConfig:
    wbits: int = 4
    abits: int = 4
    first_last: str = "same"  # "same": every layer at wbits (the papers); "8bit": first and last layer at 8 bits
    act_momentum: float = 0.9  # EMA momentum of activation ranges (the lineage uses 0.9)
    ste: str = "identity"  # straight-through estimator: "identity" everywhere (lineage) or "clipped" to [l, u]
    # weight bits per module name, overriding the rest (the Python API's; a run's config has none)
    layer_bits: dict[str, int] = field(default_factory=dict, metadata={"recorded": False})
    # activation bits per quantizer site (a QuantAct's name)
    act_bits: dict[str, int] = field(default_factory=dict, metadata={"recorded": False})
    # activation quantizers: "lineage" (after each ReLU) or "deployable" (zsq.quant.placement); None: the model's
    # default (default_placement), resolved by quantize_model
    placement: str | None = "lineage"
    # per-channel weight range: each forward's "minmax", or "fixed" buffers (PTQ's)
    weight_range: str = field(default="minmax", metadata={"recorded": False})

    def __post_init__(self) -> None:
        check_bits(self.wbits, "weight bits")
        check_bits(self.abits, "activation bits")
        for name, bits in self.layer_bits.items():
            check_bits(bits, f"weight bits of layer '{name}'")
        for name, bits in self.act_bits.items():
            check_bits(bits, f"activation bits of '{name}'")
        if self.first_last not in ("same", "8bit"):
            raise UserError(f"first/last-layer policy must be 'same' or '8bit', got '{self.first_last}'")
        if self.ste not in STE_MODES:
            raise UserError(f"ste must be one of {STE_MODES}, got '{self.ste}'")
        if self.placement is not None:
            check_placement(self.placement)
        if self.weight_range not in WEIGHT_RANGES:
            raise UserError(f"weight range must be one of {', '.join(WEIGHT_RANGES)}, got '{self.weight_range}'")
        if not 0 <= self.act_momentum < 1:
            raise UserError(f"activation EMA momentum must be in [0, 1), got {self.act_momentum}")


def _weight_bits(cfg: QuantConfig, names: list[str]) -> dict[str, int]:
    bits = {n: cfg.wbits for n in names}
    if cfg.first_last == "8bit" and names and cfg.wbits != FP_BITS:
        bits[names[0]] = bits[names[-1]] = 8
    for name, b in cfg.layer_bits.items():
        if name not in bits:
            raise UserError(f"layer_bits names '{name}', which is not a Conv2d/Linear of the model")
        bits[name] = b
    return bits


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantize_model(model: nn.Module, wbits: int | None = None, abits: int | None = None,
                   cfg: QuantConfig | None = None, **kwargs) -> nn.Module:
    """A fake-quantized copy of `model` (the original is untouched).

    Every Conv2d/Linear becomes a per-channel weight-quantized layer (first and last = the first and last in
    module order); every ReLU/ReLU6 module is followed by a per-tensor activation quantizer at each place the
    traced graph calls it (a module called twice gets two), so activations are quantized wherever they feed the
    next layer, including after each residual add's ReLU (placement `lineage`); the input image stays FP, as do
    the other tensors `zsq.quant.placement.float_tensors` lists, unless `placement="deployable"` quantizes them
    too. Models must use ReLU
    *modules* (a functional relu cannot be seen by a module swap); in a model that torch.fx cannot trace, a
    module called twice is refused by name at its second call. Activation ranges start uncalibrated: open them
    with `observe_ranges` or use `calibrate`.
    """
    if cfg is None:
        cfg = QuantConfig(wbits=4 if wbits is None else wbits, abits=4 if abits is None else abits, **kwargs)
    elif wbits is not None or abits is not None or kwargs:
        raise TypeError("pass either cfg or wbits/abits/keywords, not both")
    if cfg.placement is None:
        cfg = replace(cfg, placement=default_placement(model))
    qmodel = copy.deepcopy(model)
    layers = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              and not isinstance(m, (QuantConv2d, QuantLinear))]
    if not layers:
        raise UserError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    bits = _weight_bits(cfg, layers)
    for name in layers:
        if bits[name] == FP_BITS:
            continue
        layer = qmodel.get_submodule(name)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _set_child(qmodel, name, cls.from_float(layer, bits[name], cfg.ste, cfg.weight_range == "fixed"))
    if cfg.abits != FP_BITS:
        wrapped = {id(m.act) for m in qmodel.modules() if isinstance(m, QuantAct)}
        acts = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, ACTIVATIONS) and id(m) not in wrapped]
        graph = trace(qmodel, (QuantAct,))
        calls = module_calls(graph) if graph is not None else None
        for name, act in acts:
            n = max(calls[name], 1) if calls is not None else 0
            quant = ActQuantizer(cfg.act_bits.get(name, cfg.abits), cfg.act_momentum, cfg.ste)
            _set_child(qmodel, name, QuantAct(act, quant, n, name))
        if any(m.calls != 1 for m in qmodel.modules() if isinstance(m, QuantAct)):
            count_calls(qmodel)
        if cfg.placement == "deployable":
            place_deployable(qmodel, cfg.abits, cfg.act_momentum, cfg.ste, cfg.act_bits)
        sites = {n for n, m in qmodel.named_modules() if isinstance(m, QuantAct)}
        unknown = sorted(set(cfg.act_bits) - sites)
        if unknown:
            raise UserError(f"act_bits names '{unknown[0]}', which is not an activation quantizer site of the model")
    qmodel.zsq_quant = asdict(cfg)
    return qmodel


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def observe_ranges(model: nn.Module, on: bool = True) -> None:
    """Open (on=True) or freeze (on=False) every activation range of the model."""
    for q in act_quantizers(model):
        q.observing = on


@torch.no_grad()
def calibrate(model: nn.Module, inputs: Iterable[torch.Tensor], reset: bool = True) -> nn.Module:
    """Set activation ranges from `inputs` (model in eval mode), then freeze them."""
    was_training = model.training
    model.eval()
    if reset:
        for q in act_quantizers(model):
            q.reset()
    observe_ranges(model, True)
    try:
        for x in inputs:
            model(x)
    finally:
        observe_ranges(model, False)
    model.train(was_training)
    return model


def gaussian_inputs(n_batches: int, batch_size: int, shape: tuple[int, ...], seed: int = 0,
                    device: str = "cpu") -> Iterable[torch.Tensor]:
    """N(0, 1) images in the model's normalised input space: the 'no data at all' calibration baseline."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield torch.randn((batch_size, *shape), generator=gen).to(device)

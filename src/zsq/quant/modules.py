"""Fake-quantized layers (module swaps, torchao-style `from_float` / `to_float`) and the activation quantizer."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .fake import fake_quantize, per_channel_range


class _QuantWeight:
    """Per-output-channel fake quantization of `self.weight`, its range recomputed from the current FP weights at
    every forward (the FP weight is the trainable shadow copy; the bias stays FP), or held fixed in the buffers
    `w_lo`/`w_hi` (`fixed_range`): a post-training student's learned steps are not the min and max of its
    rounded weights, whose extreme codes may be unused."""

    weight: torch.Tensor
    wbits: int
    ste: str
    fixed_range: bool = False

    def _adopt(self, layer: nn.Module, wbits: int, ste: str, fixed_range: bool):
        """Take the float layer's weights, then the quantizer's settings (a fixed range from those weights)."""
        self.load_state_dict(layer.state_dict())
        self.wbits, self.ste = wbits, ste
        self._fix_range(fixed_range)
        return self

    def _fix_range(self, fixed: bool) -> None:
        self.fixed_range = fixed
        if fixed:
            lo, hi = per_channel_range(self.weight)
            self.register_buffer("w_lo", lo.clone())
            self.register_buffer("w_hi", hi.clone())

    def weight_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each output channel's [lo, hi], shaped to broadcast against the weight."""
        return (self.w_lo, self.w_hi) if self.fixed_range else per_channel_range(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, *self.weight_range(), self.wbits, self.ste)

    def float_state(self) -> dict[str, torch.Tensor]:
        """The state of the float layer this one was made from."""
        return {k: v for k, v in self.state_dict().items() if k not in ("w_lo", "w_hi")}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, wbits={self.wbits}"


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """Conv2d with a per-output-channel fake-quantized weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, wbits: int, ste: str = "identity", fixed_range: bool = False
                   ) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        return q._adopt(conv, wbits, ste, fixed_range)

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode)
        conv.load_state_dict(self.float_state())
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantWeight, nn.Linear):
    """Linear with a per-output-row fake-quantized weight."""

    @classmethod
    def from_float(cls, linear: nn.Linear, wbits: int, ste: str = "identity", fixed_range: bool = False
                   ) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                dtype=linear.weight.dtype)
        return q._adopt(linear, wbits, ste, fixed_range)

    def to_float(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.load_state_dict(self.float_state())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


MAX_QUANTILE_ELEMENTS = 1 << 20  # a strided sample of larger batches: torch.quantile sorts its input


def batch_range(x: torch.Tensor, percentile: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's min and max, or its (100 − p)-th and p-th percentiles (linear interpolation)."""
    if percentile >= 100:
        return x.amin().float(), x.amax().float()
    flat = x.flatten().float()
    flat = flat[:: max(1, flat.numel() // MAX_QUANTILE_ELEMENTS)]
    q = torch.tensor([1 - percentile / 100, percentile / 100], device=flat.device)
    lo, hi = torch.quantile(flat, q)
    return lo, hi


def learned_fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = lo + s·clamp(round((x − lo)/s), 0, n) with s = (hi − lo)/n and a gradient for hi (LSQ, Esser et al.
    2020): ∂x̂/∂s is round(v) − v inside the range and n above it, scaled by g = 1/√(numel·n) so the range moves at
    the pace of the weights; x gets the clipped straight-through gradient.

    The parameter is hi = lo + n·s, not LSQ's s: for SGD (with momentum and weight decay) to move hi as LSQ moves
    n·s, hi's gradient is n²·g·∂L/∂hi (= n·g·∂L/∂s). With g alone, a 3-bit range moved 49 times slower than LSQ's,
    which at the quick preset's step left it where its initialisation put it."""
    n = 2**bits - 1
    grad_scale = n * n / math.sqrt(x[0].numel() * n)
    hi = hi * grad_scale + (hi - hi * grad_scale).detach()  # value hi, gradient × grad_scale
    s = ((hi - lo) / n).clamp_min(1e-8)
    v = (x - lo) / s
    q = torch.clamp(v + (torch.round(v) - v).detach(), 0, n)
    return q * s + lo


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantizer with an EMA range.

    While `observing` (the warm-up), each forward folds the batch min/max into an exponential moving average,
    bias-corrected (m_t / (1 − βᵗ)), so the first batches are not pulled toward the zero initialisation. When
    frozen, [lo, hi] stay fixed; they are buffers, so checkpoints and exports carry them.
    """

    def __init__(self, bits: int, momentum: float = 0.9, ste: str = "identity") -> None:
        super().__init__()
        self.bits, self.momentum, self.ste = bits, momentum, ste
        self.observing = False
        self.percentile = 100.0  # the batch statistic observed: min/max at 100, else these percentiles
        self.calibrated = False  # a Python flag, so the frozen forward never syncs to read `steps`
        self.learned = False  # hi trained by gradient (the `learned` range setter), mirrored into `hi`
        self.zero_in_range = False  # widen each batch range to hold 0 (a tensor a zero-padded conv reads)
        self.hi_param: nn.Parameter | None = None
        self.register_buffer("ema_min", torch.zeros(()))
        self.register_buffer("ema_max", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold the batch's range into the EMA; a batch with a NaN/Inf range is left out (without a device sync),
        so that one bad batch cannot poison the range for the rest of the run."""
        m = self.momentum
        self.calibrated = True
        lo, hi = batch_range(x.detach(), self.percentile)
        if self.zero_in_range:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        ok = torch.isfinite(lo) & torch.isfinite(hi)
        self.steps += ok.long()
        self.ema_min.copy_(torch.where(ok, m * self.ema_min + (1 - m) * lo, self.ema_min))
        self.ema_max.copy_(torch.where(ok, m * self.ema_max + (1 - m) * hi, self.ema_max))
        correction = 1 - torch.pow(torch.tensor(m, device=x.device), self.steps.float())
        self.lo.copy_(torch.where(self.steps > 0, self.ema_min / correction, self.lo))
        self.hi.copy_(torch.where(self.steps > 0, self.ema_max / correction, self.hi))

    def reset(self) -> None:
        for buf in (self.ema_min, self.ema_max, self.steps, self.lo, self.hi):
            buf.zero_()
        self.calibrated = False

    def learn_range(self) -> nn.Parameter:
        """Make hi a trainable parameter, initialised from the current range (LSQ-style step-size gradient)."""
        if self.hi_param is None:
            self.hi_param = nn.Parameter(self.hi.detach().clone())
        self.learned = True
        return self.hi_param

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """A learned hi is saved as the plain `hi` buffer: checkpoints keep one format, any quantizer loads them."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.hi_param is not None:
            param = destination.pop(prefix + "hi_param")
            if self.learned:
                destination[prefix + "hi"] = param if keep_vars else param.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.hi_param is not None and prefix + "hi" in state_dict:
            state_dict[prefix + "hi_param"] = state_dict[prefix + "hi"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.calibrated = bool(self.steps.item() > 0 or self.hi.item() > self.lo.item())  # observed, or set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ on the float32 grid of [lo, hi] whatever the input's dtype: under bf16 autocast the scale, zero point
        and codes are those of evaluation and export, and only the result is carried in bf16."""
        if self.observing:
            self.observe(x)
        elif not self.calibrated:
            raise RuntimeError("activation range not calibrated: run zsq.quant.calibrate(model, batches) first")
        xf = x.float()
        if self.learned and self.hi_param is not None:
            with torch.no_grad():
                self.hi.copy_(self.hi_param)
            return learned_fake_quantize(xf, self.lo, self.hi_param, self.bits).to(x.dtype)
        return fake_quantize(xf, self.lo, self.hi, self.bits, self.ste).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


class QuantAct(nn.Module):
    """An activation function followed by its quantizers: the module that replaces each ReLU/ReLU6.

    A module called at several places of the forward (a torchvision block's one `self.relu`) quantizes tensors of
    different ranges there, so each call gets its own quantizer: `quant` the first, `more[i]` the (i+2)-th, in
    execution order. `calls` is how many calls the traced graph showed, or 0 when the model could not be traced;
    then a second call in one forward is refused by name, since nothing else tells the calls apart. The call
    counter is reset before every forward of the model (`count_calls`)."""

    def __init__(self, act: nn.Module, quant: ActQuantizer, calls: int = 1, site: str = "") -> None:
        super().__init__()
        self.act, self.quant, self.calls, self.site = act, quant, calls, site
        self.more = nn.ModuleList(copy.deepcopy(quant) for _ in range(calls - 1))
        self.call = 0

    def quantizers(self) -> list[ActQuantizer]:
        return [self.quant, *self.more]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls == 1:
            return self.quant(self.act(x))
        i, self.call = self.call, self.call + 1
        if self.calls == 0 and i > 0:
            raise UserError(f"module {self.site} is called more than once per forward, so each call needs its own "
                            f"activation quantizer, and the model cannot be traced by torch.fx to tell the calls "
                            f"apart: give each call its own activation module")
        return self.quantizers()[i % max(self.calls, 1)](self.act(x))


def _reset_calls(model: nn.Module, args: tuple) -> None:
    for m in model.modules():
        if isinstance(m, QuantAct):
            m.call = 0


def count_calls(model: nn.Module) -> None:
    """Reset the per-call counters of `model`'s QuantActs before each of its forwards (a plain function as the
    hook, so that a deep copy of the model resets its own)."""
    model.register_forward_pre_hook(_reset_calls)

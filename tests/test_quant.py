"""Fake quantization against the spec's formulas (quantizer.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zsq.errors import UserError
from zsq.models import create_model
from zsq.quant import (ActQuantizer, QuantAct, QuantConfig, QuantConv2d, QuantLinear, act_quantizers, calibrate,
                       fake_quantize, gaussian_inputs, per_channel_range, quant_params, quantize_model)


def reference(x: torch.Tensor, lo: float, hi: float, k: int) -> torch.Tensor:
    """The spec's formula, written out in plain Python floats; x / S as x · (1 / S), as torch's kernels (at a
    rounding tie the two can pick different codes)."""
    s = max((hi - lo) / (2**k - 1), 1e-8)
    z = round(-lo / s)
    out = [s * (min(max(round(v * (1 / s)) + z, 0), 2**k - 1) - z) for v in x.tolist()]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_fake_quantize_matches_formula(k):
    x = torch.linspace(-1.7, 2.9, 301, dtype=torch.float64)
    got = fake_quantize(x, torch.tensor(-1.3, dtype=torch.float64), torch.tensor(2.1, dtype=torch.float64), k)
    torch.testing.assert_close(got, reference(x, -1.3, 2.1, k), rtol=0, atol=1e-12)
    assert got.unique().numel() <= 2**k


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_fake_quantize_equals_torch_in_float32(k):
    """Bit for bit against torch's own fake quantizers in float32, on random values, on the rounding ties (and
    their float neighbours) where x / S and x · (1 / S) part ways, and at ±inf, which saturate."""
    lo, hi = torch.tensor(-1.1), torch.tensor(2.3)
    s, z = quant_params(lo, hi, k)
    mid = s * (torch.arange(-3, 2**k + 3) + 0.5)
    x = torch.cat([torch.randn(200_000) * 1.3, mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1),
                   torch.tensor([float("inf"), -float("inf")])])
    got = fake_quantize(x, lo, hi, k)
    assert torch.equal(got, torch.fake_quantize_per_tensor_affine(x, s.item(), int(z), 0, 2**k - 1))
    assert got.unique().numel() <= 2**k  # every output exactly on the grid
    w = torch.randn(16, 3, 3, 3)
    q = QuantConv2d.from_float(nn.Conv2d(3, 16, 3, bias=False), wbits=k)
    with torch.no_grad():
        q.weight.copy_(w)
    ws, wz = quant_params(*per_channel_range(w), k)
    ref = torch.fake_quantize_per_channel_affine(w, ws.flatten(), wz.flatten().int(), 0, 0, 2**k - 1)
    assert torch.equal(q.quantized_weight(), ref)


def test_grid_points_are_fixed_and_range_ends_representable():
    lo, hi, k = torch.tensor(-0.75), torch.tensor(1.5), 3
    s, z = quant_params(lo, hi, k)
    grid = s * (torch.arange(2**k) - z)
    torch.testing.assert_close(fake_quantize(grid, lo, hi, k), grid)
    # l and u land within one rounding of Z (at most half a step) of a grid point
    q = fake_quantize(torch.stack([lo, hi]), lo, hi, k)
    assert (q - torch.stack([lo, hi])).abs().max() <= s / 2 + 1e-6


def test_scale_guard_on_degenerate_range():
    x = torch.full((5,), 0.3)
    s, _ = quant_params(torch.tensor(0.3), torch.tensor(0.3), 4)
    assert s.item() == pytest.approx(1e-8)
    assert torch.isfinite(fake_quantize(x, torch.tensor(0.3), torch.tensor(0.3), 4)).all()


def test_ste_identity_and_clipped():
    x = torch.tensor([-2.0, -0.5, 0.2, 0.9, 3.0], requires_grad=True)
    fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 3).sum().backward()
    assert torch.equal(x.grad, torch.ones(5))
    x.grad = None
    fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), 3, ste="clipped").sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("k", [2, 4])
def test_the_clipped_ste_passes_the_whole_gradient_at_the_range_ends(k):
    """∂x̂/∂x = 1 on [l, u], ends included (quantizer.md), as torch's own fake quantizer has it. Each channel's
    smallest and largest weight lie at its ends; torch.minimum / torch.maximum, used before, gave them half."""
    x = torch.tensor([-2.0, -1.0, 0.2, 1.0, 3.0], requires_grad=True)
    fake_quantize(x, torch.tensor(-1.0), torch.tensor(1.0), k, ste="clipped").sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    q = QuantConv2d.from_float(nn.Conv2d(3, 16, 3, bias=False), wbits=k, ste="clipped")
    w = q.weight.detach().clone().requires_grad_()
    g = torch.randn(16, 3, 3, 3)
    q.quantized_weight().backward(g)
    ws, wz = quant_params(*per_channel_range(w), k)
    torch.fake_quantize_per_channel_affine(w, ws.flatten(), wz.flatten().int(), 0, 0, 2**k - 1).backward(g)
    assert torch.equal(q.weight.grad, w.grad) and torch.equal(w.grad, g)


def test_per_channel_weights_are_independent():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    q = QuantConv2d.from_float(conv, wbits=3)
    before = q.quantized_weight().detach().clone()
    with torch.no_grad():
        q.weight[2] *= 7.0
    after = q.quantized_weight().detach()
    keep = [0, 1, 3]
    assert torch.equal(before[keep], after[keep])
    assert not torch.equal(before[2], after[2])
    for c in range(4):
        assert after[c].unique().numel() <= 2**3
        lo, hi = q.weight[c].min().item(), q.weight[c].max().item()
        torch.testing.assert_close(after[c].flatten().double(), reference(q.weight[c].flatten().detach(), lo, hi, 3),
                                   rtol=0, atol=1e-6)


def test_per_channel_range_shapes():
    w = torch.randn(5, 3, 2, 2)
    lo, hi = per_channel_range(w)
    assert lo.shape == (5, 1, 1, 1)
    torch.testing.assert_close(hi.flatten(), w.flatten(1).amax(1))


def test_quant_linear_matches_manual():
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(lin, wbits=4)
    x = torch.randn(3, 6)
    w = torch.stack([reference(lin.weight[r].detach(), lin.weight[r].min().item(), lin.weight[r].max().item(), 4)
                     for r in range(4)]).float()
    torch.testing.assert_close(q(x), x @ w.T + lin.bias, rtol=1e-5, atol=1e-5)
    assert isinstance(q.to_float(), nn.Linear) and torch.equal(q.to_float().weight, lin.weight)


def test_act_quantizer_ema_with_bias_correction_then_frozen():
    aq = ActQuantizer(bits=4, momentum=0.9)
    aq.observing = True
    maxima = [2.0, 4.0, 3.0]
    raw = 0.0
    for t, m in enumerate(maxima, start=1):
        aq(torch.tensor([0.0, m]))
        raw = 0.9 * raw + 0.1 * m
        assert aq.hi.item() == pytest.approx(raw / (1 - 0.9**t))
    assert aq.lo.item() == 0.0
    aq.observing = False
    hi = aq.hi.item()
    aq(torch.tensor([0.0, 100.0]))
    assert aq.hi.item() == hi  # frozen
    out = aq(torch.linspace(0, hi, 50))
    assert out.unique().numel() <= 16


def test_uncalibrated_act_quantizer_refuses():
    with pytest.raises(RuntimeError, match="not calibrated"):
        ActQuantizer(4)(torch.ones(3))


def test_resnet20_surgery_counts_and_teacher_untouched():
    teacher = create_model("resnet20", in_channels=1)
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    q = quantize_model(teacher, 4, 4)
    assert sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in q.modules()) == 22  # 21 convs + the linear
    assert len(act_quantizers(q)) == 19  # one per ReLU, as in the lineage
    assert not any(isinstance(m, (QuantConv2d, QuantAct)) for m in teacher.modules())
    assert all(torch.equal(ref[k], v) for k, v in teacher.state_dict().items())


def test_bits_32_is_identity():
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1).eval()
    q = quantize_model(m, 32, 32).eval()
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(m(x), q(x))


class SmallCNN(nn.Module):
    """A classifier that is not one of ours: conv-bn-relu6 twice, a residual add, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.r1(self.b1(self.c1(x)))
        h = self.r2(self.b2(self.c2(h)) + h)
        return self.head(h.mean((2, 3)))


def test_custom_cnn_quantizes_and_8bit_policy():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    q = quantize_model(m, 3, 4, first_last="8bit")
    assert [type(x).__name__ for x in (q.c1, q.c2, q.head)] == ["QuantConv2d", "QuantConv2d", "QuantLinear"]
    assert (q.c1.wbits, q.c2.wbits, q.head.wbits) == (8, 3, 8)
    assert isinstance(q.r1, QuantAct) and isinstance(q.r2, QuantAct)
    calibrate(q, gaussian_inputs(2, 16, (3, 8, 8)))
    x = torch.randn(16, 3, 8, 8)
    h = q.r1(q.b1(q.c1(x)))
    assert h.unique().numel() <= 16
    sqnr = 10 * torch.log10(m(x).pow(2).mean() / (m(x) - q(x)).pow(2).mean())
    assert sqnr > 10  # a working quantized model, not noise


def test_8bit_fake_quant_is_close_to_fp():
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1).eval()
    for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.0)  # non-trivial residual branches
    q = quantize_model(m, 8, 8)
    calibrate(q, gaussian_inputs(4, 32, (1, 32, 32)))
    x = torch.randn(32, 1, 32, 32)
    sqnr = 10 * torch.log10(m(x).pow(2).mean() / (m(x) - q(x)).pow(2).mean())
    assert sqnr > 25


@pytest.mark.parametrize("bits", [0, 1, 9, 33])
def test_bits_out_of_range(bits):
    with pytest.raises(UserError, match="2..8"):
        QuantConfig(wbits=bits, abits=4)
    with pytest.raises(UserError, match="2..8"):
        QuantConfig(wbits=4, abits=bits)


def test_layer_bits_override_and_unknown_layer():
    m = SmallCNN()
    q = quantize_model(m, 4, 4, layer_bits={"c2": 2})
    assert q.c2.wbits == 2
    with pytest.raises(UserError, match="nope"):
        quantize_model(m, 4, 4, layer_bits={"nope": 2})


def test_frozen_eval_is_deterministic_and_state_dict_roundtrip():
    torch.manual_seed(0)
    q = quantize_model(create_model("resnet20", in_channels=1), 4, 4)
    calibrate(q, gaussian_inputs(2, 8, (1, 32, 32)))
    x = torch.randn(4, 1, 32, 32)
    q.eval()
    assert torch.equal(q(x), q(x))
    q2 = quantize_model(create_model("resnet20", in_channels=1), 4, 4)
    q2.load_state_dict(q.state_dict())
    q2.eval()
    assert torch.equal(q(x), q2(x))


class _SharedReLUBlock(nn.Module):
    """A torchvision-style basic block: one `self.relu`, called inside the branch and after the add."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _SharedReLUNet(nn.Module):
    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.stem, self.relu, self.block = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), _SharedReLUBlock()
        self.fc, self.traceable = nn.Linear(4, 3), traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 0
        return self.fc(self.block(self.relu(self.stem(x))).mean((2, 3)))


def test_a_module_called_twice_gets_a_quantizer_per_call():
    torch.manual_seed(0)
    net = _SharedReLUNet()
    q = quantize_model(net, 4, 4)
    x = torch.randn(8, 1, 8, 8)
    seen = []  # what the shared ReLU returns at each call, before its quantizer
    q.block.relu.act.register_forward_hook(lambda m, i, out: seen.append(out.max().item()))
    calibrate(q, [x])  # one batch: the bias-corrected EMA is that batch's min and max
    first, second = q.block.relu.quantizers()
    assert first.hi.item() == pytest.approx(seen[0]) and second.hi.item() == pytest.approx(seen[1])
    assert first.hi.item() != pytest.approx(second.hi.item())
    q(x)
    q(x)  # the counters start again at every forward
    assert len(act_quantizers(q)) == 3
    again = quantize_model(net, 4, 4)  # the checkpoint layout: a rebuilt model loads the saved ranges
    again.load_state_dict(q.state_dict())
    assert torch.equal(again(x), q(x))


def test_an_untraceable_model_calling_a_module_twice_is_refused_by_name():
    q = quantize_model(_SharedReLUNet(traceable=False), 4, 4)
    with pytest.raises(UserError, match="module block.relu is called more than once"):
        calibrate(q, [torch.randn(2, 1, 8, 8)])


def test_bf16_autocast_quantizes_on_the_float32_grid():
    q = ActQuantizer(3)
    q.lo.fill_(-0.3)
    q.hi.fill_(1.7)
    q.calibrated = True
    x = torch.randn(4096).to(torch.bfloat16)
    want = fake_quantize(x.float(), q.lo, q.hi, 3).to(torch.bfloat16)
    assert torch.equal(q(x), want)


def test_a_nonfinite_batch_never_reaches_the_range_ema():
    q = ActQuantizer(4)
    q.observing = True
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([float("nan"), 1.0]))  # skipped: one bad generator batch must not poison the range
    q(torch.tensor([float("inf"), 1.0]))
    assert (q.lo.item(), q.hi.item(), q.steps.item()) == (0.0, pytest.approx(2.0), 1)
    q(torch.tensor([-1.0, 1.0]))
    assert q.steps.item() == 2 and q.lo.item() == pytest.approx(-1.0 * 0.1 / (1 - 0.81))

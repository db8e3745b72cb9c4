"""Activation range setters: BN-prior bounds against the formula, percentiles on a known distribution, the loop."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_GEN_KW, quantize_tiny
from torch import nn

from zsq.errors import UserError
from zsq.models import load_model
from zsq.quant import (ActQuantizer, QuantAct, act_quantizers, batch_range, bn_bounds, calibrate,
                       create_range_setter, quantize_model)
from zsq.quant.modules import learned_fake_quantize
from zsq.train import build_job, resolve_config


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))  # negative γ too: the bound uses |γ|
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


class Residual(nn.Module):
    """conv → BN → ReLU(q1) → conv → BN → (+ q1's output) → ReLU(q2) → pool → conv without BN → ReLU(q3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), _bn(4, 0)
        self.act1 = QuantAct(nn.ReLU(), ActQuantizer(3))
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), _bn(4, 1)
        self.act2 = QuantAct(nn.ReLU(), ActQuantizer(3))
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.act3 = QuantAct(nn.ReLU(), ActQuantizer(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.act2(self.bn2(self.conv2(a)) + a)
        return self.act3(self.conv3(self.pool(b)))


def test_bn_prior_matches_the_formula():
    m, k = Residual().eval(), 2.5
    bounds = bn_bounds(m, k)
    u1 = torch.relu(m.bn1.bias + k * m.bn1.weight.abs())
    u2 = torch.relu(m.bn2.bias + k * m.bn2.weight.abs() + u1)
    assert set(bounds) == {m.act1.quant, m.act2.quant}  # a conv without BN before act3: no bound
    assert bounds[m.act1.quant] == pytest.approx(u1.max().item())
    assert bounds[m.act2.quant] == pytest.approx(u2.max().item())


def _rectified(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ReLU(N(mean, std²)) per channel, by sampling: an independent check of the closed form."""
    z = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(0))
    r = torch.relu(mean.view(1, -1) + std.view(1, -1) * z)
    return r.mean(0), r.std(0)


def test_bn_prior_moments_matches_the_formula():
    m, k = Residual().eval(), 2.5
    bounds = bn_bounds(m, k, "moments")
    g1, g2 = m.bn1.weight.detach().abs(), m.bn2.weight.detach().abs()
    mean1, std1 = _rectified(m.bn1.bias.detach(), g1)  # q1's output, the shortcut
    mean2 = m.bn2.bias.detach() + mean1  # a sum adds the means and the variances
    std2 = (g2 ** 2 + std1 ** 2).sqrt()
    assert bounds[m.act1.quant] == pytest.approx(torch.relu(m.bn1.bias + k * g1).max().item())
    assert bounds[m.act2.quant] == pytest.approx(torch.relu(mean2 + k * std2).max().item(), rel=5e-3)
    assert bounds[m.act2.quant] < bn_bounds(m, k)[m.act2.quant]  # tighter than adding the bounds
    with pytest.raises(UserError, match="bn-propagate"):
        bn_bounds(m, k, "moment")


def test_bn_setters_set_or_clamp_hi():
    m = Residual().eval()
    x = [torch.randn(8, 1, 8, 8) * 50]  # wide inputs: EMA ranges far above the BN bounds
    bounds = bn_bounds(m, 3.0)
    for name in ("bn-prior", "bn-clamp"):
        setter = create_range_setter(name, {"bn_k": 3.0})
        setter.prepare(m)
        calibrate(m, x)
        ema3 = m.act3.quant.hi.item()
        setter.finish(m)
        assert m.act1.quant.hi.item() == pytest.approx(bounds[m.act1.quant])
        assert m.act2.quant.hi.item() == pytest.approx(bounds[m.act2.quant])
        assert m.act3.quant.hi.item() == ema3  # no bound there: the EMA range stays
    calibrate(m, [torch.randn(8, 1, 8, 8) * 1e-3])  # tiny inputs: EMA ranges below the bounds
    low = m.act1.quant.hi.item()
    create_range_setter("bn-clamp").finish(m)
    assert m.act1.quant.hi.item() == low
    create_range_setter("bn-prior").finish(m)
    assert m.act1.quant.hi.item() == pytest.approx(bounds[m.act1.quant])


def test_bn_prior_covers_every_quantizer_of_the_shipped_resnet():
    q = quantize_model(load_model("resnet20_fmnist"), 3, 3)
    assert set(bn_bounds(q, 3.0)) == set(act_quantizers(q))


def test_percentile_on_a_known_distribution():
    x = torch.linspace(0, 1, 100_001).view(1, 1, 1, -1)
    lo, hi = batch_range(x, 99.9)
    assert lo.item() == pytest.approx(0.001, abs=1e-6) and hi.item() == pytest.approx(0.999, abs=1e-6)
    lo, hi = batch_range(x, 100.0)
    assert (lo.item(), hi.item()) == (0.0, 1.0)
    big = torch.rand(3 << 20)  # strided sample above 2^20 elements: still the distribution's percentile
    assert batch_range(big, 99.0)[1].item() == pytest.approx(0.99, abs=2e-3)
    q = ActQuantizer(4, momentum=0.0)
    q.percentile, q.observing = 99.9, True
    q(x)
    assert q.hi.item() == pytest.approx(0.999, abs=1e-6)


@pytest.mark.parametrize("override, message", [({"act_range": "nope"}, "unknown activation range setter"),
                                               ({"act_percentile": 40.0}, "act-percentile"),
                                               ({"bn_k": 0.0}, "bn-k"),
                                               ({"bn_propagate": "max"}, "bn-propagate")])
def test_bad_range_options(override, message):
    with pytest.raises(UserError, match=message):
        resolve_config("quick", "gdfq", "kd", **override)


def test_quantize_with_bn_prior_freezes_the_bn_bounds(tiny_teacher, fmnist_dir, tmp_path):
    proc = quantize_tiny(tiny_teacher, fmnist_dir, tmp_path / "run", "--act-range", "bn-prior", "--bn-k", "2",
                         "--bn-propagate", "moments", "--wbits", "3", "--abits", "3")
    assert proc.returncode == 0, proc.stderr
    q = quantize_model(load_model(str(tiny_teacher)), 3, 3)
    expected = [bn_bounds(q, 2.0, "moments")[a] for a in act_quantizers(q)]
    got = [hi for _, hi in json.loads((tmp_path / "run" / "result.json").read_text())["act_ranges"]]
    assert got == pytest.approx(expected, rel=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["act_range"], config["options"]) == ("bn-prior", {"bn_k": 2.0, "bn_propagate": "moments",
                                                                        **SMALL_GEN_KW})


def test_learned_range_gradient_is_lsq():
    bits, lo = 2, torch.tensor(0.0)
    hi = torch.tensor(3.0, requires_grad=True)  # s = 1, levels 0, 1, 2, 3
    x = torch.tensor([[-1.0, 0.4, 1.5, 2.2, 5.0]])
    y = learned_fake_quantize(x, lo, hi, bits)
    assert y.tolist() == [[0.0, 0.0, 2.0, 2.0, 3.0]]  # round half to even, as torch.round
    y.sum().backward()
    v = x.clamp(0, 3)
    inside = (torch.round(v) - v)[0, 1:4]
    d_hi = (inside.sum() + 3) / 3  # ∂x̂/∂hi = (Σ(round(v) − v) + n·#above) / n
    expected = d_hi * 3**2 / (5 * 3) ** 0.5  # × n²/√(numel·n): hi moves as LSQ moves n·s
    assert hi.grad.item() == pytest.approx(expected.item())


def test_learned_range_follows_lsq_step_size_under_sgd():
    """hi trained by SGD (momentum, weight decay) stays n times LSQ's step size s trained the same way."""
    bits, n = 3, 7
    torch.manual_seed(0)
    x = torch.rand(8, 64) * 4
    hi = torch.tensor(6.0, requires_grad=True)
    s = torch.tensor(6.0 / n, requires_grad=True)
    opt_hi = torch.optim.SGD([hi], lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2)
    opt_s = torch.optim.SGD([s], lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-2)
    g = 1 / (64 * n) ** 0.5
    for _ in range(20):
        opt_hi.zero_grad(), opt_s.zero_grad()
        ((learned_fake_quantize(x, torch.tensor(0.0), hi, bits) - x) ** 2).mean().backward()
        s_scaled = s * g + (s - s * g).detach()  # LSQ: s's gradient × g
        v = x / s_scaled
        ((torch.clamp(v + (torch.round(v) - v).detach(), 0, n) * s_scaled - x) ** 2).mean().backward()
        opt_hi.step(), opt_s.step()
    assert hi.item() != pytest.approx(6.0, abs=0.05)  # it moved
    assert hi.item() == pytest.approx(n * s.item(), rel=1e-4)


def test_learned_range_moves_to_lower_the_loss():
    torch.manual_seed(0)
    q = ActQuantizer(3)
    q.observing = True
    q(torch.tensor([0.0, 8.0]))  # a range far wider than the data
    q.observing = False
    param = q.learn_range()
    opt = torch.optim.SGD([param], lr=0.04)
    x = torch.rand(64, 256)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((q(x) - x) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert param.item() < 1.5 and losses[-1] < 0.05 * losses[0]  # toward the data's range [0, 1)
    with torch.no_grad():
        q(x)  # every forward mirrors the parameter into the `hi` buffer that checkpoints and exports read
    assert q.hi.item() == param.item()


def test_quantize_with_learned_ranges_loads_as_a_plain_model(tiny_teacher, fmnist_dir, tmp_path):
    proc = quantize_tiny(tiny_teacher, fmnist_dir, tmp_path / "run", "--act-range", "learned", "--lr-q", "0.05")
    assert proc.returncode == 0, proc.stderr
    q = quantize_model(load_model(str(tiny_teacher)), 4, 4)
    start = [bn_bounds(q, 3.0)[a] for a in act_quantizers(q)]
    got = [hi for _, hi in json.loads((tmp_path / "run" / "result.json").read_text())["act_ranges"]]
    assert got != pytest.approx(start, rel=1e-6)  # trained away from the BN prior it started from
    student = load_model(str(tmp_path / "run" / "student.pt"))
    assert [a.hi.item() for a in act_quantizers(student)] == pytest.approx(got)


def test_learned_ranges_train_at_their_own_learning_rate(tiny_teacher, fmnist_dir, tmp_path):
    cfg = resolve_config("quick", "gdfq", "kd", teacher=str(tiny_teacher), data_dir=str(fmnist_dir), batch_size=4,
                         act_range="learned", range_lr_scale=50.0, milestones=[2], out=str(tmp_path / "job"))
    job = build_job(cfg)
    weights, ranges = job.q_opt.param_groups
    his = [q.hi_param for q in act_quantizers(job.qmodel)]
    assert {id(p) for p in ranges["params"]} == {id(p) for p in his}
    assert len(weights["params"]) + len(his) == len(job.q_params)
    for epoch, factor in ((1, 1.0), (2, 0.1)):  # the milestone decays both alike
        job.start_epoch(epoch)
        assert weights["lr"] == pytest.approx(1e-3 * factor) and ranges["lr"] == pytest.approx(5e-2 * factor)
    job.close()
    with pytest.raises(UserError, match="range-lr-scale does not apply .* --act-range learned"):
        resolve_config("quick", "gdfq", "kd", act_range="bn-prior", range_lr_scale=10.0)


def test_recalibrate_at_sets_the_ranges_again(tiny_teacher, fmnist_dir, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("recal", ["--recalibrate-at", "2"])):
        proc = quantize_tiny(tiny_teacher, fmnist_dir, tmp_path / name, "--epochs", "3", "--seed", "0", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())["act_ranges"]
    assert runs["plain"] != runs["recal"]
    events = [json.loads(line) for line in (tmp_path / "recal" / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in events if e.get("recalibrated")] == [6]  # start of epoch 2 (3 iterations each)
    plain = (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert "recalibrated" not in plain  # the default 0 means never
    with pytest.raises(UserError, match="recalibrate-at"):
        resolve_config("quick", "gdfq", "kd", recalibrate_at=1)  # the warm-up epoch itself

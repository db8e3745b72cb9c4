"""Generators, BN statistics and transfer losses against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq.errors
from zsq.distill import LOSSES, TransferInputs, create_loss, kd_loss, list_losses
from zsq.errors import UserError
from zsq.synth import BNStatistics, ConditionalGenerator, SourceContext, create_source, list_sources
from zsq.synth.adadfq import band_loss, entropy
from zsq.synth.generator import upsample_stages


def test_generator_shapes_follow_the_teacher_input():
    g = ConditionalGenerator(num_classes=10, out_channels=1, image_size=32)
    x, y = g.sample(5, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (5, 1, 32, 32) and y.shape == (5,) and y.max() < 10
    # the final non-affine BN standardises each channel over the batch
    assert x.mean().abs() < 1e-4 and (x.var(unbiased=False) - 1).abs() < 1e-2
    assert upsample_stages(32) == 2 and upsample_stages(224) == 5 and upsample_stages(64) == 3
    big = ConditionalGenerator(num_classes=4, out_channels=3, image_size=224)
    assert big.init_size == 7 and big(torch.randn(2, 100), torch.tensor([0, 3])).shape == (2, 3, 224, 224)
    with pytest.raises(UserError, match="divisible by 4"):
        ConditionalGenerator(10, 3, 30)


def test_generator_draws_replay_from_the_rng():
    g = ConditionalGenerator(10, 3, 32)
    a, ya = g.sample(4, torch.Generator().manual_seed(7), "cpu")
    b, yb = g.sample(4, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_bns_loss_zero_when_batch_matches_running_stats_and_hand_value_otherwise():
    net = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    x = torch.randn(8, 2, 4, 4)
    h = net[0](x)
    net[1].running_mean.copy_(h.mean((0, 2, 3)).detach())
    net[1].running_var.copy_(h.var((0, 2, 3), unbiased=False).detach())  # biased, as the lineage compares
    bns = BNStatistics(net)
    net(x)
    assert bns.loss().item() == pytest.approx(0.0, abs=1e-10)
    net[1].running_mean.add_(torch.tensor([1.0, 0.0, 2.0]))
    net(x)
    assert bns.loss().item() == pytest.approx((1 + 0 + 4) / 3, rel=1e-5)  # MSE over channels of the mean gap
    with pytest.raises(RuntimeError):
        bns.loss()  # consumed: a second read without a forward is a bug
    bns.remove()


def test_kd_by_hand():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    T = 2.0
    pt = torch.softmax(t / T, 1)
    lq = torch.log_softmax(q / T, 1)
    hand = T * T * (pt * (pt.log() - lq)).sum()
    assert kd_loss(t, q, T).item() == pytest.approx(hand.item(), rel=1e-6)
    assert kd_loss(t, q, T, "elementwise").item() == pytest.approx(hand.item() / 3, rel=1e-6)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def _inputs(t, q, y):
    return TransferInputs(t, q, y, torch.zeros(len(t), 1, 2, 2))


def test_gdfq_and_adadfq_transfer_losses_by_hand():
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    loss, terms = create_loss("kd+ce", {"kd_temperature": 1.0})(_inputs(t, q, y))
    ce = F.cross_entropy(q, y)
    assert loss.item() == pytest.approx((kd_loss(t, q, 1.0) + ce).item(), rel=1e-6)
    assert set(terms) == {"kd", "ce"}
    loss, terms = create_loss("gap-entropy", {"kd_temperature": 1.0})(_inputs(t, q, y))
    p1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # rows of z_t − z_q: [1, 0] and [−1, 2]
    p2 = torch.softmax(torch.tensor([-1.0, 2.0]), 0)
    h = (-(p1 * p1.log()).sum() - (p2 * p2.log()).sum()) / 2
    # AdaDFQ's −T²·H, offset by T²·log C so that its value moves: the same gradient, 0 at the optimum
    assert loss.item() == pytest.approx(math.log(2) - h.item(), rel=1e-6)
    assert terms["gap_entropy"].item() == pytest.approx(h.item(), rel=1e-6)
    # maximal entropy (log C) when the gap is constant
    loss, _ = create_loss("gap-entropy", {})(_inputs(t, t + 5.0, y))
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_adadfq_band_and_balance_by_hand():
    t = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    q = torch.zeros(3, 3)
    h = [-(p * p.log()).sum().item() for p in torch.softmax(t, 1)]
    hmin, hmax = min(h), math.log(3)
    hn = [(v - hmin) / (hmax - hmin) for v in h]
    lo, hi = 0.1, 0.8
    hand = sum(max(lo - v, 0) for v in hn) / 3 + sum(max(v - hi, 0) for v in hn) / 3
    assert band_loss(t, q, lo, hi).item() == pytest.approx(hand, rel=1e-5)
    assert entropy(torch.zeros(1, 3)).item() == pytest.approx(math.log(3), rel=1e-6)


class _Q(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_adadfq_generator_loss_composition():
    teacher = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3)).eval()
    teacher(torch.randn(2, 1, 4, 4))
    ctx = SourceContext(teacher, 3, 1, 4, "cpu")
    src = create_source("adadfq", ctx, {"alpha_ds": 0.2, "alpha_as": 0.1, "balance_weight": 2.0, "bns_weight": 0.5})
    x, y = src.sample(3, torch.Generator().manual_seed(0))
    t = teacher(x)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 2.0]])
    bns_value = src.bns.loss().item()
    teacher(x)  # record the statistics again for the loss under test
    loss, terms = src.generator_loss(x, y, t, _Q(q))
    band = band_loss(t, q, 0.1, 0.8)
    bal = 0.2 * F.cross_entropy(t - q, y) + 0.1 * F.cross_entropy(t + q, y)
    assert loss.item() == pytest.approx((band + 2.0 * bal + 0.5 * bns_value).item(), rel=1e-5)
    assert set(terms) == {"g_band", "g_ds", "g_as", "g_bns"}


def test_registries_list_the_plugins():
    assert {"gdfq", "adadfq"} <= set(list_sources())
    assert {"kd", "kd+ce", "gap-entropy"} <= set(list_losses())
    with pytest.raises(UserError, match="unknown loss 'nope'"):
        create_loss("nope")


def test_a_former_loss_name_is_the_same_loss_with_one_deprecation_line(capsys, monkeypatch):
    monkeypatch.setattr(zsq.errors, "_said", set())  # once per process: start this test's process afresh
    t, q, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert not {"gdfq", "adadfq"} & set(list_losses())  # the former names are not offered
    for old, new in (("gdfq", "kd+ce"), ("adadfq", "gap-entropy")):
        for _ in range(2):
            assert torch.equal(create_loss(old, {})(_inputs(t, q, y))[0], create_loss(new, {})(_inputs(t, q, y))[0])
        assert LOSSES.canonical(old, quiet=True) == new
    assert capsys.readouterr().err.splitlines() == [
        "zsq: the loss name 'gdfq' is deprecated and goes in the next release: use 'kd+ce'",
        "zsq: the loss name 'adadfq' is deprecated and goes in the next release: use 'gap-entropy'"]

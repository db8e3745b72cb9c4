"""AKT: attentions and refined feature distillation against hand-computed values, map discovery, the loss."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq
from zsq.distill import (FeatureTap, TransferInputs, channel_attention, create_loss, find_stages, find_units,
                         rfd_loss, spatial_attention)
from zsq.distill.akt import OFFICIAL_MAP_WEIGHT, attention_kl, rfd_terms
from zsq.errors import UserError
from zsq.models import create_model
from zsq.quant import calibrate, gaussian_inputs, quantize_model

from conftest import PROBE_KW, SMALL_GEN_KW, quantize_tiny, run_cli


def _map() -> torch.Tensor:
    # one sample, channel 0 = [1, 2], channel 1 = [3, 0] on a 1×2 grid
    return torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])


def test_attentions_by_hand():
    # f² per position averaged over channels: [(1+9)/2, (4+0)/2] = [5, 2], then L2-normalised
    assert spatial_attention(_map())[0].tolist() == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)])
    # f² per channel averaged over positions: [2.5, 4.5], then softmax
    e = math.exp(2.0)
    assert channel_attention(_map())[0].tolist() == pytest.approx([1 / (1 + e), e / (1 + e)])
    assert spatial_attention(torch.zeros(2, 3, 4, 4)).abs().sum() == 0  # eps keeps an all-zero map finite


def _kl(u: list[float], v: list[float], tau: float) -> float:
    p = [math.exp(a / tau) for a in u]
    q = [math.exp(b / tau) for b in v]
    p, q = [a / sum(p) for a in p], [b / sum(q) for b in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_rfd_by_hand_and_its_reductions():
    t = _map()
    s = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])  # f²: spatial means [0.5, 1], channel means [0.5, 1]
    tau = 0.5
    sp = _kl([5 / math.sqrt(29), 2 / math.sqrt(29)], [0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)], tau)
    ch_t = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    ch_s = [1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))]
    ch = _kl(ch_t, ch_s, tau)
    # two identical map pairs: the mean over maps equals one pair's value
    got = rfd_loss([t, t], [s, s], lam=3.0, tau=tau)
    assert got.item() == pytest.approx(3.0 * (sp + ch), rel=1e-5)
    assert rfd_loss([t], [s], tau=tau, parts=("spatial",)).item() == pytest.approx(sp, rel=1e-5)
    assert rfd_loss({"a": t}, {"a": s}, tau=tau, parts=("channel",)).item() == pytest.approx(ch, rel=1e-5)
    big_t, big_s = torch.randn(6, 4, 5, 5), torch.randn(6, 4, 5, 5)
    mean, total = rfd_loss([big_t], [big_s]), rfd_loss([big_t], [big_s], reduction="sum")
    assert total.item() == pytest.approx(6 * mean.item(), rel=1e-5)
    assert rfd_loss([big_t], [big_t.clone()]).item() == pytest.approx(0.0, abs=1e-9)
    assert mean.item() > 0


@pytest.mark.parametrize("attention", [spatial_attention, channel_attention])
def test_attention_kl_of_near_equal_maps_is_exact(attention):
    """The per-map KL is ~1e-6 or less, a difference of nearly equal terms: against a float64 reference of the
    same float32 maps it must hold to 1e-6 relative (float32 arithmetic was off by 1 % to 70×)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 64, 8, 8, generator=g)
    s = f + 0.05 * torch.randn(f.shape, generator=g)
    p, q = (F.softmax(attention(m.double()) / 8.0, 1) for m in (f, s))
    want = (p * (p.log() - q.log())).sum(1).mean().item()
    got = attention_kl(attention(f), attention(s), 8.0).item()
    assert 0 < want < 1e-6 and got == pytest.approx(want, rel=1e-6)


def test_rfd_gradient_reaches_the_student_maps_only():
    t = torch.randn(3, 4, 6, 6, requires_grad=True)
    s = torch.randn(3, 4, 6, 6, requires_grad=True)
    rfd_loss([t], [s], lam=10.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def _custom_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def test_map_discovery_on_resnets_and_a_custom_cnn():
    x32 = torch.zeros(2, 3, 32, 32)
    r20 = create_model("resnet20", in_channels=3)
    assert find_stages(r20, x32) == ["layer1", "layer2", "layer3"]
    r56 = create_model("resnet56", in_channels=3)
    assert find_stages(r56, x32) == ["layer1", "layer2", "layer3"] and len(find_units(r56)) == 27
    r18 = create_model("resnet18", in_channels=3)
    x224 = torch.zeros(2, 3, 224, 224)
    assert find_stages(r18, x224) == ["relu", "layer1", "layer2", "layer3", "layer4"]  # the stem is its own size
    assert len(find_units(r18)) == 8
    cnn = _custom_cnn().train()
    x = torch.zeros(2, 1, 32, 32)
    assert find_stages(cnn, x) == ["2", "6", "9"]  # the last ReLU before each pooling, before global pooling
    assert cnn.training and not cnn[0]._forward_hooks  # the probe leaves mode and hooks as they were
    assert find_units(cnn) == []


class _InvertedResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU6(),
                                  nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c), nn.BatchNorm2d(2 * c),
                                  nn.ReLU6(), nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout // 2, 1), nn.BatchNorm2d(cout // 2)
        self.conv2, self.bn2 = nn.Conv2d(cout // 2, cout // 2, 3, 2, 1), nn.BatchNorm2d(cout // 2)
        self.conv3, self.bn3 = nn.Conv2d(cout // 2, cout, 1), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, 2), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        out += self.downsample(x)
        return self.relu(out)


def test_units_are_the_residual_branches_before_the_add():
    """HAST/AKT/SynQ align each residual unit's branch (conv + BN before the add, full precision), not the block
    output after the add, the ReLU and the Q model's activation quantizer."""
    r20 = create_model("resnet20", in_channels=1)
    assert find_units(r20) == [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)]
    mixed = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _InvertedResidual(8), _Bottleneck(8, 16))
    assert find_units(mixed) == ["1.conv.7", "2.bn3"]  # the add's other operand: identity, projection shortcut
    teacher = r20.eval()
    for bn in (m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)  # a fresh ResNet's branch BNs start at zero
    q = quantize_model(teacher, 3, 3)
    calibrate(q, gaussian_inputs(2, 8, (1, 32, 32)))
    tap = FeatureTap(q, find_units(teacher))
    with torch.no_grad():
        q(torch.randn(8, 1, 32, 32))
    maps = tap.take()
    assert len(maps) == 9 and all(m.unique().numel() > 2**3 for m in maps.values())  # not 3-bit block outputs


def _inputs(layers: list[str], seed: int = 0) -> TransferInputs:
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(4, 3, 4, 4, generator=g) for n in layers}
    q = {n: torch.randn(4, 3, 4, 4, generator=g).requires_grad_(True) for n in layers}
    return TransferInputs(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g).requires_grad_(True),
                          torch.tensor([0, 1, 2, 3]), torch.zeros(4, 1, 8, 8), t, q)


@pytest.mark.parametrize("method,parts", [("akt", ("spatial", "channel")), ("akt-spatial", ("spatial",)),
                                          ("akt-channel", ("channel",))])
def test_akt_losses_combine_their_terms(method, parts):
    cnn = _custom_cnn()
    loss_fn = create_loss(method, {"akt_lambda": 1000.0, "kd_temperature": 4.0})
    layers = loss_fn.feature_layers(cnn, torch.zeros(2, 1, 32, 32))
    assert layers == ["2", "6", "9"]
    inp = _inputs(layers)
    loss, terms = loss_fn(inp)
    kls = rfd_terms(inp.t_feats, inp.q_feats, 8.0, parts)
    assert set(terms) == {"kd", "base", "rfd", *parts}  # the ablations drop exactly one attention term
    rfd = 1000.0 * sum(kls.values())
    assert terms["rfd"].item() == pytest.approx(rfd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * terms["kd"].item() + 0.5 * rfd.item(), rel=1e-5)
    summed = create_loss(method, {"akt_lambda": 1000.0, "kd_temperature": 4.0, "akt_combine": "sum"})
    summed.feature_layers(cnn, torch.zeros(2, 1, 32, 32))
    assert summed(inp)[0].item() == pytest.approx(terms["kd"].item() + rfd.item(), rel=1e-5)


def test_akt_default_lambda_and_base_losses():
    loss_fn = create_loss("akt", {"akt_layers": "units"})
    loss_fn.feature_layers(create_model("resnet20", in_channels=1), torch.zeros(2, 1, 32, 32))
    assert loss_fn.lam == OFFICIAL_MAP_WEIGHT * 9  # per map 2e5: the official code's effective weight
    summed = create_loss("akt", {"akt_layers": "units", "akt_reduction": "sum"})
    summed.feature_layers(create_model("resnet20", in_channels=1), torch.zeros(2, 1, 32, 32))
    assert summed.lam == 1000 * 9  # the official lam on batch sums: at its batch of 200, the same weight
    inp = _inputs(["a"])
    gdfq = create_loss("akt", {"akt_base": "kd+ce", "akt_layers": "a", "akt_alpha": 1.0})
    gdfq.layers = ["a"]
    loss, terms = gdfq(inp)
    assert "ce" in terms and loss.item() == pytest.approx(terms["kd"].item() + terms["ce"].item(), rel=1e-5)
    ada = create_loss("akt", {"akt_base": "gap-entropy", "akt_alpha": 1.0})
    ada.layers = ["a"]
    assert "gap_entropy" in ada(inp)[1]
    for bad in ({"akt_alpha": 1.5}, {"akt_combine": "mean"}, {"akt_base": "akt"}, {"akt_tau": 0.0},
                {"akt_lambda": -1.0}, {"akt_reduction": "mean"}):
        with pytest.raises(UserError):
            create_loss("akt", bad)
    with pytest.raises(UserError, match="no module named nope"):
        create_loss("akt", {"akt_layers": "layer1,nope"}).feature_layers(create_model("resnet20"),
                                                                         torch.zeros(2, 3, 32, 32))
    with pytest.raises(UserError, match="no such feature maps"):
        create_loss("akt", {"akt_layers": "units"}).feature_layers(_custom_cnn(), torch.zeros(2, 1, 32, 32))


def test_akt_run_logs_each_term(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "akt"
    proc = quantize_tiny(tiny_teacher, fmnist_dir, out, "--source", "gdfq", "--loss", "akt", "--akt-layers",
                         "units", "--akt-base", "kd+ce")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r["warmup"]]
    assert len(trained) == 3
    for key in ("kd", "ce", "spatial", "channel", "rfd", "grad_norm", "loss_q"):
        assert all(math.isfinite(r[key]) for r in trained), key
    config = json.loads((out / "config.json").read_text())
    assert config["options"] == {"akt_layers": "units", "akt_base": "kd+ce", "akt_lambda": 1e4,  # quick preset,
                                 "bn_k": 2.5, "bn_propagate": "moments", **SMALL_GEN_KW}  # its range setter's; ours
    bad = run_cli("quantize", "--teacher", str(tiny_teacher), "--loss", "akt", "--akt-layers", "layer9",
                  "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "no module named layer9" in bad.stderr and "Traceback" not in bad.stderr


def test_akt_through_the_python_api(tiny_teacher, fmnist_dir, tmp_path):
    result = zsq.quantize(str(tiny_teacher), wbits=3, abits=3, source="adadfq", loss="akt-channel",
                          epochs=2, iters_per_epoch=2, warmup_epochs=1, batch_size=8, data_dir=str(fmnist_dir),
                          eval_limit=50, out=str(tmp_path / "api"), quiet=True, **PROBE_KW)
    assert 0 <= result.q_top1 <= 100

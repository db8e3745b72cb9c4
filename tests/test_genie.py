"""Genie-D (zsq.synth.genie): swing convolution, the BN-statistics loss and image prior against hand values, the
generator's shapes, and the cached offline set through `zsq synth` and as a QAT data source."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from zsq.errors import UserError
from zsq.synth import BNStatistics, SourceContext, create_source
from zsq.synth.genie import GenieGenerator, GenieOptions, Swing, distil, genie_bns_loss, image_prior
from zsq.synth.pixels import read_set

from zsq.models import create_model

from conftest import randomise_bn, run_cli


def test_swing_shifts_strided_convs_by_at_most_one_pixel_and_leaves_stride_one_alone():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Conv2d(1, 1, 1, stride=2, bias=False))
    for conv in model:
        nn.init.dirac_(conv.weight)  # identity convs: what each one is given can be read off
    seen: dict[int, torch.Tensor] = {}
    for i, conv in enumerate(model):
        conv.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
    x = torch.arange(36.0).view(1, 1, 6, 6)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifts = [padded[..., dy: dy + 6, dx: dx + 6] for dy in range(3) for dx in range(3)]
    swing = Swing(model, 1, torch.Generator().manual_seed(0))
    for _ in range(20):
        out = model(x)
        assert torch.equal(seen[0], x)  # the stride-1 conv gets its input as it is
        assert any(torch.equal(out, s[..., ::2, ::2]) for s in shifts)  # the strided one a ±1 shift of it
    swing.remove()
    assert torch.equal(model(x), x[..., ::2, ::2])  # hooks gone: no shift


def test_swing_draws_every_offset():
    conv = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    nn.init.dirac_(conv.weight)
    x = torch.arange(64.0).view(1, 1, 8, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    swing = Swing(conv, 1, torch.Generator().manual_seed(0))
    found = set()
    for _ in range(200):
        out = conv(x)
        found |= {(dy, dx) for dy in range(3) for dx in range(3)
                  if torch.equal(out, padded[..., dy:dy + 8, dx:dx + 8][..., ::2, ::2])}
    swing.remove()
    assert found == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_bns_loss_and_image_prior_hand_values():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean = torch.tensor([1.0, -1.0])
    bn.running_var = torch.tensor([4.0, 1.0]) - 1e-6  # target std 2 and 1
    bns = BNStatistics(nn.Sequential(bn))
    x = torch.zeros(2, 2, 1, 2)
    x[:, 0] = torch.tensor([[[0.0, 2.0]], [[0.0, 2.0]]])  # mean 1, unbiased std √(4/3)
    x[:, 1] = 3.0  # mean 3, std 0
    bns.layers[0](x)
    # channel 0: (1 − 1)² + (√(4/3) − 2)²; channel 1: (3 + 1)² + (0 − 1)²; the mean over the 2 channels
    want = ((4 / 3) ** 0.5 - 2) ** 2 / 2 + (16 + 1) / 2
    assert genie_bns_loss(bns).item() == pytest.approx(want, rel=1e-5)
    bns.remove()
    img = torch.zeros(1, 2, 1, 2)
    img[0, 0] = torch.tensor([[1.0, 3.0]])  # mean 2, std √2
    # (1/B) Σ_i ‖m_i‖² + ‖s_i − 1‖²: channel 0: 4 + (√2 − 1)²; channel 1: 0 + 1
    assert image_prior(img).item() == pytest.approx(4 + (2**0.5 - 1) ** 2 + 1, rel=1e-5)


def test_generator_shapes_and_the_distilled_set_matches_the_bn_statistics_better_than_noise():
    gen = GenieGenerator(16, 3, 8)
    assert gen(torch.randn(4, 16)).shape == (4, 3, 8, 8)
    with pytest.raises(UserError, match="multiple of 4"):
        GenieGenerator(16, 3, 10)
    teacher = randomise_bn(create_model("resnet20", in_channels=1))
    for p in teacher.parameters():
        p.requires_grad_(False)
    opts = GenieOptions(synth_images=12, synth_batch=8, synth_iters=30, latent_dim=16)
    out = distil(teacher, opts, 10, (1, 16, 16), "cpu", quiet=True)
    assert out["images"].shape == (12, 1, 16, 16) and out["labels"].shape == (12,)
    assert len(out["final_loss"]) == 2
    bns = BNStatistics(teacher)
    teacher(out["images"])
    distilled = genie_bns_loss(bns).item()
    teacher(torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert distilled < genie_bns_loss(bns).item()
    bns.remove()


def test_genie_source_is_cached_and_feeds_qat(tmp_path):
    teacher = randomise_bn(create_model("resnet20", in_channels=1))
    ctx = SourceContext(teacher, 10, 1, 16, "cpu", quiet=True)
    options = {"synth_images": 4, "synth_batch": 4, "synth_iters": 2, "latent_dim": 8}
    first = create_source("genie", ctx, options)
    assert first.built and first.path.name.startswith("genie-")
    again = create_source("genie", ctx, options)
    assert not again.built and torch.equal(again.images, first.images)
    x, y = again.sample(6, torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 16, 16) and y.shape == (6,)


def test_zsq_synth_genie_and_flags_of_other_sources(tmp_path):
    out = tmp_path / "g.pt"
    proc = run_cli("synth", "--source", "genie", "--images", "4", "--batch-size", "4", "--iters", "2",
                   "--latent-dim", "8", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = read_set(out)
    assert data["source"] == "genie" and data["images"].shape == (4, 1, 32, 32)
    bad = run_cli("synth", "--source", "genie", "--lr", "0.1", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and "--lr does not apply to --source genie" in bad.stderr
    bad = run_cli("synth", "--source", "hast", "--swing", "0", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and "--swing does not apply to --source hast" in bad.stderr

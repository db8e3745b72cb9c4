"""HAST: hardness-weighted CE by hand, pixel synthesis, cache keys, batched crops, `zsq synth`, the hast loss and
the FGSM promotion pass."""
from __future__ import annotations

import contextlib
import io
import json
import math
import threading
import time

import pytest
import torch
from torch import nn

from zsq.data import random_resized_crop
from zsq.distill import TransferInputs, create_loss, fa_loss, fgsm_promote, l2_channel_attention
from zsq.errors import UserError
from zsq.synth import SourceContext, create_source
from zsq.synth.pixels import (PixelOptions, cache_path, hardness_ce, load_or_build, read_set, synthesize,
                              teacher_hash)

from conftest import PROBE_KW, TINY_PROBE, run_cli


def test_hardness_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    p0 = math.exp(2) / (math.exp(2) + 1)  # easy sample: label probability 0.88
    p1 = 1 / (1 + math.e)  # hard sample: 0.27
    expect = ((1 - p0) ** 2 * -math.log(p0) + (1 - p1) ** 2 * -math.log(p1)) / 2
    assert hardness_ce(logits, labels, 2.0).item() == pytest.approx(expect, rel=1e-6)
    plain = (-math.log(p0) - math.log(p1)) / 2
    assert hardness_ce(logits, labels, 0.0).item() == pytest.approx(plain, rel=1e-6)  # γ = 0 is plain CE


def _tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    for m in net.modules():  # running statistics of "real" data that standard noise does not match
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.randn(256, 1, 8, 8) * 2 + 1)
        net[-1].weight.mul_(10)  # logits wide enough for the CE term to be reducible
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def test_synthesis_lowers_its_loss_and_is_seeded():
    net = _tiny_teacher()
    short = synthesize(net, PixelOptions(synth_images=12, synth_batch=12, synth_iters=1), 3, (1, 8, 8), "cpu", True)
    opts = PixelOptions(synth_images=12, synth_batch=12, synth_iters=60)
    long = synthesize(net, opts, 3, (1, 8, 8), "cpu", True)
    assert long["final_loss"][0] < 0.5 * short["final_loss"][0]
    assert long["images"].shape == (12, 1, 8, 8) and long["labels"].max() < 3
    again = synthesize(net, opts, 3, (1, 8, 8), "cpu", True)
    assert torch.equal(again["images"], long["images"]) and torch.equal(again["labels"], long["labels"])
    assert not any(m._forward_hooks for m in net.modules())  # the BN hooks are gone


def test_cache_reused_when_recipe_and_teacher_match(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path))
    net = _tiny_teacher()
    ctx = SourceContext(net, 3, 1, 8, "cpu", quiet=True)
    opts = {"synth_images": 6, "synth_batch": 6, "synth_iters": 2}
    first = create_source("hast", ctx, opts)
    assert first.built and first.path.parent == tmp_path / "synth"
    second = create_source("hast", ctx, opts)
    assert not second.built and second.path == first.path and torch.equal(second.images, first.images)
    other_recipe = create_source("hast", ctx, {**opts, "hard_gamma": 1.0})
    assert other_recipe.built and other_recipe.path != first.path
    assert create_source("zeroq", ctx, opts).built  # another source is another set
    changed = _tiny_teacher()
    with torch.no_grad():
        changed[0].weight.add_(0.01)
    assert teacher_hash(changed) != teacher_hash(net)
    rebuilt = create_source("hast", SourceContext(changed, 3, 1, 8, "cpu", quiet=True), opts)
    assert rebuilt.built and rebuilt.path != first.path
    assert read_set(first.path)["teacher_sha256"] == teacher_hash(net)
    assert cache_path("hast", PixelOptions(**opts), teacher_hash(net)) == first.path
    x, y = first.sample(10, torch.Generator().manual_seed(0))
    assert x.shape == (10, 1, 8, 8) and y.shape == (10,)
    with pytest.raises(UserError, match="another teacher"):
        create_source("hast", SourceContext(changed, 3, 1, 8, "cpu", quiet=True), {"synth_data": str(first.path)})


def test_runs_starting_together_build_a_set_once(tmp_path, monkeypatch):
    """Two runs that need the same set (a grid's jobs, started together) do not both build it: the second waits for
    the first, says so, and reads what it wrote."""
    monkeypatch.setenv("ZSQ_CACHE", str(tmp_path))
    ctx = SourceContext(_tiny_teacher(), 3, 1, 8, "cpu")
    opts = PixelOptions(synth_images=6, synth_batch=6, synth_iters=2)
    builds, started = [], threading.Event()

    def build(teacher, opts, classes, shape, device, quiet, dist):
        builds.append(1)
        started.set()
        time.sleep(0.5)  # long enough for the other caller to find the lock taken
        return synthesize(teacher, opts, classes, shape, device, True, dist)  # no bar among what is checked

    results = []
    first = threading.Thread(target=lambda: results.append(load_or_build("hast", ctx, opts, build)))
    first.start()
    started.wait(10)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        second = load_or_build("hast", ctx, opts, build)
    first.join()
    assert len(builds) == 1 and results[0][2] and not second[2] and second[1] == results[0][1]
    assert torch.equal(second[0]["images"], results[0][0]["images"])
    assert err.getvalue() == f"waiting for another run that builds {second[1]}\n"


def test_random_resized_crop_is_batched_and_exact_at_the_identity():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    same = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(same, x, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    out = random_resized_crop(x.repeat(32, 1, 1, 1), g)
    assert out.shape == (64, 3, 6, 6)
    assert out.min() >= x.min() - 1e-4 and out.max() <= x.max() + 1e-4  # bilinear inside the image: no new range
    assert len({tuple(o.flatten()[:5].tolist()) for o in out}) > 32  # each sample gets its own crop


def test_synth_cli_writes_a_set_quantize_can_use(tmp_path, fmnist_dir):
    out = tmp_path / "set.pt"
    proc = run_cli("synth", "--teacher", "resnet20_fmnist", "--data-dir", str(fmnist_dir), "--images", "8",
                   "--iters", "2", "--batch-size", "4", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = read_set(out)
    assert data["images"].shape == (8, 1, 32, 32) and json.loads(data["recipe"])["synth_iters"] == 2
    run = tmp_path / "run"
    proc = run_cli("quantize", "--source", "hast", "--loss", "kd", "--synth-data", str(out), "--data-dir",
                   str(fmnist_dir), "--epochs", "2", "--iters-per-epoch", "2", "--warmup-epochs", "1",
                   "--batch-size", "4", "--eval-limit", "20", "--out", str(run), "--quiet", *TINY_PROBE)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["synthetic_set"] == str(out) and result["synthetic_set_built"] is False
    assert result["synthetic_set_build_s"] == data["build_s"] > 0  # what zsq synth spent on it
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    # warm-up: a GDFQ generator trains and its images calibrate the ranges; then it is gone and only Q trains
    assert all("loss_g" in r and "loss_q" not in r for r in rows if r["warmup"])
    assert all("loss_g" not in r and "loss_q" in r for r in rows if not r["warmup"])
    bad = run_cli("synth", "--source", "gdfq", "--out", str(tmp_path / "x.pt"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_hast_loss_by_hand():
    # one map, one sample: channel f² means [2.5, 4.5] (teacher) and [0.5, 1.0] (student), each L2-normalised
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    s = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    at = [2.5 / math.hypot(2.5, 4.5), 4.5 / math.hypot(2.5, 4.5)]
    aq = [0.5 / math.hypot(0.5, 1.0), 1.0 / math.hypot(0.5, 1.0)]
    fa = ((at[0] - aq[0]) ** 2 + (at[1] - aq[1]) ** 2) / 2
    assert l2_channel_attention(t)[0].tolist() == pytest.approx(at)
    assert fa_loss([t, t], [s, s]).item() == pytest.approx(2 * fa, rel=1e-5)  # summed over maps
    loss_fn = create_loss("hast", {"hast_layers": "a", "kd_temperature": 2.0})
    loss_fn.layers = ["a"]
    zt, zq = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    loss, terms = loss_fn(TransferInputs(zt, zq, torch.tensor([0]), t, {"a": t}, {"a": s}))
    kd = 4 * sum(p * math.log(p / 0.5) for p in (1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))))
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert loss.item() == pytest.approx(20 * kd + 1000 * fa, rel=1e-5)


def test_fgsm_promotion_moves_each_pixel_by_eps_uphill():
    x = torch.randn(4, 1, 5, 5, requires_grad=True)
    w = torch.randn(1, 5, 5)
    loss = (x * w).sum()
    x_adv = fgsm_promote(x, loss, 0.01)
    assert (x_adv - x).abs().max().item() == pytest.approx(0.01, rel=1e-5)
    assert torch.equal(torch.sign(x_adv - x), torch.sign(w).expand_as(x))  # the direction that raises the loss
    assert not x_adv.requires_grad
    loss.backward()  # the clean graph is still usable


def test_promote_works_with_any_loss(tiny_teacher, fmnist_dir, tmp_path):
    import zsq
    r = zsq.quantize(str(tiny_teacher), source="gdfq", loss="kd", promote=0.01, data_dir=str(fmnist_dir),
                     epochs=2, iters_per_epoch=2, warmup_epochs=1, batch_size=4, eval_limit=20,
                     out=str(tmp_path / "p"), quiet=True, **PROBE_KW)
    rows = [json.loads(l) for l in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if not row["warmup"]]
    assert trained and all(row["loss_q"] == pytest.approx(row["loss_clean"] + row["loss_promoted"], rel=1e-5)
                           for row in trained)
    with pytest.raises(UserError, match="promote"):
        zsq.quantize(str(tiny_teacher), promote=-1.0, out=str(tmp_path / "bad"))

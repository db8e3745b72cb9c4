"""SynQ: the low-pass filter, Grad-CAM and selective CE against hand-computed values; the loss and its parts."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsq.distill import (FeatureTap, TransferInputs, create_loss, find_cam_layer, grad_cam, low_pass, lowpass_mask,
                         selective_ce)
from zsq.distill.synq import cam_weights, saliency
from zsq.errors import UserError
from zsq.models import create_model

from conftest import PROBE_KW, SMALL_GEN_KW, quantize_tiny, run_cli


def test_lowpass_mask_formula():
    g = lowpass_mask(6, 8, d0=2.0)
    assert g.shape == (6, 8) and g[3, 4] == 1.0  # DC sits at (H//2, W//2)
    for v, u in ((3, 5), (0, 0), (5, 7), (1, 4)):
        d2 = (u - 4) ** 2 + (v - 3) ** 2
        assert g[v, u].item() == pytest.approx(math.exp(-d2 / 8.0), rel=1e-6)


def test_low_pass_extremes():
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(low_pass(x, 1e6), x, atol=1e-9, rtol=0)  # every frequency kept
    mean_image = x.mean((2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(low_pass(x, 1e-3), mean_image, atol=1e-9, rtol=0)  # only DC kept
    odd = torch.randn(2, 1, 7, 5)  # odd sizes: the shift must still put DC under the mask's peak
    torch.testing.assert_close(low_pass(odd, 1e-3), odd.mean((2, 3), keepdim=True).expand_as(odd), atol=1e-5, rtol=0)
    mid = low_pass(x, 2.0)
    assert mid.dtype == x.dtype and (mid - x).abs().max() > 0.1


def test_grad_cam_hand_computed():
    # logits = W · spatial-mean(A): ∂score/∂A_k = W[c,k]/4 everywhere, so the weights are W[c]/4
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 0.0], [0.0, 0.0]]]], requires_grad=True)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    logits = acts.mean((2, 3)) @ w.T
    cam = grad_cam(acts, logits[:, 0].sum(), (2, 2))
    # ReLU(0.25·A0 − 0.25·A1) = [[0, .5], [.75, 1]], already in [0, 1]
    torch.testing.assert_close(cam, torch.tensor([[[[0.0, 0.5], [0.75, 1.0]]]]), atol=1e-6, rtol=0)
    up = saliency(acts.detach(), torch.tensor([[0.25, -0.25]]), (4, 4))
    assert up.shape == (1, 1, 4, 4) and up.min().item() == 0 and up.max().item() == pytest.approx(1.0, abs=1e-6)
    flat = saliency(torch.ones(2, 3, 4, 4), torch.ones(2, 3), (4, 4))
    assert torch.isfinite(flat).all() and flat.abs().max() == 0  # a flat map normalises to 0, not NaN


def test_grad_cam_plus_plus_weights():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    g[0, 1] = 0  # a zero denominator
    alpha = g**2 / (2 * g**2 + (a * g**3).sum((2, 3), keepdim=True))
    alpha = torch.nan_to_num(alpha, nan=0.0)
    torch.testing.assert_close(cam_weights(a, g, "gradcampp"), (alpha * g.clamp(min=0)).sum((2, 3)))
    torch.testing.assert_close(cam_weights(a, g, "gradcam"), g.mean((2, 3)))
    with pytest.raises(UserError):
        cam_weights(a, g, "scorecam")


def test_selective_ce_masks_hard_samples():
    t = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 9.0]])
    q = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    p = t.softmax(1)[torch.arange(4), y]
    ce, keep = selective_ce(t, q, y, tau=0.5)
    assert keep.tolist() == ((1 - p) < 0.5).tolist() == [True, False, True, False]
    per = nn.functional.cross_entropy(q, y, reduction="none")
    assert ce.item() == pytest.approx((per[0] + per[2]).item() / 4, rel=1e-6)  # averaged over the whole batch
    assert selective_ce(t, q, y, tau=0.0)[0].item() == 0.0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = _Net().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def _inputs(loss, teacher, student, x, y) -> TransferInputs:
    """What the training loop hands the loss (Job.iterate)."""
    layers = loss.feature_layers(teacher, x)
    t_tap, q_tap = FeatureTap(teacher, layers, loss.teacher_grad_layers), FeatureTap(student, layers)
    seen = loss.prepare(x)
    with torch.set_grad_enabled(bool(loss.teacher_grad_layers)), t_tap.cutting():
        t_logits = teacher(seen)
    t_feats = t_tap.take(detach=True)
    t_logits = t_logits if loss.teacher_grad_layers else t_logits.detach()
    inp = TransferInputs(t_logits, student(seen), y, seen, t_feats, q_tap.take())
    t_tap.remove()
    q_tap.remove()
    return inp


def test_teacher_cam_through_a_leaf_equals_the_full_graph():
    teacher, _ = _pair()
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    tap = FeatureTap(teacher, ["block.0"], ("block.0",))
    with tap.cutting():
        logits = teacher(x)
    leaf = tap.take(detach=True)["block.0"]
    assert leaf.is_leaf and leaf.requires_grad
    cam = grad_cam(leaf, logits.gather(1, y[:, None]).sum(), (6, 6))
    full = FeatureTap(teacher, ["block.0"])
    x_req = x.clone().requires_grad_(True)  # the whole graph, from the input on
    logits = teacher(x_req)
    ref = grad_cam(full.take()["block.0"], logits.gather(1, y[:, None]).sum(), (6, 6))
    torch.testing.assert_close(cam, ref)
    tap.remove()
    full.remove()


def test_find_cam_layer():
    assert find_cam_layer(create_model("resnet20"), torch.zeros(2, 3, 32, 32)) == "layer3.2.conv2"
    assert find_cam_layer(_Net(), torch.zeros(2, 1, 6, 6)) == "block.0"
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 3, 1), nn.Flatten())
    assert find_cam_layer(pooled, torch.zeros(2, 1, 8, 8)) == "0"  # the 1×1 classifier conv is not a CAM layer


@pytest.mark.parametrize("method", ["synq", "akt+synq"])
def test_synq_parts_remove_exactly_their_term(method):
    teacher, student = _pair()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    common = {"hast_layers": "block", "akt_layers": "block"} if method == "synq" else {"akt_layers": "block"}
    if method == "akt+synq":
        common["akt_lambda"] = 100.0
    full = create_loss(method, {**common, "synq_tau": 0.9})
    loss, terms = _total(full, _inputs(full, teacher, student, x, y))
    assert {"kd", "selce", "selce_kept", "cam"} <= set(terms)
    assert ("fa" in terms) == (method == "synq") and ("rfd" in terms) == (method == "akt+synq")
    for part, removed, weight in (("cam", {"cam"}, 200.0), ("selce", {"selce", "selce_kept"}, 5.0)):
        keep = ",".join(p for p in ("lpf", "cam", "selce") if p != part)
        fewer = create_loss(method, {**common, "synq_tau": 0.9, "synq_parts": keep})
        loss2, terms2 = _total(fewer, _inputs(fewer, teacher, student, x, y))
        assert set(terms) - set(terms2) == removed
        term = terms["cam"] if part == "cam" else terms["selce"]
        assert loss.item() == pytest.approx(loss2.item() + weight * term.item(), rel=1e-5)
    no_lpf = create_loss(method, {**common, "synq_parts": "cam,selce"})
    assert no_lpf.prepare(x) is x and not torch.equal(full.prepare(x), x)
    assert create_loss(method, {**common, "synq_parts": "none"}).teacher_grad_layers == ()


def _total(loss_fn, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a clean batch as the loop adds it up: the transfer loss and its clean-only terms."""
    loss, terms = loss_fn(inp)
    extra = loss_fn.clean_only(inp)
    return (loss, terms) if extra is None else (loss + extra[0], {**terms, **extra[1]})


def test_the_promoted_batch_keeps_the_clean_selection_and_has_no_cam():
    """synq.md §5: the promoted pass reuses the clean batch's selective-CE mask; the CAM term is clean-only."""
    teacher, student = _pair()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    loss_fn = create_loss("synq", {"hast_layers": "block"})
    confident = 10 * F.one_hot(y, 3).float()  # the teacher is sure of the label on the first half only
    sure = torch.cat([confident[:4], -confident[4:]])
    real = _inputs(loss_fn, teacher, student, x, y)
    clean = dataclasses.replace(real, t_logits=sure)
    promoted = TransferInputs(-sure, clean.q_logits, y, clean.x, clean.t_feats, clean.q_feats, clean=clean)
    _, terms = loss_fn(promoted)  # on the promoted batch, the teacher would pick the other half
    ce, keep = selective_ce(clean.t_logits, clean.q_logits, y, 0.5)
    assert keep.tolist() == [True] * 4 + [False] * 4
    assert terms["selce"].item() == pytest.approx(ce.item()) and terms["selce_kept"] == keep.float().mean()
    assert "cam" not in terms and "cam" in loss_fn.clean_only(real)[1]


def test_promotion_direction_leaves_the_cam_term_out(tiny_teacher, fmnist_dir, tmp_path, monkeypatch):
    """The FGSM direction is ∇ₓ of KD + λ_FA·FA + λ_CE·selective CE: the loop hands fgsm_promote that loss, never
    the CAM term (measured on the shipped teacher, CAM's part of ∇ₓ flipped 21 % of the signs)."""
    import zsq
    import zsq.train

    directions = []
    real = zsq.train.job.fgsm_promote
    monkeypatch.setattr(zsq.train.job, "fgsm_promote",
                        lambda x, loss, eps: directions.append(loss.item()) or real(x, loss, eps))
    r = zsq.quantize(str(tiny_teacher), source="gdfq", loss="synq", data_dir=str(fmnist_dir), epochs=2,
                     iters_per_epoch=2, warmup_epochs=1, batch_size=6, eval_limit=8, synq_tau=0.9,
                     out=str(tmp_path / "s"), quiet=True, **PROBE_KW)
    rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if not row["warmup"]]
    assert len(directions) == len(trained) == 2
    for direction, row in zip(directions, trained):
        assert row["cam"] > 0
        assert direction == pytest.approx(20 * row["kd"] + 1000 * row["fa"] + 5 * row["selce"], rel=1e-5)
        assert row["loss_q"] == pytest.approx(row["loss_clean"] + row["loss_promoted"] + 200 * row["cam"], rel=1e-5)


def test_cam_gradient_reaches_the_student_only():
    teacher, student = _pair()
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    loss = create_loss("synq", {"hast_layers": "block", "synq_parts": "cam"})
    inp = _inputs(loss, teacher, student, x, y)
    cam = loss.cam_loss(inp)
    assert cam.item() > 0
    cam.backward(inputs=list(student.parameters()))
    assert student.block[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_synq_options():
    for bad in ({"synq_parts": "lpf,blur"}, {"synq_d0": 0.0}, {"synq_tau": 1.5}, {"cam_target": "top"},
                {"cam_type": "x"}, {"synq_cam_weight": -1.0}):
        with pytest.raises(UserError):
            create_loss("synq", bad)
    with pytest.raises(UserError, match="akt-lambda"):
        create_loss("akt+synq", {"akt_lambda": -1.0})
    with pytest.raises(UserError, match="no module named nope"):
        create_loss("synq", {"cam_layer": "nope"}).feature_layers(create_model("resnet20"), torch.zeros(2, 3, 32, 32))


def test_synq_run_end_to_end(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "synq"
    proc = quantize_tiny(tiny_teacher, fmnist_dir, out, "--source", "gdfq", "--loss", "synq", "--synq-d0", "6",
                         "--cam-target", "pred")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["promote"] == 0.01 and config["options"] == {"synq_d0": 6.0, "cam_target": "pred", "bn_k": 2.5,
                                                                 "bn_propagate": "bounds", **SMALL_GEN_KW}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if not r["warmup"]]
    assert trained and all({"kd", "fa", "selce", "selce_kept", "cam", "loss_promoted"} <= set(r) for r in trained)
    assert all(math.isfinite(r["loss_q"]) for r in trained)
    bad = run_cli("quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--loss", "synq",
                  "--synq-parts", "lpf,sharpen", "--out", str(tmp_path / "bad"), "--quiet")
    assert bad.returncode == 2 and "synq-parts" in bad.stderr and "Traceback" not in bad.stderr

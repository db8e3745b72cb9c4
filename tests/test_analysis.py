"""Curvature: Hutchinson's Hessian trace against explicit Hessians, and its tracking during zsq quantize."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from zsq.analysis import spearman
from zsq.data import FMNIST_CLASSES
from zsq.bench.report import curve_stats, group_runs, read_runs
from zsq.curvature import hessian_trace
from zsq.quant import calibrate
from zsq.train import build_job, resolve_config
from zsq.train.job import curvature

from conftest import SMALL_GEN, TINY_PROBE, quantize_tiny, run_cli


def test_spearman_averages_tied_ranks():
    # ranks x (0, 1.5, 1.5, 3) and y (0, 2, 1, 3): covariance 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5 ** 0.5)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([10, 10, 10], [1, 2, 3]) != spearman([10, 10, 10], [1, 2, 3])  # no order to measure: NaN
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # L = ½ Σ aᵢ pᵢ² has H = diag(a): every Rademacher vᵀHv equals tr(H), so the error is 0
    class Quad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.randn(7))

    a = torch.tensor([1.0, 2.0, -3.0, 0.5, 4.0, 0.0, 1.5])
    mean, se = hessian_trace(Quad(), lambda m, b: 0.5 * (b * m.p**2).sum(), [a], n_samples=5)
    assert mean == pytest.approx(a.sum().item(), abs=1e-5) and se == pytest.approx(0.0, abs=1e-6)


def test_hutchinson_matches_the_explicit_hessian_of_a_tiny_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = v[i: i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    exact = torch.autograd.functional.hessian(loss_of, flat).trace().item()
    mean, se = hessian_trace(net, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, y)] * 2,
                             n_samples=3000, seed=1)
    assert abs(mean - exact) < 4 * se and se < 0.1 * abs(exact)
    with pytest.raises(ValueError):
        hessian_trace(net, lambda m, b: m(b).sum(), [], n_samples=4)


def test_quantize_tracks_curvature_and_keeps_its_batches_on_resume(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "curv"
    args = ["quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--loss", "akt",
            "--epochs", "3", "--iters-per-epoch", "4", "--warmup-epochs", "1", "--batch-size", "8",
            "--eval-limit", "50", "--track-curvature", "3", "--curvature-samples", "2", "--ckpt-every", "6",
            "--deterministic", "--out", str(out), "--quiet", *TINY_PROBE, *SMALL_GEN]
    assert run_cli(*args).returncode == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tracked = {r["iter"]: r["hessian_trace"] for r in rows if "hessian_trace" in r}
    assert sorted(tracked) == [4, 7, 10] and all(r["hessian_trace_se"] >= 0 for r in rows if "hessian_trace" in r)
    assert all(isinstance(v, float) for v in tracked.values())
    cfg = resolve_config("quick", "gdfq", "kd", teacher=str(tiny_teacher), data_dir=str(fmnist_dir), batch_size=4,
                         track_curvature=1, curvature_samples=2, out=str(tmp_path / "job"))
    job = build_job(cfg)
    calibrate(job.qmodel, [torch.randn(4, 1, 32, 32)])
    first = curvature(job)
    again = build_job(cfg)
    again.load_state_dict(job.state_dict())  # a resumed run estimates on the same fixed batches
    assert all(torch.equal(a, b) for pa, pb in zip(job.curv_batches, again.curv_batches, strict=True)
               for a, b in zip(pa, pb, strict=True))
    assert curvature(again)["hessian_trace"].item() == pytest.approx(first["hessian_trace"].item(), rel=1e-4)
    job.close()
    again.close()


def _tiny_run(tiny_teacher, fmnist_dir, out, seed: int, *extra: str) -> None:
    proc = quantize_tiny(tiny_teacher, fmnist_dir, out, "--loss", "akt", "--seed", str(seed), *extra)
    assert proc.returncode == 0, proc.stderr


def test_analyze_and_report(tiny_teacher, fmnist_dir, tmp_path):
    runs = tmp_path / "runs"
    _tiny_run(tiny_teacher, fmnist_dir, runs / "a0", 0, "--track-curvature", "1", "--curvature-samples", "2")
    _tiny_run(tiny_teacher, fmnist_dir, runs / "a1", 1)
    _tiny_run(tiny_teacher, fmnist_dir, runs / "b0", 0, "--lr-q", "0.01")
    proc = run_cli("analyze", str(runs / "a0"), str(runs / "a1"), "--out", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    from zsq.analysis.plots import class_names  # matplotlib: imported by the tests that plot

    assert class_names(str(runs / "a0")) == FMNIST_CLASSES and class_names(str(tmp_path / "none")) == []
    names = {"curves.png", "samples_gdfq.png", "attention_a0.png", "attention_a1.png"}
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names
    with Image.open(tmp_path / "plots" / "curves.png") as im:  # 3 panels a row, 5 × 3.4 inches each at 100 dpi
        assert im.size[0] == 1500 and im.size[1] % 340 == 0 and im.size[1] > 340
    with Image.open(tmp_path / "plots" / "samples_gdfq.png") as im:
        assert im.size == (1120, 300)  # 16 images: 2 rows of 8
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "report.md"), "--plots",
                   str(tmp_path / "plots" / "curves.png"))
    assert proc.returncode == 0, proc.stderr
    groups = group_runs(read_runs([runs]))
    assert [[r["seed"] for r in g["runs"]] for g in groups] == [[0, 1], [0]]
    accs = [json.loads((runs / d / "result.json").read_text())["q_top1"] for d in ("a0", "a1")]
    assert groups[0]["mean"] == pytest.approx(sum(accs) / 2)
    assert groups[1]["changes"]["lr_q"] == 0.01 and "lr_q" not in groups[0]["changes"]  # set beyond the preset
    text = (tmp_path / "report.md").read_text()
    assert "lr_q=0.01" in text and "](plots/curves.png)" in text
    page = (tmp_path / "report.html").read_text()  # the plots inside the page, so that it can be sent alone
    assert page.count('<img src="data:image/png;base64,') == 1 and "plots/curves.png" not in page
    health = [json.loads((runs / d / "result.json").read_text())["health"] for d in ("a0", "a1")]
    assert groups[0]["health"] == (pytest.approx(sum(h["score"] for h in health) / 2), sum(h["flagged"] for h in health))
    assert "health score (flagged runs)" in text and f"{groups[0]['health'][0]:.1f} ({groups[0]['health'][1]})" in text
    bad = run_cli("report", str(tmp_path / "none"), "--out", str(tmp_path / "r.md"))
    assert bad.returncode == 2 and "no finished run" in bad.stderr


def test_curve_stats_and_old_configs_group(tmp_path):
    rows = [{"iter": 0, "warmup": True}, {"iter": 5, "grad_norm": 3.0, "hessian_trace": 10.0},
            {"iter": 6, "grad_norm": float("nan")}, {"iter": 7, "grad_norm": 1.0}, {"iter": 8, "grad_norm": 8.0},
            {"iter": 9, "hessian_trace": 4.0, "hessian_trace_se": 1.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curve_stats(path) == {"grad_norm": {"median": 3.0, "max": 8.0}, "hessian_trace": {"mean": 7.0, "last": 4.0}}
    base = {"teacher": "resnet20_fmnist", "wbits": 3, "abits": 3, "generator": "gdfq", "method": "gdfq",
            "preset": "quick", "options": {}}
    new = {**base, "seed": 1, "promote": 0.0}
    old = {**base, "seed": 0}  # written before `promote` existed: it held the default then
    other = {**base, "seed": 0, "promote": 0.01}
    result = {"q_top1": 80.0, "fp_top1": 90.0, "wall_s": 60.0}
    runs = [{"dir": f"r{i}", "config": c, "result": result} for i, c in enumerate((new, old, other))]
    groups = group_runs(runs)
    assert sorted([r["seed"] for r in g["runs"]] for g in groups) == [[0], [0, 1]]


def test_range_options_the_setter_ignores_neither_split_nor_label():
    base = {"teacher": "resnet20_fmnist", "wbits": 3, "abits": 3, "generator": "gdfq", "method": "kd",
            "preset": "quick", "options": {}, "ste": "clipped"}
    result = {"q_top1": 80.0, "fp_top1": 90.0, "wall_s": 60.0}
    configs = [{**base, "seed": 0, "act_range": "ema-minmax", "bn_k": 3.0},
               {**base, "seed": 1, "act_range": "ema-minmax", "bn_k": 2.5},  # bn_k unused: same run as seed 0's
               {**base, "seed": 0, "act_range": "bn-prior", "bn_k": 3.0},
               {**base, "seed": 0, "act_range": "bn-prior", "bn_k": 2.5}]
    groups = group_runs([{"dir": f"r{i}", "config": c, "result": result} for i, c in enumerate(configs)])
    labels = sorted((len(g["runs"]), json.dumps(g["changes"], sort_keys=True)) for g in groups)
    assert labels == [(1, '{"bn_k": 3.0}'), (1, "{}"), (2, '{"act_range": "ema-minmax"}')]  # quick: bn-prior, k 2.5


def test_sample_titles_name_the_class_where_the_dataset_does():
    from zsq.analysis.plots import sample_title

    assert sample_title(0, FMNIST_CLASSES) == FMNIST_CLASSES[0] and sample_title(3, []) == "3"
    assert sample_title(0, ["a very long class name"], width=8) == "a very …"


def test_a_curve_near_zero_keeps_its_scale_beside_one_near_minus_921():
    """An older AdaDFQ run logged −T²·H ≈ −921: on one symlog axis with linear range 2 a curve near 0.06 was a
    flat line at 0. The linear range now ends at the smallest typical magnitude among the lines."""
    import matplotlib.pyplot as plt
    from zsq.analysis.plots import log_scale

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [-921.0, -920.0, -919.0])
    ax.plot([0, 1, 2], [0.06, 0.05, 0.07])
    log_scale(ax)
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_transform().linthresh == pytest.approx(0.06)
    ax.plot([0, 1, 2, 3], [0.0, 0.0, 0.0, -0.5])  # mostly zero: its median magnitude would be 0
    log_scale(ax)
    assert ax.yaxis.get_transform().linthresh == pytest.approx(0.06)
    ax.lines[2].remove()
    ax.lines[0].remove()
    log_scale(ax)
    assert ax.get_yscale() == "log"
    plt.close(fig)

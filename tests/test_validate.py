"""The data-free health check: each signal on hand-built models, and its place in `zsq quantize` / `zsq health`."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from zsq.models import load_model
from zsq.quant import calibrate, quantize_model
from zsq.synth import SourceContext
from zsq.synth.pixels import cache_path, teacher_hash
from zsq.validate import THRESHOLD, ProbeOptions, health, probe_set

from conftest import TINY_PROBE, quantize_tiny, run_cli


class Brightest(nn.Module):
    """conv (identity) → BN (identity statistics) → ReLU → mean → fc (10 × identity): the class of an image is its
    brightest channel, predicted confidently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=0.0)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
            self.fc.weight.copy_(10 * torch.eye(4))
            self.fc.bias.zero_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean((2, 3)))


def _probe(n: int = 32) -> torch.Tensor:
    x = torch.rand(n, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    x[torch.arange(n), torch.arange(n) % 4] += 1.0  # image i belongs to class i mod 4
    return x


def test_identical_models_agree_perfectly_with_zero_drift():
    t = Brightest()
    h = health(t, copy.deepcopy(t), _probe())
    assert h.agreement == 100.0 and h.kl == pytest.approx(0.0, abs=1e-7) and h.bn_drift == 0.0
    assert h.score == 100.0 and not h.flagged and h.probe_images == 32


def test_zeroed_weights_are_flagged():
    t, probe = Brightest(), _probe()
    q = quantize_model(t, wbits=8, abits=8)
    calibrate(q, [probe])
    assert health(t, q, probe).agreement == 100.0  # 8 bits keep every class
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.zero_()
    h = health(t, q, probe)
    assert h.agreement == 25.0  # constant logits: argmax is class 0 for every image
    probs = torch.softmax(t(probe), 1)  # the Q model now outputs the uniform distribution
    kl = (probs * (probs.log() + math.log(4))).sum(1).mean().item()
    assert h.kl == pytest.approx(kl, rel=1e-5) and h.score == pytest.approx(100 * math.exp(-kl), rel=1e-5)
    assert h.flagged and h.score < THRESHOLD and "FLAGGED" in h.line()


def test_bn_drift_is_the_normalised_moment_distance():
    t, probe = Brightest(), _probe()
    q = copy.deepcopy(t)
    with torch.no_grad():
        q.conv.weight.mul_(2)  # the BN input doubles: μq = 2μt, σq = 2σt
    mean, var = probe.mean((0, 2, 3)), probe.var((0, 2, 3), unbiased=False)
    expected = ((mean**2 + var) / var).mean().item()  # ((2μ−μ)² + (2σ−σ)²) / σ²
    assert health(t, q, probe).bn_drift == pytest.approx(expected, rel=1e-5)


def test_a_probe_of_the_wrong_shape_is_one_clear_error():
    from zsq.errors import UserError

    with pytest.raises(UserError, match="probe"):
        health(Brightest(), Brightest(), torch.zeros(4, 4))


def test_the_shipped_teacher_ships_its_probe(synth_cache):
    teacher = load_model("resnet20_fmnist")
    probe = probe_set(SourceContext(teacher, 10, 1, 32, "cpu", quiet=True))  # found, not built: no synthesis here
    assert probe.shape == (ProbeOptions.probe_images, 1, 32, 32)
    thash = teacher_hash(teacher)
    assert not any(cache_path(half, opts, thash).exists() for half, opts in ProbeOptions().halves().items())
    with torch.no_grad():
        classes = teacher(probe).argmax(1)
    assert len(classes.unique()) == 10  # the probe spans the teacher's classes


def test_quantize_reports_health_and_zsq_health_recomputes_it(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "run"
    proc = quantize_tiny(tiny_teacher, fmnist_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert "health" in proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert set(result["health"]) >= {"score", "flagged", "kl", "agreement", "bn_drift"}
    assert result["health"]["score"] == pytest.approx(100 * math.exp(-result["health"]["kl"]))
    assert result["select"] == "final" and result["selected_iter"] == 5 and "final_q_top1" not in result
    again = run_cli("health", str(out), *TINY_PROBE, "--json", str(tmp_path / "h.json"), "--quiet")
    assert again.returncode == (1 if result["health"]["flagged"] else 0), again.stderr
    recomputed = json.loads((tmp_path / "h.json").read_text())
    assert recomputed["score"] == pytest.approx(result["health"]["score"])  # same cached probe, same model
    assert recomputed["kl"] == pytest.approx(result["health"]["kl"], rel=1e-4)
    missing = run_cli("health", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not a finished run" in missing.stderr and "Traceback" not in missing.stderr


def test_select_health_keeps_the_best_checked_model(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "sel"
    proc = quantize_tiny(tiny_teacher, fmnist_dir, out, "--health-every", "1", "--select", "health")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checks = {r["iter"]: r["health"] for r in rows if "health" in r}
    assert sorted(checks) == [3, 4]  # after trained steps 1 and 2; the last step's check is the final one
    kept = result["health"]["score"]
    assert all(score <= kept for score in checks.values())
    if result["selected_iter"] == 5:
        assert "final_q_top1" not in result
    else:
        assert checks[result["selected_iter"]] == pytest.approx(kept) and "final_q_top1" in result
    bad = run_cli("quantize", "--select", "oracle", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr

"""The shipped teachers meet their acceptance numbers on the real Fashion-MNIST test set (Debian package): the
numbers recorded for the shipped files, and today's code reproducing them on a part of the test set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from zsq.data import FASHION_MNIST_DIR
from zsq.evaluate import run_eval
from zsq.models import load_model, shipped_models
from zsq.models.checkpoint import WEIGHTS_DIR
from zsq.synth.pixels import SHIPPED_CACHE, cache_path, teacher_hash
from zsq.validate import ProbeOptions

MIB = 1024 * 1024
TEACHERS = {"resnet20_fmnist": ("resnet20", 2 * MIB), "mobilenetv2_fmnist": ("mobilenet_v2", 5 * MIB)}


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_is_shipped_small_and_self_describing(name):
    arch, size = TEACHERS[name]
    assert name in shipped_models() and (WEIGHTS_DIR / f"{name}.pt").stat().st_size <= size
    m = load_model(name)
    assert m.zsq_arch == arch and m.zsq_dataset.name == "fashion-mnist" and m.zsq_dataset.in_channels == 1
    assert m.zsq_metrics["top1"] >= 93.0 and m.zsq_metrics["config"]["epochs"] >= 1


def test_the_mobilenet_teacher_is_the_depthwise_proxy():
    m = load_model("mobilenetv2_fmnist")
    assert m.cfg.width_mult <= 0.5 and m.cfg.stem_stride == 1 and m.zsq_dataset.image_size == 32


@pytest.mark.parametrize("name", TEACHERS)
def test_the_health_probe_is_shipped_with_the_teacher(name):
    t = load_model(name)
    thash = teacher_hash(t)
    for half, opts in ProbeOptions().halves().items():  # a first run on a shipped teacher never builds its probe
        assert (SHIPPED_CACHE / cache_path(half, opts, thash).name).is_file(), half


RECORD = Path(__file__).resolve().parents[1] / "results" / "teachers.json"  # python benchmarks/teachers.py


@pytest.mark.parametrize("name", TEACHERS)
def test_the_recorded_accuracy_is_the_shipped_files_and_meets_the_acceptance(name):
    """The full-set numbers (10,000 test images), measured by benchmarks/teachers.py, belong to the weight file
    shipped now; a retrained teacher needs the benchmark rerun."""
    row = json.loads(RECORD.read_text())["teachers"][name]
    assert row["sha256"] == hashlib.sha256((WEIGHTS_DIR / f"{name}.pt").read_bytes()).hexdigest()
    fp, q8 = row["fp"], row["w8a8"]
    assert fp["n"] == q8["n"] == 10000 and fp["top1"] >= 93.0 and abs(q8["top1"] - fp["top1"]) <= 0.5
    assert fp["top1"] == pytest.approx(load_model(name).zsq_metrics["top1"], abs=1e-6)  # as trained


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is missing")
@pytest.mark.parametrize("name", TEACHERS)
def test_todays_code_reproduces_the_recorded_accuracy(name):
    """On the first images of the real test set, FP exactly and W8A8 within one image in a thousand: a code change
    that moved the evaluation, the data or the 8-bit quantizer shows here (a tenth of the full evaluation's time)."""
    record = json.loads(RECORD.read_text())
    row, n = record["teachers"][name], record["subset"]
    fp = run_eval(name, limit=n)
    assert fp["n"] == n and fp["top1"] == pytest.approx(row["fp"][f"top1_first_{n}"], abs=1e-6)
    q8 = run_eval(name, wbits=8, abits=8, limit=n)
    assert abs(q8["top1"] - row["w8a8"][f"top1_first_{n}"]) <= 0.1

"""The shipped teachers meet their acceptance numbers on the real Fashion-MNIST test set (Debian package)."""
from __future__ import annotations

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


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is missing")
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_accuracy_fp_and_w8a8(name):
    fp = run_eval(name)
    assert fp["n"] == 10000 and fp["top1"] >= 93.0
    assert fp["top1"] == pytest.approx(load_model(name).zsq_metrics["top1"], abs=1e-6)
    q8 = run_eval(name, wbits=8, abits=8)
    assert abs(q8["top1"] - fp["top1"]) <= 0.5

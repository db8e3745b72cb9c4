"""The shipped teacher meets its acceptance numbers on the real Fashion-MNIST test set (Debian package)."""
from __future__ import annotations

import pytest

from zsq.data import FASHION_MNIST_DIR
from zsq.evaluate import run_eval
from zsq.models import load_model, shipped_models
from zsq.models.checkpoint import WEIGHTS_DIR


def test_teacher_is_shipped_small_and_self_describing():
    assert "resnet20_fmnist" in shipped_models()
    assert (WEIGHTS_DIR / "resnet20_fmnist.pt").stat().st_size <= 2 * 1024 * 1024
    m = load_model("resnet20_fmnist")
    assert m.zsq_dataset.name == "fashion-mnist" and m.zsq_dataset.in_channels == 1
    assert m.zsq_metrics["top1"] >= 93.0 and m.zsq_metrics["config"]["epochs"] >= 1


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is missing")
def test_teacher_accuracy_fp_and_w8a8():
    fp = run_eval("resnet20_fmnist")
    assert fp["n"] == 10000 and fp["top1"] >= 93.0
    assert fp["top1"] == pytest.approx(load_model("resnet20_fmnist").zsq_metrics["top1"], abs=1e-6)
    q8 = run_eval("resnet20_fmnist", wbits=8, abits=8)
    assert abs(q8["top1"] - fp["top1"]) <= 0.5

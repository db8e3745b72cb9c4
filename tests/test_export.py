"""The packed export: bit packing against hand values, round trips for registered and custom models, sizes, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from zsq.data import DatasetInfo
from zsq.errors import UserError
from zsq.export import load_packed, pack_bits, pack_model, read_packed, save_packed, size_report, unpack_bits
from zsq.models import create_model, save_checkpoint
from zsq.quant import calibrate, gaussian_inputs, quantize_model

from conftest import run_cli


def test_pack_bits_hand_value_and_round_trip():
    # 2-bit codes 1, 2, 3 → bits (LSB first) 10 01 11 + padding 00 → 0b00111001 = 57
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        codes = torch.randint(0, 2**bits, (1001,), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, 1001), codes)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)


def _quantized(model: nn.Module, wbits: int, shape: tuple[int, int, int]) -> nn.Module:
    torch.manual_seed(0)
    q = quantize_model(model, wbits=wbits, abits=4)
    with torch.no_grad():  # trained-looking BN statistics, so that the round trip covers them
        for m in q.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return calibrate(q, gaussian_inputs(2, 16, shape)).eval()


@pytest.mark.parametrize("wbits", [3, 4, 8])
def test_round_trip_resnet20(tmp_path, wbits):
    q = _quantized(create_model("resnet20", in_channels=1), wbits, (1, 32, 32))
    path = save_packed(q, tmp_path / "m.zsq")
    rebuilt = load_packed(path)
    x = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), q(x), atol=1e-5, rtol=0)
    a, b = pack_model(q), pack_model(rebuilt)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["zeros"], b["zeros"])  # the same integers
    torch.testing.assert_close(a["scales"], b["scales"], atol=0, rtol=1e-6)
    assert a["zeros"].dtype == torch.uint8  # every ResNet-20 channel straddles 0 here


def test_round_trip_custom_cnn_needs_its_module(tmp_path):
    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 10))

    q = _quantized(cnn(), 3, (1, 16, 16))
    path = save_packed(q, tmp_path / "c.zsq")
    with pytest.raises(UserError, match="custom"):
        load_packed(path)
    rebuilt = load_packed(path, cnn())
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), q(x), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="does not match"):
        load_packed(path, nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)))


def test_size_report_counts_k_bits_per_weight():
    q = _quantized(create_model("resnet20", in_channels=1), 3, (1, 32, 32))
    report = size_report(q)
    conv = next(r for r in report["layers"] if r["layer"] == "layer3.0.conv2")
    assert conv["params"] == 64 * 64 * 9 and conv["bits"] == 3
    assert conv["packed_bytes"] == math.ceil(64 * 64 * 9 * 3 / 8) + 64 * (4 + 1)  # codes + fp32 scale + u8 zero
    assert report["weight_compression"] == pytest.approx(
        report["weight_fp32_bytes"] / sum(r["packed_bytes"] for r in report["layers"]))
    assert 9 < report["weight_compression"] < 32 / 3


def test_export_cli(tmp_path):
    q = _quantized(create_model("resnet20", in_channels=1), 4, (1, 32, 32))
    info = DatasetInfo("fashion-mnist", 10, 1, 32, (0.5,), (0.25,))
    run = tmp_path / "run"
    save_checkpoint(q, run / "student.pt", info, quant=q.zsq_quant)
    out = tmp_path / "m.zsq"
    proc = run_cli("export", str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "m.zsq.json").read_text())
    assert report["roundtrip_max_abs_logit_diff"] < 1e-4 and report["files"]["packed"] == out.stat().st_size
    assert report["compression"] > 6 and "round trip" in proc.stdout
    assert read_packed(out)["dataset"]["name"] == "fashion-mnist"
    fp = tmp_path / "fp.pt"
    save_checkpoint(create_model("resnet20", in_channels=1), fp, info)
    for args, needle in (([str(tmp_path / "none")], "not found"), ([str(fp)], "full-precision"),
                         ([str(run), "--format", "tflite"], "tflite")):
        bad = run_cli("export", *args, "--out", str(tmp_path / "x.zsq"))
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "junk.zsq").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_packed(tmp_path / "junk.zsq")

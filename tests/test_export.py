"""The packed export: bit packing against hand values, round trips for registered and custom models, sizes, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx  # the dev extra installs the export extra's onnx and onnxruntime
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from zsq.data import DatasetInfo
from zsq.errors import UserError
from zsq.export import load_packed, pack_bits, pack_model, read_packed, save_packed, size_report, unpack_bits
from zsq.export.onnx_qdq import build_onnx, fold_bn
from zsq.export.packed import weight_codes
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


def test_round_trip_resnet18(tmp_path):
    q = _quantized(create_model("resnet18", in_channels=3, num_classes=10), 4, (3, 64, 64))
    rebuilt = load_packed(save_packed(q, tmp_path / "r18.zsq"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), q(x), atol=1e-4, rtol=1e-5)
    assert size_report(q)["weight_compression"] > 7.5  # 4-bit codes + per-channel scale and zero point


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
    proc = run_cli("export", str(run), "--format", "packed", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "m.zsq.json").read_text())
    assert report["roundtrip_max_abs_logit_diff"] < 1e-4 and report["files"]["packed"] == out.stat().st_size
    assert report["compression"] > 6 and "round trip" in proc.stdout
    assert read_packed(out)["dataset"]["name"] == "fashion-mnist"
    fp = tmp_path / "fp.pt"
    save_checkpoint(create_model("resnet20", in_channels=1), fp, info)
    for args, needle in (([str(tmp_path / "none")], "not found"), ([str(fp)], "full-precision"),
                         ([str(run), "--format", "tflite"], "tflite")):
        bad = run_cli("export", *args, "--format", "packed", "--out", str(tmp_path / "x.zsq"))
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "junk.zsq").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_packed(tmp_path / "junk.zsq")


# ---- ONNX (QDQ) -------------------------------------------------------------------------------------------------


def _ort_vs_torch(q: nn.Module, shape: tuple[int, int, int], n: int = 64) -> tuple[float, float, object]:
    proto = build_onnx(q, shape[1], shape[0], (0.5,) * shape[0], (0.25,) * shape[0], {"k": "v"})
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q((x - 0.5) / 0.25)
    out = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    return float((out - ref).abs().max() / (ref.max() - ref.min())), float((out.argmax(1) == ref.argmax(1)).float().mean()), proto


@pytest.mark.parametrize("bits", [3, 4])
def test_onnx_matches_pytorch_and_stores_k_bit_integers(bits):
    q = _quantized(create_model("resnet20", in_channels=1), bits, (1, 32, 32))
    rel, agree, proto = _ort_vs_torch(q, (1, 32, 32))
    assert rel <= 1e-3 and agree >= 0.99
    weights = [i for i in proto.graph.initializer if "weight_q" in i.name]
    assert len(weights) == 22 and all(i.data_type == onnx.TensorProto.UINT4 for i in weights)
    for init in weights:
        codes = numpy_helper.to_array(init).astype(int)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["k"] == "v" and json.loads(meta["layers"])["fc"] == {"bits": bits, "container": "UINT4"}
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # every BN folded


def test_onnx_other_architectures():
    a = _quantized(create_model("resnet20", in_channels=3, shortcut="A"), 4, (3, 32, 32))  # slice + pad shortcut
    rel, agree, _ = _ort_vs_torch(a, (3, 32, 32), n=16)
    assert rel <= 1e-3 and agree == 1.0
    r18 = _quantized(create_model("resnet18", in_channels=3), 4, (3, 64, 64))  # ImageNet stem with max-pool
    rel, agree, _ = _ort_vs_torch(r18, (3, 64, 64), n=8)
    assert rel <= 1e-3 and agree == 1.0
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU6(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    rel, agree, proto = _ort_vs_torch(_quantized(cnn, 8, (1, 16, 16)), (1, 16, 16), n=16)
    assert rel <= 1e-2 and agree == 1.0  # 8-bit activations: float-order rounding flips, a finer step
    assert {i.data_type for i in proto.graph.initializer if "weight_q" in i.name} == {onnx.TensorProto.UINT8}
    with pytest.raises(UserError, match="Upsample"):
        build_onnx(_quantized(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Upsample(scale_factor=2),
                                            nn.Flatten()), 4, (1, 8, 8)), 8, 1, (0.0,), (1.0,), {})


def test_channels_that_do_not_straddle_zero(tmp_path):
    q = _quantized(create_model("resnet20", in_channels=1), 3, (1, 32, 32))
    with torch.no_grad():
        q.conv1.weight[0] = q.conv1.weight[0].abs() + 0.1  # all positive: a small negative Z
        q.layer1[0].conv1.weight[1] = -q.layer1[0].conv1.weight[1].abs() - 50.0  # all far below 0: Z ≫ 2ᵏ
    rel, agree, proto = _ort_vs_torch(q, (1, 32, 32), n=16)
    assert rel <= 1e-3 and agree == 1.0
    layers = json.loads({p.key: p.value for p in proto.metadata_props}["layers"])
    assert layers["conv1"]["container"] == "INT4" and layers["layer1.0.conv1"]["container"] not in ("UINT4", "INT4")
    assert layers["layer1.0.conv2"]["container"] == "UINT4"
    assert pack_model(q)["zeros"].dtype == torch.int32
    rebuilt = load_packed(save_packed(q, tmp_path / "m.zsq"))
    with torch.no_grad():
        x = torch.randn(4, 1, 32, 32)
        torch.testing.assert_close(rebuilt(x), q(x), atol=1e-4, rtol=1e-5)


def test_bn_folds_into_the_per_channel_scale():
    torch.manual_seed(3)
    conv = quantize_model(nn.Sequential(nn.Conv2d(3, 6, 3)), wbits=3, abits=32)[0]
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.2, 2.0, -1.1, 0.9]))  # negative γ too
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
    codes, scale, zero = (t.numpy() for t in weight_codes(conv))
    f_scale, f_bias = fold_bn(scale.astype(np.float64), conv.bias.detach().numpy(), bn)
    x = torch.randn(4, 3, 8, 8)
    w = torch.from_numpy(f_scale).view(-1, 1, 1, 1) * (torch.from_numpy(codes).float()
                                                        - torch.from_numpy(zero).float().view(-1, 1, 1, 1))
    folded = nn.functional.conv2d(x, w) + torch.from_numpy(f_bias).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(folded, bn(conv(x)), atol=1e-5, rtol=1e-5)
    assert torch.equal(weight_codes(conv)[0], torch.from_numpy(codes))  # integers unchanged


def test_export_onnx_cli(tmp_path):
    q = _quantized(create_model("resnet20", in_channels=1), 4, (1, 32, 32))
    info = DatasetInfo("fashion-mnist", 10, 1, 32, (0.5,), (0.25,), [f"c{i}" for i in range(10)])
    save_checkpoint(q, tmp_path / "run" / "student.pt", info, quant=q.zsq_quant)
    out = tmp_path / "m.onnx"
    proc = run_cli("export", str(tmp_path / "run"), "--format", "onnx", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "m.onnx.json").read_text())
    assert report["ort_max_abs_logit_diff_rel"] <= 1e-3 and report["ort_top1_agreement"] >= 0.99
    assert report["ort_codes"] == 64 * (7 * 16 * 32 * 32 + 6 * 32 * 16 * 16 + 6 * 64 * 8 * 8)  # every ReLU's codes
    assert report["ort_codes_differing"] <= 1e-4 * report["ort_codes"]  # only ties within float rounding
    assert report["files"]["onnx"] == out.stat().st_size
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["zsq_wbits"] == "4" and json.loads(meta["classes"])[3] == "c3" and meta["dataset"] == "fashion-mnist"

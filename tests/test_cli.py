"""The CLI end to end, as a user runs it: exit codes, one-line errors, files written atomically; the entry point
and kills in a process of its own."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from zsq.device import resolve_precision
from zsq.models import load_model

from conftest import kill_when, quantize_tiny, run_cli, run_cli_process


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_everywhere():
    for args in ([], ["teacher"], ["teacher", "train"], ["eval"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0 and "usage: zsq" in proc.stdout


def test_the_entry_point_as_a_process():
    """`python -m zsq` turns a bad input into one line and exit code 2 (one process: each costs seconds)."""
    assert_one_line_error(run_cli_process("quantize", "--wbits", "9", "--out", "x"), "bits must be in 2..8")
    assert run_cli("--version").stdout.startswith("zsq ")


def test_teacher_checkpoint_records_everything(tiny_teacher):
    ckpt = torch.load(tiny_teacher, weights_only=True)
    assert ckpt["zsq"] == "model" and ckpt["arch"] == "resnet20"
    assert ckpt["dataset"]["name"] == "fashion-mnist" and ckpt["dataset"]["in_channels"] == 1
    assert 0 <= ckpt["metrics"]["top1"] <= 100 and len(ckpt["metrics"]["history"]) == 2
    assert ckpt["metrics"]["config"]["precision"] == resolve_precision("auto", "cpu")  # recorded as resolved
    assert resolve_precision("auto", "cpu") == ("bf16" if torch.backends.cpu.get_cpu_capability().startswith(
        ("AVX512", "AMX")) else "fp32") and resolve_precision("fp32", "cuda") == "fp32"


def test_eval_fp_and_quantized_json(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "res" / "r.json"
    proc = run_cli("eval", "--model", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    fp = json.loads(out.read_text())
    assert fp["n"] == 40 and fp["quant"] is None and fp["dataset"] == "fashion-mnist"
    model = load_model(tiny_teacher)
    from zsq.data import load_dataset
    from zsq.evaluate import evaluate

    direct = evaluate(model, load_dataset("fashion-mnist", "test", fmnist_dir))
    assert fp["top1"] == pytest.approx(direct["top1"])
    proc = run_cli("eval", "--model", "resnet20", "--checkpoint", str(tiny_teacher), "--data-dir", str(fmnist_dir),
                   "--wbits", "4", "--abits", "8", "--eval-limit", "16", "--calib-batches", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    q = json.loads(out.read_text())
    assert q["n"] == 16 and q["quant"]["wbits"] == 4 and "no training" in proc.stdout
    assert q["quant"]["calibration"].startswith("1×256 Gaussian-noise images")
    assert q["quant"]["placement"] == "lineage"  # a registered architecture: the papers' places
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp files left behind
    proc = run_cli("eval", "--model", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--wbits", "4", "--abits",
                   "4", "--placement", "deployable", "--eval-limit", "16", "--calib-batches", "1", "--json", str(out))
    assert proc.returncode == 0 and json.loads(out.read_text())["quant"]["placement"] == "deployable", proc.stderr
    assert_one_line_error(run_cli("eval", "--model", str(tiny_teacher), "--placement", "deployable"),
                          "--placement applies to a quantized evaluation")


BAD_BITS = ["0", "1", "9", "33"]


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bits_out_of_range(bits):
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--wbits", bits), "bits", "2..8")
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--abits", bits), "bits", "2..8")


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--checkpoint", str(tmp_path / "no.pt")),
                          "not found")
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "no.pt")), "not found")


def test_corrupt_checkpoint(tiny_teacher, tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(tiny_teacher.read_bytes()[:5000])  # a download cut short
    assert_one_line_error(run_cli("eval", "--model", str(bad)), "cut.pt", "corrupt")


def test_pickle_that_is_not_weights(tmp_path):
    import argparse

    path = tmp_path / "args.pt"
    torch.save(argparse.Namespace(lr=0.1), path)
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--checkpoint", str(path)), "weights-only")


def test_unknown_model_and_dataset():
    assert_one_line_error(run_cli("eval", "--model", "resnet21"), "unknown model 'resnet21'", "resnet20")
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--dataset", "svhn"), "svhn")
    assert_one_line_error(run_cli("teacher", "train", "--model", "vgg", "--out", "x.pt"), "vgg")


def test_empty_and_wrong_data_dir(tmp_path, tiny_teacher):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("eval", "--model", str(tiny_teacher), "--data-dir", str(empty)), "missing")
    assert_one_line_error(run_cli("eval", "--model", str(tiny_teacher), "--data-dir", str(tmp_path / "nope")),
                          "not found")
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(empty)),
                          "missing CIFAR batch")
    assert_one_line_error(run_cli("eval", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir",
                                  str(empty)), "no images")


def test_channel_mismatch(tiny_teacher, cifar10_dir):
    proc = run_cli("eval", "--model", str(tiny_teacher), "--dataset", "cifar10", "--data-dir", str(cifar10_dir))
    assert_one_line_error(proc, "1-channel", "3")


def test_a_run_folder_that_cannot_be_made_is_one_line(tiny_teacher, fmnist_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    assert_one_line_error(quantize_tiny(tiny_teacher, fmnist_dir, blocker / "run"), "run folder", "--out")
    assert blocker.read_text() == "kept"


def test_teacher_train_takes_the_architectures_own_arguments(fmnist_dir, tmp_path):
    out = tmp_path / "m.pt"
    proc = run_cli("teacher", "train", "--model", "mobilenet_v2", "--model-arg", "width_mult=0.35",
                   "--model-arg", "stem_stride=1", "--data-dir", str(fmnist_dir), "--epochs", "1", "--batch-size", "32",
                   "--precision", "bf16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    model = load_model(out)
    assert model.zsq_metrics["config"]["precision"] == "bf16"  # trains under bf16 autocast on any CPU when asked
    assert model.zsq_arch == "mobilenet_v2" and model.cfg.width_mult == 0.35 and model.cfg.stem_stride == 1
    assert model.features[0][0].stride == (1, 1) and model.features[0][0].in_channels == 1
    assert_one_line_error(run_cli("teacher", "train", "--model", "resnet20", "--model-arg", "width_mult=0.5",
                                  "--data-dir", str(fmnist_dir), "--out", str(tmp_path / "r.pt")),
                          "model resnet20 takes no argument 'width_mult'")
    assert not (tmp_path / "r.pt").exists()


def test_teacher_train_bad_data_leaves_nothing(tmp_path):
    out = tmp_path / "t.pt"
    proc = run_cli("teacher", "train", "--data-dir", str(tmp_path / "nope"), "--out", str(out))
    assert_one_line_error(proc, "not found")
    assert list(tmp_path.iterdir()) == []


def test_teacher_resume_after_kill(fmnist_dir, tmp_path):
    args = ["teacher", "train", "--data-dir", str(fmnist_dir), "--epochs", "4", "--batch-size", "32", "--lr",
            "0.05", "--eval-limit", "8"]
    killed, full = tmp_path / "killed.pt", tmp_path / "full.pt"
    resume_file = killed.with_name(killed.name + ".resume")
    kill_when([*args, "--out", str(killed)], resume_file)
    assert resume_file.exists() and not killed.exists(), "the run finished before it could be killed"
    resumed = run_cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert run_cli(*args, "--out", str(full)).returncode == 0
    a, b = torch.load(killed, weights_only=True), torch.load(full, weights_only=True)
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, msg=k)
    assert len(a["metrics"]["history"]) == 4 and not resume_file.exists()


USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A MobileNetV2-style block written outside zsq: depthwise conv, ReLU6, a linear bottleneck, a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make():
    return Net()
'''


def test_a_users_module_through_every_command(fmnist_dir, tmp_path):
    (tmp_path / "mynet.py").write_text(USER_MODEL)
    spec = f"{tmp_path / 'mynet.py'}:make"
    import importlib.util
    loader = importlib.util.spec_from_file_location("mynet_ref", tmp_path / "mynet.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(mod.make().state_dict(), tmp_path / "weights.pt")  # a bare state_dict, as users hold them
    ev = run_cli("eval", "--model", str(tmp_path / "weights.pt"), "--model-def", spec, "--data-dir", str(fmnist_dir),
                 "--wbits", "4", "--abits", "4", "--eval-limit", "8", "--device", "cpu")
    assert ev.returncode == 0 and "W4A4 fake-quant" in ev.stdout, ev.stderr
    run = tmp_path / "run"
    q = run_cli("quantize", "--model-def", spec, "--teacher", str(tmp_path / "weights.pt"), "--dataset",
                "fashion-mnist", "--data-dir", str(fmnist_dir), "--epochs", "2", "--iters-per-epoch", "2",
                "--batch-size", "4", "--eval-limit", "8", "--probe-images", "8", "--probe-iters", "2", "--quiet",
                "--out", str(run))
    assert q.returncode == 0, q.stderr
    config, result = (json.loads((run / name).read_text()) for name in ("config.json", "result.json"))
    assert config["model_def"] == spec and result["placement"] == "deployable" and result["float_tensors"] == []
    for fmt in ("onnx", "packed"):
        x = run_cli("export", str(run), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}"))
        assert x.returncode == 0, x.stderr
    report = json.loads((tmp_path / "m.onnx.json").read_text())
    assert report["placement"] == "deployable" and report["ort_top1_agreement"] == 1.0
    h = run_cli("health", str(run), "--probe-images", "8", "--probe-iters", "2", "--quiet")
    assert h.returncode in (0, 1) and "health" in h.stdout, h.stderr
    ev = run_cli("eval", "--model", str(run / "student.pt"), "--model-def", spec, "--data-dir", str(fmnist_dir),
                 "--eval-limit", "8", "--device", "cpu")
    assert ev.returncode == 0 and f"top1 {result['q_top1']:.2f}" in ev.stdout, ev.stderr
    # the hint of the refusal works when followed: it names the flag and its value
    bare = run_cli("eval", "--model", str(run / "student.pt"), "--data-dir", str(fmnist_dir), "--eval-limit", "8")
    assert_one_line_error(bare, f"--model-def {spec}")
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "weights.pt"), "--model-def",
                                  f"{tmp_path / 'mynet.py'}:missing"), "defines no function or class 'missing'")
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "weights.pt"), "--model-def", "mynet"),
                          "FILE.py:FACTORY")

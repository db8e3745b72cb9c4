"""The quantization loop end to end on a tiny budget: CLI, Python API, every generator × method, resume, guard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import zsq
from zsq.device import deterministic
from zsq.distill import list_methods
from zsq.errors import UserError
from zsq.quant import ActQuantizer
from zsq.synth import list_sources
from zsq.synth.pixels import PIXEL_SOURCES
from zsq.train import resolve_config

from conftest import PROBE_KW, TINY, TINY_PROBE, run_cli

def test_quantize_cli_writes_the_run(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--wbits", "4",
                   "--abits", "4", "--generator", "gdfq", "--method", "gdfq", *TINY, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "result.json", "samples.pt",
                                                     "student.pt"]
    samples = torch.load(out / "samples.pt", weights_only=True)  # what zsq analyze draws
    assert samples["images"].shape[1:] == (1, 32, 32) and len(samples["labels"]) == 32 and samples["source"] == "gdfq"
    result = json.loads((out / "result.json").read_text())
    for key in ("fp_top1", "q_top1", "wbits", "abits", "generator", "method", "preset", "iterations", "wall_s",
                "seed", "device", "torch"):
        assert key in result
    assert result["iterations"] == 6 and result["generator"] == "gdfq"
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 8 and config["options"] == {} and config["preset"] == "quick"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == list(range(6))
    assert all(r["warmup"] for r in rows[:3]) and "loss_q" in rows[3] and "grad_norm" in rows[3]
    assert "loss_g" in rows[0] and "loss_q" not in rows[0]
    ev = run_cli("eval", "--model", str(out / "student.pt"), "--data-dir", str(fmnist_dir), "--json",
                 str(tmp_path / "e.json"))
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(result["q_top1"])
    again = run_cli("quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), *TINY, "--out", str(out))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


@pytest.mark.parametrize("generator", list_sources())
@pytest.mark.parametrize("method", list_methods())
def test_every_generator_with_every_method(generator, method, tiny_teacher, fmnist_dir, tmp_path):
    offline = {"synth_images": 8, "synth_batch": 8, "synth_iters": 2} if generator in PIXEL_SOURCES else {}
    r = zsq.quantize(str(tiny_teacher), wbits=3, abits=4, generator=generator, method=method, data_dir=str(fmnist_dir),
                     epochs=2, iters_per_epoch=2, warmup_epochs=1, batch_size=6, out=str(tmp_path / "r"), quiet=True,
                     **offline, **PROBE_KW)
    assert 0 <= r.q_top1 <= 100 and r.summary["skipped_steps"] == 0
    quants = [m for m in r.qmodel.modules() if isinstance(m, ActQuantizer)]
    assert quants and all(not q.observing and q.hi > q.lo for q in quants)  # calibrated in warm-up, then frozen


def test_warmup_calibrates_ranges_and_leaves_weights_alone(tiny_teacher, fmnist_dir, tmp_path):
    teacher = zsq.load_model(str(tiny_teacher))
    r = zsq.quantize(teacher, dataset="fashion-mnist", data_dir=str(fmnist_dir), epochs=2, iters_per_epoch=2,
                     warmup_epochs=1, batch_size=4, lr_q=1e-9, out=str(tmp_path / "r"), quiet=True, **PROBE_KW)
    # with a negligible LR the Q model's shadow weights stay the teacher's: only ranges and BN affine may move
    conv_w = dict(r.qmodel.named_parameters())["conv1.weight"].detach().cpu()
    torch.testing.assert_close(conv_w, teacher.conv1.weight, atol=1e-6, rtol=0)


def test_presets_and_overrides():
    paper = resolve_config("paper", "adadfq", "adadfq")
    assert (paper.epochs, paper.iters_per_epoch, paper.batch_size, paper.milestones) == (400, 200, 16, [100, 200, 300])
    assert resolve_config("paper", "gdfq", "gdfq").options == {"kd_reduction": "elementwise"}
    assert resolve_config("paper", "gdfq", "kd").batch_size == 200
    akt = resolve_config("paper", "adadfq", "akt-channel")  # AKT's own budget, over the data source's
    assert (akt.epochs, akt.milestones, akt.batch_size) == (200, [100], 200)
    assert "akt_lambda" not in akt.options  # the paper budget keeps the official weight
    quick_akt = resolve_config("quick", "gdfq", "akt")
    assert quick_akt.options == {"akt_lambda": 1e4} and (quick_akt.bn_propagate, quick_akt.bn_k) == ("moments", 2.5)
    quick_kd = resolve_config("quick", "gdfq", "kd")
    assert (quick_kd.act_range, quick_kd.bn_propagate, quick_kd.bn_k) == ("bn-prior", "bounds", 2.5)
    quick_gdfq = resolve_config("quick", "gdfq", "gdfq")
    assert (quick_gdfq.act_range, quick_gdfq.act_percentile, quick_gdfq.ste) == ("percentile", 99.7, "clipped")
    assert resolve_config("paper", "gdfq", "kd", act_range="bn-prior").bn_k == 3.0
    assert resolve_config("quick", "gdfq", "akt", bn_propagate="bounds").bn_propagate == "bounds"
    assert resolve_config("quick", "gdfq", "akt", akt_lambda=5.0).options == {"akt_lambda": 5.0}
    quick = resolve_config("quick", "gdfq", "kd", batch_size=32, epochs=None, kd_temperature=4.0)
    assert quick.batch_size == 32 and quick.epochs == resolve_config("quick").epochs
    assert quick.options == {"kd_temperature": 4.0}
    with pytest.raises(UserError, match="lambda_l"):
        resolve_config("quick", "gdfq", "kd", lambda_l=0.3)  # an AdaDFQ option on a GDFQ run
    with pytest.raises(UserError, match="preset"):
        resolve_config("fast")


def test_bad_quantize_input(tiny_teacher):
    for args, needle in ((["--wbits", "9"], "2..8"), (["--generator", "vae"], "vae"), (["--method", "x"], "'x'"),
                         (["--warmup-epochs", "5", "--epochs", "2"], "warmup-epochs"),
                         (["--teacher", "nope.pt"], "not found")):
        proc = run_cli("quantize", "--teacher", str(tiny_teacher), *args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_guard_stops_on_nonfinite_loss(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--epochs", "3",
                   "--iters-per-epoch", "4", "--warmup-epochs", "1", "--batch-size", "8", "--lr-q", "1e30",
                   "--max-bad-steps", "2", "--ckpt-every", "1", "--out", str(out), "--quiet", *TINY_PROBE)
    assert proc.returncode == 2, proc.stderr
    assert "NaN/Inf" in proc.stderr and "lower --lr-q" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "state.pt").is_file() and not (out / "result.json").exists()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows, "the metrics up to the failure are kept"


def test_resume_after_kill_is_identical(tiny_teacher, fmnist_dir, tmp_path):
    args = ["quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--epochs", "4",
            "--iters-per-epoch", "10", "--warmup-epochs", "1", "--batch-size", "8", "--ckpt-every", "3",
            "--deterministic", "--quiet", "--eval-limit", "8", *TINY_PROBE]
    killed, full = tmp_path / "killed", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, "-m", "zsq", *args, "--out", str(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "state.pt").exists() and not (killed / "result.json").exists(), "finished before the kill"
    resumed = run_cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli(*args, "--out", str(full)).returncode == 0
    a = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(full / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(l)["iter"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(40))  # no iteration logged twice or lost
    assert not (killed / "state.pt").exists()


def test_deterministic_keeps_the_thread_count():
    threads = torch.get_num_threads()
    try:
        deterministic()
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    finally:
        torch.use_deterministic_algorithms(False)


def test_sigterm_saves_and_resumes(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "term"
    args = ["quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--epochs", "3",
            "--iters-per-epoch", "200", "--warmup-epochs", "1", "--batch-size", "4", "--ckpt-every", "100000",
            "--quiet", "--eval-limit", "8", "--out", str(out), *TINY_PROBE]
    proc = subprocess.Popen([sys.executable, "-m", "zsq", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err
    state = torch.load(out / "state.pt", weights_only=True)
    assert 0 < state["step"] < 600

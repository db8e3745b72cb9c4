"""The recipe and the quantization loop end to end on a tiny budget: CLI, Python API, resume, guard."""
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
import zsq.errors
from zsq.device import deterministic
from zsq.provenance import hardware
from zsq.errors import UserError
from zsq.quant import ActQuantizer
from zsq.train import resolve_config
from zsq.validate import ProbeOptions

from conftest import PROBE_KW, SMALL_GEN, SMALL_GEN_KW, TINY, TINY_PROBE, kill_when, run_cli


def test_quantize_cli_writes_the_run(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--wbits", "4",
                   "--abits", "4", "--source", "gdfq", "--loss", "kd+ce", *TINY, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "result.json", "samples.pt",
                                                     "student.pt"]
    samples = torch.load(out / "samples.pt", weights_only=True)  # what zsq analyze draws
    assert samples["images"].shape[1:] == (1, 32, 32) and len(samples["labels"]) == 32 and samples["source"] == "gdfq"
    result = json.loads((out / "result.json").read_text())
    for key in ("fp_top1", "q_top1", "wbits", "abits", "source", "loss", "preset", "iterations", "wall_s",
                "cpu_s", "seed", "device", "hardware", "torch"):
        assert key in result
    # the training loop's CPU time, not the process's since it started (importing torch alone costs seconds)
    assert 0 < result["cpu_s"] <= result["wall_s"] * os.cpu_count() + 0.5
    assert result["hardware"] == hardware("cpu") and result["hardware"].endswith(f", {os.cpu_count()} cores")
    assert ("(AVX-512)" in result["hardware"]) == (" avx512f" in open("/proc/cpuinfo").read())  # speed differs 2×
    assert result["iterations"] == 6 and (result["source"], result["loss"]) == ("gdfq", "kd+ce")
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 8 and config["preset"] == "quick"
    assert config["options"] == {"act_percentile": 99.7, **SMALL_GEN_KW}  # the quick preset's range setter for kd+ce
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


def test_warmup_calibrates_ranges_and_leaves_weights_alone(tiny_teacher, fmnist_dir, tmp_path):
    teacher = zsq.load_model(str(tiny_teacher))
    r = zsq.quantize(teacher, dataset="fashion-mnist", data_dir=str(fmnist_dir), epochs=2, iters_per_epoch=2,
                     warmup_epochs=1, batch_size=4, lr_q=1e-9, out=str(tmp_path / "r"), quiet=True, **PROBE_KW)
    # with a negligible LR the Q model's shadow weights stay the teacher's: only ranges and BN affine may move
    conv_w = dict(r.qmodel.named_parameters())["conv1.weight"].detach().cpu()
    torch.testing.assert_close(conv_w, teacher.conv1.weight, atol=1e-6, rtol=0)


def test_presets_and_overrides():
    paper = resolve_config("paper", "adadfq", "gap-entropy")
    optim = paper.optim
    assert (optim.epochs, optim.iters_per_epoch, optim.batch_size, optim.milestones) == (400, 200, 16, [100, 200, 300])
    assert resolve_config("paper", "gdfq", "kd+ce").options == {"kd_reduction": "elementwise"}
    assert resolve_config("paper", "gdfq", "kd").optim.batch_size == 200
    akt = resolve_config("paper", "adadfq", "akt-channel")  # AKT's own budget, over the data source's
    assert (akt.optim.epochs, akt.optim.milestones, akt.optim.batch_size) == (200, [100], 200)
    assert "akt_lambda" not in akt.options  # the paper budget keeps the official weight
    quick_akt = resolve_config("quick", "gdfq", "akt")
    # the range setter's options are recorded in full: the preset's where it sets them, else the setter's defaults
    assert quick_akt.options == {"akt_lambda": 1e4, "bn_k": 2.5, "bn_propagate": "moments"}
    quick_kd = resolve_config("quick", "gdfq", "kd")
    assert quick_kd.ranges.act_range == "bn-prior" and quick_kd.options == {"bn_k": 2.5, "bn_propagate": "bounds"}
    quick_gdfq = resolve_config("quick", "gdfq", "kd+ce")
    assert (quick_gdfq.ranges.act_range, quick_gdfq.quant.ste, quick_gdfq.options) == ("percentile", "clipped",
                                                                        {"act_percentile": 99.7})
    assert resolve_config("paper", "gdfq", "kd", act_range="bn-prior").options["bn_k"] == 3.0
    assert resolve_config("quick", "gdfq", "akt", bn_propagate="bounds").options["bn_propagate"] == "bounds"
    assert resolve_config("quick", "gdfq", "akt", akt_lambda=5.0).options["akt_lambda"] == 5.0
    quick = resolve_config("quick", "gdfq", "kd", batch_size=32, epochs=None, kd_temperature=4.0)
    assert quick.optim.batch_size == 32 and quick.optim.epochs == resolve_config("quick").optim.epochs
    assert quick.options == {"bn_k": 2.5, "bn_propagate": "bounds", "kd_temperature": 4.0}
    with pytest.raises(UserError, match="--lambda-l does not apply .* --source adadfq"):
        resolve_config("quick", "gdfq", "kd", lambda_l=0.3)  # an AdaDFQ option on a GDFQ run
    with pytest.raises(UserError, match="preset"):
        resolve_config("fast")


def test_options_that_do_not_apply_are_refused_and_not_recorded():
    """An option the run's source, loss or range setter would ignore is refused by name (so that two runs that
    compute the same thing never differ in config.json), and a preset's such value is dropped, not recorded."""
    from zsq.flags import quantize_config

    for argv, needle in ((["--loss", "gap-entropy", "--kd-reduction", "elementwise"], "--kd-reduction"),
                         (["--loss", "akt", "--ce-weight", "2"], r"--ce-weight .* --akt-base kd\+ce"),
                         (["--loss", "akt", "--akt-combine", "sum", "--akt-alpha", "0.3"], "--akt-combine convex"),
                         (["--loss", "synq", "--synq-parts", "lpf,selce", "--cam-type", "gradcampp"], "with cam"),
                         (["--act-range", "ema-minmax", "--bn-k", "3"], "--bn-k .* bn-prior"),
                         (["--act-range", "bn-prior", "--range-lr-scale", "2"], "--act-range learned"),
                         (["--source", "hast", "--synth-data", "x.pt", "--synth-iters", "5"], "--synth-data"),
                         (["--source", "hast", "--act-range", "bn-prior", "--warmup-epochs", "0",
                           "--warmup-batch", "16"], "--warmup-epochs ≥ 1")):
        with pytest.raises(UserError, match=needle):
            quantize_config(argv)
    assert quantize_config(["--loss", "akt", "--akt-base", "kd+ce", "--ce-weight", "2"]).options["ce_weight"] == 2
    kd = resolve_config("quick", "gdfq", "kd+ce")  # the quick preset's bn-k 2.5 does nothing under its percentile
    assert (kd.ranges.act_range, kd.options) == ("percentile", {"act_percentile": 99.7})
    assert resolve_config("paper", "adadfq", "akt", akt_base="gap-entropy").options == {"akt_base": "gap-entropy"}


def test_the_config_is_composed_of_one_dataclass_per_concern_and_config_json_is_their_flat_union(capsys, monkeypatch):
    """Each concern's fields live once, in its own dataclass (the quantizer's is zsq.quant's QuantConfig, the
    probe's zsq.validate's ProbeOptions); config.json is the flat union, whose names are unique, and reads back
    into an equal config, an older run's config.json included."""
    from zsq.quant import QuantConfig
    from zsq.train import TrainConfig, config_dict, current_config, flat_fields
    from zsq.validate import ProbeOptions

    names = [f.name for f in flat_fields()]
    assert len(names) == len(set(names))
    cfg = resolve_config("quick", "hast", "akt", wbits=3, abits=3, epochs=8, probe_images=64, placement="deployable",
                         eval_limit=100, seed=2)
    assert isinstance(cfg.quant, QuantConfig) and isinstance(cfg.probe, ProbeOptions)
    assert (cfg.quant.wbits, cfg.quant.placement, cfg.optim.epochs, cfg.probe.probe_images, cfg.checks.eval_limit,
            cfg.run.seed, cfg.ranges.act_range) == (3, "deployable", 8, 64, 100, 2, "bn-prior")
    flat = config_dict(cfg)
    assert set(flat) == set(names) | {"options"} and "probe_seed" not in flat and "layer_bits" not in flat
    assert TrainConfig.from_flat(flat) == cfg
    old = {k: v for k, v in flat.items() if k not in ("probe_images", "probe_iters", "options")}
    old.update(generator="hast", method="akt", bn_k=2.5, bn_propagate="moments", act_percentile=None,
               options={k: v for k, v in flat["options"].items() if not k.startswith("bn_")})  # as 0.1 wrote it
    del old["source"], old["loss"]
    again = TrainConfig.from_flat(current_config(old))
    assert again.loss == "akt" and again.options == cfg.options and again.probe.probe_images == 512
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        TrainConfig.from_flat({**flat, "bogus": 1})
    monkeypatch.setattr(zsq.errors, "_said", set())
    assert cfg.epochs == 8 and cfg.threads == cfg.run.threads  # 0.1's flat reads, for one release
    assert capsys.readouterr().err.splitlines() == [
        "zsq: TrainConfig.epochs is deprecated and goes in the next release: use TrainConfig.optim.epochs",
        "zsq: TrainConfig.threads is deprecated and goes in the next release: use TrainConfig.run.threads"]


def test_the_former_flag_and_loss_names_run_the_same_config(capsys, monkeypatch):
    from zsq.flags import quantize_config

    monkeypatch.setattr(zsq.errors, "_said", set())
    former = quantize_config(["--generator", "adadfq", "--method", "akt", "--akt-base", "adadfq"])
    assert former == quantize_config(["--source", "adadfq", "--loss", "akt", "--akt-base", "gap-entropy"])
    assert former.options["akt_base"] == "gap-entropy"  # config.json records the name it has now
    assert quantize_config(["--method", "gdfq"]) == quantize_config(["--loss", "kd+ce"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["zsq: --generator is deprecated and goes in the next release: use --source",
                   "zsq: --method is deprecated and goes in the next release: use --loss",
                   "zsq: the loss name 'adadfq' is deprecated and goes in the next release: use 'gap-entropy'",
                   "zsq: the loss name 'gdfq' is deprecated and goes in the next release: use 'kd+ce'"]


def test_bad_quantize_input(tiny_teacher):
    for args, needle in ((["--wbits", "9"], "2..8"), (["--source", "vae"], "vae"), (["--loss", "x"], "'x'"),
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
    args = ["quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--epochs", "3",
            "--iters-per-epoch", "5", "--warmup-epochs", "1", "--batch-size", "8", "--ckpt-every", "3",
            "--deterministic", "--quiet", "--eval-limit", "8", *TINY_PROBE, *SMALL_GEN]
    killed, full = tmp_path / "killed", tmp_path / "full"
    kill_when([*args, "--out", str(killed)], killed / "state.pt")
    assert (killed / "state.pt").exists() and not (killed / "result.json").exists(), "finished before the kill"
    before = torch.load(killed / "state.pt", weights_only=True)
    resumed = run_cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli(*args, "--out", str(full)).returncode == 0
    after = json.loads((killed / "result.json").read_text())  # the times of both sessions of the run
    assert after["wall_s"] > before["wall_s"] > 0 and after["cpu_s"] > before["cpu_s"] > 0
    a = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(full / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(l)["iter"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(15))  # no iteration logged twice or lost
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


def _tiny(teacher, fmnist_dir, tmp_path, name: str, **kw):
    """A 2-epoch in-process run (1 warm-up epoch of 3 iterations, 3 trained) on the tiny teacher (a checkpoint or
    a module)."""
    args = {"generator": "gdfq", "method": "kd", "data_dir": str(fmnist_dir), "epochs": 2, "iters_per_epoch": 3,
            "warmup_epochs": 1, "batch_size": 6, "eval_limit": 8, "out": str(tmp_path / name), "quiet": True,
            **PROBE_KW, **SMALL_GEN_KW, **kw}
    return zsq.quantize(teacher if isinstance(teacher, torch.nn.Module) else str(teacher), **args)


def test_a_users_module_is_placed_deployable_and_the_result_says_what_stays_float(fmnist_dir, tmp_path):
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AvgPool2d(4), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 10))
    r = _tiny(cnn, fmnist_dir, tmp_path, "user", dataset="fashion-mnist")
    config = json.loads((r.run_dir / "config.json").read_text())
    assert config["placement"] == r.summary["placement"] == "deployable" and r.summary["float_tensors"] == []
    report = zsq.export(r.qmodel, tmp_path / "user.onnx")  # the public API: no internal names needed
    assert report["ort_top1_agreement"] == 1.0 and report["float_tensors"] == [] and (tmp_path / "user.onnx").is_file()
    h = zsq.health(cnn, r.qmodel, ProbeOptions(**PROBE_KW))
    assert 0 <= h.score <= 100 and h.probe_images == PROBE_KW["probe_images"]
    r = _tiny(cnn, fmnist_dir, tmp_path, "lineage", dataset="fashion-mnist", placement="lineage")
    assert r.summary["float_tensors"] == ["input", "3", "7"]  # the image and both average pools


def test_no_warmup_with_a_data_free_range_setter(tiny_teacher, fmnist_dir, tmp_path):
    r = _tiny(tiny_teacher, fmnist_dir, tmp_path, "bn", warmup_epochs=0, act_range="bn-prior")
    quants = [m for m in r.qmodel.modules() if isinstance(m, ActQuantizer)]
    assert r.summary["iterations"] == 6 and all(q.hi > q.lo and q.steps == 0 for q in quants)  # never observed
    with pytest.raises(UserError, match="--warmup-epochs 0 .* ema-minmax needs them"):
        _tiny(tiny_teacher, fmnist_dir, tmp_path, "ema", warmup_epochs=0, act_range="ema-minmax")


def test_start_epoch_runs_once_per_epoch(tiny_teacher, fmnist_dir, tmp_path, monkeypatch):
    import zsq.train

    epochs = []
    real = zsq.train.Job.start_epoch
    monkeypatch.setattr(zsq.train.Job, "start_epoch", lambda job, epoch: epochs.append(epoch) or real(job, epoch))
    _tiny(tiny_teacher, fmnist_dir, tmp_path, "r")
    assert epochs == [0, 1]


def test_a_nonfinite_generator_step_is_skipped_and_never_saved(tiny_teacher, fmnist_dir, tmp_path):
    out = tmp_path / "g"
    with pytest.raises(UserError, match=r"the generator loss or gradient was NaN/Inf .* lower --lr-g"):
        _tiny(tiny_teacher, fmnist_dir, tmp_path, "g", lr_g=1e30, max_bad_steps=2, ckpt_every=1)
    state = torch.load(out / "state.pt", weights_only=True)
    saved = [*state["source"].values(), *state["qmodel"].values()]
    assert all(torch.isfinite(t).all() for t in saved if t.is_floating_point())  # generator and EMA ranges alike


def test_resume_never_starts_over_silently(tiny_teacher, fmnist_dir, tmp_path, monkeypatch, capsys):
    import zsq.train

    partial = tmp_path / "partial"  # killed before its first checkpoint: a config and some metrics
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    for kw in ({}, {"resume": True}):
        with pytest.raises(UserError, match="stopped before its first checkpoint.* --restart"):
            _tiny(tiny_teacher, fmnist_dir, tmp_path, "partial", **kw)
    assert _tiny(tiny_teacher, fmnist_dir, tmp_path, "partial", restart=True).summary["iterations"] == 6
    _tiny(tiny_teacher, fmnist_dir, tmp_path, "new", resume=True)
    assert "no checkpoint in" in capsys.readouterr().out
    calls = []  # a run that dies in its second epoch has the first epoch's end saved, whatever --ckpt-every
    real = zsq.train.job._iteration
    monkeypatch.setattr(zsq.train.job, "_iteration",
                        lambda job, warm: real(job, warm) if len(calls) < 4 and not calls.append(1) else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _tiny(tiny_teacher, fmnist_dir, tmp_path, "died", ckpt_every=1000)
    assert torch.load(tmp_path / "died" / "state.pt", weights_only=True)["step"] == 3


def test_threads_header_and_load_warning(tiny_teacher, fmnist_dir, tmp_path, monkeypatch, capsys):
    from zsq.train import available_cores

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert available_cores() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert available_cores() == len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    r = _tiny(tiny_teacher, fmnist_dir, tmp_path, "t", threads=1)
    assert json.loads((r.run_dir / "config.json").read_text())["threads"] == 1 and torch.get_num_threads() == before
    out, err = capsys.readouterr()
    assert f"zsq quantize: resnet20 W4A4 (lineage), source gdfq, loss kd, preset quick: 6 iterations (3 warm-up) " \
           f"on cpu, 1 thread(s) → {r.run_dir}" in out
    assert "warning: this machine's load (99.0) already exceeds" in err


def test_the_users_teacher_module_is_left_as_it_was(tiny_teacher, fmnist_dir, tmp_path):
    teacher = zsq.load_model(str(tiny_teacher)).train()
    for kw in ({"method": "akt", "akt_layers": "nope"}, {}):  # a build that fails after the source hooked in
        try:
            _tiny(teacher, fmnist_dir, tmp_path, f"u{len(kw)}", dataset="fashion-mnist", **kw)
        except UserError:
            pass
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_abbreviated_flags_are_refused_and_errors_name_the_command(tmp_path):
    from zsq.cli import build_parser
    from zsq.flags import quantize_config
    from zsq.data import load_dataset

    with pytest.raises(UserError, match=r"^quantize: unrecognized arguments: --wbit 4$"):
        quantize_config(["--wbit", "4"])  # once a prefix of --wbits; a later flag could change its meaning
    with pytest.raises(UserError, match=r"^quantize: unrecognized arguments: --ebochs 2$"):
        build_parser().parse_args(["quantize", "--ebochs", "2"])
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", "test", tmp_path)
    assert "--data-dir must hold Fashion-MNIST's IDX files" in str(e.value) and "install" not in str(e.value)

"""`zsq ptq` end to end on a tiny budget: the run folder every other command reads, resume after a kill, bad input
in one line, and PTQ rows in a bench grid and a report."""
from __future__ import annotations

import json

import pytest
import torch

from zsq.bench import load_grid
from zsq.errors import UserError
from zsq.posttrain import resolve_ptq_config
from zsq.synth.pixels import read_set

from conftest import TINY_PROBE, kill_when, run_cli


def _ptq(teacher, data_dir, out, *extra):
    return run_cli("ptq", "--teacher", str(teacher), "--data-dir", str(data_dir), "--images", "8",
                   "--iters-per-unit", "2", "--eval-limit", "40", *TINY_PROBE, "--quiet", "--out", str(out), *extra)


def test_ptq_cli_writes_a_run_that_eval_export_health_and_report_read(tiny_teacher, fmnist_dir, tmp_path):
    run = tmp_path / "r"
    proc = _ptq(tiny_teacher, fmnist_dir, run, "--source", "genie", "--synth-iters", "2", "--synth-batch", "8",
                "--latent-dim", "8")
    assert proc.returncode == 0, proc.stderr
    assert "W4A4 ptq on genie" in proc.stdout
    result = json.loads((run / "result.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert result["method"] == config["method"] == "ptq" and result["source"] == config["source"] == "genie"
    assert "loss" not in config and "loss" not in result
    assert result["uses_data"] is False and config["recon"]["iters"] == 2 and config["images"] == 8
    # the set's build is timed apart from the reconstruction, and kept in the cached set for later runs
    assert result["synthetic_set_build_s"] == read_set(result["synthetic_set"])["build_s"] > 0
    assert 0 < result["cpu_s"] and 0 < result["wall_s"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == result["units"] and len(rows) == 11
    assert all(r["mse_before"] >= 0 and r["mse_after"] >= 0 for r in rows)
    student = torch.load(run / "student.pt", weights_only=True)
    assert student["quant"]["weight_range"] == "fixed" and student["quant"]["first_last"] == "8bit"
    ev = run_cli("eval", "--model", str(run / "student.pt"), "--data-dir", str(fmnist_dir), "--eval-limit", "40",
                 "--json", str(tmp_path / "e.json"))
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == result["q_top1"]
    health = run_cli("health", str(run), *TINY_PROBE, "--quiet")
    assert health.returncode == 0 and "health" in health.stdout, health.stderr
    export = run_cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert export.returncode == 0 and "top-1 agreement" in export.stdout, export.stderr
    rtn = _ptq(tiny_teacher, fmnist_dir, tmp_path / "rtn", "--source", "real", "--iters-per-unit", "0")
    assert rtn.returncode == 0, rtn.stderr
    assert json.loads((tmp_path / "rtn" / "result.json").read_text())["uses_data"] is True
    report = run_cli("report", str(run), str(tmp_path / "rtn"), "--out", str(tmp_path / "rep.md"))
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "rep.md").read_text()
    assert "| genie | ptq |" in table and "| real | ptq |" in table and "iters_per_unit=0" in table


def test_ptq_resume_after_kill_is_identical(tiny_teacher, fmnist_dir, tmp_path):
    args = ["ptq", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--source", "real", "--images",
            "8", "--iters-per-unit", "6", "--eval-limit", "8", "--deterministic", "--quiet", *TINY_PROBE]
    killed, full = tmp_path / "killed", tmp_path / "full"
    kill_when([*args, "--out", str(killed)], killed / "state.pt")
    assert (killed / "state.pt").exists() and not (killed / "result.json").exists(), "finished before the kill"
    again = run_cli(*args, "--out", str(killed))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli(*args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli(*args, "--out", str(full)).returncode == 0
    a = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(full / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    units = [json.loads(line)["unit"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert units == list(range(11))  # no unit logged twice or lost
    assert not (killed / "state.pt").exists()


def test_ptq_bad_input_is_one_line(tiny_teacher, fmnist_dir, tmp_path):
    cases = [
        (["--wbits", "9"], "bits must be in 2..8"),
        (["--source", "genie", "--synth-lr", "0.1"], "--synth-lr does not apply to --source genie"),
        (["--source", "real", "--images", "5000"], "training split has 96"),
        (["--source", "real", "--units", "layer9.0"], "unit 'layer9.0' is not a module"),
    ]
    for i, (extra, needle) in enumerate(cases):
        proc = _ptq(tiny_teacher, fmnist_dir, tmp_path / f"b{i}", *extra)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    for values, needle in (({"latent_lr": 0.1}, "--latent-lr does not apply to --source real"),
                           ({"synth_images": 8}, "--images"), ({"warmup_batch": 8}, "--warmup-batch"),
                           ({"qdrop": 1.0}, "QDrop probability")):
        with pytest.raises(UserError, match=needle):
            resolve_ptq_config("quick", "real" if "latent_lr" in values else "genie", **values)


def test_a_grid_row_with_method_ptq_runs_zsq_ptq(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('teacher = "resnet20_fmnist"\nbits = [4]\noptions = {eval-limit = 100, epochs = 2}\n'
                    '[[rows]]\nsource = ["genie", "real"]\nmethod = "ptq"\noptions = {iters-per-unit = 0}\n'
                    '[[rows]]\nsource = "hast"\nloss = "kd"\n')
    specs = load_grid(grid).runs()
    ptq = [s for s in specs if s.command == "ptq"]
    assert [s.command for s in specs] == ["ptq", "ptq", "quantize"]
    argv = ptq[0].argv(tmp_path / "r")
    assert argv[argv.index("--source") + 1] == "genie" and "--loss" not in argv and "--method" not in argv
    assert "--eval-limit" in argv and "--epochs" not in argv  # a QAT-only option does not reach a PTQ run
    assert "--epochs" in specs[2].argv(tmp_path / "q")


def test_a_ptq_run_made_before_a_new_reconstruction_field_still_matches_and_groups(tmp_path):
    from zsq.bench.report import group_runs
    from zsq.bench.runner import _check_same
    from zsq.posttrain import config_dict

    new = config_dict(resolve_ptq_config("quick", "genie", out=str(tmp_path / "a")))
    old = json.loads(json.dumps(new))
    del old["recon"]["loss"]  # written before the field existed: it ran with the default
    _check_same("r", tmp_path, old, new)
    with pytest.raises(UserError, match=r"another config \(recon.lam: 1.0, the grid asks for 0.01\)"):
        _check_same("r", tmp_path, old, {**new, "recon": {**new["recon"], "lam": 0.01}})
    result = {"fp_top1": 94.0, "q_top1": 93.0, "wall_s": 60.0}
    old["placement"] = "lineage"  # resolved when it ran: the default for zsq's own architectures
    rtn = config_dict(resolve_ptq_config("quick", "genie", iters_per_unit=0, out=str(tmp_path / "c")))
    runs = [{"dir": "a", "config": old, "result": result},
            {"dir": "b", "config": {**new, "seed": 1}, "result": result},
            {"dir": "c", "config": rtn, "result": result}]
    groups = group_runs(runs)
    assert [len(g["runs"]) for g in groups] == [2, 1]
    assert [g["changes"] for g in groups] == [{}, {"iters_per_unit": 0}]  # labelled by the flags' names


def test_resume_compares_the_configs_field_by_field(tmp_path):
    """A run killed before a field was added (it ran with the field's default) resumes; another value does not."""
    from zsq.rundir import open_run

    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"seed": 0, "recon": {"iters": 2}, "device": "cpu"}))
    torch.save({"units_done": 3}, out / "state.pt")
    now = {"seed": 0, "recon": {"iters": 2, "loss": "mse"}, "device": "cuda"}  # a new field; another machine
    assert open_run(out, now, resume=True, restart=False)["units_done"] == 3
    with pytest.raises(UserError, match=r"another configuration \(recon.iters: 2, now 3\)"):
        open_run(out, {**now, "recon": {"iters": 3, "loss": "mse"}}, resume=True, restart=False)

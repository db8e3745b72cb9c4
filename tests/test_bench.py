"""zsq bench: grid expansion, the results store, resume after a kill, the report's statistics, the paper grids."""
from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import run_cli, write_cifar

import zsq.errors
from zsq.bench import load_grid, published
from zsq.bench.store import Store
from zsq.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY_SET = ["--set", "epochs=2", "--set", "iters-per-epoch=2", "--set", "warmup-epochs=1", "--set", "batch-size=8",
            "--set", "eval-limit=20", "--set", "probe-images=8", "--set", "probe-iters=2", "--set", "gen-width=32",
            "--quiet"]
TINY_SYNTH = ["--set", "synth-images=16", "--set", "synth-iters=2"]  # only for grids with hast runs
TINY_PTQ = ["--set", "images=8", "--set", "iters-per-unit=2"]  # only for grids with ptq runs


def write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GRID = """
teacher = "resnet20_fmnist"
preset = "quick"
bits = [3, [4, 8]]
seeds = [0, 1]
options = { eval-limit = 20, synth-images = 16 }

[[rows]]
source = "gdfq"
loss = "akt"
options = { akt-base = "kd+ce", akt-lambda = "1e4" }

[[rows]]
source = "adadfq"
loss = "akt"
options = { akt-base = "gap-entropy", akt-lambda = "1e4" }

[[rows]]
source = "hast"
loss = "hast"
bits = [3]
"""
# The same grid in the keys and loss names before the plain names (one release of grace).
FORMER_GRID = GRID[:GRID.index("[[rows]]")] + """
[[rows]]
generator = ["gdfq", "adadfq"]
method = "akt"
options = { akt-base = "{generator}", akt-lambda = "1e4" }

[[rows]]
generator = "hast"
method = "hast"
bits = [3]
"""


def test_grid_expansion(tmp_path):
    runs = load_grid(write_grid(tmp_path / "g.toml", GRID)).runs()
    assert len(runs) == 2 * 2 * 2 + 2  # bits × generators × seeds, and hast at W3A3 only
    names = {r.name for r in runs}
    assert {"gdfq-akt-akt-base-kd-ce---akt-lambda-1e4-w3-s0", "adadfq-akt-akt-base-gap-entropy---akt-lambda-1e4-w4a8-s1",
            "hast-hast-w3-s0", "hast-hast-w3-s1"} <= names
    by_name = {r.name: r.argv(Path("o") / r.name) for r in runs}
    ada = by_name["adadfq-akt-akt-base-gap-entropy---akt-lambda-1e4-w4a8-s1"]
    assert ada[:8] == ["--wbits", "4", "--abits", "8", "--source", "adadfq", "--loss", "akt"]
    assert ada[8:10] == ["--akt-base", "gap-entropy"] and ada[-4:-1] == ["--seed", "1", "--out"]
    assert "--synth-images" not in ada and ada[ada.index("--eval-limit") + 1] == "20"  # only where it applies
    hast = by_name["hast-hast-w3-s0"]
    assert hast[hast.index("--synth-images") + 1] == "16" and hast[hast.index("--teacher") + 1] == "resnet20_fmnist"
    over = load_grid(tmp_path / "g.toml", teacher="t.pt", bits=[3], seeds=[1], overrides={"epochs": 2}).runs()
    assert len(over) == 3 and all(r.seed == 1 and r.wbits == 3 for r in over)
    assert all(r.common[1] == "t.pt" and "--epochs" in r.common for r in over)
    only = load_grid(tmp_path / "g.toml", only="*akt*-w4a8-s*").runs()
    assert sorted(r.name for r in only) == sorted(n for n in names if "akt" in n and "-w4a8-" in n) and len(only) == 4
    with pytest.raises(UserError, match=r"--only hast-w3-\*: no run of grid .* is named so \(they are named like "
                                        r"gdfq-akt"):
        load_grid(tmp_path / "g.toml", only="hast-w3-*").runs()


def test_a_grid_in_the_former_keys_and_names_runs_the_same_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(zsq.errors, "_said", set())
    former = {r.name: r for r in load_grid(write_grid(tmp_path / "old.toml", FORMER_GRID)).runs()}
    assert former == {r.name: r for r in load_grid(write_grid(tmp_path / "g.toml", GRID)).runs()}  # "{generator}" too
    err = capsys.readouterr().err
    assert "the grid key 'generator' is deprecated" in err and "the grid key 'method' for a loss" in err


def test_a_rows_option_wins_over_the_grids(tmp_path):
    text = GRID.replace("options = { eval-limit = 20, synth-images = 16 }",
                        'options = { eval-limit = 20, synth-images = 16, act-range = "ema-minmax" }')
    text += 'options = { act-range = "learned" }\n'  # on the hast row
    runs = {r.name: r.argv(Path("o")) for r in load_grid(write_grid(tmp_path / "g.toml", text)).runs()}
    hast = runs["hast-hast-act-range-learned-w3-s0"]
    assert hast.count("--act-range") == 1 and hast[hast.index("--act-range") + 1] == "learned"
    akt = runs["gdfq-akt-akt-base-kd-ce---akt-lambda-1e4-w3-s0"]
    assert akt[akt.index("--act-range") + 1] == "ema-minmax"


@pytest.mark.parametrize("text, message", [
    ("foo = 1\n" + GRID, "unknown key"),
    (GRID.replace('loss = "hast"\nbits = [3]', 'loss = "hast"\nbits = [3]\ncolour = 1'), "needs source and loss"),
    (GRID.replace('loss = "hast"', 'method = "ptq"\nloss = "hast"'), "needs source and loss"),
    (GRID.replace('source = "hast"', 'source = "gdfq"').replace('loss = "hast"', 'loss = "kd+ce"'),
     "synth-images' applies to none"),
    (GRID.replace("eval-limit = 20", "eval-limt = 20"), "eval-limt' applies to none"),
    (GRID.replace('source = "hast"\nloss = "hast"', 'source = "gdfq"\nloss = "akt"\noptions = '
                  '{ akt-base = "kd+ce", akt-lambda = "1e4" }'), "same run twice"),
    (GRID.replace('teacher = "resnet20_fmnist"\n', ""), "--teacher"),
    (GRID.replace('preset = "quick"', 'preset = "quick"\ndataset = "cifar10"'), "--data-dir"),
    (GRID.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
    ("bits = [", "not valid TOML"),
], ids=["top-key", "row-key", "ptq-and-loss", "option-nowhere", "option-typo", "duplicate", "no-teacher", "no-data-dir", "no-seeds",
        "toml"])
def test_grid_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_grid(write_grid(tmp_path / "g.toml", text)).runs()


def test_bench_bad_input_exit_2(tmp_path):
    proc = run_cli("bench", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    grid = write_grid(tmp_path / "g.toml", GRID.replace('loss = "akt"', 'loss = "nope"'))
    proc = run_cli("bench", str(grid), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "nope" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_cli("report", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.md"))
    assert proc.returncode == 2 and "no results store" in proc.stderr


def _stored(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    with sqlite3.connect(db) as con:
        return {r[0]: r[1:] for r in con.execute("SELECT name, finished_at, q_top1, wbits, loss, seed FROM runs")}


def test_bench_resume_after_kill_and_report_as_a_file_and_a_section(tiny_teacher, fmnist_dir, tmp_path):
    grid = write_grid(tmp_path / "g.toml", """
preset = "quick"
bits = [4]
seeds = [0, 1, 2]
[[rows]]
source = "gdfq"
loss = "kd"
""")
    out, db = tmp_path / "bench", tmp_path / "bench" / "results.db"
    cmd = [sys.executable, "-m", "zsq", "bench", str(grid), "--out", str(out), "--teacher", str(tiny_teacher),
           "--data-dir", str(fmnist_dir), "--jobs", "2", *TINY_SET]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(_stored(db)) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the bench and the runs it started, mid-grid
    first.wait()
    before = _stored(db)
    assert 2 <= len(before) < 3
    mtimes = {n: (out / "runs" / n / "result.json").stat().st_mtime_ns for n in before}

    proc = run_cli(*cmd[3:])  # the bench itself in this process: only the one killed needs a process of its own
    assert proc.returncode == 0, proc.stderr
    after = _stored(db)
    assert len(after) == 3
    assert all(after[n] == before[n] for n in before)  # finished rows were not rerun
    assert all((out / "runs" / n / "result.json").stat().st_mtime_ns == mtimes[n] for n in before)
    assert re.search(rf"3 runs in g: {len(before)} finished before, {3 - len(before)} run now, 0 failed",
                     proc.stdout), proc.stdout
    again = run_cli(*cmd[3:])
    assert "3 finished before, 0 run now" in again.stdout

    report = run_cli("report", "--store", str(out), "--out", str(tmp_path / "r.md"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r.md").read_text()
    assert "3 of the 3 planned runs finished" in text
    accs = [after[n][1] for n in sorted(after, key=lambda n: after[n][4])]
    row = next(line for line in text.splitlines() if line.startswith("| W4A4 | gdfq | kd |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[6] == "0,1,2"
    assert cells[7] == f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"
    assert cells[8] == " / ".join(f"{a:.2f}" for a in accs)

    readme = tmp_path / "README.md"  # the same table, as a section of a page (the store's folder names it)
    readme.write_text("intro\n<!-- zsq report: bench -->\nold numbers\n<!-- /zsq report: bench -->\nend\n")
    proc = run_cli("report", "--store", str(out), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("-->\nend\n")
    assert "3 of the 3 planned runs finished" in text and row in text
    readme.write_text("no markers\n")
    proc = run_cli("report", "--store", str(out), "--readme", str(readme))
    assert proc.returncode == 2 and "<!-- zsq report: bench -->" in proc.stderr


FORMER_SCHEMA = """
CREATE TABLE runs (name TEXT PRIMARY KEY, grid TEXT, dataset TEXT, model TEXT, teacher TEXT, wbits INTEGER,
    abits INTEGER, generator TEXT, method TEXT, preset TEXT, seed INTEGER, flags TEXT, q_top1 REAL, q_top5 REAL,
    fp_top1 REAL, wall_s REAL, code TEXT, dir TEXT, finished_at TEXT, config TEXT, result TEXT);
CREATE TABLE plan (name TEXT PRIMARY KEY, grid TEXT, argv TEXT);
"""


def test_a_store_from_before_the_plain_names_reads_and_resumes_under_them(tmp_path):
    """Columns generator/method, losses gdfq/adadfq, run names after them: the store is renamed when opened, so a
    grid in today's names finds its finished runs and the report shows today's names (a mapping, not a rerun)."""
    import json

    db = sqlite3.connect(tmp_path / "results.db")
    db.executescript(FORMER_SCHEMA)
    former = [("gdfq-gdfq-w3-s0", "gdfq", "gdfq", []),
              ("adadfq-akt-akt-base-adadfq---akt-lambda-1e4-w3-s0", "adadfq", "akt",
               ["--akt-base", "adadfq", "--akt-lambda", "1e4"])]
    for seed, (name, generator, method, flags) in enumerate(former):
        config = {"teacher": "resnet20_fmnist", "generator": generator, "method": method, "preset": "quick",
                  "wbits": 3, "abits": 3, "seed": 0,
                  "options": {"akt_base": "adadfq", "akt_lambda": 1e4} if flags else {}}
        result = {"q_top1": 90.0 + seed, "fp_top1": 94.73, "wall_s": 60.0, "generator": generator, "method": method}
        db.execute("INSERT INTO runs VALUES (?, 'g', 'fashion-mnist', 'resnet20', 'resnet20_fmnist', 3, 3, ?, ?, "
                   "'quick', 0, ?, ?, NULL, 94.73, 60.0, 'x', ?, 'now', ?, ?)",
                   (name, generator, method, json.dumps(flags), 90.0 + seed, f"runs/{name}", json.dumps(config),
                    json.dumps(result)))
        db.execute("INSERT INTO plan VALUES (?, 'g', ?)", (name, json.dumps(
            ["--wbits", "3", "--abits", "3", "--generator", generator, "--method", method, *flags, "--seed", "0"])))
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert list(store.planned()) == ["adadfq-akt-akt-base-gap-entropy---akt-lambda-1e4-w3-s0", "gdfq-kd+ce-w3-s0"]
    rows = {r["name"]: r for r in store.rows()}
    assert set(rows) == set(store.planned())
    assert rows["gdfq-kd+ce-w3-s0"]["loss"] == "kd+ce" and rows["gdfq-kd+ce-w3-s0"]["source"] == "gdfq"
    assert rows["adadfq-akt-akt-base-gap-entropy---akt-lambda-1e4-w3-s0"]["flags"][:2] == ["--akt-base", "gap-entropy"]
    plan = store.planned()
    assert plan["gdfq-kd+ce-w3-s0"][4:8] == ["--source", "gdfq", "--loss", "kd+ce"]
    store.close()
    assert Store(tmp_path).planned() == plan  # opened again: nothing left to rename
    proc = run_cli("report", "--store", str(tmp_path), "--out", str(tmp_path / "r.md"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # stored runs: no deprecation line
    text = (tmp_path / "r.md").read_text()
    assert "2 of the 2 planned runs finished" in text
    gdfq = next(line for line in text.splitlines() if line.startswith("| W3A3 | gdfq | kd+ce | "))
    akt = next(line for line in text.splitlines() if line.startswith("| W3A3 | adadfq | akt | "))
    assert "| 90.00 |" in gdfq and "akt_base=gap-entropy" in akt and "| 91.00 |" in akt


def _fake_cifar_teacher(tmp_path: Path, dataset: str, classes: int) -> Path:
    write_cifar(tmp_path / "data", classes)
    teacher = tmp_path / "teacher.pt"
    proc = run_cli("teacher", "train", "--model", "resnet20", "--dataset", dataset, "--data-dir",
                   str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16", "--out", str(teacher))
    assert proc.returncode == 0, proc.stderr
    return teacher


def _run_in_process(grid: Path, out: Path, common: list[str], n: int) -> None:
    """The grid's `n` runs, each its printed command run in this process (bench's own processes, ~8 s of imports
    each here, are tested by the resume test above), then stored by `zsq bench --collect`, which checks each run's
    config against the grid's."""
    plan = run_cli("bench", str(grid), "--out", str(out), "--dry-run", *common)
    assert plan.returncode == 0, plan.stderr
    commands = [shlex.split(line)[1:] for line in plan.stdout.splitlines() if line.startswith("zsq ")]
    assert len(commands) == n, plan.stdout
    for command in commands:
        proc = run_cli(*command)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli("bench", str(grid), "--out", str(out), "--collect", *common)
    assert proc.returncode == 0 and f"{n} runs in {grid.stem}: {n} finished before, 0 run now, 0 failed" in \
        proc.stdout, proc.stdout + proc.stderr


# The CIFAR-10 grid's rows run end to end here: a generator with its published number, an offline set with SynQ's,
# and the post-training row. Every source × loss pair runs in test_learning and test_architectures.
CIFAR_RUN = 'source = "gdfq"\nloss = "kd+ce"', 'source = "hast"\nloss = "synq"\nbits = [3, 4]', \
    'source = "genie"\nmethod = "ptq"'


def test_paper_grid_on_fake_cifar(tmp_path):
    """The shipped CIFAR-10 paper grid on CIFAR files in the real format: every run is resolved against a CIFAR-10
    teacher (as `zsq bench` checks a grid before it starts any); three of its rows run end to end (tiny budget,
    W3A3, seed 0) and the report quotes the paper beside ours."""
    teacher = _fake_cifar_teacher(tmp_path, "cifar10", 10)
    grid = ROOT / "benchmarks" / "grids" / "paper-cifar10.toml"
    common = ["--teacher", str(teacher), "--data-dir", str(tmp_path / "data"), "--bits", "3", "--seeds", "0",
              *TINY_SET, *TINY_SYNTH, *TINY_PTQ]
    proc = run_cli("bench", str(grid), "--out", str(tmp_path / "all"), "--dry-run", *common)
    n = len(load_grid(grid, teacher=str(teacher), data_dir="d", bits=[3], seeds=[0]).runs())
    assert proc.returncode == 0 and proc.stdout.count("zsq ") == n >= 10, proc.stderr
    rows = [tomllib.loads(row)["rows"][0] for row in ("[[rows]]\n" + r for r in CIFAR_RUN)]
    assert all(row in tomllib.loads(grid.read_text())["rows"] for row in rows)  # the shipped grid's own rows
    head = grid.read_text().split("[[rows]]")[0]
    some = write_grid(tmp_path / "paper-cifar10.toml", head + "".join(f"\n[[rows]]\n{r}\n" for r in CIFAR_RUN))
    _run_in_process(some, tmp_path / "bench", common, 3)
    proc = run_cli("report", "--store", str(tmp_path / "bench"), "--out", str(tmp_path / "r.md"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r.md").read_text()
    gdfq = next(line for line in text.splitlines() if line.startswith("| W3A3 | gdfq | kd+ce |"))
    assert gdfq.rstrip(" |").endswith("72.23 (AKT Tab. 2)") and "| paper |" in gdfq
    synq = next(line for line in text.splitlines() if line.startswith("| W3A3 | hast | synq |"))
    assert synq.rstrip(" |").endswith("88.11 (SynQ)"), synq
    assert "| W3A3 | genie | ptq |" in text  # the post-training row, with no published number beside it


def test_paper_grid_on_fake_cifar100(tmp_path):
    """The CIFAR-100 grid holds the CIFAR-10 grid's rows but Table 4's (each of those runs end to end above): here
    every run of it is resolved against a 100-class teacher (as `zsq bench` checks a grid before it starts any),
    one runs end to end and the report quotes the paper beside it."""
    rows = {name: tomllib.loads((ROOT / "benchmarks" / "grids" / f"paper-{name}.toml").read_text())["rows"]
            for name in ("cifar10", "cifar100")}
    assert [r for r in rows["cifar10"] if r.get("loss") != ["akt-spatial", "akt-channel"]] == rows["cifar100"]
    teacher = _fake_cifar_teacher(tmp_path, "cifar100", 100)
    grid = ROOT / "benchmarks" / "grids" / "paper-cifar100.toml"
    common = ["--teacher", str(teacher), "--data-dir", str(tmp_path / "data"), *TINY_SET, *TINY_SYNTH, *TINY_PTQ]
    proc = run_cli("bench", str(grid), "--out", str(tmp_path / "all"), "--dry-run", *common)
    n = len(load_grid(grid, teacher=str(teacher), data_dir="d").runs())
    assert proc.returncode == 0 and proc.stdout.count("zsq ") == n, proc.stderr
    one = write_grid(tmp_path / "one.toml", 'dataset = "cifar100"\npreset = "paper"\nbits = [3]\n'
                                             '[[rows]]\nsource = "gdfq"\nloss = "kd+ce"\n')
    _run_in_process(one, tmp_path / "bench", [*common[:4], *TINY_SET], 1)
    proc = run_cli("report", "--store", str(tmp_path / "bench"), "--out", str(tmp_path / "r.md"))
    assert proc.returncode == 0, proc.stderr
    gdfq = next(line for line in (tmp_path / "r.md").read_text().splitlines()
                if line.startswith("| W3A3 | gdfq | kd+ce |"))
    assert gdfq.rstrip(" |").endswith("47.59 (AKT Tab. 2)") and "| paper |" in gdfq
    assert published("cifar100", "resnet20", 3, 3, "hast", "synq").top1 == 57.28


@pytest.mark.parametrize("grid", sorted((ROOT / "benchmarks" / "grids").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_grid_expands_into_runs(grid):
    """A renamed flag or plug-in breaks a grid file only when it is run; expanding each one catches it now (the
    CIFAR grids name no teacher and need a data folder: expansion reads neither)."""
    runs = load_grid(grid, teacher=None if "teacher" in tomllib.loads(grid.read_text()) else "t.pt",
                     data_dir="cifar").runs()
    assert runs and len({r.name for r in runs}) == len(runs)


def test_a_row_restricts_the_grids_seeds(tmp_path):
    runs = load_grid(ROOT / "benchmarks" / "grids" / "fmnist-defaults.toml").runs()
    seeds = {}
    for r in runs:
        seeds.setdefault((r.wbits, r.abits), set()).add(r.seed)
    assert seeds.pop((3, 3)) == {0, 1, 2, 3, 4} and all(s == {0, 1, 2} for s in seeds.values())
    assert set(seeds) == {(2, 2), (4, 4), (5, 5), (4, 8)} and len(runs) == 119
    assert {r.seed for r in load_grid(ROOT / "benchmarks" / "grids" / "fmnist-defaults.toml", seeds=[1, 4]).runs()
            if r.wbits != 3} == {1}  # --seeds restricts both
    grid = tmp_path / "g.toml"
    grid.write_text('seeds = [0, 1]\n[[rows]]\nsource = "gdfq"\nloss = "kd"\nseeds = [2]\n')
    with pytest.raises(UserError, match=r"row 1: seeds \[2\] are not among the grid's seeds"):
        load_grid(grid, teacher="t.pt")


def test_a_store_replaced_under_a_bench_says_how_to_store_the_finished_run(tmp_path):
    """A results.db swapped for another file while a bench held it open (a `git checkout` of the store did it):
    SQLite refuses the write; the bench stops with one line naming the fix, never a traceback."""
    store = Store(tmp_path / "s")
    Store(tmp_path / "other").close()
    os.replace(tmp_path / "other" / "results.db", store.path)
    config = {"teacher": "resnet20_fmnist", "source": "gdfq", "loss": "kd", "preset": "quick", "wbits": 4,
              "abits": 4, "seed": 0}
    with pytest.raises(UserError, match=r"cannot store run r .* is complete: run the same zsq bench command with "
                                         r"--collect"):
        store.add("r", "g", [], config, {"q_top1": 90.0, "fp_top1": 94.0, "wall_s": 1.0}, tmp_path / "r",
                  "fashion-mnist", "resnet20")
    store.close()


def test_the_headline_gives_each_command_a_row_and_each_bit_width_a_column(tmp_path):
    """README's headline: a row per command of the grid (as zsq bench ran it, less seed, out and bits), a column per
    bit width, each cell mean ± std (worst seed, seeds) and the runs the health check flagged, each column's best in
    bold; the flags every command shares are said once above it. `zsq report --readme` rewrites every section of
    the store that the page holds."""
    store = Store(tmp_path / "h")
    runs = [  # name, source, loss, bits, seed, row flags, top-1, flagged, wall (s)
        ("gdfq-kd+ce-w3-s0", "gdfq", "kd+ce", 3, 0, [], 90.0, False, 600.0),
        ("gdfq-kd+ce-w3-s1", "gdfq", "kd+ce", 3, 1, [], 88.0, True, 1200.0),
        ("gdfq-kd+ce-w3-s2", "gdfq", "kd+ce", 3, 2, [], 89.0, False, 720.0),
        ("hast-hast-placement-deployable-w3-s0", "hast", "hast", 3, 0, ["--placement", "deployable"], 91.0, False,
         300.0),
        ("genie-ptq-w4-s0", "genie", "ptq", 4, 0, [], 93.5, False, 240.0),
        ("gdfq-kd+ce-w4-s0", "gdfq", "kd+ce", 4, 0, [], 92.0, False, 600.0),
    ]
    plan = []
    for name, source, loss, bits, seed, flags, top1, flagged, wall in runs:
        chosen = ["--source", source] + ([] if loss == "ptq" else ["--loss", loss])
        argv = ["--wbits", str(bits), "--abits", str(bits), *chosen, *flags, "--teacher", "resnet20_fmnist",
                "--preset", "quick", "--seed", str(seed), "--out", f"runs/{name}"]
        plan.append((name, argv))
        config = {"teacher": "resnet20_fmnist", "source": source, "preset": "quick", "wbits": bits, "abits": bits,
                  "seed": seed, "threads": 1, **({"method": "ptq"} if loss == "ptq" else {"loss": loss}),
                  **({"placement": "deployable"} if flags else {})}
        result = {"q_top1": top1, "fp_top1": 94.73, "wall_s": wall, "device": "cpu",
                  "health": {"score": 40.0 if flagged else 80.0, "flagged": flagged}}
        if loss != "ptq" and name != "gdfq-kd+ce-w3-s2":  # the run paused for 10 minutes counted them in its wall
            # time, not in its CPU time; seed 2 is from before zsq counted CPU time
            result["cpu_s"] = wall - 630.0 if wall == 1200.0 else wall - 60.0
        if source == "hast":
            result["synthetic_set_build_s"] = 240.0
        store.add(name, "g", flags, config, result, tmp_path / "runs" / name, "fashion-mnist", "resnet20")
    store.plan("g", plan + [("gdfq-kd+ce-w4-s1", plan[-1][1])])
    store.close()
    page = tmp_path / "README.md"
    page.write_text("<!-- zsq headline: h -->\n<!-- /zsq headline: h -->\n"
                    "<!-- zsq report: h -->\n<!-- /zsq report: h -->\n")
    proc = run_cli("report", "--store", str(tmp_path / "h"), "--readme", str(page))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert text.split("\n")[1:8] == [
        "6 of the 7 planned runs finished. Each cell: final top-1 over seeds, mean ± std (worst seed, seeds); ⚑k: k "
        "runs flagged by `zsq health`; bold: the column's best. Every command also takes `--wbits W --abits A "
        "--teacher resnet20_fmnist --preset quick --out DIR`; FP top-1 94.73; minutes per run on cpu (processor not "
        "recorded), 1 thread: the wall time, then the CPU time of all its threads, which does not count minutes a run "
        "was paused or waited for a core, over the runs that counted it (k of n: only k of the n runs, the others "
        "from before zsq counted it; –: none); (+k once): building the offline set, "
        "which later runs with the same teacher and set recipe read from the cache.",
        "",
        "| command | W3A3 | W4A4 | min per run (median): wall · CPU |",
        "|---|---|---|---|",
        "| `zsq quantize --source gdfq --loss kd+ce` | 89.00 ± 1.00 (88.00, 3) ⚑1 | 92.00 (1) | 11 · 9 (3 of 4) |",
        "| `zsq quantize --source hast --loss hast --placement deployable` | **91.00** (1) | – | 5 · 4 (+4 once) |",
        "| `zsq ptq --source genie` | – | **93.50** (1) | 4 · – |"]
    assert "| bits | source | loss |" in text  # and the full table, after it
    page.write_text("<!-- zsq headline: h -->\nstale numbers\n<!-- /zsq headline: h -->\n")
    assert run_cli("report", "--store", str(tmp_path / "h"), "--readme", str(page)).returncode == 0
    assert "stale numbers" not in page.read_text() and "zsq report: h" not in page.read_text()

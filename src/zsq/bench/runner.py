"""`zsq bench`: run every run of a grid as its own `zsq quantize` process, N at a time, and store each result.

Resumable: a run already in the store, or whose folder holds a result.json, is not run again (its config must
match, so a changed grid never passes off old numbers); a killed run resumes from its state.pt.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..rundir import config_differences
from ..train import current_config
from .report import BOOKKEEPING as REPORT_BOOKKEEPING
from .report import curve_stats
from ..errors import UserError
from ..models import dataset_info, load_model, model_name
from .grid import Grid, RunSpec
from .store import Store

# Fields a stored run may differ in from the grid's (another folder, device, progress log): the report's
# bookkeeping, except the seed (which run it is) and eval_limit (it changes the number stored).
BOOKKEEPING = REPORT_BOOKKEEPING - {"seed", "eval_limit"}


@dataclass
class BenchSummary:
    total: int
    finished_before: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "name: why"
    not_run: list[str] = field(default_factory=list)  # missing, left alone by collect


ConfigOf = Callable[[str, list[str]], dict[str, Any]]  # (command, argv) -> the config.json that run would write


def run_grid(grid: Grid, out: str | Path, config_of: ConfigOf, runs_dir: str | Path | None = None, jobs: int = 1,
             quiet: bool = False, dry_run: bool = False, collect: bool = False) -> BenchSummary:
    """Run what is missing of `grid` into runs_dir (default OUT/runs), results into OUT/results.db.

    The runs are `zsq` commands; `config_of` resolves one as the CLI will (so a grid is checked before anything
    starts, and a finished run is recognised by its config). `collect`: only store the runs already finished in
    runs_dir (made elsewhere, e.g. copied from a GPU machine, or still running in another process) and start
    none."""
    out = Path(out)
    runs_dir = Path(runs_dir) if runs_dir is not None else out / "runs"
    specs = grid.runs()
    expected = {}
    for spec in specs:
        try:
            expected[spec.name] = config_of(spec.command, spec.argv(runs_dir / spec.name))
        except UserError as e:
            raise UserError(f"grid {grid.path}, run {spec.name}: {e}") from None
    if dry_run:
        for spec in specs:
            print(shlex.join(["zsq", spec.command, *spec.argv(runs_dir / spec.name)]))
        return BenchSummary(len(specs))
    store = Store(out)
    try:
        store.plan(grid.name, [(s.name, s.argv(runs_dir / s.name)) for s in specs])
        summary = BenchSummary(len(specs))
        todo = []
        for spec in specs:
            if _finished(store, grid, spec, runs_dir / spec.name, expected[spec.name]):
                summary.finished_before.append(spec.name)
            else:
                todo.append(spec)
        if collect:
            summary.not_run = [spec.name for spec in todo]
        else:
            _run_all(todo, store, grid, runs_dir, out / "logs", jobs, quiet, summary)
    finally:
        store.close()
    return summary


def _finished(store: Store, grid: Grid, spec: RunSpec, run_dir: Path, expected: dict[str, Any]) -> bool:
    stored = store.config(spec.name)
    in_store = stored is not None
    if not in_store and (run_dir / "result.json").exists() and (run_dir / "config.json").exists():
        stored = json.loads((run_dir / "config.json").read_text())
    if stored is None:
        return False
    _check_same(spec.name, run_dir, current_config(stored), expected)  # an older zsq's config, as written now
    if not in_store:
        _store(store, grid, spec, run_dir)
    return True


def _check_same(name: str, run_dir: Path, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """Fields in both must agree, nested ones (plug-in options, reconstruction) field by field; a field missing
    from an older run's config took its then default, and one the grid's run leaves unset (None: an option its
    choices do not use) cannot differ."""
    differ = config_differences(stored, expected, frozenset(BOOKKEEPING))
    if differ:
        path, have, want = differ[0]
        raise UserError(f"run {name} ({run_dir}) was made with another config ({path}: {have!r}, the grid asks "
                        f"for {want!r}): give another --out/--runs or remove it")


def _store(store: Store, grid: Grid, spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    config = current_config(json.loads((run_dir / "config.json").read_text()))
    result = json.loads((run_dir / "result.json").read_text())
    dataset, model = result.get("dataset"), result.get("model")
    if dataset is None or model is None:  # runs made before result.json recorded them
        dataset, model = _teacher_facts(config)
    if (run_dir / "metrics.jsonl").exists():
        result.update(curve_stats(run_dir / "metrics.jsonl"))
    store.add(spec.name, grid.name, list(spec.flags), config, result, run_dir, dataset, model)
    return result


def _teacher_facts(config: dict[str, Any]) -> tuple[str, str]:
    teacher = load_model(config["teacher"], checkpoint=config.get("checkpoint"))
    info = dataset_info(teacher)
    dataset = config.get("dataset") or (info.name if info is not None else "unknown")
    return dataset, model_name(teacher)


def _run_all(todo: list[RunSpec], store: Store, grid: Grid, runs_dir: Path, logs: Path, jobs: int, quiet: bool,
             summary: BenchSummary) -> None:
    if not todo:
        return
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # N runs share the cores
    bar = tqdm(total=len(todo), desc=f"bench {grid.name}", unit="run", disable=quiet, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(_launch, spec, runs_dir / spec.name, logs / f"{spec.name}.log", env): spec
                   for spec in todo}
        for future in as_completed(futures):
            spec, rc = futures[future], future.result()
            log = logs / f"{spec.name}.log"
            if rc == 0 and (runs_dir / spec.name / "result.json").exists():
                result = _store(store, grid, spec, runs_dir / spec.name)
                summary.ran.append(spec.name)
                line = f"{spec.name}: q_top1 {result['q_top1']:.2f} in {result['wall_s'] / 60:.1f} min"
            else:
                summary.failed.append(f"{spec.name}: exit {rc}, {_last_line(log)} (log: {log})")
                line = f"{spec.name}: FAILED (exit {rc}; see {log})"
            tqdm.write(line)
            bar.update()
    finally:  # on Ctrl-C the running runs checkpoint and stop (same signal); queued ones must not start
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()


def _launch(spec: RunSpec, run_dir: Path, log: Path, env: dict[str, str]) -> int:
    """The run as its own process: resumed from its checkpoint, or started over when it was killed before its
    first one (the folder is the bench's own)."""
    resume = ["--resume"] if (run_dir / "state.pt").exists() else ["--restart"] if run_dir.exists() else []
    cmd = [sys.executable, "-m", "zsq", spec.command, *spec.argv(run_dir), *resume, "--quiet"]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[2:]) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1][:300] if lines else "no output"

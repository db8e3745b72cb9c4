"""The results store: one SQLite row per finished run, with its resolved config, its result and the code that ran.

Standard library only; a row is inserted once its run has written result.json, so the store never holds a
half-finished run. `plan` keeps what a grid asked for, so a report can say how much of it is done.
"""
from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

from ..distill import LOSSES, current_option
from ..errors import UserError
from ..train.config import PTQ
from .grid import flag_tag

RENAMED_FLAGS = {"--generator": "--source", "--method": "--loss"}  # before the plain names

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY, grid TEXT, dataset TEXT, model TEXT, teacher TEXT, wbits INTEGER, abits INTEGER,
    source TEXT, loss TEXT, preset TEXT, seed INTEGER, flags TEXT, q_top1 REAL, q_top5 REAL, fp_top1 REAL,
    wall_s REAL, code TEXT, dir TEXT, finished_at TEXT, config TEXT, result TEXT);
CREATE TABLE IF NOT EXISTS plan (name TEXT PRIMARY KEY, grid TEXT, argv TEXT);
"""
STORE_FILE = "results.db"


class Store:
    """`Store(folder)` opens (or creates) folder/results.db."""

    def __init__(self, folder: str | Path, create: bool = True):
        self.path = Path(folder) / STORE_FILE
        if not create and not self.path.is_file():
            raise UserError(f"no results store {self.path} (made by zsq bench GRID --out {folder})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            if "generator" in [r[1] for r in self.db.execute("PRAGMA table_info(runs)")]:
                self._rename()
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a zsq results store ({e})") from None

    def _rename(self) -> None:
        """A store from before the plain names (columns generator, method; losses gdfq, adadfq): its columns,
        losses and run names as a grid names them now, so that the grids find their finished runs and the
        report shows today's names. The stored config.json and result.json stay as they were written."""
        def loss(name: str) -> str:
            return LOSSES.canonical(name, quiet=True) if name in LOSSES else name

        def flags(argv: list[str]) -> list[str]:
            return [loss(v) if k == "--method" else RENAMED_FLAGS.get(v, current_option(k[2:].replace("-", "_"), v,
                                                                                          quiet=True))
                    for k, v in zip(["", *argv], argv)]

        def name(run: str, source: str, old: str) -> str:
            if not run.startswith(f"{source}-{old}-"):
                return run
            rest = run[len(f"{source}-{old}"):]
            for before, now in LOSSES.renamed().items():
                rest = rest.replace(f"-akt-base-{before}-", f"-akt-base-{flag_tag((now,))}-")
            return f"{source}-{loss(old)}{rest}"

        with self.db:
            self.db.execute("ALTER TABLE runs RENAME COLUMN generator TO source")
            self.db.execute("ALTER TABLE runs RENAME COLUMN method TO loss")
            for run, source, old, argv in self.db.execute("SELECT name, source, loss, flags FROM runs").fetchall():
                self.db.execute("UPDATE runs SET name = ?, loss = ?, flags = ? WHERE name = ?",
                                (name(run, source, old), loss(old), json.dumps(flags(json.loads(argv))), run))
            for run, argv in self.db.execute("SELECT name, argv FROM plan").fetchall():
                argv = json.loads(argv)
                source = argv[argv.index("--generator") + 1] if "--generator" in argv else None
                old = argv[argv.index("--method") + 1] if "--method" in argv else None
                renamed = name(run, source, old) if source and old else run
                self.db.execute("UPDATE plan SET name = ?, argv = ? WHERE name = ?",
                                (renamed, json.dumps(flags(argv)), run))

    def close(self) -> None:
        self.db.close()

    def plan(self, grid: str, runs: list[tuple[str, list[str]]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO plan VALUES (?, ?, ?)",
                                [(name, grid, json.dumps(argv)) for name, argv in runs])

    def add(self, name: str, grid: str, flags: list[str], config: dict[str, Any], result: dict[str, Any],
            run_dir: Path, dataset: str, model: str) -> None:
        row = (name, grid, dataset, model, config["teacher"], config["wbits"], config["abits"], config["source"],
               config.get("loss", PTQ), config["preset"], config["seed"], json.dumps(flags), result["q_top1"],
               result.get("q_top5"), result["fp_top1"], result["wall_s"],
               result.get("code", "unknown (run made before zsq recorded its code version)"), str(run_dir),
               datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               json.dumps(config, sort_keys=True), json.dumps(result, sort_keys=True))
        try:
            with self.db:
                self.db.execute(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(row))})", row)
        except sqlite3.OperationalError as e:  # e.g. the file replaced under a running bench (a git checkout)
            raise UserError(f"{self.path}: cannot store run {name} ({e}); its folder {run_dir} is complete: run "
                            f"the same zsq bench command with --collect to store it") from None

    def config(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT config FROM runs WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else None

    def rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY name")
        keys = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            row = dict(zip(keys, values, strict=True))
            row["config"], row["result"], row["flags"] = (json.loads(row[k]) for k in ("config", "result", "flags"))
            out.append(row)
        return out

    def planned(self) -> dict[str, list[str]]:
        """Every run the grids asked for, with the flags its grid gave it."""
        return {r[0]: json.loads(r[1]) for r in self.db.execute("SELECT name, argv FROM plan ORDER BY name")}

"""The run folder of `zsq quantize` and `zsq ptq`: never overwritten silently. A finished run (result.json) is
refused; an unfinished one is continued (--resume, with the same configuration) or started over (--restart)
only when asked."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .models import read_checkpoint

RUN_FILES = ("state.pt", "metrics.jsonl", "config.json", "samples.pt", "student.pt")
MACHINE = ("device", "threads")  # where a run executes: a resumed run may change them


def check_writable(out: Path) -> None:
    """Before anything is built: the run folder, or the closest folder above it that exists, takes files."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir() or not os.access(where, os.W_OK):
        raise UserError(f"cannot create the run folder {out}: {where} is not a writable folder; choose another --out")


def clear_run(out: Path) -> None:
    """A fresh run's folder: what an earlier unfinished run left there (--restart) goes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder must be, no permission, a full disk
        raise UserError(f"cannot create the run folder {out}: {e.strerror}; choose another --out") from None
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def open_run(out: Path, config: dict[str, Any], resume: bool, restart: bool, world: int = 1,
             say: Any = print, as_now: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: c
             ) -> dict[str, Any] | None:
    """The resume state (state.pt) of the run in `out`, or None for a fresh run. `config` is what config.json
    will hold; a resumed run must have been started with the same one (device and threads aside) on as many
    processes (`world`)."""
    if resume and restart:
        raise UserError("--resume continues the run in --out and --restart discards it: give one of them")
    check_writable(out)
    if (out / "result.json").exists():
        raise UserError(f"{out} already holds a finished run (result.json): choose another --out")
    unfinished = (out / "config.json").exists() or (out / "metrics.jsonl").exists()
    if restart:
        return None
    if not (out / "state.pt").exists():
        if unfinished:
            raise UserError(f"{out} holds a run that stopped before its first checkpoint, so there is nothing to "
                            f"resume: --restart starts it over, or choose another --out")
        if resume:
            say(f"no checkpoint in {out}: starting the run from the beginning")
        return None
    if not resume:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, --restart to start it over, or "
                        f"choose another --out")
    saved = as_now(json.loads((out / "config.json").read_text()))  # an older zsq's config.json, as written now
    started = saved.get("distributed", {}).get("world_size", 1)
    if started != world:
        raise UserError(f"{out} was started on {started} process(es); resume it on as many (torchrun "
                        f"--nproc_per_node), not {world}")
    differ = config_differences(saved, config, frozenset(MACHINE))
    if differ:
        path, have, want = differ[0]
        raise UserError(f"{out} was started with another configuration ({path}: {have!r}, now {want!r}); resume "
                        f"with the same arguments or choose another --out")
    return read_checkpoint(out / "state.pt")


def config_differences(stored: dict[str, Any], now: dict[str, Any], skip: frozenset[str] = frozenset(),
                       prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, stored, now) of each field of two config.json files that differs, nested configs field by
    field. A field only one has is no difference (added since: the older run had its default), nor one that
    `now` leaves unset (None: an option its choices do not use)."""
    out = []
    for k in sorted(set(stored) & set(now) - skip):
        have, want = stored[k], now[k]
        if isinstance(have, dict) and isinstance(want, dict):
            out += config_differences(have, want, prefix=f"{prefix}{k}.")
        elif want is not None and have != want:
            out.append((prefix + k, have, want))
    return out

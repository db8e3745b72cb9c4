"""`zsq report`: every finished run in one table, seeds of the same configuration grouped as mean ± std."""
from __future__ import annotations

import html
import json
import os
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import save_bytes

# Fields that say how a run was carried out, not what it computed: never part of a group's identity.
BOOKKEEPING = {"seed", "out", "device", "ckpt_every", "log_every", "eval_every", "eval_limit", "deterministic",
               "max_bad_steps", "track_curvature", "curvature_samples"}


def read_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """The finished runs among `paths` (run directories, or folders holding them): config + result each."""
    runs = []
    for path in map(Path, paths):
        dirs = [path] if (path / "result.json").exists() else sorted(p.parent for p in path.glob("*/result.json"))
        for d in dirs:
            if (d / "config.json").exists():
                runs.append({"dir": str(d), "config": json.loads((d / "config.json").read_text()),
                             "result": json.loads((d / "result.json").read_text())})
    if not runs:
        raise UserError(f"no finished run (a folder with result.json and config.json) in {', '.join(map(str, paths))}")
    return runs


def _changes(config: dict[str, Any]) -> dict[str, Any]:
    """What the run set beyond its preset (flags and plug-in options), for the group label."""
    from ..train import _jsonable, resolve_config

    base = json.loads(json.dumps(_jsonable(resolve_config(config["preset"], config["generator"], config["method"],
                                                          teacher=config["teacher"]))))
    shown = BOOKKEEPING | {"options", "wbits", "abits", "generator", "method", "preset"}  # columns of their own
    own = {k: v for k, v in config.items() if k not in shown and base.get(k) != v}
    opts = {k: v for k, v in config.get("options", {}).items() if base["options"].get(k) != v}
    return {**own, **opts}


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in seed (and bookkeeping), as one row each: accuracies per seed, mean, std."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg, res = run["config"], run["result"]
        key = json.dumps({k: v for k, v in cfg.items() if k not in BOOKKEEPING}, sort_keys=True)
        g = groups.setdefault(key, {"bits": f"W{cfg['wbits']}A{cfg['abits']}", "generator": cfg["generator"],
                                    "method": cfg["method"], "preset": cfg["preset"], "changes": _changes(cfg),
                                    "fp_top1": res["fp_top1"], "runs": []})
        g["runs"].append({"seed": cfg["seed"], "q_top1": res["q_top1"], "wall_min": res["wall_s"] / 60,
                          "dir": run["dir"]})
    rows = []
    for g in groups.values():
        g["runs"].sort(key=lambda r: r["seed"])
        accs = [r["q_top1"] for r in g["runs"]]
        g.update(mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 wall_min=statistics.mean(r["wall_min"] for r in g["runs"]))
        rows.append(g)
    return sorted(rows, key=lambda g: (g["bits"], g["generator"], g["method"], len(g["changes"]),
                                       json.dumps(g["changes"])))


HEADER = ["bits", "data + loss", "beyond the preset", "preset", "seeds", "q_top1 mean ± std", "per seed",
          "FP − mean", "wall (min)"]


def _cells(g: dict[str, Any]) -> list[str]:
    changes = ", ".join(f"{k}={v}" for k, v in g["changes"].items()) or "–"
    return [g["bits"], f"{g['generator']}+{g['method']}", changes, g["preset"],
            ",".join(str(r["seed"]) for r in g["runs"]),
            f"{g['mean']:.2f} ± {g['std']:.2f}" if len(g["runs"]) > 1 else f"{g['mean']:.2f}",
            " / ".join(f"{r['q_top1']:.2f}" for r in g["runs"]), f"{g['fp_top1'] - g['mean']:.2f}",
            f"{g['wall_min']:.1f}"]


def markdown(rows: list[dict[str, Any]], plots: list[Path]) -> str:
    lines = ["# zsq report", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(g)) + " |" for g in rows]
    lines += [""] + [f"![{p.stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def html_page(rows: list[dict[str, Any]], plots: list[Path]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(g)) + "</tr>" for g in rows)
    images = "".join(f'<figure><img src="{html.escape(str(p))}"><figcaption>{html.escape(p.stem)}</figcaption>'
                     f"</figure>" for p in plots)
    return (f"<!doctype html><meta charset='utf-8'><title>zsq report</title><h1>zsq report</h1>"
            f"<table border=1 cellspacing=0 cellpadding=4><tr>{head}</tr>{body}</table>{images}\n")


def write_report(paths: list[str | Path], out: str | Path, plots: list[str | Path] = ()) -> dict[str, Any]:
    """Write OUT (markdown) and OUT with .html; plots (PNG files) are embedded by relative path."""
    out = Path(out)
    rows = group_runs(read_runs(paths))
    rel = [Path(os.path.relpath(Path(p).resolve(), out.resolve().parent)) for p in plots]
    save_bytes(markdown(rows, rel).encode(), out)
    save_bytes(html_page(rows, rel).encode(), out.with_suffix(".html"))
    return {"markdown": str(out), "html": str(out.with_suffix(".html")), "groups": rows}


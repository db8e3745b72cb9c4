"""`zsq report`: every finished run in one table, seeds of the same configuration grouped as mean ± std.

Runs come from run directories or from a bench results store; where the setting matches a published one
(dataset, model, bits, data source, loss), the paper's number is quoted beside ours.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from .published import published
from ..train.config import PTQ, current_config
from .store import Store
from ..errors import UserError
from ..io import save_bytes

# Fields that say how a run was carried out, not what it computed: never part of a group's identity.
BOOKKEEPING = {"seed", "out", "device", "threads", "ckpt_every", "log_every", "eval_every", "eval_limit",
               "deterministic", "max_bad_steps", "track_curvature", "curvature_samples"}


def read_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """The finished runs among `paths` (run directories, or folders holding them): config (as written now) +
    result each."""
    runs = []
    for path in map(Path, paths):
        dirs = [path] if (path / "result.json").exists() else sorted(p.parent for p in path.glob("*/result.json"))
        for d in dirs:
            if (d / "config.json").exists():
                result = json.loads((d / "result.json").read_text())
                if (d / "metrics.jsonl").exists():
                    result.update(curve_stats(d / "metrics.jsonl"))
                config = current_config(json.loads((d / "config.json").read_text()))
                runs.append({"name": d.name, "dir": str(d), "config": config, "result": result})
    if not runs:
        raise UserError(f"no finished run (a folder with result.json and config.json) in {', '.join(map(str, paths))}")
    return runs


def curve_stats(metrics: Path) -> dict[str, dict[str, float]]:
    """Summaries of a run's curves, comparable between runs: the Q model's finite global gradient norms over the
    trained iterations (median, max: how stably a loss trains) and, with --track-curvature, the Hessian-trace
    estimates (mean over training, last)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    norms = [r["grad_norm"] for r in rows if "grad_norm" in r and math.isfinite(r["grad_norm"])]
    traces = [r["hessian_trace"] for r in rows if "hessian_trace" in r and math.isfinite(r["hessian_trace"])]
    stats = {}
    if norms:
        stats["grad_norm"] = {"median": statistics.median(norms), "max": max(norms)}
    if traces:
        stats["hessian_trace"] = {"mean": statistics.mean(traces), "last": traces[-1]}
    return stats


def read_store(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The runs of a bench store (as read_runs gives them, each with the flags its grid gave it) and every run its
    grids planned, with those flags."""
    store = Store(folder, create=False)
    try:
        rows, planned = store.rows(), store.planned()
    finally:
        store.close()
    runs = [{"name": r["name"], "dir": r["dir"], "config": current_config(r["config"]), "argv": planned.get(r["name"]),
             "result": {**r["result"], "dataset": r["dataset"], "model": r["model"]}} for r in rows]
    return runs, planned


def _changes(config: dict[str, Any]) -> dict[str, Any]:
    """What the run set beyond its preset (flags and plug-in options), for the group label."""
    from ..posttrain import resolve_ptq_config
    from ..posttrain import config_dict as ptq_config_dict
    from ..quant.ranges import RANGE_SETTERS
    from ..recon import USER_NAMES
    from ..train import config_dict, flat_fields, resolve_config

    base = (ptq_config_dict(resolve_ptq_config(config["preset"], config["source"], teacher=config["teacher"]))
            if _is_ptq(config) else config_dict(resolve_config(config["preset"], config["source"], config["loss"],
                                                               teacher=config["teacher"])))
    config = _complete(config)
    base["placement"] = base.get("placement") or _default_placement(config)
    # the probe measures the health score, it does not change the Q model: a group, never a recipe change
    shown = BOOKKEEPING | {"options", "recon", "wbits", "abits", "source", "loss", "method", "preset", "probe_images",
                           "probe_iters"}
    own = {k: v for k, v in config.items() if k not in shown and base.get(k) != v}
    recon = {USER_NAMES.get(k, k): v for k, v in config.get("recon", {}).items() if base["recon"].get(k) != v}
    opts = {k: v for k, v in config.get("options", {}).items() if base["options"].get(k) != v}
    if _is_ptq(config):
        return {**own, **recon, **opts}
    # the range setter's options read beside it, where they stood when they were TrainConfig fields
    ranges = {k: v for k, v in opts.items() if k in RANGE_SETTERS.all_options()}
    order = {f.name: i for i, f in enumerate(flat_fields())}
    beside = order["act_range"] + 0.5
    placed = sorted([*own.items(), *ranges.items()], key=lambda kv: order.get(kv[0], beside))
    return {**dict(placed), **{k: v for k, v in opts.items() if k not in ranges}}


def _is_ptq(config: dict[str, Any]) -> bool:
    """A `zsq ptq` run (post-training reconstruction), whose config is a PtqConfig, not a TrainConfig."""
    return config.get("method") == PTQ


def _default_placement(config: dict[str, Any]) -> str:
    """The placement a run without one resolved when it started (or had before the option existed): deployable
    for a user's module (--model-def), lineage for zsq's architectures."""
    return "deployable" if config.get("model_def") else "lineage"


def _complete(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config with every field, as written now: one missing from an older run's config.json held its
    default then (it did not exist yet), so it must not split that run from newer ones; the range setter's options
    are all recorded, at the setter's defaults where the run gave none."""
    from ..posttrain import PtqConfig
    from ..quant.ranges import RANGE_SETTERS
    from ..recon import ReconConfig
    from ..train import flat_defaults, flat_fields, with_range_defaults

    if _is_ptq(config):
        defaults = {f.name: f.default for f in dataclasses.fields(PtqConfig) if f.default is not dataclasses.MISSING}
        recon = dataclasses.asdict(ReconConfig())
        full = json.loads(json.dumps({**defaults, **config, "recon": {**recon, **config.get("recon", {})}}))
        return {**full, "placement": full.get("placement") or _default_placement(full)}
    plain = {f.name for f in flat_fields() if f.default is not dataclasses.MISSING}  # not a list's default_factory
    defaults = {k: v for k, v in flat_defaults().items() if k in plain}
    full = json.loads(json.dumps({**defaults, **config}))
    full["placement"] = full.get("placement") or _default_placement(full)
    if full["act_range"] in RANGE_SETTERS:  # an older run's setter may no longer exist
        full["options"] = with_range_defaults(full["act_range"], full.get("options", {}))
    return full


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in seed (and bookkeeping), as one row each: accuracies per seed, mean, std."""
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg, res = current_config(run["config"]), run["result"]  # runs given by hand may hold older configs
        full = _complete(cfg)
        key = json.dumps({k: v for k, v in full.items() if k not in BOOKKEEPING}, sort_keys=True)
        loss = cfg.get("loss", PTQ)
        quoted = published(res.get("dataset", ""), res.get("model", ""), cfg["wbits"], cfg["abits"],
                           cfg["source"], loss)
        g = groups.setdefault(key, {"bits": f"W{cfg['wbits']}A{cfg['abits']}", "source": cfg["source"],
                                    "loss": loss, "preset": cfg["preset"], "changes": _changes(cfg),
                                    "fp_top1": res["fp_top1"], "published": quoted, "runs": []})
        g["runs"].append({"seed": cfg["seed"], "q_top1": res["q_top1"], "wall_min": res["wall_s"] / 60,
                          "cpu_min": _minutes(res.get("cpu_s")), "set_min": _minutes(res.get("synthetic_set_build_s")),
                          "name": run.get("name", Path(run["dir"]).name), "dir": run["dir"],
                          "grad_norm": res.get("grad_norm"), "argv": run.get("argv"),
                          "device": _device(res, cfg),
                          "hessian_trace": res.get("hessian_trace"), "health": res.get("health")})
    rows = []
    for g in groups.values():
        g["runs"].sort(key=lambda r: r["seed"])
        accs = [r["q_top1"] for r in g["runs"]]
        norms = [r["grad_norm"] for r in g["runs"] if r["grad_norm"]]
        g.update(mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 wall_min=statistics.mean(r["wall_min"] for r in g["runs"]),
                 grad_norm=(statistics.median(n["median"] for n in norms), max(n["max"] for n in norms))
                 if norms else None,
                 hessian_trace=statistics.mean(r["hessian_trace"]["mean"] for r in g["runs"])
                 if all(r["hessian_trace"] for r in g["runs"]) else None,
                 health=(statistics.mean(r["health"]["score"] for r in g["runs"]),
                         sum(r["health"]["flagged"] for r in g["runs"])) if all(r["health"] for r in g["runs"])
                 else None)
        rows.append(g)
    return sorted(rows, key=lambda g: (g["bits"], g["source"], g["loss"], len(g["changes"]),
                                       json.dumps(g["changes"])))


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 60


def _device(result: dict[str, Any], config: dict[str, Any]) -> str:
    """What a run's wall time was measured on, as far as the run recorded it."""
    threads = config.get("threads")
    where = result.get("hardware") or f"{result.get('device', 'cpu')} (processor not recorded)"  # older runs
    return f"{where}, " + (f"{threads} thread{'s' * (threads != 1)}" if threads else "all threads")


HEADER = ["bits", "source", "loss", "beyond the preset", "preset", "seeds", "q_top1 mean ± std (ours)", "per seed",
          "FP − mean", "wall (min)"]
QUOTED = "published (quoted)"
GRAD = "Q grad norm median / max"
TRACE = "Hessian trace (mean over training)"
HEALTH = "health score (flagged runs)"


def _header(rows: list[dict[str, Any]]) -> list[str]:
    return (HEADER + ([GRAD] if any(g["grad_norm"] for g in rows) else [])
            + ([TRACE] if any(g["hessian_trace"] is not None for g in rows) else [])
            + ([HEALTH] if any(g["health"] for g in rows) else [])
            + ([QUOTED] if any(g["published"] for g in rows) else []))


def _cells(g: dict[str, Any], header: list[str]) -> list[str]:
    changes = ", ".join(f"{k}={v}" for k, v in g["changes"].items()) or "–"
    cells = [g["bits"], g["source"], g["loss"], changes, g["preset"],
             ",".join(str(r["seed"]) for r in g["runs"]),
             f"{g['mean']:.2f} ± {g['std']:.2f}" if len(g["runs"]) > 1 else f"{g['mean']:.2f}",
             " / ".join(f"{r['q_top1']:.2f}" for r in g["runs"]), f"{g['fp_top1'] - g['mean']:.2f}",
             f"{g['wall_min']:.1f}"]
    if GRAD in header:
        cells.append(f"{g['grad_norm'][0]:.3g} / {g['grad_norm'][1]:.3g}" if g["grad_norm"] else "–")
    if TRACE in header:
        cells.append(f"{g['hessian_trace']:.4g}" if g["hessian_trace"] is not None else "–")
    if HEALTH in header:
        cells.append(f"{g['health'][0]:.1f} ({g['health'][1]})" if g["health"] else "–")
    if QUOTED in header:
        p = g["published"]
        cells.append(f"{p.top1:.2f} ({p.source})" if p else "–")
    return cells


def table_markdown(rows: list[dict[str, Any]]) -> str:
    header = _header(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(g, header)) + " |" for g in rows]
    return "\n".join(lines) + "\n"


def _progress(planned: dict[str, list[str]] | None, rows: list[dict[str, Any]]) -> str:
    if planned is None:
        return ""
    done = {r["name"] for g in rows for r in g["runs"]}
    return f"{len(done & set(planned))} of the {len(planned)} planned runs finished."


def markdown(rows: list[dict[str, Any]], plots: list[Path], note: str = "") -> str:
    lines = ["# zsq report", "", *([note, ""] if note else []), table_markdown(rows)]
    lines += [f"![{p.stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def html_page(rows: list[dict[str, Any]], plots: list[Path], note: str = "") -> str:
    header = _header(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(g, header))
                   + "</tr>" for g in rows)
    images = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in plots)
    return (f"<!doctype html><meta charset='utf-8'><title>zsq report</title><h1>zsq report</h1>"
            f"<p>{html.escape(note)}</p><table border=1 cellspacing=0 cellpadding=4><tr>{head}</tr>{body}</table>"
            f"{images}\n")


def write_report(paths: list[str | Path], out: str | Path | None, plots: list[str | Path] = (),
                 store: str | Path | None = None, readme: str | Path | None = None) -> dict[str, Any]:
    """Write OUT (markdown, plots linked by relative path) and OUT with .html (plots embedded, so the page stands
    alone), from run directories and/or a bench store; with `readme`, also replace the store's section of that
    file (see `update_readme`)."""
    runs, planned = read_store(store) if store is not None else ([], None)
    if paths:
        runs += read_runs(paths)
    if not runs:
        raise UserError(f"no finished run in the store {store}")
    rows = group_runs(runs)
    note = _progress(planned, rows)
    written: dict[str, Any] = {"groups": rows, "note": note}
    if out is not None:
        out = Path(out)
        rel = [Path(os.path.relpath(Path(p).resolve(), out.resolve().parent)) for p in plots]
        save_bytes(markdown(rows, rel, note).encode(), out)
        save_bytes(html_page(rows, [Path(p) for p in plots], note).encode(), out.with_suffix(".html"))
        written.update(markdown=str(out), html=str(out.with_suffix(".html")))
    if readme is not None:
        if store is None:
            raise UserError("--readme needs --store: a README section is named after its store")
        written["readme"] = str(update_readme(readme, Path(store).name, rows, note))
    return written


def section_body(rows: list[dict[str, Any]], note: str) -> str:
    """What a document's `<!-- zsq report: NAME -->` section holds: the store's progress line and its table."""
    return (note + "\n\n" if note else "") + table_markdown(rows)


RECIPE = {"--source", "--loss"}  # always in a headline's command, even when all rows share one
BITS = {"--wbits", "--abits"}  # a headline's columns


def _flag_groups(argv: list[str]) -> list[tuple[str, ...]]:
    """An argv's `--flag value` pairs and bare `--flag`s, in order."""
    groups: list[tuple[str, ...]] = []
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append((token,))
        else:
            groups[-1] += (token,)
    return groups


def _command(g: dict[str, Any]) -> list[tuple[str, ...]]:
    """A group's command as its grid gave it, less what differs between its seeds."""
    argv = g["runs"][0]["argv"]
    if argv is None:
        raise UserError(f"run {g['runs'][0]['name']} is in no grid's plan: a headline needs the commands of zsq bench")
    return [f for f in _flag_groups(argv) if f[0] not in ("--seed", "--out")]


def _headline_cell(g: dict[str, Any], best: bool) -> str:
    mean = f"**{g['mean']:.2f}**" if best else f"{g['mean']:.2f}"
    n, worst = len(g["runs"]), min(r["q_top1"] for r in g["runs"])
    flagged = f" ⚑{g['health'][1]}" if g["health"] and g["health"][1] else ""
    return (f"{mean} ± {g['std']:.2f} ({worst:.2f}, {n})" if n > 1 else f"{mean} (1)") + flagged


def _headline_time(runs: list[dict[str, Any]]) -> str:
    """A command's minutes per run: median wall, median CPU over the runs that counted it (how many, when older
    runs did not), and the median build of an offline set over the runs that record one."""
    cpus = [r["cpu_min"] for r in runs if r["cpu_min"] is not None]
    builds = [r["set_min"] for r in runs if r["set_min"] is not None]
    counted = f" ({len(cpus)} of {len(runs)})" if len(cpus) < len(runs) else ""
    cpu = f"{statistics.median(cpus):.0f}{counted}" if cpus else "–"
    return (f"{statistics.median(r['wall_min'] for r in runs):.0f} · {cpu}"
            + (f" (+{statistics.median(builds):.0f} once)" if builds else ""))


def headline_markdown(rows: list[dict[str, Any]], note: str) -> str:
    """The table a user picks a recipe from: a row per command of the store (as zsq bench ran it, less seed, out and
    bits), a column per bit width; each cell the final top-1 over seeds as mean ± std with the worst seed and how
    many runs the data-free health check flagged, each column's best in bold. Flags that every command shares
    (teacher, preset) are said once, above it."""
    commands = [_command(g) for g in rows]
    shared = [f for f in commands[0] if all(f in c for c in commands) and f[0] not in RECIPE | BITS]
    recipes: dict[tuple[str, tuple[tuple[str, ...], ...]], dict[str, dict[str, Any]]] = {}
    for g, command in zip(rows, commands):  # a row per command, zsq quantize's first, a variant after its base
        own = tuple(f for f in command if f not in shared and f[0] not in BITS)
        recipes.setdefault(("ptq" if g["loss"] == PTQ else "quantize", own), {})[g["bits"]] = g
    bits = sorted({g["bits"] for g in rows}, key=lambda b: tuple(int(k) for k in b[1:].split("A")))
    best = {b: max(by[b]["mean"] for by in recipes.values() if b in by) for b in bits}
    devices = sorted({r["device"] for g in rows for r in g["runs"]})
    fp = sorted({f"{g['fp_top1']:.2f}" for g in rows})
    lines = [f"{note + ' ' if note else ''}Each cell: final top-1 over seeds, mean ± std (worst seed, seeds); ⚑k: k "
             f"runs flagged by `zsq health`; bold: the column's best. Every command also takes "
             f"`--wbits W --abits A {' '.join(' '.join(f) for f in shared)} --out DIR`; FP top-1 {' / '.join(fp)}; "
             f"minutes per run on {' / '.join(devices)}: the wall time, then the CPU time of all its threads, which "
             f"does not count minutes a run was paused or waited for a core, over the runs that counted it (k of n: "
             f"only k of the n runs, the others from before zsq counted it; –: none); (+k once): building the "
             f"offline set, which later runs with the same teacher and set recipe read from the cache.", "",
             "| command | " + " | ".join(bits) + " | min per run (median): wall · CPU |",
             "|" + "---|" * (len(bits) + 2)]
    for (word, own), by in sorted(recipes.items(), key=lambda kv: (kv[0][0] == "ptq", kv[0][1])):
        cells = [_headline_cell(by[b], by[b]["mean"] == best[b]) if b in by else "–" for b in bits]
        command = " ".join(" ".join(f) for f in own)
        times = _headline_time([r for g in by.values() for r in g["runs"]])
        lines.append(f"| `zsq {word} {command}` | " + " | ".join(cells) + f" | {times} |")
    return "\n".join(lines) + "\n"


SECTIONS = {"report": section_body, "headline": headline_markdown}  # what a document's sections of a store hold


def store_section(store: str | Path, kind: str = "report") -> str:
    """The section of `kind` that `zsq report --store STORE --readme FILE` writes, as text (the docs test compares
    them)."""
    runs, planned = read_store(store)
    if not runs:
        raise UserError(f"no finished run in the store {store}")
    rows = group_runs(runs)
    return SECTIONS[kind](rows, _progress(planned, rows))


def update_readme(readme: str | Path, name: str, rows: list[dict[str, Any]], note: str) -> Path:
    """Replace what lies between `<!-- zsq KIND: NAME -->` and `<!-- /zsq KIND: NAME -->` for each KIND the file
    holds (report: the full table; headline: a row per command, a column per bit width), so that a document's
    numbers are regenerated from the store, never typed by hand."""
    path = Path(readme)
    if not path.is_file():
        raise UserError(f"{path} not found")
    text = path.read_text()
    found = [kind for kind in SECTIONS if f"<!-- zsq {kind}: {name} -->" in text]
    if not found:
        raise UserError(f"{path} has no '<!-- zsq report: {name} -->' (or '<!-- zsq headline: {name} -->') line, "
                        f"followed by its closing '<!-- /zsq report: {name} -->'")
    for kind in found:
        start, end = f"<!-- zsq {kind}: {name} -->", f"<!-- /zsq {kind}: {name} -->"
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise UserError(f"{path} needs exactly one '{start}' line followed by one '{end}' line")
        head, rest = text.split(start)
        text = head + start + "\n" + SECTIONS[kind](rows, note) + end + rest.split(end, 1)[1]
    return save_bytes(text.encode(), path)

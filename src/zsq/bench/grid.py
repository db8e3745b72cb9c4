"""Grid files: bits × data sources × losses × seeds, with a preset and overrides, expanded into `zsq quantize` runs
(and `zsq ptq` runs: a row with `method = "ptq"` and the source of its images).

A grid is a TOML file:

    teacher = "resnet20_fmnist"      # or a checkpoint path; `zsq bench --teacher` overrides
    preset = "quick"
    bits = [3, 4, 5]                 # W = A; a pair [4, 8] is W4A8
    seeds = [0, 1, 2]
    options = {eval-limit = 2000}    # zsq quantize flags for every run (optional)

    [[rows]]                         # source × loss; either may be a list (their product)
    source = ["gdfq", "adadfq"]      # a row may also restrict `bits` and `seeds` to subsets of the grid's
    loss = "akt"
    options = {akt-lambda = "1e4"}

    [[rows]]                         # zsq ptq on the genie set
    source = "genie"
    method = "ptq"

Option keys are `zsq quantize` flags without the dashes; true is a bare flag, a list is comma-joined, and
"{source}" / "{loss}" in a value is replaced by the row's. The keys' former names (`generator`; `method` for a
loss) are read for one release, with a deprecation line. Also: `dataset`, `data_dir` (top level).
Grid-wide options (and `zsq bench --set`) go to the runs they apply to: `synth-images` reaches the hast runs
only, and a key that applies to no run at all is an error. A row's own option wins over a grid-wide one (the
row is named after it): grid-wide `act-range = "ema-minmax"` with a row setting `act-range = "learned"`.
"""
from __future__ import annotations

import fnmatch
import itertools
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distill import LOSSES, current_option
from ..errors import UserError, deprecated
from ..train.config import PTQ

TOP_KEYS = {"teacher", "preset", "bits", "seeds", "options", "rows", "dataset", "data_dir", "description"}
ROW_KEYS = {"source", "loss", "method", "options", "bits", "seeds", "generator"}  # generator: source's former name


@dataclass(frozen=True)
class RunSpec:
    """One `zsq quantize` run of a grid (or `zsq ptq`: loss PTQ); `flags` are the row's options, part of the run's
    name."""

    name: str
    source: str
    loss: str
    wbits: int
    abits: int
    seed: int
    flags: tuple[str, ...]
    common: tuple[str, ...]  # teacher, preset and the grid-wide options that apply to this run

    @property
    def command(self) -> str:
        """`ptq` for a post-training row, else `quantize`."""
        return "ptq" if self.loss == PTQ else "quantize"

    def argv(self, out: Path) -> list[str]:
        chosen = ["--source", self.source] + ([] if self.loss == PTQ else ["--loss", self.loss])
        return ["--wbits", str(self.wbits), "--abits", str(self.abits), *chosen, *self.flags, *self.common,
                "--seed", str(self.seed), "--out", str(out)]


@dataclass
class Grid:
    path: Path
    teacher: str
    preset: str
    bits: list[tuple[int, int]]
    seeds: list[int]
    rows: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    only: str | None = None  # a glob on run names: the part of a long grid to run now

    @property
    def name(self) -> str:
        return self.path.stem

    def runs(self) -> list[RunSpec]:
        specs, used = [], set()
        row_bits = [set(_bit_pairs(row["bits"], self.path)) if "bits" in row else None for row in self.rows]
        row_seeds = [set(_int_list(row["seeds"], "seeds", self.path)) if "seeds" in row else None for row in self.rows]
        for (wbits, abits), (row, allowed, seeds), seed in itertools.product(
                self.bits, zip(self.rows, row_bits, row_seeds, strict=True), self.seeds):
            if allowed is not None and (wbits, abits) not in allowed or seeds is not None and seed not in seeds:
                continue
            for source, loss in itertools.product(_as_list(row["source"]), _as_list(row["loss"])):
                names = {"source": source, "loss": loss}
                flags = _flags(row.get("options", {}), names)
                own = {k: v for k, v in self.options.items() if k not in row.get("options", {})}  # the row's own wins
                mine = _applicable(own, flags, names, self.preset)
                used |= set(mine) | (set(self.options) & set(row.get("options", {})))
                common = ("--teacher", self.teacher, "--preset", self.preset, *_flags(mine, names))
                specs.append(RunSpec(run_name(source, loss, flags, wbits, abits, seed), source, loss,
                                     wbits, abits, seed, flags, common))
        twice = [name for name, n in Counter(s.name for s in specs).items() if n > 1]
        if twice:
            raise UserError(f"grid {self.path} lists the same run twice ({twice[0]})")
        unused = sorted(set(self.options) - used)
        if unused:
            raise UserError(f"grid {self.path}: option '{unused[0]}' applies to none of its runs (a zsq quantize "
                            f"flag without dashes, e.g. epochs or synth-images)")
        if self.only is None:
            return specs
        chosen = [s for s in specs if fnmatch.fnmatchcase(s.name, self.only)]
        if specs and not chosen:
            raise UserError(f"--only {self.only}: no run of grid {self.path} is named so (they are named like "
                            f"{specs[0].name})")
        return chosen


def run_name(source: str, loss: str, flags: tuple[str, ...], wbits: int, abits: int, seed: int) -> str:
    """source-loss[-flags]-wK[aL]-sN: readable, and stable so that a rerun finds its finished runs."""
    bits = f"w{wbits}" if wbits == abits else f"w{wbits}a{abits}"
    return f"{source}-{loss}{'-' + flag_tag(flags) if flags else ''}-{bits}-s{seed}"


def flag_tag(flags: tuple[str, ...]) -> str:
    return "".join(c if c.isalnum() else "-" for c in " ".join(flags)).strip("-")


def load_grid(path: str | Path, teacher: str | None = None, data_dir: str | None = None,
              bits: list[int] | None = None, seeds: list[int] | None = None,
              overrides: dict[str, Any] | None = None, only: str | None = None) -> Grid:
    """Read a grid file; the arguments override its values (e.g. a teacher checkpoint path, a subset of seeds) or
    keep the runs whose name matches the glob `only`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"grid file {path} is not valid TOML ({e})") from None
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"grid file {path}: unknown key(s) {', '.join(sorted(unknown))} (allowed: "
                        f"{', '.join(sorted(TOP_KEYS))})")
    teacher = teacher or raw.get("teacher")
    if not teacher:
        raise UserError(f"grid {path} names no teacher: give --teacher (a checkpoint path or shipped teacher)")
    if raw.get("dataset", "fashion-mnist") != "fashion-mnist" and not (data_dir or raw.get("data_dir")):
        raise UserError(f"grid {path} runs on {raw['dataset']}: give --data-dir (the folder holding it)")
    options = dict(raw.get("options", {}))
    for key in ("dataset", "data_dir"):
        if raw.get(key):
            options[key.replace("_", "-")] = raw[key]
    if data_dir:
        options["data-dir"] = data_dir
    options.update(overrides or {})
    rows = raw.get("rows") or []
    if not rows:
        raise UserError(f"grid {path} has no [[rows]] (each with a source and a loss, or method = \"ptq\")")
    rows = [_row(row, i, path) for i, row in enumerate(rows, 1)]
    file_seeds = set(_int_list(raw.get("seeds", [0]), "seeds", path))
    for i, row in enumerate(rows, 1):  # a row restricts the file's seeds (and `--seeds` restricts both)
        extra = set(_int_list(row["seeds"], "seeds", path)) - file_seeds if "seeds" in row else set()
        if extra:
            raise UserError(f"grid {path}, row {i}: seeds {sorted(extra)} are not among the grid's seeds")
    return Grid(path, str(teacher), str(raw.get("preset", "quick")),
                _bit_pairs(bits if bits is not None else raw.get("bits", [4]), path),
                _int_list(seeds if seeds is not None else raw.get("seeds", [0]), "seeds", path), rows, options, only)


def _row(row: Any, i: int, path: Path) -> dict[str, Any]:
    """A [[rows]] entry with its choices under their names now: `source`, and `loss` (PTQ for `method = "ptq"`)."""
    bad = UserError(f"grid {path}, row {i}: needs source and loss, or source and method = \"ptq\" (and optionally "
                    f"options, bits, seeds), got {row!r}")
    if not isinstance(row, dict) or set(row) - ROW_KEYS or {"source", "generator"} <= set(row):
        raise bad
    row = dict(row)
    if "generator" in row:
        deprecated("the grid key 'generator'", "'source'")
        row["source"] = row.pop("generator")
    if row.get("method", PTQ) != PTQ:
        if "loss" in row:
            raise bad
        deprecated("the grid key 'method' for a loss", "'loss'")
        row["loss"] = row.pop("method")
    ptq = row.pop("method", None) == PTQ
    if "source" not in row or ptq == ("loss" in row):
        raise bad
    row["loss"] = PTQ if ptq else [LOSSES.canonical(name) for name in _as_list(row["loss"])]
    return row


def _applicable(grid_wide: dict[str, Any], row_flags: tuple[str, ...], names: dict[str, str],
                preset: str) -> dict[str, Any]:
    """The grid-wide options that a run's choices (preset, row, grid-wide: its range setter, SynQ parts, ...) leave
    with an effect: the others are not passed, since zsq quantize refuses an option that does nothing."""
    from ..flags import PTQ_FLAGS, quantize_values  # the engine, loaded only when a grid is expanded
    from ..presets import preset_values
    from ..quant.ranges import RANGE_SETTERS
    from ..train import flat_fields, inapplicable, plugin_fields

    if names["loss"] == PTQ:
        return {k: v for k, v in grid_wide.items() if k.replace("-", "_") in PTQ_FLAGS}

    # the source's and the loss's options (ema-minmax has none), and every range setter's: which setter a run
    # uses may come from its row, the grid or its preset; `inapplicable` drops those it leaves without effect
    takes = {f.name for f in flat_fields()} | plugin_fields(names["source"], names["loss"], "ema-minmax") \
        | set(RANGE_SETTERS.all_options())
    known = {k: v for k, v in grid_wide.items() if k.replace("-", "_") in takes}
    given = quantize_values([*row_flags, *_flags(known, names), "--source", names["source"], "--loss",
                             names["loss"]])
    unused = inapplicable({**preset_values(preset, names["source"], names["loss"]), **given})
    return {k: v for k, v in known.items() if k.replace("-", "_") not in unused}


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _flags(options: dict[str, Any], names: dict[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            if "{" in text:
                text = text.format(**names, generator=names["source"], method=names["loss"])
            out += [flag, current_option(key.replace("-", "_"), text)]
    return tuple(out)


def _bit_pairs(values: Any, path: Path) -> list[tuple[int, int]]:
    pairs = []
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, int):
            pairs.append((v, v))
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(b, int) for b in v):
            pairs.append((v[0], v[1]))
        else:
            raise UserError(f"grid {path}: bits must be integers or [wbits, abits] pairs, got {v!r}")
    return pairs


def _int_list(values: Any, what: str, path: Path) -> list[int]:
    values = values if isinstance(values, list) else [values]
    if not values or not all(isinstance(v, int) for v in values):
        raise UserError(f"grid {path}: {what} must be a non-empty list of integers, got {values!r}")
    return values

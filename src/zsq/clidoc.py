"""docs/cli.md, the command-line reference, generated from the parsers (`zsq.cli.build_parser`) and the plug-in
registries, so that it cannot say what the code does not do: `python -m zsq.clidoc > docs/cli.md` writes it and
tests/test_docs.py fails when the two differ."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from . import __version__
from .cli import build_parser
from .data import list_datasets
from .distill import LOSSES
from .models import list_models, shipped_models
from .presets import PRESETS
from .quant.ranges import RANGE_SETTERS
from .registry import Registry
from .synth import SOURCES

HEADER = """# zsq command line (version {version})

Generated from zsq's own parsers and plug-in registries by `python -m zsq.clidoc > docs/cli.md`;
`tests/test_docs.py` fails when this page and the code disagree. `zsq COMMAND --help` prints the same per command.
Every command answers bad input with one line naming what to fix and exit code 2.
"""


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _commands(parser: argparse.ArgumentParser, prefix: str = "zsq") -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(command line, one-line help, parser) of every command, nested ones (`zsq teacher train`) included."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = _commands(sub, f"{prefix} {name}")
                out += nested or [(f"{prefix} {name}", helps.get(name, ""), sub)]
    return out


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " | ".join(str(c) for c in action.choices)
    return action.metavar or action.dest.upper()


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == argparse.SUPPRESS or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _flags_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| flag | value | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
        rows.append(f"| {flag} | {_cell(_value(action))} | {_default(action)} | {_cell(action.help or '')} |")
    return rows


def _plugins(title: str, flag: str, registry: Registry) -> list[str]:
    lines = [f"### {title} (`{flag}`)", "", "| name | what it is | its options |", "|---|---|---|"]
    for name in registry.names():
        doc = (registry.get(name).__doc__ or "").strip().split("\n\n")[0]
        cls = registry.options_class(name)
        opts = ", ".join(f"`--{f.name.replace('_', '-')}`" for f in dataclasses.fields(cls)) if cls else "–"
        lines.append(f"| `{name}` | {_cell(doc)} | {opts} |")
    renamed = registry.renamed()
    if renamed:
        lines += ["", "Former names, accepted in this release with a deprecation line: "
                  + ", ".join(f"`{old}` → `{new}`" for old, new in sorted(renamed.items())) + "."]
    return lines + [""]


def cli_reference() -> str:
    """The whole of docs/cli.md."""
    commands = _commands(build_parser())
    lines = [HEADER.format(version=__version__), "## Commands", "", "| command | what it does |", "|---|---|"]
    lines += [f"| [`{cmd}`](#{cmd.replace(' ', '-')}) | {_cell(help_)} |" for cmd, help_, _ in commands]
    for cmd, help_, parser in commands:
        lines += ["", f"## {cmd}", "", _cell(help_) + ("." if help_ and not help_.endswith(".") else "")]
        if parser.description:
            lines += ["", _cell(parser.description)]
        lines += ["", *_flags_table(parser)]
    lines += ["", "## Plug-ins and names", "",
              "A plug-in's options are flags of `zsq quantize` (and of `zsq ptq` for the offline sources); an option "
              "that the run's choices do not use is refused by name.", ""]
    lines += _plugins("Data sources", "--source", SOURCES)
    lines += _plugins("Transfer losses", "--loss", LOSSES)
    lines += _plugins("Activation range setters", "--act-range", RANGE_SETTERS)
    lines += ["### Architectures, shipped teachers, datasets, presets", "",
              f"- architectures (`--model`, `--teacher NAME --checkpoint FILE`): {', '.join(list_models())}",
              f"- shipped teachers: {', '.join(shipped_models())}",
              f"- datasets (`--dataset`): {', '.join(list_datasets())}",
              f"- presets (`--preset`): {', '.join(PRESETS)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(cli_reference(), end="")

"""The package reads bottom-up: every module imports only from its own layer's unit or a lower layer, including
imports inside functions, so there is no import circle and a lower layer never needs a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import zsq

# Lowest first. A unit is a top-level module or package of zsq; units of one layer do not import each other.
LAYERS = [
    {"errors"},
    {"io", "registry", "device", "dist", "presets", "provenance", "graph", "curvature"},
    {"data", "quant"},  # quant transforms any nn.Module: it needs no architecture
    {"models", "recon", "distill"},  # models: loading a student checkpoint rebuilds its quantizers
    {"synth", "rundir", "evaluate"},
    {"validate", "teacher", "export"},
    {"train"},
    {"posttrain"},
    {"flags"},  # the run commands' flags and their configs
    {"bench"},  # grids of run commands, their store and report
    {"analysis"},  # plots of finished runs
    {"cli"},
    {"clidoc", "__main__"},  # docs/cli.md, generated from the parsers
]
ROOT = Path(zsq.__file__).parent


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The zsq modules `path` imports, relative imports resolved."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1])  # of a module, or the package an __init__ is
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found |= ({".".join(base + [node.module])} if node.module
                      else {".".join(base + [a.name]) for a in node.names})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zsq"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("zsq")}
    return found


def test_every_import_goes_down_the_layers():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    units = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem != "__init__"}
    assert units == set(layer), f"place each unit in LAYERS: {sorted(units ^ set(layer))}"
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        me = _unit(".".join(rel.parts))
        if me == "__init__":
            continue  # the public API gathers from every layer
        for target in _imports(path):
            other = _unit(target)
            if other not in (me, "__init__", "__version__") and layer[other] >= layer[me]:
                upward.append(f"{rel}: imports {target} (layer {layer[other]} ≥ {layer[me]})")
    assert not upward, "\n".join(upward)

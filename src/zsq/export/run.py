"""`zsq export`: a trained run (or a student checkpoint) → a low-bit file, checked by a round trip, and its sizes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..evaluate import input_channels
from ..io import save_json
from ..models import dataset_info, load_model
from .packed import load_packed, quantized_layers, save_packed
from .report import size_report

FORMATS = ("packed",)


def _student(run: str | Path) -> torch.nn.Module:
    path = Path(run)
    path = path / "student.pt" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path} not found: name a run directory of zsq quantize or its student.pt")
    model = load_model(path)
    if not quantized_layers(model):
        raise UserError(f"{path} is a full-precision model: export takes a quantized student (zsq quantize)")
    return model


@torch.no_grad()
def roundtrip_error(model: torch.nn.Module, rebuilt: torch.nn.Module, n: int = 64, seed: int = 0) -> float:
    """Max |Δlogit| between the Q model and the model rebuilt from the export, on N(0,1) inputs of its geometry."""
    info = dataset_info(model)
    channels = info.in_channels if info else input_channels(model) or 3
    size = info.image_size if info else 32
    x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return float((model(x) - rebuilt(x)).abs().max())


def export_run(run: str | Path, fmt: str, out: str | Path, report: str | Path | None = None) -> dict[str, Any]:
    """Write the export and `report` (default OUT.json): sizes, per-layer bits and the round-trip error."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    model = _student(run).eval()
    out = save_packed(model, out)
    result = size_report(model, {fmt: out})
    result.update(format=fmt, out=str(out), source=str(run),
                  roundtrip_max_abs_logit_diff=roundtrip_error(model, load_packed(out)))
    save_json(result, report or Path(f"{out}.json"))
    return result

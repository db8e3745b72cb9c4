"""Spearman's rank correlation, the one number the health studies report: does a data-free signal order
Q models as their real accuracy does? Ties get the mean of their ranks (many collapsed models share a top-1
of 10.00), which a plain argsort of argsorts would break arbitrarily."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranks(x: Sequence[float]) -> np.ndarray:
    """0-based ranks, ties averaged."""
    a = np.asarray(x, dtype=float)
    r = np.empty(len(a))
    r[a.argsort(kind="stable")] = np.arange(len(a))
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """ρ between x and y; NaN for fewer than 3 pairs or a constant side, where no ordering is measured."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: {len(x)} x against {len(y)} y")
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])

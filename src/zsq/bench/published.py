"""Published top-1 (%) quoted from the papers, to print beside ours where the setting matches.

Keyed by (dataset, model, wbits, abits, source, loss) in zsq's names: a paper's "GDFQ" is data from the gdfq
generator trained with GDFQ's kd+ce loss, "GDFQ+AKT" the same data with the akt loss, "AdaDFQ" adadfq data with
its gap-entropy loss, SynQ the hast-style pixel set with the synq loss. Single runs,
no std, and selected on the test set by the papers; quoted, never ours.
"""
from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    top1: float
    source: str


AKT_T2 = "AKT Tab. 2"
AKT_T4 = "AKT Tab. 4"
SYNQ = "SynQ"

# Table 2 of AKT (arXiv 2412.19125): bits → (GDFQ, GDFQ+AKT, HAST, HAST+AKT, AdaDFQ, AdaDFQ+AKT).
_T2 = {
    "cifar10": {3: (72.23, 72.80, 84.11, 84.84, 84.89, 86.76), 4: (90.25, 90.33, 92.00, 92.25, 92.31, 92.64),
                5: (93.38, 93.36, 93.48, 93.57, 93.81, 93.83)},
    "cifar100": {3: (47.59, 49.06, 45.21, 46.80, 52.74, 54.68), 4: (63.39, 63.37, 64.40, 65.26, 66.81, 66.94),
                 5: (66.12, 67.46, 68.82, 68.91, 69.93, 69.75)},
}
_T2_RUNS = (("gdfq", "kd+ce"), ("gdfq", "akt"), ("hast", "hast"), ("hast", "akt"), ("adadfq", "gap-entropy"),
            ("adadfq", "akt"))
# Table 4 of AKT: AdaDFQ+AKT on CIFAR-10, one attention only (RFD with both is Table 2's AdaDFQ+AKT).
_T4 = {"akt-spatial": {3: 86.09, 4: 92.36, 5: 93.62}, "akt-channel": {3: 86.10, 4: 92.49, 5: 93.75}}
_SYNQ = {"cifar10": {3: 88.11, 4: 92.76}, "cifar100": {3: 57.28, 4: 67.34}}


def _table() -> dict[tuple[str, str, int, int, str, str], Published]:
    table = {}
    for dataset, by_bits in _T2.items():
        for bits, values in by_bits.items():
            for (source, loss), top1 in zip(_T2_RUNS, values, strict=True):
                table[(dataset, "resnet20", bits, bits, source, loss)] = Published(top1, AKT_T2)
    for loss, by_bits in _T4.items():
        for bits, top1 in by_bits.items():
            table[("cifar10", "resnet20", bits, bits, "adadfq", loss)] = Published(top1, AKT_T4)
    for dataset, by_bits in _SYNQ.items():
        for bits, top1 in by_bits.items():
            table[(dataset, "resnet20", bits, bits, "hast", "synq")] = Published(top1, SYNQ)
    return table


PUBLISHED = _table()


def published(dataset: str, model: str, wbits: int, abits: int, source: str, loss: str) -> Published | None:
    return PUBLISHED.get((dataset, model, wbits, abits, source, loss))

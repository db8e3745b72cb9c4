"""Analysis of finished runs: the rank correlation the health studies use, and the plots of `zsq analyze` in
`zsq.analysis.plots` (imported only by that command: matplotlib adds 0.4 s to every start-up otherwise). The report
over many runs is `zsq.bench.report`; the loss curvature that training can track is `zsq.curvature`."""
from .rank import spearman

__all__ = ["spearman"]

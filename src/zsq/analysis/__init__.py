"""Analysis of runs: curvature of the training loss, a report over many runs, and the rank correlation the
health studies use. The plots live in `zsq.analysis.plots`, imported only by `zsq analyze`: matplotlib adds
0.4 s to every start-up otherwise."""
from .curvature import hessian_trace
from .rank import spearman
from .report import group_runs, read_runs, write_report

__all__ = ["group_runs", "hessian_trace", "read_runs", "spearman", "write_report"]

"""Analysis of runs: curvature of the training loss, and a report over many runs. The plots live in
`zsq.analysis.plots`, imported only by `zsq analyze`: matplotlib adds 0.4 s to every start-up otherwise."""
from .curvature import hessian_trace
from .report import group_runs, read_runs, write_report

__all__ = ["group_runs", "hessian_trace", "read_runs", "write_report"]

"""Analysis of runs: curvature of the training loss, plots, and a report over many runs."""
from .curvature import hessian_trace
from .plots import analyze, plot_attention, plot_curves, plot_samples
from .report import group_runs, read_runs, write_report

__all__ = ["analyze", "group_runs", "hessian_trace", "plot_attention", "plot_curves", "plot_samples", "read_runs",
           "write_report"]

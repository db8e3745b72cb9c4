"""Analysis of runs: curvature of the training loss."""
from .curvature import hessian_trace

__all__ = ["hessian_trace"]

"""Benchmark grids: many `zsq quantize` runs from one grid file, their results in one SQLite store.

`zsq.bench.runner.run_grid` runs them and `zsq.bench.report` tables them (`zsq report`); neither is imported here,
so that reading a store or the published numbers does not load the training engine.
"""
from .grid import Grid, RunSpec, load_grid
from .published import PUBLISHED, Published, published
from .store import Store

__all__ = ["Grid", "PUBLISHED", "Published", "RunSpec", "Store", "load_grid", "published"]

"""Benchmark grids: many `zsq quantize` runs from one grid file, their results in one SQLite store.

`zsq.bench.runner.run_grid` runs them (it needs the training engine, so it is not imported here: the report
reads the store and the published numbers without loading it).
"""
from .grid import Grid, RunSpec, load_grid
from .published import PUBLISHED, Published, published
from .store import Store

__all__ = ["Grid", "PUBLISHED", "Published", "RunSpec", "Store", "load_grid", "published"]

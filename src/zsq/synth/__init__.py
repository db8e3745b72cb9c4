"""Synthetic data sources (a registry): online generators (gdfq, adadfq) and offline cached sets (hast, zeroq,
genie)."""
from . import adadfq, gdfq, genie, pixels  # noqa: F401  (registers the sources)
from .base import SOURCES, DataSource, SourceContext, create_source, list_sources
from .bns import BNStatistics
from .generator import ConditionalGenerator

__all__ = ["SOURCES", "BNStatistics", "ConditionalGenerator", "DataSource", "SourceContext", "create_source",
           "list_sources"]

"""zsq: zero-shot (data-free) quantization — synthesize inputs from a trained FP model, train a low-bit copy.

Importing the package registers every plug-in (models, datasets), so registries are complete before use.
"""
from . import data, models  # noqa: F401
from .data import list_datasets, load_dataset
from .evaluate import evaluate
from .models import create_model, list_models, load_model

__version__ = "0.1.0"
__all__ = ["create_model", "evaluate", "list_datasets", "list_models", "load_dataset", "load_model"]

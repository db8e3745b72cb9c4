"""Architectures (a registry, `create_model`) and `load_model` for checkpoints of any supported layout."""
from . import mobilenet, resnet  # noqa: F401  (registers the architectures)
from .checkpoint import (
           dataset_info,
           load_model,
           read_checkpoint,
           save_checkpoint,
           shipped_models,
)
from .registry import create_model, list_models, model_name, register_model
from .userdef import build_model_def

__all__ = ["build_model_def", "create_model", "dataset_info", "list_models", "load_model", "model_name",
           "read_checkpoint", "register_model", "save_checkpoint", "shipped_models"]

"""zsq: zero-shot (data-free) quantization — synthesize inputs from a trained FP model, then train a low-bit copy
(`quantize`) or reconstruct one block by block (`ptq`).

Importing the package registers every plug-in (models, datasets, data sources, transfer losses), so the
registries are complete before the CLI builds its choices.
"""
from . import data, distill, models, synth  # noqa: F401
from .data import list_datasets, load_dataset
from .evaluate import evaluate
from .models import create_model, list_models, load_model
from .provenance import VERSION as __version__
from .train import Result, TrainConfig, quantize
from .posttrain import PtqConfig, ptq
from . import export  # noqa: F401  (callable: zsq.export(qmodel, "model.onnx") is export.export_model)
from .validate import check_health as health

__all__ = ["__version__", "PtqConfig", "Result", "TrainConfig", "create_model", "evaluate", "export", "health",
           "list_datasets", "list_models", "load_dataset", "load_model", "ptq", "quantize"]

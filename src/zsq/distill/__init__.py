"""Transfer losses (a registry, chosen by `--method`), computed from both models' logits and features."""
from . import logits  # noqa: F401  (registers the losses)
from .base import (
    LOSSES,
    FeatureTap,
    TransferInputs,
    TransferLoss,
    create_loss,
    list_methods,
)
from .logits import kd_loss

__all__ = ["LOSSES", "FeatureTap", "TransferInputs", "TransferLoss", "create_loss", "kd_loss", "list_methods"]

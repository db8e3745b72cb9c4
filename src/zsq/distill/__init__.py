"""Transfer losses (a registry, chosen by `--method`), computed from both models' logits and features."""
from . import akt, logits  # noqa: F401  (register the losses)
from .base import (
    LOSSES,
    FeatureTap,
    TransferInputs,
    TransferLoss,
    create_loss,
    list_methods,
)
from .akt import channel_attention, find_stages, find_units, rfd_loss, spatial_attention
from .logits import kd_loss

__all__ = ["LOSSES", "FeatureTap", "TransferInputs", "TransferLoss", "channel_attention", "create_loss", "find_stages",
           "find_units", "kd_loss", "list_methods", "rfd_loss", "spatial_attention"]

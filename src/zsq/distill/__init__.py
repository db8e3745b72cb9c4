"""Transfer losses (a registry, chosen by `--method`), computed from both models' logits and features."""
from . import akt, hast, logits  # noqa: F401  (register the losses)
from .base import (
    LOSSES,
    FeatureTap,
    TransferInputs,
    TransferLoss,
    create_loss,
    list_methods,
)
from .akt import channel_attention, find_stages, find_units, rfd_loss, spatial_attention
from .hast import fa_loss, fgsm_promote, l2_channel_attention
from .logits import kd_loss

__all__ = ["LOSSES", "FeatureTap", "TransferInputs", "TransferLoss", "channel_attention", "create_loss", "fa_loss",
           "fgsm_promote", "find_stages", "find_units", "kd_loss", "l2_channel_attention", "list_methods", "rfd_loss",
           "spatial_attention"]

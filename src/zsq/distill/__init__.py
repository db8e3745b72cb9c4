"""Transfer losses (a registry, chosen by `--loss`), computed from both models' logits and features."""
from . import akt, hast, logits, synq  # noqa: F401  (register the losses)
from .base import (
    LOSSES,
    FeatureTap,
    TransferInputs,
    TransferLoss,
    create_loss,
    current_option,
    list_losses,
)
from .akt import channel_attention, find_stages, find_units, rfd_loss, spatial_attention
from .hast import fa_loss, fgsm_promote, l2_channel_attention
from .logits import kd_loss
from .synq import find_cam_layer, grad_cam, low_pass, lowpass_mask, selective_ce

__all__ = ["LOSSES", "FeatureTap", "TransferInputs", "TransferLoss", "channel_attention", "create_loss",
           "current_option", "fa_loss", "fgsm_promote", "find_cam_layer", "find_stages", "find_units", "grad_cam",
           "kd_loss", "l2_channel_attention", "list_losses", "low_pass", "lowpass_mask", "rfd_loss", "selective_ce",
           "spatial_attention"]

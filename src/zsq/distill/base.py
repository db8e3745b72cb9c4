"""Transfer losses: how the Q model learns from the FP teacher on a synthetic batch.

A loss receives everything a method of this lineage needs, in one `TransferInputs`: both models' logits, the
sampled labels, the batch, and the feature maps of the modules it asked for (`feature_layers`), collected by
forward hooks on both models. Feature-based methods (AKT, HAST, SynQ) therefore plug in without touching the loop.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..quant import output_module
from ..registry import Registry


@dataclass
class TransferInputs:
    t_logits: torch.Tensor  # detached, except from the maps in the loss's `teacher_grad_layers`
    q_logits: torch.Tensor
    labels: torch.Tensor
    x: torch.Tensor  # the (detached) batch both models saw
    t_feats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached
    q_feats: dict[str, torch.Tensor] = field(default_factory=dict)
    # On the FGSM-promoted copy of a batch: the clean batch's inputs (SynQ picks its selective-CE samples by the
    # teacher's confidence on the clean batch, synq.md §5); None on a clean batch.
    clean: TransferInputs | None = None


class TransferLoss(nn.Module):
    # Teacher maps the loss differentiates the teacher's logits by (Grad-CAM): in the Q step's teacher pass they
    # become leaves that require grad, so that backward runs through the teacher's tail only. Set by
    # `feature_layers`; t_feats then holds those leaves themselves and t_logits stays attached to them.
    teacher_grad_layers: tuple[str, ...] = ()

    def feature_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """Names of the modules whose outputs this loss reads (the same names in teacher and Q model); `example`
        is an input batch of the right geometry, for losses that find their maps by probing the model."""
        return []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The training batch as both models see it in a Q step (SynQ low-pass filters it); warm-up batches,
        which only calibrate activation ranges, are not prepared."""
        return x

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its logged terms; with --promote, its gradient in x is also the promotion's direction, and
        it is computed again on the promoted batch."""
        raise NotImplementedError

    def clean_only(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Terms defined on the clean batch only (SynQ's Grad-CAM alignment): added to the loss, but neither part
        of the promotion's direction nor computed on the promoted batch. None when the loss has none."""
        return None


LOSSES: Registry[Callable[[object], TransferLoss]] = Registry("loss")
LOSS_VALUED = ("akt_base",)  # options whose value names a loss


def list_losses() -> list[str]:
    return LOSSES.names()


def current_option(name: str, value: Any, quiet: bool = False) -> Any:
    """A plug-in option's value with a loss's former name translated, where the option names a loss."""
    return LOSSES.canonical(value, quiet) if name in LOSS_VALUED and value in LOSSES else value


def create_loss(name: str, options: dict | None = None) -> TransferLoss:
    name = LOSSES.canonical(name)
    return LOSSES.get(name)(LOSSES.build_options(name, options or {}))


class FeatureTap:
    """Forward hooks that keep the latest output of named modules (names as in `named_modules`; a block that the
    deployable placement dissolved into its children through the marker on its output: `output_module`).

    Inside `cutting()`, and with grad enabled, the modules named in `leaves` hand on a detached copy of their output
    that requires grad: the rest of the forward is recorded from there, and nothing before it."""

    def __init__(self, model: nn.Module, names: list[str], leaves: tuple[str, ...] = ()) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in [*names, *leaves] if n not in modules]
        if missing:
            raise ValueError(f"no module named {', '.join(missing)} in {type(model).__name__}")
        self.feats: dict[str, torch.Tensor] = {}
        self.leaves, self.cut, self.cut_now = set(leaves), False, set()
        self.handles = [modules[output_module(model, n) or n].register_forward_hook(self._hook(n))
                        for n in dict.fromkeys([*names, *leaves])]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.cut and name in self.leaves and torch.is_grad_enabled():
                output = output.detach().requires_grad_(True)
                self.cut_now.add(name)
            self.feats[name] = output
            return output

        return hook

    @contextmanager
    def cutting(self) -> Iterator[None]:
        self.cut = True
        try:
            yield
        finally:
            self.cut = False

    def take(self, detach: bool = False) -> dict[str, torch.Tensor]:
        """The maps of the last forward(s), forgotten here; `detach` keeps the leaves made by `cutting` as they are."""
        feats, cut, self.feats, self.cut_now = self.feats, self.cut_now, {}, set()
        return {k: v if k in cut or not detach else v.detach() for k, v in feats.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

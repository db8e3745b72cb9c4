"""Transfer losses: how the Q model learns from the FP teacher on a synthetic batch.

A loss receives everything a method of this lineage needs, in one `TransferInputs`: both models' logits, the
sampled labels, the batch, and the feature maps of the modules it asked for (`feature_layers`), collected by
forward hooks on both models. Feature-based methods (AKT, HAST, SynQ) therefore plug in without touching the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..registry import Registry


@dataclass
class TransferInputs:
    t_logits: torch.Tensor  # detached
    q_logits: torch.Tensor
    labels: torch.Tensor
    x: torch.Tensor  # the (detached) batch both models saw
    t_feats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached
    q_feats: dict[str, torch.Tensor] = field(default_factory=dict)


class TransferLoss(nn.Module):
    def feature_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """Names of the modules whose outputs this loss reads (the same names in teacher and Q model); `example`
        is an input batch of the right geometry, for losses that find their maps by probing the model."""
        return []

    def forward(self, inp: TransferInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


LOSSES: Registry[Callable[[object], TransferLoss]] = Registry("method")


def list_methods() -> list[str]:
    return LOSSES.names()


def create_loss(name: str, options: dict | None = None) -> TransferLoss:
    return LOSSES.get(name)(LOSSES.build_options(name, options or {}))


class FeatureTap:
    """Forward hooks that keep the latest output of named modules (names as in `named_modules`)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {', '.join(missing)} in {type(model).__name__}")
        self.feats: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.feats[name] = output

        return hook

    def take(self, detach: bool = False) -> dict[str, torch.Tensor]:
        feats, self.feats = self.feats, {}
        return {k: v.detach() for k, v in feats.items()} if detach else feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

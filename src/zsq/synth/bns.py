"""BatchNorm-statistics matching: the teacher's BN running statistics as the target for synthetic batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BNStatistics:
    """Forward hooks on every BatchNorm2d of the teacher that record the batch mean and biased variance of the
    BN *input*; `loss()` is the mean over layers of MSE(mean, running_mean) + MSE(var, running_var).

    Each hook overwrites its own slot, so teacher forwards outside synthesis (evaluation) cannot pile up memory.
    """

    def __init__(self, teacher: nn.Module) -> None:
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm2d layer: BN-statistics matching needs one")
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.counts = [0] * len(self.layers)  # values per channel behind each batch statistic (N·H·W)
        self.handles = [bn.register_forward_hook(self._hook(i)) for i, bn in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            self.stats[i] = (mean, var)
            self.counts[i] = x.numel() // x.shape[1]

        return hook

    def loss(self) -> torch.Tensor:
        if any(s is None for s in self.stats):
            raise RuntimeError("BN statistics are read before a teacher forward recorded them")
        terms = [F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var)
                 for (mean, var), bn in zip(self.stats, self.layers, strict=True)]
        self.stats = [None] * len(self.layers)
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

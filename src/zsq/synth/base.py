"""Data sources: where the Q model's training images come from.

An *online* source (GDFQ, AdaDFQ) is a generator trained alongside the Q model: the loop calls `sample`, runs
the teacher, then `generator_loss` and steps the generator. An *offline* source (HAST, ZeroQ-style sets) is built
once and cached; its `sample` draws from the stored images and `online` is False, so the loop skips the
generator step. Every source returns images in the teacher's normalised input space, with labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..dist import Dist
from ..registry import Registry


@dataclass
class SourceContext:
    """What a source may know about the task: the frozen teacher and the shape of its inputs."""

    teacher: nn.Module
    num_classes: int
    in_channels: int
    image_size: int
    device: str
    quiet: bool = False  # no progress bar for sources that do long work up front (offline synthesis)
    dist: Dist = field(default_factory=Dist)  # under torchrun: offline synthesis splits its batches across ranks


class DataSource(nn.Module):
    online: bool = True
    warmup_batch: int | None = None  # an offline source's batch for the warm-up generator (None: the run's batch)

    def sample(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample`, as a module call: what DistributedDataParallel wraps when the generator trains on ranks."""
        return self.sample(batch_size, rng)

    def generator_loss(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor,
                       qmodel: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's loss on its own batch (online sources only), after the teacher forward on `x`."""
        raise NotImplementedError

    def close(self) -> None:
        """Remove any hook the source put on the teacher."""

    def describe(self) -> dict[str, object]:
        """Facts about the source for result.json (e.g. which stored set an offline source used)."""
        return {}


SOURCES: Registry[Callable[[SourceContext, object], DataSource]] = Registry("data source")


def list_sources() -> list[str]:
    return SOURCES.names()


def create_source(name: str, ctx: SourceContext, options: dict | None = None) -> DataSource:
    factory = SOURCES.get(name)
    return factory(ctx, SOURCES.build_options(name, options or {})).to(ctx.device)

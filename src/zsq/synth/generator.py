"""The label-conditional generator of GDFQ/AdaDFQ (spec gdfq_adadfq.md §1), sized from the teacher's input."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .base import DataSource, SourceContext
from .bns import BNStatistics


def upsample_stages(image_size: int) -> int:
    """×2 stages after the 4×-smaller seed: 2 for 32×32 (as in the papers); larger inputs (224 → 7×7 seed) get
    more, so the seed stays near 8×8 instead of a 56×56 linear layer."""
    if image_size % 4:
        raise UserError(f"the generator needs an image size divisible by 4, got {image_size}")
    n = 2
    while image_size // 2**n > 8 and image_size % 2 ** (n + 1) == 0:
        n += 1
    return n


class ConditionalGenerator(nn.Module):
    """z ⊙ embed(y) → Linear → 128×s×s → BN → [up → conv → BN(eps 0.8) → LeakyReLU]×n → conv → tanh → BN(affine=False).

    The eps 0.8 BatchNorms are the lineage's (PyTorch-GAN's) quirk, kept because they shape the published
    results; the final non-affine BN standardises each channel, which is what the teacher's normalised input
    expects. The generator always normalises with batch statistics (as in train mode, which it never leaves), so
    its BatchNorms keep no running statistics: nothing reads them, and a bad batch would leave NaN in them.
    """

    def __init__(self, num_classes: int, out_channels: int, image_size: int, latent_dim: int = 100,
                 width: int = 128) -> None:
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        n = upsample_stages(image_size)
        self.init_size = image_size // 2**n
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width, track_running_stats=False)
        widths = [width] * (n - 1) + [width // 2]
        blocks, cin = [], width
        for w in widths:
            blocks.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, w, 3, 1, 1),
                                        nn.BatchNorm2d(w, eps=0.8, track_running_stats=False), nn.LeakyReLU(0.2)))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(nn.Conv2d(cin, out_channels, 3, 1, 1), nn.Tanh(),
                                 nn.BatchNorm2d(out_channels, affine=False, track_running_stats=False))
        self.width = width

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(z * self.embed(y)).view(len(z), self.width, self.init_size, self.init_size)
        return self.out(self.blocks(self.bn0(h)))

    def sample(self, batch_size: int, generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and their (uniformly drawn) labels; the draws come from `generator`, so runs replay exactly."""
        z = torch.randn(batch_size, self.latent_dim, generator=generator).to(device)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=generator).to(device)
        return self(z, y), y


@dataclass
class GeneratorOptions:
    latent_dim: int = field(default=100, metadata={"help": "generator latent size"})
    gen_width: int = field(default=128, metadata={"help": "generator channels (the papers: 128)"})


class GeneratorSource(DataSource):
    """An online source: a conditional generator trained alongside the Q model, with BN-statistics hooks on the
    teacher. Subclasses define `generator_loss`."""

    def __init__(self, ctx: SourceContext, opts: GeneratorOptions) -> None:
        super().__init__()
        self.generator = ConditionalGenerator(ctx.num_classes, ctx.in_channels, ctx.image_size, opts.latent_dim,
                                              opts.gen_width)
        self.bns = BNStatistics(ctx.teacher)
        self.device = ctx.device

    def sample(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator.sample(batch_size, rng, self.device)

    def close(self) -> None:
        self.bns.remove()

"""Genie-D (Jeon et al., CVPR 2023): images distilled from the teacher's BatchNorm statistics through a generator
whose input latents are learned too, one latent per image. Spec: ../shared/specs/ptq.md §2.

Each batch gets a fresh generator (kept in train mode) and fresh N(0, I) latents; both are optimised by Adam on
one loss, Σ over BN layers of the per-channel mean squared gaps in mean and standard deviation of the layer's
input, plus an image prior pulling each image's per-channel spatial mean to 0 and std to 1. The latents use
lr 0.1 with plateau decay, the generator lr 0.01 decayed ×0.95 every `generator_decay_every` steps: the values
the official code runs with (its two argument names are swapped, spec §6.1). During distillation every strided
convolution of the teacher sees its input shifted by a random ±1 pixel (swing convolution), so every pixel gets
gradient.
No class labels are used; the set's labels are the teacher's predictions on the final images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..dist import SINGLE, Dist
from ..errors import UserError
from .base import SOURCES, SourceContext
from .bns import BNStatistics
from .pixels import BUILDERS, OfflineSource, SetOptions

STD_EPS = 1e-6  # √(running var + ε), the code's target standard deviation


@dataclass
class GenieOptions(SetOptions):
    synth_images: int = field(default=1024, metadata={"help": "synthetic images to optimise (HAST: 5,120)"})
    synth_batch: int = field(default=128, metadata={"help": "images optimised together"})
    synth_iters: int = field(default=4000, metadata={"help": "Adam steps per synthesis batch"})
    synth_patience: int = field(default=100, metadata={"help": "plateau steps before the learning rate drops ×0.1"})
    latent_dim: int = field(default=256, metadata={"help": "genie: size of each image's learned latent"})
    latent_lr: float = field(default=0.1, metadata={"help": "genie: Adam learning rate on the latents"})
    generator_lr: float = field(default=0.01, metadata={"help": "genie: Adam learning rate on the generator"})
    generator_decay_every: int = field(default=100, metadata={
        "help": "genie: steps between the generator learning rate's ×0.95 decays"})
    swing: int = field(default=1, metadata={
        "help": "genie: random shift (pixels) before each strided conv while distilling (0: off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_dim < 1 or self.generator_decay_every < 1 or self.swing < 0:
            raise UserError("latent-dim and generator-decay-every must be ≥ 1, swing ≥ 0")
        if self.latent_lr <= 0 or self.generator_lr <= 0:
            raise UserError("latent-lr and generator-lr must be > 0")


class GenieGenerator(nn.Module):
    """Latent → image in the teacher's normalised space (spec §2.1), for square images of side `size`
    (a multiple of 4)."""

    def __init__(self, latent_dim: int, channels: int, size: int) -> None:
        super().__init__()
        if size % 4:
            raise UserError(f"the genie generator makes images whose side is a multiple of 4, not {size}")
        self.init = size // 4
        self.fc = nn.Linear(latent_dim, 128 * self.init**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(128), nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(64, channels, 3, padding=1),
            nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z).view(len(z), 128, self.init, self.init))


class Swing:
    """Forward pre-hooks on every strided Conv2d of a model: reflect-pad the input by `shift` pixels, then crop it
    back to its size at a random offset drawn once per forward (the batch shares it)."""

    def __init__(self, model: nn.Module, shift: int, generator: torch.Generator) -> None:
        self.shift, self.generator = shift, generator
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
        self.handles = [c.register_forward_pre_hook(self._hook) for c in convs] if shift else []

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, k = args[0], self.shift
        dy, dx = torch.randint(0, 2 * k + 1, (2,), generator=self.generator).tolist()
        h, w = x.shape[-2:]
        return (F.pad(x, (k, k, k, k), mode="reflect")[..., dy: dy + h, dx: dx + w], *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def genie_bns_loss(bns: BNStatistics) -> torch.Tensor:
    """Σ over BN layers of mean_c (μ̂ − μ)² + mean_c (σ̂ − √(v + ε))², with σ̂ the unbiased batch std."""
    if any(s is None for s in bns.stats):
        raise RuntimeError("BN statistics are read before a teacher forward recorded them")
    terms = []
    for (mean, var), n, bn in zip(bns.stats, bns.counts, bns.layers, strict=True):
        std = (var * n / max(n - 1, 1)).clamp_min(0).sqrt()
        terms.append(F.mse_loss(mean, bn.running_mean) + F.mse_loss(std, (bn.running_var + STD_EPS).sqrt()))
    bns.stats = [None] * len(bns.layers)
    return torch.stack(terms).sum()


def image_prior(x: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i ‖m_i‖² + ‖s_i − 1‖², m_i and s_i the spatial mean and std of each channel of image i."""
    flat = x.flatten(2)
    return (flat.mean(2).pow(2).sum(1) + (flat.std(2) - 1).pow(2).sum(1)).mean()


def distil(teacher: nn.Module, opts: GenieOptions, num_classes: int, shape: tuple[int, int, int], device: str,
           quiet: bool = False, d: Dist = SINGLE) -> dict[str, Any]:
    """Genie-D's set: `opts.synth_images` images, batch by batch; labels are the teacher's predictions. Under
    torchrun rank r distils batches r, r + N, ...; each batch's draws do not depend on N."""
    g = torch.Generator().manual_seed(opts.synth_seed)
    bns = BNStatistics(teacher)
    swing = Swing(teacher, opts.swing, torch.Generator().manual_seed(opts.synth_seed + 1))
    sizes = [min(opts.synth_batch, opts.synth_images - i) for i in range(0, opts.synth_images, opts.synth_batch)]
    mine = range(d.rank, len(sizes), d.world)
    done: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    bar = tqdm(total=len(mine) * opts.synth_iters, desc="genie", disable=quiet or not d.main, dynamic_ncols=True)
    try:
        for i, n in enumerate(sizes):
            seed = int(torch.randint(0, 2**31, (1,), generator=g))
            if i in mine:
                done[i] = _distil_batch(teacher, bns, opts, n, shape, seed, device, bar)
    finally:
        bar.close()
        swing.remove()
        bns.remove()
    parts = {i: batch for part in d.gather(done) for i, batch in part.items()}
    batches = [parts[i] for i in range(len(sizes))]
    return {"images": torch.cat([b[0] for b in batches]), "labels": torch.cat([b[1] for b in batches]),
            "final_loss": [b[2] for b in batches]}


def _distil_batch(teacher: nn.Module, bns: BNStatistics, opts: GenieOptions, n: int, shape: tuple[int, int, int],
                  seed: int, device: str, bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(seed)  # the generator's default initialisation
    gen = GenieGenerator(opts.latent_dim, shape[0], shape[1]).to(device).train()
    z = torch.randn(n, opts.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_()
    opt_z = torch.optim.Adam([z], lr=opts.latent_lr)
    opt_g = torch.optim.Adam(gen.parameters(), lr=opts.generator_lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt_z, factor=0.1, patience=opts.synth_patience,
                                                         min_lr=1e-4)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt_g, 0.95)
    for step in range(opts.synth_iters):
        x = gen(z)
        teacher(x)
        loss = genie_bns_loss(bns) + image_prior(x)
        value = loss.item()
        if not math.isfinite(value):
            raise UserError(f"the genie distillation loss went NaN/Inf at step {step} of a batch: lower --latent-lr "
                            f"(now {opts.latent_lr}) or --generator-lr (now {opts.generator_lr})")
        opt_z.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_z.step()
        opt_g.step()
        plateau.step(value)
        if (step + 1) % opts.generator_decay_every == 0:
            decay.step()
        bar.update()
    bar.set_postfix(loss=f"{value:.3g}")
    images = x.detach()
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    return images.cpu(), labels.cpu(), value


BUILDERS["genie"] = distil


@SOURCES.register("genie", options=GenieOptions)
def genie(ctx: SourceContext, opts: GenieOptions) -> OfflineSource:
    """Genie-D's offline set (Jeon et al. 2023): a generator and per-image latents distilled together against the
    teacher's BatchNorm statistics, made once and cached."""
    return OfflineSource(ctx, "genie", opts)

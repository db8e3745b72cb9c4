"""Curvature of a training loss: Hutchinson's estimate of the Hessian trace (AKT's Fig. 3 evidence).

tr(H) = E[vᵀHv] for Rademacher v (entries ±1); each vᵀHv costs one Hessian-vector product by double backprop
(Pearlmutter), so the trace of a Hessian far too large to form is estimated from a few dozen products.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn


def rademacher_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.device, p.dtype)


def hessian_trace(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batches: Iterable[Any],
                  n_samples: int = 64, seed: int = 0) -> tuple[float, float]:
    """(mean, standard error) of vᵀHv over `n_samples` Rademacher vectors, H the Hessian of `loss_fn(model, batch)`
    with respect to the model's trainable parameters; the samples are spread evenly over `batches` (fixed batches,
    so that estimates at different times of a run are comparable). The gradient graph of each batch is built
    once and reused for all its products."""
    params = [p for p in model.parameters() if p.requires_grad]
    batches = list(batches)
    if not params or not batches or n_samples < 1:
        raise ValueError("hessian_trace needs trainable parameters, at least one batch and n_samples ≥ 1")
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    for i, batch in enumerate(batches):
        count = n_samples // len(batches) + (i < n_samples % len(batches))
        if count == 0:
            continue
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
        for k in range(count):
            vs = [rademacher_like(p, gen) for p, _ in used]
            hvs = torch.autograd.grad([g for _, g in used], [p for p, _ in used], grad_outputs=vs,
                                      retain_graph=k + 1 < count, allow_unused=True)
            samples.append(sum(float((v * h).sum()) for v, h in zip(vs, hvs, strict=True) if h is not None))
    mean = sum(samples) / len(samples)
    var = sum((s - mean) ** 2 for s in samples) / max(len(samples) - 1, 1)
    return mean, math.sqrt(var / len(samples))

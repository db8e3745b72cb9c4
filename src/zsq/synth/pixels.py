"""Offline synthetic sets: pixels optimised once against the frozen teacher, cached, then sampled with augmentation.

`hast` (Li et al., CVPR 2023): BN-statistics matching + a hardness-weighted CE, β·mean((1−p_y)^γ·CE), so that
images the teacher finds hard weigh more; `zeroq` is the same optimisation with β = 0 (BN statistics only).
Each batch of images is a leaf tensor optimised by Adam with plateau decay (hast.md §1a). The set is keyed by
its synthesis options and a hash of the teacher's weights, so `zsq quantize` reuses a cached set only when both
match, and `zsq synth` writes the same file format for later use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import random_resized_crop
from ..dist import SINGLE, Dist
from ..errors import UserError
from ..io import exclusive, save_torch
from ..models import read_checkpoint
from .base import SOURCES, DataSource, SourceContext
from .bns import BNStatistics

FORMAT = "synthetic"


def hardness_ce(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean_i (1 − p_i)^γ · CE_i with p_i the softmax probability of the label; the weight is not detached, as in
    the HAST code, so the gradient also pushes through it."""
    logp = F.log_softmax(logits.float(), 1).gather(1, labels[:, None]).squeeze(1)
    return ((1 - logp.exp()).pow(gamma) * -logp).mean()


@dataclass
class SetOptions:
    """What every offline set has: its size, its batches, its seed, where a stored one is, and the warm-up batch
    a QAT run draws from the GDFQ generator beside it."""
    synth_images: int = field(default=5120, metadata={"help": "synthetic images to optimise (HAST: 5,120)"})
    synth_batch: int = field(default=256, metadata={"help": "images optimised together"})
    synth_iters: int = field(default=1000, metadata={"help": "Adam steps per synthesis batch"})
    synth_patience: int = field(default=50, metadata={"help": "plateau steps before the learning rate drops ×0.1"})
    synth_seed: int = field(default=0, metadata={"help": "seed of the synthesis (initial pixels and labels)"})
    synth_data: str | None = field(default=None, metadata={
        "help": "a set written by `zsq synth`; default: the cache (ZSQ_CACHE, else ~/.cache/zsq)"})
    warmup_batch: int | None = field(default=None, metadata={
        "help": "batch of the GDFQ generator whose images calibrate the ranges during the warm-up (HAST: 16, the "
                "paper preset's; default: --batch-size)"})

    def __post_init__(self) -> None:
        for name in ("synth_images", "synth_batch", "synth_iters", "synth_patience"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.warmup_batch is not None and self.warmup_batch < 1:
            raise UserError(f"warmup-batch must be ≥ 1, got {self.warmup_batch}")

    def recipe(self) -> dict[str, Any]:
        """The fields that determine the images (not where they are stored, nor how training draws from them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("synth_data", "warmup_batch")}

    def unused(self) -> dict[str, str]:
        """With --synth-data the set exists already: its recipe options have no effect."""
        return {name: "a set built by this run (not --synth-data)" for name in self.recipe()} if self.synth_data else {}


@dataclass
class PixelOptions(SetOptions):
    synth_lr: float = field(default=0.5, metadata={"help": "Adam learning rate on the pixels"})
    hard_weight: float = field(default=10.0, metadata={"help": "β of the hardness-weighted CE (0: BN statistics only)"})
    hard_gamma: float = field(default=2.0, metadata={"help": "γ of the hardness weight (1 − p_y)^γ"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synth_lr <= 0 or self.hard_weight < 0 or self.hard_gamma < 0:
            raise UserError("synth-lr must be > 0, hard-weight and hard-gamma ≥ 0")


@dataclass
class ZeroQOptions(PixelOptions):
    hard_weight: float = field(default=0.0, metadata={"help": "β of the hardness-weighted CE (0: BN statistics only)"})


def teacher_hash(model: nn.Module) -> str:
    """SHA-256 over the teacher's state_dict (names, shapes, dtypes, values): which teacher a set was made from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def synthesize(teacher: nn.Module, opts: PixelOptions, num_classes: int, shape: tuple[int, int, int], device: str,
               quiet: bool = False, d: Dist = SINGLE) -> dict[str, Any]:
    """Optimise `opts.synth_images` images batch by batch; returns images (float, the teacher's input space),
    labels and the final loss of each batch. Under torchrun rank r optimises batches r, r + N, ... and every
    rank gets the whole set; each batch starts from the same draws whatever N, so the set does not depend on it."""
    g = torch.Generator().manual_seed(opts.synth_seed)
    bns = BNStatistics(teacher)
    done: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    sizes = [min(opts.synth_batch, opts.synth_images - i) for i in range(0, opts.synth_images, opts.synth_batch)]
    mine = range(d.rank, len(sizes), d.world)
    bar = tqdm(total=len(mine) * opts.synth_iters, desc="synthesize", disable=quiet or not d.main,
               dynamic_ncols=True)
    try:
        for i, n in enumerate(sizes):
            x0 = torch.randn(n, *shape, generator=g)
            y = torch.randint(0, num_classes, (n,), generator=g)
            if i in mine:
                done[i] = _optimise(teacher, bns, x0.to(device), y.to(device), opts, bar)
    finally:
        bar.close()
        bns.remove()
    parts = {i: batch for part in d.gather(done) for i, batch in part.items()}
    batches = [parts[i] for i in range(len(sizes))]
    return {"images": torch.cat([b[0] for b in batches]), "labels": torch.cat([b[1] for b in batches]),
            "final_loss": [b[2] for b in batches]}


def _optimise(teacher: nn.Module, bns: BNStatistics, x: torch.Tensor, y: torch.Tensor, opts: PixelOptions,
              bar: tqdm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One batch of pixels optimised against the teacher; returns it on the CPU with its labels and final loss."""
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=opts.synth_lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=opts.synth_patience, min_lr=1e-4)
    for step in range(opts.synth_iters):
        logits = teacher(x)
        loss = bns.loss() + opts.hard_weight * hardness_ce(logits, y, opts.hard_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[x])
        value = loss.item()  # read for the plateau schedule anyway
        if not math.isfinite(value):  # the pixels themselves diverged: skipping steps would not bring them back
            raise UserError(f"the pixel synthesis loss went NaN/Inf at step {step} of a batch: lower --synth-lr "
                            f"(now {opts.synth_lr})")
        opt.step()
        plateau.step(value)
        bar.update()
    bar.set_postfix(loss=f"{loss.item():.3g}")
    return x.detach().cpu(), y.cpu(), loss.item()


def timed_build(build: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """A builder's set with the seconds it took (`build_s`), which the set keeps: a run that later reads it from
    the cache can say what building it cost."""
    t0 = time.perf_counter()
    data = build(*args)
    return {**data, "build_s": time.perf_counter() - t0}


def write_set(path: str | Path, data: dict[str, Any], source: str, opts: SetOptions, thash: str) -> Path:
    return save_torch({"zsq": FORMAT, "version": 1, "source": source, "recipe": json.dumps(opts.recipe()),
                       "teacher_sha256": thash, "images": data["images"], "labels": data["labels"],
                       "final_loss": torch.tensor(data["final_loss"]), "build_s": data["build_s"]}, path)


def read_set(path: str | Path) -> dict[str, Any]:
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("zsq") != FORMAT:
        raise UserError(f"{path} is not a synthetic set written by `zsq synth`")
    return obj


# Sets made by this code for the shipped teachers, shipped with them as read-only cache entries (the health
# check's probe of resnet20_fmnist), so a first run on a shipped teacher does not build them.
SHIPPED_CACHE = Path(__file__).resolve().parent.parent / "weights" / "synth"


def cache_path(source: str, opts: SetOptions, thash: str) -> Path:
    root = Path(os.environ.get("ZSQ_CACHE", Path.home() / ".cache" / "zsq")) / "synth"
    key = hashlib.sha256(json.dumps([source, opts.recipe(), thash], sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{source}-{key}.pt"


def load_or_build(source: str, ctx: SourceContext, opts: SetOptions, build: Callable[..., dict[str, Any]] | None = None
                  ) -> tuple[dict[str, Any], Path, bool]:
    """The set for this teacher and recipe: `synth_data` if given (it must match), else the cache, else built (by
    `build`, default the pixel optimisation) and cached. Returns (set, path, built). Under torchrun the main rank
    reads the cache and hands the set to the others, and only it writes one."""
    thash = teacher_hash(ctx.teacher)
    if opts.synth_data:
        data = read_set(opts.synth_data)
        if data["teacher_sha256"] != thash:
            raise UserError(f"{opts.synth_data} was synthesized from another teacher; run `zsq synth` for this one")
        return data, Path(opts.synth_data), False
    path = cache_path(source, opts, thash)
    # runs started together (a grid's jobs, often) wait for the one that builds this set, then read it
    waiting = "" if ctx.quiet else f"waiting for another run that builds {path}"
    with exclusive(path, waiting) if ctx.dist.main else contextlib.nullcontext():
        for where in (path, SHIPPED_CACHE / path.name):
            cached = ctx.dist.from_main(lambda where=where: _cached(where, thash, opts))
            if cached is not None:
                return cached, where, False
        shape = (ctx.in_channels, ctx.image_size, ctx.image_size)
        built = timed_build(build or synthesize, ctx.teacher, opts, ctx.num_classes, shape, ctx.device, ctx.quiet,
                            ctx.dist)
        if ctx.dist.main:
            write_set(path, built, source, opts, thash)
    return built, path, True


def _cached(path: Path, thash: str, opts: SetOptions) -> dict[str, Any] | None:
    if path.is_file():
        data = read_set(path)
        if data["teacher_sha256"] == thash and json.loads(data["recipe"]) == opts.recipe():
            return data
    return None


class OfflineSource(DataSource):
    """Draws batches from a stored set, with per-sample random-resized crop (scale 0.5–1) and flip (hast.md §3).
    The images are plain attributes, not buffers: a resume checkpoint does not copy them."""

    online = False

    def __init__(self, ctx: SourceContext, name: str, opts: SetOptions) -> None:
        super().__init__()
        self.warmup_batch = opts.warmup_batch
        data, self.path, self.built = load_or_build(name, ctx, opts, BUILDERS[name])
        self.build_s = data.get("build_s")  # None: a set written before zsq timed its builds
        self.images = data["images"].to(ctx.device)
        self.labels = data["labels"].to(ctx.device)
        if self.images.shape[1:] != (ctx.in_channels, ctx.image_size, ctx.image_size):
            raise UserError(f"{self.path} holds images of shape {tuple(self.images.shape[1:])}; the teacher takes "
                            f"{(ctx.in_channels, ctx.image_size, ctx.image_size)}")

    def describe(self) -> dict[str, object]:
        return {"synthetic_set": str(self.path), "synthetic_set_built": self.built, "synthetic_images": len(self.labels),
                "synthetic_set_build_s": self.build_s}

    def sample(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.images), (batch_size,), generator=rng).to(self.images.device)
        return random_resized_crop(self.images[idx], rng), self.labels[idx]


# How each offline source builds its set: (teacher, options, classes, shape, device, quiet, dist) -> set dict.
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {"hast": synthesize, "zeroq": synthesize}


@SOURCES.register("hast", options=PixelOptions)
def hast(ctx: SourceContext, opts: PixelOptions) -> OfflineSource:
    """HAST's offline set (Li et al. 2023): pixels optimised once for BatchNorm statistics + hardness-weighted CE,
    cached."""
    return OfflineSource(ctx, "hast", opts)


@SOURCES.register("zeroq", options=ZeroQOptions)
def zeroq(ctx: SourceContext, opts: ZeroQOptions) -> OfflineSource:
    """ZeroQ's offline set (Cai et al. 2020): pixels optimised for BatchNorm statistics alone (HAST's set with β = 0),
    cached."""
    return OfflineSource(ctx, "zeroq", opts)


def build_set(teacher: nn.Module, source: str, out: str | Path, num_classes: int, shape: tuple[int, int, int],
              device: str, options: dict[str, Any], quiet: bool = False, d: Dist = SINGLE) -> dict[str, Any]:
    """`zsq synth`: optimise a set for `teacher` with the source's options and write it to `out` (under
    torchrun: the ranks share the batches, the main rank writes)."""
    if source not in BUILDERS:
        raise UserError(f"zsq synth makes offline sets: choose --source {' or '.join(BUILDERS)}, not '{source}'")
    opts = SOURCES.build_options(source, options)
    if opts.synth_data:
        raise UserError("--synth-data names an existing set; zsq synth writes a new one to --out")
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = timed_build(BUILDERS[source], teacher.to(device).eval(), opts, num_classes, shape, device, quiet, d)
    if d.main:
        write_set(out, data, source, opts, teacher_hash(teacher))
    d.barrier()  # the set is on disk before any rank reports it
    return {"out": str(out), "source": source, "images": len(data["labels"]), "recipe": opts.recipe(),
            "final_loss": data["final_loss"]}

"""Trained iterations per second of zero-shot quantization on the ImageNet architectures users hold, at 3×224×224.

For each of ResNet-18, ResNet-50 and MobileNetV2 (width 1.0, random weights: speed does not depend on training),
`zsq.quantize` runs twice through the public API, with 1 and with 1 + N trained iterations (GDFQ generator, KD,
W4A4, no warm-up: BN-prior ranges); the difference of the two wall times over N is the cost of one iteration,
free of the fixed costs (model copies, probe set, evaluation, files). The baseline, timed in the same process on
the same batch, is one teacher forward + backward (to the weights), the pass any training of that model pays.
Prints one JSON object as its last line.
Usage: python benchmarks/arch_speed.py [--batch-size 8] [--iters 2] [--device cpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import zsq

ARCHS = {"resnet18": {}, "resnet50": {}, "mobilenet_v2": {"width_mult": 1.0}}


def _images(root: Path) -> Path:
    """Two classes of two 224×224 images: the evaluation set the run needs (speed does not depend on it)."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _run_seconds(model: torch.nn.Module, iters: int, batch: int, data: Path, out: Path, device: str,
                 threads: int) -> float:
    t0 = time.perf_counter()
    zsq.quantize(model, wbits=4, abits=4, source="gdfq", loss="kd", dataset="imagefolder", data_dir=str(data),
                 epochs=1, iters_per_epoch=iters, warmup_epochs=0, act_range="bn-prior", batch_size=batch,
                 eval_limit=4, probe_images=8, probe_iters=1, device=device, threads=threads, out=str(out),
                 quiet=True)
    return time.perf_counter() - t0


def _teacher_step_seconds(model: torch.nn.Module, batch: int, device: str, repeats: int = 3) -> float:
    model = model.to(device).train()
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=2, help="extra trained iterations of the longer run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = _images(Path(tmp) / "img")
        for arch, kw in ARCHS.items():
            torch.manual_seed(0)
            model = zsq.create_model(arch, num_classes=2, **kw).eval()
            short = _run_seconds(model, 1, a.batch_size, data, Path(tmp) / f"{arch}-1", a.device, a.threads)
            long = _run_seconds(model, 1 + a.iters, a.batch_size, data, Path(tmp) / f"{arch}-n", a.device, a.threads)
            per_iter = max(long - short, 1e-9) / a.iters
            teacher = _teacher_step_seconds(model, a.batch_size, a.device)
            results[arch] = {"iteration_s": round(per_iter, 3), "iterations_per_s": round(1 / per_iter, 4),
                             "images_per_s": round(a.batch_size / per_iter, 2),
                             "teacher_fwd_bwd_s": round(teacher, 3),
                             "ratio_to_teacher_step": round(per_iter / teacher, 2)}
            print(f"{arch}: {per_iter:.2f} s per iteration ({a.batch_size / per_iter:.1f} images/s), teacher forward + "
                  f"backward {teacher:.2f} s: ratio {per_iter / teacher:.1f}", flush=True)
    print(json.dumps({"benchmark": "arch_speed", "image_size": 224, "batch_size": a.batch_size, "device": a.device,
                      "threads": a.threads, "torch": str(torch.__version__), "source": "gdfq", "loss": "kd",
                      "results": results}))


if __name__ == "__main__":
    main()

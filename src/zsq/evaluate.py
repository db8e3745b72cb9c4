"""Top-1/top-5 accuracy on a real test set."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .data import ImageSet, batches, load_dataset, normalize
from .device import resolve_device
from .errors import UserError
from .models import dataset_info, load_model
from .quant import QuantConfig, calibrate, default_placement, gaussian_inputs, quantize_model


def eval_batch(device: str) -> int:
    """Images per forward when evaluating: 64 on a CPU, where a batch of 500 outgrows the caches (10,000
    Fashion-MNIST test images at 1 thread: ResNet-20 32.5 s against 19.2 s, MobileNetV2 32.7 s against 21.0 s, the
    same top-1), 500 on a GPU."""
    return 64 if torch.device(device).type == "cpu" else 500


@torch.no_grad()
def evaluate(model: nn.Module, ds: ImageSet, batch_size: int | None = None, device: str = "cpu",
             limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Accuracy in percent. Counts stay on the device until the end: one sync per evaluation."""
    batch_size = batch_size or eval_batch(device)
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    n = len(ds) if limit is None else min(limit, len(ds))
    k = min(5, ds.info.num_classes)
    for x, y in tqdm(batches(ds, batch_size, limit=limit), total=-(-n // batch_size), disable=not progress,
                     desc="eval", leave=False):
        x, y = normalize(x.to(device), ds.info), y.to(device)
        logits = model(x)
        if logits.shape[1] != ds.info.num_classes:
            raise UserError(f"model has {logits.shape[1]} outputs but {ds.info.name} has "
                            f"{ds.info.num_classes} classes")
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
    return {"top1": 100.0 * correct1.item() / n, "top5": 100.0 * correct5.item() / n, "n": n}


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first conv expects (None if it starts with something else)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    return first.in_channels if isinstance(first, nn.Conv2d) else None


def eval_set_for(model: nn.Module, dataset: str | None = None, data_dir: str | None = None) -> ImageSet:
    """The real test set to judge `model` on: `dataset`, else the one its checkpoint recorded (else
    Fashion-MNIST), normalised as the model was trained, with its input channels checked."""
    recorded = dataset_info(model)
    name = dataset or (recorded.name if recorded else "fashion-mnist")
    ds = load_dataset(name, "test", data_dir, image_size=recorded.image_size if recorded else None)
    if recorded is not None and recorded.name == ds.info.name:
        ds.info.mean, ds.info.std = recorded.mean, recorded.std
    expected = input_channels(model)
    if expected is not None and expected != ds.info.in_channels:
        raise UserError(f"model expects {expected}-channel images but {ds.info.name} has {ds.info.in_channels}")
    return ds


def run_eval(model: str, checkpoint: str | None = None, dataset: str | None = None, data_dir: str | None = None,
             wbits: int = 32, abits: int = 32, first_last: str = "same", batch_size: int | None = None,
             limit: int | None = None, device: str = "auto", calib_batches: int = 4, seed: int = 0,
             model_def: str | None = None, placement: str | None = None) -> dict:
    """Load a model, optionally fake-quantize it with Gaussian-noise activation ranges (the 'no training'
    baseline; activations placed by `placement`, else as `default_placement` says), and evaluate it on a real
    test set. Returns the JSON-ready result."""
    device = resolve_device(device)
    net = load_model(model, checkpoint=checkpoint, model_def=model_def)
    ds = eval_set_for(net, dataset, data_dir)
    quant = None
    net = net.to(device)
    trained = getattr(net, "zsq_quant", None)
    if trained is not None:
        if wbits != 32 or abits != 32 or placement is not None:
            raise UserError(f"{model} is already a W{trained['wbits']}A{trained['abits']} quantized model: "
                            f"drop --wbits/--abits/--placement")
        quant = {"wbits": trained["wbits"], "abits": trained["abits"], "first_last": trained["first_last"],
                 "placement": trained.get("placement", "lineage"),
                 "calibration": "trained student (ranges frozen in the checkpoint)"}
    elif wbits != 32 or abits != 32:
        qcfg = QuantConfig(wbits=wbits, abits=abits, first_last=first_last,
                           placement=placement or default_placement(net))
        net = quantize_model(net, cfg=qcfg)
        shape = (ds.info.in_channels, ds.info.image_size, ds.info.image_size)
        calibrate(net, gaussian_inputs(calib_batches, 256, shape, seed=seed, device=device))
        quant = {"wbits": wbits, "abits": abits, "first_last": first_last, "placement": qcfg.placement,
                 "calibration": f"{calib_batches}×256 Gaussian-noise images, no training"}
    elif placement is not None:
        raise UserError("--placement applies to a quantized evaluation: give --wbits/--abits too")
    acc = evaluate(net, ds, batch_size=batch_size, device=device, limit=limit, progress=True)
    return {"model": model, "checkpoint": checkpoint, "dataset": ds.info.name, "quant": quant, **acc}

"""zsq's own checkpoint format, and `load_model` for ours, bare state_dicts and third-party layouts.

A zsq checkpoint is a plain dict, loadable with `torch.load(weights_only=True)`:
    {"zsq": "model", "version": 1, "arch": "resnet20", "model_args": {...}, "state_dict": {...},
     "dataset": {name, num_classes, in_channels, image_size, mean, std, classes}, "metrics": {"top1": ...}}
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DatasetInfo
from ..errors import UserError
from ..io import save_torch
from ..quant import QuantConfig, quantize_model
from .layouts import match_layout
from .registry import MODELS, create_model
from .userdef import build_model_def

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def shipped_models() -> list[str]:
    """Teachers trained by `zsq teacher train` and shipped inside the package (e.g. resnet20_fmnist)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def save_checkpoint(model: nn.Module, path: str | Path, info: DatasetInfo | None = None,
                    metrics: dict[str, Any] | None = None, quant: dict[str, Any] | None = None) -> Path:
    """Save a registered architecture (FP, or fake-quantized with its `quant` config) in zsq's format.

    A model that is not a registered architecture (any user `nn.Module`) is saved with `arch=None`: its
    state_dict is all there is, with the `--model-def` that built it if one did (`load_model(..., model_def=)`).
    """
    arch = getattr(model, "zsq_arch", None)
    ckpt = {
        "zsq": "model",
        "version": FORMAT_VERSION,
        "arch": arch,
        "model_args": model.model_args() if arch is not None else None,
        "model_def": getattr(model, "zsq_model_def", None),  # FILE.py:FACTORY of a user's module, else None
        "quant": quant,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "dataset": asdict(info) if info is not None else None,
        "metrics": metrics or {},
    }
    return save_torch(ckpt, path)


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a plain pickle before refusing it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a weights-only PyTorch checkpoint (refused: loading it could run code)"
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        raise UserError(f"{path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state_dict (expected a dict of tensors, optionally under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def dataset_info(model: nn.Module) -> DatasetInfo | None:
    """The dataset a loaded model was trained on, when its checkpoint recorded it."""
    return getattr(model, "zsq_dataset", None)


def load_model(name_or_path: str | Path, checkpoint: str | Path | None = None, num_classes: int | None = None,
               in_channels: int | None = None, model_def: str | None = None) -> nn.Module:
    """A ready model in eval mode: FP, or fake-quantized when the checkpoint is a zsq student (`student.pt`).

    `name_or_path`: a shipped teacher (`resnet20_fmnist`), a registered architecture (`resnet20`, random
    weights unless `checkpoint` is given), or a checkpoint file. Checkpoints may be zsq's own format, a bare
    state_dict of a registered architecture, or a pytorchcv / option-A CIFAR ResNet state_dict; the
    architecture variant (depth, shortcut type, classes, channels) is read from the keys. `model_def`
    (`FILE.py:FACTORY`, zsq.models.userdef) builds a user's own module instead, and `name_or_path` (or
    `checkpoint`) holds its weights: a state_dict, or a zsq checkpoint of that module (FP or a student).
    """
    if model_def is not None:
        return _load_user_model(model_def, Path(checkpoint or name_or_path))
    name = str(name_or_path)
    if checkpoint is None and name in shipped_models():
        checkpoint, name = WEIGHTS_DIR / f"{name}.pt", None
    elif checkpoint is None and name not in MODELS:
        if not Path(name).exists() and not name.endswith((".pt", ".pth", ".pth.tar", ".ckpt", ".bin")):
            raise UserError(f"unknown model '{name}': not a shipped teacher ({', '.join(shipped_models())}), "
                            f"an architecture ({', '.join(MODELS.names())}) or an existing checkpoint file")
        checkpoint, name = name, None
    if checkpoint is None:
        model = create_model(name, num_classes=num_classes, in_channels=in_channels)
        return model.eval()
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("zsq") == "model":
        if obj["arch"] is None and obj.get("model_def"):
            raise UserError(f"{path} holds a model built by --model-def {obj['model_def']}: pass --model-def "
                            f"{obj['model_def']} (the Python API: model_def=...) to load it")
        if obj["arch"] is None:
            raise UserError(f"{path} holds the state_dict of a user's own module: pass --model-def FILE.py:FACTORY "
                            f"naming the code that builds that module (the Python API: model_def=...)")
        if name is not None and name != obj["arch"]:
            raise UserError(f"{path} holds a {obj['arch']}, not a {name}")
        return _from_zsq(create_model(obj["arch"], **obj["model_args"]), obj, path)
    state = _as_state_dict(obj, path)
    arch, args, state = match_layout(state, path)
    if name is not None and name != arch:
        raise UserError(f"{path} holds a {arch} (read from its keys), not a {name}")
    for key, want in (("num_classes", num_classes), ("in_channels", in_channels)):
        if want is not None and want != args[key]:
            raise UserError(f"{path} has {key}={args[key]}, but {want} was asked for")
    model = create_model(arch, **args)
    _load_strict(model, state, path)
    return model.eval()


def _load_user_model(spec: str, path: Path) -> nn.Module:
    model = build_model_def(spec)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and obj.get("zsq") == "model":
        if obj["arch"] is not None:
            raise UserError(f"{path} holds a registered {obj['arch']}: drop --model-def {spec}")
        return _from_zsq(model, obj, path)
    _load_strict(model, _as_state_dict(obj, path), path)
    return model.eval()


def _from_zsq(model: nn.Module, obj: dict[str, Any], path: Path) -> nn.Module:
    """`model` (FP, built for the checkpoint) with a zsq checkpoint's quantization, weights, dataset and metrics."""
    if obj.get("quant"):
        model = quantize_model(model, cfg=QuantConfig(**obj["quant"]))
    _load_strict(model, obj["state_dict"], path)
    if obj.get("dataset"):
        model.zsq_dataset = DatasetInfo(**obj["dataset"])
    model.zsq_metrics = obj.get("metrics", {})
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every tensor by name, refusing any mismatch, except what PyTorch itself accepts: a BatchNorm's
    `num_batches_tracked`, absent from checkpoints saved before PyTorch 0.4.1 (many published CIFAR ResNets)."""
    own = model.state_dict()
    older = {k for k in own if k.endswith(".num_batches_tracked") and k not in state}
    missing = [k for k in own if k not in state and k not in older]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise UserError(f"{path} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict({**state, **{k: own[k] for k in older}})

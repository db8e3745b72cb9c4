"""Recognise third-party ResNet state_dicts and rename them to zsq's (torchvision-style) parameter names.

Layouts recognised from their keys:
- pytorchcv (`features.init_block.conv.conv.weight`, `features.stage1.unit1.body.conv1.conv.weight`,
  `identity_conv` projection shortcuts, `output`): the ResNet-20 of GDFQ/AdaDFQ/HAST/AKT;
- "option A/B" CIFAR ResNets (`conv1`, `layer1..3`, `shortcut.0/1` when projected, `linear`): option A has
  parameter-free zero-padding shortcuts, so its downsampling blocks have no shortcut keys;
- torchvision / zsq names (`conv1`, `layerN.M`, `downsample.0/1`, `fc`).
The depth, widths, stem, shortcut type, classes and input channels are then read off the tensors.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError
from .registry import MODELS

_PYTORCHCV = [
    (re.compile(r"^features\.init_block\.conv\.conv\."), "conv1."),
    (re.compile(r"^features\.init_block\.conv\.bn\."), "bn1."),
    (re.compile(r"^features\.stage(\d+)\.unit(\d+)\.body\.conv(\d)\.conv\."),
     lambda m: f"layer{m[1]}.{int(m[2]) - 1}.conv{m[3]}."),
    (re.compile(r"^features\.stage(\d+)\.unit(\d+)\.body\.conv(\d)\.bn\."),
     lambda m: f"layer{m[1]}.{int(m[2]) - 1}.bn{m[3]}."),
    (re.compile(r"^features\.stage(\d+)\.unit(\d+)\.identity_conv\.conv\."),
     lambda m: f"layer{m[1]}.{int(m[2]) - 1}.downsample.0."),
    (re.compile(r"^features\.stage(\d+)\.unit(\d+)\.identity_conv\.bn\."),
     lambda m: f"layer{m[1]}.{int(m[2]) - 1}.downsample.1."),
    (re.compile(r"^output\."), "fc."),
]
_OPTION_AB = [
    (re.compile(r"^linear\."), "fc."),
    (re.compile(r"\.shortcut\.(\d)\."), lambda m: f".downsample.{m[1]}."),
]


def _rename(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("features.init_block.") for k in state):
        return "pytorchcv"
    if "linear.weight" in state:
        return "option-ab"
    return "torchvision"


def match_layout(state: dict[str, torch.Tensor], path: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(registered arch name, its constructor args, the state_dict under zsq's names)."""
    layout = detect_layout(state)
    if layout == "pytorchcv":
        state = _rename(state, _PYTORCHCV)
    elif layout == "option-ab":
        state = _rename(state, _OPTION_AB)
    for key in ("conv1.weight", "fc.weight"):
        if key not in state:
            raise UserError(f"{path}: unrecognised layout ({layout}): no '{key}' after renaming; "
                            f"first keys: {', '.join(list(state)[:5])}")
    units: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"^layer(\d+)\.(\d+)\.", key)
        if m:
            units.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(units)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise UserError(f"{path}: no residual stages layer1..N found in its keys ({layout} layout)")
    blocks = tuple(len(units[s]) for s in stages)
    try:
        widths = tuple(state[f"layer{s}.0.conv2.weight"].shape[0] for s in stages)
    except KeyError as e:
        raise UserError(f"{path}: missing {e.args[0]} ({layout} layout)") from None
    conv1 = state["conv1.weight"]
    stem = "imagenet" if conv1.shape[-1] == 7 else "cifar"
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    arch = _arch_for(blocks, widths, stem)
    if arch is None:
        raise UserError(f"{path}: a ResNet with blocks {blocks}, widths {widths}, {stem} stem matches no "
                        f"registered model ({', '.join(MODELS.names('resnet*'))})")
    args = {"num_classes": state["fc.weight"].shape[0], "in_channels": conv1.shape[1], "shortcut": shortcut}
    return arch, args, state


def _arch_for(blocks: tuple[int, ...], widths: tuple[int, ...], stem: str) -> str | None:
    if stem == "cifar" and len(blocks) == 3 and len(set(blocks)) == 1 and widths == (16, 32, 64):
        name = f"resnet{6 * blocks[0] + 2}"
        return name if name in MODELS else None
    if stem == "imagenet" and blocks == (2, 2, 2, 2) and widths == (64, 128, 256, 512):
        return "resnet18"
    return None

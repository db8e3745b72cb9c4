"""Recognise third-party state_dicts (ResNets, MobileNetV2) and rename them to zsq's (torchvision) parameter names.

Layouts recognised from their keys:
- pytorchcv ResNets (`features.init_block.conv.conv.weight`, `features.stage1.unit1.body.conv1.conv.weight`,
  `identity_conv` projection shortcuts, `output`): the ResNet-20 of GDFQ/AdaDFQ/HAST/AKT, `resnet18`, `resnet50`
  (pytorchcv's `resnet50` strides in the bottleneck's first 1×1 conv, ResNet v1: loaded with `stride_in_1x1`;
  its `resnet50b`, strided like torchvision, has the same keys and cannot be told apart from them);
- pytorchcv's MobileNetV2 (`features.init_block.conv.weight`, `features.stageI.unitJ.conv1/2/3`,
  `features.final_block`, a bias-free 1×1 conv `output`): `mobilenetv2_wN` has a 1×1 conv in its first unit
  (`expand_first`), `mobilenetv2b_wN` has not;
- "option A/B" CIFAR ResNets (`conv1`, `layer1..3`, `shortcut.0/1` when projected, `linear`): option A has
  parameter-free zero-padding shortcuts, so its downsampling blocks have no shortcut keys;
- torchvision / zsq names (`conv1`, `layerN.M`, `downsample.0/1`, `fc`; `conv3` marks a bottleneck ResNet);
- torchvision's MobileNetV2 (`features.0.0`, `features.N.conv.…`, `classifier.1`).
The depth, widths, block type, stem, shortcut type, classes and input channels are then read off the tensors.
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
    if "features.init_block.conv.weight" in state and "features.final_block.conv.weight" in state:
        return "pytorchcv-mobilenet"
    if any(k.startswith("features.init_block.") for k in state):
        return "pytorchcv"
    if "linear.weight" in state:
        return "option-ab"
    if "features.0.0.weight" in state and "classifier.1.weight" in state:
        return "torchvision-mobilenet"
    return "torchvision"


WIDTH_MULTS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # the widths MobileNetV2 is published at


def _pytorchcv_mobilenet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorchcv's MobileNetV2 under torchvision's names: units numbered through the stages, `conv1/2/3` as the
    `conv.N` of an inverted residual (one index fewer where a unit has no 1×1 expansion), the 1×1 conv classifier
    as `classifier.1` with a zero bias."""
    units = sorted({(int(m[1]), int(m[2])) for k in state
                    if (m := re.match(r"^features\.stage(\d+)\.unit(\d+)\.", k))})
    index = {f"features.stage{s}.unit{u}.": i + 1 for i, (s, u) in enumerate(units)}
    out = {}
    for key, value in state.items():
        new = key
        blocks = {"features.init_block.": "features.0.", "features.final_block.": f"features.{len(units) + 1}."}
        if block := next((b for b in blocks if key.startswith(b)), None):  # a conv + BN + ReLU6 block
            new = blocks[block] + key.removeprefix(block).replace("conv.", "0.", 1).replace("bn.", "1.", 1)
        elif m := re.match(r"^(features\.stage\d+\.unit\d+\.)conv(\d)\.(conv|bn)\.(.*)$", key):
            pos = int(m[2]) - (1 if m[1] + "conv1.conv.weight" in state else 2)  # place in the unit's `conv`
            bn = int(m[3] == "bn")
            new = (f"features.{index[m[1]]}.conv.{pos + bn}.{m[4]}" if m[2] == "3"  # the bare projection conv, BN
                   else f"features.{index[m[1]]}.conv.{pos}.{bn}.{m[4]}")  # a ConvBNReLU6
        elif key == "output.weight":
            new, value = "classifier.1.weight", value.flatten(1)
        out[new] = value
    if "classifier.1.weight" in out and "classifier.1.bias" not in out:
        out["classifier.1.bias"] = torch.zeros(out["classifier.1.weight"].shape[0])
    return out


def _mobilenet(state: dict[str, torch.Tensor], path: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """A torchvision MobileNetV2: the width multiplier is the one whose layer shapes all match (the strides are
    not in the weights: torchvision's are assumed)."""
    args = {"num_classes": state["classifier.1.weight"].shape[0], "in_channels": state["features.0.0.weight"].shape[1]}
    if "features.1.conv.3.weight" in state:  # the first unit has an expansion conv (pytorchcv)
        args["expand_first"] = True
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for width in WIDTH_MULTS:
        with torch.device("meta"):
            own = MODELS.get("mobilenet_v2")(width_mult=width, **args).state_dict()
        if {k: tuple(v.shape) for k, v in own.items() if not k.endswith("num_batches_tracked")} == {
                k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}:
            return "mobilenet_v2", {**args, "width_mult": width}, state
    raise UserError(f"{path}: a MobileNetV2 whose layer shapes match no width multiplier "
                    f"({', '.join(map(str, WIDTH_MULTS))}) of the registered mobilenet_v2 (channels rounded to "
                    f"multiples of 8, as torchvision's; pytorchcv's widths below 1 round differently)")


def match_layout(state: dict[str, torch.Tensor], path: Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(registered arch name, its constructor args, the state_dict under zsq's names)."""
    layout = detect_layout(state)
    if layout == "pytorchcv-mobilenet":
        state = _pytorchcv_mobilenet(state)
    if layout in ("torchvision-mobilenet", "pytorchcv-mobilenet"):
        return _mobilenet(state, path)
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
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    arch = _arch_for(blocks, widths, stem, block)
    if arch is None:
        raise UserError(f"{path}: a ResNet with {block} blocks {blocks}, widths {widths}, {stem} stem matches no "
                        f"registered model ({', '.join(MODELS.names('resnet*'))})")
    args = {"num_classes": state["fc.weight"].shape[0], "in_channels": conv1.shape[1], "shortcut": shortcut}
    if block == "bottleneck" and layout == "pytorchcv":
        args["stride_in_1x1"] = True
    return arch, args, state


IMAGENET_RESNETS = {((2, 2, 2, 2), "basic"): "resnet18", ((3, 4, 6, 3), "basic"): "resnet34",
                    ((3, 4, 6, 3), "bottleneck"): "resnet50"}


def _arch_for(blocks: tuple[int, ...], widths: tuple[int, ...], stem: str, block: str) -> str | None:
    if stem == "cifar" and block == "basic" and len(blocks) == 3 and len(set(blocks)) == 1 and widths == (16, 32, 64):
        name = f"resnet{6 * blocks[0] + 2}"
        return name if name in MODELS else None
    if stem == "imagenet" and widths == (64, 128, 256, 512):
        return IMAGENET_RESNETS.get((blocks, block))
    return None

"""ResNets for the ZSQ literature: CIFAR-style ResNet-20/32/44/56 and ImageNet-style ResNet-18/34/50.

Parameter names follow torchvision (`conv1`, `bn1`, `layerN.M.conv1`, `downsample.0/1`, `fc`; ResNet-50's
bottleneck adds `conv3`/`bn3` and puts the stride on its 3×3 conv, torchvision's "v1.5"; `stride_in_1x1` puts it
on the first 1×1 conv instead, as the original ResNet and pytorchcv's `resnet50` do), so a torchvision state_dict
loads as it is; the third-party CIFAR layouts are renamed in `zsq.models.layouts`. Every ReLU is its
own module, used once (torchvision shares one per block; parameter-free, so the names of the weights agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .registry import register_model


@dataclass
class ResNetConfig:
    blocks: tuple[int, ...]  # residual units per stage
    widths: tuple[int, ...]  # channels per stage
    num_classes: int = 10
    in_channels: int = 3
    stem: str = "cifar"  # "cifar": one 3×3 conv; "imagenet": 7×7 stride-2 conv + max-pool
    shortcut: str = "B"  # downsampling shortcut: "B" 1×1 conv + BN (pytorchcv, GDFQ), "A" zero-padding (option A)
    block: str = "basic"  # "basic": two 3×3 convs; "bottleneck": 1×1, 3×3, 1×1 with 4× wider output (ResNet-50)
    stride_in_1x1: bool = False  # bottleneck only: downsample in the 1×1 reduce conv (ResNet v1) not the 3×3 (v1.5)

    def __post_init__(self) -> None:
        self.blocks, self.widths = tuple(self.blocks), tuple(self.widths)
        if len(self.blocks) != len(self.widths):
            raise UserError(f"ResNet needs one width per stage, got blocks={self.blocks} widths={self.widths}")
        if self.stem not in ("cifar", "imagenet"):
            raise UserError(f"ResNet stem must be 'cifar' or 'imagenet', got '{self.stem}'")
        if self.shortcut not in ("A", "B"):
            raise UserError(f"ResNet shortcut must be 'A' or 'B', got '{self.shortcut}'")
        if self.block not in BLOCKS:
            raise UserError(f"ResNet block must be one of {', '.join(BLOCKS)}, got '{self.block}'")
        if self.block == "bottleneck" and self.shortcut != "B":
            raise UserError("a bottleneck ResNet needs projection shortcuts (shortcut 'B')")
        if self.stride_in_1x1 and self.block != "bottleneck":
            raise UserError("stride_in_1x1 applies to bottleneck ResNets only (resnet50)")
        if self.num_classes < 1 or self.in_channels < 1:
            raise UserError(f"num_classes and in_channels must be ≥ 1, got {self.num_classes}, {self.in_channels}")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, lo, self.extra - lo))


def _projection(cin: int, cout: int, stride: int, shortcut: str) -> nn.Module:
    """The shortcut of a block whose shape changes: option A pads, option B projects (1×1 conv + BN)."""
    if shortcut == "A":
        return PadShortcut(cout - cin)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _projection(cin, cout, stride, shortcut) if stride != 1 or cin != cout else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.downsample(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (with the stride), 1×1 expand to `expansion`× the width; torchvision's layout."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, shortcut: str, stride_in_1x1: bool = False) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, stride if stride_in_1x1 else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1 if stride_in_1x1 else stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _projection(cin, cout, stride, shortcut) if stride != 1 or cin != cout else nn.Identity()
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.relu3(self.bn3(self.conv3(out)) + self.downsample(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        if cfg.stem == "cifar":
            self.conv1 = nn.Conv2d(cfg.in_channels, w0, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(cfg.in_channels, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        cin, block = w0, BLOCKS[cfg.block]
        extra = {"stride_in_1x1": True} if cfg.stride_in_1x1 else {}
        for i, (n, w) in enumerate(zip(cfg.blocks, cfg.widths, strict=True)):
            units = []
            for j in range(n):
                units.append(block(cin, w, 2 if (i > 0 and j == 0) else 1, cfg.shortcut, **extra))
                cin = w * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init of each residual branch's last BN: every block starts as identity, which trains faster.
        for m in self.modules():
            if isinstance(m, tuple(BLOCKS.values())):
                nn.init.zeros_(m.last_bn().weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.cfg.blocks))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def model_args(self) -> dict:
        """The factory keywords that rebuild this model (depth, widths and block are implied by the arch name)."""
        c = self.cfg
        return {"num_classes": c.num_classes, "in_channels": c.in_channels, "shortcut": c.shortcut,
                **({"stride_in_1x1": True} if c.stride_in_1x1 else {})}


def _cifar_resnet(depth: int, **kwargs) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(ResNetConfig(blocks=(n, n, n), widths=(16, 32, 64), stem="cifar", **kwargs))


@register_model
def resnet8(**kwargs) -> ResNet:
    """One block per stage: the smallest of the family, for tests that train many short runs."""
    return _cifar_resnet(8, **kwargs)


@register_model
def resnet20(**kwargs) -> ResNet:
    return _cifar_resnet(20, **kwargs)


@register_model
def resnet32(**kwargs) -> ResNet:
    return _cifar_resnet(32, **kwargs)


@register_model
def resnet44(**kwargs) -> ResNet:
    return _cifar_resnet(44, **kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    return _cifar_resnet(56, **kwargs)


def _imagenet_resnet(blocks: tuple[int, ...], block: str, **kwargs) -> ResNet:
    kwargs.setdefault("num_classes", 1000)
    return ResNet(ResNetConfig(blocks=blocks, widths=(64, 128, 256, 512), stem="imagenet", block=block, **kwargs))


@register_model
def resnet18(**kwargs) -> ResNet:
    return _imagenet_resnet((2, 2, 2, 2), "basic", **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return _imagenet_resnet((3, 4, 6, 3), "basic", **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return _imagenet_resnet((3, 4, 6, 3), "bottleneck", **kwargs)

"""MobileNetV2 (Sandler et al., 2018) in torchvision's layout: the depthwise, ReLU6, linear-bottleneck network
that is the hard case of zero-shot quantization (SynQ's ImageNet W3A3: 34.21 against FP 73.03).

Parameter names are torchvision's (`features.0.0` stem conv, `features.N.conv.…` inverted residuals,
`features.18` last 1×1 conv, `classifier.1`), so its state_dicts load as they are; `width_mult` scales the
channels as torchvision does (rounded to multiples of 8). `stem_stride` 1 (torchvision: 2) suits small inputs: a
32×32 image then ends at 2×2 instead of 1×1, at about 4× the compute (a 1×32×32 step at width 0.5 costs about
twice ResNet-20's on the CPU). `expand_first` gives the first inverted residual (expansion 1) a 1×1 conv
anyway, as pytorchcv's `mobilenetv2_w1` has. Every ReLU6 is its own module, used once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .registry import register_model

# t (expansion), c (channels), n (blocks), s (stride of the first block): the paper's Table 2
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM, LAST = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of `divisor`, never 10 % below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand (t > 1), 3×3 depthwise with the stride, 1×1 linear projection; the input is added back when
    the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, expand_conv: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand_conv or expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


@dataclass
class MobileNetV2Config:
    num_classes: int = 1000
    in_channels: int = 3
    width_mult: float = 1.0
    stem_stride: int = 2
    dropout: float = 0.2
    expand_first: bool = False  # a 1×1 conv in the first unit too (pytorchcv's mobilenetv2_wN; torchvision: none)

    def __post_init__(self) -> None:
        if self.width_mult <= 0 or self.num_classes < 1 or self.in_channels < 1 or not 0 <= self.dropout < 1:
            raise UserError(f"MobileNetV2 needs width_mult > 0, num_classes and in_channels ≥ 1 and dropout in "
                            f"[0, 1), got {self.width_mult}, {self.num_classes}, {self.in_channels}, {self.dropout}")
        if self.stem_stride not in (1, 2):
            raise UserError(f"MobileNetV2 stem_stride must be 1 or 2, got {self.stem_stride}")


class MobileNetV2(nn.Module):
    def __init__(self, cfg: MobileNetV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        cin = make_divisible(STEM * cfg.width_mult)
        self.num_features = make_divisible(LAST * max(1.0, cfg.width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(cfg.in_channels, cin, 3, cfg.stem_stride)]
        for t, c, n, s in SETTING:
            cout = make_divisible(c * cfg.width_mult)
            for j in range(n):
                first = len(layers) == 1
                layers.append(InvertedResidual(cin, cout, s if j == 0 else 1, t, cfg.expand_first and first))
                cin = cout
        layers.append(ConvBNReLU6(cin, self.num_features, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.num_features, cfg.num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def model_args(self) -> dict:
        """The factory keywords that rebuild this model."""
        c = self.cfg
        return {"num_classes": c.num_classes, "in_channels": c.in_channels, "width_mult": c.width_mult,
                "stem_stride": c.stem_stride, **({"expand_first": True} if c.expand_first else {})}


@register_model
def mobilenet_v2(**kwargs) -> MobileNetV2:
    return MobileNetV2(MobileNetV2Config(**kwargs))

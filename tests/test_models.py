"""Architectures and `load_model` across zsq's format, bare state_dicts and third-party layouts."""
from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zsq.data import DatasetInfo
from zsq.errors import UserError
from zsq.models import create_model, list_models, load_model, save_checkpoint

from conftest import randomise_bn


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_runs(name):
    m = create_model(name, num_classes=7, in_channels=1).eval()
    size = 64 if name == "resnet18" else 32
    assert m(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_resnet20_parameter_count():
    # the standard ResNet-20 (projection shortcuts, 10 classes, RGB) has 0.27M parameters
    n = sum(p.numel() for p in create_model("resnet20").parameters())
    assert 269_000 < n < 275_000


# ------------------------------------------------------------------------------ option A (written independently)

class OptionABlock(nn.Module):
    """The widely used CIFAR ResNet of 'option A': identity shortcut, zero-padded on downsampling."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout // 4 if (stride != 1 or cin != cout) else None
        self.shortcut = nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class OptionAResNet(nn.Module):
    def __init__(self, n=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, layers = 16, []
        for i, w in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(OptionABlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.avg_pool2d(out, out.size()[3]).flatten(1))


def test_option_a_dataparallel_checkpoint_matches_reference(tmp_path):
    torch.manual_seed(0)
    ref = OptionAResNet().eval()
    randomise_bn(ref)
    wrapped = nn.DataParallel(ref)  # keys get the 'module.' prefix, as in checkpoints saved from DataParallel
    path = tmp_path / "resnet20_optionA.th"
    torch.save({"epoch": 200, "best_prec1": 91.7, "state_dict": wrapped.state_dict()}, path)
    model = load_model("resnet20", checkpoint=path)
    assert model.cfg.shortcut == "A"
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_from_before_pytorch_0_4_1_loads(tmp_path):
    """Saved before BatchNorm had `num_batches_tracked` (many published CIFAR checkpoints): PyTorch's own
    load_state_dict accepts it, and so must zsq; any other missing key is still refused."""
    torch.manual_seed(0)
    ref = OptionAResNet().eval()
    randomise_bn(ref)
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.th")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "old.th")(x), ref(x), rtol=1e-5, atol=1e-5)
    old.pop("layer1.0.bn1.running_var")
    torch.save(old, tmp_path / "broken.th")
    with pytest.raises(UserError, match="missing: layer1.0.bn1.running_var"):
        load_model(tmp_path / "broken.th")


# ------------------------------------------------------------------------------ pytorchcv layout

class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class CvUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(conv1=ConvBlock(cin, cout, 3, stride), conv2=ConvBlock(cout, cout, 3, 1, False)))
        self.resize = cin != cout or stride != 1
        if self.resize:
            self.identity_conv = ConvBlock(cin, cout, 1, stride, act=False)

    def forward(self, x):
        idt = self.identity_conv(x) if self.resize else x
        return F.relu(self.body(x) + idt)


class PytorchcvResNet20(nn.Module):
    """pytorchcv's resnet20_cifar10 module structure (the GDFQ lineage's teacher)."""

    def __init__(self, num_classes=100):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", nn.Sequential(OrderedDict(conv=ConvBlock(3, 16, 3, 1))))
        cin = 16
        for i, w in enumerate((16, 32, 64)):
            stage = nn.Sequential()
            for j in range(3):
                stage.add_module(f"unit{j + 1}", CvUnit(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_pool", nn.AvgPool2d(8))
        self.output = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.output(self.features(x).flatten(1))


def test_pytorchcv_layout_matches_reference(tmp_path):
    torch.manual_seed(0)
    ref = PytorchcvResNet20().eval()
    randomise_bn(ref)
    path = tmp_path / "resnet20_cifar100.pth"
    torch.save(ref.state_dict(), path)
    model = load_model(path)  # architecture read from the keys alone
    assert model.cfg.shortcut == "B" and model.cfg.num_classes == 100
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_zsq_checkpoint_roundtrip_and_bare_state_dict(tmp_path):
    torch.manual_seed(0)
    m = create_model("resnet32", num_classes=5, in_channels=1).eval()
    info = DatasetInfo("fashion-mnist", 5, 1, 32, (0.2,), (0.3,), ["a", "b", "c", "d", "e"])
    save_checkpoint(m, tmp_path / "m.pt", info, {"top1": 50.0})
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x), m(x))
    assert loaded.zsq_dataset.classes[0] == "a" and loaded.zsq_metrics["top1"] == 50.0
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    assert torch.equal(load_model("resnet32", checkpoint=tmp_path / "bare.pt")(x), m(x))
    with pytest.raises(UserError, match="holds a resnet32"):
        load_model("resnet20", checkpoint=tmp_path / "bare.pt")


def test_mismatched_layout_lists_keys(tmp_path):
    state = create_model("resnet20").state_dict()
    state.pop("layer1.0.bn1.weight")
    state["layer1.0.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        load_model("resnet20", checkpoint=tmp_path / "bad.pt")
    assert "missing: layer1.0.bn1.weight" in str(e.value) and "unexpected: layer1.0.extra.weight" in str(e.value)


def test_not_weights_and_corrupt_files(tmp_path):
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "obj.pt")  # a pickle that is not weights
    with pytest.raises(UserError) as e:
        load_model("resnet20", checkpoint=tmp_path / "obj.pt")
    # our words, never torch's hint to retry with weights_only=False (the unsafe way out)
    assert str(e.value) == f"{tmp_path / 'obj.pt'} is not a weights-only PyTorch checkpoint (refused: loading it " \
                           f"could run code)"
    with open(tmp_path / "plain.pkl", "wb") as f:  # a plain pickle: torch warns about its protocol first
        pickle.dump({"args": argparse.Namespace(lr=0.1)}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError, match="could run code"):
        warnings.simplefilter("always")
        load_model("resnet20", checkpoint=tmp_path / "plain.pkl")
    assert not caught
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt|weights-only"):
        load_model("resnet20", checkpoint=tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_model("resnet20", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(UserError, match="unknown model 'resnet99'"):
        load_model("resnet99")


# ------------------------------------------------------------------------------ torchvision layouts (written independently)

class TvBasic(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice."""

    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TvBottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3×3), one ReLU module called three times."""

    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TvResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, in_channels=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _divisible(v, d=8):
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class TvConvBNReLU6(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class TvInvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        hidden = cin * t
        self.res = stride == 1 and cin == cout
        layers = ([TvConvBNReLU6(cin, hidden, 1)] if t != 1 else []) + [
            TvConvBNReLU6(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class TvMobileNetV2(nn.Module):
    """The paper's Table 2 in torchvision's layout."""

    def __init__(self, num_classes=1000, width=1.0, in_channels=3):
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        feats = [TvConvBNReLU6(in_channels, cin, 3, 2)]
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):
            for j in range(n):
                feats.append(TvInvertedResidual(cin, _divisible(c * width), s if j == 0 else 1, t))
                cin = _divisible(c * width)
        feats.append(TvConvBNReLU6(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.mark.parametrize("name,make", [
    ("resnet34", lambda: TvResNet(TvBasic, (3, 4, 6, 3), 10)),
    ("resnet50", lambda: TvResNet(TvBottleneck, (3, 4, 6, 3), 10)),
    ("mobilenet_v2", lambda: TvMobileNetV2(10, width=0.5))])
def test_torchvision_layouts_match_an_independent_reference(name, make, tmp_path):
    torch.manual_seed(0)
    ref = make().eval()
    randomise_bn(ref)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model = load_model(tmp_path / "tv.pth")  # architecture and width read from the keys and shapes alone
    assert model.zsq_arch == name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ pytorchcv layouts (written independently)

class PcvConvBlock(nn.Module):
    """pytorchcv's conv block: `conv` (no bias), `bn`, an optional activation."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act: type | None = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class PcvBody(nn.Module):
    """ResBlock (two 3×3) or ResBottleneck with pytorchcv's default for resnet50: the stride on conv1."""

    def __init__(self, cin, cout, stride, bottleneck):
        super().__init__()
        if bottleneck:
            mid = cout // 4
            self.conv1 = PcvConvBlock(cin, mid, 1, stride)
            self.conv2 = PcvConvBlock(mid, mid, 3)
            self.conv3 = PcvConvBlock(mid, cout, 1, act=None)
        else:
            self.conv1 = PcvConvBlock(cin, cout, 3, stride)
            self.conv2 = PcvConvBlock(cout, cout, 3, act=None)

    def forward(self, x):
        return nn.Sequential(*self.children())(x)


class PcvResUnit(nn.Module):
    def __init__(self, cin, cout, stride, bottleneck):
        super().__init__()
        self.body = PcvBody(cin, cout, stride, bottleneck)
        self.identity_conv = PcvConvBlock(cin, cout, 1, stride, act=None) if cin != cout or stride != 1 else None

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.identity_conv is None else self.identity_conv(x)))


class PcvResNet(nn.Module):
    def __init__(self, layers, bottleneck, num_classes):
        super().__init__()
        self.features = nn.Sequential()
        init = nn.Module()
        init.conv = PcvConvBlock(3, 64, 7, 2)
        self.features.add_module("init_block", init)
        cin = 64
        for i, n in enumerate(layers):
            stage = nn.Sequential()
            cout = 64 * 2 ** i * (4 if bottleneck else 1)
            for j in range(n):
                stage.add_module(f"unit{j + 1}", PcvResUnit(cin, cout, 2 if i and not j else 1, bottleneck))
                cin = cout
            self.features.add_module(f"stage{i + 1}", stage)
        self.output = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.features.init_block.conv(x), 3, 2, 1)
        for name, stage in self.features.named_children():
            if name.startswith("stage"):
                x = stage(x)
        return self.output(torch.flatten(F.avg_pool2d(x, 7), 1))


class PcvLinearBottleneck(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        mid = cin * 6 if expansion else cin
        self.residual = cin == cout and stride == 1
        self.conv1 = PcvConvBlock(cin, mid, 1, act=nn.ReLU6)  # present even without expansion (mobilenetv2_w1)
        self.conv2 = PcvConvBlock(mid, mid, 3, stride, groups=mid, act=nn.ReLU6)
        self.conv3 = PcvConvBlock(mid, cout, 1, act=None)

    def forward(self, x):
        y = self.conv3(self.conv2(self.conv1(x)))
        return x + y if self.residual else y


class PcvMobileNetV2(nn.Module):
    """pytorchcv's mobilenetv2_w1: its stages group the units by downsampling (16 | 24×2 | 32×3 | 64×4, 96×3 |
    160×3, 320), a 7×7 average pool and a bias-free 1×1 conv classifier."""

    def __init__(self, num_classes):
        super().__init__()
        stages = [[16], [24] * 2, [32] * 3, [64] * 4 + [96] * 3, [160] * 3 + [320]]
        self.features = nn.Sequential()
        self.features.add_module("init_block", PcvConvBlock(3, 32, 3, 2, act=nn.ReLU6))
        cin = 32
        for i, widths in enumerate(stages):
            stage = nn.Sequential()
            for j, cout in enumerate(widths):
                stage.add_module(f"unit{j + 1}", PcvLinearBottleneck(cin, cout, 2 if i and not j else 1, i or j))
                cin = cout
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_block", PcvConvBlock(cin, 1280, 1, act=nn.ReLU6))
        self.features.add_module("final_pool", nn.AvgPool2d(7, 1))
        self.output = nn.Conv2d(1280, num_classes, 1, bias=False)

    def forward(self, x):
        return self.output(self.features(x)).flatten(1)


@pytest.mark.parametrize("name,make", [
    ("resnet18", lambda: PcvResNet((2, 2, 2, 2), False, 10)),
    ("resnet50", lambda: PcvResNet((3, 4, 6, 3), True, 10)),
    ("mobilenet_v2", lambda: PcvMobileNetV2(10))])
def test_pytorchcv_layouts_match_an_independent_reference(name, make, tmp_path):
    torch.manual_seed(0)
    ref = make().eval()
    randomise_bn(ref)
    torch.save(ref.state_dict(), tmp_path / "pcv.pth")
    assert any(k.startswith("features.stage1.unit1.") for k in ref.state_dict())
    model = load_model(tmp_path / "pcv.pth")
    assert model.zsq_arch == name
    x = torch.randn(1, 3, 224, 224)  # pytorchcv's fixed 7×7 final pool needs 224×224
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)

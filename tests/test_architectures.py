"""Every plug-in on the ImageNet architectures users hold: ResNet-18/34/50 (basic and bottleneck blocks) and
MobileNetV2 (depthwise convs, ReLU6, linear bottlenecks). A CIFAR ResNet runs the full source × loss product in
test_learning.py; here MobileNetV2 runs it too and ResNet-18, -34 and -50 (each at a quarter of its widths) every
loss, the sources taken in turn so that each architecture meets every source, each pair a built job's warm-up
iteration and two trained ones; ResNet-18 and MobileNetV2 also run `zsq.quantize` end to end (the run folder around
the loop is the same for every pair)."""
from __future__ import annotations

import resource

import onnxruntime as ort
import pytest
import torch
from torch import nn

import zsq
from zsq.distill import create_loss, find_cam_layer, find_stages, list_losses
from zsq.errors import UserError
from zsq.export.onnx_qdq import build_onnx
from zsq.models import create_model
from zsq.models.resnet import ResNet, ResNetConfig
from zsq.quant import QuantAct, act_quantizers, bn_bounds, calibrate, gaussian_inputs, quantize_model
from zsq.synth import SourceContext, create_source
from zsq.synth.pixels import BUILDERS
from zsq.train import build_job, resolve_config

from conftest import PROBE_KW, SMALL_GEN_KW, shipped_pairs, train_steps

ARCHS = {"resnet18": {}, "resnet34": {}, "resnet50": {}, "mobilenet_v2": {"width_mult": 0.25}}


def _model(arch: str, channels: int = 1, **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, num_classes=10, in_channels=channels, **{**ARCHS[arch], **kw}).eval()


def _options(source: str) -> dict:
    offline = {"synth_images": 8, "synth_batch": 8, "synth_iters": 2} if source in BUILDERS else SMALL_GEN_KW
    return dict(wbits=4, abits=4, dataset="fashion-mnist", epochs=3, iters_per_epoch=1, warmup_epochs=1, batch_size=4,
                eval_limit=8, **offline, **PROBE_KW)


def _check_ranges(qmodel: nn.Module) -> None:
    assert all(not q.observing and q.hi > q.lo for q in act_quantizers(qmodel))  # calibrated, then frozen


def _train(model: nn.Module, source: str, loss: str, fmnist_dir, out, **extra) -> None:
    cfg = resolve_config("quick", source, loss, teacher="module", data_dir=str(fmnist_dir), out=str(out),
                         **_options(source), **extra)
    job = build_job(cfg, teacher=model)
    try:
        # an untrained net's logits are ~1e-8: AdaDFQ's entropy band divides by log C − min H, which is then 0, and
        # the guard skips that generator step, as it would in a run; the Q model's steps must all count
        train_steps(job, warmup=1, trained=2, skippable=("generator",))
    finally:
        job.close()
    _check_ranges(job.qmodel)


def _run(model: nn.Module, source: str, loss: str, fmnist_dir, out) -> None:
    r = zsq.quantize(model, source=source, loss=loss, data_dir=str(fmnist_dir), out=str(out), quiet=True,
                     **_options(source))
    assert r.summary["iterations"] == 3 and r.summary["skipped_steps"] == 0 and 0 <= r.q_top1 <= 100
    _check_ranges(r.qmodel)


@pytest.mark.parametrize("source,loss", shipped_pairs())
def test_mobilenet_v2_with_every_source_and_loss(source, loss, fmnist_dir, tmp_path):
    _train(_model("mobilenet_v2"), source, loss, fmnist_dir, tmp_path / "r")


RESNETS = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet34": ((3, 4, 6, 3), "basic"),
           "resnet50": ((3, 4, 6, 3), "bottleneck")}


def _narrow(arch: str) -> nn.Module:
    """The registry's ResNet (its blocks, stages, shortcuts and torchvision's module names) at a quarter of its
    widths: the same structure for a loss to find at a fraction of the weights (ResNet-50: 1.5 M against 23.5 M),
    so that the 27 architecture × loss tests take under 1 s each at one thread."""
    torch.manual_seed(0)
    blocks, block = RESNETS[arch]
    cfg = ResNetConfig(blocks=blocks, widths=(16, 32, 64, 128), stem="imagenet", block=block, in_channels=1,
                       num_classes=10)
    return ResNet(cfg).eval()


@pytest.mark.parametrize("arch", RESNETS)
def test_the_narrow_resnets_are_the_registry_resnets_at_a_quarter_of_their_widths(arch):
    narrow, full = _narrow(arch).state_dict(), _model(arch).state_dict()
    assert narrow.keys() == full.keys()
    for k, v in full.items():  # every conv and BN a quarter as wide, the 10-way classifier reads a quarter
        assert narrow[k].shape == tuple(d // 4 if d >= 64 else d for d in v.shape), k


@pytest.mark.parametrize("loss", list_losses())
@pytest.mark.parametrize("arch", RESNETS)
def test_resnets_with_every_loss(arch, loss, fmnist_dir, tmp_path):
    sources = list(dict.fromkeys(s for s, _ in shipped_pairs()))
    source = sources[list_losses().index(loss) % len(sources)]  # every source on each architecture too
    # the registered architecture's placement, which a module built outside the registry does not get by default
    _train(_narrow(arch), source, loss, fmnist_dir, tmp_path / "r", placement="lineage")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_quantize_runs_end_to_end(arch, fmnist_dir, tmp_path):
    _run(_model(arch), "adadfq", "akt+synq", fmnist_dir, tmp_path / "r")


def test_feature_layers_are_the_architectures_own():
    r50, mb = _model("resnet50", 3), _model("mobilenet_v2", 3, width_mult=1.0)
    x = torch.zeros(2, 3, 224, 224)
    # the stages end where the next stage starts, never inside a block before its strided conv
    assert find_stages(r50, x) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert find_stages(mb, x) == ["features.1", "features.3", "features.6", "features.13", "features"]
    # Grad-CAM at the last 7×7 conv, never the classifier's map after pooling
    assert find_cam_layer(r50, x) == "layer4.2.conv3" and find_cam_layer(mb, x) == "features.18.0"
    units = create_loss("hast", {}).feature_layers(mb, x)
    assert units[0] == "features.3.conv.3" and len(units) == 10  # the 10 inverted residuals with a shortcut


def test_bn_prior_bounds_every_mobilenet_activation_through_relu6_and_depthwise():
    model = _model("mobilenet_v2", 1, width_mult=0.5)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # wide BN outputs: the ReLU6 cap must show in the bound
            m.weight.data = torch.rand(m.num_features, generator=g) * 3 + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g)
    q = quantize_model(model, 4, 4)
    bounds = bn_bounds(q, 3.0)
    assert set(bounds) == set(act_quantizers(q))  # every activation, the depthwise ones included
    depthwise = q.features[2].conv[1][2]
    assert isinstance(depthwise, QuantAct) and isinstance(depthwise.act, nn.ReLU6)
    bn = model.features[2].conv[1][1]
    assert bounds[depthwise.quant] == pytest.approx(min(6.0, float((bn.bias + 3 * bn.weight.abs()).max().detach())))
    assert max(bounds.values()) == 6.0


@pytest.mark.parametrize("source", ["gdfq", "adadfq"])
def test_generators_at_224(source):
    teacher = _model("mobilenet_v2", 3)
    src = create_source(source, SourceContext(teacher, 10, 3, 224, "cpu", True))
    x, y = src.sample(2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 224, 224) and y.shape == (2,) and torch.isfinite(x).all()


@pytest.mark.parametrize("arch,placement", [("resnet50", "lineage"), ("mobilenet_v2", "lineage"),
                                            ("resnet34", "deployable")])
def test_architectures_export_to_onnx_and_match_onnxruntime(arch, placement):
    model = _model(arch, 3)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # BN gains of a trained net: with γ ~ 1 a random ResNet-50 amplifies one code that
        if isinstance(m, nn.BatchNorm2d):  # the engines round apart at a tie (x/S = 8.5000019) into 16 % of its logits
            m.weight.data = (torch.rand(m.num_features, generator=g) + 0.5) * 0.3
            m.bias.data = torch.rand(m.num_features, generator=g) * 0.2  # and signal through every ReLU6
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    q = calibrate(quantize_model(model, 4, 4, placement=placement), gaussian_inputs(2, 8, (3, 64, 64))).eval()
    proto = build_onnx(q, 64, 3, (0.5,) * 3, (0.25,) * 3, {})
    ops = {n.op_type for n in proto.graph.node}
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q((x - 0.5) / 0.25)
    out = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert ref.std() > 0
    # Per image, the largest logit error relative to the logit range. Most images agree to float precision; an image
    # with an activation at a rounding tie, which the two engines' conv arithmetic puts on either side (which images
    # depend on the CPU and threads: two of ResNet-34's eight on an AVX-512 EPYC), gets one code a step apart, and
    # that step spreads through the deep random net to a few % of its logit range; a wrong graph misses on all.
    err = ((out - ref).abs().amax(1) / (ref.max() - ref.min())).sort().values
    assert float(err[5]) <= 1e-3 and float(err[-1]) <= 0.1, err
    assert int((out.argmax(1) == ref.argmax(1)).sum()) >= 7


def test_resnet50_at_224_runs_one_quantize_iteration(imagefolder_224, tmp_path):
    """The generator at a quarter of its width (32 channels): at 128 its convolutions at 224×224 (≈15 GFLOP per
    image) took 40 of the test's 63 s; full-width generators at 224 are test_generators_at_224's. The smallest
    health probe: 8 images × 2 steps through ResNet-50 at 224 took 14 of the remaining 34 s."""
    torch.manual_seed(0)
    teacher = create_model("resnet50", num_classes=2).eval()
    r = zsq.quantize(teacher, wbits=4, abits=4, source="gdfq", loss="kd", dataset="imagefolder",
                     data_dir=str(imagefolder_224), epochs=1, iters_per_epoch=1, warmup_epochs=0,
                     act_range="bn-prior", batch_size=8, gen_width=32, eval_limit=4, out=str(tmp_path / "r"), quiet=True,
                     probe_images=2, probe_iters=1)
    assert r.summary["iterations"] == 1 and r.summary["skipped_steps"] == 0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"ResNet-50 3×224×224 batch 8: peak resident memory of the test process {peak_gib:.2f} GiB")


@pytest.fixture
def imagefolder_224(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    return tmp_path / "img"


def test_a_loss_reading_whole_blocks_trains_under_the_deployable_placement(fmnist_dir, tmp_path):
    """The deployable placement turns the forward into a graph of leaf modules, so a block (an inverted residual:
    AKT's stages) is never called as a module; a hook on it never fired (a KeyError at the first trained step,
    found by a grid run). Its output is marked in the graph, and the loss reads it there."""
    r = zsq.quantize(_model("mobilenet_v2"), wbits=4, abits=4, source="gdfq", loss="akt", placement="deployable",
                     dataset="fashion-mnist", data_dir=str(fmnist_dir), epochs=2, iters_per_epoch=1, warmup_epochs=1,
                     batch_size=4, eval_limit=8, quiet=True, out=str(tmp_path / "stages"), **PROBE_KW)
    assert r.summary["iterations"] == 2 and r.summary["skipped_steps"] == 0
    stages = find_stages(_model("mobilenet_v2"), torch.zeros(2, 1, 32, 32))
    assert set(stages) <= set(r.qmodel.zsq_outputs) and not set(stages) & r.qmodel.zsq_called_modules

class _UnusedLast(nn.Module):
    """A block whose last operation is not what it returns: its output cannot be marked in the deployable graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.spare = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv(x))
        self.spare(x)
        return out


def test_a_block_whose_output_cannot_be_marked_is_refused_by_name(fmnist_dir, tmp_path):
    model = nn.Sequential(_UnusedLast(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    with pytest.raises(UserError, match=r"--loss akt reads the outputs of 0, which --placement deployable"):
        _train(model, "gdfq", "akt", fmnist_dir, tmp_path / "r", akt_layers="0", placement="deployable")

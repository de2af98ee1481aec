"""fusedres.convert: the converted model computes the original's function and keeps its state; the report says what."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from _convert_check import assert_same, check_converted_training_step, randomize_norms, step
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseBlock, _DenseLayer, _Transition
from torchvision.models.regnet import ResBottleneckBlock

import fusedres
from fusedres.convert.lone import VIA as LONE_VIA
from fusedres.convert import _CONVERTERS, ConvertContext, ConvertReport, register_converter
from fusedres.convert import torchvision as tv_convert
from fusedres.convert._core import register_default_converter
from fusedres.models import densenet as fr_densenet
from fusedres.models import resnet as fr
from fusedres.nn import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    DenseBlock,
    DenseLayer,
    DenseNormAct2d,
    DenseTransition,
    SyncBatchNormAct2d,
)


def _pairs_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 5, 1),
        nn.BatchNorm2d(5, momentum=None),
        nn.LeakyReLU(0.2),
        nn.Conv2d(5, 4, 1),
        nn.BatchNorm2d(4),  # not followed by an activation: stays
        nn.Flatten(2),
        nn.BatchNorm1d(4, affine=False),
        nn.ReLU(),
    )


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad((out * w).sum(), (x, *params))
    res = {"output": out.detach(), "input.grad": grads[0]}
    res.update({f"{n}.grad": g for n, g in zip(names, grads[1:], strict=True)})
    res.update({n: b.clone() for n, b in model.named_buffers()})
    return res


def _assert_same(got: dict, want: dict, rtol: float, atol: float) -> None:
    """Elementwise closeness with atol relative to the tensor's largest value: in resnet18 at 32x32, layer4's
    BatchNorms normalise 4 values per channel (batch 4, 1x1 maps), so a gradient element that is a small
    difference of large terms may differ in its last ~7 digits between two float64 summation orders."""
    assert got.keys() == want.keys()
    for k, w in want.items():
        scale = w.abs().max().item() if w.is_floating_point() and w.numel() else 1.0
        torch.testing.assert_close(got[k], w, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    "build, shape",
    [(lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 32, 32)), (_pairs_model, (4, 3, 6, 6))],
    ids=["tv_resnet18", "sequential_pairs"],
)
def test_convert_parity_train_steps_and_eval(build, shape, layout: str) -> None:
    torch.manual_seed(0)
    original = build().double()
    converted = fusedres.convert(original)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):  # outputs, grads and running stats agree after every step
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        _assert_same(_step(converted, x), _step(original, x), rtol=1e-9, atol=1e-11)
    original.eval()
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-9, atol=1e-11)


def test_convert_resnet18_float32_and_structure() -> None:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    converted, report = fusedres.convert(original, report=True)
    assert list(converted.state_dict()) == list(original.state_dict())
    assert isinstance(converted.layer1[0], fr.BasicBlock) and isinstance(converted.bn1, BatchNormAct2d)
    assert converted.layer2[0].downsample[1].activation == "identity"
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, BatchNormAct2d) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # float32, eval mode (train-mode parity is tested in float64 above)
        torch.testing.assert_close(converted.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-5)
    # A converted model loads into fusedres' own resnet18 and back into torchvision's.
    fr.ResNet(fr.BasicBlock, [2, 2, 2, 2], num_classes=10).load_state_dict(converted.state_dict(), strict=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(converted.state_dict(), strict=True)
    # report: 8 blocks, 20 BatchNorms (8 with the residual, 3 downsample, 1 stem pair), nothing left
    assert len(report.blocks) == 8 and all(kind == "BasicBlock" for _, kind in report.blocks)
    assert len(report.converted) == 20 and sum(c.residual for c in report.converted) == 8
    assert report.num_pairs == 1 and report.untouched == []
    assert "20 BatchNorms fused" in str(report)


def test_convert_bottleneck_models_report() -> None:
    with torch.device("meta"):
        model = torchvision.models.resnext50_32x4d()
    converted, report = fusedres.convert(model, inplace=True, report=True)
    assert converted is model
    assert len(report.blocks) == 16 and {k for _, k in report.blocks} == {"Bottleneck"}
    assert len(report.converted) == 53 and report.untouched == []


def test_sequential_pairs_report_and_identity_indices() -> None:
    model = _pairs_model()
    converted, report = fusedres.convert(model, report=True)
    assert list(converted.state_dict()) == list(model.state_dict())
    assert isinstance(converted[1], BatchNormAct2d) and isinstance(converted[2], nn.Identity)
    assert converted[4].activation == "leaky_relu" and converted[4].negative_slope == 0.2
    assert converted[4].momentum is None
    assert isinstance(converted[9], BatchNormAct1d) and not converted[9].affine
    # 7 has no activation after it: a BatchNorm alone, fused with the identity activation by the last pass
    assert type(converted[7]) is BatchNormAct2d and converted[7].activation == "identity"
    assert [(c.name, c.activation) for c in report.converted] == [
        ("1", "relu"),
        ("4", "leaky_relu"),
        ("7", "identity"),
        ("9", "relu"),
    ]
    assert [c.via for c in report.converted if c.name == "7"] == [LONE_VIA]
    assert report.untouched == [] and report.num_pairs == 3
    bn3d = fusedres.convert(nn.Sequential(nn.BatchNorm3d(3), nn.ReLU()))
    assert isinstance(bn3d[0], BatchNormAct3d)


def test_hooks_and_subclasses_are_left_alone() -> None:
    class MyBN(nn.BatchNorm2d):
        pass

    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(hooked, nn.ReLU(), MyBN(3), nn.ReLU())
    converted, report = fusedres.convert(model, report=True)
    assert type(converted[0]) is nn.BatchNorm2d and type(converted[1]) is nn.ReLU and type(converted[2]) is MyBN
    reasons = {u.name: u.reason for u in report.untouched}
    assert "hooks" in reasons["0"] and "MyBN is not exactly" in reasons["2"]
    block = torchvision.models.resnet18().layer1[0]
    block.bn1.register_forward_pre_hook(lambda m, i: None)
    converted_block, report = fusedres.convert(block, report=True)
    assert type(converted_block) is type(block) and report.blocks == []
    assert all("cannot be fused" in u.reason for u in report.untouched)


def test_preserves_mode_dtype_requires_grad_and_parameters() -> None:
    model = torchvision.models.resnet18(num_classes=4).double().eval()
    model.layer2.train()
    model.conv1.weight.requires_grad_(False)
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.layer1[0].bn1.num_batches_tracked.fill_(7)
    copy_mode = {n: m.training for n, m in model.named_modules() if not isinstance(m, nn.ReLU)}
    converted = fusedres.convert(model)
    # inplace=False: the original is unchanged and shares nothing with the result.
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert all(p is not q for p, q in zip(model.parameters(), converted.parameters(), strict=True))
    for n, m in converted.named_modules():
        if n in copy_mode:
            assert m.training == copy_mode[n], n
    assert all(p.dtype == torch.float64 for p in converted.parameters())
    assert not converted.conv1.weight.requires_grad and not converted.layer1[0].bn1.weight.requires_grad
    assert int(converted.layer1[0].bn1.num_batches_tracked) == 7
    for (k, a), (k2, b) in zip(converted.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_inplace_keeps_parameter_objects_for_an_existing_optimizer() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).double()
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = fusedres.convert(model, inplace=True)
    assert out is model and isinstance(model.layer1[0], fr.BasicBlock)
    assert all(p is q for p, q in zip(params, model.parameters(), strict=True))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")


def test_root_block_is_replaced_and_errors() -> None:
    block = torchvision.models.resnet.Bottleneck(16, 4)
    converted = fusedres.convert(block, inplace=True)
    assert isinstance(converted, fr.Bottleneck) and converted is not block
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fusedres.convert("resnet18")
    with pytest.raises(TypeError, match="module_type must be an nn.Module subclass"):
        register_converter(int)


def test_converter_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(x))

    def convert_custom(module: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        module.bn = ctx.fuse(module.bn, f"{name}.bn", "relu", residual=False, via="Custom")
        module.forward = module.bn.forward
        return module

    monkeypatch.setitem(_CONVERTERS, Custom, convert_custom)
    converted, report = fusedres.convert(nn.Sequential(Custom()), report=True)
    assert isinstance(converted[0].bn, BatchNormAct2d) and report.converted[0].via == "Custom"
    ctx = ConvertContext(ConvertReport())
    assert isinstance(
        ctx.fuse(nn.BatchNorm2d(2), "n", "relu", residual=False, via="t", cls=DenseNormAct2d), DenseNormAct2d
    )
    with pytest.raises(TypeError, match="cls must be a fusedres BatchNormAct subclass of BatchNorm2d"):
        ctx.fuse(nn.BatchNorm2d(2), "n", "relu", residual=False, via="t", cls=BatchNormAct1d)


# --------------------------------------------------------------------------------------------------------------
# torchvision DenseNets


def _tv_small_densenet(memory_efficient: bool = False) -> nn.Module:
    """torchvision's DenseNet class at a test size (stem, 2 blocks of 2 layers, a transition, norm5), in float64,
    with non-trivial BatchNorm parameters and running statistics (torchvision initialises them to 1, 0, 0, 1)."""
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=8,
        block_config=(2, 2),
        num_init_features=16,
        bn_size=2,
        num_classes=5,
        memory_efficient=memory_efficient,
    ).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _assert_parity(converted: nn.Module, original: nn.Module, steps: int = 2) -> None:
    """Train-mode steps (outputs, gradients, buffers after each), then eval outputs, at (2, 3, 32, 32) in float64."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
        _assert_same(_step(converted, x), _step(original, x), rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), original.eval()(x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_convert_densenet_parity_train_steps_and_eval(memory_efficient: bool, layout: str) -> None:
    """Outputs, input and parameter gradients and running statistics after each step, then eval outputs.

    torchvision's memory_efficient=True recomputes norm1 in backward (torch.utils.checkpoint) and so updates its
    running statistics twice per step; the converted layer recomputes too, without touching them. It is compared
    with the same model with checkpointing off (the function both compute), and with the original except norm1's
    buffers.
    """
    original = _tv_small_densenet(memory_efficient)
    once = copy.deepcopy(original)
    for m in once.modules():
        if isinstance(m, _DenseLayer):
            m.memory_efficient = False
    converted = fusedres.convert(original)
    assert type(converted) is fr_densenet.DenseNet
    assert converted.features.denseblock1.denselayer1.memory_efficient == memory_efficient
    gen = torch.Generator().manual_seed(2)
    steps = 3
    for _ in range(steps):
        x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        got = _step(converted, x)
        _assert_same(got, _step(once, x), rtol=1e-9, atol=1e-11)
        if memory_efficient:
            want = _step(original, x)
            keep = [k for k in want if ".norm1.running_" not in k and ".norm1.num_batches" not in k]
            _assert_same({k: got[k] for k in keep}, {k: want[k] for k in keep}, rtol=1e-9, atol=1e-11)
    layer = "features.denseblock2.denselayer2.norm1.num_batches_tracked"
    assert int(converted.state_dict()[layer]) == steps
    if memory_efficient:
        assert int(original.state_dict()[layer]) == 2 * steps  # pytorch issue 96136
    for m in (converted, once):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), once(x), rtol=1e-9, atol=1e-11)


def test_convert_densenet121_report_and_state_dict() -> None:
    torch.manual_seed(0)
    original = torchvision.models.densenet121(num_classes=10)
    converted, report = fusedres.convert(original, report=True)
    assert type(converted) is fr_densenet.DenseNet and not converted.memory_efficient
    features = converted.features
    assert isinstance(features.denseblock4, DenseBlock) and isinstance(features.denseblock4.denselayer16, DenseLayer)
    assert isinstance(features.transition3, DenseTransition) and isinstance(features.transition3.norm, DenseNormAct2d)
    assert isinstance(features.norm5, DenseNormAct2d) and features.norm5.activation == "relu"
    assert isinstance(features.norm0, BatchNormAct2d) and isinstance(features.relu0, nn.Identity)
    assert features.denseblock1.denselayer1.conv1 is not original.features.denseblock1.denselayer1.conv1  # a copy
    # report: 58 dense layers (2 BatchNorms each), 3 transitions, norm0 (a Sequential pair), norm5; nothing left
    kinds = [kind for _, kind in report.blocks]
    assert [kinds.count(k) for k in ("_DenseLayer", "_DenseBlock", "_Transition", "DenseNet")] == [58, 4, 3, 1]
    assert len(report.converted) == 121 and report.num_pairs == 1 and report.untouched == []
    bn_names = [n for n, m in original.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.name for c in report.converted] == bn_names  # module order
    assert all(c.activation == "relu" and not c.residual for c in report.converted)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert "121 BatchNorms fused" in str(report) and "58 _DenseLayer" in str(report)
    # Same state_dict (keys, order, values), loadable strictly both ways.
    for (k, a), (k2, b) in zip(converted.state_dict().items(), original.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    for target in (torchvision.models.densenet121(num_classes=10), fr_densenet.densenet121(num_classes=10)):
        target.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # float32, eval mode (train-mode parity is tested in float64 on a small DenseNet)
        torch.testing.assert_close(converted.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-5)


def test_densenet_parts_that_cannot_fuse_are_left_and_reported() -> None:
    original = _tv_small_densenet()
    original.features.denseblock1.denselayer2.register_forward_hook(lambda m, i, o: None)
    original.features.denseblock2.denselayer1.relu2 = nn.SiLU()
    original.features.transition1.conv.register_forward_pre_hook(lambda m, i: None)
    converted, report = fusedres.convert(original, report=True)
    f = converted.features
    # Blocks stay torchvision's (their output is a tensor); the layers that can fuse are fused one by one.
    assert type(f.denseblock1) is _DenseBlock and type(f.denseblock2) is _DenseBlock
    assert type(f.denseblock1.denselayer1) is DenseLayer and type(f.denseblock1.denselayer2) is _DenseLayer
    assert type(f.denseblock2.denselayer1) is _DenseLayer and type(f.denseblock2.denselayer2) is DenseLayer
    # The transition's conv runs outside any fused unit (its hook fires): only the norm -> relu pair is fused.
    assert type(f.transition1) is _Transition and isinstance(f.transition1.norm, BatchNormAct2d)
    assert isinstance(f.transition1.relu, nn.Identity)
    assert type(converted) is fr_densenet.DenseNet and isinstance(f.norm5, DenseNormAct2d)
    # The BatchNorms of the layers left torchvision's run fused alone (identity), with why nothing more is fused.
    alone = report.alone
    assert set(alone) == {
        f"features.denseblock{b}.denselayer{layer}.norm{n}" for b, layer in ((1, 2), (2, 1)) for n in (1, 2)
    }
    assert "the _DenseLayer has hooks" in alone["features.denseblock1.denselayer2.norm1"]
    # silu runs in bn_act but not in the dense op a _DenseLayer becomes (relu only there)
    assert "relu2: SiLU is not exactly nn.ReLU" in alone["features.denseblock2.denselayer1.norm2"]
    assert report.num_pairs == 2 and len(report.converted) == 11 and report.untouched == []
    _assert_parity(converted, original)


def test_densenet_norm5_with_a_hook_keeps_the_torchvision_forward() -> None:
    original = _tv_small_densenet()
    original.features.norm5.register_forward_hook(lambda m, i, o: None)
    converted, report = fusedres.convert(original, report=True)
    f = converted.features
    assert type(converted) is DenseNet and type(f.norm5) is nn.BatchNorm2d
    # denseblock1 feeds a DenseTransition, so it becomes a DenseBlock; denseblock2 feeds norm5, so its output
    # stays a tensor (a torchvision _DenseBlock of fused layers).
    assert isinstance(f.denseblock1, DenseBlock) and isinstance(f.transition1, DenseTransition)
    assert type(f.denseblock2) is _DenseBlock and isinstance(f.denseblock2.denselayer1, DenseLayer)
    assert [(u.name, u.reason) for u in report.untouched] == [
        ("features.norm5", "DenseNet's norm5 + F.relu: BatchNorm2d has hooks (fusing would change what they see)")
    ]
    _assert_parity(converted, original)


def test_convert_standalone_dense_layer() -> None:
    torch.manual_seed(0)
    layer = _DenseLayer(12, growth_rate=4, bn_size=2, drop_rate=0.0).double()
    converted, report = fusedres.convert(layer, report=True)
    assert type(converted) is DenseLayer and [c.name for c in report.converted] == ["norm1", "norm2"]
    maps = [torch.randn(2, c, 5, 5, dtype=torch.float64) for c in (8, 4)]
    torch.testing.assert_close(converted(maps), layer(maps), rtol=1e-9, atol=1e-11)
    strided = _DenseLayer(12, growth_rate=4, bn_size=2, drop_rate=0.0)
    strided.conv2.stride = (2, 2)
    kept, report = fusedres.convert(strided, report=True)
    assert type(kept) is _DenseLayer and "conv2: Conv2d(8, 4" in report.alone["norm1"]


# --------------------------------------------------------------------------------------------------------------
# torchvision beyond ResNet / DenseNet: RegNet's block end, Conv2dNormActivation pairs, activations not fused yet


def test_convert_regnet_y_400mf_training_step() -> None:
    """Every BatchNorm of torchvision's RegNetY-400MF fused: Conv2dNormActivation BN -> ReLU pairs, each block's
    f.c BatchNorm with the shortcut add and ReLU (the SE sits before f.c), the projections as identity BatchNorms."""
    converted, report = check_converted_training_step(
        lambda: torchvision.models.regnet_y_400mf(num_classes=10), (2, 3, 64, 64), min_share=1.0
    )
    assert report.num_batchnorms == 53 and sum(c.residual for c in report.converted) == 16
    block = converted.trunk_output.block1[0]
    assert isinstance(block, tv_convert.ResBottleneckBlock) and isinstance(block, ResBottleneckBlock)
    assert block.f.c[1].activation == "relu" and isinstance(block.activation, nn.Identity)
    assert block.proj[1].activation == "identity" and isinstance(block.f.a[1], BatchNormAct2d)


def test_regnet_block_without_projection_and_with_hooks() -> None:
    torch.manual_seed(0)
    block = randomize_norms(ResBottleneckBlock(8, 8, 1, nn.BatchNorm2d, nn.ReLU, 4, 1.0, 0.25)).double()
    assert block.proj is None
    original = copy.deepcopy(block)
    converted = fusedres.convert(block)
    assert isinstance(converted, tv_convert.ResBottleneckBlock)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert_same(step(converted, x), step(original, x), rtol=1e-10, atol=1e-12)
    hooked = copy.deepcopy(original)
    hooked.f.c.register_forward_hook(lambda m, i, o: None)
    kept, report = fusedres.convert(hooked, report=True)
    assert type(kept) is ResBottleneckBlock and list(report.alone) == ["f.c.1"] and report.untouched == []
    assert "ResBottleneckBlock end: f's last module is not a hook-free Sequential" in report.alone["f.c.1"]


@pytest.mark.parametrize(
    "name, pairs, act, residual",
    [
        ("mobilenet_v2", 35 / 52, "relu6", 10),
        ("efficientnet_b0", 33 / 49, "silu", 0),  # MBConv: StochasticDepth(p > 0) sits before the add
        ("mnasnet0_5", 35 / 52, "relu", 10),
    ],
)
def test_mobile_models_training_step(name: str, pairs: float, act: str, residual: int) -> None:
    """MobileNetV2's BN -> ReLU6 and EfficientNet's BN -> SiLU Conv2dNormActivation pairs fuse (issue 13 item 5), as
    MNASNet's BN -> ReLU pairs do (two thirds of the BatchNorms); the rest, each block's projection BatchNorm with no
    activation after it (an inverted residual's last BatchNorm, whose output the block's forward adds to the input,
    if at all), runs fused with the identity activation: every BatchNorm fused. Where the block adds its input
    (MobileNetV2 / MNASNet inverted residuals), that BatchNorm takes the add too. A float64 training step equal to
    the unconverted model's, float32 within 2x, the same state_dict keys."""
    # 64x64, batch 4: the last stages (stride 32) normalise over N*H*W = 16 values per channel. At 32x32, batch 2,
    # they normalise over 2: float32 gradients reach 1e6-1e9 and PyTorch's own float32 gradients are ~100% off
    # float64 (measured: mobilenet_v2 1.1, efficientnet_b0 1.7, mnasnet0_5 0.3 relative), a lottery for any
    # comparison; at 64x64, batch 4, 1e-5 to 1e-2.
    converted, report = check_converted_training_step(
        lambda: torchvision.models.get_model(name, num_classes=10), (4, 3, 64, 64), min_share=1.0
    )
    assert report.fused_share == 1.0 and report.untouched == []
    # the BatchNorms alone (projections) run fused with the identity activation
    assert {c.activation for c in report.converted} == {act, "identity"}
    assert sum(c.activation != "identity" for c in report.converted) / report.num_batchnorms == pytest.approx(pairs)
    assert sum(c.residual for c in report.converted) == residual


def test_inverted_residual_block_end() -> None:
    """A MobileNetV2 block with its residual: the projection BatchNorm adds the block input in the fused op (float64
    forward, gradients and running statistics equal to the unconverted block's); a block without the residual, or
    with hooks, keeps torchvision's forward (its BatchNorm alone fused, identity)."""
    from torchvision.models.mobilenetv2 import InvertedResidual as TvInvertedResidual

    torch.manual_seed(0)
    block = randomize_norms(TvInvertedResidual(8, 8, 1, 4)).double()
    converted, report = fusedres.convert(block, report=True)
    assert type(converted) is tv_convert.InvertedResidual and report.blocks == [("", "InvertedResidual")]
    assert [(c.name, c.activation, c.residual) for c in report.converted if c.residual] == [("conv.3", "identity", True)]
    assert list(converted.state_dict()) == list(block.state_dict())
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    assert_same(step(converted, x), step(block, x), rtol=1e-12, atol=1e-13)
    strided = TvInvertedResidual(8, 8, 2, 4)  # stride 2: no residual
    kept, report = fusedres.convert(strided, report=True)
    assert type(kept) is TvInvertedResidual and not any(c.residual for c in report.converted)
    hooked = TvInvertedResidual(8, 8, 1, 4)
    hooked.register_forward_hook(lambda m, i, o: None)
    kept, report = fusedres.convert(hooked, report=True)
    assert type(kept) is TvInvertedResidual and not any(c.residual for c in report.converted)


def test_hardswish_waits_for_the_kernels() -> None:
    """MobileNetV3's BN -> Hardswish pairs are reported as waiting (their BatchNorm runs fused alone, identity);
    its BN -> ReLU pairs fuse, and its projection BatchNorms (nothing after them) run fused, identity."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=10)
    converted, report = fusedres.convert(model, report=True)
    assert report.untouched == [] and report.fused_share == 1.0
    assert report.alone and all(r == "activation hardswish is not fused by the kernels yet" for r in report.alone.values())
    assert {c.activation for c in report.converted} == {"relu", "identity"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_activations_a_fused_class_cannot_take_are_left() -> None:
    """silu after an nn.SyncBatchNorm stays PyTorch's (SyncBatchNormAct2d has no silu: its backward cannot recompute
    the pre-activation), its BatchNorm fused alone (identity); relu6 after one fuses."""
    seq = nn.Sequential(nn.SyncBatchNorm(4), nn.SiLU(), nn.SyncBatchNorm(4), nn.ReLU6())
    converted, report = fusedres.convert(seq, report=True)
    assert type(converted[0]) is SyncBatchNormAct2d and converted[0].activation == "identity"
    assert type(converted[1]) is nn.SiLU
    assert type(converted[2]) is SyncBatchNormAct2d and converted[2].activation == "relu6"
    assert list(report.alone) == ["0"] and report.untouched == []
    assert "activation silu is not supported by SyncBatchNormAct2d" in report.alone["0"]


def test_sync_batchnorm_pairs_and_default_converters_do_not_override_users() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.ReLU())
    converted = fusedres.convert(seq)
    assert type(converted[1]) is SyncBatchNormAct2d and converted[1].activation == "relu"
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), seq(x), rtol=1e-5, atol=1e-6)

    class Block(nn.Module):
        pass

    def mine(m: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        return m

    def builtin(m: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        return m

    try:
        register_converter(Block)(mine)
        register_default_converter(Block)(builtin)  # what a library module does when loaded after the user's
        assert _CONVERTERS[Block] is mine
    finally:
        _CONVERTERS.pop(Block, None)

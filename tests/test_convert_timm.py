"""convert() on timm models: the fused share of each family, a training step against the unconverted model, and the
converters one by one (norm-act layers, ResNet blocks, RegNet blocks, DenseNet layers).

Coverage (fused share, state_dict keys) is checked on the full models, built on the meta device. The training steps
run on small inputs (2x3x64x64) and, where the full model is too slow for the test budget, on the family's model with
one block per stage (``layers=(1, 1, 1, 1)``, DenseNet ``block_config=(2, 2, 2, 2)``, fewer channels for
wide_resnet50_2): the same block types and options, so the same converters and fused modules. float64: outputs,
gradients and running statistics equal to rounding; float32: within 2x the unconverted float32 model's error against
float64 (see tests/_convert_check.py for how chaotic amplification and max-pool near-ties are kept out of it).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm): the timm converters go untested")

from _convert_check import assert_same, check_converted_training_step, randomize_norms, step
from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
from timm.layers import DropBlock2d, DropPath, SyncBatchNormAct
from timm.models import densenet as timm_densenet
from timm.models import resnet as timm_resnet

import fusedres
from fusedres.convert.lone import VIA as LONE_VIA
from fusedres.convert import ConvertContext, ConvertReport, block_end_problem, branch_op, branch_scale
from fusedres.convert import timm as timm_convert
from fusedres.nn import BatchNormAct2d, DenseLayer, DenseNormAct2d, DenseTransition, SyncBatchNormAct2d

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these models are small
    yield
    torch.set_num_threads(threads)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Coverage of the full models


@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d", "wide_resnet50_2", "resnetv2_50", "regnety_008",
     "densenet121", "resnet10t", "resnetaa34d", "regnetx_002", "dpn68"],
)  # fmt: skip
def test_full_models_fuse_every_batchnorm(name: str) -> None:
    model = _meta(name)
    keys = list(model.state_dict())
    converted, report = fusedres.convert(model, inplace=True, report=True)
    assert report.untouched == [] and report.fused_share == 1.0, report.summary()
    assert report.num_batchnorms == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert list(converted.state_dict()) == keys
    assert not any(type(m) in (nn.BatchNorm2d, TimmBatchNormAct2d) for m in converted.modules())


def test_full_resnet50_structure() -> None:
    converted, report = fusedres.convert(_meta("resnet50"), inplace=True, report=True)
    assert isinstance(converted.layer1[0], timm_convert.Bottleneck)
    assert isinstance(converted.layer1[0], timm_resnet.Bottleneck)  # still timm's type (zero_init_last etc.)
    assert isinstance(converted.bn1, BatchNormAct2d) and isinstance(converted.act1, nn.Identity)
    assert converted.layer2[0].downsample[1].activation == "identity"
    assert [k for _, k in report.blocks] == ["timm Bottleneck"] * 16
    assert sum(c.residual for c in report.converted) == 16 and report.num_pairs == 1
    resnet50d = fusedres.convert(_meta("resnet50d"), inplace=True)
    assert isinstance(resnet50d.layer2[0].downsample[0], nn.AvgPool2d)  # the "d" shortcut: pool, conv, fused BN
    assert resnet50d.layer2[0].downsample[2].activation == "identity"
    assert isinstance(resnet50d.conv1[1], BatchNormAct2d) and isinstance(resnet50d.conv1[2], nn.Identity)  # deep stem


@pytest.mark.parametrize(
    "name, kwargs, boundary",
    [
        ("seresnet50", {}, "SEModule, a channel attention"),
        ("ecaresnet26t", {}, "EcaModule, a channel attention"),
    ],
)
def test_se_boundary_is_all_that_is_left(name: str, kwargs: dict, boundary: str) -> None:
    """Everything outside the SE boundary is fused; the BatchNorm before it runs fused alone (identity) and the
    report says why its add and activation are not (SE reads that BatchNorm's output)."""
    model = _meta(name, **kwargs)
    ends = {
        n: m
        for n, m in model.named_modules()
        if (isinstance(m, timm_resnet.Bottleneck) and (m.se is not None or m.drop_path is not None))
        or (type(m).__name__ == "Bottleneck" and isinstance(getattr(m, "drop_path", None), DropPath))
    }
    assert ends
    _, report = fusedres.convert(model, inplace=True, report=True)
    left = report.alone
    want = {f"{n}.bn3" if hasattr(m, "bn3") else f"{n}.conv3.bn" for n, m in ends.items()}
    assert set(left) == want and report.untouched == []
    assert all(boundary in r and "cannot have before it runs" in r for r in left.values())
    assert {c.activation for c in report.converted if c.name in want} == {"identity"}
    assert report.num_batchnorms == len(report.converted)


@pytest.mark.parametrize("name", ["resnet50", "regnety_008"])
def test_active_drop_path_fuses_into_the_block_end(name: str) -> None:
    """An active DropPath (stochastic depth) becomes the block-end op's per-sample scale: every block end fuses."""
    model = _meta(name, drop_path_rate=0.1)
    _, report = fusedres.convert(model, inplace=True, report=True)
    assert report.alone == {} and report.untouched == []
    ends = [m for m in model.modules() if isinstance(getattr(m, "drop_path", None), DropPath) and m.drop_path.drop_prob]
    assert ends and all(type(m).__module__ == "fusedres.convert.timm" for m in ends)


def test_regnety_se_sits_before_conv3_so_the_block_end_fuses() -> None:
    converted, report = fusedres.convert(_meta("regnety_008"), inplace=True, report=True)
    block = converted.s1.b1
    assert isinstance(block, timm_convert.RegNetBottleneck) and type(block.se).__name__ == "SEModule"
    assert block.conv3.bn.activation == "relu" and isinstance(block.act3, nn.Identity)
    assert block.downsample.bn.activation == "identity"
    assert sum(c.residual for c in report.converted) == 14


# --------------------------------------------------------------------------------------------------------------
# Training steps against the unconverted model

SHAPE = (2, 3, 64, 64)
ONE_BLOCK = {"layers": (1, 1, 1, 1)}


@pytest.mark.parametrize(
    "name, kwargs, min_share, alone",
    [
        ("resnet18", {}, 1.0, 0),
        ("resnet50", ONE_BLOCK, 1.0, 0),
        ("resnet50d", ONE_BLOCK, 1.0, 0),
        ("resnext50_32x4d", ONE_BLOCK, 1.0, 0),
        ("wide_resnet50_2", {**ONE_BLOCK, "channels": (16, 32, 64, 128)}, 1.0, 0),
        ("resnetv2_50", ONE_BLOCK, 1.0, 0),
        ("regnety_008", {}, 1.0, 0),
        ("densenet121", {"block_config": (2, 2, 2, 2)}, 1.0, 0),
        ("resnet10t", {}, 1.0, 0),  # tiered deep stem, avg-pool downsample
        ("resnetaa34d", ONE_BLOCK, 1.0, 0),  # anti-aliasing (avg pool) after act1
        # Every BatchNorm fused; those before an SE / DropBlock2d alone (identity): 4, 2. An active DropPath is the
        # block end's per-sample scale (same random draws as timm's drop_path).
        ("seresnet50", ONE_BLOCK, 1.0, 4),
        ("resnet18", {**ONE_BLOCK, "drop_path_rate": 0.1}, 1.0, 0),  # blocks 2-4 have an active DropPath
        ("resnet18", {**ONE_BLOCK, "drop_block_rate": 0.2}, 1.0, 2),  # bn1 -> DropBlock2d -> act1 in layers 3-4
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_training_step_matches_the_unconverted_model(name: str, kwargs: dict, min_share: float, alone: int) -> None:
    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    _, report = check_converted_training_step(build, SHAPE, min_share=min_share)
    assert report.fused_share == pytest.approx(min_share)
    assert len(report.alone) == alone


def test_converted_model_pickles_and_keeps_timm_methods() -> None:
    model = randomize_norms(timm.create_model("resnet18", pretrained=False, num_classes=4, layers=(1, 1, 1, 1)))
    converted = fusedres.convert(model).eval()
    again = pickle.loads(pickle.dumps(converted))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x), rtol=1e-5, atol=1e-5)
        feats = converted.forward_intermediates(x, intermediates_only=True)
        want = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    converted.layer1[0].zero_init_last()
    assert converted.layer1[0].bn2.weight.abs().sum() == 0


# --------------------------------------------------------------------------------------------------------------
# timm's norm-act layers


def _norm_act(**kwargs) -> nn.Module:
    return randomize_norms(TimmBatchNormAct2d(6, **kwargs)).double()


@pytest.mark.parametrize(
    "kwargs, activation, slope",
    [
        ({}, "relu", 0.01),
        ({"act_layer": "leaky_relu", "act_kwargs": {"negative_slope": 0.2}}, "leaky_relu", 0.2),
        ({"act_layer": nn.LeakyReLU, "inplace": False}, "leaky_relu", 0.01),
        ({"momentum": None}, "relu", 0.01),
        ({"drop_layer": lambda: DropBlock2d(drop_prob=0.0)}, "relu", 0.01),  # a drop that does nothing
        ({"act_layer": "silu"}, "silu", 0.01),  # nn.SiLU (EfficientNet, RegNetY in timm)
        ({"act_layer": "relu6"}, "relu6", 0.01),  # nn.ReLU6 (MobileNetV2)
    ],
)
def test_norm_act_is_replaced_with_its_activation(kwargs: dict, activation: str, slope: float) -> None:
    layer = _norm_act(**kwargs)
    keys = list(layer.state_dict())
    converted, report = fusedres.convert(nn.Sequential(layer), report=True)
    new = converted[0]
    assert type(new) is BatchNormAct2d and new.activation == activation and new.negative_slope == slope
    assert new.momentum == layer.momentum and list(new.state_dict()) == keys
    assert [(c.name, c.via) for c in report.converted] == [("0", "timm BatchNormAct2d")] and report.num_pairs == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two steps: momentum=None's cumulative average too
        x = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
        assert_same(step(converted, x), step(nn.Sequential(layer), x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"act_layer": "gelu"}, "act: activation gelu is not fused by the kernels yet"),
        ({"act_layer": "hard_swish"}, "act: activation hardswish is not fused by the kernels yet"),
        ({"drop_layer": lambda: DropBlock2d(drop_prob=0.1)}, "drop: DropBlock2d"),
    ],
)
def test_norm_act_that_cannot_fuse_is_left_with_the_reason(kwargs: dict, reason: str) -> None:
    converted, report = fusedres.convert(nn.Sequential(_norm_act(**kwargs)), report=True)
    assert type(converted[0]) is TimmBatchNormAct2d
    assert [u.name for u in report.untouched] == ["0"] and reason in report.untouched[0].reason


def test_norm_act_without_activation_alone_runs_fused_identity() -> None:
    """A norm-act layer with apply_act=False and nothing after it is a BatchNorm alone: fused, identity."""
    layer = _norm_act(apply_act=False)
    converted, report = fusedres.convert(nn.Sequential(layer), report=True)
    assert type(converted[0]) is BatchNormAct2d and converted[0].activation == "identity"
    assert report.untouched == [] and [c.via for c in report.converted] == [LONE_VIA]
    assert list(converted.state_dict()) == list(nn.Sequential(layer).state_dict())
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert_same(step(converted, x), step(nn.Sequential(layer), x), rtol=1e-12, atol=1e-13)


def test_norm_act_without_activation_pairs_with_a_following_relu() -> None:
    layer = _norm_act(apply_act=False)
    converted, report = fusedres.convert(nn.Sequential(layer, nn.LeakyReLU(0.3)), report=True)
    assert type(converted[0]) is BatchNormAct2d and converted[0].activation == "leaky_relu"
    assert converted[0].negative_slope == 0.3 and isinstance(converted[1], nn.Identity)
    assert [c.via for c in report.converted] == ["Sequential pair"]


def test_norm_act_with_hooks_or_subclassed_is_left() -> None:
    hooked = _norm_act()
    hooked.act.register_forward_hook(lambda m, i, o: None)

    class MyNormAct(TimmBatchNormAct2d):
        pass

    converted, report = fusedres.convert(nn.Sequential(hooked, MyNormAct(3)), report=True)
    assert type(converted[0]) is TimmBatchNormAct2d and type(converted[1]) is MyNormAct
    reasons = [u.reason for u in report.untouched]
    assert "act: ReLU has hooks" in reasons[0] and "MyNormAct is not exactly" in reasons[1]


def test_sync_norm_act_becomes_sync_batchnorm_act() -> None:
    layer = timm.layers.convert_sync_batchnorm(nn.Sequential(_norm_act(act_layer="leaky_relu")))
    assert type(layer[0]) is SyncBatchNormAct
    converted = fusedres.convert(layer)
    assert type(converted[0]) is SyncBatchNormAct2d and converted[0].activation == "leaky_relu"
    assert list(converted.state_dict()) == list(layer.state_dict())
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)  # no process group: both run the single-process BatchNorm
    assert_same(step(converted, x), step(layer, x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("sync", ["torch", "timm"])
def test_models_converted_to_sync_batchnorm_first_fuse_the_same(sync: str) -> None:
    """nn.SyncBatchNorm (PyTorch's converter) and timm's SyncBatchNormAct (timm's) become SyncBatchNormAct2d, with
    the residual add at the block ends; one process here, so both run the single-process BatchNorm."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", num_classes=5, layers=(1, 1, 1, 1))).double()
    if sync == "torch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:  # timm's converter keeps its norm-act layers' activations: the stem of a RegNet
        model = timm.layers.convert_sync_batchnorm(randomize_norms(timm.create_model("regnetx_002", num_classes=5)))
        model = model.double()
    converted, report = fusedres.convert(model, report=True)
    assert report.fused_share == 1.0 and sum(c.residual for c in report.converted) > 0
    assert all(type(m) is SyncBatchNormAct2d for m in converted.modules() if isinstance(m, nn.SyncBatchNorm))
    x = torch.randn(*SHAPE, dtype=torch.float64)  # not 32x32: stage 4 would normalise 2 values per channel
    assert_same(step(converted, x), step(model, x), rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------------------------------
# Converters one by one


def _block(cls: type, inplanes: int, planes: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    downsample = None
    if inplanes != planes * cls.expansion or kwargs.get("stride", 1) != 1:
        downsample = nn.Sequential(
            nn.AvgPool2d(2, kwargs.get("stride", 1), ceil_mode=True, count_include_pad=False),
            nn.Conv2d(inplanes, planes * cls.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * cls.expansion),
        )
    return randomize_norms(cls(inplanes, planes, downsample=downsample, **kwargs)).double()


def test_convert_resnet_block_alone() -> None:
    block = _block(timm_resnet.Bottleneck, 16, 8, stride=2, drop_block=lambda: DropBlock2d(0.2, 3))
    original = copy.deepcopy(block)  # the converter shares the block's parameters and buffers
    ctx = ConvertContext(ConvertReport())
    new = timm_convert.convert_resnet_block(block, "b", ctx)
    assert type(new) is timm_convert.Bottleneck and type(block) is timm_resnet.Bottleneck  # the original stays
    assert isinstance(new.bn1, BatchNormAct2d) and isinstance(new.act1, nn.Identity)
    assert type(new.bn2) is nn.BatchNorm2d and type(new.act2) is nn.ReLU  # DropBlock2d sits between them
    assert "DropBlock2d" in ctx.reason(new.bn2) and "(active in training)" in ctx.reason(new.bn2)
    assert new.bn3.activation == "relu" and isinstance(new.act3, nn.Identity)
    assert new.downsample[2].activation == "identity"
    assert [(c.name, c.residual) for c in ctx.report.converted] == [("b.bn1", False), ("b.downsample.2", False),
                                                                   ("b.bn3", True)]  # fmt: skip
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    assert_same(step(new, x), step(original, x), rtol=1e-10, atol=1e-12)  # same DropBlock2d masks (seeded)


def test_resnet_block_with_hooks_on_the_last_norm_keeps_timm_forward() -> None:
    block = _block(timm_resnet.BasicBlock, 8, 8)
    block.bn2.register_forward_hook(lambda m, i, o: None)
    converted, report = fusedres.convert(block, report=True)
    assert type(converted) is timm_resnet.BasicBlock and isinstance(converted.bn1, BatchNormAct2d)
    assert [u.name for u in report.untouched] == ["bn2"] and "has hooks" in report.untouched[0].reason


def test_block_end_ops_registry() -> None:
    assert branch_op(None).kind == branch_op(nn.Identity()).kind == branch_op(DropPath(0.0)).kind == "identity"
    assert branch_op(DropPath(0.1)).kind == "per_sample"
    assert branch_op(timm.layers.SEModule(8)).kind == "per_sample_channel"
    assert branch_op(nn.Conv2d(2, 2, 1)) is None
    assert block_end_problem("bn3", [("se", None), ("drop_path", DropPath(0.0))]) is None
    assert "not a known branch op" in block_end_problem("bn3", [("x", nn.Conv2d(2, 2, 1))])
    assert block_end_problem("bn3", [("drop_path", DropPath(0.2))]) is None
    assert "more than one" in block_end_problem("bn3", [("a", DropPath(0.2)), ("b", DropPath(0.1))])
    assert "cannot have before it runs" in block_end_problem("bn3", [("se", timm.layers.SEModule(8))])
    x = torch.zeros(6, 2, 1, 1)
    assert branch_scale([DropPath(0.2).eval()], x) is None and branch_scale([None, nn.Identity()], x) is None
    torch.manual_seed(3)
    factors = branch_scale([DropPath(0.5)], x)
    torch.manual_seed(3)
    want = timm.layers.drop_path(torch.ones(6, 1, 1, 1), 0.5, True).flatten()
    assert torch.equal(factors, want)


def test_densenet_layers_and_transitions_become_fused_units() -> None:
    torch.manual_seed(0)
    model = timm_densenet.DenseNet(growth_rate=8, block_config=(2, 2), bn_size=2, num_classes=5)
    converted, report = fusedres.convert(randomize_norms(model).double(), report=True)
    f = converted.features
    assert type(f.denseblock1) is timm_densenet.DenseBlock  # timm's: it returns the concatenation
    assert type(f.denseblock1.denselayer1) is DenseLayer and isinstance(f.denseblock1.denselayer1.norm1, DenseNormAct2d)
    assert type(f.transition1) is DenseTransition and type(f.transition1.pool) is nn.AvgPool2d
    assert isinstance(f.norm0, BatchNormAct2d) and isinstance(f.norm5, BatchNormAct2d)
    assert report.untouched == [] and len(report.converted) == 11
    with torch.no_grad():  # timm's forward_intermediates reads the blocks' outputs: tensors, as before
        feats = converted.eval().forward_intermediates(torch.randn(1, 3, 32, 32, dtype=torch.float64))[1]
    assert all(isinstance(t, torch.Tensor) for t in feats)


def test_densenet_grad_checkpointing_becomes_recompute_in_backward() -> None:
    """timm's grad_checkpointing recomputes norm1 in backward (its running statistics updated twice per step);
    the converted layer recomputes without touching them: compared with the same model without checkpointing."""
    torch.manual_seed(0)
    kwargs = {"growth_rate": 8, "block_config": (2, 2), "bn_size": 2, "num_classes": 5}
    model = randomize_norms(timm_densenet.DenseNet(memory_efficient=True, **kwargs)).double()
    plain = timm_densenet.DenseNet(**kwargs).double()
    plain.load_state_dict(model.state_dict())
    converted = fusedres.convert(model)
    assert converted.features.denseblock1.denselayer1.memory_efficient
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same(step(converted, x), step(plain, x), rtol=1e-9, atol=1e-11)

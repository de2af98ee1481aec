"""ResNet models: torchvision's parameters and state_dicts, and the same function fused, reference and torchvision.

Float32 cases compare against a float64 oracle (the same model and weights in float64): eager float32 is itself far
from it in some gradients (in resnet50 at batch 2 it is 3% off in layer2.1.conv3.weight.grad, where the fused
kernels, which accumulate in double, are within 1e-5), so fused-vs-eager in float32 would test eager's rounding.
Deep randomly initialised ResNets trained on a batch of 2 are also chaotic (a BatchNorm over 8 values per channel in
layer4 amplifies rounding until ReLU masks flip), so the float32 deep-net cases damp the residual branches (last BN
weight 0.2, like a partial ``zero_init_residual``); the float64 cases use the default init.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn

from fusedres import models
from fusedres.models import resnet as fr
from fusedres.nn import BatchNormAct2d

IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
PREACT = [f"preact_{n}" for n in CIFAR]
# torchvision's published parameter counts (1000 classes) and He et al.'s (CIFAR, 10 classes).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet50_2": 68_883_240,
}
HE_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962}


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _damp_residual_branches(model: nn.Module, scale: float = 0.2) -> None:
    """Scales the last BN weight of every residual block (torchvision's or ours) by ``scale``."""
    with torch.no_grad():
        for m in model.modules():
            name = type(m).__name__
            if name == "Bottleneck":
                m.bn3.weight.mul_(scale)
            elif name == "BasicBlock":
                m.bn2.weight.mul_(scale)


def _run(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input grad, every parameter grad and every buffer (after the forward) of sum(out * fixed weights)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad((out * w).sum(), (x, *params))
    result = {"output": out.detach(), "input.grad": grads[0]}
    result.update({f"{n}.grad": g for n, g in zip(names, grads[1:], strict=True)})
    result.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return result


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    """max|got - want| <= tol * max|want| for every entry (integer buffers exactly)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if not w.is_floating_point():
            assert torch.equal(g, w), name
            continue
        err = (g.double() - w.double()).abs().max().item()
        scale = max(w.double().abs().max().item(), 1e-30)
        assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.0e} * max |want| {scale:.3e}"


def _assert_as_accurate(got: dict, eager: dict, oracle: dict, tol: float) -> None:
    """Against the float64 oracle, every entry of ``got`` is within tol (relative to its max) or at most twice as far
    off as eager PyTorch in the same dtype (the conventions' low-precision criterion: where eager itself is far off,
    a ReLU mask flipped by rounding, and fused flips the same one)."""
    assert got.keys() == oracle.keys()
    for name, w in oracle.items():
        if not w.is_floating_point():
            assert torch.equal(got[name], w), name
            continue
        scale = max(w.double().abs().max().item(), 1e-30)
        err = (got[name].double() - w.double()).abs().max().item()
        eager_err = (eager[name].double() - w.double()).abs().max().item()
        assert err <= max(tol * scale, 2 * eager_err), (
            f"{name}: max abs error {err:.3e} > max({tol:.0e} * max |want| {scale:.3e}, 2 * eager's {eager_err:.3e})"
        )


def _oracle(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """_run of a float64 copy of ``model`` (call before running ``model``: training updates its buffers)."""
    got = _run(copy.deepcopy(model).double(), x.double())
    return {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in got.items()}


def _triple(name: str, dtype: torch.dtype, damp: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
    """torchvision's model (seeded) and our fused and reference models loaded with its state_dict."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    if damp:
        _damp_residual_branches(tv)
    tv = tv.to(dtype)
    fused = getattr(models, name)(fused=True).to(dtype)
    ref = getattr(models, name)(fused=False).to(dtype)
    fused.load_state_dict(tv.state_dict(), strict=True)
    ref.load_state_dict(tv.state_dict(), strict=True)
    return tv, fused, ref


# --------------------------------------------------------------------------------------------------------------
# Parameters, names, registry


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_parameter_counts_and_names_match_torchvision(name: str) -> None:
    with torch.device("meta"):
        ours = models.get_model(name)
        tv = getattr(torchvision.models, name)()
    assert _numel(ours) == _numel(tv) == TORCHVISION_PARAMS[name]
    want = [(k, v.shape, v.dtype) for k, v in tv.state_dict().items()]
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == want
    with torch.device("meta"):
        ref = models.get_model(name, fused=False, num_classes=10)
    assert _numel(ref) == TORCHVISION_PARAMS[name] - 990 * (ours.fc.in_features + 1)


@pytest.mark.parametrize("name", CIFAR + PREACT)
def test_cifar_parameter_counts(name: str) -> None:
    model = models.get_model(name)
    # The pre-activation variants have the same count: the stem BN moves to the end and the first BN of stages
    # 2 and 3 sees the narrower input (16 - 16 - 32 + 64 = 0).
    assert _numel(model) == HE_PARAMS[name.removeprefix("preact_")]
    assert model.fc.out_features == 10


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_strict_state_dict_load_from_torchvision(name: str) -> None:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    ours = getattr(models, name)()
    ours.load_state_dict(tv.state_dict(), strict=True)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), tv.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    tv.load_state_dict(ours.state_dict(), strict=True)  # and back


def test_registry_lists_and_builds_every_model() -> None:
    names = models.list_models()
    assert set(IMAGENET + CIFAR + PREACT) <= set(names)
    ref = models.get_model("resnet20", fused=False, num_classes=7)
    norms = [m for m in ref.modules() if isinstance(m, BatchNormAct2d)]
    assert norms and all(not m.fused for m in norms)
    assert all(m.fused for m in models.get_model("resnet20").modules() if isinstance(m, BatchNormAct2d))
    assert ref.fc.out_features == 7
    with pytest.raises(ValueError, match="registered models"):
        models.get_model("resnet19")


def test_fused_structure() -> None:
    model = models.resnet50()
    block = model.layer2[0]
    assert isinstance(block, fr.Bottleneck) and block.conv2.stride == (2, 2)  # V1.5: stride on the 3x3 conv
    assert [block.bn1.activation, block.bn2.activation, block.bn3.activation] == ["relu"] * 3
    assert isinstance(block.downsample[1], BatchNormAct2d) and block.downsample[1].activation == "identity"
    assert model.bn1.activation == "relu"
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_zero_init_residual_and_init() -> None:
    torch.manual_seed(0)
    model = models.resnet18(zero_init_residual=True)
    for m in model.modules():
        if isinstance(m, fr.BasicBlock):
            assert torch.all(m.bn2.weight == 0) and torch.all(m.bn1.weight == 1)
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, BatchNormAct2d))
    # kaiming_normal fan_out: std sqrt(2 / (out_channels * k * k))
    w = model.layer3[0].conv1.weight
    assert abs(w.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.05
    pre = models.preact_resnet20(zero_init_residual=True).eval()
    block = pre.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), x)  # a pre-activation block starts as the identity


def test_norm_layer_contract() -> None:
    model = models.resnet18(norm_layer=functools.partial(BatchNormAct2d, eps=1e-3, momentum=0.01), fused=False)
    norms = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert len(norms) == 20 and all(m.eps == 1e-3 and m.momentum == 0.01 and not m.fused for m in norms)
    with pytest.raises(ValueError, match="norm_layer must be a callable taking"):
        models.resnet18(norm_layer=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="takes no residual"):
        models.resnet20(norm_layer=lambda c, activation, fused: nn.BatchNorm2d(c))


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="depth must be 6n \\+ 2"):
        fr.CifarResNet(21)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        models.resnet18(groups=2)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        models.resnet50(replace_stride_with_dilation=[True])


# --------------------------------------------------------------------------------------------------------------
# Same function: fused vs reference vs torchvision


@pytest.mark.parametrize(
    "name, dtype, shape, damp, tol",
    [
        ("resnet18", torch.float64, (4, 3, 32, 32), False, 1e-10),
        ("resnet18", torch.float32, (2, 3, 64, 64), False, 1e-4),
        ("resnet50", torch.float32, (2, 3, 64, 64), True, 1e-4),
    ],
    ids=["resnet18-f64", "resnet18-f32", "resnet50-f32"],
)
def test_train_parity_with_torchvision(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], damp: bool, tol: float
) -> None:
    tv, fused, ref = _triple(name, dtype, damp)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    oracle = _oracle(ref, x) if dtype != torch.float64 else None
    want = _run(tv, x)
    _assert_same(_run(ref, x), want, 1e-6 if dtype == torch.float32 else tol)  # the same eager ops
    if oracle is None:
        _assert_same(_run(fused, x), want, tol)
    else:
        _assert_as_accurate(_run(fused, x), want, oracle, tol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2"])
def test_train_parity_with_torchvision_grouped_and_wide(name: str) -> None:
    tv, fused, _ = _triple(name, torch.float32, damp=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    oracle = _oracle(tv, x)
    _assert_as_accurate(_run(fused, x), _run(tv, x), oracle, 1e-4)


def test_eval_parity_with_torchvision() -> None:
    tv, fused, ref = _triple("resnet50", torch.float32, damp=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    fused.load_state_dict(tv.state_dict())
    ref.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        want = tv.eval()(x)
        for model in (fused.eval(), ref.eval()):
            got = model(x)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
            got_cl = model(x.to(memory_format=torch.channels_last))
            assert (got_cl - want).abs().max() <= 1e-4 * want.abs().max()


def test_dilation_parity_with_torchvision() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    fused = models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    fused.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet20"])
def test_cifar_fused_matches_reference_float64(name: str) -> None:
    torch.manual_seed(0)
    ref = models.get_model(name, fused=False).double()
    fused = models.get_model(name).double()
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _assert_same(_run(fused, x), _run(ref, x), 1e-10)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cifar_fused_matches_reference_float32(layout: str) -> None:
    torch.manual_seed(0)
    ref = models.resnet20(fused=False)
    fused = models.resnet20()
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    if layout == "channels_last":
        fused = fused.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    want = _oracle(ref, x)
    got = _run(fused, x)
    if layout == "channels_last":
        assert got["output"].is_contiguous() and got["input.grad"].is_contiguous(memory_format=torch.channels_last)
    _assert_same(got, want, 1e-4)


def test_shortcut_a_keeps_memory_format() -> None:
    short = fr.ShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    y = short(x)
    assert y.shape == (2, 32, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.all(y[:, 16:] == 0)
    assert torch.equal(short(x.contiguous()), y)


def test_three_sgd_steps_match_float64() -> None:
    torch.manual_seed(0)
    ref = models.resnet20(fused=False).double()
    fused = models.resnet20().double()
    fused.load_state_dict(ref.state_dict(), strict=True)
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(3)
    ]
    for model in (ref, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    want = ref.state_dict()
    for k, v in fused.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, want[k], rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(v, want[k]), k
    assert not torch.equal(want["conv1.weight"], initial["conv1.weight"])
    assert int(want["bn1.num_batches_tracked"]) == 3

"""``bias=False`` in every fused norm module (torch's ``nn.BatchNorm*d(C, bias=False)``: an affine weight without a
bias): the constructor signature, the state_dict (no ``bias`` key), the function, and convert() of such BatchNorms."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _convert_check import assert_same, randomize_norms, step
from torch import nn

import fusedres
from fusedres.nn import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    DenseBatchNormAct2d,
    DenseNormAct2d,
    SyncBatchNormAct2d,
    convert_sync_batchnorm,
)
from fusedres.nn.dense_layer import DenseFeatures

PAIRS = [
    (BatchNormAct1d, nn.BatchNorm1d),
    (BatchNormAct2d, nn.BatchNorm2d),
    (BatchNormAct3d, nn.BatchNorm3d),
    (DenseBatchNormAct2d, nn.BatchNorm2d),
    (DenseNormAct2d, nn.BatchNorm2d),
    (SyncBatchNormAct2d, nn.SyncBatchNorm),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_constructor_signature_starts_with_torchs(ours: type, theirs: type) -> None:
    """torch's parameters, in its order, with its kinds and defaults; fusedres' own are keyword-only after them."""
    want = list(inspect.signature(theirs).parameters.values())
    got = list(inspect.signature(ours).parameters.values())
    assert [(p.name, p.kind, p.default) for p in got[: len(want)]] == [(p.name, p.kind, p.default) for p in want]
    assert {p.name for p in got[len(want) :]} == {"activation", "negative_slope", "fused"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in got[len(want) :])


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=lambda c: c.__name__)
def test_state_dict_and_repr_have_no_bias(ours: type, theirs: type) -> None:
    got, want = ours(5, bias=False), theirs(5, bias=False)
    assert got.bias is None and got.weight is not None
    assert list(got.state_dict()) == list(want.state_dict()) and "bias" not in got.state_dict()
    assert "bias=False" in repr(got)
    got.load_state_dict(want.state_dict(), strict=True)
    want.load_state_dict(got.state_dict(), strict=True)
    assert list(ours(5).state_dict()) == list(theirs(5).state_dict())  # bias=True is the default


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, 0.1)
    return z


class _TorchBNAct(nn.Module):
    """The oracle: torch's BatchNorm(bias=False), then the residual add and the activation."""

    def __init__(self, bn: nn.Module, activation: str) -> None:
        super().__init__()
        self.bn, self.activation = bn, activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        z = self.bn(x)
        return _act(z if residual is None else z + residual, self.activation)


def _run(module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    r = residual.detach().clone().requires_grad_() if residual is not None else None
    out = module(x, r) if r is not None else module(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = (x, module.weight if hasattr(module, "weight") else module.bn.weight) + ((r,) if r is not None else ())
    grads = torch.autograd.grad((out * w).sum(), inputs)
    res = {"output": out.detach(), "input.grad": grads[0], "weight.grad": grads[1]}
    if r is not None:
        res["residual.grad"] = grads[2]
    bn = module if hasattr(module, "running_mean") else module.bn
    res.update({"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()})
    return res


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize(
    "ours, theirs, shape",
    [
        (BatchNormAct1d, nn.BatchNorm1d, (6, 5)),
        (BatchNormAct1d, nn.BatchNorm1d, (4, 5, 3)),
        (BatchNormAct2d, nn.BatchNorm2d, (4, 5, 3, 3)),
        (BatchNormAct2d, nn.BatchNorm2d, "channels_last"),
        (BatchNormAct3d, nn.BatchNorm3d, (2, 5, 2, 3, 3)),
        (SyncBatchNormAct2d, nn.BatchNorm2d, (4, 5, 3, 3)),  # one process: the single-call fused op
    ],
    ids=["1d", "1d-L", "2d", "2d-channels_last", "3d", "sync"],
)
def test_bias_false_computes_torchs_function(ours, theirs, shape, activation: str, fused: bool) -> None:
    layout = None
    if shape == "channels_last":
        shape, layout = (4, 5, 3, 3), torch.channels_last
    ref = randomize_norms(theirs(5, bias=False, momentum=None)).double()
    got = ours(5, bias=False, momentum=None, activation=activation, negative_slope=0.1, fused=fused).double()
    got.load_state_dict(ref.state_dict(), strict=True)
    oracle = _TorchBNAct(ref, activation)
    gen = torch.Generator().manual_seed(0)
    for with_residual in (True, False, True):  # momentum=None: the cumulative average over the three steps
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if layout is not None:
            x = x.to(memory_format=layout)
        r = torch.randn(shape, generator=gen, dtype=torch.float64) if with_residual else None
        assert_same(_run(got, x, r), _run(oracle, x, r), rtol=1e-12, atol=1e-13)
    got.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(got(x), oracle(x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cls", [DenseBatchNormAct2d, DenseNormAct2d])
def test_dense_bias_false(cls: type) -> None:
    ref = randomize_norms(nn.BatchNorm2d(7, bias=False)).double()
    got = cls(7, bias=False).double()
    got.load_state_dict(ref.state_dict(), strict=True)
    maps = [torch.randn(3, c, 4, 4, dtype=torch.float64, requires_grad=True) for c in (4, 3)]
    out = got(maps)
    want = torch.relu(ref(torch.cat(maps, 1)))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)
    gw = torch.randn(out.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * gw).sum(), (*maps, got.weight))
    want_grads = torch.autograd.grad((want * gw).sum(), (*maps, ref.weight))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(got.running_var, ref.running_var, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_dense_bn_act_conv_unit_bias_false(memory_efficient: bool) -> None:
    """The BN + ReLU + conv unit (fusedres DenseLayer's) with a BatchNorm without bias."""
    ref = randomize_norms(nn.BatchNorm2d(6, bias=False)).double()
    norm = DenseNormAct2d(6, bias=False).double()
    norm.load_state_dict(ref.state_dict(), strict=True)
    conv = torch.randn(5, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    maps = [torch.randn(2, c, 5, 5, dtype=torch.float64, requires_grad=True) for c in (2, 4)]
    out = norm.bn_act_conv(DenseFeatures(maps), conv, 1, memory_efficient=memory_efficient)
    want = F.conv2d(torch.relu(ref(torch.cat(maps, 1))), conv, padding=1)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-12)
    gw = torch.randn(out.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * gw).sum(), (*maps, conv, norm.weight))
    want_grads = torch.autograd.grad((want * gw).sum(), (*maps, conv, ref.weight))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_convert_keeps_bias_false() -> None:
    """Sequential pairs, torchvision ResNet blocks built with bias-free BatchNorms, and convert_sync_batchnorm."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, bias=False), nn.ReLU())
    converted, report = fusedres.convert(seq, report=True)
    assert type(converted[1]) is BatchNormAct2d and converted[1].bias is None and len(report.converted) == 1
    assert list(converted.state_dict()) == list(seq.state_dict())
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)  # its __init__ cannot zero a bias that is not there
    for name, m in list(model.named_modules()):
        if type(m) is nn.BatchNorm2d:
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, nn.BatchNorm2d(m.num_features, bias=False))
    model = randomize_norms(model).double()
    converted, report = fusedres.convert(model, report=True)
    assert report.fused_share == 1.0 and not any(k.endswith(".bias") and "bn" in k for k in converted.state_dict())
    assert list(converted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # layer4 at 2x2: 8 values per channel in its BatchNorms
    assert_same(step(converted, x), step(model, x), rtol=1e-9, atol=1e-11)
    synced = convert_sync_batchnorm(converted)
    assert type(synced.layer1[0].bn2) is SyncBatchNormAct2d and synced.layer1[0].bn2.bias is None

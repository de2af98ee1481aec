"""Highway layers and models: fused and reference builds are the same function with the same parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusedres.models import highway_convnet, highway_mlp
from fusedres.nn import Highway, HighwayConv2d

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
# (rtol, atol) of fused vs reference: float64 tight, float32 close (the same math, different summation order).
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


def _pair(build, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The reference model built with ``seed`` and a fused model loaded with its state_dict."""
    torch.manual_seed(seed)
    ref = build(fused=False).to(device=device, dtype=dtype)
    fused = build(fused=True).to(device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return fused, ref


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, input grad and every parameter grad of sum(out * fixed weights)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad((out * w).sum(), (x, *params))
    return out.detach(), grads[0], dict(zip(names, grads[1:], strict=True))


def _assert_same(fused: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    rtol, atol = TOL[x.dtype]
    out_f, dx_f, grads_f = _run(fused, x)
    out_r, dx_r, grads_r = _run(ref, x)
    torch.testing.assert_close(out_f, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx_f, dx_r, rtol=rtol, atol=atol)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_f:
        torch.testing.assert_close(
            grads_f[name], grads_r[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


# --------------------------------------------------------------------------------------------------------------
# Parameters and the gate-bias convention


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("coupled", [True, False])
def test_parameter_counts(coupled: bool) -> None:
    parts = 2 if coupled else 3
    f, c, k = 7, 5, 3
    assert _numel(Highway(f, coupled=coupled)) == parts * f * f + parts * f
    assert _numel(HighwayConv2d(c, k, coupled=coupled)) == parts * c * c * k * k + parts * c
    mlp = highway_mlp(11, f, 4, 3, coupled=coupled)
    assert _numel(mlp) == (11 * f + f) + 4 * (parts * f * f + parts * f) + (f * 3 + 3)
    net = highway_convnet(3, c, 2, 10, coupled=coupled)
    assert _numel(net) == 3 * c * 9 + 2 * c + 2 * (parts * c * c * 9 + parts * c) + (c * 10 + 10)


@pytest.mark.parametrize(
    "build",
    [
        lambda fused: highway_mlp(9, 6, 3, 4, fused=fused, coupled=False),
        lambda fused: highway_convnet(3, 4, 2, 5, fused=fused),
    ],
    ids=["mlp", "convnet"],
)
def test_state_dict_interchangeable(build) -> None:
    fused, ref = build(True), build(False)
    assert [(n, p.shape) for n, p in fused.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert fused.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(ref.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key


@pytest.mark.parametrize("gate_bias", [-2.0, -1.0, 0.5])
def test_gate_bias_convention(gate_bias: float) -> None:
    f = 6
    coupled = Highway(f, gate_bias=gate_bias)
    free = Highway(f, gate_bias=gate_bias, coupled=False)
    conv = HighwayConv2d(f, gate_bias=gate_bias, coupled=False)
    for layer in (coupled, free, conv):
        assert torch.all(layer.bias[f : 2 * f] == gate_bias)  # transform gate
    for layer in (free, conv):
        assert torch.all(layer.bias[2 * f :] == -gate_bias)  # free carry gate: the mirror image
    # The transform part keeps the parent's default initialisation (not constant).
    assert coupled.bias[:f].std() > 0
    # reset_parameters re-applies the convention.
    with torch.no_grad():
        free.bias.zero_()
    free.reset_parameters()
    assert torch.all(free.bias[f : 2 * f] == gate_bias) and torch.all(free.bias[2 * f :] == -gate_bias)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("coupled", [True, False])
def test_fresh_layer_mostly_carries(fused: bool, coupled: bool) -> None:
    """With a zero projection weight and transform bias, both forms give relu(0) * T + x * sigmoid(2) = 0.88 x."""
    layer = Highway(5, coupled=coupled, fused=fused).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias[:5].zero_()
    x = torch.randn(4, 5, dtype=torch.float64)
    carry = 1.0 / (1.0 + math.exp(-2.0))
    torch.testing.assert_close(layer(x), x * carry)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("coupled", [True, False])
def test_packed_order_transform_gate_carry(fused: bool, coupled: bool) -> None:
    """The projection is read as [transform | gate (| carry gate)] along the packed dimension."""
    torch.manual_seed(0)
    f = 5
    lin = Highway(f, activation="tanh", coupled=coupled, fused=fused).double()
    conv = HighwayConv2d(f, 1, activation="tanh", coupled=coupled, fused=fused).double()
    cases = ((lin, torch.randn(3, 2, f, dtype=torch.float64), -1), (conv, torch.randn(2, f, 3, 4).double(), 1))
    for layer, x, dim in cases:
        proj = nn.Linear.forward(layer, x) if dim == -1 else nn.Conv2d.forward(layer, x)
        parts = proj.split(f, dim=dim)
        t = torch.sigmoid(parts[1])
        carry = (1 - t) if coupled else torch.sigmoid(parts[2])
        torch.testing.assert_close(layer(x), torch.tanh(parts[0]) * t + x * carry)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        Highway(4, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        HighwayConv2d(4, activation="swish")
    with pytest.raises(ValueError, match="depth must be >= 0"):
        highway_mlp(4, 4, -1, 2)


# --------------------------------------------------------------------------------------------------------------
# Fused and reference models compute the same function


@pytest.mark.needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("coupled", [True, False], ids=["coupled", "free"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
def test_highway_mlp_parity(device: str, dtype: torch.dtype, coupled: bool, activation: str) -> None:
    def build(fused: bool) -> nn.Module:
        return highway_mlp(13, 37, 4, 5, fused=fused, activation=activation, coupled=coupled)

    fused, ref = _pair(build, dtype, device)
    x = torch.randn(6, 13, dtype=dtype, device=device)
    _assert_same(fused, ref, x)


@pytest.mark.needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("coupled", [True, False], ids=["coupled", "free"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_highway_convnet_parity(device: str, dtype: torch.dtype, coupled: bool, layout: str) -> None:
    def build(fused: bool) -> nn.Module:
        return highway_convnet(3, 6, 2, 4, fused=fused, coupled=coupled)

    fused, ref = _pair(build, dtype, device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fused, ref = fused.to(memory_format=fmt), ref.to(memory_format=fmt)
    x = torch.randn(3, 3, 7, 9, dtype=dtype, device=device).to(memory_format=fmt)
    _assert_same(fused, ref, x)  # training mode: batch statistics, running statistics updated
    rtol, atol = TOL[dtype]
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(
            fused.state_dict()[key], value, rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
        )
    fused.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=rtol, atol=atol)


@pytest.mark.needs_native
def test_highway_mlp_training_steps_match() -> None:
    """Three SGD steps of fused and reference from the same weights end at the same weights (float64)."""
    fused, ref = _pair(lambda fused: highway_mlp(8, 16, 3, 3, fused=fused), torch.float64, "cpu")
    x = torch.randn(10, 8, dtype=torch.float64)
    target = torch.randint(0, 3, (10,))
    for model in (fused, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    for (name, p_f), p_r in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p_f, p_r, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")

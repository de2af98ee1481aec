"""Squeeze-and-excitation models (issue 14 item 2): se_resnet50 against timm's seresnet50, the SE CIFAR ResNets.

Parameter counts; se_resnet50 loads timm's ``seresnet50`` state_dict strictly and computes its function (float64,
eval and a training step: output, input and parameter gradients, running statistics), fused and reference; the SE
module and block end against a hand-written formula and timm's ``SEModule``; fused against reference for the CIFAR
models (a float64 training step on a small variant of the same class); the registry.

The timm tests need timm (a test extra) and skip naming it when it is missing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedres import models
from fusedres.models.se_resnet import SEBasicBlock, SEBottleneck, SECifarResNet, SEModule, timm_rd_channels
from fusedres.nn import BatchNormAct2d

pytestmark = pytest.mark.needs_native

# Exact counts for the default num_classes (1000 for se_resnet50, 10 for CIFAR): resnetN's (He et al.) plus per block
# C * rd + rd + rd * C + C for the SE module (rd = 1, 2, 4 in the three CIFAR stages: 49, 162, 580 per block).
PARAMS = {"se_resnet20": 272_095, "se_resnet56": 860_137, "se_resnet110": 1_742_200, "se_resnet50": 28_088_024}
CIFAR_BASE = {"se_resnet20": ("resnet20", 3), "se_resnet56": ("resnet56", 9), "se_resnet110": ("resnet110", 18)}
# float64, relative to each tensor's largest magnitude: 1e-16 rounding through up to 50 layers. Measured: fused
# se_resnet50 vs timm 4.4e-13 (layer4.2.bn2.weight.grad), reference vs timm 0 (the same PyTorch ops), SE-ResNet-14
# fused vs reference 9e-15.
TOL64 = 1e-10


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomise_norms(model: nn.Module, seed: int, running: bool = False) -> None:
    """BatchNorm weight U(0.5, 1.5) and bias N(0, 0.2) (and with ``running`` the running mean N(0, 0.2) and variance
    U(0.5, 1.5)) instead of the initial 1/0 (and timm's zeroed bn3): with a zero bn3 weight the SE branch would add
    nothing and a mishandled SE scale could not show; with zero biases batch means are rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c, dt = m.num_features, m.weight.dtype
                m.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64).to(dt) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=gen, dtype=torch.float64).to(dt))
                if running:
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=gen, dtype=torch.float64).to(dt))
                    m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64).to(dt) + 0.5)


def _step(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Output, input grad, every parameter grad and every buffer after a training forward/backward of
    sum(out * fixed weights)."""
    model.train()
    x = x.detach().clone().requires_grad_()
    out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad((out * w).sum(), (x, *params))
    result = {"output": out.detach(), "input.grad": grads[0]}
    result.update({f"{n}.grad": g for n, g in zip(names, grads[1:], strict=True)})
    result.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return result


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor], tol: float, label: str) -> None:
    """max|got - want| <= tol * max|want| for every entry (integer buffers exactly)."""
    assert got.keys() == want.keys(), f"{label}: entries differ: {sorted(got.keys() ^ want.keys())}"
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, f"{label} {name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        if not w.is_floating_point():
            assert torch.equal(g, w), f"{label} {name}: {g} != {w}"
            continue
        err = (g.double() - w.double()).abs().max().item()
        scale = max(w.double().abs().max().item(), 1e-30)
        assert err <= tol * scale, f"{label} {name}: max abs error {err:.3e} > {tol:.0e} * max |want| {scale:.3e}"


def _x(n: int, size: int) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Parameter counts, structure, registry


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        fused, ref = models.get_model(name), models.get_model(name, fused=False)
    assert _numel(fused) == PARAMS[name], f"{name}: {_numel(fused):,} parameters, expected {PARAMS[name]:,}"
    assert fused.state_dict().keys() == ref.state_dict().keys(), name
    assert [p.shape for p in fused.parameters()] == [p.shape for p in ref.parameters()], name
    if name == "se_resnet50":
        # Hu et al. (Table 2) and issue 14: ~28.1M.
        assert abs(PARAMS[name] / 1e6 - 28.1) <= 0.01 * 28.1, f"{name}: {PARAMS[name]:,} not within 1% of 28.1M"
    else:
        # resnetN's parameters plus exactly the SE modules (r = 16: rd = 1, 2, 4).
        base_name, blocks = CIFAR_BASE[name]
        with torch.device("meta"):
            base = _numel(models.get_model(base_name))
        se = blocks * sum(c * (c // 16) + c // 16 + (c // 16) * c + c for c in (16, 32, 64))
        assert PARAMS[name] == base + se, f"{name}: {PARAMS[name]:,} != {base_name}'s {base:,} + SE {se:,}"


def test_se_resnet50_parameter_count_is_timms() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm): the timm checks go untested")
    with torch.device("meta"):
        theirs = timm.create_model("seresnet50", pretrained=False)
    assert _numel(theirs) == PARAMS["se_resnet50"], f"timm seresnet50: {_numel(theirs):,}"


def test_reduction_widths() -> None:
    # se_resnet50: timm's rule, which is C / 16 at its widths; the CIFAR models: C // 16 (Hu et al.'s r = 16).
    assert [timm_rd_channels(c) for c in (256, 512, 1024, 2048)] == [16, 32, 64, 128]
    assert [timm_rd_channels(c) for c in (16, 64, 100, 136)] == [8, 8, 8, 8]  # at least 8; 8.5 -> 8
    with torch.device("meta"):
        cifar, imagenet = models.se_resnet20(), models.se_resnet50()
    widths = {m.fc1.in_channels: m.fc1.out_channels for m in cifar.modules() if isinstance(m, SEModule)}
    assert widths == {16: 1, 32: 2, 64: 4}, widths
    widths = {m.fc1.in_channels: m.fc1.out_channels for m in imagenet.modules() if isinstance(m, SEModule)}
    assert widths == {256: 16, 512: 32, 1024: 64, 2048: 128}, widths
    with pytest.raises(ValueError, match="reduction must be >= 1, got 0"):
        SECifarResNet(20, reduction=0)


def test_timm_rd_channels_is_timms_rule() -> None:
    pytest.importorskip("timm", reason="timm is not installed (pip install timm): the timm checks go untested")
    from timm.layers import SEModule as TimmSEModule

    for c in (8, 16, 24, 64, 100, 136, 200, 256, 1000, 2048):
        assert timm_rd_channels(c) == TimmSEModule(c).fc1.out_channels, c


@pytest.mark.parametrize("fused", [True, False])
def test_blocks_fuse_every_bn_relu_and_end_with_an_identity_bn(fused: bool) -> None:
    with torch.device("meta"):
        for model in (models.se_resnet20(fused=fused), models.se_resnet50(fused=fused)):
            norms = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
            assert norms and all(m.fused == fused for m in norms)
            # No ReLU module outside SE's (whose ReLU runs on (N, rd, 1, 1) after a conv, no BatchNorm to fuse).
            assert not any(isinstance(m, nn.ReLU) for m in _non_se(model))
            for block in model.modules():
                if isinstance(block, SEBottleneck):
                    acts = (block.bn1.activation, block.bn2.activation, block.bn3.activation)
                    assert acts == ("relu", "relu", "identity"), acts
                elif isinstance(block, SEBasicBlock):
                    assert (block.bn1.activation, block.bn2.activation) == ("relu", "identity")


def _non_se(model: nn.Module) -> list[nn.Module]:
    """Every module outside the SE modules."""
    inside = {id(m) for se in model.modules() if isinstance(se, SEModule) for m in se.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def test_registry() -> None:
    names = set(models.list_models())
    assert set(PARAMS) <= names
    for name in PARAMS:
        assert models.get_model_builder(name).__name__ == name
        with torch.device("meta"):
            model = models.get_model(name, fused=False, num_classes=7)
        assert model.fc.out_features == 7, name
        assert not any(m.fused for m in model.modules() if isinstance(m, BatchNormAct2d)), name
        with torch.device("meta"):
            assert all(m.fused for m in models.get_model(name).modules() if isinstance(m, BatchNormAct2d)), name


def test_resnet20_state_dict_loads_into_se_resnet20_but_for_se() -> None:
    with torch.device("meta"):
        plain, se = models.resnet20(), models.se_resnet20()
    result = se.load_state_dict(plain.state_dict(), strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    assert result.missing_keys and all(".se." in k for k in result.missing_keys), result.missing_keys


# --------------------------------------------------------------------------------------------------------------
# What the SE module and block end compute


def test_se_module_matches_timms() -> None:
    pytest.importorskip("timm", reason="timm is not installed (pip install timm): the timm checks go untested")
    from timm.layers import SEModule as TimmSEModule

    torch.manual_seed(0)
    theirs = TimmSEModule(64).double()
    ours = SEModule(64, timm_rd_channels(64)).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 64, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-14, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_se_basic_block_is_relu_of_scaled_bn_plus_shortcut(fused: bool) -> None:
    """SE sits after bn2, before the shortcut: relu(bn2(conv2(.)) * s + shortcut), s = sigmoid(fc2 relu fc1 GAP)."""
    torch.manual_seed(0)
    block = SECifarResNet(8, fused=fused).double().layer2[0]  # 16 -> 32 channels, stride 2: option-A shortcut
    _randomise_norms(block, 4)
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    got = block.train()(x)

    def bn(m: nn.BatchNorm2d, t: Tensor) -> Tensor:
        return F.batch_norm(t, None, None, m.weight, m.bias, True, 0.0, m.eps)

    y = bn(block.bn2, block.conv2(torch.relu(bn(block.bn1, block.conv1(x)))))
    se = block.se
    s = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(y.mean((2, 3), keepdim=True), se.fc1.weight, se.fc1.bias)),
                               se.fc2.weight, se.fc2.bias))  # fmt: skip
    shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 16))
    torch.testing.assert_close(got, torch.relu(y * s + shortcut), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# se_resnet50 against timm's seresnet50


@pytest.fixture(scope="module")
def seresnet50_state() -> dict[str, Tensor]:
    """The state_dict of timm's seresnet50 (10 classes) in float64 with drawn BatchNorm parameters and running
    statistics; each test builds its own models from it (a training step updates the running statistics)."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm): the timm checks go untested")
    torch.manual_seed(0)
    model = timm.create_model("seresnet50", pretrained=False, num_classes=10).double()
    _randomise_norms(model, 5, running=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _load(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """``model`` (built on the meta device: no initialisation of 28M parameters) loaded strictly with copies of
    ``state`` (raises naming every missing or unexpected key)."""
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    return model


@pytest.fixture(scope="module")
def timm_results(seresnet50_state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """timm's seresnet50 on :func:`_x` (2, 48): its eval output, then a training step (:func:`_step`)."""
    import timm

    with torch.device("meta"):
        theirs = timm.create_model("seresnet50", pretrained=False, num_classes=10)
    theirs = _load(theirs, seresnet50_state)
    x = _x(2, 48)
    with torch.no_grad():
        out = theirs.eval()(x)
    assert out.abs().max() > 0 and torch.isfinite(out).all()
    return {"eval": {"output": out}, "step": _step(theirs, x), "keys": list(theirs.state_dict())}


def _se_resnet50(state: dict[str, Tensor], fused: bool) -> nn.Module:
    with torch.device("meta"):
        ours = models.se_resnet50(fused=fused, num_classes=10)
    return _load(ours, state)


@pytest.mark.parametrize("fused", [True, False])
def test_se_resnet50_loads_timm_strictly_and_matches_in_eval(
    seresnet50_state: dict, timm_results: dict, fused: bool
) -> None:
    ours = _se_resnet50(seresnet50_state, fused)
    assert list(ours.state_dict()) == timm_results["keys"]  # the same order too
    with torch.no_grad():
        got = ours.eval()(_x(2, 48))
    _assert_same({"output": got}, timm_results["eval"], TOL64, f"eval fused={fused}")


@pytest.mark.parametrize("fused", [True, False])
def test_se_resnet50_matches_timm_in_a_training_step(seresnet50_state: dict, timm_results: dict, fused: bool) -> None:
    # 2 x 3 x 48 x 48: layer4 runs at 2 x 2, so its BatchNorms see 8 values per channel (with 2: +-1 whatever x).
    got = _step(_se_resnet50(seresnet50_state, fused), _x(2, 48))
    _assert_same(got, timm_results["step"], TOL64, f"training step fused={fused}")


# --------------------------------------------------------------------------------------------------------------
# CIFAR models: fused against reference


def _cifar_pair() -> tuple[nn.Module, nn.Module]:
    """SE-ResNet-14 (two blocks per stage: identity and option-A block ends), reference seeded and drawn BatchNorm
    parameters, fused loaded with its state_dict; float64."""
    torch.manual_seed(0)
    ref = SECifarResNet(14, fused=False).double()
    _randomise_norms(ref, 3)
    fused = SECifarResNet(14, fused=True).double()
    fused.load_state_dict(ref.state_dict(), strict=True)
    return fused, ref


def test_cifar_fused_matches_reference_in_training_steps() -> None:
    fused, ref = _cifar_pair()
    x = _x(4, 16)
    for step in range(2):  # running statistics after two steps
        _assert_same(_step(fused, x + step), _step(ref, x + step), TOL64, f"SE-ResNet-14 step {step}")
    with torch.no_grad():
        _assert_same({"output": fused.eval()(x)}, {"output": ref.eval()(x)}, TOL64, "SE-ResNet-14 eval")


def test_cifar_channels_last_matches_reference() -> None:
    fused, ref = _cifar_pair()
    fused = fused.to(memory_format=torch.channels_last)
    x = _x(4, 16)
    _assert_same(_step(fused, x.to(memory_format=torch.channels_last)), _step(ref, x), TOL64, "channels_last")


def test_zero_init_residual_zeroes_the_bn_before_se() -> None:
    """Each block then starts as relu(shortcut): y = 0, so y * s adds nothing whatever s (Goyal et al. 2017)."""
    torch.manual_seed(0)
    cifar = models.se_resnet20(zero_init_residual=True).double()
    imagenet = models.ResNet(SEBottleneck, [1, 1, 1, 1], num_classes=10, zero_init_residual=True)
    lasts = [b.bn2 for b in cifar.modules() if isinstance(b, SEBasicBlock)]
    lasts += [b.bn3 for b in imagenet.modules() if isinstance(b, SEBottleneck)]
    assert len(lasts) == 13 and all(torch.all(bn.weight == 0) for bn in lasts)
    block = cifar.layer2[0].train()
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), torch.relu(block.downsample(x)), rtol=0, atol=0)

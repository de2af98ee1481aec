"""DenseNets: torchvision compatibility, fused vs reference parity, the memory-efficient layer, statistics reuse."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fusedres.ops.dense as dense_ops
from fusedres.models import get_model, list_models
from fusedres.models.densenet import DenseNet, densenet121, densenet_bc_100
from fusedres.nn.dense_layer import DenseFeatures, DenseLayer, dense_bn_act_conv, feature_stats

pytestmark = pytest.mark.needs_native

# A small DenseNet with every kind of module (stem, 2 blocks of 3 layers, a transition, norm5, classifier).
SMALL = {
    "growth_rate": 4,
    "block_config": (3, 3),
    "num_init_features": 6,
    "bn_size": 2,
    "num_classes": 5,
    "small_inputs": True,
}


def _small(dtype=torch.float64, seed=0, **kw) -> DenseNet:
    torch.manual_seed(seed)
    return DenseNet(**SMALL, **kw).to(dtype)


def _perturb_norms(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial affine parameters and running statistics (torchvision's init sets weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward + backward; returns (output, input grad, parameter grads) and zeroes the grads."""
    x = x.clone().requires_grad_()
    y = model(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a non-uniform upstream gradient
    (y * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _assert_same_state(a: nn.Module, b: nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], msg=k, **tol)


def _assert_steps_match(a: nn.Module, b: nn.Module, x: torch.Tensor, steps: int = 2, **tol) -> None:
    for _ in range(steps):
        ya, gxa, gpa = _step(a, x)
        yb, gxb, gpb = _step(b, x)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(gxa, gxb, **tol)
        assert gpa.keys() == gpb.keys()
        for k in gpa:
            torch.testing.assert_close(gpa[k], gpb[k], msg=k, **tol)
        _assert_same_state(a, b, **tol)


def test_densenet_bc_100_has_769162_parameters():
    model = densenet_bc_100()
    assert sum(p.numel() for p in model.parameters()) == 769_162
    assert {"densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc_100"} <= set(list_models())
    assert isinstance(get_model("densenet_bc_100", fused=False), DenseNet)


def test_torchvision_densenet121_state_dict_loads_strict():
    # Keys and shapes only (meta tensors); test_matches_torchvision_densenet121_in_training loads real weights.
    with torch.device("meta"):
        tv = torchvision.models.densenet121()
    for fused in (True, False):
        with torch.device("meta"):
            ours = densenet121(fused=fused)
        ours.load_state_dict(tv.state_dict(), strict=True)
        tv.load_state_dict(ours.state_dict(), strict=True)


def test_builders_have_torchvision_shapes():
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        for name in ("densenet121", "densenet161", "densenet169", "densenet201"):
            ours = {k: v.shape for k, v in get_model(name).state_dict().items()}
            theirs = {k: v.shape for k, v in getattr(torchvision.models, name)().state_dict().items()}
            assert ours == theirs, name


def test_matches_torchvision_densenet121_in_training():
    """One set of weights in torchvision's densenet121 and the fused memory-efficient model, one training step.

    float64 (float32 BatchNorm training gradients through 120 BN layers at this tiny size amplify rounding
    differences: torchvision vs our reference differ by 7e-4 of the largest input gradient in float32, exactly 0
    in float64). Batch 4 so that the last block (1x1 spatial) normalises over 4 values per channel.
    """
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(num_classes=10).double()
    _perturb_norms(tv)
    fused = densenet121(num_classes=10).double()
    fused.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y_tv, gx_tv, gp_tv = _step(tv, x)
    y, gx, gp = _step(fused, x)
    torch.testing.assert_close(y, y_tv, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gx, gx_tv, rtol=1e-9, atol=1e-10 * gx_tv.abs().max().item())
    for k in gp:
        torch.testing.assert_close(gp[k], gp_tv[k], rtol=1e-9, atol=1e-10 * gp_tv[k].abs().max().item(), msg=k)
    _assert_same_state(fused, tv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_fused_matches_reference_float64(memory_efficient):
    ref = _small()
    fused = _small(memory_efficient=memory_efficient)
    _perturb_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    _assert_steps_match(fused, ref, x, steps=2, rtol=1e-10, atol=1e-12)
    assert int(fused.features.denseblock2.denselayer3.norm1.num_batches_tracked) == 2


def test_memory_efficient_is_identical_to_stored_bn_output():
    """The recompute reproduces the forward's BN/act output bit for bit: the same outputs, gradients, buffers."""
    a, b = _small(torch.float32), _small(torch.float32, memory_efficient=False)
    _perturb_norms(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 8, 8)
    _assert_steps_match(a, b, x, steps=2, rtol=0, atol=0)


def test_running_statistics_updated_once_per_forward():
    """torchvision's memory_efficient=True (checkpointing) updates them twice per step (pytorch issue 96136)."""
    ref = _small(torch.float32)
    fused = _small(torch.float32)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 8, 8)
    for steps in (1, 2):
        _step(ref, x)
        _step(fused, x)
        for (k, a), b in zip(fused.state_dict().items(), ref.state_dict().values()):
            if k.endswith("num_batches_tracked"):
                assert int(a) == int(b) == steps, k
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_checkpoint_baseline_computes_the_reference():
    ref, ckpt = _small(), _small(fused=False, checkpoint=True)
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ya, gxa, gpa = _step(ref, x)
    yb, gxb, gpb = _step(ckpt, x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(gxa, gxb)
    for k in gpa:
        torch.testing.assert_close(gpa[k], gpb[k], msg=k)
    # The baseline's known defect, why it is only a baseline: the recomputation counts the batch again.
    assert int(ckpt.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 2
    assert int(ref.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="checkpoint=True .* needs fused=False"):
        DenseNet(**SMALL, checkpoint=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_efficient", [True, False])
def test_statistics_reuse_matches_recomputing_them(dtype, memory_efficient):
    """A layer fed the block's per-map statistics equals one whose BatchNorm reduces the concatenation itself."""
    torch.manual_seed(0)
    maps = [torch.randn(4, c, 5, 5, dtype=dtype) * s + s for c, s in ((6, 1.0), (4, 3.0), (4, 0.5))]
    layers = [DenseLayer(14, 4, 2, memory_efficient=memory_efficient).to(dtype) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    outs = []
    for layer, stats in zip(layers, ([feature_stats(m) for m in maps], None)):
        inputs = [m.clone().requires_grad_() for m in maps]
        y = layer(DenseFeatures(inputs, stats))
        y.backward(torch.ones_like(y))
        outs.append([y, *(t.grad for t in inputs), *(p.grad for p in layer.parameters()), *layer.buffers()])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-12}
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)


def test_memory_efficient_layer_saves_no_bn_output():
    """Autograd keeps the layer's inputs, the bottleneck output (conv1's) and per-channel vectors, nothing else."""
    torch.manual_seed(0)
    maps = [torch.randn(2, c, 6, 6, requires_grad=True) for c in (8, 4)]
    sizes = {}
    for me in (True, False):
        layer = DenseLayer(12, 4, 2, memory_efficient=me)
        saved = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(DenseFeatures(maps, [feature_stats(m) for m in maps]))
        big = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]  # activations (not weights or vectors)
        sizes[me] = {t.untyped_storage().data_ptr(): t.numel() for t in big}
        y.sum().backward()
    inputs = {m.untyped_storage().data_ptr() for m in maps}
    extra_me = {p: n for p, n in sizes[True].items() if p not in inputs}
    assert list(extra_me.values()) == [2 * 8 * 36]  # conv1's output (input of the second unit), saved once
    assert sum(sizes[False].values()) > sum(sizes[True].values()) + 2 * 12 * 36  # the stored path keeps BN outputs


def test_eval_mode_matches_reference():
    ref, fused = _small(), _small()
    _perturb_norms(ref)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ref.eval()
    fused.eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-12, atol=1e-12)
    ya, gxa, gpa = _step(fused, x)  # eval mode with gradients (e.g. fine-tuning with frozen statistics)
    yb, gxb, gpb = _step(ref, x)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gxa, gxb, rtol=1e-10, atol=1e-12)
    for k in gpa:
        torch.testing.assert_close(gpa[k], gpb[k], rtol=1e-10, atol=1e-12, msg=k)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_channels_last_matches_reference():
    ref = _small(torch.float32)
    fused = _small(torch.float32).to(memory_format=torch.channels_last)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 8, 8)
    ya, gxa, gpa = _step(fused, x.to(memory_format=torch.channels_last))
    yb, gxb, gpb = _step(ref, x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxa, gxb, rtol=1e-5, atol=1e-6)
    for k in gpa:
        torch.testing.assert_close(gpa[k], gpb[k], rtol=1e-4, atol=1e-5, msg=k)
    _assert_same_state(fused, ref, rtol=1e-5, atol=1e-6)


def test_without_native_kernels_runs_the_reference(monkeypatch):
    ref, fused = _small(), _small()
    fused.load_state_dict(ref.state_dict())
    monkeypatch.setattr(dense_ops, "_NATIVE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(dense_ops, "_warned_devices", {"cpu"})  # the fallback warning is tested with the op
    _assert_steps_match(fused, ref, torch.randn(3, 3, 8, 8, dtype=torch.float64), steps=1, rtol=1e-12, atol=1e-12)


def test_functional_errors_and_double_backward():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="inputs must be a list or tuple of Tensors"):
        dense_bn_act_conv(x, w, None, None, training=True)
    with pytest.raises(ValueError, match=r"input_stats must have one \(mean, var\) pair per input \(1\), got 2"):
        dense_bn_act_conv([x], w, None, None, training=True, input_stats=[feature_stats(x)] * 2)
    with pytest.raises(ValueError, match=r"conv_weight must be a 4-D Tensor \[C_out, C_in, kh, kw\], got shape \[3, 4"):
        dense_bn_act_conv([x], w[:, :, 0, 0], None, None, training=True)
    y = dense_bn_act_conv([x], w, None, None, training=True)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.needs_native
def test_compile_fullgraph_training_step_matches_reference() -> None:
    """A fused, memory-efficient DenseNet under torch.compile(fullgraph=True): training forward + backward equal
    the eager reference model's (float64), running statistics included."""
    torch.manual_seed(0)
    cfg = {"growth_rate": 4, "block_config": (2, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 5}
    fused = DenseNet(**cfg, small_inputs=True).double()
    ref = DenseNet(**cfg, small_inputs=True, fused=False).double()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = torch.compile(fused, fullgraph=True)(x)
    out.square().sum().backward()
    out_ref = ref(x)
    out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    for (name, p), p_ref in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")

"""Shared checks for the convert() coverage tests: a training step of a converted model against the original.

float64: outputs, input and parameter gradients and buffers (running statistics) after the step equal to rounding.
float32: each of them within 2x the error of the original float32 model (or within 1e-4 of the entry's largest
value), both measured against the original in float64 on the same rounded input and parameters: the project's
low-precision criterion (tests/test_resnet_models.py).

Two things make float32 whole-model comparisons a lottery unless kept out, and the setup keeps them out: a deep,
randomly initialised residual network trained on a batch of 2 is chaotic (a ReLU mask flipped by rounding is
amplified by BatchNorms over a few values per channel), so the residual branches are damped (their last BatchNorm
weight x 0.2, like a partial zero_init_residual); and a max-pool routes its gradient by an argmax, so where rounding
breaks a near-tie differently from float64 the gradients upstream of that max-pool are not compared (everything
after it still is). The same holds for a ReLU whose float32 mask differs from float64's only at pre-activations
within 1e-4 of the layer's largest |z| of 0 (mobile networks normalise their last stages over a few values, so
damping alone does not keep such ties out).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres.convert import ConvertReport


def randomize_norms(model: nn.Module, seed: int = 3) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics (libraries initialise them to 1, 0, 0, 1, and timm
    zero-initialises each block's last BN weight, which would zero the gradients of the whole residual branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def damp_residual_branches(model: nn.Module, factor: float = 0.2) -> None:
    """Scales the weight of each residual block's last BatchNorm (those convert() fuses with the shortcut add, or
    fuses alone at an SE / drop_path boundary) by ``factor``, like a partial ``zero_init_residual``: a deep, randomly
    initialised ResNet trained on a batch of 2 is chaotic (rounding flips ReLU masks, and BatchNorms over a few
    values per channel amplify the flips), which would make float32-vs-float64 errors a lottery for any model."""
    _, probe = fusedres.convert(model, report=True)  # a copy: only the names of the block ends are used
    names = {c.name for c in probe.converted if c.residual}
    names |= {name for name, reason in probe.alone.items() if reason.startswith("block end")}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            modules[name].weight.mul_(factor)


class MaxPoolTrace:
    """Records, during one forward, the modules owning parameters in the order they run, each max-pool's argmax
    indices and each ReLU-like activation's mask, so that a float32 step whose gradient takes another route than
    float64's at a near-tie decided by rounding (two max-pool window values, or a ReLU pre-activation at ~0) can be
    told apart from an inaccurate kernel.

    Activations: plain ``nn.ReLU`` / ``nn.ReLU6`` / ``nn.LeakyReLU`` (their input z is kept too) and fused BatchNorms
    with a mask activation, keyed by the last parameter module that ran (the BatchNorm, in both forms)."""

    MASK_ACTS = ("relu", "leaky_relu", "relu6")
    NEAR_TIE = 1e-4  # a flipped mask bit is a near-tie when the float64 |z| is below this share of the layer's max

    def __init__(self, model: nn.Module) -> None:
        self.order: list[str] = []
        self.pools: dict[str, tuple[int, torch.Tensor]] = {}
        self.masks: dict[str, tuple[int, torch.Tensor, torch.Tensor | None]] = {}
        self._handles = []
        for name, m in model.named_modules():
            if any(True for _ in m.parameters(recurse=False)):
                self._handles.append(m.register_forward_pre_hook(lambda m, i, name=name: self.order.append(name)))
            if type(m) is nn.MaxPool2d:
                self._handles.append(m.register_forward_hook(lambda m, i, o, name=name: self._pool(name, m, i[0])))
            if type(m) in (nn.ReLU, nn.ReLU6, nn.LeakyReLU):
                relu6 = type(m) is nn.ReLU6
                # the input before an in-place activation overwrites it
                self._handles.append(m.register_forward_pre_hook(lambda m, i: setattr(self, "_z", i[0].detach().clone())))
                self._handles.append(m.register_forward_hook(lambda m, i, o, r6=relu6: self._mask(o, r6, self._z)))
            elif getattr(m, "activation", None) in self.MASK_ACTS and isinstance(m, nn.modules.batchnorm._BatchNorm):
                relu6 = m.activation == "relu6"
                self._handles.append(m.register_forward_hook(lambda m, i, o, r6=relu6: self._mask(o, r6, None)))

    def _pool(self, name: str, m: nn.MaxPool2d, x: torch.Tensor) -> None:
        _, idx = F.max_pool2d(
            x.detach(), m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True
        )
        self.pools[name] = (len(self.order), idx)

    def _mask(self, out: torch.Tensor, relu6: bool, z: torch.Tensor | None) -> None:
        out = out.detach()
        mask = (out > 0) & (out < 6) if relu6 else out > 0
        if self.order:
            self.masks[self.order[-1]] = (len(self.order), mask, z)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def upstream_of_flips(self, ref: MaxPoolTrace) -> set[str]:
        """Names of the modules that ran before a max-pool whose argmax differs from ``ref``'s (their parameter
        gradients, and the input gradient, went through the other routing)."""
        upstream: set[str] = set()
        for name, (pos, idx) in self.pools.items():
            if not torch.equal(idx, ref.pools[name][1]):
                upstream |= set(self.order[:pos]) | {"input"}
        return upstream

    def upstream_of_relu_ties(self, ref: MaxPoolTrace) -> set[str]:
        """Names of the modules that ran up to an activation whose mask differs from ``ref``'s (a float64 trace of
        the plain model) only where ``ref``'s pre-activation is a near-tie (|z| <= NEAR_TIE * max |z|): their
        gradients went through another ReLU branch, a discontinuity of the function. A mask that differs anywhere
        else is not a tie, and nothing is skipped for it (the comparison then shows the error)."""
        upstream: set[str] = set()
        for key, (pos, mask, _) in self.masks.items():
            if key not in ref.masks or ref.masks[key][2] is None or ref.masks[key][1].shape != mask.shape:
                continue
            _, ref_mask, z = ref.masks[key]
            diff = mask != ref_mask
            if diff.any() and bool((z[diff].abs() <= self.NEAR_TIE * z.abs().max()).all()):
                upstream |= set(self.order[:pos]) | {"input"}
        return upstream


def step(model: nn.Module, x: torch.Tensor, seed: int = 7, trace: list | None = None) -> dict[str, torch.Tensor]:
    """One training-mode forward + backward: output, input and parameter gradients, buffers after the step.

    The RNG is seeded before the forward, so random layers (dropout, DropPath) draw the same masks in both models.
    With ``trace`` (a list), a :class:`MaxPoolTrace` of the forward is appended to it.
    """
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    tracer = MaxPoolTrace(model) if trace is not None else None
    out = model(x)
    if tracer is not None:
        tracer.remove()
        trace.append(tracer)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad((out * w).sum(), (x, *params), allow_unused=True)
    res = {"output": out.detach(), "input.grad": grads[0]}
    res.update({f"{n}.grad": g for n, g in zip(names, grads[1:], strict=True) if g is not None})
    res.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return res


def assert_same(got: dict, want: dict, rtol: float, atol: float) -> None:
    """Elementwise closeness with atol relative to the tensor's largest value (a gradient element that is a small
    difference of large terms may differ in its last digits between two float64 summation orders)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k, w in want.items():
        scale = w.abs().max().item() if w.is_floating_point() and w.numel() else 1.0
        torch.testing.assert_close(got[k], w, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m, k=k: f"{k}: {m}")


def assert_float32_as_accurate(
    got32: dict, orig32: dict, ref64: dict, tol: float = 1e-4, skip_upstream: set[str] = frozenset()
) -> None:
    """Against the float64 step, every float32 entry of the converted model is within ``tol`` of the entry's
    largest value, or at most twice as far off as the original float32 model (the project's low-precision
    criterion, as in test_resnet_models: where the original itself is far off, rounding flipped a ReLU mask, and
    the converted model may flip another one).

    The ``tol`` floor of a ``X.bias.grad`` entry is relative to the larger of its own and ``X.weight.grad``'s
    largest value: for a BatchNorm both are sums over the same N*H*W terms of one upstream gradient (dz and
    dz * xhat, |xhat| ~ 1), so they share one rounding scale. A bias gradient can cancel to 0 and lose its own
    scale: a MobileNet projection BatchNorm, whose output reaches a training-mode BatchNorm through linear layers
    only, has bias gradient 0 in exact arithmetic (1e-15 in float64); float32 steps give 1e-6 of rounding noise
    there, PyTorch's included (one draw of it), a 2x comparison of two noise draws is chance.

    Gradients of the modules named in ``skip_upstream`` (and of the input, when "input" is there) are not
    compared: they ran before a max-pool that the converted float32 step routed differently from float64 at a
    near-tie (see :class:`MaxPoolTrace`), a discontinuity of the function itself, not an error of the kernels.
    """
    assert got32.keys() == orig32.keys() == ref64.keys()
    bad = []
    for k, want in ref64.items():
        if k == "input.grad" and "input" in skip_upstream:
            continue
        if k.endswith(".grad") and k[: -len(".grad")].rpartition(".")[0] in skip_upstream:
            continue
        if not want.is_floating_point():
            if not torch.equal(got32[k], want.to(got32[k].dtype)):
                bad.append(f"{k}: {got32[k]} != {want}")
            continue
        scale = max(want.abs().max().item(), 1e-30)
        if k.endswith(".bias.grad") and (sibling := ref64.get(k[: -len("bias.grad")] + "weight.grad")) is not None:
            scale = max(scale, sibling.abs().max().item())
        err = (got32[k].double() - want).abs().max().item()
        orig_err = (orig32[k].double() - want).abs().max().item()
        if err > max(tol * scale, 2 * orig_err):
            bad.append(f"{k}: {err:.3e} > max({tol:.0e} * {scale:.3e}, 2 * original's {orig_err:.3e})")
    assert not bad, "float32: " + "; ".join(bad[:8]) + (f" ... ({len(bad)} in all)" if len(bad) > 8 else "")


def check_converted_training_step(
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    *,
    min_share: float,
    rtol64: float = 1e-9,
    atol64: float = 1e-11,
    seed: int = 0,
) -> tuple[nn.Module, ConvertReport]:
    """Builds the model (float64), converts it, checks the fused share, state_dict keys, a float64 training step,
    eval outputs, then a float32 training step within 2x of the original's float32 error. Returns the converted
    float64 model (after the step) and the report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a shared 2-core machine: threads would mostly wait for each other
    try:
        return _check_converted_training_step(build, shape, min_share, rtol64, atol64, seed)
    finally:
        torch.set_num_threads(threads)


def _check_converted_training_step(
    build: Callable[[], nn.Module], shape: tuple[int, ...], min_share: float, rtol64: float, atol64: float, seed: int
) -> tuple[nn.Module, ConvertReport]:
    torch.manual_seed(seed)
    original = randomize_norms(build()).double().train()
    damp_residual_branches(original)
    converted, report = fusedres.convert(original, report=True)
    assert report.fused_share >= min_share, report.summary()
    assert list(converted.state_dict()) == list(original.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    orig32, conv32 = copy.deepcopy(original).float(), copy.deepcopy(converted).float()
    x32 = x.float()
    # The float64 reference runs on the float32-rounded input and parameters, which both float32 models share.
    traces: list[MaxPoolTrace] = []
    ref64 = step(copy.deepcopy(orig32).double(), x32.double(), trace=traces)
    got32 = step(conv32, x32, trace=traces)
    skip = traces[1].upstream_of_flips(traces[0])
    # Everything after the first max-pool is always compared (in the models here: all but the stem and the input).
    assert len(skip) < len(traces[1].order) // 2, f"max-pool near-ties cover most of the model: {sorted(skip)}"
    # A ReLU near-tie flipped by rounding (measured: mnasnet0_5, a pre-activation of 3e-6 in its last block): what
    # ran before it is not compared; the output and everything after it still is.
    skip |= traces[1].upstream_of_relu_ties(traces[0])
    assert_float32_as_accurate(got32, step(orig32, x32), ref64, skip_upstream=skip)
    assert_same(step(converted, x), step(original, x), rtol=rtol64, atol=atol64)
    converted.eval()
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=rtol64, atol=atol64)
    return converted, report

"""A training step of every model of ``fusedres.models.list_models()``, fused against the reference, as a new user
would run it: default arguments plus ``num_classes``, a small batch, in float64, float32, channels_last, CPU bfloat16
autocast and under ``torch.compile``.

A step is forward, cross-entropy, backward and one SGD step (momentum 0.9). Every parameter must get a finite
gradient of its own dtype. What is compared:

* float64 (the CIFAR-sized models, where it is cheap): everything a step produces — loss, logits, every parameter
  gradient, every parameter after the step and every buffer (running statistics) — fused equal to the reference
  to float64 rounding amplified by the depth of the network.
* float32 and channels_last: the forward results (loss, logits, running statistics after the step) and the
  gradients together (one vector) within 2x the reference model's float32 error of the float64 reference step.
  Per-tensor gradient errors are not judged in float32 (float64 parity is the gradients' check). The gradients are
  judged on the ReLU branches each float32 step took (:class:`ReluBranches`): these steps are chaotic at batch 2 —
  a BatchNorm-ReLU pre-activation within the float32 network's own forward error of 0 takes the other branch than
  in float64 and moves every upstream gradient by ~1e-3 relative (measured: resnet110's reference flips 4 such
  elements, |z| 1e-7 to 6e-6 where the layers' float32 pre-activations are up to 1e-5 off, and its gradients are
  9.5e-3 off float64; the fused model flips 1 and is 1.6e-3 off; each is 4e-6 off the float64 step that takes its
  branches; preact_resnet56's fused step: 1 flip at z64 = 1.7e-6, 2.7e-3 off float64, 5.3e-6 on its branches). So each float32 step's gradients are compared with the float64 step forced onto that step's branches
  where they differ at a near-tie: |z64| within 2x the reference float32 step's largest pre-activation error in that
  layer (a branch either float32 network may take). A branch taken anywhere else is not forced, and the error shows.
* autocast (bfloat16): loss, logits, running statistics and the gradient vector within 2x the reference model's
  autocast error of the reference's float32 step, plus a bfloat16 floor.
* torch.compile (Inductor) of the fused model: one graph, no graph break, no recompile on the next step, the eager
  reference's float32 step to float32 tolerance.

Inputs: CIFAR-sized models take 2 x 3 x 32 x 32; ImageNet models 2 x 3 x 64 x 64, so that their last stage still
sees 8 values per channel (with 2, BatchNorm's output is +-1 whatever the input and the step is ill-conditioned:
float32 and float64 losses of densenet121 differ in the second digit).

Default run (``make test``): float64 / float32 / channels_last for every CIFAR-sized model and for one ImageNet model
of each block type (resnet18, resnet50, resnext50_32x4d, densenet121); autocast for one model of each kind; compile
for the small models. bfloat16 convolutions and Inductor compiles are slow on 2 CPU cores and the deeper ImageNet
models only repeat the same blocks, so the rest is marked ``exhaustive`` (``make test-models``,
``FUSEDRES_EXHAUSTIVE=1``: tens of minutes).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

import fusedres
from fusedres import reference
from fusedres.models import get_model, list_models
from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.nn.dense_layer import DenseFeatures, DenseNormAct2d

pytestmark = pytest.mark.needs_native

MODELS = list_models()
NUM_CLASSES = 10
BATCH = 2
STEP_SEED = 2
CIFAR = {
    "densenet_bc_100", "highway_convnet", "highway_mlp", "preact_resnet20", "preact_resnet32", "preact_resnet44",
    "preact_resnet56", "preact_resnet110", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
}  # fmt: skip
IMAGENET_DEFAULT = {"resnet18", "resnet50", "resnext50_32x4d", "densenet121"}
# One model of each kind for the slow modes: CIFAR ResNet (option-A shortcut), pre-activation ResNet, ImageNet
# BasicBlock and Bottleneck, the CIFAR and ImageNet DenseNets, both highway networks.
AUTOCAST_DEFAULT = {
    "resnet20", "preact_resnet20", "resnet18", "resnet50", "densenet_bc_100", "densenet121", "highway_mlp",
    "highway_convnet",
}  # fmt: skip
COMPILE_DEFAULT = {"resnet20", "preact_resnet20", "highway_mlp", "highway_convnet"}

# Relative (to each tensor's norm) floors of the 2x rule: float32 summation noise of a deep network; bfloat16.
FLOOR32 = 1e-5
FLOOR_AUTOCAST = 4e-3
# Fused vs reference float32, no float64 judge (ImageNet models, compiled models): forward results; gradients.
TOL_FORWARD32 = 1e-4
TOL_GRADS32 = 1e-2
# float64 fused vs reference: 1e-16 rounding amplified by up to 100 layers.
TOL64 = 1e-8


def image_size(name: str) -> int:
    return 32 if name in CIFAR else 64


def _params(modes: dict[str, set[str]], names=MODELS) -> list:
    """(name, mode) cases, model by model (one model pair is alive at a time); non-default ones are exhaustive."""
    return [
        pytest.param(name, mode, marks=[] if name in default else [pytest.mark.exhaustive], id=f"{name}-{mode}")
        for name in names
        for mode, default in modes.items()
    ]


# ------------------------------------------------------------------------------------------------------- harness


class Pair:
    """The reference model built with a fixed seed and the fused model loaded with its state_dict, a batch, the
    initial state, and the reference's step results per setting (several tests judge against the same ones)."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.name = name
        self.ref = get_model(name, fused=False, num_classes=NUM_CLASSES)
        self.fused = get_model(name, fused=True, num_classes=NUM_CLASSES)
        self.state = {k: v.clone() for k, v in self.ref.state_dict().items()}
        self.fused.load_state_dict(self.state, strict=True)
        g = torch.Generator().manual_seed(1)
        size = image_size(name)
        self.x = torch.randn(BATCH, 3, size, size, generator=g)
        self.y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
        self.results: dict[tuple, dict] = {}
        self.branches: dict[tuple, ReluBranches] = {}

    def reset(self, model: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
        model.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.load_state_dict(self.state, strict=True)
        return model

    def step(self, fused: bool, dtype: torch.dtype = torch.float32, channels_last: bool = False, amp: bool = False):
        key = (fused, dtype, channels_last, amp)
        if key not in self.results:
            model = self.reset(self.fused if fused else self.ref, dtype, channels_last)
            x = self.x.to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # The ReLU branches of the eager float32 / float64 steps (the reference keeps its pre-activations).
            trace = ReluBranches(model, keep_z=not fused) if not amp else None
            try:
                self.results[key] = training_step(model, model, x, self.y, amp)
            finally:
                if trace is not None:
                    trace.remove()
            if trace is not None:
                self.branches[key] = trace
        return self.results[key]

    def step_on_branches(self, forced: dict[str, Tensor]) -> dict[str, Tensor]:
        """The reference's float64 step with the ReLUs of the BatchNorms named in ``forced`` taking the given
        branches (masks) instead of their own (not cached: one per float32 step that flipped a near-tie)."""
        model = self.reset(self.ref, torch.float64, False)
        trace = ReluBranches(model, keep_z=False, forced=forced)
        try:
            return training_step(model, model, self.x.to(torch.float64), self.y, False)
        finally:
            trace.remove()


@functools.lru_cache(maxsize=1)
def pair(name: str) -> Pair:
    return Pair(name)


def training_step(call: nn.Module, model: nn.Module, x: Tensor, y: Tensor, amp: bool) -> dict[str, Tensor]:
    """Forward (through ``call``), cross-entropy, backward, one SGD step of ``model``; everything it produces, in
    float64: "loss", "logits", "grad <name>", "param <name>" (after the step), "buffer <name>"."""
    model.train()
    # Every step draws the same random numbers (stochastic depth's masks, Shake-Shake's alpha / beta: drawn in float32
    # whatever the dtype, fused and reference alike), so fused, reference and float64 steps compute the same function.
    torch.manual_seed(STEP_SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = call(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    out = {"loss": loss.detach().double().reshape(1), "logits": logits.detach().double()}
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n}: no gradient"
        assert p.grad.dtype == p.dtype, f"{n}: gradient dtype {p.grad.dtype} != parameter dtype {p.dtype}"
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite gradient"
        out[f"grad {n}"] = p.grad.detach().double()
    opt.step()
    for n, p in model.named_parameters():
        out[f"param {n}"] = p.detach().double()
    for n, b in model.named_buffers():
        out[f"buffer {n}"] = b.detach().double()
    return out


def rel(a: Tensor, b: Tensor, den: float | None = None) -> float:
    """||a - b|| / den, by default den = ||b|| (0 when both are zero)."""
    num = (a - b).norm().item()
    den = b.norm().item() if den is None else den
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def error_scale(res: dict[str, Tensor], k: str) -> float:
    """The norm entry ``k``'s error is measured against: its own, except a running mean's, which is measured in units
    of its running std (at least): eval normalises x - running_mean by it, so that is where an error of the mean
    matters. A BatchNorm fed by a BatchNorm (PyramidNet's un-activated residual stream: stem BN -> bn1) has a batch
    mean of ~0 (1e-17 in float64), and every float32 step's running mean is rounding noise relative to it: there,
    relative to its own norm, the reference's error is 1.7e7 and ours 1.1e9, in running stds 1.3e-10 and 8.5e-9
    (measured on pyramidnet110_a48; our kernels' float partial sums put the batch mean within ~1e-8 std, PyTorch's
    CPU sums in double)."""
    own = res[k].norm().item()
    if k.startswith("buffer ") and k.endswith(".running_mean"):
        var = res.get(k[: -len("running_mean")] + "running_var")
        if var is not None:
            return max(own, var.clamp_min(0).sqrt().norm().item())
    return own


def forward_part(res: dict[str, Tensor]) -> dict[str, Tensor]:
    """Loss, logits and buffers (running statistics: forward quantities, continuous in the inputs)."""
    return {k: v for k, v in res.items() if k in ("loss", "logits") or k.startswith("buffer ")}


def grad_vector(res: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"gradients (one vector)": torch.cat([v.flatten() for k, v in res.items() if k.startswith("grad ")])}


def assert_2x_rel(ours: dict, same: dict, judge: dict, floor: float, what: str) -> None:
    """Per entry: rel(ours, judge) <= 2 rel(same, judge) + floor (``same``: the reference in ours' setting), both
    errors relative to error_scale(judge)."""
    assert ours.keys() == judge.keys() == same.keys()
    bad = []
    for k, j in judge.items():
        assert torch.isfinite(ours[k]).all(), f"{what}: {k} is not finite"
        den = error_scale(judge, k)
        err, ref_err = rel(ours[k], j, den), rel(same[k], j, den)
        if not err <= 2 * ref_err + floor:
            bad.append(f"{k}: {err:.3g} > 2 x {ref_err:.3g} + {floor:g}")
    assert not bad, f"{what}: {len(bad)} of {len(judge)} outside the 2x rule:\n  " + "\n  ".join(bad[:10])


def assert_close_rel(ours: dict, same: dict, tol: float, what: str) -> None:
    assert ours.keys() == same.keys()
    errs = {k: rel(ours[k], v, error_scale(same, k)) for k, v in same.items()}
    bad = [f"{k}: {e:.3g}" for k, e in errs.items() if not e <= tol]
    assert not bad, f"{what}: {len(bad)} of {len(same)} differ by more than {tol:g} (relative norm):\n  " + "\n  ".join(
        bad[:10]
    )


# ------------------------------------------------------------------------------------------------- ReLU branches


class ReluBranches:
    """During one training step: the branch each BatchNorm-ReLU took (``masks[name]``: pre-activation > 0, the
    mask its backward uses) and, with ``keep_z`` (reference models), the pre-activation itself (``z[name]``).

    With ``forced`` (name -> mask; a reference model), those BatchNorms return ``where(mask, z, 0)``: the same
    forward values up to |z| at the forced elements, the gradient through the given branches.

    Reference BatchNorms are observed by hooks; their pre-activation is recomputed from the same inputs by the same
    PyTorch ops (bit for bit, checked against the output's mask). A fused BatchNormAct2d's mask is its output's
    (relu(z) > 0); a fused dense BatchNorm fused with its convolution (``DenseNormAct2d.bn_act_conv``, which returns
    the convolution's output) is asked for its mask by the dense op on the same inputs and statistics (the kernel
    computes the same z from them, as its backward's recomputation relies on).
    """

    def __init__(self, model: nn.Module, keep_z: bool, forced: dict[str, Tensor] | None = None) -> None:
        self.masks: dict[str, Tensor] = {}
        self.z: dict[str, Tensor] = {}
        self.keep_z = keep_z
        self.forced = dict(forced or {})
        self._handles: list = []
        self._wrapped: list[nn.Module] = []
        for name, m in model.named_modules():
            if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and getattr(m, "activation", None) == "relu"):
                continue
            self._handles.append(m.register_forward_hook(functools.partial(self._on_forward, name), with_kwargs=True))
            if m.fused and isinstance(m, DenseNormAct2d):
                m.bn_act_conv = functools.partial(self._bn_act_conv, name, m, m.bn_act_conv)
                self._wrapped.append(m)
        forceable = {n for n, m in model.named_modules() if getattr(m, "activation", None) == "relu" and not m.fused}
        assert set(self.forced) <= forceable, f"no reference BatchNorm-ReLU to force: {set(self.forced) - forceable}"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for m in self._wrapped:
            del m.bn_act_conv  # the instance attribute: the class's method again
        self._handles, self._wrapped = [], []

    def _record(self, name: str, mask: Tensor) -> None:
        assert name not in self.masks, f"{name} ran twice in one step"
        self.masks[name] = mask

    def _on_forward(self, name: str, m: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor | None:
        if not m.training:
            return None
        if m.fused:
            self._record(name, out.detach() > 0)
            return None
        dense = isinstance(m, DenseBatchNormAct2d)  # forward(inputs, input_stats), no residual
        inputs = args[0] if args else kwargs["inputs" if dense else "input"]
        # BatchNormAct2d.forward(input, residual, scale, backward_scale): a block end (stochastic depth, Shake-Shake)
        extra = {} if dense else dict(zip(("residual", "scale", "backward_scale"), args[1:])) | kwargs
        extra.pop("input", None)
        if isinstance(inputs, DenseFeatures):
            inputs = inputs.maps
        x = torch.cat(list(inputs), 1) if isinstance(inputs, (list, tuple)) else inputs
        # The reference op itself with the identity: the same pre-activation, bit for bit. Running statistics None:
        # the same batch-statistics output, no second update of the buffers.
        z = reference.batch_norm_act(x, None, None, m.weight, m.bias, True, 0.0, m.eps, activation="identity", **extra)
        assert torch.equal(z.detach() > 0, out.detach() > 0), f"{name}: recomputed pre-activation != the output's"
        self._record(name, z.detach() > 0)
        if self.keep_z:
            self.z[name] = z.detach()
        if name in self.forced:
            return torch.where(self.forced[name], z, torch.zeros_like(z))
        return None

    def _bn_act_conv(self, name: str, m: nn.Module, bn_act_conv, features, *args, **kwargs) -> Tensor:
        if m.training:
            with torch.no_grad():
                y = fusedres.dense_batch_norm_act(
                    [t.detach() for t in features.maps], None, None, m.weight, m.bias, True, 0.0, m.eps,
                    activation="relu", input_stats=features.stats,
                )  # fmt: skip
            self._record(name, y > 0)
        return bn_act_conv(features, *args, **kwargs)


def near_tie_branches(ours: ReluBranches, same: ReluBranches, judge: ReluBranches) -> tuple[dict, list[str]]:
    """(masks to force, descriptions): the BatchNorm-ReLUs where ``ours`` took another branch than the float64
    ``judge`` only at near-ties, |z64| <= 2 max |z_same - z64| over the layer (``same``: the reference's float32 step,
    whose pre-activation error says how far from 0 a float32 network may put a value), and a line per layer whose
    flips are not all near-ties (not forced: the gradients are then judged on float64's branches)."""
    assert ours.masks.keys() == judge.masks.keys() == same.masks.keys(), "the steps ran different BatchNorms"
    forced, lines = {}, []
    for name, mask in ours.masks.items():
        flipped = mask != judge.masks[name]
        if not flipped.any():
            continue
        z64 = judge.z[name]
        band = 2 * (same.z[name].double() - z64).abs().max().item()
        far = z64[flipped].abs().max().item()
        tie = far <= band
        lines.append(
            f"{name}: {int(flipped.sum())} branch(es) flipped, |z64| up to {far:.3g} "
            f"{'<=' if tie else '>'} {band:.3g} (2x the reference float32 step's largest pre-activation error)"
        )
        if tie:
            forced[name] = mask
    return forced, lines


def assert_gradients_2x(p: Pair, ours: dict, ours_branches: ReluBranches, channels_last: bool, what: str) -> None:
    """The gradient vector of a float32 step (``ours``, its branches) within 2x the reference's float32 step's
    error (same layout) plus FLOOR32, each against the float64 step on its own near-tie branches (module doc)."""
    same, judge = p.step(False, channels_last=channels_last), p.step(False, torch.float64)
    same_branches = p.branches[False, torch.float32, channels_last, False]
    judge_branches = p.branches[False, torch.float64, False, False]
    judges, notes = [], []
    for branches, label in ((ours_branches, "ours"), (same_branches, "reference")):
        forced, lines = near_tie_branches(branches, same_branches, judge_branches)
        judges.append(grad_vector(p.step_on_branches(forced) if forced else judge))
        notes += [f"{label} {line}" for line in lines]
    ours, same = grad_vector(ours), grad_vector(same)
    bad = []
    for k in ours:
        assert torch.isfinite(ours[k]).all(), f"{what}: {k} is not finite"
        err, ref_err = rel(ours[k], judges[0][k]), rel(same[k], judges[1][k])
        if not err <= 2 * ref_err + FLOOR32:
            bad.append(f"{k}: {err:.3g} > 2 x {ref_err:.3g} + {FLOOR32:g} (each against float64 on its own branches)")
    assert not bad, f"{what}: " + "\n  ".join(bad + notes)


# ------------------------------------------------------------------------------------------------------ the tests

EAGER_DEFAULT = CIFAR | IMAGENET_DEFAULT


@pytest.mark.parametrize(("name", "mode"), _params({"float64": CIFAR}, [n for n in MODELS if n in CIFAR]))
def test_training_step_float64(name: str, mode: str) -> None:
    """The fused and reference models compute the same training step (everything it produces)."""
    p = pair(name)
    assert_close_rel(p.step(True, torch.float64), p.step(False, torch.float64), TOL64, f"{name} float64")


@pytest.mark.parametrize(("name", "mode"), _params({"float32": EAGER_DEFAULT, "channels_last": EAGER_DEFAULT}))
def test_training_step_float32(name: str, mode: str) -> None:
    p = pair(name)
    cl = mode == "channels_last"
    ours, same = p.step(True, channels_last=cl), p.step(False, channels_last=cl)
    # Judged against the reference in float64 (the project's rule): a deep net's float32 gradients at batch 2 amplify
    # rounding chaotically (fused and reference float32 differ by up to ~4% in resnet50 while both are as far from
    # float64), so a fixed fused-vs-reference tolerance would decide by luck; the gradients on each step's own
    # near-tie ReLU branches (module doc; e.g. preact_resnet44's fused step before the NCHW statistics pivot, one
    # flip at z64 = -1.3e-6, was 7.7e-4 off float64 and 4.4e-6 off the float64 step on its branches, the reference
    # 4.6e-6; with the pivot it flips none, 4.2e-6).
    judge = p.step(False, torch.float64)
    assert_2x_rel(forward_part(ours), forward_part(same), forward_part(judge), FLOOR32, f"{name} {mode}")
    assert_gradients_2x(p, ours, p.branches[True, torch.float32, cl, False], cl, f"{name} {mode}")


def test_float32_rule_catches_a_real_error() -> None:
    """The near-tie rule cannot hide an error: resnet20's fused float32 step with one BatchNorm's batch mean off by
    1e-3 standard deviations (its bias lowered by 1e-3 w during the forward: z - 1e-3 w) fails the forward check
    and, on its own, the gradient check (its flipped branches are no near-ties, so none is forced)."""
    p = pair("resnet20")
    model = p.reset(p.fused, torch.float32, False)
    bn = model.layer2[1].bn1
    shift = 1e-3 * bn.weight.detach().clone()

    def lower(*_):
        bn.bias.data.sub_(shift)

    def restore(*_):
        bn.bias.data.add_(shift)

    handles = [bn.register_forward_pre_hook(lower), bn.register_forward_hook(restore)]
    branches = ReluBranches(model, keep_z=False)
    try:
        ours = training_step(model, model, p.x, p.y, False)
    finally:
        branches.remove()
        for h in handles:
            h.remove()
    same, judge = p.step(False), p.step(False, torch.float64)
    with pytest.raises(AssertionError, match="outside the 2x rule"):
        assert_2x_rel(forward_part(ours), forward_part(same), forward_part(judge), FLOOR32, "perturbed")
    with pytest.raises(AssertionError, match="each against float64 on its own branches"):
        assert_gradients_2x(p, ours, branches, False, "perturbed")


# Open (issue 17 note): densenet121 under bf16 autocast gives a loss 0.0075 (relative) off the float32 step where the
# reference is 0.0005 off; every other of its 366 quantities meets the rule. Tracked strictly until explained.
AUTOCAST_OPEN = {"densenet121": "bf16 autocast loss 0.0075 off float32 vs the reference's 0.0005 (open)"}


@pytest.mark.parametrize(("name", "mode"), _params({"autocast": AUTOCAST_DEFAULT}))
def test_training_step_autocast(name: str, mode: str, request) -> None:
    """CPU bfloat16 autocast, judged against the reference's float32 step."""
    if name in AUTOCAST_OPEN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=AUTOCAST_OPEN[name]))
    p = pair(name)
    ours, same, judge = p.step(True, amp=True), p.step(False, amp=True), p.step(False)
    assert ours["logits"].shape == (BATCH, NUM_CLASSES)
    sel = lambda r: {**forward_part(r), **grad_vector(r)}  # noqa: E731
    assert_2x_rel(sel(ours), sel(same), sel(judge), FLOOR_AUTOCAST, f"{name} autocast")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), _params({"compile": COMPILE_DEFAULT}))
def test_training_step_compiled(name: str, mode: str) -> None:
    p = pair(name)
    torch._dynamo.reset()
    counters.clear()
    model = p.reset(p.fused, torch.float32, False)
    compiled = torch.compile(model)
    # fallback_random: the compiled step draws what eager draws (stochastic depth's masks, Shake-Shake's alpha and
    # beta; Inductor's own generator gives other numbers), so it computes the reference's step.
    with torch._dynamo.config.patch(error_on_recompile=True), inductor_config.patch(fallback_random=True):
        ours = training_step(compiled, model, p.x, p.y, False)
        training_step(compiled, model, p.x, p.y, False)  # the next step runs the same graph
    assert not counters["graph_break"], f"{name}: graph breaks {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, f"{name}: {dict(counters['stats'])}"
    same = p.step(False)
    assert_close_rel(forward_part(ours), forward_part(same), TOL_FORWARD32, f"{name} compiled")
    assert_close_rel(grad_vector(ours), grad_vector(same), TOL_GRADS32, f"{name} compiled")


def test_compiled_densenet_does_not_recompile_per_layer() -> None:
    """torch.compile of a fused DenseNet traces the whole model once: its layers take lists of different lengths,
    so a graph break inside a layer would compile the layer's forward once per length (Dynamo's recompile limit is
    8: a 16-layer block then runs eager). Static shapes, then dynamic ones (a changed batch size), no recompile.
    Dynamo's "eager" backend: the guards and graph breaks are Dynamo's, whatever the backend."""
    from fusedres.models.densenet import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(10, 2), num_init_features=8, bn_size=2, num_classes=5, small_inputs=True)
    for dynamic in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager", dynamic=dynamic)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch in (2, 3) if dynamic else (2, 2):
                compiled(torch.randn(batch, 3, 8, 8)).sum().backward()
        assert not counters["graph_break"], f"dynamic={dynamic}: graph breaks {dict(counters['graph_break'])}"
        assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# --------------------------------------------------------------------------------------- what a model cannot do


def test_clear_errors() -> None:
    """Misuse is refused up front with a message naming the argument, never a crash deep inside."""
    with pytest.raises(ValueError, match=r"name must be one of the registered models .*got 'resnet9'"):
        get_model("resnet9")
    mlp = get_model("highway_mlp", num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"in_features=3072 values per sample .* got shape \[2, 784\]"):
        mlp(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="norm_layer must be a callable"):
        get_model("resnet20", norm_layer=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="checkpoint=True is the reference's torchvision-style baseline"):
        get_model("densenet_bc_100", checkpoint=True)
    # Double backward (e.g. a gradient penalty) through the fused kernels is refused explicitly.
    model = get_model("resnet20", num_classes=NUM_CLASSES)
    x = torch.randn(BATCH, 3, 32, 32, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.square().sum().backward()


def test_default_run_covers_every_kind() -> None:
    """Every registered model is in the matrix; the default subsets name registered models only."""
    assert set(MODELS) >= CIFAR | IMAGENET_DEFAULT | AUTOCAST_DEFAULT | COMPILE_DEFAULT
    assert {n for n in MODELS if n not in CIFAR} >= IMAGENET_DEFAULT

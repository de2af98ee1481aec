"""``fusedres.convert``: put fused BatchNorm + residual + activation modules into an existing model.

What is converted (each BatchNorm keeps its parameters, buffers and state_dict key):

* torchvision ``BasicBlock`` / ``Bottleneck`` (ResNet, ResNeXt, Wide ResNet) become
  :class:`fusedres.models.resnet.BasicBlock` / ``Bottleneck``: BN+ReLU pairs become ``BatchNormAct2d("relu")``,
  the block's last BN takes the shortcut (``relu(bn(x) + identity)`` in one pass), and a ``downsample``
  ``Sequential(conv, BatchNorm2d)`` gets a ``BatchNormAct2d("identity")``. The convolutions are the same modules.
* torchvision ``ResNet``'s stem: ``bn1`` becomes ``BatchNormAct2d("relu")`` and ``relu`` an ``nn.Identity``.
* In any ``nn.Sequential`` (or subclass that keeps ``Sequential.forward``), a ``BatchNorm1d/2d/3d`` directly followed
  by ``nn.ReLU`` or ``nn.LeakyReLU``: the BatchNorm's index gets the ``BatchNormAct*d`` and the activation's index an
  ``nn.Identity``, so indices and state_dict keys stay valid.

Everything else is left as it is, and every BatchNorm left is listed with the reason in the :class:`ConvertReport`
(``convert(model, report=True)``; the summary is also logged at INFO level on the ``fusedres.convert`` logger).
Only exact ``nn.BatchNorm*d`` / ``nn.ReLU`` / ``nn.LeakyReLU`` / torchvision block types are converted (a subclass may
have a different forward), and never a module with hooks (a hook between the BN and the ReLU would see other
values). The new modules share the original ``Parameter`` and buffer objects, keep the train/eval mode, device,
dtype and ``requires_grad``; with ``inplace=True`` an optimizer built on the original parameters keeps working.

Extension point: ``register_converter(module_type)`` registers a function for an exact module type (e.g.
torchvision's ``_DenseLayer``), called as ``fn(module, name, ctx)``; it returns the replacement module (or the
module itself) and reports through ``ctx`` (see :class:`ConvertContext`). torchvision DenseNets' dense layers are
reported as not converted until a converter for them is registered.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from fusedres.nn.batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

__all__ = ["ConvertContext", "ConvertReport", "ConvertedNorm", "UntouchedNorm", "convert", "register_converter"]

logger = logging.getLogger("fusedres.convert")

_BN_TO_ACT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
}
_FUSED_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)


class ConvertedNorm(NamedTuple):
    """A BatchNorm that now runs fused: its qualified name, activation, whether it adds a residual, and how."""

    name: str
    activation: str
    residual: bool
    via: str


class UntouchedNorm(NamedTuple):
    """A BatchNorm left as it was: its qualified name, its type and why."""

    name: str
    type: str
    reason: str


@dataclass
class ConvertReport:
    """What :func:`convert` did. ``str(report)`` is a readable summary.

    Attributes:
        blocks: (qualified name, original type name) of every residual block replaced by a fused block.
        converted: every BatchNorm now fused (:class:`ConvertedNorm`), in module order.
        untouched: every BatchNorm (any ``_BatchNorm`` subclass not already fused) left unchanged, with the reason.
        already_fused: qualified names of the fusedres BatchNormAct modules that were there before.
    """

    blocks: list[tuple[str, str]] = field(default_factory=list)
    converted: list[ConvertedNorm] = field(default_factory=list)
    untouched: list[UntouchedNorm] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        """BatchNorm -> activation pairs fused outside residual blocks (Sequential pairs and stems)."""
        return sum(1 for c in self.converted if c.via in ("Sequential pair", "ResNet stem"))

    def summary(self) -> str:
        """Multi-line summary: counts, then a line per reason BatchNorms were left unchanged (``untouched`` has all)."""
        with_residual = sum(c.residual for c in self.converted)
        lines = [
            f"fusedres.convert: {len(self.converted)} BatchNorms fused ({with_residual} with the residual add), "
            f"{len(self.blocks)} residual blocks replaced, {self.num_pairs} BatchNorm->activation pairs fused, "
            f"{len(self.untouched)} BatchNorms left unchanged"
            + (f", {len(self.already_fused)} already fused" if self.already_fused else "")
        ]
        by_reason: dict[str, list[str]] = {}
        for u in self.untouched:
            by_reason.setdefault(f"{u.type}: {u.reason}", []).append(u.name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  {len(names)} unchanged, {reason}: {shown}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class ConvertContext:
    """Passed to converters: records results in ``report`` and builds fused BatchNorms from plain ones."""

    def __init__(self, report: ConvertReport) -> None:
        self.report = report
        self._reasons: dict[int, str] = {}

    def skip(self, bn: nn.Module, reason: str) -> None:
        """Records why ``bn`` stays unchanged (the first reason given for a module wins)."""
        self._reasons.setdefault(id(bn), reason)

    def reason(self, bn: nn.Module) -> str | None:
        return self._reasons.get(id(bn))

    def fusable(self, module: nn.Module | None, types: tuple[type, ...]) -> str | None:
        """None when ``module``'s exact type is one of ``types`` and it has no hooks; else the reason it is not."""
        if module is None:
            return "missing"
        if type(module) not in types:
            return f"{type(module).__name__} is not exactly one of {', '.join(t.__name__ for t in types)}"
        if _has_hooks(module):
            return f"{type(module).__name__} has hooks (fusing would change what they see)"
        return None

    def fuse(
        self, bn: nn.Module, name: str, activation: str, *, negative_slope: float = 0.01, residual: bool, via: str
    ) -> nn.Module:
        """A BatchNormAct*d sharing ``bn``'s parameters and buffers (same objects), recorded as converted."""
        new = _fused_norm(bn, activation, negative_slope)
        self.report.converted.append(ConvertedNorm(name, activation, residual, via))
        return new


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _fused_norm(bn: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    cls = _BN_TO_ACT[type(bn)]
    new = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device="meta",
        activation=activation,
        negative_slope=negative_slope,
    )
    # The same Parameter and buffer objects: values, device, dtype, requires_grad and optimizer state carry over.
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    return new


def _identity_like(module: nn.Module) -> nn.Module:
    new = nn.Identity()
    new.train(module.training)
    return new


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    if type(module) is nn.ReLU:
        return "relu", 0.01
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope)
    return None


# --------------------------------------------------------------------------------------------------------------
# Converter registry

Converter = Callable[[nn.Module, str, ConvertContext], nn.Module]
_CONVERTERS: dict[type[nn.Module], Converter] = {}


def register_converter(module_type: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Decorator: ``fn(module, qualified_name, ctx) -> module`` converts modules whose exact type is module_type.

    The returned module replaces the original (return the module itself after changing it in place). convert()
    then goes on into the returned module's children, so a converter handles only what its type's forward owns.
    Registering a type again replaces the previous converter (e.g. a real DenseNet converter replacing the
    placeholder that reports dense layers as not supported).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def deco(fn: Converter) -> Converter:
        _CONVERTERS[module_type] = fn
        return fn

    return deco


def _register_torchvision() -> None:
    try:
        from torchvision.models import densenet as tv_densenet
        from torchvision.models import resnet as tv_resnet
    except ImportError:  # torchvision is optional: then only the Sequential pairs are converted
        return
    from fusedres.models import resnet as fr_resnet

    def convert_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        bottleneck = isinstance(block, tv_resnet.Bottleneck)
        norms = ["bn1", "bn2", "bn3"] if bottleneck else ["bn1", "bn2"]
        kind = type(block).__name__
        problems = [f"{n}: {r}" for n in norms if (r := ctx.fusable(getattr(block, n, None), (nn.BatchNorm2d,)))]
        if (r := ctx.fusable(getattr(block, "relu", None), (nn.ReLU,))) is not None:
            problems.append(f"relu: {r}")
        if _has_hooks(block):
            problems.append(f"the {kind} has hooks")
        if problems:
            for n in norms:
                if isinstance(getattr(block, n, None), nn.modules.batchnorm._BatchNorm):
                    ctx.skip(getattr(block, n), f"in a {kind} that cannot be fused ({'; '.join(problems)})")
            return block
        cls = fr_resnet.Bottleneck if bottleneck else fr_resnet.BasicBlock
        # The fused block class without its __init__ (which would allocate and initialise new convolutions), given
        # the original children: the convolutions and the downsample branch are the same modules.
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for child_name, child in block.named_children():
            if child_name != "relu":
                new.add_module(child_name, child)
        new.downsample = block.downsample  # None is not among named_children()
        new.stride = block.stride
        prefix = f"{name}." if name else ""
        for i, n in enumerate(norms):
            last = i == len(norms) - 1
            via = f"{kind} ({'residual' if last else 'BN+ReLU'})"
            setattr(new, n, ctx.fuse(getattr(block, n), f"{prefix}{n}", "relu", residual=last, via=via))
        ds = block.downsample
        if ds is not None and type(ds) is nn.Sequential and len(ds) == 2:
            if (r := ctx.fusable(ds[1], (nn.BatchNorm2d,))) is None:
                ds[1] = ctx.fuse(ds[1], f"{prefix}downsample.1", "identity", residual=False, via=f"{kind} downsample")
            elif isinstance(ds[1], nn.modules.batchnorm._BatchNorm):
                ctx.skip(ds[1], f"downsample BatchNorm: {r}")
        new.train(block.training)
        ctx.report.blocks.append((name, kind))
        return new

    register_converter(tv_resnet.BasicBlock)(convert_block)
    register_converter(tv_resnet.Bottleneck)(convert_block)

    @register_converter(tv_resnet.ResNet)
    def convert_resnet_stem(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        # ResNet.forward applies self.relu once, right after self.bn1.
        prefix = f"{name}." if name else ""
        r = ctx.fusable(model.bn1, (nn.BatchNorm2d,)) or ctx.fusable(model.relu, (nn.ReLU,))
        if r is None:
            model.bn1 = ctx.fuse(model.bn1, f"{prefix}bn1", "relu", residual=False, via="ResNet stem")
            model.relu = _identity_like(model.relu)
        elif isinstance(model.bn1, nn.modules.batchnorm._BatchNorm):
            ctx.skip(model.bn1, f"ResNet stem: {r}")
        return model

    @register_converter(tv_densenet._DenseLayer)
    def report_dense_layer(layer: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        for m in layer.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                ctx.skip(m, "not converted (dense layers not supported yet)")
        return layer

    @register_converter(tv_densenet.DenseNet)
    def report_densenet_final_norm(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        norm5 = getattr(model.features, "norm5", None)
        if norm5 is not None:
            ctx.skip(norm5, "not converted (dense layers not supported yet: DenseNet's final norm5 + F.relu)")
        return model


_register_torchvision()


# --------------------------------------------------------------------------------------------------------------
# The walk


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fuse_sequential_pairs(seq: nn.Sequential, name: str, ctx: ConvertContext) -> None:
    keys = list(seq._modules)
    prefix = f"{name}." if name else ""
    i = 0
    while i < len(keys) - 1:
        bn, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
        if type(bn) in _BN_TO_ACT and ctx.reason(bn) is None:
            spec = _activation_of(act)
            problem = ctx.fusable(bn, tuple(_BN_TO_ACT)) or (
                ctx.fusable(act, (nn.ReLU, nn.LeakyReLU)) if spec is not None else None
            )
            if spec is not None and problem is None:
                activation, slope = spec
                seq._modules[keys[i]] = ctx.fuse(
                    bn, f"{prefix}{keys[i]}", activation, negative_slope=slope, residual=False, via="Sequential pair"
                )
                seq._modules[keys[i + 1]] = _identity_like(act)
                i += 2
                continue
            if problem is not None:
                ctx.skip(bn, problem)
        i += 1


def _walk(module: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    fn = _CONVERTERS.get(type(module))
    if fn is not None:
        module = fn(module, name, ctx)
    prefix = f"{name}." if name else ""
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _walk(child, f"{prefix}{child_name}", ctx)
        if new is not child:
            module._modules[child_name] = new
    if _is_plain_sequential(module):
        _fuse_sequential_pairs(module, name, ctx)
    return module


def convert(
    model: nn.Module, *, inplace: bool = False, report: bool = False
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replaces what it can of ``model`` by fused modules computing the same function (see the module doc).

    Args:
        model: any nn.Module, e.g. ``torchvision.models.resnet50()``.
        inplace: False converts a deep copy and leaves ``model`` untouched; True changes ``model``'s submodules in
            place (parameters stay the same objects, so an existing optimizer keeps working). Use the return value
            either way: when ``model`` itself is a converted block, the result is a new module.
        report: also return a :class:`ConvertReport`.

    Returns:
        The converted model, or ``(model, ConvertReport)`` with ``report=True``. The summary is logged at INFO
        level on the ``fusedres.convert`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    rep = ConvertReport()
    ctx = ConvertContext(rep)
    model = _walk(model, "", ctx)
    converted = {c.name for c in rep.converted}
    for name, m in model.named_modules():
        if isinstance(m, _FUSED_NORMS):
            if name not in converted:
                rep.already_fused.append(name)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            reason = ctx.reason(m)
            if reason is None:
                reason = (
                    "not directly followed by nn.ReLU/nn.LeakyReLU inside an nn.Sequential (convert fuses only "
                    "pairs whose data flow it can see)"
                )
                if type(m) not in _BN_TO_ACT:
                    reason = f"{type(m).__name__} is not exactly nn.BatchNorm1d/2d/3d"
            rep.untouched.append(UntouchedNorm(name, type(m).__name__, reason))
    logger.info("%s", rep.summary())
    return (model, rep) if report else model

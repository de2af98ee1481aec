"""``fusedres.convert``: put fused BatchNorm + residual + activation modules into an existing model.

What is converted (each BatchNorm keeps its parameters, buffers and state_dict key):

* torchvision ``BasicBlock`` / ``Bottleneck`` (ResNet, ResNeXt, Wide ResNet) become
  :class:`fusedres.models.resnet.BasicBlock` / ``Bottleneck``: BN+ReLU pairs become ``BatchNormAct2d("relu")``,
  the block's last BN takes the shortcut (``relu(bn(x) + identity)`` in one pass), and a ``downsample``
  ``Sequential(conv, BatchNorm2d)`` gets a ``BatchNormAct2d("identity")``. The convolutions are the same modules.
* torchvision ``ResNet``'s stem: ``bn1`` becomes ``BatchNormAct2d("relu")`` and ``relu`` an ``nn.Identity``.
* torchvision ``_DenseLayer`` (DenseNet) becomes :class:`fusedres.nn.DenseLayer`: ``norm1`` -> ``relu1`` -> ``conv1``
  runs as one dense BN+ReLU+conv unit over the layer's inputs (the concatenation is never built) and ``norm2`` ->
  ``relu2`` -> ``conv2`` as another (``norm1`` / ``norm2`` become :class:`fusedres.nn.DenseNormAct2d`); torchvision's
  ``memory_efficient=True`` (checkpointing) becomes fusedres' recompute-in-backward, which computes the same function
  and updates the running statistics once per forward (torchvision's recomputation updates them a second time).
* torchvision ``DenseNet``: becomes :class:`fusedres.models.densenet.DenseNet` (its forward applies no ReLU after
  ``features``) with ``features.norm5`` a ``DenseNormAct2d("relu")``, i.e. torchvision's ``F.relu`` after ``norm5``
  fused; ``_Transition`` becomes :class:`fusedres.nn.DenseTransition`, and ``_DenseBlock`` becomes
  :class:`fusedres.nn.DenseBlock` (each feature map's batch statistics computed once and reused by every later layer)
  where the module after the block (a converted transition, or the fused ``norm5``) reads the block's
  :class:`fusedres.nn.DenseFeatures`; otherwise the block stays torchvision's, with its layers converted one by one.
* In any ``nn.Sequential`` (or subclass that keeps ``Sequential.forward``), a ``BatchNorm1d/2d/3d`` directly followed
  by ``nn.ReLU`` or ``nn.LeakyReLU``: the BatchNorm's index gets the ``BatchNormAct*d`` and the activation's index an
  ``nn.Identity``, so indices and state_dict keys stay valid (a DenseNet's ``norm0`` / ``relu0``, a ``_Transition``
  that cannot become a ``DenseTransition``).

Everything else is left as it is, and every BatchNorm left is listed with the reason in the :class:`ConvertReport`
(``convert(model, report=True)``; the summary is also logged at INFO level on the ``fusedres.convert`` logger).
Only exact ``nn.BatchNorm*d`` / ``nn.ReLU`` / ``nn.LeakyReLU`` / ``nn.Conv2d`` / torchvision block types are converted
(a subclass may have a different forward), and never a module with hooks (a hook between the BN and the ReLU would see
other values). A dense layer's or transition's convolution runs inside the fused unit, so it must also be hook-free
with stride 1, dilation 1, one group, no bias and equal zero padding. The new modules share the original
``Parameter`` and buffer objects, keep the train/eval mode, device, dtype and ``requires_grad``; with
``inplace=True`` an optimizer built on the original parameters keeps working.

Extension point: ``register_converter(module_type)`` registers a function for an exact module type (e.g.
torchvision's ``_DenseLayer``), called as ``fn(module, name, ctx)``; it returns the replacement module (or the
module itself) and reports through ``ctx`` (see :class:`ConvertContext`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from fusedres.nn.batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormActMixin
from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.nn.sync_batchnorm import SyncBatchNormAct2d

__all__ = ["ConvertContext", "ConvertReport", "ConvertedNorm", "UntouchedNorm", "convert", "register_converter"]

logger = logging.getLogger("fusedres.convert")

_BN_TO_ACT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
}
_FUSED_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, DenseBatchNormAct2d, SyncBatchNormAct2d)


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
        blocks: (qualified name, original type name) of every module replaced by its fusedres counterpart: residual
            blocks, dense layers, dense blocks, transitions, DenseNets.
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
        kinds: dict[str, int] = {}
        for _, kind in self.blocks:
            kinds[kind] = kinds.get(kind, 0) + 1
        replaced = f" ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})" if kinds else ""
        lines = [
            f"fusedres.convert: {len(self.converted)} BatchNorms fused ({with_residual} with the residual add), "
            f"{len(self.blocks)} blocks replaced{replaced}, {self.num_pairs} BatchNorm->activation pairs fused, "
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
        self,
        bn: nn.Module,
        name: str,
        activation: str,
        *,
        negative_slope: float = 0.01,
        residual: bool,
        via: str,
        cls: type[nn.Module] | None = None,
    ) -> nn.Module:
        """A BatchNormAct*d sharing ``bn``'s parameters and buffers (same objects), recorded as converted.

        ``cls`` picks another fused class built like ``BatchNormAct*d`` (a subclass of ``bn``'s type with the
        fusedres BatchNormAct constructor, e.g. :class:`fusedres.nn.DenseNormAct2d` for a BatchNorm2d).
        """
        new = _fused_norm(bn, activation, negative_slope, cls)
        self.report.converted.append(ConvertedNorm(name, activation, residual, via))
        return new


def _has_hooks(module: nn.Module) -> bool:
    return any(
        getattr(module, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _fused_norm(bn: nn.Module, activation: str, negative_slope: float, cls: type[nn.Module] | None) -> nn.Module:
    if cls is None:
        cls = _BN_TO_ACT[type(bn)]
    elif not (isinstance(cls, type) and issubclass(cls, type(bn)) and issubclass(cls, _BatchNormActMixin)):
        raise TypeError(f"cls must be a fusedres BatchNormAct subclass of {type(bn).__name__}, got {cls!r}")
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


_BN2D = (nn.BatchNorm2d,)
_RELU = (nn.ReLU,)


def _unit_conv_problem(conv: nn.Module | None, ctx: ConvertContext) -> str | None:
    """None when ``conv`` can run inside a fused dense BN+act+conv unit (``conv2d(y, weight, padding=p)``)."""
    if (r := ctx.fusable(conv, (nn.Conv2d,))) is not None:
        return r
    plain = (
        conv.bias is None
        and tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.padding[0] == conv.padding[1]
    )
    if not plain:
        return (
            f"{conv} is not a bias-free Conv2d with stride 1, dilation 1, one group and equal zero padding "
            "(the fused BN+ReLU+conv unit runs only that)"
        )
    return None


def _bare(cls: type[nn.Module], original: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """An instance of ``cls`` without its __init__ (which would allocate and initialise new modules), holding
    ``original``'s children except ``skip`` (the same objects, in the same order) and its train/eval flag."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for child_name, child in original._modules.items():
        if child_name not in skip:
            new._modules[child_name] = child
    new.training = original.training
    return new


# --------------------------------------------------------------------------------------------------------------
# Converter registry

Converter = Callable[[nn.Module, str, ConvertContext], nn.Module]
_CONVERTERS: dict[type[nn.Module], Converter] = {}


def register_converter(module_type: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Decorator: ``fn(module, qualified_name, ctx) -> module`` converts modules whose exact type is module_type.

    The returned module replaces the original (return the module itself after changing it in place). convert()
    then goes on into the returned module's children, so a converter handles only what its type's forward owns.
    Registering a type again replaces the previous converter (e.g. a project's own converter for torchvision's
    ``_DenseLayer`` replacing fusedres' one).
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
    from fusedres.models import densenet as fr_densenet
    from fusedres.models import resnet as fr_resnet
    from fusedres.nn import dense_layer as fr_dense

    dense_norm = fr_dense.DenseNormAct2d  # reads DenseFeatures and runs the BN+act+conv unit (bn_act_conv)

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

    def dense_layer_problems(layer: nn.Module, ctx: ConvertContext) -> list[str]:
        # torchvision's _DenseLayer.forward: conv1(relu1(norm1(cat(inputs)))), then conv2(relu2(norm2(.))), dropout.
        problems = [f"{n}: {r}" for n in ("norm1", "norm2") if (r := ctx.fusable(getattr(layer, n, None), _BN2D))]
        problems += [f"{n}: {r}" for n in ("relu1", "relu2") if (r := ctx.fusable(getattr(layer, n, None), _RELU))]
        problems += [f"{n}: {r}" for n in ("conv1", "conv2") if (r := _unit_conv_problem(getattr(layer, n, None), ctx))]
        if _has_hooks(layer):
            problems.append("the _DenseLayer has hooks")
        return problems

    @register_converter(tv_densenet._DenseLayer)
    def convert_dense_layer(layer: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        problems = dense_layer_problems(layer, ctx)
        if problems:
            for n in ("norm1", "norm2"):
                if isinstance(getattr(layer, n, None), nn.modules.batchnorm._BatchNorm):
                    ctx.skip(getattr(layer, n), f"in a _DenseLayer that cannot be fused ({'; '.join(problems)})")
            return layer
        # fusedres' DenseLayer without its __init__, given the original children (the same convolutions); its
        # forward takes a tensor, a list of tensors (torchvision's _DenseBlock) or DenseFeatures (fusedres').
        new = _bare(fr_dense.DenseLayer, layer, skip=("relu1", "relu2"))
        new.fused = True
        # torchvision's checkpointing -> fusedres' recompute in backward: the same function, statistics updated once.
        new.memory_efficient = bool(layer.memory_efficient)
        new.checkpoint = False
        new.drop_rate = float(layer.drop_rate)
        prefix = f"{name}." if name else ""
        for n, via in (("norm1", "_DenseLayer (dense BN+ReLU+conv1)"), ("norm2", "_DenseLayer (BN+ReLU+conv2)")):
            fused = ctx.fuse(getattr(layer, n), f"{prefix}{n}", "relu", residual=False, via=via, cls=dense_norm)
            setattr(new, n, fused)
        ctx.report.blocks.append((name, "_DenseLayer"))
        return new

    def transition_problems(trans: nn.Module, ctx: ConvertContext) -> list[str]:
        # _Transition is an nn.Sequential: norm -> relu -> conv -> pool, in the order of its modules.
        if list(trans._modules) != ["norm", "relu", "conv", "pool"]:
            return [f"its modules are {list(trans._modules)}, not [norm, relu, conv, pool]"]
        problems = [f"norm: {r}"] if (r := ctx.fusable(trans.norm, _BN2D)) else []
        problems += [f"relu: {r}"] if (r := ctx.fusable(trans.relu, _RELU)) else []
        problems += [f"conv: {r}"] if (r := _unit_conv_problem(trans.conv, ctx)) else []
        if _has_hooks(trans):
            problems.append("the _Transition has hooks")
        return problems

    def convert_transition(trans: nn.Module, name: str, ctx: ConvertContext, memory_efficient: bool) -> nn.Module:
        new = _bare(fr_dense.DenseTransition, trans, skip=("relu",))
        new.fused = True
        new.memory_efficient = memory_efficient
        new.checkpoint = False
        new.norm = ctx.fuse(
            trans.norm, f"{name}.norm", "relu", residual=False, via="_Transition (BN+ReLU+conv)", cls=dense_norm
        )
        ctx.report.blocks.append((name, "_Transition"))
        return new

    def convert_dense_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        new = _bare(fr_dense.DenseBlock, block, skip=tuple(block._modules))
        new.fused = True
        for key, layer in block._modules.items():
            new.add_module(key, convert_dense_layer(layer, f"{name}.{key}", ctx))
        ctx.report.blocks.append((name, "_DenseBlock"))
        return new

    @register_converter(tv_densenet.DenseNet)
    def convert_densenet(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
        # DenseNet.forward is classifier(flatten(pool(F.relu(features(x))))): fusing the F.relu into norm5 takes
        # fusedres' DenseNet.forward (no ReLU after features), i.e. replacing the model's class. fusedres'
        # DenseBlocks return DenseFeatures (the maps and their batch statistics), which only a DenseTransition or
        # the DenseNormAct2d norm5 reads: a block is replaced only when the module after it is. Whatever is not
        # converted here (layers of a block left to torchvision, transitions that cannot fuse their conv) is
        # converted piecewise as the walk goes on into the children (_DenseLayer, Sequential pairs).
        prefix = f"{name}." if name else ""
        features = getattr(model, "features", None)
        norm5 = features._modules.get("norm5") if isinstance(features, nn.Module) else None
        if type(features) is not nn.Sequential or _has_hooks(features):
            if isinstance(norm5, nn.modules.batchnorm._BatchNorm):
                ctx.skip(norm5, "DenseNet's norm5 + F.relu: features is not a plain nn.Sequential without hooks")
            return model
        keys = list(features._modules)
        if _has_hooks(model):
            norm5_problem = "the DenseNet has hooks"
        elif keys[-1:] != ["norm5"]:
            norm5_problem = "norm5 is not the last module of features (DenseNet.forward applies F.relu to its output)"
        else:
            norm5_problem = ctx.fusable(norm5, _BN2D)
        memory_efficient = all(bool(m.memory_efficient) for m in model.modules() if type(m) is tv_densenet._DenseLayer)
        transitions = {
            k: m
            for k, m in features._modules.items()
            if type(m) is tv_densenet._Transition and not transition_problems(m, ctx)
        }
        for i, key in enumerate(keys):
            module, qualified = features._modules[key], f"{prefix}features.{key}"
            if key in transitions:
                features._modules[key] = convert_transition(module, qualified, ctx, memory_efficient)
            elif type(module) is tv_densenet._DenseBlock:
                after = keys[i + 1] if i + 1 < len(keys) else None
                reads_features = after in transitions or (after == "norm5" and norm5_problem is None)
                layers_fuse = all(
                    type(m) is tv_densenet._DenseLayer and not dense_layer_problems(m, ctx) for m in module.values()
                )
                if reads_features and layers_fuse and not _has_hooks(module):
                    features._modules[key] = convert_dense_block(module, qualified, ctx)
        if norm5_problem is not None:
            if isinstance(norm5, nn.modules.batchnorm._BatchNorm):
                ctx.skip(norm5, f"DenseNet's norm5 + F.relu: {norm5_problem}")
            return model
        features.norm5 = ctx.fuse(
            norm5, f"{prefix}features.norm5", "relu", residual=False, via="DenseNet norm5 (+ F.relu)", cls=dense_norm
        )
        new = _bare(fr_densenet.DenseNet, model)
        new.fused = True
        new.memory_efficient = memory_efficient
        new.checkpoint = False
        ctx.report.blocks.append((name, "DenseNet"))
        return new


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
    # Converters record in the order they run (a parent before its children, a Sequential's pairs after them).
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rep.converted.sort(key=lambda c: order.get(c.name, len(order)))
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

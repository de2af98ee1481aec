"""The parts every converter shares: the report, the context converters record through, the checks that decide what
may be fused, building a fused BatchNorm from a plain one, and the two registries (module converters, branch ops).

Nothing here knows a model library; :mod:`fusedres.convert.torchvision` and :mod:`fusedres.convert.timm` hold the
converters for their library's module types, :mod:`fusedres.convert.sequential` the ``nn.Sequential`` patterns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.nn.batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _BatchNormActMixin
from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.nn.sync_batchnorm import SyncBatchNormAct2d

__all__ = [
    "ActivationSpec",
    "BranchOp",
    "ConvertContext",
    "ConvertReport",
    "ConvertedNorm",
    "UntouchedNorm",
    "activation_spec",
    "fused_activation_problem",
    "block_end_problem",
    "branch_op",
    "branch_scale",
    "register_branch_op",
    "register_converter",
]

# The plain BatchNorm types convert() replaces, and the fused class each becomes.
BN_TO_ACT: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
    nn.SyncBatchNorm: SyncBatchNormAct2d,
}
FUSED_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, DenseBatchNormAct2d, SyncBatchNormAct2d)
# ConvertedNorm.via of a BatchNorm fused alone where more could not be fused: "...<NOT_FUSED_WITH><reason>".
NOT_FUSED_WITH = "; not fused with what follows: "
# ConvertedNorm.via values that count as BatchNorm -> activation pairs outside residual blocks.
PAIR_VIAS = frozenset(
    {"Sequential pair", "ResNet stem", "timm ResNet stem", "timm BatchNormAct2d", "timm SyncBatchNormAct"}
)


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
    """What :func:`fusedres.convert` did. ``str(report)`` is a readable summary.

    Attributes:
        blocks: (qualified name, original type name) of every module replaced by its fusedres counterpart: residual
            blocks, dense layers, dense blocks, transitions, DenseNets.
        converted: every BatchNorm now fused (:class:`ConvertedNorm`), in module order.
        untouched: every BatchNorm (any ``_BatchNorm`` subclass not already fused) left unchanged, with the reason.
            (A BatchNorm a converter could not fuse with what follows is fused alone: see :attr:`alone`.)
        already_fused: qualified names of the fusedres BatchNormAct modules that were there before.
    """

    blocks: list[tuple[str, str]] = field(default_factory=list)
    converted: list[ConvertedNorm] = field(default_factory=list)
    untouched: list[UntouchedNorm] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        """BatchNorm -> activation pairs fused outside residual blocks: Sequential pairs, stems, norm-act layers."""
        return sum(1 for c in self.converted if c.via in PAIR_VIAS)

    @property
    def alone(self) -> dict[str, str]:
        """The BatchNorms fused alone (identity) where a converter could not fuse what follows them: name -> why
        (an SE module or an active drop_path before the add, an activation the kernels do not have, hooks on the
        enclosing block, ...)."""
        return {c.name: c.via.partition(NOT_FUSED_WITH)[2] for c in self.converted if NOT_FUSED_WITH in c.via}

    @property
    def num_batchnorms(self) -> int:
        """Every BatchNorm of the converted model: converted, left unchanged, or fused before."""
        return len(self.converted) + len(self.untouched) + len(self.already_fused)

    @property
    def fused_share(self) -> float:
        """The share of the model's BatchNorms that run fused (converted or fused before); 1.0 for none at all."""
        total = self.num_batchnorms
        return (len(self.converted) + len(self.already_fused)) / total if total else 1.0

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
            + f"; fused share {100 * self.fused_share:.1f}% of {self.num_batchnorms}"
        ]
        by_reason: dict[str, list[str]] = {}
        for u in self.untouched:
            by_reason.setdefault(f"{u.type}: {u.reason}", []).append(u.name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  {len(names)} unchanged, {reason}: {shown}")
        alone: dict[str, list[str]] = {}  # fused alone (identity) where more could not be fused, by reason
        for name, reason in self.alone.items():
            alone.setdefault(reason, []).append(name)
        for reason, names in alone.items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  {len(names)} fused alone (identity), not with what follows, {reason}: {shown}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------------------------
# Activations


class ActivationSpec(NamedTuple):
    """An activation the fused kernels compute: ``name`` ("relu", "leaky_relu", "relu6", "silu" or "identity") and
    the slope."""

    name: str
    negative_slope: float = 0.01


# Activations the kernels do not compute yet, by module type: a BatchNorm before one stays unconverted with this name.
_PENDING_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.GELU: "gelu",
    nn.Mish: "mish",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.PReLU: "prelu",
}


def register_pending_activation(module_type: type[nn.Module], name: str) -> None:
    """Names a library's activation module type the kernels do not fuse yet (the report's reason then says so)."""
    _PENDING_ACTIVATIONS[module_type] = name


def is_activation(module: nn.Module | None) -> bool:
    """Whether ``module`` is an activation module, fused (ReLU, LeakyReLU, ReLU6, SiLU) or not yet (Hardswish, ...)."""
    return type(module) in (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.SiLU) or type(module) in _PENDING_ACTIVATIONS


def activation_spec(module: nn.Module | None) -> ActivationSpec | str:
    """The fused activation ``module`` computes, or why it cannot run inside the fused op.

    Only exact ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.ReLU6``, ``nn.SiLU`` and ``nn.Identity`` qualify (a subclass may
    compute something else); ``inplace`` does not matter (the fused op writes one output either way).
    """
    if module is None:
        return "missing"
    if has_hooks(module):
        return f"{type(module).__name__} has hooks (fusing would change what they see)"
    kind = type(module)
    if kind is nn.ReLU:
        return ActivationSpec("relu")
    if kind is nn.LeakyReLU:
        return ActivationSpec("leaky_relu", float(module.negative_slope))
    if kind is nn.ReLU6:
        return ActivationSpec("relu6")
    if kind is nn.SiLU:
        return ActivationSpec("silu")
    if kind is nn.Identity:
        return ActivationSpec("identity")
    if kind in _PENDING_ACTIVATIONS:
        return f"activation {_PENDING_ACTIVATIONS[kind]} is not fused by the kernels yet"
    return (
        f"{kind.__name__} is not an activation the kernels fuse (exactly nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.SiLU or "
        "nn.Identity)"
    )


# --------------------------------------------------------------------------------------------------------------
# Branch ops: what sits between a residual block's last BatchNorm and its shortcut add.


class BranchOp(NamedTuple):
    """What a module between a block's last BatchNorm and the residual add does to the branch.

    ``kind`` is "identity" (nothing, e.g. ``DropPath(0.0)``), "per_sample" (one factor per sample: stochastic
    depth in training), "per_sample_channel" (one factor per sample and channel: squeeze-excitation) or
    "whole_branch" (one factor for the batch); ``description`` names the module for the report.
    ``scale(module, x)``, for "per_sample" ops: the factors, Tensor (N,), for a branch whose BatchNorm input is x
    (drawn as the module would draw them), or None when the module leaves the branch unchanged (eval mode). A
    "per_sample" op with a ``scale`` fuses into the block end (the op's ``scale`` argument).
    """

    kind: str
    description: str
    scale: Callable[[nn.Module, Tensor], Tensor | None] | None = None


BranchClassifier = Callable[[nn.Module], BranchOp]
_BRANCH_OPS: dict[type[nn.Module], BranchClassifier] = {nn.Identity: lambda m: BranchOp("identity", "nn.Identity")}


def register_branch_op(module_type: type[nn.Module]) -> Callable[[BranchClassifier], BranchClassifier]:
    """Decorator: ``fn(module) -> BranchOp`` classifies modules of exactly ``module_type`` sitting between a block's
    last BatchNorm and its residual add (see :func:`block_end_problem`)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def deco(fn: BranchClassifier) -> BranchClassifier:
        _BRANCH_OPS[module_type] = fn
        return fn

    return deco


def branch_op(module: nn.Module | None) -> BranchOp | None:
    """The :class:`BranchOp` of ``module`` (None, the absent module, is "identity"); None when it is not known."""
    if module is None:
        return BranchOp("identity", "None")
    fn = _BRANCH_OPS.get(type(module))
    return fn(module) if fn is not None else None


def block_end_problem(norm_name: str, between: list[tuple[str, nn.Module | None]]) -> str | None:
    """None when the modules ``between`` (name, module) a block's last BatchNorm ``norm_name`` and its residual add
    leave the branch unchanged, so ``act(bn(x) + shortcut)`` can run as one fused op; else the reason it cannot.

    This is the one place that decides which block ends fuse: identity ops, and one per-sample scaling op (stochastic
    depth), whose factors the fused block's forward passes to the block-end op (:func:`branch_scale`).
    """
    scaling = 0
    for name, module in between:
        if module is not None and has_hooks(module):
            return f"{name} ({type(module).__name__}) between {norm_name} and the residual add has hooks"
        op = branch_op(module)
        if op is None:
            return (
                f"{name} ({type(module).__name__}) sits between {norm_name} and the residual add and is not a known "
                "branch op (register_branch_op)"
            )
        if op.kind == "per_sample":
            if op.scale is None:
                return (
                    f"{name} ({op.description}) between {norm_name} and the residual add scales the branch per "
                    "sample in training but its BranchOp gives no scale function"
                )
            scaling += 1
            continue
        if op.kind == "per_sample_channel":
            return (
                f"{name} ({op.description}) between {norm_name} and the residual add scales the branch per sample "
                f"and channel from {norm_name}'s own output, which the fused block end cannot have before it runs "
                "(docs/design.md section 10)"
            )
        if op.kind != "identity":
            return f"{name} ({op.description}) between {norm_name} and the residual add changes the branch"
    if scaling > 1:
        return f"more than one per-sample scaling op between {norm_name} and the residual add"
    return None


def branch_scale(modules: Sequence[nn.Module | None], x: Tensor) -> Tensor | None:
    """The per-sample factors the ``modules`` between a fused block end's BatchNorm (input ``x``) and its residual
    add apply now (None: they leave the branch unchanged); :func:`block_end_problem` accepted them."""
    scale = None
    for module in modules:
        op = branch_op(module)
        if op is not None and op.kind == "per_sample" and op.scale is not None:
            s = op.scale(module, x)
            if s is not None:
                scale = s if scale is None else scale * s
    return scale


# --------------------------------------------------------------------------------------------------------------
# Norms


class NormAdapter(NamedTuple):
    """How to read a library's norm + activation module (e.g. timm's ``BatchNormAct2d``) as a BatchNorm.

    ``activation(module)`` returns the module's own activation (an :class:`ActivationSpec`, "identity" when it
    has none) or why the module cannot be replaced (a str: e.g. an active dropout between its norm and activation).
    """

    activation: Callable[[nn.Module], ActivationSpec | str]


_NORM_ADAPTERS: dict[type[nn.Module], NormAdapter] = {}


def register_norm_adapter(module_type: type[_BatchNorm], adapter: NormAdapter) -> None:
    """Lets converters treat modules of exactly ``module_type`` (a BatchNorm subclass) like a plain BatchNorm."""
    if not (isinstance(module_type, type) and issubclass(module_type, _BatchNorm)):
        raise TypeError(f"module_type must be a BatchNorm subclass, got {module_type!r}")
    _NORM_ADAPTERS[module_type] = adapter


def is_norm_act_type(module_type: type) -> bool:
    """Whether ``module_type`` is a registered norm + activation type (e.g. timm's ``BatchNormAct2d``)."""
    return module_type in _NORM_ADAPTERS


def _torch_base(module: nn.Module) -> type[nn.Module] | None:
    """The torch BatchNorm class ``module`` is an instance of (SyncBatchNorm before the others), or None."""
    for base in (nn.SyncBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(module, base):
            return base
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks (fusing would change what they see)."""
    return any(
        getattr(module, attr, None)
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


class ConvertContext:
    """Passed to converters: records results in ``report`` and builds fused BatchNorms from plain ones."""

    def __init__(self, report: ConvertReport) -> None:
        self.report = report
        self._reasons: dict[int, str] = {}

    def skip(self, bn: nn.Module, reason: str) -> None:
        """Records why ``bn`` stays unchanged (the first reason given for a module wins)."""
        self._reasons.setdefault(id(bn), reason)

    def skip_all(self, norms: list[nn.Module | None], reason: str) -> None:
        """:meth:`skip` for each BatchNorm among ``norms`` (other modules and None are ignored)."""
        for bn in norms:
            if isinstance(bn, _BatchNorm):
                self.skip(bn, reason)

    def reason(self, bn: nn.Module) -> str | None:
        return self._reasons.get(id(bn))

    def fusable(self, module: nn.Module | None, types: tuple[type, ...]) -> str | None:
        """None when ``module``'s exact type is one of ``types`` and it has no hooks; else the reason it is not."""
        if module is None:
            return "missing"
        if type(module) not in types:
            return f"{type(module).__name__} is not exactly one of {', '.join(t.__name__ for t in types)}"
        if has_hooks(module):
            return f"{type(module).__name__} has hooks (fusing would change what they see)"
        return None

    def norm_activation(self, bn: nn.Module | None) -> ActivationSpec | str:
        """The activation a BatchNorm applies itself ("identity" for a plain ``nn.BatchNorm*d``), or why ``bn``
        cannot be replaced by a fused one: it is not exactly a plain BatchNorm or a registered norm + activation
        module, it has hooks, or (for a norm + activation module) its activation or dropout cannot be fused."""
        if bn is None:
            return "missing"
        kind = type(bn)
        if kind not in BN_TO_ACT and kind not in _NORM_ADAPTERS:
            if isinstance(bn, FUSED_NORMS):
                return f"{kind.__name__} is already fused"
            return f"{kind.__name__} is not exactly nn.BatchNorm1d/2d/3d/SyncBatchNorm or a known norm-act layer"
        if has_hooks(bn):
            return f"{kind.__name__} has hooks (fusing would change what they see)"
        if kind in _NORM_ADAPTERS:
            return _NORM_ADAPTERS[kind].activation(bn)
        return ActivationSpec("identity")

    def plain_norm_problem(self, bn: nn.Module | None) -> str | None:
        """None when ``bn`` can be replaced and applies no activation of its own (so one may be fused after it)."""
        spec = self.norm_activation(bn)
        if isinstance(spec, str):
            return spec
        if spec.name != "identity":
            return f"{type(bn).__name__} already applies {spec.name}"
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
        """A fused BatchNorm sharing ``bn``'s parameters and buffers (same objects), recorded as converted.

        ``bn`` is a plain ``nn.BatchNorm1d/2d/3d`` or ``nn.SyncBatchNorm``, or a registered norm + activation module
        built on one (its own activation and dropout are dropped: the caller passes the activation). ``cls`` picks
        another fused class built like ``BatchNormAct*d`` (a subclass of the same torch BatchNorm with the fusedres
        BatchNormAct constructor, e.g. :class:`fusedres.nn.DenseNormAct2d` for a BatchNorm2d).
        """
        new = _fused_norm(bn, activation, negative_slope, cls)
        self.report.converted.append(ConvertedNorm(name, activation, residual, via))
        return new

    def fuse_spec(
        self, bn: nn.Module, name: str, spec: ActivationSpec, *, residual: bool, via: str, cls: type | None = None
    ) -> nn.Module:
        """:meth:`fuse` with the activation given as an :class:`ActivationSpec`."""
        return self.fuse(bn, name, spec.name, negative_slope=spec.negative_slope, residual=residual, via=via, cls=cls)


def fused_activation_problem(bn: nn.Module, spec: ActivationSpec, cls: type[nn.Module] | None = None) -> str | None:
    """None when the fused class that would replace ``bn`` (``cls``, or the one for its torch BatchNorm) computes
    ``spec``'s activation; else why not (SyncBatchNormAct2d has no silu, the dense modules no relu6 / silu)."""
    base = _torch_base(bn)
    if base is None:
        return f"{type(bn).__name__} is not a BatchNorm"
    target = cls if cls is not None else BN_TO_ACT[base]
    allowed = getattr(target, "_activations", None)
    if allowed is not None and spec.name not in allowed:
        return (
            f"activation {spec.name} is not supported by {target.__name__} (its op computes "
            f"{', '.join(allowed)})"
        )
    return None


def _fused_norm(bn: nn.Module, activation: str, negative_slope: float, cls: type[nn.Module] | None) -> nn.Module:
    base = _torch_base(bn)
    if base is None:
        raise TypeError(f"bn must be a BatchNorm, got {type(bn).__name__}")
    if (r := fused_activation_problem(bn, ActivationSpec(activation, negative_slope), cls)) is not None:
        raise ValueError(f"cannot fuse: {r}")  # callers check first; this guards a missed check
    if cls is None:
        cls = BN_TO_ACT[base]
    elif not (isinstance(cls, type) and issubclass(cls, base) and issubclass(cls, (_BatchNormActMixin, *FUSED_NORMS))):
        raise TypeError(f"cls must be a fusedres BatchNormAct subclass of {base.__name__}, got {cls!r}")
    kwargs: dict[str, Any] = {
        "device": "meta",  # placeholders only: replaced by the module's own tensors below
        "bias": bn.bias is not None or not bn.affine,
        "activation": activation,
        "negative_slope": negative_slope,
    }
    if issubclass(cls, nn.SyncBatchNorm):
        kwargs["process_group"] = bn.process_group
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kwargs)
    # The same Parameter and buffer objects: values, device, dtype, requires_grad and optimizer state carry over.
    new._parameters = dict(bn._parameters)
    new._buffers = dict(bn._buffers)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    return new


def dense_unit_conv_problem(conv: nn.Module | None, ctx: ConvertContext) -> str | None:
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


def identity_like(module: nn.Module) -> nn.Module:
    """An ``nn.Identity`` in ``module``'s train/eval mode (it takes the place of a fused activation)."""
    new = nn.Identity()
    new.train(module.training)
    return new


def bare(cls: type[nn.Module], original: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """An instance of ``cls`` without its __init__ (which would allocate and initialise new modules), holding
    ``original``'s children except ``skip`` (the same objects, in the same order) and its train/eval flag."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for child_name, child in original._modules.items():
        if child_name not in skip:
            new._modules[child_name] = child
    new.training = original.training
    return new


def retyped(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new instance of ``cls`` (a subclass of ``module``'s type that changes only ``forward``) holding all of
    ``module``'s state: attributes, children, parameters, buffers and hooks (the same objects)."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"cls must be a subclass of {type(module).__name__}, got {cls.__name__}")
    new = cls.__new__(cls)
    # Own copies of the containers (children, parameters, buffers, hooks), so that replacing a child of the new
    # module or registering a hook on it leaves the original untouched; their contents are the same objects.
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
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
    ``_DenseLayer`` replacing fusedres' one, whichever was registered first).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def deco(fn: Converter) -> Converter:
        _CONVERTERS[module_type] = fn
        return fn

    return deco


def register_default_converter(module_type: type[nn.Module]) -> Callable[[Converter], Converter]:
    """:func:`register_converter` for fusedres' own library converters, which are registered lazily (the first
    time convert() meets the library): a converter a user registered before for the same type is kept."""

    def deco(fn: Converter) -> Converter:
        _CONVERTERS.setdefault(module_type, fn)
        return fn

    return deco


def converter_for(module: nn.Module) -> Converter | None:
    return _CONVERTERS.get(type(module))

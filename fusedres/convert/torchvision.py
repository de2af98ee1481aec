"""Converters for torchvision's models: ResNet / ResNeXt / Wide ResNet, DenseNet, RegNet.

* ``BasicBlock`` / ``Bottleneck`` become :class:`fusedres.models.resnet.BasicBlock` / ``Bottleneck``: BN+ReLU pairs
  become ``BatchNormAct2d("relu")``, the block's last BN takes the shortcut (``relu(bn(x) + identity)`` in one
  pass), and a ``downsample`` ``Sequential(conv, BatchNorm2d)`` gets a ``BatchNormAct2d("identity")``. The
  convolutions are the same modules. ``ResNet``'s stem: ``bn1`` becomes ``BatchNormAct2d("relu")``, ``relu`` an
  ``nn.Identity``.
* ``_DenseLayer`` becomes :class:`fusedres.nn.DenseLayer`: ``norm1`` -> ``relu1`` -> ``conv1`` runs as one dense
  BN+ReLU+conv unit over the layer's inputs (the concatenation is never built) and ``norm2`` -> ``relu2`` -> ``conv2``
  as another (``norm1`` / ``norm2`` become :class:`fusedres.nn.DenseNormAct2d`); ``memory_efficient=True``
  (checkpointing) becomes fusedres' recompute-in-backward, which computes the same function and updates the running
  statistics once per forward (torchvision's recomputation updates them a second time).
* ``DenseNet`` becomes :class:`fusedres.models.densenet.DenseNet` (its forward applies no ReLU after ``features``)
  with ``features.norm5`` a ``DenseNormAct2d("relu")``, i.e. torchvision's ``F.relu`` after ``norm5`` fused;
  ``_Transition`` becomes :class:`fusedres.nn.DenseTransition`, and ``_DenseBlock`` becomes
  :class:`fusedres.nn.DenseBlock` (each feature map's batch statistics computed once and reused by every later layer)
  where the module after the block (a converted transition, or the fused ``norm5``) reads the block's
  :class:`fusedres.nn.DenseFeatures`; otherwise the block stays torchvision's, with its layers converted one by one.
* RegNet's ``ResBottleneckBlock`` becomes :class:`ResBottleneckBlock` (a subclass changing only ``forward``): the last
  BatchNorm of ``f`` (``f.c``) takes the shortcut and the block's activation, and the projection ``proj`` gets a
  ``BatchNormAct2d("identity")``. The squeeze-excitation of RegNetY sits before ``f.c``, so it does not stand in the
  way. The BN -> ReLU pairs of ``Conv2dNormActivation`` (RegNet, MobileNet, EfficientNet, MNASNet stems and blocks)
  are Sequential pairs (:mod:`fusedres.convert.sequential`), ReLU6 (MobileNetV2) and SiLU (EfficientNet) included;
  Hardswish pairs (MobileNetV3) wait for the kernels.
* MobileNetV2's ``InvertedResidual`` and MNASNet's ``_InvertedResidual`` with their residual connection become
  :class:`InvertedResidual` / :class:`MnasInvertedResidual` (subclasses changing only ``forward``): the projection
  BatchNorm ending the block's Sequential takes the block input as its residual, ``x + bn(conv(h))`` in one pass
  (identity activation: these blocks are linear bottlenecks).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import mnasnet as tv_mnasnet
from torchvision.models import mobilenetv2 as tv_mobilenetv2
from torchvision.models import regnet as tv_regnet
from torchvision.models import resnet as tv_resnet
from torchvision.ops import SqueezeExcitation, StochasticDepth

from fusedres.convert._core import (
    ActivationSpec,
    BranchOp,
    ConvertContext,
    activation_spec,
    bare,
    dense_unit_conv_problem,
    fused_activation_problem,
    has_hooks,
    identity_like,
    register_branch_op,
    register_default_converter,
    retyped,
)
from fusedres.convert.sequential import fuse_projection, is_plain_sequential
from fusedres.models import densenet as fr_densenet
from fusedres.models import resnet as fr_resnet
from fusedres.nn import dense_layer as fr_dense

__all__ = [
    "InvertedResidual",
    "MnasInvertedResidual",
    "ResBottleneckBlock",
    "convert_dense_layer",
    "convert_densenet",
    "convert_inverted_residual",
    "convert_mnas_inverted_residual",
    "convert_regnet_block",
    "convert_resnet_block",
    "convert_resnet_stem",
]

_DENSE_NORM = fr_dense.DenseNormAct2d  # reads DenseFeatures and runs the BN+act+conv unit (bn_act_conv)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _relu_problem(module: nn.Module | None) -> str | None:
    spec = activation_spec(module)
    if isinstance(spec, str):
        return spec
    return None if spec.name == "relu" else f"{type(module).__name__} is not exactly nn.ReLU"


# --------------------------------------------------------------------------------------------------------------
# ResNet


def convert_resnet_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """torchvision ``BasicBlock`` / ``Bottleneck`` -> fusedres' (same children, ``relu`` folded into the norms)."""
    bottleneck = isinstance(block, tv_resnet.Bottleneck)
    norms = ["bn1", "bn2", "bn3"] if bottleneck else ["bn1", "bn2"]
    kind = type(block).__name__
    problems = [f"{n}: {r}" for n in norms if (r := ctx.plain_norm_problem(getattr(block, n, None)))]
    if (r := _relu_problem(getattr(block, "relu", None))) is not None:
        problems.append(f"relu: {r}")
    if has_hooks(block):
        problems.append(f"the {kind} has hooks")
    if problems:
        ctx.skip_all(
            [getattr(block, n, None) for n in norms], f"in a {kind} that cannot be fused ({'; '.join(problems)})"
        )
        return block
    cls = fr_resnet.Bottleneck if bottleneck else fr_resnet.BasicBlock
    # The fused block class without its __init__ (which would allocate and initialise new convolutions), given
    # the original children: the convolutions and the downsample branch are the same modules.
    new = bare(cls, block, skip=("relu",))
    new.downsample = block.downsample  # None is not among the children
    new.stride = block.stride
    prefix = _prefix(name)
    for i, n in enumerate(norms):
        last = i == len(norms) - 1
        via = f"{kind} ({'residual' if last else 'BN+ReLU'})"
        setattr(new, n, ctx.fuse(getattr(block, n), f"{prefix}{n}", "relu", residual=last, via=via))
    if type(block.downsample) is nn.Sequential and len(block.downsample) == 2:
        fuse_projection(block.downsample, f"{prefix}downsample", ctx, f"{kind} downsample")
    ctx.report.blocks.append((name, kind))
    return new


def convert_resnet_stem(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """torchvision ``ResNet``: ``bn1`` -> ``relu`` (ResNet.forward applies ``self.relu`` once, right after bn1)."""
    r = ctx.plain_norm_problem(model.bn1) or _relu_problem(model.relu)
    if r is None:
        model.bn1 = ctx.fuse(model.bn1, f"{_prefix(name)}bn1", "relu", residual=False, via="ResNet stem")
        model.relu = identity_like(model.relu)
    else:
        ctx.skip_all([model.bn1], f"ResNet stem: {r}")
    return model


# --------------------------------------------------------------------------------------------------------------
# RegNet


class ResBottleneckBlock(tv_regnet.ResBottleneckBlock):
    """torchvision's RegNet ``ResBottleneckBlock`` whose block end ``act(f.c's BN(x) + shortcut)`` is one fused op.

    Built by :func:`convert_regnet_block` from a torchvision block (same children and state): ``f.c[1]`` is a
    fused BatchNorm applying the block's activation (``self.activation`` is then an ``nn.Identity``), and ``proj``'s
    BatchNorm (if any) a fused identity BatchNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, width_in, H, W] -> Tensor[N, width_out, H / stride, W / stride]."""
        shortcut = self.proj(x) if self.proj is not None else x
        keys = list(self.f._modules)
        for key in keys[:-1]:  # a, b and (RegNetY) se, in order
            x = self.f._modules[key](x)
        conv, bn = self.f._modules[keys[-1]]
        return bn(conv(x), shortcut)


def _regnet_end_problem(block: nn.Module, ctx: ConvertContext) -> str | None:
    f = block.f
    if not is_plain_sequential(f) or has_hooks(f) or len(f) < 2:
        return "f is not a hook-free plain Sequential of at least two modules"
    last = f[-1]
    if not is_plain_sequential(last) or has_hooks(last) or len(last) != 2 or type(last[0]) is not nn.Conv2d:
        return "f's last module is not a hook-free Sequential (Conv2d, BatchNorm) (Conv2dNormActivation without activation)"
    if has_hooks(last[0]):
        return "f's last convolution has hooks"
    if block.proj is not None and has_hooks(block.proj):
        return "proj has hooks"
    if (r := ctx.plain_norm_problem(last[1])) is not None:
        return r
    spec = activation_spec(block.activation)
    if isinstance(spec, str):
        return spec
    return fused_activation_problem(last[1], spec)


def convert_regnet_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """torchvision RegNet ``ResBottleneckBlock`` -> :class:`ResBottleneckBlock` (``f.c``'s BN + shortcut + act)."""
    prefix = _prefix(name)
    fuse_projection(block.proj, f"{prefix}proj", ctx, "ResBottleneckBlock projection")
    problem = _regnet_end_problem(block, ctx)
    if problem is not None:
        last = block.f[-1] if isinstance(block.f, nn.Sequential) and len(block.f) else None
        if isinstance(last, nn.Sequential) and len(last):
            ctx.skip_all([last[-1]], f"ResBottleneckBlock end: {problem}")
        return block
    spec = activation_spec(block.activation)
    assert isinstance(spec, ActivationSpec)
    new = retyped(block, ResBottleneckBlock)
    keys = list(block.f._modules)
    c = block.f._modules[keys[-1]]
    c[1] = ctx.fuse_spec(c[1], f"{prefix}f.{keys[-1]}.1", spec, residual=True, via="ResBottleneckBlock (residual)")
    new.activation = identity_like(block.activation)
    ctx.report.blocks.append((name, "ResBottleneckBlock"))
    return new


# --------------------------------------------------------------------------------------------------------------
# Inverted residuals (MobileNetV2, MNASNet)


def _through_last(seq: nn.Sequential, x: Tensor) -> Tensor:
    """Runs ``seq``'s last module as ``last(h, x)``: its fused BatchNorm adds the block input ``x``."""
    mods = list(seq._modules.values())
    h = x
    for m in mods[:-1]:
        h = m(h)
    return mods[-1](h, x)


class InvertedResidual(tv_mobilenetv2.InvertedResidual):
    """torchvision's MobileNetV2 ``InvertedResidual`` whose ``x + conv(x)`` ends in one fused op: ``conv``'s last
    BatchNorm is a ``BatchNormAct2d("identity")`` that adds the block input. Built by :func:`convert_inverted_residual`
    only for blocks with ``use_res_connect``."""

    def forward(self, x: Tensor) -> Tensor:
        return _through_last(self.conv, x)


class MnasInvertedResidual(tv_mnasnet._InvertedResidual):
    """torchvision's MNASNet ``_InvertedResidual`` whose ``layers(x) + x`` ends in one fused op (see
    :class:`InvertedResidual`); only for blocks with ``apply_residual``."""

    def forward(self, x: Tensor) -> Tensor:
        return _through_last(self.layers, x)


def _inverted_residual_problem(seq: nn.Module, ctx: ConvertContext) -> str | None:
    if not is_plain_sequential(seq) or has_hooks(seq) or len(seq) < 2:
        return "its Sequential is not a hook-free plain Sequential of at least two modules"
    return ctx.plain_norm_problem(seq[-1])


def _convert_inverted(block: nn.Module, name: str, ctx: ConvertContext, seq_attr: str, cls: type) -> nn.Module:
    seq = getattr(block, seq_attr)
    if (problem := _inverted_residual_problem(seq, ctx)) is not None:
        if isinstance(seq, nn.Sequential) and len(seq):
            ctx.skip_all([seq[-1]], f"{type(block).__name__} end: {problem}")
        return block
    new = retyped(block, cls)
    key = list(seq._modules)[-1]
    via = f"{type(block).__name__} (residual)"
    seq._modules[key] = ctx.fuse(seq[-1], f"{_prefix(name)}{seq_attr}.{key}", "identity", residual=True, via=via)
    ctx.report.blocks.append((name, type(block).__name__))
    return new


def convert_inverted_residual(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """MobileNetV2 ``InvertedResidual`` with ``use_res_connect`` -> :class:`InvertedResidual`; without it the block
    is left (its projection BatchNorm alone is fused by convert's last pass)."""
    if not block.use_res_connect or has_hooks(block):
        return block
    return _convert_inverted(block, name, ctx, "conv", InvertedResidual)


def convert_mnas_inverted_residual(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """MNASNet ``_InvertedResidual`` with ``apply_residual`` -> :class:`MnasInvertedResidual`."""
    if not block.apply_residual or has_hooks(block):
        return block
    return _convert_inverted(block, name, ctx, "layers", MnasInvertedResidual)


# --------------------------------------------------------------------------------------------------------------
# DenseNet


def _dense_layer_problems(layer: nn.Module, ctx: ConvertContext) -> list[str]:
    # torchvision's _DenseLayer.forward: conv1(relu1(norm1(cat(inputs)))), then conv2(relu2(norm2(.))), dropout.
    problems = [f"{n}: {r}" for n in ("norm1", "norm2") if (r := ctx.plain_norm_problem(getattr(layer, n, None)))]
    problems += [f"{n}: {r}" for n in ("relu1", "relu2") if (r := _relu_problem(getattr(layer, n, None)))]
    problems += [
        f"{n}: {r}" for n in ("conv1", "conv2") if (r := dense_unit_conv_problem(getattr(layer, n, None), ctx))
    ]
    if has_hooks(layer):
        problems.append("the _DenseLayer has hooks")
    return problems


def convert_dense_layer(layer: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """torchvision ``_DenseLayer`` -> :class:`fusedres.nn.DenseLayer` (two fused BN+ReLU+conv units)."""
    problems = _dense_layer_problems(layer, ctx)
    if problems:
        reason = f"in a _DenseLayer that cannot be fused ({'; '.join(problems)})"
        ctx.skip_all([getattr(layer, "norm1", None), getattr(layer, "norm2", None)], reason)
        return layer
    # fusedres' DenseLayer without its __init__, given the original children (the same convolutions); its
    # forward takes a tensor, a list of tensors (torchvision's _DenseBlock) or DenseFeatures (fusedres').
    new = bare(fr_dense.DenseLayer, layer, skip=("relu1", "relu2"))
    new.fused = True
    # torchvision's checkpointing -> fusedres' recompute in backward: the same function, statistics updated once.
    new.memory_efficient = bool(layer.memory_efficient)
    new.checkpoint = False
    new.drop_rate = float(layer.drop_rate)
    prefix = _prefix(name)
    for n, via in (("norm1", "_DenseLayer (dense BN+ReLU+conv1)"), ("norm2", "_DenseLayer (BN+ReLU+conv2)")):
        setattr(new, n, ctx.fuse(getattr(layer, n), f"{prefix}{n}", "relu", residual=False, via=via, cls=_DENSE_NORM))
    ctx.report.blocks.append((name, "_DenseLayer"))
    return new


def _transition_problems(trans: nn.Module, ctx: ConvertContext) -> list[str]:
    # _Transition is an nn.Sequential: norm -> relu -> conv -> pool, in the order of its modules.
    if list(trans._modules) != ["norm", "relu", "conv", "pool"]:
        return [f"its modules are {list(trans._modules)}, not [norm, relu, conv, pool]"]
    problems = [f"norm: {r}"] if (r := ctx.plain_norm_problem(trans.norm)) else []
    problems += [f"relu: {r}"] if (r := _relu_problem(trans.relu)) else []
    problems += [f"conv: {r}"] if (r := dense_unit_conv_problem(trans.conv, ctx)) else []
    if has_hooks(trans):
        problems.append("the _Transition has hooks")
    return problems


def _convert_transition(trans: nn.Module, name: str, ctx: ConvertContext, memory_efficient: bool) -> nn.Module:
    new = bare(fr_dense.DenseTransition, trans, skip=("relu",))
    new.fused = True
    new.memory_efficient = memory_efficient
    new.checkpoint = False
    new.norm = ctx.fuse(
        trans.norm, f"{name}.norm", "relu", residual=False, via="_Transition (BN+ReLU+conv)", cls=_DENSE_NORM
    )
    ctx.report.blocks.append((name, "_Transition"))
    return new


def _convert_dense_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    new = bare(fr_dense.DenseBlock, block, skip=tuple(block._modules))
    new.fused = True
    for key, layer in block._modules.items():
        new.add_module(key, convert_dense_layer(layer, f"{name}.{key}", ctx))
    ctx.report.blocks.append((name, "_DenseBlock"))
    return new


def convert_densenet(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """torchvision ``DenseNet`` -> :class:`fusedres.models.densenet.DenseNet` when ``norm5`` + ``F.relu`` can fuse.

    DenseNet.forward is classifier(flatten(pool(F.relu(features(x))))): fusing the F.relu into norm5 takes
    fusedres' DenseNet.forward (no ReLU after features), i.e. replacing the model's class. fusedres' DenseBlocks
    return DenseFeatures (the maps and their batch statistics), which only a DenseTransition or the DenseNormAct2d
    norm5 reads: a block is replaced only when the module after it is. Whatever is not converted here (layers of a
    block left to torchvision, transitions that cannot fuse their conv) is converted piecewise as the walk goes on
    into the children (_DenseLayer, Sequential pairs).
    """
    prefix = _prefix(name)
    features = getattr(model, "features", None)
    norm5 = features._modules.get("norm5") if isinstance(features, nn.Module) else None
    if type(features) is not nn.Sequential or has_hooks(features):
        ctx.skip_all([norm5], "DenseNet's norm5 + F.relu: features is not a plain nn.Sequential without hooks")
        return model
    keys = list(features._modules)
    if has_hooks(model):
        norm5_problem = "the DenseNet has hooks"
    elif keys[-1:] != ["norm5"]:
        norm5_problem = "norm5 is not the last module of features (DenseNet.forward applies F.relu to its output)"
    else:
        norm5_problem = ctx.plain_norm_problem(norm5)
    memory_efficient = all(bool(m.memory_efficient) for m in model.modules() if type(m) is tv_densenet._DenseLayer)
    transitions = {
        k: m
        for k, m in features._modules.items()
        if type(m) is tv_densenet._Transition and not _transition_problems(m, ctx)
    }
    for i, key in enumerate(keys):
        module, qualified = features._modules[key], f"{prefix}features.{key}"
        if key in transitions:
            features._modules[key] = _convert_transition(module, qualified, ctx, memory_efficient)
        elif type(module) is tv_densenet._DenseBlock:
            after = keys[i + 1] if i + 1 < len(keys) else None
            reads_features = after in transitions or (after == "norm5" and norm5_problem is None)
            layers_fuse = all(
                type(m) is tv_densenet._DenseLayer and not _dense_layer_problems(m, ctx) for m in module.values()
            )
            if reads_features and layers_fuse and not has_hooks(module):
                features._modules[key] = _convert_dense_block(module, qualified, ctx)
    if norm5_problem is not None:
        ctx.skip_all([norm5], f"DenseNet's norm5 + F.relu: {norm5_problem}")
        return model
    features.norm5 = ctx.fuse(
        norm5, f"{prefix}features.norm5", "relu", residual=False, via="DenseNet norm5 (+ F.relu)", cls=_DENSE_NORM
    )
    new = bare(fr_densenet.DenseNet, model)
    new.fused = True
    new.memory_efficient = memory_efficient
    new.checkpoint = False
    ctx.report.blocks.append((name, "DenseNet"))
    return new


# --------------------------------------------------------------------------------------------------------------
# Registration

for _block in (tv_resnet.BasicBlock, tv_resnet.Bottleneck):
    register_default_converter(_block)(convert_resnet_block)
register_default_converter(tv_resnet.ResNet)(convert_resnet_stem)
register_default_converter(tv_regnet.ResBottleneckBlock)(convert_regnet_block)
register_default_converter(tv_mobilenetv2.InvertedResidual)(convert_inverted_residual)
register_default_converter(tv_mnasnet._InvertedResidual)(convert_mnas_inverted_residual)
register_default_converter(tv_densenet._DenseLayer)(convert_dense_layer)
register_default_converter(tv_densenet.DenseNet)(convert_densenet)


@register_branch_op(StochasticDepth)
def _stochastic_depth(module: nn.Module) -> BranchOp:
    if module.p == 0:
        return BranchOp("identity", "StochasticDepth(p=0)")
    description = f"StochasticDepth(mode={module.mode!r}) with p > 0, stochastic depth"
    return BranchOp("per_sample" if module.mode == "row" else "whole_branch", description)


@register_branch_op(SqueezeExcitation)
def _squeeze_excitation(module: nn.Module) -> BranchOp:
    return BranchOp("per_sample_channel", "SqueezeExcitation, a channel attention")

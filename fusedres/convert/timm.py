"""Converters for timm's models and layers (timm 1.0).

* timm's norm-act layers, ``timm.layers.BatchNormAct2d`` (BatchNorm, then ``drop``, then ``act``) and
  ``SyncBatchNormAct``: replaced by :class:`fusedres.nn.BatchNormAct2d` / :class:`fusedres.nn.SyncBatchNormAct2d`
  with the same activation (``act_kwargs`` such as ``negative_slope`` kept) when ``act`` is ``nn.ReLU``,
  ``nn.LeakyReLU`` and ``drop`` does nothing (``nn.Identity``, or a drop module with probability 0). ``drop`` and
  ``act`` hold no parameters, so the state_dict is unchanged. This covers every timm model built on them:
  ResNetV2, RegNet, DenseNet, DLA, DPN, ... A norm-act layer without an activation is left to PyTorch, except where a
  block below gives it the residual add or it is a shortcut projection.
* ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` (ResNet, ResNeXt, Wide ResNet, SE-ResNet, the "c/d/s/t" variants,
  ResNet-RS, ...): each BN -> act pair (``bn1`` -> ``drop_block`` -> ``act1`` etc., when ``drop_block`` does nothing)
  becomes one fused BatchNorm; the projection BatchNorm of ``downsample`` (``Sequential(conv, bn)`` or the "d" variant's
  ``Sequential(pool, conv, bn)``) an identity one; and when nothing sits between the last BatchNorm and the shortcut
  add (no ``se``; ``drop_path`` is fine) the block becomes :class:`BasicBlock` / :class:`Bottleneck` (subclasses
  changing only ``forward``) whose last BatchNorm computes ``act(scale * bn(x) + shortcut)``, scale = ``drop_path``'s
  per-sample factors in training (the block-end op, docs/design.md section 10). An SE module there leaves that
  BatchNorm to PyTorch: SE reads the BatchNorm's output (see :func:`fusedres.convert._core.block_end_problem`). The stem's ``bn1`` -> ``act1`` is fused (``ResNet``), and the
  deep / tiered stems are Sequentials (:mod:`fusedres.convert.sequential`).
* ``timm.models.regnet.Bottleneck`` (RegNetX/Y/V/Z with post-activation blocks): ``conv3.bn`` takes the shortcut and
  ``act3`` (:class:`RegNetBottleneck`), the shortcut projection's BatchNorm becomes an identity one. RegNetY's SE
  sits before ``conv3``, so it does not stand in the way; an active ``drop_path`` fuses as a per-sample scale.
* ``timm.models.densenet.DenseLayer`` becomes :class:`fusedres.nn.DenseLayer` (dense BN+act+conv units: the
  concatenation is never built; timm's ``grad_checkpointing`` becomes fusedres' recompute-in-backward) and
  ``DenseTransition`` :class:`fusedres.nn.DenseTransition`. timm's ``DenseBlock`` stays (it returns the
  concatenation, which ``forward_intermediates`` hands out), so feature statistics are not shared between layers.

Importing this module imports timm; :func:`fusedres.convert` imports it by itself once timm is imported.
"""

from __future__ import annotations

import timm.layers as timm_layers
from timm.layers import activations as timm_act
from timm.models import densenet as timm_densenet
from timm.models import regnet as timm_regnet
from timm.models import resnet as timm_resnet
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.convert._core import (
    FUSED_NORMS,
    ActivationSpec,
    BranchOp,
    ConvertContext,
    NormAdapter,
    activation_spec,
    bare,
    block_end_problem,
    branch_op,
    branch_scale,
    dense_unit_conv_problem,
    fused_activation_problem,
    has_hooks,
    identity_like,
    register_branch_op,
    register_default_converter,
    register_norm_adapter,
    register_pending_activation,
    retyped,
)
from fusedres.convert.sequential import fuse_projection, is_plain_sequential
from fusedres.nn import dense_layer as fr_dense

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "RegNetBottleneck",
    "convert_dense_layer",
    "convert_dense_transition",
    "convert_norm_act",
    "convert_regnet_block",
    "convert_resnet_block",
    "convert_resnet_stem",
    "drop_problem",
]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def drop_problem(module: nn.Module | None, where: str) -> str | None:
    """None when the drop module ``module`` (sitting ``where``) never changes its input; else the reason.

    ``nn.Identity``, None, and timm's ``DropBlock2d`` / ``DropPath`` and ``nn.Dropout`` with probability 0 do nothing
    in any mode. A drop module with a probability is active in training, so fusing across it would change the order
    of the drop and the activation (or of the drop and the residual add).
    """
    if module is None:
        return None
    if has_hooks(module):
        return f"{type(module).__name__} {where} has hooks"
    kind = type(module)
    if kind is nn.Identity:
        return None
    if kind in (timm_layers.DropBlock2d, timm_layers.DropPath) and not module.drop_prob:
        return None
    if kind in (nn.Dropout, nn.Dropout2d) and not module.p:
        return None
    return f"{module!r} sits {where} (active in training)"


# --------------------------------------------------------------------------------------------------------------
# timm's norm-act layers


def _norm_act_activation(module: nn.Module) -> ActivationSpec | str:
    """The activation of a timm BatchNormAct2d / SyncBatchNormAct, or why it cannot be fused."""
    if (r := drop_problem(getattr(module, "drop", None), "between its norm and act")) is not None:
        return f"drop: {r}"
    act = getattr(module, "act", None)
    if act is None:  # SyncBatchNormAct made by hand, without the attribute: no activation
        return ActivationSpec("identity")
    spec = activation_spec(act)
    if isinstance(spec, ActivationSpec) and (r := fused_activation_problem(module, spec)) is not None:
        return f"act: {r}"
    return f"act: {spec}" if isinstance(spec, str) else spec


def convert_norm_act(module: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm ``BatchNormAct2d`` / ``SyncBatchNormAct`` with a fused activation -> the fusedres BatchNorm doing it."""
    spec = ctx.norm_activation(module)
    if isinstance(spec, str):
        ctx.skip(module, spec)
        return module
    if spec.name == "identity":
        return module  # a BatchNorm alone: a Sequential pair (an activation after it) may still take it
    return ctx.fuse_spec(module, name, spec, residual=False, via=f"timm {type(module).__name__}")


# --------------------------------------------------------------------------------------------------------------
# Pieces shared by the block converters


def _own_activation(ctx: ConvertContext, bn: nn.Module | None) -> bool:
    """Whether ``bn`` is a norm-act layer applying an activation of its own (its converter replaces it alone)."""
    spec = ctx.norm_activation(bn)
    return isinstance(spec, ActivationSpec) and spec.name != "identity"


def _fuse_pair(
    block: nn.Module, bn_name: str, drop_name: str | None, act_name: str, name: str, ctx: ConvertContext, via: str
) -> None:
    """``bn`` -> (``drop``) -> ``act`` attributes of ``block``, in its forward's order: the fused BatchNorm takes
    ``bn``'s place and an ``nn.Identity`` ``act``'s (``drop``, which does nothing, stays where it is)."""
    bn, act = getattr(block, bn_name, None), getattr(block, act_name, None)
    if not isinstance(bn, _BatchNorm) or isinstance(bn, FUSED_NORMS) or _own_activation(ctx, bn):
        return
    problem = ctx.plain_norm_problem(bn)
    if problem is None and drop_name is not None:
        problem = drop_problem(getattr(block, drop_name, None), f"between {bn_name} and {act_name}")
    spec = activation_spec(act)
    if problem is None and isinstance(spec, str):
        problem = f"{act_name}: {spec}"
    if problem is None and (r := fused_activation_problem(bn, spec)) is not None:
        problem = f"{act_name}: {r}"
    if problem is None and spec.name == "identity":
        problem = f"{act_name} is nn.Identity (a BatchNorm alone is left to PyTorch)"
    if problem is not None:
        ctx.skip(bn, f"{bn_name} -> {act_name} in a timm {type(block).__name__}: {problem}")
        return
    setattr(block, bn_name, ctx.fuse_spec(bn, f"{_prefix(name)}{bn_name}", spec, residual=False, via=via))
    setattr(block, act_name, identity_like(act))


def _end_problem(
    ctx: ConvertContext,
    bn: nn.Module | None,
    bn_name: str,
    between: list[tuple[str, nn.Module | None]],
    act: nn.Module | None,
) -> ActivationSpec | str:
    """The activation the block end ``act(bn(x) [between] + shortcut)`` fuses, or why it cannot."""
    if (r := ctx.plain_norm_problem(bn)) is not None:
        return r
    if (r := block_end_problem(bn_name, between)) is not None:
        return r
    if isinstance(bn, nn.SyncBatchNorm) and any(getattr(branch_op(m), "kind", None) == "per_sample" for _, m in between):
        return f"a per-sample scaling op between {bn_name} and the residual add: SyncBatchNormAct2d takes no scale yet"
    spec = activation_spec(act)
    if isinstance(spec, ActivationSpec) and (r := fused_activation_problem(bn, spec)) is not None:
        return r
    return spec


def _fuse_timm_projection(downsample: nn.Module | None, name: str, ctx: ConvertContext, via: str) -> None:
    """The BatchNorm ending a timm shortcut projection gets an identity fused BatchNorm: ``Sequential(conv, bn)``,
    ``Sequential(pool, conv, bn)`` (timm ResNet), ``ConvNormAct`` or ``Sequential(pool, ConvNormAct)`` (RegNet)."""
    prefix = _prefix(name)
    if is_plain_sequential(downsample) and len(downsample):
        last_key = list(downsample._modules)[-1]
        if type(downsample._modules[last_key]) is timm_layers.ConvNormAct:
            _fuse_timm_projection(downsample._modules[last_key], f"{prefix}{last_key}", ctx, via)
        else:
            fuse_projection(downsample, name, ctx, via)
        return
    if type(downsample) is not timm_layers.ConvNormAct or has_hooks(downsample):
        return
    # ConvNormAct.forward: conv -> bn -> aa (when there is one): the bn ends the projection only without aa.
    if getattr(downsample, "aa", None) is not None:
        return
    bn = downsample.bn
    if not isinstance(bn, _BatchNorm) or isinstance(bn, FUSED_NORMS) or _own_activation(ctx, bn):
        return
    if (problem := ctx.plain_norm_problem(bn)) is None:
        downsample.bn = ctx.fuse(bn, f"{prefix}bn", "identity", residual=False, via=via)
    else:
        ctx.skip(bn, f"shortcut projection BatchNorm: {problem}")


# --------------------------------------------------------------------------------------------------------------
# ResNet family (timm.models.resnet)


class BasicBlock(timm_resnet.BasicBlock):
    """timm's ResNet ``BasicBlock`` whose block end ``act2(drop_path(bn2(x)) + shortcut)`` is one fused op (``bn2``).

    Built by :func:`convert_resnet_block` from a timm block without ``se`` (same children, attributes and state;
    ``act2`` is then an ``nn.Identity``). An active ``drop_path`` becomes the op's per-sample scale (the same random
    draws as timm's). The rest is timm's forward, in its order.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        scale = branch_scale([self.drop_path], x)
        return self.bn2(x, shortcut) if scale is None else self.bn2(x, shortcut, scale)


class Bottleneck(timm_resnet.Bottleneck):
    """timm's ResNet ``Bottleneck`` whose block end ``act3(drop_path(bn3(x)) + shortcut)`` is one fused op (``bn3``).

    Built by :func:`convert_resnet_block` like :class:`BasicBlock`.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes * 4, H / stride, W / stride]."""
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        scale = branch_scale([self.drop_path], x)
        return self.bn3(x, shortcut) if scale is None else self.bn3(x, shortcut, scale)


def convert_resnet_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm ``BasicBlock`` / ``Bottleneck``: BN -> act pairs, the downsample projection, and the block end."""
    bottleneck = isinstance(block, timm_resnet.Bottleneck)
    kind = type(block).__name__
    via = f"timm {kind}"
    prefix = _prefix(name)
    # Pairs, in the order of timm's forward (drop_block sits between BN and activation where timm puts it).
    pairs = [("bn1", None, "act1"), ("bn2", "drop_block", "act2")] if bottleneck else [("bn1", "drop_block", "act1")]
    for bn_name, drop_name, act_name in pairs:
        _fuse_pair(block, bn_name, drop_name, act_name, name, ctx, f"{via} (BN+act)")
    _fuse_timm_projection(block.downsample, f"{prefix}downsample", ctx, f"{via} downsample")
    bn_name, act_name = ("bn3", "act3") if bottleneck else ("bn2", "act2")
    bn, act = getattr(block, bn_name), getattr(block, act_name)
    if _own_activation(ctx, bn) or isinstance(bn, FUSED_NORMS):
        return block
    spec = _end_problem(ctx, bn, bn_name, [("se", block.se), ("drop_path", block.drop_path)], act)
    if isinstance(spec, str):
        ctx.skip(bn, f"block end of a timm {kind}: {spec}")
        return block
    new = retyped(block, Bottleneck if bottleneck else BasicBlock)
    setattr(new, bn_name, ctx.fuse_spec(bn, f"{prefix}{bn_name}", spec, residual=True, via=f"{via} (residual)"))
    setattr(new, act_name, identity_like(act))
    ctx.report.blocks.append((name, via))
    return new


def convert_resnet_stem(model: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm ``ResNet``: ``bn1`` -> ``act1`` (forward_features and forward_intermediates call them in that order)."""
    _fuse_pair(model, "bn1", None, "act1", name, ctx, "timm ResNet stem")
    return model


# --------------------------------------------------------------------------------------------------------------
# RegNet (timm.models.regnet)


class RegNetBottleneck(timm_regnet.Bottleneck):
    """timm's RegNet ``Bottleneck`` whose block end ``act3(drop_path(conv3.bn(x)) + shortcut)`` is one fused op.

    Built by :func:`convert_regnet_block` (same children, attributes and state; ``act3`` is then an
    ``nn.Identity``). ``conv3`` is a ``ConvNormAct`` without anti-aliasing: its conv and bn are called directly.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_chs, H, W] -> Tensor[N, out_chs, H / stride, W / stride]."""
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3.conv(x)
        shortcut = self.downsample(shortcut)
        scale = branch_scale([self.drop_path], x)
        return self.conv3.bn(x, shortcut) if scale is None else self.conv3.bn(x, shortcut, scale)


def convert_regnet_block(block: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm RegNet ``Bottleneck``: ``conv3.bn`` + shortcut + ``act3``, and the shortcut projection."""
    prefix = _prefix(name)
    _fuse_timm_projection(block.downsample, f"{prefix}downsample", ctx, "timm RegNet Bottleneck downsample")
    conv3 = block.conv3
    if type(conv3) is not timm_layers.ConvNormAct or has_hooks(conv3) or getattr(conv3, "aa", None) is not None:
        ctx.skip_all([getattr(conv3, "bn", None)], "block end of a timm RegNet Bottleneck: conv3 is not a hook-free "
                     "ConvNormAct without anti-aliasing")  # fmt: skip
        return block
    bn = conv3.bn
    if _own_activation(ctx, bn) or isinstance(bn, FUSED_NORMS):
        return block
    if block.downsample is None:  # no shortcut (RegNetZ): forward is act3(conv3(x)), a BN -> act pair
        spec = activation_spec(block.act3)
        if isinstance(spec, ActivationSpec) and (r := fused_activation_problem(bn, spec)) is not None:
            spec = r
        if isinstance(spec, ActivationSpec) and spec.name != "identity" and ctx.plain_norm_problem(bn) is None:
            conv3.bn = ctx.fuse_spec(
                bn, f"{prefix}conv3.bn", spec, residual=False, via="timm RegNet Bottleneck (BN+act)"
            )
            block.act3 = identity_like(block.act3)
        else:
            ctx.skip(bn, f"conv3.bn -> act3 in a timm RegNet Bottleneck without shortcut: act3 {spec}")
        return block
    if has_hooks(conv3.conv):
        ctx.skip(bn, "block end of a timm RegNet Bottleneck: conv3.conv has hooks")
        return block
    spec = _end_problem(ctx, bn, "conv3.bn", [("drop_path", block.drop_path)], block.act3)
    if isinstance(spec, str):
        ctx.skip(bn, f"block end of a timm RegNet Bottleneck: {spec}")
        return block
    new = retyped(block, RegNetBottleneck)
    conv3.bn = ctx.fuse_spec(bn, f"{prefix}conv3.bn", spec, residual=True, via="timm RegNet Bottleneck (residual)")
    new.act3 = identity_like(block.act3)
    ctx.report.blocks.append((name, "timm RegNet Bottleneck"))
    return new


# --------------------------------------------------------------------------------------------------------------
# DenseNet (timm.models.densenet)


def _dense_unit_problems(module: nn.Module, units: tuple[tuple[str, str], ...], ctx: ConvertContext) -> list[str]:
    problems = []
    for norm_name, conv_name in units:
        norm = getattr(module, norm_name, None)
        spec = ctx.norm_activation(norm)
        if isinstance(spec, str):
            problems.append(f"{norm_name}: {spec}")
        elif spec.name == "identity":
            problems.append(f"{norm_name} has no activation")
        elif (r := fused_activation_problem(norm, spec, fr_dense.DenseNormAct2d)) is not None:
            problems.append(f"{norm_name}: {r}")
        if (r := dense_unit_conv_problem(getattr(module, conv_name, None), ctx)) is not None:
            problems.append(f"{conv_name}: {r}")
    if has_hooks(module):
        problems.append(f"the {type(module).__name__} has hooks")
    return problems


def _fuse_dense_norm(module: nn.Module, norm_name: str, name: str, ctx: ConvertContext, via: str) -> nn.Module:
    bn = getattr(module, norm_name)
    spec = ctx.norm_activation(bn)
    return ctx.fuse_spec(bn, f"{_prefix(name)}{norm_name}", spec, residual=False, via=via, cls=fr_dense.DenseNormAct2d)


def convert_dense_layer(layer: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm ``DenseLayer`` -> :class:`fusedres.nn.DenseLayer`: two dense BN+act+conv units, same children."""
    problems = _dense_unit_problems(layer, (("norm1", "conv1"), ("norm2", "conv2")), ctx)
    if problems:
        return layer  # its norm-act layers are still replaced one by one as the walk goes on
    new = bare(fr_dense.DenseLayer, layer)
    new.fused = True
    # timm's grad_checkpointing (recompute norm1 + conv1 in backward) -> fusedres' recompute in backward.
    new.memory_efficient = bool(layer.grad_checkpointing)
    new.checkpoint = False
    new.drop_rate = float(layer.drop_rate)
    new.norm1 = _fuse_dense_norm(layer, "norm1", name, ctx, "timm DenseLayer (dense BN+act+conv1)")
    new.norm2 = _fuse_dense_norm(layer, "norm2", name, ctx, "timm DenseLayer (BN+act+conv2)")
    ctx.report.blocks.append((name, "timm DenseLayer"))
    return new


def convert_dense_transition(trans: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """timm ``DenseTransition`` (a Sequential: norm-act, conv, pool) -> :class:`fusedres.nn.DenseTransition`."""
    if list(trans._modules) != ["norm", "conv", "pool"] or _dense_unit_problems(trans, (("norm", "conv"),), ctx):
        return trans  # a Sequential: its norm-act layer is still replaced as the walk goes on
    new = bare(fr_dense.DenseTransition, trans)
    new.fused = True
    new.memory_efficient = False  # timm keeps the transition's BN output for backward; so does this
    new.checkpoint = False
    new.norm = _fuse_dense_norm(trans, "norm", name, ctx, "timm DenseTransition (BN+act+conv)")
    ctx.report.blocks.append((name, "timm DenseTransition"))
    return new


# --------------------------------------------------------------------------------------------------------------
# Registration

for _norm_act in (timm_layers.BatchNormAct2d, timm_layers.SyncBatchNormAct):
    register_norm_adapter(_norm_act, NormAdapter(_norm_act_activation))
    register_default_converter(_norm_act)(convert_norm_act)
for _block in (timm_resnet.BasicBlock, timm_resnet.Bottleneck):
    register_default_converter(_block)(convert_resnet_block)
register_default_converter(timm_resnet.ResNet)(convert_resnet_stem)
register_default_converter(timm_regnet.Bottleneck)(convert_regnet_block)
register_default_converter(timm_densenet.DenseLayer)(convert_dense_layer)
register_default_converter(timm_densenet.DenseTransition)(convert_dense_transition)

for _act, _act_name in (
    (timm_act.Swish, "swish (timm's Swish module, x * sigmoid(x); nn.SiLU fuses)"),
    (timm_act.Mish, "mish"),
    (timm_act.Sigmoid, "sigmoid"),
    (timm_act.Tanh, "tanh"),
    (timm_act.HardSwish, "hardswish"),
    (timm_act.HardSigmoid, "hardsigmoid"),
    (timm_act.HardMish, "hard_mish"),
    (timm_act.PReLU, "prelu"),
    (timm_act.GELU, "gelu"),
    (timm_act.GELUTanh, "gelu_tanh"),
    (timm_act.QuickGELU, "quick_gelu"),
):
    register_pending_activation(_act, _act_name)


def _drop_path_scale(module: nn.Module, x: Tensor) -> Tensor | None:
    """timm's ``drop_path`` factors for a batch of x, drawn as it draws them (one Bernoulli per sample from the
    same generator, in the same order, divided by the keep probability when ``scale_by_keep``): None in eval."""
    if not module.training or not module.drop_prob:
        return None
    keep = 1.0 - module.drop_prob
    factors = x.new_empty((x.shape[0],)).bernoulli_(keep)
    if keep > 0.0 and module.scale_by_keep:
        factors.div_(keep)
    return factors


@register_branch_op(timm_layers.DropPath)
def _drop_path(module: nn.Module) -> BranchOp:
    if not module.drop_prob:
        return BranchOp("identity", "DropPath(drop_prob=0)")
    return BranchOp("per_sample", "DropPath with drop_prob > 0, stochastic depth", _drop_path_scale)


for _se in (timm_layers.SEModule, timm_layers.EffectiveSEModule, timm_layers.EcaModule, timm_layers.CecaModule):
    register_branch_op(_se)(lambda m: BranchOp("per_sample_channel", f"{type(m).__name__}, a channel attention"))

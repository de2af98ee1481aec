"""BatchNorm -> activation pairs inside ``nn.Sequential`` containers, whatever library built them.

Any ``nn.Sequential`` (or subclass that keeps ``Sequential.forward``: torchvision's ``Conv2dNormActivation``,
timm's ``DenseTransition``, ...) runs its modules in order, so a BatchNorm directly followed by an activation is a
pair whose data flow is known: the BatchNorm's index gets the fused BatchNorm and the activation's index an
``nn.Identity``, so indices and state_dict keys stay valid.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.convert._core import (
    FUSED_NORMS,
    ActivationSpec,
    ConvertContext,
    activation_spec,
    fused_activation_problem,
    identity_like,
    is_activation,
)

__all__ = ["fuse_projection", "fuse_sequential_pairs", "is_plain_sequential"]


def is_plain_sequential(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Sequential`` whose forward is ``nn.Sequential.forward``."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def fuse_sequential_pairs(seq: nn.Sequential, name: str, ctx: ConvertContext) -> None:
    """Fuses every BatchNorm of ``seq`` directly followed by a ReLU, LeakyReLU, ReLU6 or SiLU; records why the
    BatchNorms followed by another activation (Hardswish, ... or one with hooks) stay.

    Args:
        seq: a plain Sequential (:func:`is_plain_sequential`), changed in place.
        name: its qualified name in the model ("" for the root).
        ctx: the conversion context.
    """
    keys = list(seq._modules)
    prefix = f"{name}." if name else ""
    i = 0
    while i < len(keys) - 1:
        bn, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
        if (
            isinstance(bn, _BatchNorm)
            and not isinstance(bn, FUSED_NORMS)
            and ctx.reason(bn) is None
            and act is not None
            and is_activation(act)
        ):
            problem = ctx.plain_norm_problem(bn)
            spec = activation_spec(act)
            if problem is None and isinstance(spec, ActivationSpec):
                problem = fused_activation_problem(bn, spec)
            if problem is None and isinstance(spec, ActivationSpec):
                seq._modules[keys[i]] = ctx.fuse_spec(
                    bn, f"{prefix}{keys[i]}", spec, residual=False, via="Sequential pair"
                )
                seq._modules[keys[i + 1]] = identity_like(act)
                i += 2
                continue
            ctx.skip(bn, problem if problem is not None else str(spec))
        i += 1


def fuse_projection(proj: nn.Module | None, name: str, ctx: ConvertContext, via: str) -> None:
    """A shortcut projection ending in a BatchNorm (``Sequential(..., conv, bn)`` in a plain Sequential) gets a
    ``BatchNormAct*d("identity")`` in place of the BatchNorm, in place; anything else is left as it is."""
    if proj is None or not is_plain_sequential(proj) or len(proj) == 0:
        return
    prefix = f"{name}." if name else ""
    key = list(proj._modules)[-1]
    bn = proj._modules[key]
    if not isinstance(bn, _BatchNorm) or isinstance(bn, FUSED_NORMS) or ctx.reason(bn) is not None:
        return
    own = ctx.norm_activation(bn)
    if isinstance(own, ActivationSpec) and own.name != "identity":
        return  # a norm-act layer with an activation of its own: its converter replaces it alone
    if (problem := ctx.plain_norm_problem(bn)) is None:
        proj._modules[key] = ctx.fuse(bn, f"{prefix}{key}", "identity", residual=False, via=via)
    else:
        ctx.skip(bn, f"shortcut projection BatchNorm: {problem}")

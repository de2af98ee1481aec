"""convert(): walk a model top-down, run the registered converter of each module's exact type, then fuse the
BatchNorm -> activation pairs of plain Sequentials, and report every BatchNorm."""

from __future__ import annotations

import copy
import importlib
import logging
import sys

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.convert._core import (
    BN_TO_ACT,
    FUSED_NORMS,
    ConvertContext,
    ConvertReport,
    UntouchedNorm,
    converter_for,
    is_norm_act_type,
)
from fusedres.convert.lone import fuse_lone_norms
from fusedres.convert.sequential import fuse_sequential_pairs, is_plain_sequential

__all__ = ["convert", "load_library_converters"]

logger = logging.getLogger("fusedres.convert")

# Library -> the fusedres module holding its converters. A library's converters are registered the first time
# convert() runs while the library is imported (a model built with it implies that), so ``import fusedres`` does
# not import timm or torchvision.
_LIBRARIES = {"torchvision": "fusedres.convert.torchvision", "timm": "fusedres.convert.timm"}


def load_library_converters() -> list[str]:
    """Registers the converters of every supported library that is imported; returns the libraries loaded."""
    loaded = []
    for library, module in _LIBRARIES.items():
        if sys.modules.get(library) is not None:
            importlib.import_module(module)
            loaded.append(library)
    return loaded


def _walk(module: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    fn = converter_for(module)
    if fn is not None:
        module = fn(module, name, ctx)
    prefix = f"{name}." if name else ""
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _walk(child, f"{prefix}{child_name}", ctx)
        if new is not child:
            module._modules[child_name] = new
    if is_plain_sequential(module):
        fuse_sequential_pairs(module, name, ctx)
    return module


def _default_reason(bn: nn.Module) -> str:
    if is_norm_act_type(type(bn)):  # its converter leaves it only when it has no activation of its own
        return (
            f"{type(bn).__name__} without an activation, and not directly followed by one convert can fuse (a "
            "BatchNorm alone is left to PyTorch unless a block gives it the residual add or it is a shortcut "
            "projection)"
        )
    if type(bn) not in BN_TO_ACT:
        return f"{type(bn).__name__} is not exactly nn.BatchNorm1d/2d/3d/SyncBatchNorm or a known norm-act layer"
    return (
        "not directly followed by nn.ReLU/nn.LeakyReLU/nn.ReLU6/nn.SiLU inside an nn.Sequential, nor in a block "
        "convert knows (convert fuses only what it can see the data flow of)"
    )


def convert(
    model: nn.Module, *, inplace: bool = False, report: bool = False
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replaces what it can of ``model`` by fused modules computing the same function (see :mod:`fusedres.convert`).

    Args:
        model: any nn.Module, e.g. ``torchvision.models.resnet50()`` or ``timm.create_model("resnet50")``.
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
    load_library_converters()
    if not inplace:
        model = copy.deepcopy(model)
    rep = ConvertReport()
    ctx = ConvertContext(rep)
    model = _walk(model, "", ctx)
    model = fuse_lone_norms(model, ctx)
    # Converters record in the order they run (a parent before its children, a Sequential's pairs after them).
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rep.converted.sort(key=lambda c: order.get(c.name, len(order)))
    converted = {c.name for c in rep.converted}
    for name, m in model.named_modules():
        if isinstance(m, FUSED_NORMS):
            if name not in converted:
                rep.already_fused.append(name)
        elif isinstance(m, _BatchNorm):
            reason = ctx.reason(m) or _default_reason(m)
            rep.untouched.append(UntouchedNorm(name, type(m).__name__, reason))
    logger.info("%s", rep.summary())
    return (model, rep) if report else model

"""Model registry behind ``fusedres.models.list_models`` / ``get_model`` (torchvision's style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["get_model", "get_model_builder", "list_models", "register_model"]

_F = TypeVar("_F", bound=Callable[..., nn.Module])
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: _F) -> _F:
    """Decorator: registers a builder under its function name (which must be unique)."""
    name = fn.__name__
    if name in _BUILDERS:
        raise ValueError(f"a model named {name!r} is already registered")
    _BUILDERS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model builder, sorted."""
    return sorted(_BUILDERS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; ValueError naming the known models otherwise."""
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"name must be one of the registered models {list_models()}, got {name!r}") from None


def get_model(name: str, **kwargs) -> nn.Module:
    """``get_model_builder(name)(**kwargs)``, e.g. ``get_model("resnet50", fused=False, num_classes=10)``."""
    return get_model_builder(name)(**kwargs)

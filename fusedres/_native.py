"""Loads the native module ``fusedres._C`` (which registers the ``torch.ops.fusedres`` kernels).

When it cannot be imported, a single warning says why and the public functionals fall back to the pure
PyTorch implementations in :mod:`fusedres.reference` (same results, none of the speed or memory savings).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import warnings
from types import ModuleType
from typing import Any

import torch

__all__ = ["NATIVE", "has_kernel", "info", "native_error", "native_loaded"]

NATIVE: ModuleType | None = None
native_error: str | None = None


def _base_version(v: str) -> str:
    """'2.14.1+cu130' -> '2.14.1' (the part an extension's ABI depends on)."""
    m = re.match(r"\d+(\.\d+)*", v)
    return m.group(0) if m else v


def _built_for_from_so() -> str | None:
    """Best effort: the torch version a compiled-but-unloadable _C*.so was built for, read from its bytes."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The module stores TORCH_VERSION as a plain string literal next to its attribute name.
        for m in re.finditer(rb"torch_version\x00", data):
            window = data[max(0, m.start() - 256) : m.end() + 256]
            found = re.findall(rb"\x00(\d+\.\d+\.\d+(?:[a-z0-9.+]*))\x00", window)
            if found:
                return found[0].decode()
    return None


def _explain(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    running = torch.__version__
    hints = []
    if isinstance(err, ModuleNotFoundError) and err.name == "fusedres._C":
        hints.append(
            "the extension is not built; build it with `make build` (or `pip install --no-build-isolation -e .`)"
        )
    elif "undefined symbol" in str(err) or "Symbol not found" in str(err):
        built_for = _built_for_from_so()
        if built_for is not None and _base_version(built_for) != _base_version(running):
            hints.append(f"it was built for torch {built_for} but torch {running} is installed: rebuild it")
        else:
            hints.append(
                f"an undefined symbol usually means it was built against a different torch than the installed "
                f"{running} (built for: {built_for or 'unknown'}): rebuild it"
            )
    return text + ("; " + "; ".join(hints) if hints else "")


def _load() -> None:
    global NATIVE, native_error
    try:
        _C = importlib.import_module("fusedres._C")  # registers torch.ops.fusedres.*
    except ImportError as err:
        native_error = _explain(err)
        warnings.warn(
            f"fusedres: the native module fusedres._C could not be loaded ({native_error}). Falling back to the "
            "pure PyTorch reference implementations (fusedres.reference): correct but not fused.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    NATIVE = _C
    built_for = getattr(_C, "torch_version", "unknown")
    if built_for != "unknown" and _base_version(built_for) != _base_version(torch.__version__):
        warnings.warn(
            f"fusedres._C was built for torch {built_for} but torch {torch.__version__} is running; rebuild it if "
            "anything misbehaves.",
            RuntimeWarning,
            stacklevel=3,
        )


_load()
native_loaded: bool = NATIVE is not None

_kernel_cache: dict[str, bool] = {}


def has_kernel(device_type: str, op: str = "fusedres::bn_act_forward") -> bool:
    """Whether the native module registered a kernel of `op` for tensors on `device_type` ("cpu", "cuda", ...)."""
    if not native_loaded:
        return False
    key = f"{op}:{device_type}"
    if key not in _kernel_cache:
        dispatch_key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
        _kernel_cache[key] = dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            op, dispatch_key
        )
    return _kernel_cache[key]


def info() -> dict[str, Any]:
    """What this installation can do.

    Returns:
        dict with native_loaded (bool), native_error (str or None: why fusedres._C did not load),
        cuda_compiled (bool: CUDA kernels built in), cuda_archs (str: TORCH_CUDA_ARCH_LIST of the build),
        cpu_capability (str or None: instruction set the CPU kernels dispatch to, e.g. "AVX512"),
        built_for_torch (str or None), torch_version (str), cuda_available (bool: torch sees a GPU).
    """
    return {
        "native_loaded": native_loaded,
        "native_error": native_error,
        "cuda_compiled": bool(NATIVE.cuda_compiled()) if NATIVE is not None else False,
        "cuda_archs": NATIVE.cuda_archs() if NATIVE is not None else "",
        "cpu_capability": NATIVE.cpu_capability() if hasattr(NATIVE, "cpu_capability") else None,
        "built_for_torch": getattr(NATIVE, "torch_version", None) if NATIVE is not None else _built_for_from_so(),
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }

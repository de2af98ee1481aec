"""Session setup: the native module must load (unless FUSEDRES_ALLOW_NO_NATIVE=1), CUDA tests skip cleanly."""

from __future__ import annotations

import os

import pytest
import torch
from _cuda_emu import LIB_SOURCE, EmuLib, compiled_library

import fusedres

INFO = fusedres.info()
NATIVE = INFO["native_loaded"]
ALLOW_NO_NATIVE = os.environ.get("FUSEDRES_ALLOW_NO_NATIVE") == "1"
CUDA_READY = NATIVE and INFO["cuda_compiled"] and torch.cuda.is_available()
# Long runs (every model under autocast and torch.compile, ...): skipped unless asked for (make test-models).
EXHAUSTIVE = os.environ.get("FUSEDRES_EXHAUSTIVE") == "1"


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if not NATIVE:
        return "needs the native module fusedres._C"
    return "needs the CUDA kernels (fusedres._C was built without CUDA: rebuild with FUSEDRES_CUDA=1)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_native: needs the native module fusedres._C (torch.ops.fusedres)")
    config.addinivalue_line(
        "markers",
        "exhaustive: too slow for make test on 2 CPU cores (tens of minutes in all); run with FUSEDRES_EXHAUSTIVE=1 "
        "(make test-models)",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    if not NATIVE and not ALLOW_NO_NATIVE:
        pytest.exit(
            "fusedres._C (the native module) could not be loaded, so the tests would only exercise the pure "
            f"PyTorch fallback.\n  reason: {INFO['native_error']}\n  running torch {INFO['torch_version']}.\n"
            "  Set FUSEDRES_ALLOW_NO_NATIVE=1 to run only the tests that do not need it.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason=_cuda_skip_reason())
    skip_native = pytest.mark.skip(reason=f"needs the native module fusedres._C: {INFO['native_error']}")
    skip_exhaustive = pytest.mark.skip(reason="exhaustive: set FUSEDRES_EXHAUSTIVE=1 (make test-models) to run it")
    for item in items:
        if "exhaustive" in item.keywords and not EXHAUSTIVE:
            item.add_marker(skip_exhaustive)
        if "needs_cuda" in item.keywords and not CUDA_READY:
            item.add_marker(skip_cuda)
        if "needs_native" in item.keywords and not NATIVE:
            item.add_marker(skip_native)


@pytest.fixture(scope="session")
def devices() -> list[str]:
    """Every device the fused kernels can be tested on here: "cpu", plus "cuda" when it is usable."""
    return ["cpu"] + (["cuda"] if CUDA_READY else [])


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over the devices; the "cuda" case is skipped without CUDA or CUDA kernels."""
    return request.param


@pytest.fixture(scope="session")
def emu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EmuLib:
    """The CUDA emulator's bn_act test library (tests/_cuda_emu.py): one build and one launch log for the session,
    shared by test_cuda_emulated.py and test_cuda_emulated_split.py."""
    return EmuLib(compiled_library(request, tmp_path_factory, LIB_SOURCE))

"""Peak memory of one model's training step, measured in a fresh process: ``measure_peak_memory``.

``python -m fusedres.bench.memory CONFIG_JSON`` builds one model configuration, runs the training step and prints
one line ``FUSEDRES_WORKER_RESULT {json}``; :func:`measure_peak_memory` starts that process and returns the
figures. One process per configuration, so that no configuration inherits another's heap, caches or peak.

How the figure is taken (MEMORY_METHOD): build the model and the batch, run one warm-up step (it compiles, when
``compiled``), drop the gradients, give freed heap back to the OS (``malloc_trim(0)``), reset the peak resident set
(``/proc/self/clear_refs`` 5, which resets VmHWM and ``ru_maxrss``) and read the RSS; run ``steps`` steps; the
figure is the peak RSS since the reset minus that RSS: the step's activations saved for backward, its gradients and
its workspace (weights, data, the interpreter and torch itself are in the baseline). On CUDA also
``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` over the same steps.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MEMORY_METHOD", "RESULT_MARK", "make_batch", "make_train_step", "measure_peak_memory"]

RESULT_MARK = "FUSEDRES_WORKER_RESULT "
MEMORY_METHOD = (
    "one fresh process per (model, configuration) (python -m fusedres.bench.memory): build the model and the "
    "batch, run one warm-up training step, set the gradients to None, return freed heap to the OS (malloc_trim(0)), "
    "reset the peak resident set (/proc/self/clear_refs 5: VmHWM = ru_maxrss = current RSS), then run the timed "
    "steps; peak MB = peak RSS (VmHWM) since the reset - RSS at the reset: activations saved for backward + "
    "gradients + workspace of one training step (weights, data, interpreter and torch excluded); on CUDA also "
    "torch.cuda.max_memory_allocated() - memory_allocated() over the same steps"
)


def make_batch(batch: int, input_shape: Sequence[int], device: str = "cpu", seed: int = 1) -> Tensor:
    """A standard-normal input batch [batch, *input_shape] (float32, contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_shape), generator=gen).to(device)


def make_train_step(
    model: nn.Module,
    x: Tensor,
    *,
    forward: Callable[[Tensor], Tensor] | None = None,
    lr: float = 1e-3,
    seed: int = 2,
) -> Callable[[], Tensor]:
    """One SGD training step (zero_grad(set_to_none), forward, cross-entropy, backward, step) on the batch ``x``.

    The targets (uniform classes of the model's output width) are drawn at the first call. Plain SGD keeps no
    optimizer state, so a step's memory is its activations, gradients and workspace.

    Args:
        model: the module whose parameters SGD updates (put in training mode).
        x: the input batch [N, *].
        forward: what computes the logits [N, classes] from x (default: ``model``; e.g. ``torch.compile(model)``).

    Returns:
        step() -> the detached loss.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    state: dict[str, Tensor] = {}
    fwd = model if forward is None else forward

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        out = fwd(x)
        if "target" not in state:
            gen = torch.Generator().manual_seed(seed)
            state["target"] = torch.randint(0, out.shape[1], (x.shape[0],), generator=gen).to(x.device)
        loss = nn.functional.cross_entropy(out, state["target"])
        loss.backward()
        opt.step()
        return loss.detach()

    return step


# ----------------------------------------------------------------------------------------------------------------
# Inside the worker process


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets VmHWM (and so ru_maxrss) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


TIMM_PREFIX = "timm:"  # a bench model name "timm:NAME": timm.create_model(NAME), fused by fusedres.convert
TORCHVISION_PREFIX = "torchvision:"  # "torchvision:NAME": torchvision.models.get_model(NAME), fused by convert
LIBRARY_PREFIXES = (TIMM_PREFIX, TORCHVISION_PREFIX)


def library_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm:NAME`` / ``torchvision:NAME``: the library's model (random weights)."""
    if name.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(name[len(TIMM_PREFIX) :], pretrained=False, **kwargs)
    import torchvision

    return torchvision.models.get_model(name[len(TORCHVISION_PREFIX) :], **kwargs)


def build_model(name: str, build_kwargs: dict[str, Any]) -> nn.Module:
    """The bench's models: ``get_model(name, **build_kwargs)`` for the registry's, and for ``timm:NAME`` /
    ``torchvision:NAME`` the library's model, converted by :func:`fusedres.convert` when ``build_kwargs["fused"]``
    (what a user of that library does; the state_dict keys stay the same)."""
    if not name.startswith(LIBRARY_PREFIXES):
        from fusedres.models import get_model

        return get_model(name, **build_kwargs)
    import fusedres

    kwargs = dict(build_kwargs)
    fused = kwargs.pop("fused", True)
    model = library_model(name, **kwargs)
    return fusedres.convert(model) if fused else model


def _measure(config: dict[str, Any]) -> dict[str, Any]:
    device = config.get("device", "cpu")
    steps = int(config.get("steps", 2))
    compiled = bool(config.get("compiled", False))
    torch.manual_seed(int(config.get("seed", 0)))
    result: dict[str, Any] = {"null_reasons": {}}
    rss_import = _status_kb("VmRSS")
    model = build_model(config["model"], config["build_kwargs"]).to(device)
    x = make_batch(int(config["batch"]), config["input_shape"], device)
    forward = torch.compile(model, dynamic=False, fullgraph=True) if compiled else None
    step = make_train_step(model, x, forward=forward)
    rss_build = _status_kb("VmRSS")
    t0 = time.perf_counter()
    first_loss = float(step())
    if device == "cuda":
        torch.cuda.synchronize()
    result["warmup_s"] = time.perf_counter() - t0
    result["first_loss"] = first_loss

    for p in model.parameters():
        p.grad = None
    gc.collect()
    trimmed = _malloc_trim()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    maxrss_before = _maxrss_kb()
    reset = _reset_peak()
    baseline = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    result["step_s"] = (time.perf_counter() - t0) / max(steps, 1)
    peak = _status_kb("VmHWM") if reset else _maxrss_kb()
    result.update(
        {
            "steps": steps,
            "rss_after_import_mb": rss_import and rss_import / 1024,
            "rss_after_build_mb": rss_build and rss_build / 1024,
            "rss_baseline_mb": baseline and baseline / 1024,
            "peak_rss_mb": peak and peak / 1024,
            "peak_reset": reset,
            "malloc_trim": trimmed,
            "allocator_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")},
        }
    )
    if baseline is None or peak is None:
        result["peak_mb"] = None
        result["null_reasons"]["peak_mb"] = "/proc/self/status not readable"
    elif not reset and maxrss_before > baseline:
        result["peak_mb"] = None
        result["null_reasons"]["peak_mb"] = (
            "the peak RSS cannot be reset here (/proc/self/clear_refs not writable) and an earlier peak "
            f"({maxrss_before / 1024:.0f} MB) above the baseline ({baseline / 1024:.0f} MB) would hide the step's"
        )
    else:
        result["peak_mb"] = (peak - baseline) / 1024
    if device == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    else:
        result["cuda_peak_mb"] = None
        result["null_reasons"]["cuda_peak_mb"] = "CPU run: torch's CPU allocator keeps no statistics"
    return result


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fusedres.bench.memory CONFIG_JSON", file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    if "threads" in config:
        torch.set_num_threads(int(config["threads"]))
    result = _measure(config)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# In the caller


def measure_peak_memory(
    model_name: str,
    build_kwargs: dict[str, Any],
    batch: int,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    steps: int = 2,
    device: str = "cpu",
    compiled: bool = False,
    threads: int | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of ``build_model(model_name, build_kwargs)`` in a fresh process.

    Args:
        model_name: a name of ``fusedres.models.list_models()``, or ``timm:NAME`` (see build_model).
        build_kwargs: keyword arguments of the builder, e.g. ``{"fused": True, "num_classes": 10}``; JSON-able.
        batch: batch size N of the input [N, *input_shape].
        input_shape: per-sample input shape, e.g. (3, 32, 32), or (1024,) for the highway MLP.
        steps: training steps measured after the warm-up step.
        device: "cpu" or "cuda".
        compiled: run the model through ``torch.compile(model, dynamic=False, fullgraph=True)``.
        threads: torch threads in the worker (default: torch's default, as in the caller).
        timeout_s: the worker is killed after this many seconds.

    Returns:
        dict with peak_mb (step memory, see MEMORY_METHOD), cuda_peak_mb, rss_* and peak_rss_mb (MB), first_loss,
        warmup_s, step_s (one untimed-quality measurement, not a benchmark figure), the configuration, and
        null_reasons for every None figure. A failed worker gives peak_mb None with the reason (its stderr's tail).
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    config: dict[str, Any] = {
        "model": model_name,
        "build_kwargs": dict(build_kwargs),
        "batch": int(batch),
        "input_shape": list(input_shape),
        "steps": int(steps),
        "device": device,
        "compiled": bool(compiled),
    }
    if threads is not None:
        config["threads"] = int(threads)
    out: dict[str, Any] = {"config": config, "method": MEMORY_METHOD}
    reason = None
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fusedres.bench.memory", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        reason = f"worker timed out after {timeout_s:.0f} s"
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if proc.returncode == 0 and lines:
            out.update(json.loads(lines[-1][len(RESULT_MARK) :]))
            return out
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        reason = f"worker failed (exit {proc.returncode}): {tail}"
    out.update({"peak_mb": None, "cuda_peak_mb": None, "null_reasons": {"peak_mb": reason, "cuda_peak_mb": reason}})
    return out


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

"""pytest-benchmark: one SGD training step of fused vs reference vs torch.compile(reference) ResNets, float32.

Configurations (issue 5's targets on the 2-core CPU: resnet56 step >= 1.3x the eager reference, resnet50 >= 1.1x):
resnet20 and resnet56 at batch 128, 32x32; resnet50 at batch 16, 224x224; NCHW and channels_last. One group per
model x layout holding the three implementations; all start from the same weights. ``FUSEDRES_BENCH_TINY=1`` shrinks
the batches and images (for collection tests). Run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``
for page-fault-free figures (docs/design.md section 6); the setting in force is recorded in ``extra_info``. For ratios
measured in alternating rounds use ``python -m fusedres bench``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

from fusedres import _native, models
from fusedres.bench import harness

TINY = os.environ.get("FUSEDRES_BENCH_TINY") == "1"
# model -> (batch, image size)
CONFIGS = (
    {"resnet20": (4, 16), "resnet56": (4, 16), "resnet50": (2, 64)}
    if TINY
    else {"resnet20": (128, 32), "resnet56": (128, 32), "resnet50": (16, 224)}
)
LAYOUTS = ("nchw", "channels_last")
IMPLS = ("fused", "reference", "compiled")

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

_cache: dict[tuple, object] = {}


class TrainStep:
    """model(x) -> cross-entropy -> backward -> SGD(momentum) step, on fixed data."""

    def __init__(self, name: str, layout: str, impl: str) -> None:
        batch, size = CONFIGS[name]
        torch.manual_seed(0)
        model = models.get_model(name, fused=impl == "fused", num_classes=10)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.model = model.to(memory_format=fmt).train()
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.forward = torch.compile(self.model) if impl == "compiled" else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.item()


def _step(name: str, layout: str, impl: str) -> TrainStep | str:
    key = (name, layout, impl)
    if key not in _cache:
        if len(_cache) >= 3:  # keep one configuration's models alive at a time
            _cache.clear()
        try:
            step = TrainStep(name, layout, impl)
            step()  # compiles (torch.compile) and allocates outside the timing
        except Exception as exc:  # noqa: BLE001 - reported as a skip with the reason
            _cache[key] = f"{impl} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        else:
            _cache[key] = step
    return _cache[key]


@pytest.mark.parametrize(
    "name, layout, impl",
    [pytest.param(*p, id="-".join(p)) for p in itertools.product(CONFIGS, LAYOUTS, IMPLS)],
)
def test_resnet_train_step(benchmark, name: str, layout: str, impl: str) -> None:
    if impl == "fused" and not _native.has_kernel("cpu"):
        pytest.skip(f"fusedres has no native CPU kernel (native_error: {_native.native_error})")
    step = _step(name, layout, impl)
    if isinstance(step, str):
        pytest.skip(step)
    batch, size = CONFIGS[name]
    benchmark.group = f"resnet train step {name} batch {batch} {size}x{size} {layout}"
    heavy = name == "resnet50" and not TINY
    benchmark.pedantic(step, rounds=3 if heavy else 6, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            "model": name,
            "batch": batch,
            "image": size,
            "layout": layout,
            "impl": impl,
            "dtype": "float32",
            "allocator": harness.describe_allocator(harness.allocator_setting()),
        }
    )

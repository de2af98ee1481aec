"""The dense section of ``python -m fusedres bench`` (and the cases of benchmarks/bench_dense.py).

``act(batch_norm(torch.cat(inputs, 1)))`` with ReLU over the inputs of the last layer of a DenseNet-BC block, in
training mode, per layout (NCHW, channels_last) x direction, four ways:

* ``fused``        :func:`fusedres.dense_batch_norm_act`, computing the batch statistics itself;
* ``fused+stats``  the same with ``input_stats``: each input's statistics precomputed (``fusedres.ops.bn_stats``,
  outside the timing), as a dense block does once per feature map when it is produced;
* ``reference``    eager :func:`fusedres.reference.dense_batch_norm_act`: ``torch.cat`` + ``F.batch_norm`` + ReLU;
* ``compiled``     ``torch.compile(reference, dynamic=False, fullgraph=True)``, compiled once per configuration.

Shape (CONFIG): 16 inputs of (64, C_j, 32, 32), C = 36 + 15 x 12 = 216 channels (a growth-rate-12 block's later
layer; the first input carries the block's 36 input channels). Directions: ``fwd`` (training forward, inputs and
parameters require grad) and ``fwd+bwd`` (+ ``torch.autograd.grad`` of every input, weight and bias). Minimal bytes
(docs/design.md sections 1 and 3, no residual, 1-bit mask): fwd = read the inputs + write y + the mask; fwd+bwd = fwd +
read dy, the inputs and the mask + write dx. FUSEDRES_BENCH_TINY=1 shrinks the shape to a few values.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fusedres.bench import harness, table
from fusedres.bench.bn_act import floor_bytes as _bn_act_floor_bytes
from fusedres.bench.table import Column

__all__ = [
    "COLUMNS",
    "CONFIG",
    "DIRECTIONS",
    "IMPLS",
    "METHOD",
    "TITLE",
    "DenseBenchCase",
    "configuration",
    "floor_bytes",
    "fused_unavailable",
    "measure_dense",
    "notes",
    "run",
]

# 16 inputs -> 216 channels at (64, ., 32, 32): 36 + 15 * 12.
CONFIG: dict[str, Any] = {"batch": 64, "channels": (36,) + (12,) * 15, "spatial": (32, 32)}
TINY_CONFIG: dict[str, Any] = {"batch": 2, "channels": (4, 3, 3), "spatial": (4, 5)}
LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "fwd+bwd")
EXTRA_IMPL = "fused+stats"
IMPLS = ("fused", EXTRA_IMPL, "reference", "compiled")
EXTRA_RATIO = ("reference/fused+stats", "reference", EXTRA_IMPL)

TITLE = "dense concatenation + BatchNorm + ReLU (training), float32: fused vs eager torch.cat + BN + ReLU vs compile"
METHOD = {
    "gbps": "minimal bytes (docs/design.md sections 1 and 3, no residual, 1-bit mask = numel/8 bytes) / median time; "
    "fwd: read the inputs, write y, write the mask; fwd+bwd: fwd + read dy, the inputs and the mask, write dx",
    "saved_bytes": "bytes autograd saves for backward in one training forward (fusedres.bench.harness.saved_bytes), "
    "excluding the inputs' and parameters' own storages: fused saves the 1-bit mask and 2C floats; eager saves the "
    "concatenation and the BN output (what ReLU keeps)",
}
COLUMNS = (
    Column("shape", lambda row: f"{'x'.join(map(str, row['shape']))} ({row['inputs']} in)", left=True),
    table.field("layout", "layout"),
    table.field("dir", "direction"),
    table.ms("fused ms", "fused"),
    table.ms("+stats ms", EXTRA_IMPL),
    table.ms("ref ms", "reference"),
    table.ms("compile ms", "compiled"),
    table.ratio("ref/fused [IQR]", "reference/fused"),
    table.ratio("ref/+stats [IQR]", EXTRA_RATIO[0]),
    table.ratio("compile/fused [IQR]", "compiled/fused"),
    table.gbps("fused GB/s", "fused"),
    table.PCT_COPY,
    table.saved_mb(),
    table.OTHER_CPU,
)


def floor_bytes(numel: int, direction: str, elem_size: int = 4) -> int:
    """Minimal bytes of one dense BN + ReLU call on ``numel`` output elements (the bn_act floor without residual)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return _bn_act_floor_bytes(numel, False, direction, elem_size)


def config_for(settings: harness.Settings) -> dict[str, Any]:
    return TINY_CONFIG if settings.tiny else CONFIG


def configuration(settings: harness.Settings) -> dict[str, Any]:
    return {**config_for(settings), "layouts": LAYOUTS, "directions": DIRECTIONS, "dtype": "float32"}


def fused_unavailable(device: str) -> str | None:
    """Why the fused dense op cannot be measured on ``device`` (None: it can)."""
    return harness.fused_unavailable(device, op="fusedres::dense_bn_act_forward", kernel="dense ")


def _reference(xs: list[Tensor], rm: Tensor, rv: Tensor, w: Tensor, b: Tensor) -> Tensor:
    from fusedres.reference.dense import dense_batch_norm_act

    return dense_batch_norm_act(xs, rm, rv, w, b, True, 0.1, 1e-5)


class DenseBenchCase:
    """Inputs of one dense configuration and the calls that benchmark it.

    Args:
        batch, channels, spatial: the inputs are Tensor[batch, channels[j], *spatial].
        layout: "nchw" or "channels_last" (every input).
    """

    def __init__(
        self,
        batch: int,
        channels: Sequence[int],
        spatial: Sequence[int],
        layout: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.channels, self.layout, self.device, self.dtype = tuple(channels), layout, device, dtype
        C = sum(self.channels)
        self.shape = (batch, C, *spatial)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        gen = torch.Generator().manual_seed(seed)

        def full(c: int) -> Tensor:
            t = torch.randn((batch, c, *spatial), generator=gen, dtype=dtype).to(device)
            return t.contiguous(memory_format=fmt)

        self.xs = [full(c).requires_grad_() for c in self.channels]
        self.w = (torch.rand(C, generator=gen) + 0.5).to(device).requires_grad_()
        self.b = (torch.randn(C, generator=gen) * 0.1).to(device).requires_grad_()
        self.rm = torch.zeros(C, device=device)
        self.rv = torch.ones(C, device=device)
        self.dy = full(C)
        self.numel = self.dy.numel()
        self._stats: list[tuple[Tensor, Tensor]] | None = None

    @property
    def stats(self) -> list[tuple[Tensor, Tensor]]:
        """Each input's (batch mean, biased var), computed once (as a dense block does when a map is produced)."""
        if self._stats is None:
            from fusedres.ops import bn_stats

            self._stats = [bn_stats(x.detach()) for x in self.xs]
        return self._stats

    def functional(self, impl: str) -> Callable[[], Tensor]:
        """The training forward of ``impl`` on this case's tensors (running statistics updated in place)."""
        xs, rm, rv, w, b = self.xs, self.rm, self.rv, self.w, self.b
        if impl in ("fused", EXTRA_IMPL):
            from fusedres.ops.dense import dense_batch_norm_act

            stats = self.stats if impl == EXTRA_IMPL else None
            return lambda: dense_batch_norm_act(xs, rm, rv, w, b, True, 0.1, 1e-5, input_stats=stats)
        if impl == "reference":
            return lambda: _reference(xs, rm, rv, w, b)
        if impl == "compiled":
            compiled = torch.compile(_reference, dynamic=False, fullgraph=True)
            return lambda: compiled(xs, rm, rv, w, b)
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def call(self, direction: str, forward: Callable[[], Tensor]) -> Callable[[], object]:
        leaves, dy = [*self.xs, self.w, self.b], self.dy
        if direction == "fwd":
            return forward
        if direction == "fwd+bwd":
            return lambda: torch.autograd.grad(forward(), leaves, dy)
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def owned_storages(self) -> list[Tensor]:
        return [*self.xs, self.w, self.b, self.rm, self.rv]

    def floor_bytes(self, direction: str) -> int:
        return floor_bytes(self.numel, direction, self.dy.element_size())


def measure_dense(
    config: dict[str, Any], layout: str, settings: harness.Settings, copy_gbps: float, progress: harness.Progress
) -> list[dict[str, Any]]:
    """Both directions of one layout: one row each."""
    device = settings.device
    case = DenseBenchCase(config["batch"], config["channels"], config["spatial"], layout, device=device)
    skip = (
        "not measured (skipped: --quick compiles only the NCHW layout)" if settings.quick and layout != "nchw" else None
    )
    forwards, missing, compile_s = harness.implementations(
        {name: case.functional(name) for name in ("fused", EXTRA_IMPL)},
        fused_unavailable(device),
        case.functional("reference"),
        skip,
        functools.partial(case.functional, "compiled"),
        functools.partial(case.call, "fwd+bwd"),
        device,
    )
    saved = harness.saved_per_impl(forwards, missing, case.owned_storages(), IMPLS)

    rows = harness.direction_rows(
        "dense_bn_act",
        DIRECTIONS,
        case,
        forwards,
        missing,
        saved,
        settings,
        copy_gbps,
        compile_s,
        progress,
        f"dense {len(case.channels)} inputs {list(case.shape)} {layout}",
        impls=IMPLS,  # the fourth implementation, fused+stats, beside the three every op section has
        ratios=(*harness.RATIOS, EXTRA_RATIO),
        shape=list(case.shape),
        inputs=len(case.channels),
        channels=list(case.channels),
        dtype=str(case.dtype).replace("torch.", ""),
        layout=layout,
        activation="relu",
    )
    del case, forwards
    gc.collect()
    return rows


def run(settings: harness.Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """The dense rows of every layout x direction."""
    config = config_for(settings)
    return harness.run_groups(
        "dense",
        LAYOUTS,
        len(DIRECTIONS),
        lambda layout, progress: measure_dense(config, layout, settings, copy_gbps, progress),
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    if rows:
        lines.append(f"inputs: channels {'+'.join(map(str, rows[0]['channels']))} = {rows[0]['shape'][1]}.")
    lines.append(
        "+stats = fused with input_stats: each input's batch statistics precomputed once (fusedres.ops.bn_stats, not "
        "timed), as a dense block computes them when a feature map is produced."
    )
    return lines

"""The dense part of ``python -m fusedres bench`` (and the cases of benchmarks/bench_dense.py).

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

Measured with the same alternating rounds, noise check and allocator setting as the bn_act rows (fusedres/bench.py).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fusedres import _native
from fusedres import bench as _bench

__all__ = [
    "CONFIG",
    "DIRECTIONS",
    "IMPLS",
    "DenseBenchCase",
    "floor_bytes",
    "measure_dense",
    "print_report",
    "render_table",
    "run",
    "run_dense_section",
]

# 16 inputs -> 216 channels at (64, ., 32, 32): 36 + 15 * 12.
CONFIG: dict[str, Any] = {"batch": 64, "channels": (36,) + (12,) * 15, "spatial": (32, 32)}
TINY_CONFIG: dict[str, Any] = {"batch": 2, "channels": (4, 3, 3), "spatial": (4, 5)}
LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "fwd+bwd")
EXTRA_IMPL = "fused+stats"
IMPLS = ("fused", EXTRA_IMPL, "reference", "compiled")
EXTRA_RATIO = ("reference/fused+stats", "reference", EXTRA_IMPL)

GBPS_METHOD = (
    "minimal bytes (docs/design.md sections 1 and 3, no residual, 1-bit mask = numel/8 bytes) / median time; fwd: read "
    "the inputs, write y, write the mask; fwd+bwd: fwd + read dy, the inputs and the mask, write dx"
)
SAVED_BYTES_METHOD = (
    "bytes autograd saves for backward in one training forward (fusedres.bench.saved_bytes), excluding the inputs' "
    "and parameters' own storages: fused saves the 1-bit mask and 2C floats; eager saves the concatenation and the "
    "BN output (what ReLU keeps)"
)


def floor_bytes(numel: int, direction: str, elem_size: int = 4) -> int:
    """Minimal bytes of one dense BN + ReLU call on ``numel`` output elements (the bn_act floor without residual)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return _bench.floor_bytes(numel, False, direction, elem_size)


def config_for(settings: _bench.Settings) -> dict[str, Any]:
    return TINY_CONFIG if settings.tiny else CONFIG


def fused_unavailable(device: str) -> str | None:
    """Why the fused dense op cannot be measured on ``device`` (None: it can)."""
    if not _native.native_loaded:
        return f"not measured: fusedres._C did not load ({_native.native_error})"
    if not hasattr(torch.ops.fusedres, "dense_bn_act_forward") or not _native.has_kernel(
        device, op="fusedres::dense_bn_act_forward"
    ):
        return f"not measured: fusedres has no native {device} dense kernel (it would run the reference)"
    return None


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
    config: dict[str, Any], layout: str, settings: _bench.Settings, copy_gbps: float, progress: Any
) -> list[dict[str, Any]]:
    """Both directions of one layout: one row each."""
    device = settings.device
    case = DenseBenchCase(config["batch"], config["channels"], config["spatial"], layout, device=device)
    forwards: dict[str, Callable[[], Tensor]] = {}
    missing: dict[str, str] = {}
    compile_s: float | None = None
    reason = fused_unavailable(device)
    for name in ("fused", EXTRA_IMPL):
        if reason is None:
            forwards[name] = case.functional(name)
        else:
            missing[name] = reason
    forwards["reference"] = case.functional("reference")
    if settings.quick and layout != "nchw":
        missing["compiled"] = "not measured (skipped: --quick compiles only the NCHW layout)"
    else:
        torch._dynamo.reset()
        fn = case.functional("compiled")
        try:
            t0 = time.perf_counter()
            case.call("fwd+bwd", fn)()
            _bench._sync(device)
            compile_s = time.perf_counter() - t0
            forwards["compiled"] = fn
        except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
            missing["compiled"] = f"torch.compile failed: {_bench._err(exc)}"

    saved: dict[str, Any] = {}
    for name in IMPLS:
        if name not in forwards:
            saved[name] = missing[name]
            continue
        try:
            saved[name] = _bench.saved_bytes(forwards[name], case.owned_storages())
        except Exception as exc:  # noqa: BLE001
            saved[name] = f"not measured: {_bench._err(exc)}"

    rows = []
    for direction in DIRECTIONS:
        progress.step(f"dense {len(case.channels)} inputs {list(case.shape)} {layout} {direction}")
        reasons = dict(missing)
        fns = {name: case.call(direction, fn) for name, fn in forwards.items()}
        times, faults, rounds, other = _bench.time_fns(fns, settings, reasons)
        fb = case.floor_bytes(direction)
        row: dict[str, Any] = {
            "op": "dense_bn_act",
            "shape": list(case.shape),
            "inputs": len(case.channels),
            "channels": list(case.channels),
            "dtype": str(case.dtype).replace("torch.", ""),
            "layout": layout,
            "activation": "relu",
            "direction": direction,
            "device": device,
            "rounds": rounds,
            "floor_bytes": fb,
            "compile_s": compile_s,
            "null_reasons": {},
        }
        if compile_s is None:
            row["null_reasons"]["compile_s"] = missing.get("compiled", "not compiled")
        _bench.fill_figures(row, times, faults, reasons, fb, copy_gbps)
        # The fourth implementation, beside the three every op section has.
        spread = _bench._spread(times[EXTRA_IMPL]) if EXTRA_IMPL in times else None
        why = reasons.get(EXTRA_IMPL)
        _bench._set(row, "times_ms", EXTRA_IMPL, spread and spread["median"] * 1e3, why)
        _bench._set(
            row, "times_ms_spread", EXTRA_IMPL, spread and {k: v * 1e3 for k, v in spread.items() if k != "median"}, why
        )
        _bench._set(row, "page_faults_per_call", EXTRA_IMPL, faults.get(EXTRA_IMPL), why)
        _bench._set(row, "gbps", EXTRA_IMPL, spread and fb / spread["median"] / 1e9, why)
        label, num, den = EXTRA_RATIO
        both = num in times and den in times
        _bench._set(row, "ratios", label, _bench.ratio_stats(times, num, den) if both else None, f"{den} not measured")
        row["saved_bytes"] = {}
        for name in IMPLS:
            entry = saved[name]
            _bench._set(row, "saved_bytes", name, entry["total"] if isinstance(entry, dict) else None, str(entry))
        _bench.set_load(row, other)
        rows.append(row)
    del case, fns, forwards
    gc.collect()
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """The aligned plain-text table of the dense rows."""
    head = [
        "shape",
        "layout",
        "dir",
        "fused ms",
        "+stats ms",
        "ref ms",
        "compile ms",
        "ref/fused [IQR]",
        "ref/+stats [IQR]",
        "compile/fused [IQR]",
        "fused GB/s",
        "%copy",
        "saved MB f/r/c",
        "other CPU",
    ]
    body = []
    for row in rows:
        t, r, sb = row["times_ms"], row["ratios"], row["saved_bytes"]
        pct, gb = row["pct_copy_bandwidth"]["fused"], row["gbps"]["fused"]
        body.append(
            [
                f"{'x'.join(map(str, row['shape']))} ({row['inputs']} in)",
                row["layout"],
                row["direction"],
                _bench._fmt_ms(t["fused"]),
                _bench._fmt_ms(t[EXTRA_IMPL]),
                _bench._fmt_ms(t["reference"]),
                _bench._fmt_ms(t["compiled"]),
                _bench._fmt_ratio(r["reference/fused"]),
                _bench._fmt_ratio(r[EXTRA_RATIO[0]]),
                _bench._fmt_ratio(r["compiled/fused"]),
                "-" if gb is None else f"{gb:.1f}",
                "-" if pct is None else f"{pct:.0f}%",
                "/".join(_bench._fmt_mb(sb[n]) for n in ("fused", "reference", "compiled")),
                "-" if row["load"]["other_cpu_pct"] is None else f"{row['load']['other_cpu_pct']:.0f}%",
            ]
        )
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    left = {0, 1, 2}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def run(settings: _bench.Settings, copy_gbps: float) -> dict[str, Any]:
    """The dense op section of ``fusedres bench`` (fusedres.bench.OpSection): {"dense": rows}."""
    config = config_for(settings)
    progress = _bench._Progress(total=len(LAYOUTS) * len(DIRECTIONS), desc="dense")
    rows: list[dict[str, Any]] = []
    try:
        for layout in LAYOUTS:
            rows += measure_dense(config, layout, settings, copy_gbps, progress)
    finally:
        progress.close()
    return {"dense": rows}


run_dense_section = run  # the name the section hook was first agreed under


def print_report(result: dict[str, Any], copy_gbps: float) -> None:
    """The dense table and its footnotes."""
    rows = result["dense"]
    print("dense concatenation + BatchNorm + ReLU (training), float32: fused vs eager torch.cat + BN + ReLU vs compile")
    print(render_table(rows))
    if rows:
        print(f"inputs: channels {'+'.join(map(str, rows[0]['channels']))} = {rows[0]['shape'][1]}.")
    print(
        "+stats = fused with input_stats: each input's batch statistics precomputed once (fusedres.ops.bn_stats, not "
        "timed), as a dense block computes them when a feature map is produced."
    )
    print(f"GB/s: {GBPS_METHOD}; %copy = fused GB/s / {copy_gbps:.1f} GB/s.")
    print(f"saved MB: {SAVED_BYTES_METHOD}.")
    if os.environ.get("FUSEDRES_BENCH_TINY") == "1":
        print("(FUSEDRES_BENCH_TINY=1: tiny shapes)")

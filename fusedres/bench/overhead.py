"""The per-call overhead section of ``python -m fusedres bench``: what a fused op costs beyond its kernels.

A chain of LAYERS calls of one op on tiny tensors (where the kernels take a few microseconds), forward through every
layer, then one backward, as a network runs them. Three implementations per op:

* ``fused``      the public functional (fusedres.batch_norm_act, dense_batch_norm_act, highway, highway_packed) under
  autograd: argument checks, the autograd node, the dispatcher and the kernels;
* ``ops``        the same registered forward and backward ops called directly, the backward chain in reverse, no
  autograd: the kernels and the dispatcher only;
* ``reference``  the eager pure-PyTorch reference of fusedres.reference under autograd.

``overhead`` = (fused - ops) / LAYERS: per layer, what autograd, the checks and the Python on the way add to the
kernels (issue target: at most ~50 us). Tiny tensors keep the kernels' own time out of the figure; the bn_act,
dense and highway op sections measure the kernels at the sizes models run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fusedres.bench import harness, table
from fusedres.bench.table import Column

__all__ = ["COLUMNS", "LAYERS", "METHOD", "OPS", "TITLE", "configuration", "notes", "run"]

LAYERS = 32
SHAPE = (2, 4, 2, 2)
OPS = ("bn_act", "dense", "highway", "highway_packed")
IMPLS = ("fused", "ops", "reference")
RATIOS = (("reference/fused", "reference", "fused"),)
TITLE = (
    f"per-call overhead: a chain of {LAYERS} tiny layers ({'x'.join(map(str, SHAPE))}), forward + backward, float32: "
    "fused functional vs its ops called directly vs eager reference"
)
METHOD = {
    "overhead": "(fused - ops) / layers: what the autograd node, the argument checks and the Python on the way add "
    "to one call's kernels, forward and backward together",
}


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


class _Chain:
    """LAYERS calls of one op on tiny tensors: ``fn(impl)`` runs forward through the chain and one backward."""

    def __init__(self, op: str, device: str) -> None:
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape: int, grad: bool = True) -> Tensor:
            return torch.randn(shape, generator=gen).to(device).requires_grad_(grad)

        self.op, self.device = op, device
        n, c, h, w = SHAPE
        self.x = rnd(*SHAPE)
        self.dy = torch.ones(SHAPE, device=device)
        if op == "bn_act":
            self.params = [(rnd(c), rnd(c)) for _ in range(LAYERS)]
            self.stats = (torch.zeros(c, device=device), torch.ones(c, device=device))
        elif op == "dense":  # as in a dense block: layer k normalises [y_k, o_k] (C more channels each layer)
            width = [c * (k + 2) for k in range(LAYERS)]
            self.others = [rnd(*SHAPE) for _ in range(LAYERS)]
            self.params = [(rnd(cw), rnd(cw)) for cw in width]
            self.dense_stats = [(torch.zeros(cw, device=device), torch.ones(cw, device=device)) for cw in width]
            self.dy = torch.ones(n, width[-1], h, w, device=device)
        elif op == "highway":
            self.params = [(rnd(*SHAPE), rnd(*SHAPE)) for _ in range(LAYERS)]
        elif op == "highway_packed":
            self.params = [(rnd(n, 2 * c, h, w), None) for _ in range(LAYERS)]
        else:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")

    def _layer(self, impl: str) -> Callable[[int, Tensor, Tensor, Tensor | None], Tensor]:
        """Layer k of the chain: (k, y, a, b) -> the next y, where (a, b) = self.params[k]."""
        import fusedres
        from fusedres import reference

        lib = fusedres if impl == "fused" else reference
        if self.op == "bn_act":
            rm, rv = self.stats
            return lambda _k, y, a, b: lib.batch_norm_act(y, rm, rv, a, b, True, 0.1, 1e-5)
        if self.op == "dense":
            def dense(k: int, y: Tensor, a: Tensor, b: Tensor | None) -> Tensor:
                rm, rv = self.dense_stats[k]
                return lib.dense_batch_norm_act([y, self.others[k]], rm, rv, a, b, True, 0.1, 1e-5)

            return dense
        if self.op == "highway":
            return lambda _k, y, a, b: lib.highway(a, b, y)
        return lambda _k, y, a, _b: lib.highway_packed(a, y, dim=1)

    def autograd_call(self, impl: str) -> Callable[[], object]:
        layer, x, dy, params = self._layer(impl), self.x, self.dy, self.params
        leaves = [t for t in (x, *(p for ab in params for p in ab), *getattr(self, "others", ())) if t is not None]

        def run() -> None:
            for t in leaves:  # as optimizer.zero_grad() leaves them: AccumulateGrad takes the new gradient as is
                t.grad = None
            y = x
            for k, (a, b) in enumerate(params):
                y = layer(k, y, a, b)
            y.backward(dy)

        return run

    def ops_call(self) -> Callable[[], object]:
        """The registered forward ops through the chain, then the backward ops in reverse (no autograd)."""
        f = torch.ops.fusedres
        x, dy = self.x.detach(), self.dy
        params = [(_opt(a), _opt(b)) for a, b in self.params]
        op = self.op
        if op == "bn_act":
            rm, rv = self.stats
        if op == "dense":
            others, dense_stats = [o.detach() for o in self.others], self.dense_stats

        def forward(k: int, y: Tensor, a: Tensor, b: Tensor | None) -> tuple[Tensor, tuple]:
            if op == "bn_act":
                out = f.bn_act_forward(y, None, a, b, rm, rv, True, 0.1, 1e-5, "relu", 0.01)
                return out[0], out
            if op == "dense":
                rm_k, rv_k = dense_stats[k]
                out = f.dense_bn_act_forward(
                    [y, others[k]], a, b, rm_k, rv_k, None, None, True, 0.1, 1e-5, "relu", 0.01
                )
                return out[0], (k, *out)
            if op == "highway":
                return f.highway_forward(a, b, y, None, "relu"), ()
            return f.highway_packed_forward(a, y, 1, False, "relu"), ()

        def backward(g: Tensor, y: Tensor, a: Tensor, b: Tensor | None, saved: tuple) -> Tensor:
            if op == "bn_act":
                _, mean, invstd, mask = saved
                return f.bn_act_backward(g, y, a, mean, invstd, mask, True, "relu", 0.01, [True, False, True, True])[0]
            if op == "dense":
                k, _, mean, invstd, mask = saved
                return f.dense_bn_act_backward(
                    g, [y, others[k]], a, mean, invstd, mask, True, "relu", 0.01, [True, True], [True, True]
                )[0][0]
            if op == "highway":
                return f.highway_backward(g, a, b, y, None, "relu", [True, True, True, False])[2]
            return f.highway_packed_backward(g, a, y, 1, False, "relu", [True, True])[1]

        def run() -> None:
            y, trail = x, []
            for k, (a, b) in enumerate(params):
                out, saved = forward(k, y, a, b)
                trail.append((y, a, b, saved))
                y = out
            g = dy
            for y, a, b, saved in reversed(trail):
                g = backward(g, y, a, b, saved)

        return run


COLUMNS = (
    table.field("op", "op"),
    table.ms("fused ms", "fused"),
    table.ms("ops ms", "ops"),
    table.ms("ref ms", "reference"),
    Column("fused us/layer", lambda row: table.fmt_us(row["us_per_layer"]["fused"])),
    Column("ops us/layer", lambda row: table.fmt_us(row["us_per_layer"]["ops"])),
    Column("ref us/layer", lambda row: table.fmt_us(row["us_per_layer"]["reference"])),
    Column("overhead us/layer", lambda row: table.fmt_us(row["overhead_us_per_layer"])),
    table.ratio("ref/fused [IQR]", "reference/fused"),
    table.OTHER_CPU,
)


def configuration(settings: harness.Settings) -> dict[str, Any]:
    return {"ops": OPS, "layers": LAYERS, "shape": SHAPE, "dtype": "float32", "direction": "fwd+bwd"}


def _measure(op: str, settings: harness.Settings, copy_gbps: float, progress: harness.Progress) -> list[dict]:
    progress.step(f"overhead {op}")
    chain = _Chain(op, settings.device)
    missing: dict[str, str] = {}
    fns: dict[str, Callable[[], object]] = {"reference": chain.autograd_call("reference")}
    forward_op = {"bn_act": "bn_act_forward", "dense": "dense_bn_act_forward"}.get(op, f"{op}_forward")
    why = harness.fused_unavailable(settings.device, op=f"fusedres::{forward_op}")
    if why is None:
        fns["fused"], fns["ops"] = chain.autograd_call("fused"), chain.ops_call()
    else:
        missing.update(fused=why, ops=why)
    row = harness.timed_row(
        op, "fwd+bwd", fns, missing, settings, None, copy_gbps, None, IMPLS, RATIOS,
        layers=LAYERS, shape=list(SHAPE), dtype="float32",
    )  # fmt: skip
    per_layer = {k: (v * 1e3 / LAYERS if v is not None else None) for k, v in row["times_ms"].items()}
    row["us_per_layer"] = per_layer
    fused, ops = per_layer["fused"], per_layer["ops"]
    row["overhead_us_per_layer"] = None if fused is None or ops is None else fused - ops
    if row["overhead_us_per_layer"] is None:
        row["null_reasons"]["overhead_us_per_layer"] = missing.get("fused", "not measured")
    return [row]


def run(settings: harness.Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """One row per op of OPS."""
    return harness.run_groups("overhead", OPS, 1, lambda op, progress: _measure(op, settings, copy_gbps, progress))


def notes(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"A chain of {LAYERS} calls, forward then one backward; us/layer = chain time / {LAYERS}. ops = the registered "
        "forward/backward ops called directly (kernels + dispatcher, no autograd); overhead = fused - ops per layer.",
    ]

"""The highway section of ``python -m fusedres bench`` (and the cases of benchmarks/bench_highway.py).

Per shape x input form x direction, three implementations of the coupled highway gate
``y = act(h) * sigmoid(g) + x * (1 - sigmoid(g))`` with ReLU:

* ``fused``      :func:`fusedres.highway` (split: three tensors) / :func:`fusedres.highway_packed` (packed: the
  single ``[transform | gate]`` output of one projection, read through strides);
* ``reference``  eager :mod:`fusedres.reference.highway` with the same signature;
* ``compiled``   ``torch.compile(reference, dynamic=False, fullgraph=True)``, compiled once per configuration.

Shapes: (4096, 1024) packs along the last dimension (a Linear(1024, 2048)), (256, 64, 32, 32) along the channels (a
conv to 128 channels). Directions: ``fwd`` (training forward, inputs require grad) and ``fwd+bwd`` (+
``torch.autograd.grad`` of every input). Minimal bytes (docs/design.md section 2, coupled): forward 4 tensor passes
(read h, g, x; write y), backward 7 (read dy, h, g, x; write dh, dg, dx): fwd+bwd 11.

The training step of ``highway_mlp(1024, 1024, depth=20, 10)`` at batch 256 (MLP_STEP; HighwayMLPStep is the case
of benchmarks/bench_highway.py) is one of the model rows of ``fusedres bench`` (fusedres/bench/models.py).
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.bench import harness, table
from fusedres.bench.table import Column

__all__ = [
    "COLUMNS",
    "DIRECTIONS",
    "FORMS",
    "METHOD",
    "MLP_STEP",
    "SHAPES",
    "TITLE",
    "HighwayCase",
    "HighwayMLPStep",
    "configuration",
    "floor_bytes",
    "fused_unavailable",
    "measure_highway",
    "notes",
    "run",
]

SHAPES: tuple[tuple[int, ...], ...] = ((4096, 1024), (256, 64, 32, 32))
TINY_SHAPES: tuple[tuple[int, ...], ...] = ((8, 6), (2, 3, 4, 5))
DIRECTIONS = ("fwd", "fwd+bwd")
FORMS = ("split", "packed")
IMPLS = harness.IMPLS
MLP_STEP: dict[str, int] = {"in_features": 1024, "hidden": 1024, "depth": 20, "num_classes": 10, "batch": 256}
MLP_STEP_TINY: dict[str, int] = {"in_features": 12, "hidden": 16, "depth": 2, "num_classes": 4, "batch": 8}

TITLE = "highway gate (coupled, ReLU), float32: fused vs eager reference vs torch.compile(reference)"
METHOD = {
    "gbps": "minimal bytes (docs/design.md section 2, coupled gate) / median time; fwd: 4 tensor passes (read h, g, x; "
    "write y); fwd+bwd: 11 (+ read dy, h, g, x; write dh, dg, dx); the same for the packed form",
    "saved_bytes": "bytes autograd saves for backward in one training forward (fusedres.bench.harness.saved_bytes), "
    "excluding the inputs' own storages: the fused op saves only its inputs (0 extra bytes)",
}
COLUMNS = (
    table.shape(),
    Column(
        "input",
        lambda row: row["form"] if row["packed_dim"] is None else f"packed dim {row['packed_dim']}",
        left=True,
    ),
    table.field("dir", "direction"),
    *table.TIMES,
    table.gbps("fused GB/s", "fused"),
    table.gbps("ref GB/s", "reference"),
    table.PCT_COPY,
    table.saved_mb(),
    table.OTHER_CPU,
)


def floor_bytes(numel: int, direction: str, elem_size: int = 4) -> int:
    """Minimal bytes of one coupled highway call (docs/design.md section 2) on ``numel`` output elements."""
    passes = {"fwd": 4, "fwd+bwd": 11}.get(direction)
    if passes is None:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return passes * numel * elem_size


def packed_dim(shape: Sequence[int]) -> int:
    """-1 for (N, F) (a Linear's output), 1 for (N, C, H, W) (a conv's channels)."""
    return -1 if len(shape) == 2 else 1


def _functional(impl: str, packed: bool, dim: int) -> Callable[..., Tensor]:
    """fused or reference highway with positional tensor arguments: (projected, carry) or (transform, gate, carry)."""
    # The packages re-export the functionals under the module's own name: import from the modules explicitly.
    if impl == "fused":
        from fusedres.ops.highway import highway, highway_packed
    else:
        from fusedres.reference.highway import highway, highway_packed
    if packed:
        return lambda projected, carry: highway_packed(projected, carry, dim=dim)
    return lambda transform, gate, carry: highway(transform, gate, carry)


def fused_unavailable(device: str) -> str | None:
    """Why the fused highway cannot be measured on ``device`` (None: it can)."""
    return harness.fused_unavailable(device, op="fusedres::highway_forward", kernel="highway ")


class HighwayCase:
    """Inputs of one highway configuration and the calls that benchmark it.

    Args:
        shape: of transform, gate, carry and the output; (N, F) packs along -1, (N, C, H, W) along 1.
        packed: True: one ``projected`` tensor of twice the size along the packed dim + carry; False: three tensors.
    """

    def __init__(
        self,
        shape: Sequence[int],
        packed: bool,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        self.shape, self.packed, self.device, self.dtype = tuple(shape), packed, device, dtype
        self.dim = packed_dim(self.shape)
        gen = torch.Generator().manual_seed(seed)

        def full(s: Sequence[int]) -> Tensor:
            return torch.randn(tuple(s), generator=gen, dtype=dtype).to(device)

        if packed:
            pshape = list(self.shape)
            pshape[self.dim] *= 2
            self.inputs: tuple[Tensor, ...] = (full(pshape).requires_grad_(), full(self.shape).requires_grad_())
        else:
            self.inputs = tuple(full(self.shape).requires_grad_() for _ in range(3))
        self.dy = full(self.shape)
        self.numel = self.dy.numel()

    @property
    def form(self) -> str:
        return "packed" if self.packed else "split"

    def functional(self, impl: str) -> Callable[..., Tensor]:
        """ "fused" or "reference" taking this case's tensors positionally."""
        return _functional(impl, self.packed, self.dim)

    def compiled(self) -> Callable[..., Tensor]:
        """``torch.compile`` of the reference (static shapes, full graph: a graph break fails loudly)."""
        return torch.compile(self.functional("reference"), dynamic=False, fullgraph=True)

    def call(self, direction: str, fn: Callable[..., Tensor]) -> Callable[[], object]:
        inputs, dy = self.inputs, self.dy
        if direction == "fwd":
            return lambda: fn(*inputs)
        if direction == "fwd+bwd":
            return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def floor_bytes(self, direction: str) -> int:
        return floor_bytes(self.numel, direction, self.dy.element_size())


class HighwayMLPStep:
    """One SGD training step (zero_grad, forward, cross-entropy, backward, step) of highway_mlp, three ways.

    The fused, reference and compiled models start from the same weights (the reference's state_dict).
    """

    def __init__(self, config: dict[str, int], device: str = "cpu", seed: int = 0) -> None:
        from fusedres.models import highway_mlp

        self.config = dict(config)
        c = self.config
        torch.manual_seed(seed)
        self.models: dict[str, nn.Module] = {
            "reference": highway_mlp(c["in_features"], c["hidden"], c["depth"], c["num_classes"], fused=False)
        }
        self.models["fused"] = highway_mlp(c["in_features"], c["hidden"], c["depth"], c["num_classes"], fused=True)
        self.models["fused"].load_state_dict(self.models["reference"].state_dict())
        self.models["compiled"] = copy.deepcopy(self.models["reference"])
        for m in self.models.values():
            m.to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(c["batch"], c["in_features"], generator=gen).to(device)
        self.target = torch.randint(0, c["num_classes"], (c["batch"],), generator=gen).to(device)

    def step_fn(self, name: str) -> Callable[[], object]:
        model = self.models[name]
        forward = torch.compile(model, dynamic=False, fullgraph=True) if name == "compiled" else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        x, target = self.x, self.target

        def step() -> Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), target)
            loss.backward()
            opt.step()
            return loss

        return step


def shapes_for(settings: harness.Settings) -> tuple[tuple[int, ...], ...]:
    return TINY_SHAPES if settings.tiny else SHAPES


def configuration(settings: harness.Settings) -> dict[str, Any]:
    return {"shapes": shapes_for(settings), "forms": FORMS, "directions": DIRECTIONS, "dtype": "float32"}


def measure_highway(
    shape: tuple[int, ...], packed: bool, settings: harness.Settings, copy_gbps: float, progress: harness.Progress
) -> list[dict[str, Any]]:
    """Both directions of one (shape, form) configuration: one row each."""
    device = settings.device
    case = HighwayCase(shape, packed, device=device)
    skip = "not measured (skipped: --quick compiles only the packed form)" if settings.quick and not packed else None
    fns_of, missing, compile_s = harness.implementations(
        {"fused": case.functional("fused")},
        fused_unavailable(device),
        case.functional("reference"),
        skip,
        case.compiled,
        functools.partial(case.call, "fwd+bwd"),
        device,
    )
    forwards = {name: case.call("fwd", fn) for name, fn in fns_of.items()}
    saved = harness.saved_per_impl(forwards, missing, case.inputs)  # type: ignore[arg-type]

    rows = harness.direction_rows(
        "highway",
        DIRECTIONS,
        case,
        fns_of,
        missing,
        saved,
        settings,
        copy_gbps,
        compile_s,
        progress,
        f"highway {list(shape)} {case.form}",
        shape=list(shape),
        dtype=str(case.dtype).replace("torch.", ""),
        form=case.form,
        packed_dim=case.dim if packed else None,
        coupled=True,
        activation="relu",
    )
    if not packed:
        for row in rows:
            row["null_reasons"]["packed_dim"] = "split form: three separate tensors"
    del case, fns_of, forwards
    gc.collect()
    return rows


def run(settings: harness.Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """The highway rows of every shape x form x direction."""
    groups = [(s, packed) for s in shapes_for(settings) for packed in (False, True)]
    return harness.run_groups(
        "highway",
        groups,
        len(DIRECTIONS),
        lambda group, progress: measure_highway(*group, settings, copy_gbps, progress),
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    return [
        (
            "split = transform, gate, carry as three tensors; packed = [transform | gate] of one projection read in "
            "place along the given dim. The highway_mlp training step is in the model rows."
        )
    ]

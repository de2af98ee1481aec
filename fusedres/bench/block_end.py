"""The block-end section of ``python -m fusedres bench``: the skip-connection variants' block ends (docs/design.md
section 10), ``act(scale * BN(x) + residual)``, at a CIFAR size, in NCHW and channels_last.

Variants (float32, training):

* ``stochastic depth``  scale (N,) = keep mask / 0.8, half the samples dropped, identity shortcut, ReLU;
* ``squeeze-excite``    scale (N, C) in (0, 1), identity shortcut, ReLU (the SE path's own convolutions excluded);
* ``pyramidnet``        a narrower shortcut (C - 16 of C channels: zero-padded by the reference, read as is by the
                        fused op), no activation: PyramidNet's blocks that do not downsample (all but one per
                        stage; the subsampled-view shortcut of the others is tested, not timed: its cost is
                        autograd's view backward, a zero-filled gradient of the 4x larger base, in both);
* ``shake-shake``       scale (N,) alpha forward, beta backward, identity shortcut, no activation (one branch's end).

Implementations: ``fused`` :func:`fusedres.batch_norm_act` with ``scale`` / ``backward_scale`` / the narrower
residual; ``reference`` the same functional in eager PyTorch (:mod:`fusedres.reference.bn_act`: BN, the product, a
padded shortcut, the add and the activation as separate ops); ``compiled`` ``torch.compile`` of the reference.
Directions: ``fwd`` (inputs require grad) and ``fwd+bwd`` (+ ``torch.autograd.grad`` of x, the residual and the
BN parameters). Minimal bytes (section 10): forward reads x once (a channel stays in cache), the residual (Cr/C of a
pass) and writes y: 2 + Cr/C passes; backward reads dy and x twice and writes dx and d_residual: 5 + Cr/C passes
(the 1-bit mask is left out of the floor).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fusedres.bench import harness, table
from fusedres.bench.table import Column

__all__ = ["COLUMNS", "METHOD", "TITLE", "VARIANTS", "BlockEndCase", "configuration", "notes", "run"]

SHAPE = (128, 64, 16, 16)  # a CIFAR ResNet's second stage at batch 128 (8 MB float32)
TINY_SHAPE = (4, 20, 3, 3)
VARIANTS = ("stochastic depth", "squeeze-excite", "pyramidnet", "shake-shake")
LAYOUTS = ("NCHW", "channels_last")
DIRECTIONS = ("fwd", "fwd+bwd")

TITLE = "block ends of the skip-connection variants, float32, training: fused vs eager reference vs torch.compile"
METHOD = {
    "gbps": "minimal bytes (docs/design.md section 10) / median time; fwd: 2 + Cr/C passes (read x, the residual's "
    "Cr of C channels; write y); fwd+bwd: 7 + 2 Cr/C (+ read dy, x twice; write dx, d_residual)",
    "saved_bytes": "bytes autograd saves for backward in one training forward, excluding the inputs' own storages",
}
COLUMNS = (
    table.shape(),
    Column("variant", lambda row: row["variant"], left=True),
    Column("layout", lambda row: row["layout"], left=True),
    table.field("dir", "direction"),
    *table.TIMES,
    table.gbps("fused GB/s", "fused"),
    table.PCT_COPY,
    table.saved_mb(),
    table.OTHER_CPU,
)


class BlockEndCase:
    """Inputs of one (variant, layout) configuration and the calls that benchmark it."""

    def __init__(self, shape: tuple[int, ...], variant: str, layout: str, device: str = "cpu", seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.shape, self.variant, self.layout = tuple(shape), variant, layout
        N, C, H, W = self.shape
        gen = torch.Generator().manual_seed(seed)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

        def full(s: tuple[int, ...]) -> Tensor:
            return torch.randn(s, generator=gen).to(device).contiguous(memory_format=fmt)

        self.x = full(self.shape).requires_grad_()
        self.dy = full(self.shape)
        cr = max(1, C - 16) if variant == "pyramidnet" else C
        self.residual = full((N, cr, H, W)).requires_grad_()
        self.residual_channels = self.residual.shape[1]
        self.weight = torch.rand(C, generator=gen).to(device).add_(0.5).requires_grad_()
        self.bias = torch.randn(C, generator=gen).to(device).requires_grad_()
        self.scale: Tensor | None = None
        self.backward_scale: Tensor | None = None
        self.activation = "relu"
        if variant == "stochastic depth":
            keep = (torch.arange(N) % 2 == 0).float()
            self.scale = (keep / 0.8).to(device)
        elif variant == "squeeze-excite":
            self.scale = torch.rand(N, C, generator=gen).to(device)
        elif variant == "pyramidnet":
            self.activation = "identity"
        else:
            self.scale = torch.rand(N, generator=gen).to(device)
            self.backward_scale = torch.rand(N, generator=gen).to(device)
            self.activation = "identity"
        self.inputs = (self.x, self.residual, self.weight, self.bias)
        self.numel = self.x.numel()

    def functional(self, impl: str) -> Callable[[], Tensor]:
        """ "fused" or "reference": a call of the block end on this case's tensors."""
        if impl == "fused":
            from fusedres.ops.bn_act import batch_norm_act
        else:
            from fusedres.reference.bn_act import batch_norm_act
        activation, scale, backward_scale = self.activation, self.scale, self.backward_scale

        def block_end(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor) -> Tensor:
            return batch_norm_act(
                x,
                None,
                None,
                weight,
                bias,
                True,
                residual=residual,
                activation=activation,
                scale=scale,
                backward_scale=backward_scale,
            )

        return block_end

    def compiled(self) -> Callable[..., Tensor]:
        return torch.compile(self.functional("reference"), dynamic=False, fullgraph=True)

    def call(self, direction: str, fn: Callable[..., Tensor]) -> Callable[[], object]:
        x, w, b, r, dy = self.x, self.weight, self.bias, self.residual, self.dy

        def forward() -> Tensor:
            return fn(x, weight=w, bias=b, residual=r)

        if direction == "fwd":
            return forward
        if direction == "fwd+bwd":
            return lambda: torch.autograd.grad(forward(), self.inputs, dy)
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def floor_bytes(self, direction: str) -> int:
        frac = self.residual_channels / self.shape[1]
        passes = {"fwd": 2 + frac, "fwd+bwd": 7 + 2 * frac}[direction]
        return int(passes * self.numel * self.x.element_size())


def fused_unavailable(device: str) -> str | None:
    return harness.fused_unavailable(device, op="fusedres::block_end_forward", kernel="block end ")


def measure(
    shape: tuple[int, ...], variant: str, layout: str, settings: harness.Settings, copy_gbps: float,
    progress: harness.Progress,
) -> list[dict[str, Any]]:
    device = settings.device
    case = BlockEndCase(shape, variant, layout, device=device)
    fns_of, missing, compile_s = harness.implementations(
        {"fused": case.functional("fused")},
        fused_unavailable(device),
        case.functional("reference"),
        None,
        case.compiled,
        functools.partial(case.call, "fwd+bwd"),
        device,
    )
    forwards = {name: case.call("fwd", fn) for name, fn in fns_of.items()}
    saved = harness.saved_per_impl(forwards, missing, case.inputs)  # type: ignore[arg-type]
    rows = harness.direction_rows(
        "block_end",
        DIRECTIONS,
        case,
        fns_of,
        missing,
        saved,
        settings,
        copy_gbps,
        compile_s,
        progress,
        f"block end {variant} {layout}",
        shape=list(shape),
        dtype="float32",
        variant=variant,
        layout=layout,
        residual_channels=case.residual_channels,
        activation=case.activation,
    )
    del case, fns_of, forwards
    gc.collect()
    return rows


def configuration(settings: harness.Settings) -> dict[str, Any]:
    shape = TINY_SHAPE if settings.tiny else SHAPE
    return {"shape": shape, "variants": VARIANTS, "layouts": LAYOUTS, "directions": DIRECTIONS, "dtype": "float32"}


def run(settings: harness.Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """The rows of every variant x layout x direction."""
    shape = TINY_SHAPE if settings.tiny else SHAPE
    groups = [(v, layout) for v in VARIANTS for layout in LAYOUTS]
    if settings.quick:
        groups = [(v, "channels_last") for v in VARIANTS]
    return harness.run_groups(
        "block_end",
        groups,
        len(DIRECTIONS),
        lambda group, progress: measure(shape, *group, settings, copy_gbps, progress),
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "stochastic depth: half the samples dropped (scale 0: the fused op reads only their shortcut); "
        "squeeze-excite: the (N, C) scale only (its pooling and FCs are not in the row); pyramidnet: a shortcut "
        "of C - 16 channels (the reference pads it to C channels); "
        "shake-shake: one branch's end, alpha forward and beta backward."
    ]

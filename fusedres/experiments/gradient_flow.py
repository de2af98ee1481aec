"""``gradient-flow``: per-layer gradient norms of plain vs residual networks at several depths.

The networks (same width, same data, same initialisation scheme; only the shortcut differs)::

    stem    Linear(64, width) -> BatchNorm + ReLU                      (fusedres.nn.BatchNormAct1d)
    layer l Linear(width, width) -> BatchNorm (+ h, residual only) -> ReLU   (one fused BatchNormAct1d call)
    head    Linear(width, 10)

on scikit-learn's digits as 64-feature vectors. ``depth`` counts the width x width layers. Hidden weights start
He-normal (fan_in, ReLU gain), no biases before a BatchNorm.

Measured on one fixed probe batch in training mode (batch statistics), at initialisation and again after
``--steps`` SGD steps (momentum 0.9) on shuffled training batches: the Frobenius norm of every layer's weight
gradient, dL/dW_l, and the first/last ratio ||dL/dW_1|| / ||dL/dW_depth||.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.experiments._output import Progress, Table, progress, pyplot
from fusedres.experiments._setup import (
    build_models,
    check_positive,
    digits_features,
    epoch_indices,
    max_relative_difference,
    resolve_config,
)
from fusedres.nn import BatchNormAct1d

NAME = "gradient-flow"
SUMMARY = "per-layer gradient norms of plain vs residual networks at depths 5 to 100 (init and after N steps)"
DEFAULT_IMPLEMENTATIONS = ("fused", "reference")
KINDS = ("plain", "residual")
# A tutorial's first-layer / last-layer gradient-norm ratios (plain, residual), to compare with.
TUTORIAL_RATIOS = {5: (0.80, 0.99), 10: (0.69, 0.77), 20: (0.77, 0.61), 50: (0.66, 0.83), 100: (1.70, 0.60)}


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the command-line options of the same names)."""

    depths: tuple[int, ...] = (5, 10, 20, 50, 100)
    width: int = 64
    batch_size: int = 128
    steps: int = 100
    lr: float = 0.05


DEFAULT = Config()
TINY = Config(depths=(2, 4), width=8, batch_size=16, steps=2)


class StackMLP(nn.Module):
    """The plain or residual MLP of the module docstring.

    Args:
        in_features, width, depth, num_classes: sizes.
        residual: add each layer's input to its BatchNorm output before the ReLU.
        fused: False runs the pure PyTorch reference BatchNorm.
    """

    def __init__(
        self, in_features: int, width: int, depth: int, num_classes: int, *, residual: bool, fused: bool
    ) -> None:
        super().__init__()
        self.residual = residual
        self.stem = nn.Linear(in_features, width, bias=False)
        self.stem_norm = BatchNormAct1d(width, activation="relu", fused=fused)
        self.linears = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(BatchNormAct1d(width, activation="relu", fused=fused) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)
        for linear in (self.stem, *self.linears):
            nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_features] -> logits Tensor[N, num_classes]."""
        h = self.stem_norm(self.stem(x))
        for linear, norm in zip(self.linears, self.norms):
            h = norm(linear(h), h if self.residual else None)
        return self.head(h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (each defaults to the preset's value)."""
    d = DEFAULT
    parser.add_argument("--depths", type=int, nargs="+", metavar="D", help=f"network depths (default {d.depths})")
    parser.add_argument("--width", type=int, help=f"features of every layer (default {d.width})")
    parser.add_argument("--batch-size", type=int, help=f"probe and training batch size (default {d.batch_size})")
    parser.add_argument("--steps", type=int, help=f"SGD steps before the second measurement (default {d.steps})")
    parser.add_argument("--lr", type=float, help=f"SGD learning rate, momentum 0.9 (default {d.lr})")


def configure(args: argparse.Namespace) -> Config:
    """The resolved, checked configuration of ``args``."""
    config = resolve_config(args, DEFAULT, TINY)
    check_positive(config, "depths", "width", "batch_size", "lr")
    check_positive(config, "steps", allow_zero=("steps",))
    return config


def _grad_norms(model: StackMLP, x: Tensor, y: Tensor) -> tuple[list[float], float]:
    """(||dL/dW_l|| for every stack layer, loss) on one batch in training mode; leaves no gradients behind."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    norms = [linear.weight.grad.norm().item() for linear in model.linears]
    model.zero_grad(set_to_none=True)
    return norms, loss.item()


def _train(model: StackMLP, x: Tensor, y: Tensor, config: Config, seed: int, bar: Progress) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed + 1)  # the same batches for every network
    done = 0
    while done < config.steps:
        for idx in epoch_indices(x.shape[0], config.batch_size, generator):
            if done == config.steps:
                break
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            bar.update(1)


def _ratio(norms: list[float]) -> float:
    return norms[0] / norms[-1] if norms[-1] != 0 else float("inf")


def run(config: Config, impls: tuple[str, ...], seed: int, show_progress: bool) -> dict[str, Any]:
    """Measures every (kind, depth) network with every implementation.

    Returns:
        {"results": {impl: [record per (kind, depth)]}, "agreement": {...} or None}; a record holds the kind,
        depth, per-layer norms and loss at init and after training, and their first/last ratios.
    """
    (x_all, y_all), _ = digits_features()
    if config.batch_size > x_all.shape[0]:
        raise ValueError(f"--batch-size must be at most the {x_all.shape[0]} training samples, got {config.batch_size}")
    probe = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed))[: config.batch_size]
    x_probe, y_probe = x_all[probe], y_all[probe]
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    float64: list[dict[str, Any]] = []
    total = len(config.depths) * len(KINDS) * len(impls) * config.steps
    with progress(total, NAME, show_progress) as bar:
        for depth in config.depths:
            for kind in KINDS:

                def build(fused: bool, depth: int = depth, kind: str = kind) -> StackMLP:
                    return StackMLP(64, config.width, depth, 10, residual=kind == "residual", fused=fused)

                models = build_models(build, impls, seed)
                if len(impls) == 2:
                    # The judge of the fused vs reference difference: the reference in float64, same weights.
                    exact = copy.deepcopy(models["reference"]).double()
                    float64.append(
                        {
                            "kind": kind,
                            "depth": depth,
                            "grad_norms_init": _grad_norms(exact, x_probe.double(), y_probe)[0],
                        }
                    )
                for impl, model in models.items():
                    bar.describe(f"{NAME} {kind}-{depth} {impl}")
                    init, loss_init = _grad_norms(model, x_probe, y_probe)
                    _train(model, x_all, y_all, config, seed, bar)
                    trained, loss_trained = _grad_norms(model, x_probe, y_probe)
                    results[impl].append(
                        {
                            "kind": kind,
                            "depth": depth,
                            "grad_norms_init": init,
                            "grad_norms_trained": trained,
                            "ratio_init": _ratio(init),
                            "ratio_trained": _ratio(trained),
                            "loss_init": loss_init,
                            "loss_trained": loss_trained,
                        }
                    )
    return {"results": results, "agreement": _agreement(results, float64) if len(impls) == 2 else None}


def _agreement(results: dict[str, list[dict[str, Any]]], float64: list[dict[str, Any]]) -> dict[str, Any]:
    """Fused vs reference, and each against the float64 reference, per network and overall (relative)."""
    per_network = []
    for fused, ref, exact in zip(results["fused"], results["reference"], float64):
        per_network.append(
            {
                "kind": fused["kind"],
                "depth": fused["depth"],
                "fused_vs_reference": max_relative_difference(fused["grad_norms_init"], ref["grad_norms_init"]),
                "fused_vs_float64": max_relative_difference(fused["grad_norms_init"], exact["grad_norms_init"]),
                "reference_vs_float64": max_relative_difference(ref["grad_norms_init"], exact["grad_norms_init"]),
                "trained_fused_vs_reference": max_relative_difference(
                    fused["grad_norms_trained"], ref["grad_norms_trained"]
                ),
            }
        )
    return {
        "grad_norms_init_max_rel_diff": max(n["fused_vs_reference"] for n in per_network),
        "grad_norms_trained_max_rel_diff": max(n["trained_fused_vs_reference"] for n in per_network),
        "loss_init_max_abs_diff": max(
            abs(a["loss_init"] - b["loss_init"]) for a, b in zip(results["fused"], results["reference"])
        ),
        "init_vs_float64": per_network,
        "float64_grad_norms_init": float64,
    }


def _records(payload: dict[str, Any]) -> tuple[str, dict[tuple[str, int], dict[str, Any]]]:
    impl = payload["implementations"][0]
    return impl, {(r["kind"], r["depth"]): r for r in payload["results"][impl]}


def tables(payload: dict[str, Any]) -> list[Table]:
    """The first/last ratio per depth beside the tutorial's, and the spread of the norms over the layers."""
    impl, rec = _records(payload)
    steps = payload["config"]["steps"]
    table = Table(
        f"gradient-flow ({impl}): ||dL/dW_first|| / ||dL/dW_last|| of the width x width layers "
        f"(width {payload['config']['width']}, batch {payload['config']['batch_size']}, BatchNorm in every layer)",
        [
            "depth",
            "plain init",
            "residual init",
            "tutorial plain",
            "tutorial residual",
            f"plain {steps} steps",
            f"residual {steps} steps",
            "plain max/min",
            "residual max/min",
        ],
    )
    for depth in payload["config"]["depths"]:
        plain, residual = rec[("plain", depth)], rec[("residual", depth)]
        tutorial = TUTORIAL_RATIOS.get(depth, (None, None))

        def spread(r: dict[str, Any]) -> float:
            norms = r["grad_norms_init"]
            return max(norms) / min(norms) if min(norms) > 0 else float("inf")

        table.add(
            depth,
            plain["ratio_init"],
            residual["ratio_init"],
            tutorial[0],
            tutorial[1],
            plain["ratio_trained"],
            residual["ratio_trained"],
            spread(plain),
            spread(residual),
        )
    table.notes.append("max/min: largest over smallest layer gradient norm at init (1 = perfectly even flow)")
    agreement = payload.get("agreement")
    if not agreement:
        return [table]
    check = Table(
        "gradient-flow: fused vs reference at init (same weights and batch), each against the reference in float64 "
        "(max relative difference over the layers' gradient norms)",
        [
            "network",
            "fused vs reference",
            "fused vs float64",
            "reference (float32) vs float64",
            f"fused vs reference after {steps} steps",
        ],
    )
    for n in agreement["init_vs_float64"]:
        check.add(
            f"{n['kind']}-{n['depth']}",
            *(
                f"{n[k]:.1e}" if n[k] is not None else None
                for k in (
                    "fused_vs_reference",
                    "fused_vs_float64",
                    "reference_vs_float64",
                    "trained_fused_vs_reference",
                )
            ),
        )
    worst = {
        k: max((n[k] for n in agreement["init_vs_float64"] if n[k] is not None), default=float("nan"))
        for k in ("fused_vs_float64", "reference_vs_float64")
    }
    check.notes.append(
        f"largest difference from float64 at init: fused {worst['fused_vs_float64']:.1e}, float32 reference "
        f"{worst['reference_vs_float64']:.1e}; after training, SGD has amplified rounding differences step by step"
    )
    return [table, check]


def plot(payload: dict[str, Any], path: Path) -> None:
    """2 x 2 panels (init / after training x plain / residual): gradient norm per layer, one line per depth."""
    plt = pyplot()
    impl, rec = _records(payload)
    depths = payload["config"]["depths"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row", constrained_layout=True)
    colours = plt.get_cmap("viridis")
    for row, (key, when) in enumerate(
        (("grad_norms_init", "at initialisation"), ("grad_norms_trained", f"after {payload['config']['steps']} steps"))
    ):
        for col, kind in enumerate(KINDS):
            ax = axes[row][col]
            for i, depth in enumerate(depths):
                norms = rec[(kind, depth)][key]
                ax.plot(
                    range(1, len(norms) + 1),
                    norms,
                    marker="o" if depth <= 10 else None,
                    markersize=3,
                    color=colours(i / max(len(depths) - 1, 1)),
                    label=f"depth {depth}",
                )
            ax.set_yscale("log")
            ax.set_title(f"{kind}, {when}")
            ax.set_xlabel("layer (1 = nearest the input)")
            ax.grid(True, which="both", alpha=0.3)
            if col == 0:
                ax.set_ylabel("||dL/dW_layer|| (log)")
            ax.legend(fontsize=8)
    fig.suptitle(f"gradient flow, {impl} models, width {payload['config']['width']}, BatchNorm + ReLU per layer")
    fig.savefig(path, dpi=110)
    plt.close(fig)

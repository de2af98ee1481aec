"""``identity``: how fast a plain and a residual stack learn the identity f(x) = x.

He et al.'s motivation for shortcuts: if an identity mapping were optimal, a residual block only has to push its
branch to zero, while a plain stack of non-linear layers has to fit the identity. Here both are trained on it.

A stack is ``depth`` blocks of width ``width``, each (fusedres.nn.BatchNormAct1d for both BatchNorms)::

    Linear(width, width) -> BatchNorm + ReLU -> Linear(width, width) -> BatchNorm (+ x, residual only)

with no activation after the second BatchNorm (so the output can take any sign) and no stem or head: the stack's
output is compared with its input. Data: synthetic x ~ N(0, I) in ``width`` dimensions, a training set and a
held-out test set drawn from ``--seed``. Adam, mean squared error; the test MSE is measured with batch statistics
(the BatchNorms' training mode, the whole test set as one batch) at initialisation and after every epoch.
Var(x) = 1 per feature, so an MSE of 1 is what predicting 0 scores.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.experiments._output import Progress, Table, progress, pyplot
from fusedres.experiments._setup import (
    build_models,
    check_positive,
    epoch_indices,
    max_relative_difference,
    resolve_config,
)
from fusedres.nn import BatchNormAct1d

NAME = "identity"
SUMMARY = "MSE of plain vs residual stacks of depth 2-20 learning f(x) = x, at init and after each epoch"
DEFAULT_IMPLEMENTATIONS = ("fused",)
KINDS = ("plain", "residual")
THRESHOLD = 0.1  # "learned": test MSE below 10% of Var(x)


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the command-line options of the same names)."""

    depths: tuple[int, ...] = (2, 5, 10, 20)
    width: int = 32
    train_size: int = 4096
    test_size: int = 1024
    batch_size: int = 128
    epochs: int = 10
    lr: float = 1e-3


DEFAULT = Config()
TINY = Config(depths=(1, 2), width=4, train_size=64, test_size=32, batch_size=16, epochs=2)


class IdentityStack(nn.Module):
    """``depth`` blocks of the module docstring, plain or residual.

    Args:
        width: features in and out.
        depth: blocks.
        residual: add each block's input to its second BatchNorm's output.
        fused: False runs the pure PyTorch reference BatchNorm.
    """

    def __init__(self, width: int, depth: int, *, residual: bool, fused: bool) -> None:
        super().__init__()
        self.residual = residual
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "linear1": nn.Linear(width, width, bias=False),
                    "norm1": BatchNormAct1d(width, activation="relu", fused=fused),
                    "linear2": nn.Linear(width, width, bias=False),
                    "norm2": BatchNormAct1d(width, activation="identity", fused=fused),
                }
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, width] -> Tensor[N, width]."""
        for b in self.blocks:
            h = b["norm1"](b["linear1"](x))
            x = b["norm2"](b["linear2"](h), x if self.residual else None)
        return x


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (each defaults to the preset's value)."""
    d = DEFAULT
    parser.add_argument("--depths", type=int, nargs="+", metavar="D", help=f"blocks per stack (default {d.depths})")
    parser.add_argument("--width", type=int, help=f"features (default {d.width})")
    parser.add_argument("--train-size", type=int, help=f"training samples (default {d.train_size})")
    parser.add_argument("--test-size", type=int, help=f"held-out samples (default {d.test_size})")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    parser.add_argument("--epochs", type=int, help=f"training epochs K (default {d.epochs})")
    parser.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")


def configure(args: argparse.Namespace) -> Config:
    """The resolved, checked configuration of ``args``."""
    config = resolve_config(args, DEFAULT, TINY)
    check_positive(config, "depths", "width", "train_size", "batch_size", "epochs", "lr")
    for name in ("batch_size", "test_size"):
        if getattr(config, name) < 2:
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least 2 (BatchNorm needs 2 samples), got {getattr(config, name)}"
            )
    return config


@torch.no_grad()
def _test_mse(model: IdentityStack, x: Tensor) -> float:
    # Training mode: batch statistics, so that the measurement at initialisation is not distorted by running
    # statistics that have seen no data yet. Updating them is harmless: no measurement uses them.
    model.train()
    return nn.functional.mse_loss(model(x), x).item()


def _train(model: IdentityStack, data: dict[str, Tensor], config: Config, seed: int, bar: Progress) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed + 1)  # the same batches for every stack
    x_train, x_test = data["train"], data["test"]
    test_mse = [_test_mse(model, x_test)]
    train_mse: list[float] = []
    for _ in range(config.epochs):
        total, count = 0.0, 0
        for idx in epoch_indices(x_train.shape[0], config.batch_size, generator):
            if idx.numel() < 2:  # a 1-sample batch has no batch statistics
                continue
            x = x_train[idx]
            loss = nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * idx.numel(), count + idx.numel()
            bar.update(1)
        train_mse.append(total / count)
        test_mse.append(_test_mse(model, x_test))
    return {"test_mse": test_mse, "train_mse": train_mse}


def run(config: Config, impls: tuple[str, ...], seed: int, show_progress: bool) -> dict[str, Any]:
    """Trains every (kind, depth) stack with every implementation.

    Returns:
        {"results": {impl: [record per stack]}, "agreement": {...} or None}; a record holds the kind, depth,
        parameters, test MSE at init and after each epoch (epochs + 1 values), mean training MSE per epoch and the
        first epoch whose test MSE is below THRESHOLD = 0.1 (None if none).
    """
    generator = torch.Generator().manual_seed(seed)
    data = {
        "train": torch.randn(config.train_size, config.width, generator=generator),
        "test": torch.randn(config.test_size, config.width, generator=generator),
    }
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    batches_per_epoch = sum(1 for i in range(0, config.train_size, config.batch_size) if config.train_size - i >= 2)
    total = len(config.depths) * len(KINDS) * len(impls) * config.epochs * batches_per_epoch
    with progress(total, NAME, show_progress) as bar:
        for depth in config.depths:
            for kind in KINDS:

                def build(fused: bool, depth: int = depth, kind: str = kind) -> IdentityStack:
                    return IdentityStack(config.width, depth, residual=kind == "residual", fused=fused)

                for impl, model in build_models(build, impls, seed).items():
                    bar.describe(f"{NAME} {kind}-{depth} {impl}")
                    record: dict[str, Any] = {
                        "kind": kind,
                        "depth": depth,
                        "parameters": sum(p.numel() for p in model.parameters()),
                    }
                    record.update(_train(model, data, config, seed, bar))
                    record["epochs_to_threshold"] = next(
                        (e for e, mse in enumerate(record["test_mse"]) if mse < THRESHOLD), None
                    )
                    results[impl].append(record)
    agreement = None
    if len(impls) == 2:
        pairs = list(zip(results[impls[0]], results[impls[1]]))
        agreement = {
            "test_mse_init_max_rel_diff": max(
                max_relative_difference(a["test_mse"][:1], b["test_mse"][:1]) for a, b in pairs
            ),
            "test_mse_final_max_rel_diff": max(
                max_relative_difference(a["test_mse"][-1:], b["test_mse"][-1:]) for a, b in pairs
            ),
        }
    return {"results": results, "agreement": agreement}


def tables(payload: dict[str, Any]) -> list[Table]:
    """Test MSE at init, after the first, middle and last epoch, and the epochs needed to get below THRESHOLD."""
    impl = payload["implementations"][0]
    cfg = payload["config"]
    epochs = cfg["epochs"]
    shown = sorted({0, 1, (epochs + 1) // 2, epochs})
    table = Table(
        f"identity ({impl}): test MSE of f(x) = x, width {cfg['width']}, Adam lr {cfg['lr']:g}, "
        f"batch {cfg['batch_size']}",
        ["stack", "parameters", *("init" if e == 0 else f"epoch {e}" for e in shown), f"epochs to MSE < {THRESHOLD}"],
    )
    for r in payload["results"][impl]:
        table.add(
            f"{r['kind']}-{r['depth']}",
            r["parameters"],
            *(r["test_mse"][e] for e in shown),
            r["epochs_to_threshold"] if r["epochs_to_threshold"] is not None else f"> {epochs}",
        )
    agreement = payload.get("agreement")
    if agreement:
        table.notes.append(
            f"fused vs reference, same weights and batches: test MSE at init agrees to "
            f"{agreement['test_mse_init_max_rel_diff']:.1e} (relative), after {epochs} epochs to "
            f"{agreement['test_mse_final_max_rel_diff']:.1e}"
        )
    return [table]


def plot(payload: dict[str, Any], path: Path) -> None:
    """One panel per depth: test MSE (log) against epochs, plain vs residual."""
    plt = pyplot()
    impl = payload["implementations"][0]
    depths = payload["config"]["depths"]
    records = {(r["kind"], r["depth"]): r for r in payload["results"][impl]}
    fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths) + 1, 3.8), sharey=True, constrained_layout=True)
    axes = list(axes) if len(depths) > 1 else [axes]
    for ax, depth in zip(axes, depths):
        for kind, style in zip(KINDS, ("-o", "-s")):
            mse = records[(kind, depth)]["test_mse"]
            ax.plot(range(len(mse)), mse, style, markersize=3, label=kind)
        ax.axhline(THRESHOLD, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}")
        ax.set_xlabel("epoch (0 = init)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test MSE vs f(x) = x (log)")
    fig.suptitle(f"learning the identity ({impl}): plain vs residual stacks")
    fig.savefig(path, dpi=110)
    plt.close(fig)

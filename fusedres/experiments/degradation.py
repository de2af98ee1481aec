"""``degradation``: He et al.'s Figure 1 effect, plain-20 / plain-56 vs ResNet-20 / ResNet-56, on digits.

The networks are :class:`fusedres.models.CifarResNet` (He et al.'s CIFAR layout: 3x3 16-channel stem, three stages
of 16 / 32 / 64 channels, option-A shortcuts) and the same definition with ``shortcut=False`` (the registered
``plain20`` / ``plain56``: same layers, same parameters, no shortcuts). Each is trained from the same seed on
scikit-learn's digits (1500 training / 297 test images: the 3x32x32 images of ``fusedres train``, averaged down to
``--image-size``, 16 by default: the 8x8 digits hold no more detail, and it is 4x less work) with
He et al.'s optimiser (SGD, momentum 0.9, weight decay 1e-4, constant learning rate: the first phase of their
schedule), the same batches in the same order for every network. Their batch of 128 would give only 12 updates
per epoch of 1500 images, so the batch is 32 (47 updates per epoch) and their learning rate of 0.1 is scaled with
it (0.1 x 32 / 128 = 0.025, the linear scaling rule).

The effect to look for: the deeper plain net trains worse (higher training error) than the shallower one, while
the deeper residual net does not. Training error is measured on each batch before its update (as in the paper's
curves), test error in eval mode after each epoch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedres.data import ImageDataset, batches, load_digits
from fusedres.experiments._output import Progress, Table, progress, pyplot
from fusedres.experiments._setup import build_models, check_positive, resolve_config
from fusedres.models.resnet import CifarResNet

NAME = "degradation"
SUMMARY = "He et al.'s Figure 1: training error of plain-20/56 vs ResNet-20/56 on digits"
DEFAULT_IMPLEMENTATIONS = ("fused",)
KINDS = ("plain", "residual")


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the command-line options of the same names)."""

    depths: tuple[int, ...] = (20, 56)
    epochs: int = 6
    batch_size: int = 32
    lr: float = 0.025
    weight_decay: float = 1e-4
    max_batches: int | None = None
    image_size: int = 16


DEFAULT = Config()
TINY = Config(depths=(8, 14), epochs=2, batch_size=16, max_batches=2, image_size=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (each defaults to the preset's value)."""
    d = DEFAULT
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        metavar="D",
        help=f"CIFAR depths 6n + 2, plain and residual (default {d.depths})",
    )
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"constant SGD learning rate, momentum 0.9 (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {d.weight_decay})")
    parser.add_argument("--max-batches", type=int, metavar="N", help="stop every epoch after N batches")
    parser.add_argument(
        "--image-size", type=int, help=f"images averaged down from 32x32 to this size (default {d.image_size})"
    )


def configure(args: argparse.Namespace) -> Config:
    """The resolved, checked configuration of ``args``."""
    config = resolve_config(args, DEFAULT, TINY)
    check_positive(config, "depths", "epochs", "batch_size", "lr")
    if not 4 <= config.image_size <= 32:
        raise ValueError(f"--image-size must be in [4, 32] (the images are 32x32), got {config.image_size}")
    check_positive(config, "weight_decay", allow_zero=("weight_decay",))
    if config.max_batches is not None:
        check_positive(config, "max_batches")
    for depth in config.depths:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"--depths must be CIFAR depths 6n + 2 >= 8 (20, 32, 44, 56, ...), got {depth}")
    return config


def _resize(images: Tensor, size: int) -> Tensor:
    """Tensor[B, 3, 32, 32] -> Tensor[B, 3, size, size] by area averaging (the images themselves when size is 32)."""
    return images if images.shape[-1] == size else F.adaptive_avg_pool2d(images, size)


def _num_batches(data: ImageDataset, config: Config) -> int:
    count = -(-len(data.train) // config.batch_size)
    return count if config.max_batches is None else min(count, config.max_batches)


@torch.no_grad()
def _test_error(model: nn.Module, data: ImageDataset, config: Config) -> float:
    """Percent of the test images misclassified in eval mode."""
    model.eval()
    wrong = total = 0
    for images, labels in batches(data, "test", config.batch_size, max_batches=config.max_batches):
        wrong += int((model(_resize(images, config.image_size)).argmax(1) != labels).sum())
        total += labels.numel()
    return 100.0 * wrong / total


def _train(model: nn.Module, data: ImageDataset, config: Config, seed: int, bar: Progress) -> dict[str, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    batch_error: list[float] = []
    batch_loss: list[float] = []
    epoch_error: list[float] = []
    test_error: list[float] = []
    for epoch in range(config.epochs):
        model.train()
        wrong = total = 0
        for images, labels in batches(
            data, "train", config.batch_size, epoch=epoch, seed=seed, max_batches=config.max_batches
        ):
            logits = model(_resize(images, config.image_size))
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_wrong = int((logits.detach().argmax(1) != labels).sum())
            wrong, total = wrong + batch_wrong, total + labels.numel()
            batch_error.append(100.0 * batch_wrong / labels.numel())
            batch_loss.append(loss.item())
            bar.update(1, loss=f"{batch_loss[-1]:.3f}")
        epoch_error.append(100.0 * wrong / total)
        test_error.append(_test_error(model, data, config))
    return {
        "batch_train_error": batch_error,
        "batch_loss": batch_loss,
        "train_error": epoch_error,
        "test_error": test_error,
    }


def run(config: Config, impls: tuple[str, ...], seed: int, show_progress: bool) -> dict[str, Any]:
    """Trains every (kind, depth) network with every implementation.

    Returns:
        {"results": {impl: [record per network]}, "agreement": {...} or None}; a record holds the kind, depth,
        name, parameters, per-batch training error and loss, per-epoch training and test error (percent).
    """
    data = load_digits()
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    total = len(config.depths) * len(KINDS) * len(impls) * config.epochs * _num_batches(data, config)
    with progress(total, NAME, show_progress) as bar:
        for kind in KINDS:
            for depth in config.depths:

                def build(fused: bool, depth: int = depth, kind: str = kind) -> CifarResNet:
                    return CifarResNet(depth, data.num_classes, fused=fused, shortcut=kind == "residual")

                for impl, model in build_models(build, impls, seed).items():
                    name = f"{'plain' if kind == 'plain' else 'resnet'}{depth}"
                    bar.describe(f"{NAME} {name} {impl}")
                    record = {
                        "kind": kind,
                        "depth": depth,
                        "name": name,
                        "parameters": sum(p.numel() for p in model.parameters()),
                    }
                    record.update(_train(model, data, config, seed, bar))
                    results[impl].append(record)
    agreement = None
    if len(impls) == 2:
        pairs = list(zip(results[impls[0]], results[impls[1]]))
        agreement = {
            "first_batch_loss_max_abs_diff": max(abs(a["batch_loss"][0] - b["batch_loss"][0]) for a, b in pairs),
            "train_error_max_abs_diff": max(
                abs(x - y) for a, b in pairs for x, y in zip(a["train_error"], b["train_error"])
            ),
        }
    return {"results": results, "agreement": agreement}


def tables(payload: dict[str, Any]) -> list[Table]:
    """Training error per epoch and the last test error of every network."""
    impl = payload["implementations"][0]
    epochs = payload["config"]["epochs"]
    table = Table(
        f"degradation ({impl}): training error (%) per epoch on digits ({payload['config']['image_size']}px), SGD lr "
        f"{payload['config']['lr']:g} constant, batch {payload['config']['batch_size']}",
        ["network", "parameters", *(f"epoch {e + 1}" for e in range(epochs)), "test error (%)"],
    )
    for r in payload["results"][impl]:
        table.add(r["name"], r["parameters"], *r["train_error"], r["test_error"][-1])
    agreement = payload.get("agreement")
    if agreement:
        table.notes.append(
            f"fused vs reference, same weights and batches: first-batch loss differs by "
            f"{agreement['first_batch_loss_max_abs_diff']:.1e}; per-epoch training error by at most "
            f"{agreement['train_error_max_abs_diff']:.2f} points (rounding differences grow step by step)"
        )
    return [table]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    """Two panels, plain and residual, as He et al.'s Figure 4: training error (thin, moving average over one
    epoch of batches) and test error (bold, per epoch) against epochs, one colour per depth."""
    plt = pyplot()
    impl = payload["implementations"][0]
    records = payload["results"][impl]
    epochs = payload["config"]["epochs"]
    depths = payload["config"]["depths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True, constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for ax, kind in zip(axes, KINDS):
        for r in (r for r in records if r["kind"] == kind):
            colour = colours(depths.index(r["depth"]))
            per_epoch = len(r["batch_train_error"]) // epochs
            x = [(i + 1) / per_epoch for i in range(len(r["batch_train_error"]))]
            ax.plot(
                x, _moving_average(r["batch_train_error"], per_epoch), color=colour, lw=1, label=f"{r['name']} train"
            )
            ax.plot(
                range(1, epochs + 1),
                r["test_error"],
                color=colour,
                lw=2.5,
                ls="--",
                marker="o",
                label=f"{r['name']} test",
            )
        ax.set_title(f"{'plain networks' if kind == 'plain' else 'ResNets'} ({impl})")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.suptitle("degradation on digits: training error (thin) and test error (bold, dashed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)

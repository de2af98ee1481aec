"""``highway-gates``: how much a trained highway network transforms and how much it carries, layer by layer.

The model is :func:`fusedres.models.highway_mlp` (stem Linear(64, hidden) -> ``depth`` coupled Highway layers ->
Linear(hidden, 10); ReLU transform, transform-gate bias initialised to -2, as Srivastava et al. 2015 recommend)
trained on scikit-learn's digits as 64-feature vectors with SGD (momentum 0.9).

The transform gate of layer l is T = sigmoid(x W_g^T + b_g), where W_g, b_g are the gate rows of the layer's packed
projection (rows hidden..2*hidden of its ``weight`` and ``bias``, the documented ``[transform | gate]`` layout of
:class:`fusedres.nn.Highway`); the layer outputs ``act(h) * T + x * (1 - T)``. The fused layer never materialises
T, so a forward pre-hook on each layer recomputes it from the layer's input with the same weights. Measured on the
test images at initialisation and after training: the mean of T per layer and over all layers (T near 0: the
unit carries its input; near 1: it transforms), per unit, and for one test image, as in Srivastava et al.'s Figure 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.experiments._output import Table, progress, pyplot
from fusedres.experiments._setup import (
    build_models,
    check_positive,
    digits_features,
    epoch_indices,
    max_relative_difference,
    resolve_config,
)
from fusedres.models.highway import HighwayMLP, highway_mlp
from fusedres.nn import Highway

NAME = "highway-gates"
SUMMARY = "mean transform-gate activity per layer of a highway MLP trained on digits (Srivastava et al., Fig. 2)"
DEFAULT_IMPLEMENTATIONS = ("fused",)
TUTORIAL_MEAN_GATE = 0.154


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the command-line options of the same names)."""

    depth: int = 20
    hidden: int = 50
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    gate_bias: float = -2.0


DEFAULT = Config()
TINY = Config(depth=3, hidden=6, epochs=1, batch_size=64)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (each defaults to the preset's value)."""
    d = DEFAULT
    parser.add_argument("--depth", type=int, help=f"highway layers (default {d.depth})")
    parser.add_argument("--hidden", type=int, help=f"units per highway layer (default {d.hidden})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    parser.add_argument("--lr", type=float, help=f"SGD learning rate, momentum 0.9 (default {d.lr})")
    parser.add_argument("--gate-bias", type=float, help=f"initial transform-gate bias (default {d.gate_bias})")


def configure(args: argparse.Namespace) -> Config:
    """The resolved, checked configuration of ``args``."""
    config = resolve_config(args, DEFAULT, TINY)
    check_positive(config, "depth", "hidden", "epochs", "batch_size", "lr")
    return config


@contextmanager
def record_transform_gates(model: nn.Module) -> Iterator[list[list[Tensor]]]:
    """Collects the transform gate T of every :class:`fusedres.nn.Highway` layer of ``model`` while active.

    Yields:
        One list per Highway layer (in ``model.modules()`` order), to which every forward call appends its
        T = sigmoid(gate logits), Tensor[*, features], detached.
    """
    layers = [m for m in model.modules() if isinstance(m, Highway)]
    gates: list[list[Tensor]] = [[] for _ in layers]

    def hook_for(i: int, layer: Highway):
        f = layer.features

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            with torch.no_grad():
                logits = nn.functional.linear(args[0], layer.weight[f : 2 * f], layer.bias[f : 2 * f])
                gates[i].append(torch.sigmoid(logits))

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i, layer)) for i, layer in enumerate(layers)]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _gate_stats(model: HighwayMLP, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Gate statistics and accuracy on (x, y) in eval mode."""
    model.eval()
    with record_transform_gates(model) as gates:
        logits = model(x)
    per_layer = [torch.cat(g) for g in gates]  # Tensor[N, hidden] per layer
    layer_mean = [t.mean().item() for t in per_layer]
    return {
        "layer_mean": layer_mean,
        "mean": sum(layer_mean) / len(layer_mean),
        "unit_mean": [t.mean(0).tolist() for t in per_layer],
        "sample_gates": [t[0].tolist() for t in per_layer],
        "gate_bias": [layer.bias[layer.features : 2 * layer.features].tolist() for layer in model.layers],
        "accuracy": 100.0 * (logits.argmax(1) == y).double().mean().item(),
    }


def run(config: Config, impls: tuple[str, ...], seed: int, show_progress: bool) -> dict[str, Any]:
    """Trains the highway MLP with every implementation; gate statistics before and after.

    Returns:
        {"results": {impl: record}, "agreement": {...} or None}; a record holds "init" and "trained" statistics
        (per-layer and overall mean gate, per-unit means, one test image's gates, gate biases, test accuracy),
        the training loss per epoch and the parameter count.
    """
    (x_train, y_train), (x_test, y_test) = digits_features()

    def build(fused: bool) -> HighwayMLP:
        return highway_mlp(
            in_features=x_train.shape[1],
            hidden=config.hidden,
            depth=config.depth,
            num_classes=10,
            fused=fused,
            activation="relu",
            gate_bias=config.gate_bias,
            coupled=True,
        )

    results: dict[str, dict[str, Any]] = {}
    steps_per_epoch = -(-x_train.shape[0] // config.batch_size)
    with progress(len(impls) * config.epochs * steps_per_epoch, NAME, show_progress) as bar:
        for impl, model in build_models(build, impls, seed).items():
            bar.describe(f"{NAME} {impl}")
            init = _gate_stats(model, x_test, y_test)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
            generator = torch.Generator().manual_seed(seed + 1)
            losses = []
            model.train()
            for _ in range(config.epochs):
                total = 0.0
                for idx in epoch_indices(x_train.shape[0], config.batch_size, generator):
                    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * idx.numel()
                    bar.update(1, loss=f"{loss.item():.3f}")
                losses.append(total / x_train.shape[0])
            results[impl] = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "init": init,
                "trained": _gate_stats(model, x_test, y_test),
                "train_loss": losses,
            }
    agreement = None
    if len(impls) == 2:
        a, b = results[impls[0]], results[impls[1]]
        agreement = {
            "layer_mean_init_max_rel_diff": max_relative_difference(a["init"]["layer_mean"], b["init"]["layer_mean"]),
            "layer_mean_trained_max_rel_diff": max_relative_difference(
                a["trained"]["layer_mean"], b["trained"]["layer_mean"]
            ),
        }
    return {"results": results, "agreement": agreement}


def tables(payload: dict[str, Any]) -> list[Table]:
    """Mean transform gate per layer at init and after training, the overall mean beside the tutorial's."""
    impl = payload["implementations"][0]
    cfg = payload["config"]
    r = payload["results"][impl]
    init, trained = r["init"], r["trained"]
    table = Table(
        f"highway-gates ({impl}): mean transform gate T on the test images, highway_mlp depth {cfg['depth']}, "
        f"hidden {cfg['hidden']}, gate bias {cfg['gate_bias']:g}, {cfg['epochs']} epochs SGD lr {cfg['lr']:g}",
        ["layer", "T init", "T trained", "units mostly transforming (mean T > 0.5)"],
    )
    for i, (t0, t1, units) in enumerate(zip(init["layer_mean"], trained["layer_mean"], trained["unit_mean"])):
        table.add(i + 1, t0, t1, f"{sum(u > 0.5 for u in units)}/{len(units)}")
    all_units = [u for layer in trained["unit_mean"] for u in layer]
    table.add("all", init["mean"], trained["mean"], f"{sum(u > 0.5 for u in all_units)}/{len(all_units)}")
    table.notes.append(
        f"a tutorial reports {TUTORIAL_MEAN_GATE} on average after training (most units carry); "
        f"test accuracy {init['accuracy']:.1f}% at init, {trained['accuracy']:.1f}% trained; "
        f"{r['parameters']:,} parameters"
    )
    agreement = payload.get("agreement")
    if agreement:
        table.notes.append(
            f"fused vs reference, same weights and batches: per-layer mean gates agree to "
            f"{agreement['layer_mean_init_max_rel_diff']:.1e} at init, {agreement['layer_mean_trained_max_rel_diff']:.1e}"
            " after training (relative)"
        )
    return [table]


def plot(payload: dict[str, Any], path: Path) -> None:
    """As Srivastava et al.'s Figure 2: gate biases, mean gate per unit, one image's gates (layer x unit maps,
    after training), and the per-layer mean gate at init and after training."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    impl = payload["implementations"][0]
    r = payload["results"][impl]
    trained = r["trained"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), constrained_layout=True)
    maps = (
        (trained["gate_bias"], "transform gate biases", "coolwarm", None),
        (trained["unit_mean"], "mean transform gate T", "viridis", (0, 1)),
        (trained["sample_gates"], "T for one test image", "viridis", (0, 1)),
    )
    depth, hidden = len(trained["unit_mean"]), len(trained["unit_mean"][0])
    for ax, (values, title, cmap, limits) in zip(axes, maps):
        kwargs = {"vmin": limits[0], "vmax": limits[1]} if limits else {}
        extent = (0.5, hidden + 0.5, depth + 0.5, 0.5)  # layer 1 at the top, as in the table
        image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", extent=extent, **kwargs)
        ax.set_title(title)
        ax.set_xlabel("unit")
        ax.set_ylabel("layer (1 = nearest the input)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax)
    ax = axes[3]
    layers = range(1, len(trained["layer_mean"]) + 1)
    ax.plot(layers, r["init"]["layer_mean"], "o--", label="init")
    ax.plot(layers, trained["layer_mean"], "o-", label="trained")
    ax.axhline(TUTORIAL_MEAN_GATE, color="grey", ls=":", label=f"tutorial mean {TUTORIAL_MEAN_GATE}")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean T")
    ax.set_title("mean transform gate per layer")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"highway gates ({impl}), after {payload['config']['epochs']} epochs on digits")
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``variants``: residual, dense and highway blocks side by side at equal width, then every registered model.

The three blocks at width w (fully connected; the BatchNorms are fusedres's fused ones):

* residual (skip: identity add): ``Linear(w, w) -> BN + ReLU -> Linear(w, w) -> BN + x -> ReLU``, bias-free
  linears: 2 w^2 weights, output width w.
* dense (skip: concatenation): 4 layers of growth k = w / 2, layer i: ``BN + ReLU`` over the concatenation of the
  input and the i previous outputs (``fusedres.nn.DenseBatchNormAct2d``, which never builds it; features as
  N x C x 1 x 1 maps) -> bias-free ``Linear(w + i k, k)`` (a 1x1 convolution); the output is the concatenation
  of all five: sum_i (w + i k) k = 4 w k + 6 k^2 weights, output width w + 4 k = 3 w.
* highway (skip: gated carry, coupled): ``fusedres.nn.Highway(w)``, a ``Linear(w, 2 w)`` packed as [transform |
  gate]: 2 w^2 weights + 2 w biases (the gate's bias is what makes it carry at first), output width w.

At w = 32 these give the tutorial's weight counts: residual 2,048, dense 3,584 with output 96, highway 2,048. The
table also counts what the modules hold besides the weights (BatchNorm scales and shifts, biases), and checks that
the fused block computes what the reference block computes from the same weights.

Then, for every model in ``fusedres.models.list_models()`` (or ``--models``): its parameter count (10 classes)
and the time of one training step (SGD, cross-entropy) on a small batch of random 3-channel images, fused vs
reference from the same weights: each warmed up, then ``--repeats`` rounds timing one step of each, alternating
which goes first; the medians are reported. These timings are indicative only (one step, a small batch, a
machine shared with other work), unlike every other number of the experiments.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.experiments._output import Table, progress, pyplot
from fusedres.experiments._setup import build_models, check_positive, resolve_config
from fusedres.nn import BatchNormAct1d, DenseBatchNormAct2d, Highway

NAME = "variants"
SUMMARY = "residual / dense / highway blocks at equal width; parameters and fused vs reference step time per model"
DEFAULT_IMPLEMENTATIONS = ("fused", "reference")
TUTORIAL_WIDTH = 32
TUTORIAL_PARAMS = {"residual": 2048, "dense": 3584, "highway": 2048}
TUTORIAL_DENSE_OUTPUT = 96
DENSE_LAYERS = 4


@dataclass(frozen=True)
class Config:
    """Sizes of one run (the command-line options of the same names)."""

    width: int = TUTORIAL_WIDTH
    models: tuple[str, ...] | None = None  # None: every registered model
    batch_size: int = 8
    image_size: int = 32
    repeats: int = 3


DEFAULT = Config()
TINY = Config(width=8, models=("resnet20", "plain20", "highway_mlp"), batch_size=2, image_size=8, repeats=1)


class ResidualBlock(nn.Module):
    """The residual block of the module docstring: Tensor[N, w] -> Tensor[N, w]."""

    def __init__(self, width: int, *, fused: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, width, bias=False)
        self.norm1 = BatchNormAct1d(width, activation="relu", fused=fused)
        self.linear2 = nn.Linear(width, width, bias=False)
        self.norm2 = BatchNormAct1d(width, activation="relu", fused=fused)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.linear2(self.norm1(self.linear1(x))), x)


class DenseBlock(nn.Module):
    """The dense block of the module docstring: Tensor[N, w] -> Tensor[N, w + layers * growth]."""

    def __init__(self, width: int, *, fused: bool, layers: int = DENSE_LAYERS, growth: int | None = None) -> None:
        super().__init__()
        growth = width // 2 if growth is None else growth
        self.norms = nn.ModuleList(
            DenseBatchNormAct2d(width + i * growth, activation="relu", fused=fused) for i in range(layers)
        )
        self.linears = nn.ModuleList(nn.Conv2d(width + i * growth, growth, 1, bias=False) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        maps = [x[:, :, None, None]]  # Tensor[N, C, 1, 1]: the fused dense BatchNorm reads a list of maps
        for norm, linear in zip(self.norms, self.linears):
            maps.append(linear(norm(maps)))
        return torch.cat(maps, 1).flatten(1)


# kind -> (builder(width, fused=...), skip type)
BLOCKS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "residual": (ResidualBlock, "identity add"),
    "dense": (DenseBlock, "concatenation"),
    "highway": (Highway, "gated carry (1 - T)"),
}


def weight_count(kind: str, width: int) -> int:
    """The weights of a block by the formulas of the module docstring (no BatchNorm parameters, no biases)."""
    if kind in ("residual", "highway"):
        return 2 * width * width
    if kind == "dense":
        k = width // 2
        return sum((width + i * k) * k for i in range(DENSE_LAYERS))
    raise ValueError(f"kind must be one of {list(BLOCKS)}, got {kind!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This experiment's options (each defaults to the preset's value)."""
    d = DEFAULT
    parser.add_argument("--width", type=int, help=f"block width, even (default {d.width})")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="registered models to time (default: all)")
    parser.add_argument("--batch-size", type=int, help=f"images per timed training step (default {d.batch_size})")
    parser.add_argument("--image-size", type=int, help=f"height = width of the images (default {d.image_size})")
    parser.add_argument("--repeats", type=int, help=f"timed rounds per model (default {d.repeats})")


def configure(args: argparse.Namespace) -> Config:
    """The resolved, checked configuration of ``args``."""
    config = resolve_config(args, DEFAULT, TINY)
    check_positive(config, "width", "batch_size", "image_size", "repeats")
    if config.width % 2:
        raise ValueError(f"--width must be even (the dense block grows by width / 2), got {config.width}")
    if config.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2 (BatchNorm needs 2 samples), got {config.batch_size}")
    if config.models is not None:
        from fusedres.models import list_models

        unknown = [m for m in config.models if m not in list_models()]
        if unknown:
            raise ValueError(f"--models must be registered models {list_models()}, got unknown {unknown}")
    return config


def _block_records(config: Config, impls: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
    x = torch.randn(16, config.width, generator=torch.Generator().manual_seed(seed))
    records = []
    for kind, (block, skip) in BLOCKS.items():
        models = build_models(lambda fused, block=block: block(config.width, fused=fused), impls, seed)
        outputs = {impl: m.train()(x) for impl, m in models.items()}
        first = next(iter(models.values()))
        out = next(iter(outputs.values()))
        record = {
            "kind": kind,
            "skip": skip,
            "output_width": out.shape[1],
            "weights": sum(
                p.numel() for name, p in first.named_parameters() if name.endswith("weight") and p.dim() > 1
            ),
            "weights_formula": weight_count(kind, config.width),
            "parameters": sum(p.numel() for p in first.parameters()),
        }
        if len(outputs) == 2:
            a, b = outputs.values()
            record["fused_vs_reference_max_abs_diff"] = (a - b).abs().max().item()
        records.append(record)
    return records


def _model_kwargs(name: str, config: Config) -> dict[str, Any] | str:
    """The builder arguments for ``name`` (10 classes, images 3 x image_size^2), or why it cannot be built."""
    from fusedres.models import get_model_builder

    kwargs: dict[str, Any] = {"num_classes": 10}
    if name == "highway_mlp":  # a fully connected model: it takes the flattened images
        kwargs.update(in_features=3 * config.image_size**2, hidden=256, depth=10)
    params = inspect.signature(get_model_builder(name)).parameters
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        return f"its builder needs arguments this experiment does not know how to choose: {missing}"
    return kwargs


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(seconds, loss) of one training step."""
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start, loss.item()


def _model_record(name: str, config: Config, impls: tuple[str, ...], seed: int) -> tuple[dict, dict | None]:
    """(deterministic record, timing record or None) of one registered model."""
    from fusedres.models import get_model

    kwargs = _model_kwargs(name, config)
    if isinstance(kwargs, str):
        return {"model": name, "skipped": kwargs}, None
    models = build_models(lambda fused: get_model(name, fused=fused, **kwargs), impls, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=generator)
    y = torch.randint(0, 10, (config.batch_size,), generator=generator)
    optimizers = {impl: torch.optim.SGD(m.parameters(), lr=0.01) for impl, m in models.items()}
    record: dict[str, Any] = {
        "model": name,
        "parameters": sum(p.numel() for p in next(iter(models.values())).parameters()),
        "first_step_loss": {},
    }
    if len(impls) == 2:  # the judge of the two float32 losses: the reference in float64, same weights and batch
        with torch.no_grad():
            exact = copy.deepcopy(models["reference"]).double().train()
            record["first_step_loss"]["float64"] = nn.functional.cross_entropy(exact(x.double()), y).item()
        del exact
    for impl, model in models.items():  # the warm-up step: also the first, deterministic, loss
        model.train()
        record["first_step_loss"][impl] = _step(model, optimizers[impl], x, y)[1]
    if len(impls) == 2:
        losses = record["first_step_loss"]
        record["first_step_loss_abs_diff"] = abs(losses["fused"] - losses["reference"])
        record["first_step_loss_rel_error"] = {
            impl: abs(losses[impl] - losses["float64"]) / abs(losses["float64"]) for impl in impls
        }
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_ in range(config.repeats):
        order = list(impls) if round_ % 2 == 0 else list(reversed(impls))
        for impl in order:
            seconds[impl].append(_step(models[impl], optimizers[impl], x, y)[0])
    timing = {"model": name, "step_ms": {impl: 1e3 * statistics.median(s) for impl, s in seconds.items()}}
    if len(impls) == 2:
        timing["speedup"] = statistics.median(r / f for f, r in zip(seconds["fused"], seconds["reference"]))
    return record, timing


def run(config: Config, impls: tuple[str, ...], seed: int, show_progress: bool) -> dict[str, Any]:
    """The three blocks, then every model.

    Returns:
        {"results": {"blocks": [...], "models": [...]}, "agreement": {...} or None, "timing": {"models": [...]}}:
        results are deterministic (parameters, output widths, first-step losses, with both implementations also the
        float64 reference's loss and each float32 loss's relative error against it); timings are not.
    """
    from fusedres.models import list_models

    names = list(config.models) if config.models is not None else list_models()
    blocks = _block_records(config, impls, seed)
    models, timings = [], []
    with progress(len(names), NAME, show_progress) as bar:
        for name in names:
            bar.describe(f"{NAME} {name}")
            record, timing = _model_record(name, config, impls, seed)
            models.append(record)
            if timing is not None:
                timings.append(timing)
            bar.update(1)
    agreement = None
    if len(impls) == 2:
        agreement = {
            "block_output_max_abs_diff": max(b["fused_vs_reference_max_abs_diff"] for b in blocks),
            "first_step_loss_max_abs_diff": max(
                (m["first_step_loss_abs_diff"] for m in models if "first_step_loss_abs_diff" in m), default=0.0
            ),
            "first_step_loss_max_rel_error_vs_float64": {
                impl: max(
                    (m["first_step_loss_rel_error"][impl] for m in models if "first_step_loss_rel_error" in m),
                    default=0.0,
                )
                for impl in impls
            },
        }
    return {"results": {"blocks": blocks, "models": models}, "agreement": agreement, "timing": {"models": timings}}


def tables(payload: dict[str, Any]) -> list[Table]:
    """The blocks beside the tutorial's counts, then parameters and step times per model."""
    cfg = payload["config"]
    both = len(payload["implementations"]) == 2
    blocks = Table(
        f"variants: blocks at width {cfg['width']} (fully connected; tutorial figures are for width {TUTORIAL_WIDTH})",
        ["block", "skip", "output width", "weights", "tutorial", "parameters as built", "fused vs reference"],
    )
    for b in payload["results"]["blocks"]:
        tutorial = TUTORIAL_PARAMS[b["kind"]] if cfg["width"] == TUTORIAL_WIDTH else None
        if b["kind"] == "dense" and tutorial is not None:
            tutorial = f"{tutorial:,} (output {TUTORIAL_DENSE_OUTPUT})"
        blocks.add(
            b["kind"],
            b["skip"],
            b["output_width"],
            b["weights"],
            tutorial,
            b["parameters"],
            f"{b['fused_vs_reference_max_abs_diff']:.1e}" if both else None,
        )
    blocks.notes.append(
        "weights: the linear layers' weight matrices (the tutorial's count); parameters as built add the BatchNorm "
        "scales and shifts (residual, dense) or the biases (highway); fused vs reference: max |output difference|"
    )
    timing = {t["model"]: t for t in (payload.get("timing") or {}).get("models", [])}
    columns = ["model", "parameters", *(f"{impl} step (ms)" for impl in payload["implementations"])]
    models = Table(
        f"variants: every model, one training step of {cfg['batch_size']} images 3x{cfg['image_size']}x"
        f"{cfg['image_size']} (median of {cfg['repeats']}; indicative timings)",
        columns + (["speedup", "loss: fused vs float64", "reference vs float64"] if both else []),
    )
    for m in payload["results"]["models"]:
        if "skipped" in m:
            models.add(m["model"], f"skipped: {m['skipped']}", *([None] * (len(models.columns) - 2)))
            continue
        t = timing.get(m["model"], {"step_ms": {}})
        row = [m["model"], m["parameters"], *(t["step_ms"].get(impl) for impl in payload["implementations"])]
        if both:
            errors = m["first_step_loss_rel_error"]
            row += [
                f"{t['speedup']:.2f}x" if "speedup" in t else None,
                f"{errors['fused']:.1e}",
                f"{errors['reference']:.1e}",
            ]
        models.add(*row)
    models.notes.append(
        "speedup: median over rounds of reference / fused step time; timings are taken on a shared machine from "
        "one small step each and are indicative only"
    )
    if both:
        models.notes.append(
            "loss vs float64: relative error of the first step's loss (same weights, same batch) against the "
            "reference model run in float64"
        )
    return [blocks, models]


def plot(payload: dict[str, Any], path: Path) -> None:
    """Left: weights and parameters of the three blocks (output widths annotated). Right: per-model speedup
    (or step time with a single implementation), indicative."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, max(4.5, 0.22 * len(payload["results"]["models"]) + 1.5)), constrained_layout=True
    )
    blocks = payload["results"]["blocks"]
    xs = range(len(blocks))
    left.bar([x - 0.2 for x in xs], [b["weights"] for b in blocks], width=0.4, label="weights")
    left.bar([x + 0.2 for x in xs], [b["parameters"] for b in blocks], width=0.4, label="parameters as built")
    for x, b in zip(xs, blocks):
        left.annotate(f"out {b['output_width']}", (x, b["parameters"]), ha="center", va="bottom", fontsize=9)
    left.set_xticks(list(xs), [f"{b['kind']}\n({b['skip']})" for b in blocks])
    left.set_ylabel("count")
    left.set_title(f"blocks at width {payload['config']['width']}")
    left.legend(fontsize=8)
    timings = (payload.get("timing") or {}).get("models", [])
    names = [t["model"] for t in timings]
    if len(payload["implementations"]) == 2:
        right.barh(names, [t["speedup"] for t in timings])
        right.axvline(1.0, color="grey", lw=0.8)
        right.set_xlabel("training-step speedup, reference / fused (indicative)")
    else:
        impl = payload["implementations"][0]
        right.barh(names, [t["step_ms"][impl] for t in timings])
        right.set_xscale("log")
        right.set_xlabel(f"{impl} training-step time, ms (indicative)")
    right.invert_yaxis()
    right.set_title(f"models, batch {payload['config']['batch_size']}, {payload['config']['image_size']}px")
    fig.savefig(path, dpi=110)
    plt.close(fig)

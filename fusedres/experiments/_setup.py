"""What the experiments share besides their output: options, presets, implementations, seeds and data.

Every experiment runs the fused models, the pure-PyTorch reference models (``--reference``) or both from the same
weights on the same data (``--compare``). Everything random comes from ``--seed``: the weights
(``torch.manual_seed(seed)`` right before a model is built) and the data order (a ``torch.Generator`` seeded from
it), so the same command gives the same numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMPLEMENTATIONS",
    "add_common_arguments",
    "build_models",
    "check_positive",
    "digits_features",
    "epoch_indices",
    "implementations",
    "max_relative_difference",
    "resolve_config",
]

IMPLEMENTATIONS = ("fused", "reference")
DEFAULT_OUT = "fusedres-experiments"
_C = TypeVar("_C")


def add_common_arguments(parser: argparse.ArgumentParser, default_implementations: Sequence[str]) -> None:
    """The options every experiment takes: output folder, seed, implementations, threads, progress, presets."""
    default = "both" if len(default_implementations) == 2 else default_implementations[0]
    parser.add_argument(
        "--out", metavar="DIR", default=DEFAULT_OUT, help=f"where NAME.json and NAME.png go (default {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the data order (default 0)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--fused", dest="implementations", action="store_const", const=("fused",), help="run the fused models"
    )
    which.add_argument(
        "--reference",
        dest="implementations",
        action="store_const",
        const=("reference",),
        help="run the pure-PyTorch reference models",
    )
    which.add_argument(
        "--compare",
        dest="implementations",
        action="store_const",
        const=IMPLEMENTATIONS,
        help=f"run both from the same weights on the same data and report how far they agree (default: {default})",
    )
    parser.set_defaults(implementations=tuple(default_implementations))
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is no terminal)")
    parser.add_argument("--no-plot", action="store_true", help="write the table and the JSON file only")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    # The test-suite preset: every size small enough for the whole experiment to run in seconds.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def resolve_config(args: argparse.Namespace, default: _C, tiny: _C) -> _C:
    """The preset (``tiny`` with --tiny, else ``default``) with every option given on the command line applied.

    The experiment's own options have the dataclass's field names as ``dest`` and ``None`` as their default.
    """
    preset = tiny if args.tiny else default
    given = {}
    for f in dataclasses.fields(preset):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(preset, **given)  # type: ignore[type-var]


def check_positive(config: Any, *names: str, allow_zero: Sequence[str] = ()) -> None:
    """ValueError naming the option when a field (an int or float, or each entry of a tuple) is not > 0
    (>= 0 for the fields in ``allow_zero``)."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        floor_ok = name in allow_zero
        if not values or any(not (v >= 0 if floor_ok else v > 0) for v in values):
            want = "non-negative" if floor_ok else "positive"
            raise ValueError(f"--{name.replace('_', '-')} must be {want}, got {value!r}")


def implementations(args: argparse.Namespace) -> tuple[str, ...]:
    """("fused",), ("reference",) or ("fused", "reference") from --fused / --reference / --compare."""
    return tuple(args.implementations)


def build_models(build: Callable[[bool], nn.Module], impls: Sequence[str], seed: int) -> dict[str, nn.Module]:
    """One model per implementation, all with the weights that ``torch.manual_seed(seed)`` gives.

    Args:
        build: ``build(fused)`` returns a fresh model.
        impls: names from :data:`IMPLEMENTATIONS`.
        seed: seeds the initialisation.

    Returns:
        {implementation: model}; the second model is loaded with the first's state_dict (strict), so both start
        from the same weights even if their constructors consumed the random stream differently.
    """
    models: dict[str, nn.Module] = {}
    for impl in impls:
        torch.manual_seed(seed)
        model = build(impl == "fused")
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict(), strict=True)
        models[impl] = model
    return models


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / max(|a_i|, |b_i|) (0 where both are 0): how far two lists of measurements agree."""
    if len(a) != len(b):
        raise ValueError(f"the two lists must have the same length, got {len(a)} and {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(abs(x), abs(y))
        if scale > 0:
            worst = max(worst, abs(x - y) / scale)
        elif math.isnan(x) or math.isnan(y):
            return math.nan
    return worst


@functools.cache
def digits_features() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """scikit-learn's digits as 64-feature vectors: ((train x, y), (test x, y)), the split of fusedres.data.

    The 3x32x32 images of :func:`fusedres.data.load_digits` are averaged back to 8x8 (one channel), flattened and
    standardised with the training set's mean and standard deviation (one scalar each).

    Returns:
        x: Tensor[N, 64] float32; y: Tensor[N] int64 in [0, 10). Cached: treat as read-only.
    """
    from fusedres.data import load_digits

    data = load_digits()

    def features(images: Tensor) -> Tensor:
        return F.avg_pool2d(images[:, :1].float(), 4).flatten(1)

    train, test = features(data.train.images), features(data.test.images)
    mean, std = train.mean(), train.std()
    return ((train - mean) / std, data.train.labels), ((test - mean) / std, data.test.labels)


def epoch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """The index batches of one shuffled epoch over n samples (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)

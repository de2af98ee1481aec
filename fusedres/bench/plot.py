"""``python -m fusedres bench --plot PATH``: a PNG of the report (matplotlib, the optional extra ``fusedres[cli]``).

Three panels: the speedup of every op row (reference/fused and compiled/fused, medians of per-round ratios with
their inter-quartile range as error bars; 1.0 marked), the training-step speedup per model, and the peak memory of
one training step per model (fused vs reference). A figure that was not measured is left out of its panel, never
drawn as zero; a panel with nothing to show says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["op_bars", "plot_report", "require_matplotlib"]

_RATIOS = (("reference/fused", "eager / fused"), ("compiled/fused", "torch.compile / fused"))


def require_matplotlib() -> Callable[[dict[str, Any], str], None]:
    """``plot_report`` when matplotlib is importable; SystemExit naming the fix otherwise."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"--plot needs matplotlib ({exc}): pip install matplotlib (or pip install 'fusedres[cli]')"
        ) from None
    return plot_report


def _op_label(section: str, row: dict[str, Any]) -> str:
    parts = [section, "x".join(map(str, row["shape"]))]
    if row.get("op") not in (None, section):  # a section over several ops (overhead) names the row's
        parts.insert(1, row["op"])
    if "layout" in row:
        parts.append("nhwc" if row["layout"] == "channels_last" else row["layout"])
    if "residual" in row:
        parts.append("res" if row["residual"] else "")
    if "form" in row:
        parts.append(row["form"])
    parts.append(row["direction"])
    return " ".join(p for p in parts if p)


def op_bars(report: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float] | None]]]:
    """(label, {ratio name: stats or None}) of every op row of every op section in the report."""
    out = []
    for name, status in report.get("sections", {}).items():
        rows = report.get(name) if status.get("available") else None
        for row in rows or []:
            if isinstance(row, dict) and "ratios" in row and "shape" in row:
                out.append((_op_label(name, row), {k: row["ratios"].get(k) for k, _ in _RATIOS}))
    return out


def _hbars(ax: Any, labels: list[str], series: list[tuple[str, list[Any]]], xlabel: str, ratio: bool) -> None:
    """Grouped horizontal bars; each series value is a number, a stats dict (median, q25, q75) or None (omitted)."""
    import numpy as np

    y = np.arange(len(labels))
    height = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series):
        idx = [j for j, v in enumerate(values) if v is not None]
        if not idx:
            continue
        med = [values[j]["median"] if isinstance(values[j], dict) else values[j] for j in idx]
        pos = y[idx] - 0.4 + height * (i + 0.5)
        err = None
        if all(isinstance(values[j], dict) for j in idx):
            err = [
                [m - values[j]["q25"] for m, j in zip(med, idx)],
                [values[j]["q75"] - m for m, j in zip(med, idx)],
            ]
        if ratio:  # from 1.0 to the ratio: a speedup grows to the right, a slowdown to the left
            ax.barh(pos, [m - 1.0 for m in med], left=1.0, height=height, xerr=err, label=name, capsize=2)
        else:
            ax.barh(pos, med, height=height, xerr=err, label=name, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if ratio:  # ratios span 0.3x to 20x: a log axis shows 0.5x and 2x equally far from 1
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, 0.5), max(hi, 2.0)
        ax.set_xlim(lo, hi)
        ticks = [2.0**k for k in range(-4, 9) if lo <= 2.0**k <= hi]
        ax.set_xticks(ticks, [f"{t:.3g}x" for t in ticks])
        ax.minorticks_off()
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)


def plot_report(report: dict[str, Any], path: str) -> None:
    """Writes the PNG of ``report`` (the --json report's dict) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = op_bars(report)
    models = (report.get("models") or {}).get("rows") or []
    heights = [0.8 + 0.22 * max(len(ops), 3), 1.0 + 0.4 * max(len(models), 2), 1.0 + 0.4 * max(len(models), 2)]
    fig, axes = plt.subplots(3, 1, figsize=(10, 1.0 + sum(heights)), gridspec_kw={"height_ratios": heights})
    machine = report.get("machine", {})
    fig.suptitle(
        f"fusedres bench: {machine.get('cpu_model', '?')}, {machine.get('torch_threads', '?')} threads, "
        f"torch {machine.get('torch_version', '?')}, device {machine.get('device', '?')}",
        fontsize=9,
    )

    ax = axes[0]
    if ops:
        _hbars(
            ax,
            [label for label, _ in ops],
            [(text, [r[key] for _, r in ops]) for key, text in _RATIOS],
            "speedup of fused (median of per-round ratios, IQR bars; > 1: fused is faster)",
            ratio=True,
        )
        ax.set_title("ops", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no op rows in this report", ha="center", va="center")
        ax.set_axis_off()

    labels = [
        f"{r['model_name']} {r['memory_format'].replace('contiguous', 'nchw')} (batch {r['batch']})" for r in models
    ]
    ax = axes[1]
    if any(r["ratios"][k] is not None for r in models for k, _ in _RATIOS):
        _hbars(
            ax,
            labels,
            [(text, [r["ratios"][key] for r in models]) for key, text in _RATIOS],
            "training-step speedup of fused (median of per-round ratios, IQR bars)",
            ratio=True,
        )
        ax.set_title("models: time", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no model step was timed", ha="center", va="center")
        ax.set_axis_off()

    ax = axes[2]
    if any(r["peak_mb"][k] is not None for r in models for k in ("fused", "reference")):
        _hbars(
            ax,
            labels,
            [(name, [r["peak_mb"][name] for r in models]) for name in ("fused", "reference")],
            "peak memory of one training step, MB (fresh process per configuration: peak RSS - RSS before the step)",
            ratio=False,
        )
        ax.set_title("models: memory", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no peak memory was measured", ha="center", va="center")
        ax.set_axis_off()

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The one table renderer of ``fusedres bench``: every section (bn_act, highway, dense, the models) is a list of
:class:`Column` over its rows, rendered by :func:`render_table`, with the cell formats shared here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "OTHER_CPU",
    "PCT_COPY",
    "TIMES",
    "Column",
    "field",
    "fmt_bytes_mb",
    "fmt_gbps",
    "fmt_load",
    "fmt_mb",
    "fmt_ms",
    "fmt_pct",
    "fmt_ratio",
    "fmt_us",
    "gbps",
    "ms",
    "ratio",
    "render_table",
    "saved_mb",
    "shape",
]


class Column(NamedTuple):
    """One column: its header, the text of its cell in a row, and whether it is left-aligned (numbers are not)."""

    head: str
    cell: Callable[[dict[str, Any]], str]
    left: bool = False


def render_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """The aligned plain-text table: header, a rule, one line per row."""
    head = [c.head for c in columns]
    body = [[c.cell(row) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(columns))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if col.left else cell.rjust(w) for col, cell, w in zip(columns, cells, widths, strict=True)
        )

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fmt_us(v: float | None) -> str:
    """Microseconds (per-call overheads: a few to a few hundred)."""
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_ratio(r: dict[str, float] | None) -> str:
    """A ratio's median and inter-quartile range: ``1.23x [1.20-1.27]``."""
    if r is None:
        return "-"
    return f"{r['median']:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]"


def fmt_bytes_mb(v: int | None) -> str:
    """Bytes as MB with two decimals (saved-for-backward figures: a few MB)."""
    return "-" if v is None else f"{v / 1e6:.2f}"


def fmt_mb(v: float | None) -> str:
    """A figure already in MB (peak memory: tens to thousands)."""
    return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def fmt_gbps(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def fmt_load(row: dict[str, Any]) -> str:
    """The row's "other CPU" cell: other processes' share of the CPUs while it was timed."""
    return fmt_pct(row["load"]["other_cpu_pct"])


# The columns the sections share: a figure of one implementation or ratio, read from the row's JSON entries.


def field(head: str, key: str) -> Column:
    """A configuration value of the row (``row[key]``), left-aligned."""
    return Column(head, lambda row: str(row[key]), left=True)


def shape(head: str = "shape") -> Column:
    return Column(head, lambda row: "x".join(map(str, row["shape"])), left=True)


def ms(head: str, impl: str) -> Column:
    """The median time of ``impl`` in ms."""
    return Column(head, lambda row: fmt_ms(row["times_ms"][impl]))


def ratio(head: str, key: str) -> Column:
    """A ratio (e.g. "reference/fused") with its inter-quartile range."""
    return Column(head, lambda row: fmt_ratio(row["ratios"][key]))


def gbps(head: str, impl: str) -> Column:
    return Column(head, lambda row: fmt_gbps(row["gbps"][impl]))


def saved_mb(impls: tuple[str, ...] = ("fused", "reference", "compiled")) -> Column:
    """Bytes saved for backward by each of ``impls``, in MB, slash-separated."""
    return Column("saved MB f/r/c", lambda row: "/".join(fmt_bytes_mb(row["saved_bytes"][n]) for n in impls))


# fused, eager reference and torch.compile(reference): times and ratios, as most tables show them.
TIMES = (
    ms("fused ms", "fused"),
    ms("ref ms", "reference"),
    ms("compile ms", "compiled"),
    ratio("ref/fused [IQR]", "reference/fused"),
    ratio("compile/fused [IQR]", "compiled/fused"),
)
PCT_COPY = Column("%copy", lambda row: fmt_pct(row["pct_copy_bandwidth"]["fused"]))
OTHER_CPU = Column("other CPU", fmt_load)

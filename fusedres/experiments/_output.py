"""What every experiment writes: a printed table, a JSON file, a PNG plot, and a progress bar while it runs.

matplotlib and tqdm are optional dependencies (``pip install 'fusedres[cli]'``), imported on first use:
without matplotlib the plot step fails with a message that says so (``--no-plot`` skips it), without tqdm
there is simply no progress bar.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Progress", "Table", "format_number", "progress", "pyplot", "write_json"]


def format_number(value: Any, digits: int = 3) -> str:
    """A table cell: ints with thousands separators, floats with ``digits`` significant digits, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1e6 or magnitude < 1e-3:
        return f"{value:.{digits - 1}e}"
    if magnitude >= 10**digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


@dataclass
class Table:
    """A titled text table; cells are formatted with :func:`format_number`.

    Attributes:
        title: printed above the table.
        columns: header cells.
        rows: one list of values per row (as many as ``columns``).
        notes: lines printed under the table.
    """

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        """Appends a row; ValueError when it does not have one value per column."""
        if len(values) != len(self.columns):
            raise ValueError(f"a row of {self.title!r} must have {len(self.columns)} values, got {len(values)}")
        self.rows.append(values)

    def render(self) -> str:
        """The table as text: the first column left-aligned, the others right-aligned."""
        cells = [list(self.columns)] + [[format_number(v) for v in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]

        def line(row: list[str]) -> str:
            first = row[0].ljust(widths[0])
            return "  ".join([first] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()

        out = [self.title, line(cells[0]), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in cells[1:]]
        out += self.notes
        return "\n".join(out)

    def as_markdown(self) -> str:
        """The table as GitHub markdown: the title in bold, the notes as lines under it."""
        rows = [list(self.columns)] + [[format_number(v) for v in row] for row in self.rows]
        out = [f"**{self.title}**", "", "| " + " | ".join(rows[0]) + " |"]
        out += ["|" + "|".join([":---"] + ["---:"] * (len(self.columns) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        if self.notes:
            out += [""] + [f"{note}  " for note in self.notes]
        return "\n".join(out)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON (NaN/inf refused: the files are meant for other tools)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend; ModuleNotFoundError saying what to do without it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ModuleNotFoundError(
            f"the experiment plots need matplotlib, which is not installed ({e}): `pip install matplotlib` (or "
            "`pip install 'fusedres[cli]'`), or pass --no-plot to write only the table and the JSON file",
            name="matplotlib",
        ) from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class Progress:
    """A tqdm bar on stderr counting ``total`` units of work; a silent counter when disabled or without tqdm.

    Args:
        total: units of work (training steps, models, ...).
        desc: the bar's label.
        enabled: False (``--quiet``) shows nothing; True shows the bar when stderr is a terminal.
    """

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances the bar by n units and shows ``postfix`` (e.g. loss=...) beside it."""
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def describe(self, desc: str) -> None:
        """Changes the bar's label (the model or configuration now running)."""
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        """Removes the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator[Progress]:
    """A :class:`Progress` closed on exit, also when the experiment fails."""
    bar = Progress(total, desc, enabled)
    try:
        yield bar
    finally:
        bar.close()

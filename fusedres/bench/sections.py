"""The op sections of ``fusedres bench``, in one table: adding an op to the report is one line of OP_SECTIONS.

A section is a module of this package with

* ``TITLE``: the line above its table;
* ``METHOD``: how its figures are counted, e.g. {"gbps": its GB/s, "saved_bytes": its saved-for-backward bytes}
  (only the figures it has); printed under its table and written to the --json report's ``method.<name>``;
* ``COLUMNS``: its table (:class:`fusedres.bench.table.Column`), rendered by :func:`fusedres.bench.table.render_table`;
* ``configuration(settings) -> dict``: what it measures under these settings (the --json report's
  ``settings.op_sections.<name>``);
* ``run(settings, copy_gbps) -> list[row]``: its rows (the --json report's ``<name>``);
* ``notes(rows) -> list[str]``: its own lines under the table (what its columns mean).

A section whose module does not exist (or fails to import) is reported as not available; the others still run.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["OP_SECTIONS", "OpSection"]


class OpSection(NamedTuple):
    """One op section: its name (its key in the --json report) and its module."""

    name: str
    module: str


OP_SECTIONS: tuple[OpSection, ...] = (
    OpSection("bn_act", "fusedres.bench.bn_act"),
    OpSection("highway", "fusedres.bench.highway"),
    OpSection("dense", "fusedres.bench.dense"),
    OpSection("block_end", "fusedres.bench.block_end"),
    OpSection("overhead", "fusedres.bench.overhead"),
)

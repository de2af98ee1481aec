#!/usr/bin/env python3
"""Per-kernel register / shared memory / stack / spill figures from `ptxas -v` output, and a no-spill check.

setup.py passes -Xptxas=-v to nvcc and the Makefile writes pip's verbose build output to build.log, so:

    python tools/ptxas_report.py build.log             # table; exit 1 on any spill or local memory use
    python tools/ptxas_report.py --markdown build.log  # the same table as Markdown (docs/cuda-resources.md)

Fails (exit 1) when a function spills registers (spill stores/loads > 0) or uses local memory (a stack frame or
lmem > 0), which ptxas only reports, and when the log says CUDA was built but holds a ptxas error. A log without
ptxas output (CPU-only build, or an incremental build that recompiled no .cu) is reported and passes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\w+)' for '(sm_\w+)'")
PROPS = re.compile(r"ptxas info\s*: Function properties for (\w+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(.*)")


@dataclass
class Function:
    mangled: str
    arch: str
    entry: bool
    registers: int = -1
    smem: int = 0
    lmem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    def bad(self) -> list[str]:
        why = []
        if self.spill_stores or self.spill_loads:
            why.append(f"spills ({self.spill_stores} B stores, {self.spill_loads} B loads)")
        if self.stack or self.lmem:
            why.append(f"local memory ({self.stack} B stack frame, {self.lmem} B lmem)")
        return why


def parse(lines: list[str]) -> list[Function]:
    """Functions in order of appearance; each (mangled name, arch) once (the last figures win)."""
    funcs: dict[tuple[str, str], Function] = {}
    arch = "?"
    current: Function | None = None
    for line in lines:
        if m := ENTRY.search(line):
            arch = m.group(2)
            current = funcs.setdefault((m.group(1), arch), Function(m.group(1), arch, True))
        elif m := PROPS.search(line):
            key = (m.group(1), arch)
            if key not in funcs:  # a non-inlined device function (its own stack frame and spills)
                funcs[key] = Function(m.group(1), arch, False)
            current = funcs[key]
        elif (m := FRAME.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            rest = m.group(2)
            if s := re.search(r"(\d+) bytes smem", rest):
                current.smem = int(s.group(1))
            if s := re.search(r"(\d+) bytes lmem", rest):
                current.lmem = int(s.group(1))
    return list(funcs.values())


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names: c++filt (when installed) without the namespace, return type and parameters."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    out = names
    if tool and names:
        try:
            res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
            out = res.stdout.splitlines()
        except (OSError, subprocess.CalledProcessError):
            out = names
    short = {}
    for mangled, pretty in zip(names, out):
        p = re.sub(r"^void ", "", pretty)
        p = p.replace("fusedres::gpu::", "").replace("(anonymous namespace)::", "")
        depth = 0
        for i, ch in enumerate(p):  # drop the parameter list: the first '(' outside template brackets
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                p = p[:i]
                break
        short[mangled] = p.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return short


def table(funcs: list[Function], markdown: bool) -> str:
    names = demangle([f.mangled for f in funcs])
    head = ("kernel", "arch", "regs", "smem B", "stack B", "spill st/ld B")
    rows = [
        (
            names[f.mangled] + ("" if f.entry else " (device function)"),
            f.arch,
            str(f.registers),
            str(f.smem),
            str(f.stack + f.lmem),
            f"{f.spill_stores}/{f.spill_loads}",
        )
        for f in sorted(funcs, key=lambda f: (names[f.mangled], f.arch))
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="build log with ptxas -v output (pip install -v ... > build.log)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as fh:
        lines = fh.read().splitlines()
    funcs = parse(lines)
    if not funcs:
        print(f"ptxas_report: no ptxas -v output in {args.log} (CPU-only build, or no .cu was recompiled)")
        return 0
    print(table(funcs, args.markdown))
    entries = sum(f.entry for f in funcs)
    bad = [(f, why) for f in funcs for why in [f.bad()] if why]
    if bad:
        names = demangle([f.mangled for f, _ in bad])
        for f, why in bad:
            print(f"ptxas_report: ERROR {names[f.mangled]} [{f.arch}]: {', '.join(why)}", file=sys.stderr)
        return 1
    print(f"ptxas_report: {entries} kernel builds, no spills, no local memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Hot-loop figures of every CUDA kernel from its SASS: instructions per element and global load widths.

No GPU needed: each csrc/cuda/*.cu is compiled for one architecture (default sm_90) with the flags of setup.py
(`nvcc -cubin`, device code only, one file at a time; cubins cached under build/sass_cache by a hash of the
compiler, flags and every csrc file), or an existing cubin / object / .so is read, and `cuobjdump -sass` lists
the machine code.

    python tools/sass_report.py                      # table of every kernel in csrc/cuda/*.cu (sm_90)
    python tools/sass_report.py csrc/cuda/highway.cu # one source file
    python tools/sass_report.py --binary fusedres/_C.cpython-311-x86_64-linux-gnu.so
    python tools/sass_report.py --markdown           # the table for docs/cuda-resources.md
    python tools/sass_report.py --check              # exit 1 when a kernel's instructions/element grew more
                                                     # than --margin (default 10 %) over tools/sass_baseline.json
    python tools/sass_report.py --write-baseline     # record today's figures as the baseline

The hot loop (heuristic, see find_hot_loop): a loop is the address range [target, branch] of a backward branch
(`BRA` to a lower address; the branch-to-self that ends every function is not a loop). The hot loop is the loop
that executes global loads (LDG, or generic LD) and contains no other such loop, i.e. the innermost loop that
touches memory; where several qualify (a vector main loop and a scalar tail, or a kernel's two layouts), the one
that loads the most bytes wins, ties broken by size. Its instruction count is static: every instruction
between the loop head and the back edge, all paths of a runtime switch included (a kernel with an activation
switch in the loop counts every activation's code), and none of a called subroutine (CALL, e.g. the slow path of
a double division).

Elements per iteration are derived, not declared: the loop's global load bytes divided by the bytes one element
costs the loop (KERNEL_OPERANDS below: which operands the kernel's loop body reads per element, each at its
storage width, a per-channel parameter at the accumulation width, a mask word at 4 bytes). A loop that loads a
128-bit vector of x reads 16 bytes for 4 float elements, so the figure follows the real load width. The derived
count is a model: it assumes every operand the body can read appears in the static loop (they do: the runtime
conditions are branches inside it) and that per-element parameter loads are not hoisted; a non-integer result is
flagged with '~'. Instructions per element = hot-loop instructions / elements per iteration.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "tools", "sass_baseline.json")
CACHE = os.path.join(ROOT, "build", "sass_cache")

# One SASS line of cuobjdump: "        /*0090*/               @P0 EXIT ;   /* 0x000000000000094d */".
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
ELEM_BYTES = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}


@dataclass
class Instr:
    addr: int
    pred: str  # "@P0", "@!P1" or ""
    op: str  # opcode with modifiers: "LDG.E.128.CONSTANT"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Loop:
    head: int  # address of the first instruction (the branch target)
    end: int  # address of the last back edge
    instrs: list[Instr] = field(default_factory=list)

    def contains(self, other: Loop) -> bool:
        return self.head <= other.head and other.end <= self.end and (self.head, self.end) != (other.head, other.end)


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Mangled function name -> its instructions in address order."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        if m := FUNC.match(line):
            current = funcs.setdefault(m.group(1), [])
        elif current is not None and (m := INSTR.match(line)):
            body = m.group(2).strip()
            pred = ""
            if body.startswith("@"):
                pred, _, body = body.partition(" ")
            op, _, args = body.strip().partition(" ")
            current.append(Instr(int(m.group(1), 16), pred, op, args.strip()))
    return funcs


def branch_target(ins: Instr) -> int | None:
    if ins.base not in ("BRA", "JMP", "BRX"):
        return None
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if m else None


def global_load_bits(ins: Instr) -> int | None:
    """Width in bits of a global (LDG) or generic (LD) load; None for any other instruction."""
    if ins.base not in ("LDG", "LD"):
        return None
    mods = ins.op.split(".")[1:]
    for width in ("256", "128", "64"):
        if width in mods:
            return int(width)
    if {"U8", "S8"} & set(mods):
        return 8
    if {"U16", "S16"} & set(mods):
        return 16
    return 32


def is_global_store(ins: Instr) -> bool:
    return ins.base in ("STG", "ST")


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every loop: a backward branch's [target, branch]; back edges to one head merge into one loop."""
    ends: dict[int, int] = {}
    for ins in instrs:
        t = branch_target(ins)
        if t is not None and t < ins.addr:
            ends[t] = max(ends.get(t, t), ins.addr)
    loops = []
    for head, end in sorted(ends.items()):
        loops.append(Loop(head, end, [i for i in instrs if head <= i.addr <= end]))
    return loops


def loop_load_bytes(loop: Loop) -> int:
    return sum(b for i in loop.instrs if (b := global_load_bits(i)) is not None) // 8


def find_hot_loop(instrs: list[Instr]) -> Loop | None:
    """The innermost loop that loads from global memory; the one loading the most bytes among several."""
    loading = [lp for lp in find_loops(instrs) if loop_load_bytes(lp) > 0]
    innermost = [lp for lp in loading if not any(lp.contains(o) for o in loading)]
    if not innermost:
        return None
    return max(innermost, key=lambda lp: (loop_load_bytes(lp), len(lp.instrs)))


@dataclass
class Path:
    instrs: int  # instructions on the path, head to back edge
    loads: list[int]  # global load widths (bits) on the path, in order
    stores: int  # global stores on the path

    @property
    def load_bytes(self) -> int:
        return sum(self.loads) // 8


def full_tile_path(loop: Loop) -> Path | None:
    """The iteration that loads the most bytes, and among those the longest one: head to back edge.

    The loop body is split into basic blocks; edges are the fall-through and the branches that stay in the loop
    and go forward (back edges of an inner loop are dropped: its body counts once; a branch back to the head is
    the end of an iteration; a branch out of the loop ends no iteration). Forward edges make the blocks a DAG in
    address order, so a single pass finds the path with the most (load bytes, instructions). Predicated
    instructions count as executed. The compiler duplicates the tile code per runtime case (activation, optional
    operands, partial tile): the path that loads the most bytes is the full tile with every optional operand
    present, and the longest of those is the costliest runtime option."""
    instrs = loop.instrs
    addrs = [i.addr for i in instrs]
    index = {a: k for k, a in enumerate(addrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        t = branch_target(ins)
        if t is not None or ins.base in ("EXIT", "RET"):
            if k + 1 < len(instrs):
                leaders.add(k + 1)
            if t is not None and t in index:
                leaders.add(index[t])
    starts = sorted(leaders)
    blocks = [(s, e) for s, e in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {s: n for n, (s, _) in enumerate(blocks)}
    best: dict[int, tuple[int, int, tuple[int, ...], int]] = {0: (0, 0, (), 0)}
    result: tuple[int, int, tuple[int, ...], int] | None = None
    for n, (s, e) in enumerate(blocks):
        if n not in best:
            continue
        nbytes, ninstr, loads, stores = best[n]
        body = instrs[s:e]
        widths = tuple(b for i in body if (b := global_load_bits(i)) is not None)
        val = (nbytes + sum(widths) // 8, ninstr + len(body), loads + widths,
               stores + sum(is_global_store(i) for i in body))
        last = body[-1]
        succ: list[int | str] = []
        t = branch_target(last)
        ends_flow = last.base in ("EXIT", "RET") and not last.pred
        if t is not None:
            if t == loop.head:
                succ.append("latch")
            elif t in index and t > last.addr:
                succ.append(block_of[index[t]])
            if last.pred:  # conditional: falls through as well
                succ.append(n + 1)
        elif not ends_flow:
            succ.append(n + 1)
        for sc in succ:
            if sc == "latch":
                if result is None or val[:2] > result[:2]:
                    result = val
            elif sc < len(blocks) and (sc not in best or val[:2] > best[sc][:2]):
                best[sc] = val
    if result is None:
        return None
    return Path(result[1], list(result[2]), result[3])


# Bytes one element costs the hot loop's full-tile path, per kernel family (first match of the demangled name):
# "s" an operand at the storage width, "a" a per-channel (or per-sample) parameter at the accumulation width
# loaded per element (the loop computes each element's channel), "w" a 32-bit mask word loaded per element, "q" a
# 64-bit index (block_end's spatial offset table). A finalize kernel's "element" is one partial of a channel.
# Read off the kernel source; an entry that no longer matches the code shows as a non-integer '~' count.
KERNEL_OPERANDS: list[tuple[str, str, str]] = [
    # pattern, operands, what they are
    # highway: the coupled form (carry-form template argument false) reads no carry gate
    (r"highway_forward_kernel<.*, false>", "sss", "transform, gate, carry"),
    (r"highway_forward_kernel", "ssss", "transform, gate, carry, carry_gate"),
    (r"highway_backward_kernel<.*, false>", "ssss", "grad_out, transform, gate, carry"),
    (r"highway_backward_kernel", "sssss", "grad_out, transform, gate, carry, carry_gate"),
    (r"bn_act_forward_elementwise_kernel", "ssaaa", "x, residual, mean, scale, bias"),
    (r"block_end_forward_elementwise_kernel", "ssaaaaaaq",
     "residual, x, scale (drop test), scale, mean, weight, invstd, bias, spatial offset"),
    (r"bn_act_backward_elementwise_kernel", "sssaaaaaaaaa",
     "grad_out, x, residual, mean, weight, invstd, bias (SiLU z), mean, invstd, k, mean_dz, mean_dz_xhat (dx)"),
    (r"block_end_backward_elementwise_kernel", "sswaaaaa", "grad_out, x, mask word, k, beta, d, mean, q"),
    (r"reduce_(nchw|channels_last)_kernel<BnActStatsOp", "s", "x"),
    (r"reduce_(nchw|channels_last)_kernel<BnActGradSumsOp<[^,]+, [^,]+, true", "sss",
     "grad_out, x, residual (SiLU; the channel's parameters hoisted)"),
    (r"reduce_(nchw|channels_last)_kernel<BnActGradSumsOp", "ssw", "grad_out, x, mask word"),
    (r"block_end_backward_reduce", "ssw", "grad_out, x, mask word"),
    (r"block_end_backward_combine_kernel", "aaaa",
     "one sample: beta (per-sample and per-(n, c) loads, both predicated), A, B"),
    (r"stats_finalize_kernel", "aaa", "one Welford partial: mean, M2, count"),
    (r"backward_finalize_kernel", "aa", "one gradient partial: sum_dz, sum_dz_xhat"),
]


def template_types(pretty: str) -> tuple[int, int] | None:
    """(storage bytes, accumulation bytes) from the first 'scalar, acc' template pair of a demangled name."""
    m = re.search(r"<(float|double|__half|__nv_bfloat16|half|bf16), (float|double)\b", pretty)
    if m is None:
        m = re.search(r"<(float|double)>", pretty)
        if m is None:
            return None
        return ELEM_BYTES[m.group(1)], ELEM_BYTES[m.group(1)]
    alias = {"half": "__half", "bf16": "__nv_bfloat16"}
    return ELEM_BYTES[alias.get(m.group(1), m.group(1))], ELEM_BYTES[m.group(2)]


def element_bytes(pretty: str) -> tuple[int, str] | None:
    """Bytes per element of the hot loop's full-tile path and the operand description; None when unknown."""
    types = template_types(pretty)
    if types is None:
        return None
    s, a = types
    for pattern, ops, what in KERNEL_OPERANDS:
        if re.search(pattern, pretty):
            return sum({"s": s, "a": a, "w": 4, "q": 8}[o] for o in ops), what
    return None


@dataclass
class KernelFigures:
    name: str  # demangled, short
    mangled: str
    total: int  # instructions in the function
    loop: int  # static instructions in the hot loop (0: no loop loads global memory)
    path: int  # instructions on the full-tile path of one iteration
    load_bytes: int  # global load bytes on that path
    load_widths: list[int]  # distinct load widths (bits) in the hot loop
    loads_128: bool  # every global load of the hot loop is 128-bit
    elements: float | None  # elements per iteration (derived)
    exact: bool  # the derived element count is an integer

    @property
    def per_element(self) -> float | None:
        return self.path / self.elements if self.elements else None

    def row(self) -> dict:
        return {"instructions": self.total, "loop": self.loop, "path": self.path, "load_bytes": self.load_bytes,
                "load_widths": self.load_widths, "loads_128": self.loads_128, "elements": self.elements,
                "per_element": None if self.per_element is None else round(self.per_element, 2)}


def analyse(funcs: dict[str, list[Instr]]) -> list[KernelFigures]:
    from ptxas_report import demangle  # same folder: one readable-name rule for both reports

    names = demangle(list(funcs))
    out = []
    for mangled, instrs in funcs.items():
        if not instrs:
            continue
        pretty = names[mangled]
        hot = find_hot_loop(instrs)
        path = full_tile_path(hot) if hot else None
        if hot is None or path is None:
            out.append(KernelFigures(pretty, mangled, len(instrs), 0, 0, 0, [], False, None, False))
            continue
        widths = sorted({b for i in hot.instrs if (b := global_load_bits(i)) is not None})
        per = element_bytes(pretty)
        elements = path.load_bytes / per[0] if per else None
        exact = elements is not None and abs(elements - round(elements)) < 1e-9
        out.append(KernelFigures(pretty, mangled, len(instrs), len(hot.instrs), path.instrs, path.load_bytes, widths,
                                 widths == [128], elements, exact))
    return sorted(out, key=lambda k: k.name)


# ---------------------------------------------------------------------------------------------------------
# Producing SASS: compile a .cu (cached) or read a binary
# ---------------------------------------------------------------------------------------------------------


def tool(name: str) -> str | None:
    """nvcc / cuobjdump: PATH, CUDA_HOME, the toolkit, then the pip wheels (triton ships cuobjdump)."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    for root in roots:
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    import site

    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for cand in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin", name)) +
                           glob.glob(os.path.join(sp, "triton", "backends", "nvidia", "bin", name))):
            if os.access(cand, os.X_OK):
                return cand
    return None


def nvcc_command(src: str, arch: str, out: str) -> list[str]:
    """setup.py's nvcc flags (with torch.utils.cpp_extension's common ones) for a device-only -cubin compile."""
    import torch
    from torch.utils import cpp_extension

    sys.path.insert(0, ROOT)
    try:
        from setup import _nvidia_pip_includes
    finally:
        sys.path.pop(0)
    num = arch.removeprefix("sm_")
    cmd = [tool("nvcc") or "nvcc", "-cubin", f"-gencode=arch=compute_{num},code=sm_{num}", "-O3", "-std=c++20",
           "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-Wall", "-Werror=all-warnings"]
    cmd += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in cmd]
    cmd += ["-DTORCH_EXTENSION_NAME=_C", "-DFUSEDRES_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    incs = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths() + _nvidia_pip_includes()
    cmd += [f"-I{d}" for d in incs]
    return cmd + [src, "-o", out]


def cached_cubin(src: str, arch: str, cache: str = CACHE) -> str:
    """Compile src to a cubin unless one built from the same compiler, flags and csrc tree is cached."""
    h = hashlib.sha256()
    probe = nvcc_command(src, arch, "OUT")
    h.update(" ".join(probe).encode())
    h.update(subprocess.run([probe[0], "--version"], capture_output=True, text=True).stdout.encode())
    for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(f):
            h.update(f.encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"{os.path.splitext(os.path.basename(src))[0]}-{arch}-{h.hexdigest()[:16]}.cubin")
    if not os.path.exists(out):
        tmp = out + f".tmp{os.getpid()}"
        res = subprocess.run(nvcc_command(src, arch, tmp), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{res.stdout}{res.stderr}")
        os.replace(tmp, out)
    return out


def sass_of(binary: str) -> str:
    dump = tool("cuobjdump")
    if dump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit bin, or the pip wheels' triton/backends/nvidia/bin)")
    res = subprocess.run([dump, "-sass", binary], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {binary} failed: {res.stderr}")
    return res.stdout


def sass_for_arch(text: str, arch: str) -> str:
    """Only the functions of one architecture from a multi-arch listing (a .so built for sm_80 and sm_90)."""
    keep, out = True, []
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
            keep = m.group(1) == arch
        if keep:
            out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Report, baseline, check
# ---------------------------------------------------------------------------------------------------------


def fmt_elements(k: KernelFigures) -> str:
    if k.elements is None:
        return "?"
    return f"{k.elements:g}" if k.exact else f"~{k.elements:.2f}"


def table(kernels: list[KernelFigures], markdown: bool) -> str:
    head = ("kernel", "instrs", "loop", "path", "elems/iter", "instr/elem", "load B", "load widths", "128-bit")
    rows = []
    for k in kernels:
        if not k.loop:
            rows.append((k.name, str(k.total), "-", "-", "-", "-", "-", "-", "-"))
            continue
        pe = k.per_element
        rows.append((k.name, str(k.total), str(k.loop), str(k.path), fmt_elements(k),
                     "?" if pe is None else f"{pe:.1f}", str(k.load_bytes), "/".join(map(str, k.load_widths)),
                     "yes" if k.loads_128 else "no"))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def check(kernels: list[KernelFigures], baseline: dict, margin: float) -> list[str]:
    """Regressions: a kernel whose instructions per element (or, without a derived element count, full-tile path
    instructions) exceed the baseline by more than `margin`, or whose hot loop lost its 128-bit loads."""
    errors = []
    for k in kernels:
        base = baseline.get(k.name)
        if base is None or not k.loop:
            continue
        now, then, what = k.per_element, base.get("per_element"), "instructions per element"
        if now is None or then is None:
            now, then, what = k.path, base.get("path"), "full-tile path instructions"
        if then and now > then * (1 + margin):
            errors.append(f"{k.name}: {what} {now:.1f} > baseline {then:.1f} + {margin:.0%}")
        if base.get("loads_128") and not k.loads_128:
            errors.append(f"{k.name}: hot-loop loads no longer all 128-bit (widths {k.load_widths})")
    return errors


def collect(args: argparse.Namespace) -> list[KernelFigures]:
    texts = []
    if args.binary:
        for b in args.binary:
            texts.append(sass_for_arch(sass_of(b), args.arch))
    else:
        sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        for src in sources:
            print(f"sass_report: {os.path.relpath(src, ROOT)} ({args.arch})", file=sys.stderr)
            texts.append(sass_of(cached_cubin(src, args.arch)))
    funcs: dict[str, list[Instr]] = {}
    for text in texts:
        for name, instrs in parse_sass(text).items():
            funcs.setdefault(name, instrs)  # a kernel instantiated by several .cu: the same code, listed once
    return analyse(funcs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", help="csrc/cuda .cu files (default: all)")
    ap.add_argument("--binary", action="append", help="read this cubin / object / .so instead of compiling")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--check", action="store_true", help=f"compare with {os.path.relpath(BASELINE, ROOT)}")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--margin", type=float, default=0.10, help="allowed growth over the baseline (0.10: 10 %%)")
    ap.add_argument("--write-baseline", action="store_true", help="record these figures as the baseline")
    args = ap.parse_args(argv)
    kernels = collect(args)
    if args.json:
        print(json.dumps({k.name: k.row() for k in kernels}, indent=1, sort_keys=True))
    else:
        print(table(kernels, args.markdown))
    if args.write_baseline:
        base = {}
        if os.path.exists(args.baseline):
            with open(args.baseline) as fh:
                base = json.load(fh)["kernels"]
        # A kernel family re-measured here replaces all of its old entries (instantiations may have been renamed).
        families = {k.name.split("<")[0] for k in kernels}
        base = {n: v for n, v in base.items() if n.split("<")[0] not in families}
        base.update({k.name: k.row() for k in kernels})
        with open(args.baseline, "w") as fh:
            json.dump({"arch": args.arch, "margin": args.margin, "kernels": base}, fh, indent=1, sort_keys=True)
            fh.write("\n")
        print(f"sass_report: wrote {len(kernels)} kernels to {args.baseline}", file=sys.stderr)
    if args.check:
        with open(args.baseline) as fh:
            base = json.load(fh)
        if base.get("arch") != args.arch:
            print(f"sass_report: baseline is for {base.get('arch')}, not {args.arch}", file=sys.stderr)
            return 1
        missing = [k.name for k in kernels if k.name not in base["kernels"]]
        errors = check(kernels, base["kernels"], args.margin)
        for name in missing:
            print(f"sass_report: note: {name} has no baseline (--write-baseline records it)", file=sys.stderr)
        for e in errors:
            print(f"sass_report: REGRESSION {e}", file=sys.stderr)
        if errors:
            return 1
        print(f"sass_report: {len(kernels)} kernels within {args.margin:.0%} of the baseline", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())

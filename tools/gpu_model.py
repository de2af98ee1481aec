#!/usr/bin/env python3
"""What the CUDA kernels should take on an A100 / H100, from what can be known without a GPU (`make gpu-model`).

Per op call, shape, layout and dtype: each kernel's bytes, the launches per op call, the instructions per element
of its hot loop (tools/sass_report.py's baseline, sm_90 SASS) and an estimated time:

    t(kernel) = max(bytes / (peak bandwidth * --efficiency), elements * instr/elem / issue rate) + --launch-us
    share     = op bytes / (sum of t(kernel)) / peak bandwidth   (the fraction of the HBM peak the op achieves)

Assumptions (printed with the table): the issue rate is 4 warp schedulers x 32 lanes x 1 instruction per clock
per SM at the boost clock, all SMs busy (the grids fill them); instructions per element are the full-tile path of
the hot loop (tools/sass_report.py: the longest runtime option, e.g. every activation's code is not run, but the
longest one is counted), so the issue time is an upper estimate for the cheaper options; each launch adds
--launch-us (default 4 us: the launch latency and the drain / fill gap between dependent kernels in one stream,
typically 3-5 us); per-channel vectors (mean, scale, partial sums) are counted once, as read from L2 they cost
little. Bytes are the kernels' own traffic: what each reads and writes once (design.md's byte floors, sections
1-3), e.g. the bn_act forward reads x twice (statistics, normalise) unless the L2 keeps it.

Launches per op call come from running the op's launch sequence (csrc/cuda/*_launch.cuh) under the CUDA emulator
(tests/cuda_emu, a tiny problem of the same layout and options: the sequence does not depend on the sizes here)
and reading its launch log; without a C++ compiler they are taken from the sequences as read (printed as
"derived"). The highway op is elementwise (one launch per direction) and layout-independent, so it is listed
once per shape (its tensors of the shape's numel).

    python tools/gpu_model.py                     # both GPUs, every shape, layout, dtype
    python tools/gpu_model.py --gpu h100 --op bn_act_forward --dtype fp16
    python tools/gpu_model.py --gpu h100 --measure   # on a GPU: the measured time beside the model (make gpu-check)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "tools", "sass_baseline.json")

SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (128, 16, 32, 32), (16, 2048, 7, 7)]
LAYOUTS = ("nchw", "channels_last")
DTYPES = {"fp32": ("float", 4), "fp16": ("half", 2)}  # name in the kernel's template, storage bytes
ACC = 4  # float accumulation for both


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s, HBM peak
    sms: int
    clock: float  # Hz, boost


GPUS = {
    "a100": Gpu("A100 SXM 40GB", 1.555e12, 108, 1.41e9),
    "h100": Gpu("H100 SXM", 3.35e12, 132, 1.98e9),
    "h200": Gpu("H200 SXM", 4.8e12, 132, 1.98e9),  # not in the default table: for `make gpu-check` on an H200
}
DEFAULT_GPUS = ["a100", "h100"]
ISSUE_PER_SM_CLOCK = 4 * 32  # thread-instructions: 4 schedulers x 1 warp instruction per clock


@dataclass
class Kernel:
    name: str  # as in the SASS baseline
    bytes: float
    elements: float  # what instr/elem multiplies: values the hot loop walks


def partials_of(N: int, C: int, S: int, cl: bool, sms: int, emu) -> int:
    """Partial reductions per channel as the launcher sizes them (from the emulator library when built)."""
    if emu is not None:
        return int(emu.launch_config(N, C, S, cl, sms)["partials"])
    return 1  # per-channel partials are a few KB either way; 1 keeps the estimate's byte count honest enough


def bn_act_kernels(op: str, shape, cl: bool, T: str, s: int, sms: int, emu) -> list[Kernel]:
    """The kernels of one bn_act op call: training, ReLU, residual; backward: every gradient."""
    N, C, H, W = shape
    S = H * W
    numel = N * C * S
    P = partials_of(N, C, S, cl, sms, emu)
    layout = "true" if cl else "false"
    reduce = "bn_act_reduce_channels_last_kernel" if cl else "bn_act_reduce_nchw_kernel"
    mask = math.ceil(numel / 32) * 4
    if op == "bn_act_forward":
        return [
            Kernel(f"{reduce}<BnActStatsOp<{T}, float> >", numel * s + 3 * P * C * ACC, numel),
            Kernel(f"bn_act_stats_finalize_kernel<{T}, float>", 3 * P * C * ACC + 6 * C * ACC, P * C),
            Kernel(f"bn_act_forward_elementwise_kernel<{T}, float, {layout}>", 3 * numel * s + mask + 3 * C * ACC,
                   numel),
        ]
    return [
        Kernel(f"{reduce}<BnActGradSumsOp<{T}, float, false> >", 2 * numel * s + mask + 2 * P * C * ACC, numel),
        Kernel("bn_act_backward_finalize_kernel<float>", 2 * P * C * ACC + 7 * C * ACC, P * C),
        Kernel(f"bn_act_backward_elementwise_kernel<{T}, float, {layout}>", 4 * numel * s + mask + 5 * C * ACC,
               numel),
    ]


def highway_kernels(op: str, shape, T: str, s: int) -> list[Kernel]:
    numel = math.prod(shape)
    if op == "highway_forward":  # coupled form: reads h, g, x; writes y
        return [Kernel(f"highway_forward_kernel<{T}, float, 1, false>", 4 * numel * s, numel)]  # ReLU (1), coupled
    return [Kernel(f"highway_backward_kernel<{T}, float, 1, false>", 7 * numel * s, numel)]  # dy, h, g, x -> dh, dg, dx


# Launch counts as read from the sequences (used when the emulator library cannot be built): bn_act forward in
# training = statistics reduction + finalize + elementwise; backward with every gradient = gradient sums +
# finalize + elementwise (bn_act_launch.cuh); highway = one kernel per direction (highway_launch.cuh).
DERIVED_LAUNCHES = {"bn_act_forward": 3, "bn_act_backward": 3, "highway_forward": 1, "highway_backward": 1}


class Emulators:
    """The emulator libraries of tests/cuda_emu (built with g++ by tests/_cuda_emu.py, cached in build/emu_cache):
    bn_act (EmuLib) and highway (raw ctypes: its front end lives in a test module)."""

    def __init__(self, bn_act, highway) -> None:
        self.bn_act, self.highway = bn_act, highway

    def launch_config(self, N: int, C: int, S: int, cl: bool, sms: int) -> dict[str, int]:
        return self.bn_act.launch_config(N, C, S, cl, sms)


def emulator(cache_dir: str | None = None) -> Emulators | None:
    """Both libraries, built in cache_dir (default build/emu_cache; the tests pass pytest's cache), or None."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import ctypes
        from pathlib import Path

        import _cuda_emu

        cache = Path(cache_dir) if cache_dir else Path(ROOT) / "build" / "emu_cache"
        cache.mkdir(parents=True, exist_ok=True)
        bn = _cuda_emu.EmuLib(_cuda_emu.build_library(cache))
        hw = ctypes.CDLL(str(_cuda_emu.build_library(cache, _cuda_emu.EMU_DIR / "emu_highway.cpp")))
        p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        hw.emu_launch_log.argtypes = [ctypes.c_char_p, i64]
        hw.emu_launch_log.restype = i64
        hw.emu_highway_forward.argtypes = [i, i64, i64, i, i] + [p, i64] * 5
        hw.emu_highway_backward.argtypes = [i, i64, i64, i, i] + [p, i64] * 9
        return Emulators(bn, hw)
    except BaseException as e:  # pytest.skip / fail raise BaseException subclasses outside a test
        print(f"gpu_model: no emulator ({type(e).__name__}: {e}); launch counts derived from the sequences",
              file=sys.stderr)
        return None
    finally:
        sys.path.pop(0)


def _launch_total(lib) -> int:
    n = lib.emu_launch_log(None, 0)
    import ctypes

    buf = ctypes.create_string_buffer(n + 1)
    lib.emu_launch_log(buf, n + 1)
    return sum(int(line.split("\t", 1)[0]) for line in buf.value.decode().splitlines())


def emulated_launches(emus: Emulators, op: str, cl: bool) -> int:
    """Launches of one op call run under the emulator on a tiny problem: bn_act (N=2, C=3, 5 values per plane,
    training, ReLU, residual; backward with every gradient), highway (2 x 5 rows, coupled, ReLU, every gradient)."""
    import torch

    f32 = torch.float32
    if op.startswith("highway"):
        rows, cols = 2, 5
        h, g, x, dy = (torch.randn(rows, cols, dtype=f32) for _ in range(4))
        outs = [torch.empty(rows, cols, dtype=f32) for _ in range(3)]
        lib = emus.highway
        before = _launch_total(lib)
        if op == "highway_forward":
            rc = lib.emu_highway_forward(0, rows, cols, 2, 1, *[v for t in (h, g, x) for v in (t.data_ptr(), cols)],
                                         None, 0, outs[0].data_ptr(), cols)
        else:
            ins = [v for t in (dy, h, g, x) for v in (t.data_ptr(), cols)]
            grads = [v for t in outs for v in (t.data_ptr(), cols)]
            rc = lib.emu_highway_backward(0, rows, cols, 2, 1, *ins, None, 0, *grads, None, 0)
        if rc != 0:
            raise RuntimeError(f"emulated {op} failed")
        return _launch_total(lib) - before
    emu = emus.bn_act
    N, C, S, sms = 2, 3, 5, 2
    numel = N * C * S
    x, r, dy = (torch.randn(numel, dtype=f32) for _ in range(3))
    w, b = torch.ones(C, dtype=f32), torch.zeros(C, dtype=f32)
    mean, invstd, var = (torch.zeros(C, dtype=f32) for _ in range(3))
    mask = torch.zeros(emu.launch_config(N, C, S, cl, sms)["mask_words"] * 4, dtype=torch.uint8)
    y = torch.empty(numel, dtype=f32)
    emu.configure("asc")
    before = sum(emu.launch_log().values())
    emu.forward(f32, N, C, S, cl, sms, True, "relu", x, r, w, b, mean, invstd, y, mask, var)
    if op == "bn_act_backward":
        before = sum(emu.launch_log().values())
        gi, gr = torch.empty(numel, dtype=f32), torch.empty(numel, dtype=f32)
        gw, gb = torch.empty(C, dtype=f32), torch.empty(C, dtype=f32)
        emu.backward(f32, N, C, S, cl, sms, True, "relu", dy, x, mask, mean, invstd, w, gi, gr, gw, gb, b, r)
    return sum(emu.launch_log().values()) - before


@dataclass
class Row:
    op: str
    shape: tuple
    layout: str
    dtype: str
    kernels: list[tuple[Kernel, float | None, float]]  # kernel, instr/elem, estimated seconds
    launches: int
    launches_from: str
    total_bytes: float
    seconds: float
    share: float
    measured: float | None = None


def kernel_time(k: Kernel, ipe: float | None, gpu: Gpu, eff: float, launch_s: float) -> float:
    mem = k.bytes / (gpu.bandwidth * eff)
    issue = k.elements * ipe / (gpu.sms * ISSUE_PER_SM_CLOCK * gpu.clock) if ipe else 0.0
    return max(mem, issue) + launch_s


def model(args, baseline: dict, emu) -> dict[str, list[Row]]:
    ops = args.op or ["bn_act_forward", "bn_act_backward", "highway_forward", "highway_backward"]
    out: dict[str, list[Row]] = {}
    launch_cache: dict[tuple[str, bool], tuple[int, str]] = {}
    for gkey in args.gpu or DEFAULT_GPUS:
        gpu = GPUS[gkey]
        rows = []
        for shape in args.shapes:
            for op in ops:
                layouts = ["any"] if op.startswith("highway") else list(LAYOUTS)
                for layout in layouts:
                    cl = layout == "channels_last"
                    for dname in args.dtype or list(DTYPES):
                        T, s = DTYPES[dname]
                        if op.startswith("bn_act"):
                            ks = bn_act_kernels(op, shape, cl, T, s, gpu.sms, emu)
                        else:
                            ks = highway_kernels(op, shape, T, s)
                        if (op, cl) not in launch_cache:
                            if emu is not None:
                                launch_cache[(op, cl)] = (emulated_launches(emu, op, cl), "emulator")
                            else:
                                launch_cache[(op, cl)] = (DERIVED_LAUNCHES[op], "derived")
                        launches, src = launch_cache[(op, cl)]
                        if launches != len(ks):
                            raise SystemExit(f"gpu_model: {op} ({layout}) launches {launches} kernels under the "
                                             f"emulator, the model lists {len(ks)}: update bn_act_kernels()")
                        timed = []
                        for k in ks:
                            ipe = baseline.get(k.name, {}).get("per_element")
                            timed.append((k, ipe, kernel_time(k, ipe, gpu, args.efficiency, args.launch_us * 1e-6)))
                        total = sum(k.bytes for k in ks)
                        secs = sum(t for _, _, t in timed)
                        rows.append(Row(op, shape, layout, dname, timed, launches, src, total, secs,
                                        total / secs / gpu.bandwidth))
        out[gkey] = rows
    return out


def assumptions(args) -> str:
    lines = ["assumptions:"]
    for g in (args.gpu or DEFAULT_GPUS):
        gpu = GPUS[g]
        lines.append(f"  {gpu.name}: {gpu.bandwidth / 1e12:.3g} TB/s HBM peak, {gpu.sms} SMs, boost "
                     f"{gpu.clock / 1e9:.3g} GHz -> issue {gpu.sms * ISSUE_PER_SM_CLOCK * gpu.clock / 1e12:.1f} T "
                     "thread-instructions/s")
    lines += [
        f"  streaming kernels reach {args.efficiency:.0%} of the peak bandwidth; each launch adds "
        f"{args.launch_us:g} us",
        "  t(kernel) = max(bytes / bandwidth, elements x instr/elem / issue rate) + launch; op = sum of its kernels",
        "  instr/elem: tools/sass_baseline.json (sm_90 SASS, full-tile path of the hot loop: the longest runtime",
        "  option; the A100 runs sm_80 code, counted here with the sm_90 figures); '-' = no hot loop (time =",
        "  launch + bytes). bn_act: training, ReLU, residual, every gradient; highway: coupled form, ReLU.",
        "  share = op bytes / estimated time / peak bandwidth",
    ]
    return "\n".join(lines)


def render(rows: list[Row], gpu: Gpu, per_kernel: bool) -> str:
    head = ["op", "shape", "layout", "dtype", "launches", "MB", "instr/elem", "est us", "share"]
    measured = any(r.measured is not None for r in rows)
    if measured:
        head += ["measured us", "meas/est"]
    body, kernel_lines = [], {}
    for r in rows:
        ipes = "/".join("-" if ipe is None else f"{ipe:.0f}" for _, ipe, _ in r.kernels)
        line = [r.op, "x".join(map(str, r.shape)), r.layout, r.dtype, f"{r.launches} ({r.launches_from})",
                f"{r.total_bytes / 1e6:.1f}", ipes, f"{r.seconds * 1e6:.1f}", f"{r.share:.0%}"]
        if measured:
            line += ["-" if r.measured is None else f"{r.measured * 1e6:.1f}",
                     "-" if r.measured is None else f"{r.measured / r.seconds:.2f}"]
        body.append(line)
        if per_kernel:
            kernel_lines[len(body) - 1] = [
                f"    {k.name}: {k.bytes / 1e6:.2f} MB, {'-' if ipe is None else f'{ipe:.1f}'} instr/elem, "
                f"{t * 1e6:.1f} us" for k, ipe, t in r.kernels]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [f"== {gpu.name}", fmt.format(*head)]
    for n, b in enumerate(body):
        out.append(fmt.format(*b))
        out += kernel_lines.get(n, [])
    return "\n".join(out)


def measure(rows: list[Row], reps: int, device: str) -> None:
    """The real time of each modelled op call on `device` (median of `reps`): forward = the functional call;
    backward = forward + backward minus forward (autograd's own overhead included: a few us)."""
    import time

    import torch

    sys.path.insert(0, ROOT)
    import fusedres

    dt = {"fp32": torch.float32, "fp16": torch.float16}

    def timed(fn) -> float:
        fn()  # warm-up: allocator, first launch
        out = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return sorted(out)[len(out) // 2]

    for r in rows:
        fmt = torch.channels_last if r.layout == "channels_last" else torch.contiguous_format
        make = lambda: torch.randn(r.shape, device=device, dtype=dt[r.dtype]).contiguous(memory_format=fmt)  # noqa
        x, res, dy = make().requires_grad_(), make().requires_grad_(), make()
        if r.op.startswith("bn_act"):
            C = r.shape[1]
            w = torch.ones(C, device=device, requires_grad=True)
            b = torch.zeros(C, device=device, requires_grad=True)
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)

            def fwd():
                return fusedres.batch_norm_act(x, rm, rv, w, b, True, residual=res, activation="relu")
        else:
            g = make().requires_grad_()

            def fwd():
                return fusedres.highway(x, g, res, activation="relu")

        t_fwd = timed(fwd)
        if r.op.endswith("forward"):
            r.measured = t_fwd
        else:
            r.measured = max(timed(lambda: fwd().backward(dy)) - t_fwd, 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="append", choices=sorted(GPUS))
    ap.add_argument("--op", action="append",
                    choices=["bn_act_forward", "bn_act_backward", "highway_forward", "highway_backward"])
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    ap.add_argument("--shape", action="append", help="NxCxHxW instead of the default shapes (repeatable)")
    ap.add_argument("--efficiency", type=float, default=0.9, help="fraction of peak bandwidth a stream reaches")
    ap.add_argument("--launch-us", type=float, default=4.0, help="fixed cost per launch (us)")
    ap.add_argument("--baseline", default=BASELINE, help="instructions per element (tools/sass_report.py)")
    ap.add_argument("--kernels", action="store_true", help="a row per kernel under each op")
    ap.add_argument("--no-emulator", action="store_true", help="derive launch counts from the sequences")
    ap.add_argument("--measure", action="store_true", help="time each op on this machine's GPU beside the model")
    ap.add_argument("--device", default="cuda", help="device for --measure (cpu: a smoke run of the harness)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    args.shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shape] if args.shape else SHAPES
    with open(args.baseline) as fh:
        baseline = json.load(fh)["kernels"]
    emu = None if args.no_emulator else emulator()
    result = model(args, baseline, emu)
    print(assumptions(args))
    for gkey, rows in result.items():
        if args.measure:
            measure(rows, args.reps, args.device)
        print()
        print(render(rows, GPUS[gkey], args.kernels))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({g: [{"op": r.op, "shape": r.shape, "layout": r.layout, "dtype": r.dtype,
                            "launches": r.launches, "bytes": r.total_bytes, "est_s": r.seconds, "share": r.share,
                            "measured_s": r.measured,
                            "kernels": [{"name": k.name, "bytes": k.bytes, "instr_per_elem": ipe, "est_s": t}
                                        for k, ipe, t in r.kernels]} for r in rows]
                       for g, rows in result.items()}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

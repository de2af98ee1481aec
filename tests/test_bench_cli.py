"""The benchmark CLI: ``python -m fusedres bench --quick --json`` end to end on tiny shapes, and its helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedres import bench, bench_highway

ROOT = Path(__file__).resolve().parents[1]
ROW_FIGURES = (
    "times_ms",
    "times_ms_spread",
    "ratios",
    "gbps",
    "pct_copy_bandwidth",
    "page_faults_per_call",
    "saved_bytes",
    "compile_s",
    "load",
)
COUNTS = ("page_faults_per_call", "load")  # may legitimately be 0


def _run(args: list[str], env_extra: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in bench.ALLOCATOR_ENV}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "fusedres", *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_figures(value, path: str, reasons: dict[str, str], problems: list[str], nonneg: bool = False) -> None:
    """Every number positive (>= 0 for counts), every null explained by reasons[path]."""
    if value is None:
        if not reasons.get(path):
            problems.append(f"{path} is null without a reason")
    elif isinstance(value, dict):
        for key, sub in value.items():
            _check_figures(sub, f"{path}.{key}", reasons, problems, nonneg)
    elif isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{path} is {value!r}, not a number")
    elif not (value >= 0 if nonneg else value > 0):
        problems.append(f"{path} = {value} is not {'non-negative' if nonneg else 'positive'}")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _run(["bench", "--quick", "--json", str(out)], {"FUSEDRES_BENCH_TINY": "1"}, timeout=300)
    assert proc.returncode == 0, f"bench failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # one subprocess running torch.compile on tiny shapes: about 30-60 s on 2 cores
def test_bench_quick_json_sections(quick_report) -> None:
    report, stdout = quick_report
    for section in ("machine", "copy_bandwidth", "noise_check", "settings", "method", "bn_act"):
        assert section in report, f"missing section {section}"

    machine = report["machine"]
    for key in ("cpu_model", "cpus_usable", "torch_threads", "isa", "torch_version", "cuda_compiled", "allocator"):
        assert key in machine, f"machine.{key} missing"
    assert machine["torch_threads"] >= 1 and machine["cpus_usable"] >= 1
    # The test's environment has no MALLOC_* variables: bench must have re-executed itself with them.
    alloc = machine["allocator"]
    assert alloc["no_page_fault_setting"] is True, alloc
    assert alloc["MALLOC_MMAP_MAX_"] == "0" and alloc["MALLOC_TRIM_THRESHOLD_"] == "100000000000"
    assert "re-executed" in alloc["source"]

    assert report["copy_bandwidth"]["gbps"] > 0 and report["copy_bandwidth"]["bytes"] == 256 << 20
    assert report["noise_check"]["median"] > 0 and report["noise_check"]["rounds"] >= 5

    rows = report["bn_act"]
    configs = {(tuple(r["shape"]), r["layout"], r["residual"], r["direction"]) for r in rows}
    expected = {
        (s, lay, res, d)
        for s in bench.TINY_SHAPES
        for lay in bench.LAYOUTS
        for res in (False, True)
        for d in bench.DIRECTIONS
    }
    assert configs == expected
    problems: list[str] = []
    for row in rows:
        where = f"{row['shape']} {row['layout']} res={row['residual']} {row['direction']}"
        assert row["dtype"] == "float32" and row["op"] == "bn_act"
        assert row["rounds"] >= 1 and row["floor_bytes"] > 0
        for key in ROW_FIGURES:
            assert key in row, f"{where}: {key} missing"
            sub: list[str] = []
            _check_figures(row[key], key, row["null_reasons"], sub, nonneg=key in COUNTS)
            problems += [f"{where}: {p}" for p in sub]
        assert set(row["times_ms"]) == set(bench.IMPLS)
        assert set(row["ratios"]) == {"reference/fused", "compiled/fused"}
        # Fused and the eager reference are always measured on CPU; compile only with a residual under --quick.
        assert row["times_ms"]["fused"] is not None and row["times_ms"]["reference"] is not None, where
        if not row["residual"]:
            assert row["times_ms"]["compiled"] is None
            assert "skipped: --quick" in row["null_reasons"]["times_ms.compiled"]
        if row["direction"] != "eval":
            assert row["saved_bytes"]["fused"] == row["saved_bytes"]["fused_formula"], where
            assert row["saved_bytes"]["fused"] < row["saved_bytes"]["reference"], where
    assert not problems, "\n".join(problems)

    assert "noise check:" in stdout and "copy" in stdout and "MALLOC_MMAP_MAX_=0" in stdout
    assert "ref/fused" in stdout and "compile/fused" in stdout


@pytest.mark.slow
def test_bench_quick_json_highway(quick_report) -> None:
    report, stdout = quick_report
    for section in ("highway", "highway_mlp_step"):
        assert section in report, f"missing section {section}"
    rows = report["highway"]
    configs = {(tuple(r["shape"]), r["form"], r["direction"]) for r in rows}
    hb = bench_highway
    assert configs == {(s, f, d) for s in hb.TINY_SHAPES for f in hb.FORMS for d in hb.DIRECTIONS}
    problems: list[str] = []
    for row in rows:
        where = f"highway {row['shape']} {row['form']} {row['direction']}"
        assert row["dtype"] == "float32" and row["op"] == "highway"
        assert row["rounds"] >= 1 and row["floor_bytes"] == bench_highway.floor_bytes(
            torch.Size(row["shape"]).numel(), row["direction"]
        )
        for key in ROW_FIGURES:
            assert key in row, f"{where}: {key} missing"
            sub: list[str] = []
            _check_figures(row[key], key, row["null_reasons"], sub, nonneg=key in (*COUNTS, "saved_bytes"))
            problems += [f"{where}: {p}" for p in sub]
        assert set(row["times_ms"]) == set(bench.IMPLS)
        assert row["times_ms"]["fused"] is not None and row["times_ms"]["reference"] is not None, where
        # --quick compiles only the packed form.
        assert (row["times_ms"]["compiled"] is None) == (row["form"] == "split"), where
        assert row["saved_bytes"]["fused"] == 0, where  # the fused op saves only its inputs
    step = report["highway_mlp_step"]
    assert step["op"] == "highway_mlp_step" and step["depth"] == bench_highway.MLP_STEP_TINY["depth"]
    for key in ("times_ms", "times_ms_spread", "ratios", "page_faults_per_call", "compile_s", "load"):
        sub = []
        _check_figures(step[key], key, step["null_reasons"], sub, nonneg=key in COUNTS)
        problems += [f"highway_mlp_step: {p}" for p in sub]
    assert step["times_ms"]["fused"] is not None and step["times_ms"]["compiled"] is None
    assert not problems, "\n".join(problems)
    assert "highway gate" in stdout and "highway_mlp training step" in stdout


def test_highway_floor_bytes() -> None:
    n = 1024
    assert bench_highway.floor_bytes(n, "fwd") == 4 * 4 * n  # read h, g, x; write y
    assert bench_highway.floor_bytes(n, "fwd+bwd") == 11 * 4 * n  # + read dy, h, g, x; write dh, dg, dx
    with pytest.raises(ValueError, match="direction must be one of"):
        bench_highway.floor_bytes(n, "eval")


def test_info_runs() -> None:
    proc = _run(["info"], {}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch_version" in proc.stdout and "cuda_compiled" in proc.stdout


def test_floor_bytes() -> None:
    n = 1024
    assert bench.floor_bytes(n, False, "eval") == 2 * 4 * n
    assert bench.floor_bytes(n, True, "eval") == 3 * 4 * n
    assert bench.floor_bytes(n, True, "fwd") == 3 * 4 * n + n // 8
    # fwd+bwd with residual: forward + read dy, x, mask; write dx, dr.
    assert bench.floor_bytes(n, True, "fwd+bwd") == 3 * 4 * n + n // 8 + 4 * 4 * n + n // 8
    with pytest.raises(ValueError, match="direction must be one of"):
        bench.floor_bytes(n, True, "backward")


def test_alternating_measurement_of_identical_functions() -> None:
    x = torch.randn(1 << 16)
    times, faults = bench.measure_alternating({"A": lambda: x * 2, "B": lambda: x * 2}, rounds=6, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"A": 6, "B": 6}
    stats = bench.ratio_stats(times, "A", "B")
    assert stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]
    assert set(faults) == {"A", "B"}


def test_saved_bytes_counts_unique_storages_except_owned() -> None:
    case = bench.BnActCase((2, 3, 4, 4), "nchw", True)
    from fusedres import reference

    saved = bench.saved_bytes(case.train_call(reference.batch_norm_act), case.owned_storages())
    # Eager: ReLU's output (2*3*4*4 floats) + save_mean + save_invstd; the input and parameters are excluded.
    assert saved["total"] == 2 * 3 * 4 * 4 * 4 + 2 * 3 * 4
    assert sum(t["is_output"] for t in saved["tensors"]) == 1

"""The benchmark CLI: ``python -m fusedres bench --quick --json`` end to end on tiny shapes, and its helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fusedres.bench import block_end as bench_block_end
from fusedres.bench import bn_act, harness
from fusedres.bench import highway as bench_highway
from fusedres.bench import models as bench_models
from fusedres.bench import overhead as bench_overhead
from fusedres.bench.report import run_op_sections
from fusedres.bench.sections import OP_SECTIONS, OpSection

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
MODEL_FIGURES = ("times_ms", "times_ms_spread", "ratios", "compile_s", "load", "peak_mb", "memory_ratio", "first_loss")
COUNTS = ("page_faults_per_call", "load")  # may legitimately be 0


def _run(args: list[str], env_extra: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in harness.ALLOCATOR_ENV}
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
def quick_run(tmp_path_factory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    out, png = tmp / "bench.json", tmp / "bench.png"
    args = ["bench", "--quick", "--json", str(out), "--plot", str(png)]
    proc = _run(args, {"FUSEDRES_BENCH_TINY": "1"}, timeout=400)
    assert proc.returncode == 0, f"bench failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout, png


@pytest.fixture(scope="module")
def quick_report(quick_run) -> tuple[dict, str]:
    return quick_run[0], quick_run[1]


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
        for s in bn_act.TINY_SHAPES
        for lay in bn_act.LAYOUTS
        for res in (False, True)
        for d in bn_act.DIRECTIONS
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
        assert set(row["times_ms"]) == set(harness.IMPLS)
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
    assert "highway" in report, "missing section highway"
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
        assert set(row["times_ms"]) == set(harness.IMPLS)
        assert row["times_ms"]["fused"] is not None and row["times_ms"]["reference"] is not None, where
        # --quick compiles only the packed form.
        assert (row["times_ms"]["compiled"] is None) == (row["form"] == "split"), where
        assert row["saved_bytes"]["fused"] == 0, where  # the fused op saves only its inputs
    assert not problems, "\n".join(problems)
    assert "highway gate" in stdout


@pytest.mark.slow
@pytest.mark.needs_native
def test_bench_quick_json_overhead(quick_report) -> None:
    """One row per op: the chain's times, per-layer figures and overhead = (fused - ops) per layer."""
    report, stdout = quick_report
    rows = {r["op"]: r for r in report["overhead"]}
    assert tuple(rows) == bench_overhead.OPS
    problems: list[str] = []
    for op, row in rows.items():
        assert row["layers"] == bench_overhead.LAYERS and row["direction"] == "fwd+bwd"
        for key in ("times_ms", "times_ms_spread", "ratios", "load", "us_per_layer"):
            sub: list[str] = []
            _check_figures(row[key], key, row["null_reasons"], sub, nonneg=key in COUNTS)
            problems += [f"{op}: {p}" for p in sub]
        per_layer = row["us_per_layer"]
        for impl in bench_overhead.IMPLS:
            assert per_layer[impl] == pytest.approx(row["times_ms"][impl] * 1e3 / row["layers"]), (op, impl)
        assert row["overhead_us_per_layer"] == pytest.approx(per_layer["fused"] - per_layer["ops"]), op
    assert not problems, "\n".join(problems)
    assert "per-call overhead" in stdout and "overhead us/layer" in stdout


@pytest.mark.slow
def test_bench_quick_json_block_end(quick_report) -> None:
    """--quick: every variant in channels_last, both directions, all three implementations measured."""
    report, stdout = quick_report
    rows = report["block_end"]
    configs = {(r["variant"], r["layout"], r["direction"]) for r in rows}
    assert configs == {(v, "channels_last", d) for v in bench_block_end.VARIANTS for d in bench_block_end.DIRECTIONS}
    problems: list[str] = []
    for row in rows:
        where = f"{row['variant']} {row['direction']}"
        assert all(row["times_ms"][impl] is not None for impl in harness.IMPLS), where
        for key in ("times_ms", "ratios", "gbps"):
            sub: list[str] = []
            _check_figures(row[key], key, row["null_reasons"], sub, nonneg=key in COUNTS)
            problems += [f"{where}: {p}" for p in sub]
        if row["variant"] == "pyramidnet":
            assert row["residual_channels"] < row["shape"][1], where
    assert not problems, "\n".join(problems)
    assert "block ends of the skip-connection variants" in stdout


@pytest.mark.slow
def test_bench_quick_json_op_sections(quick_report) -> None:
    report, stdout = quick_report
    sections = report["sections"]
    assert list(sections) == [s.name for s in OP_SECTIONS]
    for name, status in sections.items():
        if status["available"]:
            assert status["reason"] is None and report[name], name
        else:  # only a section whose module is absent from this tree may be missing, and it says so
            module = next(s.module for s in OP_SECTIONS if s.name == name)
            assert importlib.util.find_spec(module) is None, f"{name}: {status['reason']}"
            assert report[name] is None and "not available" in report["null_reasons"][name]
            assert f"{name}: not available" in stdout


@pytest.mark.slow
def test_bench_quick_json_models(quick_report) -> None:
    from fusedres.models import list_models

    report, stdout = quick_report
    models = report["models"]
    assert "fresh process" in models["method"]["memory"] and "clear_refs" in models["method"]["memory"]
    rows = {r["model"]: r for r in models["rows"]}
    assert list(rows) == list(bench_models.QUICK_MODELS)
    problems: list[str] = []
    for name, row in rows.items():
        assert row["op"] == "model_step" and row["dtype"] == "float32"
        for key in MODEL_FIGURES:
            sub: list[str] = []
            _check_figures(row[key], key, row["null_reasons"], sub, nonneg=key in (*COUNTS, "peak_mb", "first_loss"))
            problems += [f"{name}: {p}" for p in sub]
        for impl in ("compiled", "compiled_fused"):
            assert row["times_ms"][impl] is None and "--quick" in row["null_reasons"][f"times_ms.{impl}"]
        assert row["peak_mb"]["compiled"] is None and row["null_reasons"]["peak_mb.compiled"]
        assert row["memory_format"] == ("channels_last" if name.endswith(bench_models.CL) else "contiguous"), name
        if row["model_name"] not in list_models():  # reported, never invented
            assert not row["available"] and row["times_ms"]["fused"] is None and row["peak_mb"]["fused"] is None
            assert "not registered" in row["null_reasons"]["times_ms.fused"]
            continue
        assert row["available"], name
        for impl in ("fused", "reference"):
            assert row["times_ms"][impl] is not None, (name, impl, row["null_reasons"])
            if name != bench_models.QUICK_MODELS[0]:  # --quick measures the memory of the first model only
                assert row["peak_mb"][impl] is None and "skipped: --quick" in row["null_reasons"][f"peak_mb.{impl}"]
                continue
            assert row["peak_mb"][impl] is not None, (name, impl, row["null_reasons"])
            mem = row["memory"][impl]
            assert mem["config"]["model"] == name and mem["config"]["build_kwargs"]["fused"] == (impl == "fused")
            assert mem["peak_reset"] is True and mem["peak_rss_mb"] >= mem["rss_baseline_mb"]
        assert row["losses_agree"] is True, (name, row["first_loss"])
    assert not problems, "\n".join(problems)
    assert "models: one training step" in stdout and "peak MB fused" in stdout


@pytest.mark.slow
def test_bench_quick_plot(quick_run) -> None:
    png = quick_run[2]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_missing_op_section_is_reported_not_raised(capsys) -> None:
    settings = harness.Settings("cpu", True, True, 1, 0.1, 1, 1)
    missing = OpSection("nothing_here", "fusedres.bench_no_such_module")
    entries, status = run_op_sections(settings, 1.0, [missing])
    assert entries == {"nothing_here": None}
    assert status["nothing_here"]["available"] is False
    assert "fusedres.bench_no_such_module does not exist" in status["nothing_here"]["reason"]
    assert "nothing_here: not available" in capsys.readouterr().out


@pytest.mark.slow  # one fresh process
def test_peak_memory_of_unregistered_model_is_null_with_reason() -> None:
    from fusedres.bench.memory import measure_peak_memory

    out = measure_peak_memory("no_such_model", {"fused": True}, batch=2, timeout_s=120)
    assert out["peak_mb"] is None and "name must be one of the registered models" in out["null_reasons"]["peak_mb"]


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
    assert bn_act.floor_bytes(n, False, "eval") == 2 * 4 * n
    assert bn_act.floor_bytes(n, True, "eval") == 3 * 4 * n
    assert bn_act.floor_bytes(n, True, "fwd") == 3 * 4 * n + n // 8
    # fwd+bwd with residual: forward + read dy, x, mask; write dx, dr.
    assert bn_act.floor_bytes(n, True, "fwd+bwd") == 3 * 4 * n + n // 8 + 4 * 4 * n + n // 8
    with pytest.raises(ValueError, match="direction must be one of"):
        bn_act.floor_bytes(n, True, "backward")


def test_alternating_measurement_of_identical_functions() -> None:
    x = torch.randn(1 << 16)
    times, faults = harness.measure_alternating({"A": lambda: x * 2, "B": lambda: x * 2}, rounds=6, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"A": 6, "B": 6}
    stats = harness.ratio_stats(times, "A", "B")
    assert stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]
    assert set(faults) == {"A", "B"}


def test_saved_bytes_counts_unique_storages_except_owned() -> None:
    case = bn_act.BnActCase((2, 3, 4, 4), "nchw", True)
    from fusedres import reference

    saved = harness.saved_bytes(case.train_call(reference.batch_norm_act), case.owned_storages())
    # Eager: ReLU's output (2*3*4*4 floats) + save_mean + save_invstd; the input and parameters are excluded.
    assert saved["total"] == 2 * 3 * 4 * 4 * 4 + 2 * 3 * 4
    assert sum(t["is_output"] for t in saved["tensors"]) == 1


@pytest.mark.slow  # two fresh processes
def test_peak_memory_grows_with_the_batch() -> None:
    """The fresh-process figure measures the step: 16x the batch of a reference highway MLP saves 16x the
    activations (4 layers of [N, 256] float32 tensors: tens of MB at N = 4096, a few at N = 256)."""
    from fusedres.bench.memory import measure_peak_memory

    kwargs = {"fused": False, "in_features": 256, "hidden": 256, "depth": 4, "num_classes": 10}
    small = measure_peak_memory("highway_mlp", kwargs, batch=256, input_shape=(256,), steps=1, timeout_s=180)
    large = measure_peak_memory("highway_mlp", kwargs, batch=4096, input_shape=(256,), steps=1, timeout_s=180)
    assert small["peak_mb"] is not None and large["peak_mb"] is not None, (small["null_reasons"], large["null_reasons"])
    activations_mb = 4 * 4096 * 256 * 4 / 2**20  # one [4096, 256] float32 tensor per layer: a lower bound
    assert large["peak_mb"] - small["peak_mb"] > activations_mb, (small["peak_mb"], large["peak_mb"])
    assert large["peak_mb"] < 2000 and large["config"]["batch"] == 4096 and large["peak_reset"] is True


@pytest.mark.slow  # two fresh processes (the memory workers)
def test_timm_model_row() -> None:
    """The timm row (issue 13 item 7): fused is fusedres.convert of the timm model, with the reference's weights, so
    the first-step losses agree; the memory workers build the same two models."""
    pytest.importorskip("timm")
    settings = harness.Settings("cpu", False, True, 1, 0.1, 1, 1)
    name = bench_models.TIMM_PREFIX + "resnet50"
    row = bench_models.run(settings, names=[name])["rows"][0]
    assert row["available"] and row["model_name"] == name, row["null_reasons"]
    for impl in ("fused", "reference"):
        assert row["times_ms"][impl] is not None, row["null_reasons"]
        assert row["peak_mb"][impl] is not None, row["null_reasons"]
        assert row["memory"][impl]["config"]["build_kwargs"]["fused"] == (impl == "fused")
    assert row["losses_agree"] is True, row["first_loss"]


def test_torchvision_model_build_fuses() -> None:
    from fusedres.bench.memory import build_model
    from fusedres.nn import BatchNormAct2d

    name = bench_models.TORCHVISION_PREFIX + "mobilenet_v2"
    fused, reference = build_model(name, {"fused": True}), build_model(name, {"fused": False})
    assert all(not isinstance(m, nn.BatchNorm2d) or isinstance(m, BatchNormAct2d) for m in fused.modules())
    assert not any(isinstance(m, BatchNormAct2d) for m in reference.modules())
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert bench_models._unavailable(bench_models.TORCHVISION_PREFIX + "no_such_net").startswith("not available")


def test_timm_model_build_fuses() -> None:
    pytest.importorskip("timm")
    from fusedres.bench.memory import build_model
    from fusedres.nn import BatchNormAct2d

    fused = build_model(bench_models.TIMM_PREFIX + "resnet18", {"fused": True})
    reference = build_model(bench_models.TIMM_PREFIX + "resnet18", {"fused": False})
    assert any(isinstance(m, BatchNormAct2d) for m in fused.modules())
    assert not any(isinstance(m, BatchNormAct2d) for m in reference.modules())
    assert fused.state_dict().keys() == reference.state_dict().keys()

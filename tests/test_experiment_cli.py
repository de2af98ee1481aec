"""The experiments CLI: ``python -m fusedres experiment NAME`` at its tiny preset, plus the plain CIFAR nets.

Every experiment runs in-process through ``fusedres.__main__.main`` with ``--tiny`` (a few seconds each) on one
thread: the JSON schema, the PNG, determinism (the fused numbers of a --compare run and of a --fused run with the
same seed are identical, another seed changes them), and fused vs reference agreement from the same weights.
Nothing here looks at the timings of ``variants``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from fusedres.__main__ import main
from fusedres.experiments import EXPERIMENTS, SCHEMA_VERSION
from fusedres.experiments import variants as variants_mod
from fusedres.experiments._output import Table, format_number
from fusedres.models import get_model, list_models
from fusedres.models.resnet import CifarResNet, PlainBasicBlock

pytest.importorskip("sklearn", reason="the experiments on digits need scikit-learn")
pytest.importorskip("matplotlib", reason="the experiment plots need matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = {
    "experiment",
    "schema_version",
    "seed",
    "implementations",
    "config",
    "results",
    "agreement",
    "timing",
    "environment",
    "files",
}


def _run(name: str, out: Path, *extra: str) -> dict:
    """Runs one experiment at its tiny preset; returns its JSON file, checked against the payload's top level."""
    assert main(["experiment", name, "--tiny", "--quiet", "--threads", "1", "--out", str(out), *extra]) == 0
    payload = json.loads((out / f"{name}.json").read_text())
    assert set(payload) == TOP_KEYS
    assert payload["experiment"] == name and payload["schema_version"] == SCHEMA_VERSION
    assert payload["files"]["json"] == str(out / f"{name}.json")
    return payload


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory) -> dict[str, dict]:
    """Every experiment once with --compare, seed 0 (shared by the tests below)."""
    out = tmp_path_factory.mktemp("compare")
    return {name: _run(name, out, "--compare") for name in EXPERIMENTS}


def _numbers(value) -> list[float]:
    """Every number in a JSON value, in order (to compare runs and check finiteness)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


def test_experiment_names_and_help(capsys) -> None:
    assert list(EXPERIMENTS) == ["gradient-flow", "degradation", "identity", "highway-gates", "variants"]
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)
    with pytest.raises(SystemExit):
        main(["experiment", "gradient-flow", "--help"])
    out = capsys.readouterr().out
    assert "--depths" in out and "(default (5, 10, 20, 50, 100))" in out and "--compare" in out
    assert "--tiny" not in out  # the test preset stays out of the help


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_schema_png_and_agreement(name: str, compare_runs: dict[str, dict], tmp_path: Path) -> None:
    payload = compare_runs[name]
    assert payload["implementations"] == ["fused", "reference"]
    assert payload["seed"] == 0
    png = Path(payload["files"]["png"])
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    numbers = _numbers(payload["results"])
    assert numbers and all(math.isfinite(x) for x in numbers)
    agreement = payload["agreement"]
    assert agreement is not None
    results = payload["results"]
    if name == "gradient-flow":
        assert len(results["fused"]) == len(results["reference"]) == 2 * len(payload["config"]["depths"])
        for rec in results["fused"]:
            assert len(rec["grad_norms_init"]) == len(rec["grad_norms_trained"]) == rec["depth"]
            assert rec["ratio_init"] == pytest.approx(rec["grad_norms_init"][0] / rec["grad_norms_init"][-1])
        # Same weights, same probe batch: the fused and reference gradients agree to float32 rounding.
        assert agreement["grad_norms_init_max_rel_diff"] < 1e-5
        for a, b in zip(results["fused"], results["reference"]):
            torch.testing.assert_close(a["grad_norms_init"], b["grad_norms_init"], rtol=1e-5, atol=0)
        # Judged against the reference in float64: the fused error at most ~2x the float32 reference's own.
        for n in agreement["init_vs_float64"]:
            assert n["fused_vs_float64"] <= 2 * n["reference_vs_float64"] + 1e-6, n
    elif name == "degradation":
        names = [r["name"] for r in results["fused"]]
        assert names == ["plain8", "plain14", "resnet8", "resnet14"]
        for rec in results["fused"]:
            assert len(rec["train_error"]) == len(rec["test_error"]) == payload["config"]["epochs"]
            assert len(rec["batch_loss"]) == payload["config"]["epochs"] * payload["config"]["max_batches"]
            assert all(0 <= e <= 100 for e in rec["train_error"] + rec["test_error"])
        assert agreement["first_batch_loss_max_abs_diff"] < 1e-5
    elif name == "identity":
        for rec in results["fused"]:
            assert len(rec["test_mse"]) == payload["config"]["epochs"] + 1
            assert len(rec["train_mse"]) == payload["config"]["epochs"]
        # A residual stack of one block outputs x + (a batch-normalised branch of unit variance): MSE 1 at init
        # (var / (var + eps) of the branch, exactly).
        residual_1 = next(r for r in results["fused"] if r["kind"] == "residual" and r["depth"] == 1)
        assert residual_1["test_mse"][0] == pytest.approx(1.0, rel=1e-3)
        assert agreement["test_mse_init_max_rel_diff"] < 1e-5
    elif name == "highway-gates":
        for impl in ("fused", "reference"):
            init = results[impl]["init"]
            depth, hidden = payload["config"]["depth"], payload["config"]["hidden"]
            assert len(init["layer_mean"]) == len(init["unit_mean"]) == depth
            assert all(len(u) == hidden for u in init["unit_mean"])
            assert all(0 < t < 1 for t in init["layer_mean"])
            # At init every gate bias is --gate-bias (-2): the gate means sit near sigmoid(-2) = 0.12.
            assert all(b == -2.0 for layer in init["gate_bias"] for b in layer)
            assert init["mean"] == pytest.approx(sum(init["layer_mean"]) / depth)
        assert agreement["layer_mean_init_max_rel_diff"] < 1e-5
    elif name == "variants":
        blocks = {b["kind"]: b for b in results["blocks"]}
        width = payload["config"]["width"]
        assert blocks["dense"]["output_width"] == 3 * width
        assert blocks["residual"]["output_width"] == blocks["highway"]["output_width"] == width
        assert all(b["weights"] == b["weights_formula"] for b in blocks.values())
        assert agreement["block_output_max_abs_diff"] < 1e-5
        assert [m["model"] for m in results["models"]] == list(payload["config"]["models"])
        for m in results["models"]:
            assert m["first_step_loss_abs_diff"] < 1e-5
            errors = m["first_step_loss_rel_error"]  # against the reference in float64
            assert errors["fused"] <= 2 * errors["reference"] + 1e-6, m
        # Timings are recorded apart from the deterministic results, and nothing is asserted about their values.
        assert {t["model"] for t in payload["timing"]["models"]} == set(payload["config"]["models"])


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_deterministic(name: str, compare_runs: dict[str, dict], tmp_path: Path) -> None:
    """The fused numbers of a --fused run equal those of the --compare run with the same seed, bit for bit."""
    fused = _run(name, tmp_path, "--fused", "--no-plot")
    assert fused["implementations"] == ["fused"] and fused["agreement"] is None
    assert fused["files"]["png"] is None and not (tmp_path / f"{name}.png").exists()
    results, compared = fused["results"], compare_runs[name]["results"]
    if name == "variants":  # per block / per model records hold both implementations' values
        for a, b in zip(results["blocks"], compared["blocks"]):
            assert a["weights"] == b["weights"] and a["parameters"] == b["parameters"]
        for a, b in zip(results["models"], compared["models"]):
            assert a["parameters"] == b["parameters"]
            assert a["first_step_loss"]["fused"] == b["first_step_loss"]["fused"]
    else:
        assert results["fused"] == compared["fused"]


def test_seed_changes_the_numbers(compare_runs: dict[str, dict], tmp_path: Path) -> None:
    other = _run("identity", tmp_path, "--compare", "--seed", "1", "--no-plot")
    assert _numbers(other["results"]["fused"]) != _numbers(compare_runs["identity"]["results"]["fused"])


def test_reference_only_and_explicit_sizes(tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    payload = _run(
        "gradient-flow", tmp_path, "--reference", "--depths", "3", "--width", "6", "--steps", "0", "--no-plot"
    )
    out = capsys.readouterr().out
    assert payload["implementations"] == ["reference"] and payload["config"]["depths"] == [3]
    rec_plain = payload["results"]["reference"][0]
    assert rec_plain["kind"] == "plain"
    assert rec_plain["grad_norms_init"] == rec_plain["grad_norms_trained"]  # 0 steps: nothing changed
    assert "gradient-flow (reference)" in out and "tutorial plain" in out
    assert torch.get_num_threads() == threads  # --threads 1 applied to the run only


def test_markdown_tables(tmp_path: Path, capsys) -> None:
    _run("highway-gates", tmp_path, "--no-plot", "--markdown")
    out = capsys.readouterr().out
    assert "| layer | T init | T trained |" in out and "|:---|---:|" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["degradation", "--depths", "21"], "--depths must be CIFAR depths 6n + 2"),
        (["gradient-flow", "--width", "0"], "--width must be positive"),
        (["variants", "--width", "7"], "--width must be even"),
        (["variants", "--models", "resnet19"], "--models must be registered models"),
        (["identity", "--batch-size", "1"], "--batch-size must be at least 2"),
    ],
)
def test_bad_options_name_the_option(argv: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["experiment", *argv, "--tiny", "--quiet", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_missing_matplotlib_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match="need matplotlib.*--no-plot"):
        main(["experiment", "variants", "--tiny", "--quiet", "--threads", "1", "--out", str(tmp_path)])


def test_tutorial_block_counts_at_width_32() -> None:
    """The block definitions reproduce the tutorial's figures: residual 2,048, dense 3,584 (output 96), highway
    2,048 weights at width 32."""
    x = torch.randn(4, 32)
    got = {}
    for kind, (block, _) in variants_mod.BLOCKS.items():
        module = block(32, fused=True)
        weights = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1)
        got[kind] = (weights, module(x).shape[1])
    assert got == {"residual": (2048, 32), "dense": (3584, 96), "highway": (2048, 32)}


def test_table_formatting() -> None:
    assert [format_number(v) for v in (None, 2048, 0.1544, 1234.5, 3e-7, float("nan"), "x")] == [
        "-",
        "2,048",
        "0.154",
        "1,234",
        "3.00e-07",
        "nan",
        "x",
    ]
    table = Table("t", ["a", "b"])
    with pytest.raises(ValueError, match="must have 2 values"):
        table.add(1)


# --------------------------------------------------------------------------------------------------------------
# The plain CIFAR nets (fusedres.models.resnet: CifarResNet(shortcut=False), registered as plain20 ... plain56)


def test_plain_nets_registered_same_parameters_as_resnets() -> None:
    assert {"plain20", "plain32", "plain44", "plain56"} <= set(list_models())
    torch.manual_seed(0)
    plain, resnet = get_model("plain20"), get_model("resnet20")
    assert sum(p.numel() for p in plain.parameters()) == 269_722
    assert all(isinstance(b, PlainBasicBlock) for s in (plain.layer1, plain.layer2, plain.layer3) for b in s)
    assert not any(type(m).__name__ == "ShortcutA" for m in plain.modules())
    plain.load_state_dict(resnet.state_dict(), strict=True)  # the same parameter names and shapes


def test_plain_net_has_no_shortcut_and_fused_matches_reference() -> None:
    torch.manual_seed(0)
    ref = CifarResNet(8, 10, fused=False, shortcut=False)
    fused = CifarResNet(8, 10, fused=True, shortcut=False)
    fused.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(fused(x), ref(x))
    block = ref.layer1[0].eval()
    h = torch.randn(2, 16, 8, 8)
    expected = block.bn2(block.conv2(block.bn1(block.conv1(h))))
    torch.testing.assert_close(block(h), expected)  # nothing added
    residual = CifarResNet(8, 10, fused=False)
    residual.load_state_dict(ref.state_dict(), strict=True)
    assert not torch.allclose(residual.eval()(x), ref.eval()(x))  # the shortcuts are the only difference
    with pytest.raises(ValueError, match="zero_init_residual=True needs shortcut=True"):
        CifarResNet(8, shortcut=False, zero_init_residual=True)

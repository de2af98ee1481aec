"""The training CLI: ``python -m fusedres train`` end to end on a few batches, and its data pipeline.

Runs in-process through ``fusedres.__main__.main`` (plus one subprocess for the entry point and one torchrun
launch for --distributed). Every run is 1 epoch of at most 2 batches of 8 images on the CPU.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedres import data as fdata
from fusedres.__main__ import main
from fusedres.models import get_model

pytest.importorskip("sklearn", reason="the default training data (scikit-learn's digits) needs scikit-learn")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "resnet20"
TINY = ["--model", MODEL, "--epochs", "1", "--max-batches", "2", "--batch-size", "8", "--quiet", "--threads", "2"]
EPOCH_LINE = re.compile(
    r"^epoch 1/1  loss (\d+\.\d{4})  train acc +(\d+\.\d)%  test acc +(\d+\.\d)%  ([\d.]+) img/s  \([\d.]+ s\)$",
    re.MULTILINE,
)
NUM = r"(\d+(?:\.\d+)?(?:e[-+]\d+)?)"


def _run(argv: list[str], capsys) -> str:
    assert main(["train", *argv]) == 0
    return capsys.readouterr().out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_epoch_line_and_header(capsys):
    out = _run(TINY, capsys)
    assert f"fusedres train: {MODEL} (fused, 269,722 parameters) on digits (scikit-learn)" in out
    assert "1500 train / 297 test images 3x32x32, 10 classes" in out
    assert "at most 2 batches per epoch" in out
    match = EPOCH_LINE.search(out)
    assert match, out
    loss, train_acc, test_acc, rate = map(float, match.groups())
    assert 0.5 < loss < 10 and 0 <= train_acc <= 100 and 0 <= test_acc <= 100 and rate > 0


def test_compare_curves_agree(capsys, tmp_path):
    # NCHW: the bounds below are float32 rounding of identical computations. In channels_last PyTorch's own
    # float32 convolutions are ~5x less accurate (gradients 1.5e-5 relative to float64 vs 3e-6 in NCHW, fused and
    # reference alike), and one SGD step amplifies that to ~1e-3 in the second batch's loss.
    out = _run([*TINY, "--memory-format", "contiguous", "--compare", "--save", str(tmp_path / "c.pt")], capsys)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch ") and "speedup" in line)
    assert "fused" in lines[header - 1] and "reference" in lines[header - 1]
    row = re.match(
        rf"^epoch 1/1 +{NUM} +{NUM}% +{NUM}% +{NUM} +{NUM} +{NUM}% +{NUM}% +{NUM} +{NUM}x$", lines[header + 1]
    )
    assert row, lines[header + 1]
    f_loss, f_acc, f_test, _, r_loss, r_acc, r_test, _, speedup = map(float, row.groups())
    one_image = 100 / 16 + 0.05  # 2 batches of 8: one prediction flipped by float32 rounding at most
    assert abs(f_loss - r_loss) <= 1e-4 and speedup > 0
    assert abs(f_acc - r_acc) <= one_image and abs(f_test - r_test) <= one_image
    diff = re.search(
        rf"loss \|fused - reference\|: first batch {NUM} \(same weights, same batch\); max {NUM} per batch", out
    )
    assert diff, out
    assert float(diff.group(1)) < 1e-5  # the same function on the same batch
    assert float(diff.group(2)) < 1e-4  # two float32 SGD steps from identical weights on identical batches
    assert re.search(rf"test accuracy: fused {NUM}%, reference {NUM}%", out), out
    assert re.search(rf"speedup \(training images/s, fused / reference\): {NUM}x \(epoch 1, incl. warm-up\)", out), out
    ckpt = _load(tmp_path / "c.pt")
    assert ckpt["fused"] is True and len(ckpt["history"][0]["batch_losses"]) == 2


@pytest.mark.parametrize("model", ["resnet110_sd", "shake_shake_26_2x32d"])
def test_compare_gives_both_models_the_same_random_draws(capsys, model):
    """Stochastic depth masks and Shake-Shake's alpha / beta are drawn in forward: each model's epoch starts from the
    same random state, so the fused and the reference model see the same draws (same loss on the first batch)."""
    argv = ["--model", model, "--epochs", "1", "--max-batches", "1", "--batch-size", "8", "--quiet", "--threads", "2"]
    out = _run([*argv, "--memory-format", "contiguous", "--compare"], capsys)
    diff = re.search(rf"loss \|fused - reference\|: first batch {NUM}", out)
    assert diff, out
    assert float(diff.group(1)) < 1e-5


def test_save_loads_strictly_into_reference(capsys, tmp_path):
    path = tmp_path / "ckpt.pt"
    out = _run([*TINY, "--save", str(path), "--channels-last"], capsys)
    assert f"saved fused checkpoint to {path}" in out
    ckpt = _load(path)
    assert ckpt["model"] == MODEL and ckpt["num_classes"] == 10 and ckpt["args"]["epochs"] == 1
    reference = get_model(ckpt["model"], fused=False, num_classes=ckpt["num_classes"])
    reference.load_state_dict(ckpt["state_dict"], strict=True)
    fused = get_model(ckpt["model"], fused=True, num_classes=ckpt["num_classes"])
    fused.load_state_dict(ckpt["state_dict"], strict=True)
    assert int(ckpt["state_dict"]["bn1.num_batches_tracked"]) == 2  # the trained weights, not a fresh model
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(fused.eval()(x), reference.eval()(x))


def test_same_seed_same_run(capsys, tmp_path):
    runs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _run([*TINY, "--seed", seed, "--save", str(tmp_path / f"{name}.pt")], capsys)
        runs.append(_load(tmp_path / f"{name}.pt"))
    a, b, c = runs
    assert a["history"][0]["batch_losses"] == b["history"][0]["batch_losses"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["history"][0]["batch_losses"] != c["history"][0]["batch_losses"]  # the seed matters


def _fake_cifar(root: Path, per_batch: int = 6) -> Path:
    gen = torch.Generator().manual_seed(1)
    for name in (*fdata.CIFAR10_TRAIN_FILES, fdata.CIFAR10_TEST_FILE):
        images = torch.randint(0, 256, (per_batch, 3072), dtype=torch.uint8, generator=gen).numpy()
        labels = torch.randint(0, 10, (per_batch,), generator=gen).tolist()
        with (root / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": images, b"labels": labels}, f)
    return root


def test_fake_cifar_data_dir(capsys, tmp_path):
    root = _fake_cifar(tmp_path)
    data = fdata.load_cifar10(root)
    assert data.train.images.shape == (30, 3, 32, 32) and data.test.images.shape == (6, 3, 32, 32)
    with (root / "data_batch_2").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(data.train.images[6:12].reshape(6, -1), torch.as_tensor(raw[b"data"]))
    out = _run([*TINY, "--data-dir", str(root), "--amp"], capsys)
    assert f"on cifar10 ({root}): 30 train / 6 test images 3x32x32, 10 classes, crop+flip augmentation" in out
    assert "cpu, autocast bfloat16, channels_last (--memory-format auto: channels_last on the CPU)" in out
    assert EPOCH_LINE.search(out), out


def test_augmentation_crop_flip():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    centre = torch.tensor([[2, 2], [2, 2]])
    same = fdata._random_crop_flip(images, centre, torch.tensor([False, True]), padding=2)
    assert torch.equal(same[0], images[0]) and torch.equal(same[1], images[1].flip(-1))
    shifted = fdata._random_crop_flip(images, torch.tensor([[0, 4], [4, 0]]), torch.tensor([False, False]), 2)
    assert torch.equal(shifted[0, :, 2:, :3], images[0, :, :3, 2:]) and (shifted[0, :, :2] == 0).all()
    assert torch.equal(shifted[1, :, :3, 2:], images[1, :, 2:, :3]) and (shifted[1, :, 3:] == 0).all()


def test_batches_order_is_seeded_and_shards_the_global_batch(tmp_path):
    data = fdata.load_cifar10(_fake_cifar(tmp_path))

    def labels_of(**kw):
        return [y for _, y in fdata.batches(data, "train", 10, **kw)]

    one = labels_of(epoch=1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(one, labels_of(epoch=1, seed=5)))
    images = {r: [x for x, _ in fdata.batches(data, "train", 5, epoch=1, seed=5, rank=r, world_size=2)] for r in (0, 1)}
    full = [x for x, _ in fdata.batches(data, "train", 10, epoch=1, seed=5)]
    for step, batch in enumerate(full):  # the two ranks' batches are the single process's global batch, augmented alike
        merged = torch.cat([images[0][step], images[1][step]])
        assert torch.equal(merged.sum((1, 2, 3)).sort().values, batch.sum((1, 2, 3)).sort().values)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "no_such_net"],
            r"--model must be one of the registered models \[.*'resnet20'.*\], got 'no_such_net'",
        ),
        (["--data-dir", "/nonexistent/cifar"], r"--data-dir must be a CIFAR-10 directory .*'/nonexistent/cifar'"),
        (["--batch-size", "0"], r"--batch-size must be a positive integer, got 0"),
        (["--distributed"], r"--distributed must be launched by torchrun .*RANK"),
    ],
)
def test_errors(argv, message, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    base = [a for a in TINY if a not in ("--model", MODEL)] if "--model" in argv else TINY
    with pytest.raises(SystemExit, match=message):
        main(["train", *base, *argv])


def test_error_missing_cifar_file(tmp_path):
    root = _fake_cifar(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(SystemExit, match=r"must hold the CIFAR-10 python batches .*missing \['data_batch_3'\]"):
        main(["train", *TINY, "--data-dir", str(root)])


def test_error_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import raises ImportError
    fdata.load_digits.cache_clear()  # the digits of earlier tests are cached
    with pytest.raises(SystemExit, match=r"needs scikit-learn.*`pip install scikit-learn`"):
        main(["train", *TINY])


def _subprocess(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_entry_point_subprocess():
    proc = _subprocess([sys.executable, "-m", "fusedres", "train", *TINY, "--reference", "--max-batches", "1"], 120)
    assert proc.returncode == 0, proc.stderr
    assert f"{MODEL} (reference, 269,722 parameters)" in proc.stdout
    assert EPOCH_LINE.search(proc.stdout), proc.stdout


def test_distributed_torchrun(tmp_path):
    import fusedres.nn

    if not hasattr(fusedres.nn, "convert_sync_batchnorm"):
        pytest.fail("fusedres.nn.convert_sync_batchnorm is missing: --distributed cannot run")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun not found next to the Python interpreter"
    path = tmp_path / "ddp.pt"
    # NCHW: the losses below agree to float32 rounding (see test_compare_curves_agree on channels_last).
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fusedres", "train", *TINY, "--memory-format", "contiguous"]
    proc = _subprocess([*cmd, "--threads", "1", "--distributed", "--save", str(path)], 240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch 8 (2 processes x 4)" in proc.stdout, proc.stdout
    assert len(EPOCH_LINE.findall(proc.stdout)) == 1, proc.stdout  # rank 0 prints, rank 1 does not
    ckpt = _load(path)
    reference = get_model(MODEL, fused=False, num_classes=10)
    reference.load_state_dict(ckpt["state_dict"], strict=True)  # SyncBatchNorm keeps BatchNorm's state_dict
    # Same global batches, synchronised BatchNorm statistics, averaged gradients: the single-process run's losses.
    assert main(["train", *TINY, "--memory-format", "contiguous", "--save", str(tmp_path / "one.pt")]) == 0
    single = _load(tmp_path / "one.pt")
    assert len(single["history"][0]["batch_losses"]) == 2
    torch.testing.assert_close(
        ckpt["history"][0]["batch_losses"], single["history"][0]["batch_losses"], rtol=1e-5, atol=1e-5
    )


def test_memory_format_default_is_channels_last_on_cpu(capsys):
    out = _run([*TINY, "--device", "cpu"], capsys)
    assert "channels_last (--memory-format auto: channels_last on the CPU)" in out, out
    out = _run([*TINY, "--device", "cpu", "--memory-format", "contiguous"], capsys)
    assert ", NCHW, torch threads" in out, out

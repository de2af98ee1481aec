"""The training behind ``python -m fusedres train`` (its options: fusedres/cli/train.py): :func:`train` runs what
the parsed options describe — fused, reference or both side by side, single process or DDP — and prints its report.

Data: scikit-learn's digits (default) or CIFAR-10 (fusedres/data.py). SGD with momentum and weight decay, cosine
annealing per epoch, cross-entropy. Deterministic for a given seed: weights, data order and augmentation.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.data import ImageDataset, batches, load_cifar10, load_digits

__all__ = ["EpochStats", "train"]


@dataclass
class EpochStats:
    """What one epoch of one model measured (global figures when distributed)."""

    loss: float  # mean training loss over the epoch's images
    acc: float  # training accuracy, percent
    test_loss: float
    test_acc: float  # percent
    images: int  # training images seen
    seconds: float  # training time (the test pass excluded)
    batch_losses: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "acc": self.acc,
            "test_loss": self.test_loss,
            "test_acc": self.test_acc,
            "images": self.images,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "batch_losses": self.batch_losses,
        }


@dataclass
class _Env:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int
    world_size: int
    local_batch: int
    max_batches: int | None
    seed: int
    show_progress: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_input(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t


class _Runner:
    """One model with its optimiser, schedule and history."""

    def __init__(self, label: str, model: nn.Module, args: argparse.Namespace, env: _Env) -> None:
        self.label = label
        self.module = model  # the bare model (checkpoints, evaluation)
        self.model = model  # what trains (DDP-wrapped when distributed)
        if env.distributed:
            # fusedres's DDP: torch's, except that it accepts CPU modules holding fused SyncBatchNormAct2d (gloo).
            from fusedres.nn import DistributedDataParallel

            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs)
        use_scaler = env.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=use_scaler) if use_scaler else None
        self.loss_fn = nn.CrossEntropyLoss()
        self.history: list[EpochStats] = []


def _num_batches(n: int, env: _Env) -> int:
    per_rank = math.ceil(n / env.world_size)
    count = math.ceil(per_rank / env.local_batch)
    return count if env.max_batches is None else min(count, env.max_batches)


def _progress(total: int, desc: str, env: _Env):
    """A tqdm bar on stderr on rank 0 when wanted and tqdm is installed, else None."""
    if not env.show_progress or not env.is_main:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)


def _train_epoch(runner: _Runner, data: ImageDataset, epoch: int, epochs: int, env: _Env) -> EpochStats:
    runner.model.train()
    n_batches = _num_batches(len(data.train), env)
    bar = _progress(n_batches, f"epoch {epoch + 1}/{epochs} {runner.label}", env)
    losses: list[Tensor] = []  # per batch: (sum of losses, images) on the device, read once at the end
    correct = torch.zeros((), dtype=torch.int64, device=env.device)
    env.synchronize()
    start = time.perf_counter()
    # Every model's epoch starts from the same random state (restored afterwards), so the random draws made in
    # forward (dropout, stochastic depth masks, Shake-Shake's alpha / beta) are the same for the fused and the
    # reference model of --compare, step by step.
    cuda_devices = [env.device.index or 0] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(env.seed * 1_000_003 + epoch + 1)
        try:
            for step, (images, labels) in enumerate(
                batches(
                    data,
                    "train",
                    env.local_batch,
                    epoch=epoch,
                    seed=env.seed,
                    rank=env.rank,
                    world_size=env.world_size,
                    max_batches=env.max_batches,
                )
            ):
                images, labels = env.to_input(images), labels.to(env.device, non_blocking=True)
                with env.autocast():
                    logits = runner.model(images)
                    loss = runner.loss_fn(logits, labels)
                runner.optimizer.zero_grad(set_to_none=True)
                if runner.scaler is not None:
                    runner.scaler.scale(loss).backward()
                    runner.scaler.step(runner.optimizer)
                    runner.scaler.update()
                else:
                    loss.backward()
                    runner.optimizer.step()
                loss = loss.detach().float()
                losses.append(torch.stack([loss * labels.numel(), torch.tensor(labels.numel(), device=env.device)]))
                correct += (logits.detach().argmax(1) == labels).sum()
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step + 1 == n_batches:
                        bar.set_postfix(loss=f"{loss.item():.4f}")
            env.synchronize()
            seconds = time.perf_counter() - start
        finally:
            if bar is not None:
                bar.close()
    runner.scheduler.step()
    per_batch = torch.stack(losses).double() if losses else torch.zeros(0, 2, dtype=torch.float64, device=env.device)
    per_batch = env.all_reduce_sum(per_batch)
    totals = env.all_reduce_sum(torch.stack([per_batch[:, 0].sum(), per_batch[:, 1].sum(), correct.double()]))
    loss_sum, images, correct_sum = totals.tolist()
    test_loss, test_acc = _evaluate(runner, data, env)
    return EpochStats(
        loss=loss_sum / max(images, 1),
        acc=100.0 * correct_sum / max(images, 1),
        test_loss=test_loss,
        test_acc=test_acc,
        images=int(images),
        seconds=seconds,
        batch_losses=(per_batch[:, 0] / per_batch[:, 1]).tolist(),
    )


@torch.no_grad()
def _evaluate(runner: _Runner, data: ImageDataset, env: _Env) -> tuple[float, float]:
    """(mean test loss, test accuracy in percent) of the bare model in eval mode, over every rank's share."""
    model = runner.module
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, images
    for images, labels in batches(
        data, "test", env.local_batch, rank=env.rank, world_size=env.world_size, max_batches=env.max_batches
    ):
        images, labels = env.to_input(images), labels.to(env.device, non_blocking=True)
        with env.autocast():
            logits = model(images)
        logits = logits.float()
        totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.numel()
    loss_sum, correct, count = env.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def _build_model(name: str, fused: bool, num_classes: int, env: _Env) -> nn.Module:
    from fusedres.models import get_model

    model = get_model(name, fused=fused, num_classes=num_classes)
    model = model.to(env.device)
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_sync_batchnorm(model: nn.Module) -> nn.Module:
    try:
        from fusedres.nn import convert_sync_batchnorm
    except ImportError as e:
        raise SystemExit(
            f"--distributed needs fusedres.nn.convert_sync_batchnorm, which this fusedres does not provide ({e})"
        ) from e
    return convert_sync_batchnorm(model)


def _fmt_rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


_COLUMNS = f"{'loss':>7} {'train':>6} {'test':>6} {'img/s':>7}"


def _print_compare_header(epochs: int) -> None:
    width = 2 * len(str(epochs)) + 7  # "epoch e/E"
    print(f"{'':<{width}}  {'fused':<{len(_COLUMNS)}}  reference", flush=True)
    print(f"{'epoch':<{width}}  {_COLUMNS}  {_COLUMNS}  {'speedup':>7}", flush=True)


def _print_epoch(epoch: int, epochs: int, runners: list[_Runner]) -> None:
    """One line per epoch: loss, accuracies and images/s (of both models and their ratio with --compare)."""
    head = f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}"
    if len(runners) == 1:
        s = runners[0].history[-1]
        print(
            f"{head}  loss {s.loss:.4f}  train acc {s.acc:5.1f}%  test acc {s.test_acc:5.1f}%  "
            f"{_fmt_rate(s.images_per_s)} img/s  ({s.seconds:.1f} s)",
            flush=True,
        )
        return
    cells = []
    for r in runners:
        s = r.history[-1]
        cells.append(f"{s.loss:>7.4f} {s.acc:>5.1f}% {s.test_acc:>5.1f}% {_fmt_rate(s.images_per_s):>7}")
    speedup = runners[0].history[-1].images_per_s / runners[1].history[-1].images_per_s
    print(f"{head}  {cells[0]}  {cells[1]}  {speedup:>6.2f}x", flush=True)


def _print_compare_summary(fused: _Runner, ref: _Runner) -> dict[str, float]:
    batch_diff = max(
        (abs(a - b) for sf, sr in zip(fused.history, ref.history) for a, b in zip(sf.batch_losses, sr.batch_losses)),
        default=0.0,
    )
    epoch_diff = max((abs(sf.loss - sr.loss) for sf, sr in zip(fused.history, ref.history)), default=0.0)
    acc_diff = max((abs(sf.test_acc - sr.test_acc) for sf, sr in zip(fused.history, ref.history)), default=0.0)
    # Epoch 1 pays one-time costs (allocations, oneDNN primitives): the overall ratio leaves it out when it can.
    skip = 1 if len(fused.history) > 1 else 0
    timed = (
        "epoch 1, incl. warm-up"
        if not skip
        else "epoch 2"
        if len(fused.history) == 2
        else f"epochs 2-{len(fused.history)}"
    )

    def rate(r: _Runner) -> float:
        return sum(s.images for s in r.history[skip:]) / sum(s.seconds for s in r.history[skip:])

    overall = rate(fused) / rate(ref)
    ratios = [sf.images_per_s / sr.images_per_s for sf, sr in zip(fused.history, ref.history)]
    first = [s.batch_losses[:1] for s in (fused.history[0], ref.history[0])]
    first_diff = abs(first[0][0] - first[1][0]) if first[0] and first[1] else 0.0
    print(
        f"loss |fused - reference|: first batch {first_diff:.2e} (same weights, same batch); max {batch_diff:.2e} "
        f"per batch, {epoch_diff:.2e} per epoch mean (SGD amplifies rounding differences step by step)"
    )
    print(
        f"test accuracy: fused {fused.history[-1].test_acc:.1f}%, reference {ref.history[-1].test_acc:.1f}% "
        f"(max difference over the epochs {acc_diff:.1f} points)"
    )
    spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
    print(
        f"speedup (training images/s, fused / reference): {overall:.2f}x ({timed}), "
        f"median per epoch {statistics.median(ratios):.2f}x{spread}",
        flush=True,
    )
    return {
        "first_batch_loss_diff": first_diff,
        "max_batch_loss_diff": batch_diff,
        "max_epoch_loss_diff": epoch_diff,
        "speedup": overall,
    }


def _resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _load_data(args: argparse.Namespace) -> ImageDataset:
    try:
        return load_cifar10(args.data_dir) if args.data_dir is not None else load_digits()
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        raise SystemExit(f"python -m fusedres train: {e}") from e


def _init_distributed(args: argparse.Namespace) -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the default process group from torchrun's variables."""
    if not args.distributed:
        return 0, 1, 0
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SystemExit(
            f"--distributed must be launched by torchrun (e.g. torchrun --nproc-per-node 2 -m fusedres train ... "
            f"--distributed); the environment lacks {missing}"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the training that ``args`` describes (the options of fusedres.cli.train, checked there) and prints its
    report.

    Returns:
        {"history": {label: [per-epoch dicts]}, "compare": summary or None}; what rank 0 printed.
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world_size, local_rank = _init_distributed(args)
    try:
        return _train(args, rank, world_size, local_rank)
    finally:
        if args.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args: argparse.Namespace, rank: int, world_size: int, local_rank: int) -> dict[str, Any]:
    if args.batch_size % world_size:
        raise SystemExit(
            f"--batch-size (the global batch) must be divisible by the number of processes {world_size}, "
            f"got {args.batch_size}"
        )
    device = _resolve_device(args.device, local_rank)
    if world_size > 1 and device.type == "cpu" and (args.reference or args.compare):
        raise SystemExit(
            "--distributed on the CPU trains the fused model only (--reference/--compare need PyTorch's "
            "SyncBatchNorm kernel, which needs CUDA)"
        )
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    channels_last = args.memory_format == "channels_last" or (args.memory_format == "auto" and device.type == "cpu")
    env = _Env(
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        rank=rank,
        world_size=world_size,
        local_batch=args.batch_size // world_size,
        max_batches=args.max_batches,
        seed=args.seed,
        show_progress=not args.quiet and sys.stderr.isatty(),
    )
    data = _load_data(args)

    torch.manual_seed(args.seed)
    labels = ["reference"] if args.reference else ["fused", "reference"] if args.compare else ["fused"]
    first = _build_model(args.model, labels[0] == "fused" and not args.compare, data.num_classes, env)
    models = {("reference" if args.compare else labels[0]): first}
    if args.compare:  # the fused model starts from the reference's weights and buffers
        fused = _build_model(args.model, True, data.num_classes, env)
        fused.load_state_dict(first.state_dict(), strict=True)
        models["fused"] = fused
    if env.distributed:
        models = {k: _to_sync_batchnorm(m) for k, m in models.items()}
    runners = [_Runner(label, models[label], args, env) for label in labels]

    if env.is_main:
        n_params = sum(p.numel() for p in first.parameters())
        kind = "fused and reference" if args.compare else labels[0]
        per_rank = f" ({world_size} processes x {env.local_batch})" if world_size > 1 else ""
        precision = f"autocast {str(amp_dtype).removeprefix('torch.')}" if amp_dtype is not None else "float32"
        print(
            f"fusedres train: {args.model} ({kind}, {n_params:,} parameters) on {data.name}: "
            f"{len(data.train)} train / {len(data.test)} test images {'x'.join(map(str, data.image_shape))}, "
            f"{data.num_classes} classes{', crop+flip augmentation' if data.augment else ''}",
            flush=True,
        )
        print(
            f"  {args.epochs} epochs, batch {args.batch_size}{per_rank}, SGD lr {args.lr:g} cosine, momentum "
            f"{args.momentum:g}, weight decay {args.weight_decay:g}; {device}, {precision}, "
            f"{'channels_last' if channels_last else 'NCHW'}"
            f"{' (--memory-format auto: channels_last on the CPU)' if args.memory_format == 'auto' else ''}, torch threads {torch.get_num_threads()}, seed {args.seed}"
            + (f", at most {args.max_batches} batches per epoch" if args.max_batches else ""),
            flush=True,
        )

    if args.compare and env.is_main:
        _print_compare_header(args.epochs)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = runners if epoch % 2 == 0 else runners[::-1]  # alternate who runs first (fair timing)
        for runner in order:
            runner.history.append(_train_epoch(runner, data, epoch, args.epochs, env))
        if env.is_main:
            _print_epoch(epoch, args.epochs, runners)

    result: dict[str, Any] = {"history": {r.label: [s.as_dict() for s in r.history] for r in runners}, "compare": None}
    if env.is_main:
        if args.compare:
            result["compare"] = _print_compare_summary(runners[0], runners[1])
        last = runners[0].history[-1]
        print(f"done in {time.perf_counter() - start:.1f} s: test acc {last.test_acc:.1f}% ({runners[0].label})")
        if args.save:
            _save(args, runners[0], data, result)
            print(f"saved {runners[0].label} checkpoint to {args.save}", flush=True)
    return result


def _save(args: argparse.Namespace, runner: _Runner, data: ImageDataset, result: dict[str, Any]) -> None:
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in runner.module.state_dict().items()}
    torch.save(
        {
            "model": args.model,
            "fused": runner.label == "fused",
            "num_classes": data.num_classes,
            "state_dict": state_dict,
            "args": dict(vars(args)),
            "history": result["history"][runner.label],
        },
        args.save,
    )

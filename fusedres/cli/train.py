"""``python -m fusedres train``: train a registered model, fused or reference, or both side by side.

    python -m fusedres train --model resnet20 --epochs 10              # fused model, scikit-learn digits
    python -m fusedres train --model resnet20 --epochs 10 --compare    # fused and reference, same weights and data
    python -m fusedres train --model resnet56 --data-dir ~/cifar-10-batches-py --channels-last --save r56.pt
    torchrun --nproc-per-node 2 -m fusedres train --model resnet20 --distributed   # DDP + fused SyncBatchNorm

Data: scikit-learn's handwritten digits by default (ships with scikit-learn, works offline; 1500 / 297 images
upsampled to 3x32x32), or CIFAR-10 from ``--data-dir`` (python pickle layout; random 4-pixel-padded crop +
horizontal flip). Optimiser: SGD with (heavy-ball, not Nesterov) momentum and weight decay on every parameter,
cosine learning-rate annealing per epoch (CosineAnnealingLR, T_max = epochs), cross-entropy loss.

Determinism: ``--seed`` seeds the weights (torch.manual_seed), the data order (a seeded DistributedSampler)
and the augmentation (a function of seed, epoch and sample): the same command gives the same losses.
``--compare`` builds the reference model, loads its state_dict into the fused one and trains both on the same
batches, epochs interleaved (alternating which goes first), then prints the max |loss difference| and the
speedup (images/s ratio).

``--batch-size`` is the global batch: with ``--distributed`` each of the N processes takes batch-size / N of
it, gradients are averaged by DDP and BatchNorm statistics are synchronised (fusedres.nn.convert_sync_batchnorm),
so the run follows the single-process one on the same global batches.
"""

from __future__ import annotations

import argparse

from fusedres.training import train

__all__ = ["HELP", "add_arguments", "main", "validate"]

HELP = "train a model (fused, reference or both side by side) on digits or CIFAR-10"
DEFAULT_MODEL = "resnet20"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fusedres train``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered model name (default {DEFAULT_MODEL})")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--reference", action="store_true", help="train the pure-PyTorch reference model")
    which.add_argument(
        "--compare",
        action="store_true",
        help="train the fused and the reference model from the same weights on the same batches, side by side",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (cosine-annealed to 0)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument(
        "--data-dir", metavar="DIR", help="CIFAR-10 in its python pickle layout (default: scikit-learn's digits)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--memory-format",
        choices=("auto", "channels_last", "contiguous"),
        default="auto",
        help="layout of the model and its inputs; auto (default): channels_last on the CPU, where convolutions and "
        "the fused kernels are fastest in it, contiguous (NCHW) on CUDA",
    )
    parser.add_argument(
        "--channels-last",
        dest="memory_format",
        action="store_const",
        const="channels_last",
        help="same as --memory-format channels_last",
    )
    parser.add_argument(
        "--amp", action="store_true", help="autocast: bfloat16 on the CPU, float16 with a GradScaler on CUDA"
    )
    parser.add_argument(
        "--max-batches", type=int, metavar="N", help="stop every epoch (training and test) after N batches"
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    parser.add_argument(
        "--save", metavar="PATH", help="checkpoint {model, state_dict, args, ...} (of the fused model with --compare)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is no TTY)")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="DDP + fused SyncBatchNorm; launch with torchrun --nproc-per-node N (gloo on CPU, NCCL on CUDA)",
    )


def validate(args: argparse.Namespace) -> None:
    """SystemExit naming the option when a value is out of range or the model is not registered."""
    for name in ("epochs", "batch_size", "max_batches", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")
    from fusedres.models import list_models

    if args.model not in list_models():
        raise SystemExit(f"--model must be one of the registered models {list_models()}, got {args.model!r}")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m fusedres train`` (parsed options of :func:`add_arguments`)."""
    validate(args)
    train(args)
    return 0

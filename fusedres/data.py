"""In-memory image datasets for ``python -m fusedres train``: scikit-learn's digits (default) and CIFAR-10.

Both are held whole in memory as tensors and served in batches by :func:`batches`: no DataLoader, no worker
processes. The order of every epoch comes from a :class:`torch.utils.data.DistributedSampler` seeded with
``seed`` (one replica in a single process), and the random augmentation of a sample is a function of
``(seed, epoch, sample index)`` only, so the same seed gives the same batches, bit for bit, in every run, and a
multi-process run sees the same global batches and augmentations as a single process with the same global
batch size.

scikit-learn is an optional dependency, imported only when the digits are loaded.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "ImageDataset", "Split", "batches", "load_cifar10", "load_digits"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
DIGITS_TRAIN_SIZE = 1500  # of 1797; the remaining 297 are the test set
DIGITS_SPLIT_SEED = 0  # the split is fixed: it does not depend on the training seed


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        images: Tensor[N, 3, H, W], uint8 (0-255) or float32 (0-1), NCHW, contiguous.
        labels: Tensor[N] int64 class indices.
    """

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass
class ImageDataset:
    """A train and a test split with their normalisation and augmentation.

    Attributes:
        name: what the dataset is ("digits", "cifar10 (DIR)").
        train, test: the splits.
        num_classes: number of classes (labels are in [0, num_classes)).
        mean, std: per-channel normalisation applied to the [0, 1] images, Tensor[3].
        augment: random crop with ``crop_padding`` pixels of zero padding + horizontal flip on training batches.
        crop_padding: padding of the random crop, in pixels.
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    mean: Tensor
    std: Tensor
    augment: bool
    crop_padding: int = 4

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.images.shape[1:])


@functools.cache
def load_digits() -> ImageDataset:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes) as 3x32x32 images.

    Built once per process and cached: treat the returned tensors as read-only.

    Each image is scaled to [0, 1], upsampled 4x (bilinear) and repeated on 3 channels; normalised with the
    training split's mean and standard deviation. The 1500 / 297 train / test split is fixed (a permutation drawn
    with seed 0). No augmentation: flipped digits are other digits, and the upsampled images are already blurred.

    Returns:
        ImageDataset with float32 images.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed (the message says how to install it).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ModuleNotFoundError(
            "the default training data (scikit-learn's handwritten digits) needs scikit-learn, which is not "
            f"installed ({e}): `pip install scikit-learn` (or `pip install 'fusedres[cli]'`), or pass --data-dir "
            "with a CIFAR-10 directory (python pickle layout)",
            name="sklearn",
        ) from e
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, scale_factor=4, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    train_idx, test_idx = order[:DIGITS_TRAIN_SIZE], order[DIGITS_TRAIN_SIZE:]
    train = Split(images[train_idx].contiguous(), labels[train_idx].contiguous())
    test = Split(images[test_idx].contiguous(), labels[test_idx].contiguous())
    mean = train.images.mean(dim=(0, 2, 3))
    std = train.images.std(dim=(0, 2, 3))
    return ImageDataset("digits (scikit-learn)", train, test, 10, mean, std, augment=False)


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"--data-dir: {path} is not a CIFAR-10 python pickle batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"--data-dir: {path} must hold a dict with keys b'data' and b'labels', got {keys}")
    data = torch.as_tensor(batch[b"data"])
    labels = torch.as_tensor(batch[b"labels"], dtype=torch.int64)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"--data-dir: b'data' of {path} must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"--data-dir: b'labels' of {path} must have one label per image ({data.shape[0]}), got {labels.numel()}"
        )
    return data.view(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | Path) -> ImageDataset:
    """CIFAR-10 from its python pickle layout (as in ``cifar-10-python.tar.gz``).

    Args:
        data_dir: a directory holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickled dict
            with b"data" (uint8 [N, 3072], channel-major 3x32x32 rows) and b"labels" (N ints in [0, 10)); the
            ``cifar-10-batches-py`` folder inside it is accepted too.

    Returns:
        ImageDataset with uint8 images, the usual CIFAR-10 mean/std and crop + flip augmentation.

    Raises:
        FileNotFoundError: the directory or one of its files is missing (the message names them).
        ValueError: a file does not have the layout above.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data-dir must be a CIFAR-10 directory (python pickle layout), got {str(root)!r}, "
            "which is not a directory"
        )
    if not (root / CIFAR10_TEST_FILE).exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [name for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"--data-dir {str(root)!r} must hold the CIFAR-10 python batches {list(CIFAR10_TRAIN_FILES)} and "
            f"{CIFAR10_TEST_FILE!r}; missing {missing}"
        )
    parts = [_read_cifar_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    train = Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = Split(*_read_cifar_batch(root / CIFAR10_TEST_FILE))
    for split_name, split in (("training", train), ("test", test)):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= 10):
            raise ValueError(
                f"--data-dir: CIFAR-10 {split_name} labels must be in [0, 10), got "
                f"[{int(split.labels.min())}, {int(split.labels.max())}]"
            )
    if not len(train) or not len(test):
        raise ValueError(f"--data-dir: CIFAR-10 batches in {str(root)!r} hold no images")
    return ImageDataset(
        f"cifar10 ({root})", train, test, 10, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD), augment=True
    )


def _augmentation_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct stream per (seed, epoch), independent of the sampler's seed + epoch stream.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63) ^ 0x5DEECE66D)


def _random_crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """images: Tensor[B, C, H, W] -> each image cropped at offsets[b] = (dy, dx) of the zero-padded image, and
    mirrored where flips[b]."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (offsets[:, 0:1] + torch.arange(h)).view(b, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(b, 1, w)
    cols = torch.where(flips.view(b, 1, 1), cols.flip(2), cols)
    return padded[torch.arange(b).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)  # [B, H, W, C] -> NCHW


def batches(
    data: ImageDataset,
    split: str,
    batch_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised float32 batches of one epoch.

    Args:
        data: the dataset.
        split: "train" (shuffled by a DistributedSampler seeded with ``seed``, set to ``epoch``; augmented when
            ``data.augment``) or "test" (in order, no augmentation; rank r gets samples r, r + world_size, ...).
        batch_size: images per batch on this rank (the last batch may be smaller).
        epoch, seed: select the shuffle and the augmentation.
        rank, world_size: this process's share of the data.
        max_batches: stop after this many batches.

    Yields:
        (images Tensor[B, 3, H, W] float32 NCHW on the CPU, labels Tensor[B] int64).
    """
    if split == "train":
        from torch.utils.data import DistributedSampler

        source = data.train
        sampler = DistributedSampler(range(len(source)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        indices = torch.tensor(list(sampler), dtype=torch.int64)
    elif split == "test":
        source = data.test
        indices = torch.arange(rank, len(source), world_size)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    augment = split == "train" and data.augment
    if augment:
        gen = _augmentation_generator(seed, epoch)
        all_offsets = torch.randint(0, 2 * data.crop_padding + 1, (len(source), 2), generator=gen)
        all_flips = torch.rand(len(source), generator=gen) < 0.5
    mean = data.mean.view(1, -1, 1, 1)
    std = data.std.view(1, -1, 1, 1)
    scale = 1.0 / 255.0 if source.images.dtype == torch.uint8 else 1.0
    for i, start in enumerate(range(0, indices.numel(), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        idx = indices[start : start + batch_size]
        images = source.images[idx].to(torch.float32).mul_(scale)
        if augment:
            images = _random_crop_flip(images, all_offsets[idx], all_flips[idx], data.crop_padding)
        images = images.sub_(mean).div_(std).contiguous()
        yield images, source.labels[idx]

"""Additive PyramidNets for CIFAR (Han et al. 2017, "Deep Pyramidal Residual Networks").

The width grows by alpha / N at every block instead of doubling at each stage: block k = 1..N (N = 3 (depth - 2) / 6
basic blocks) has ``d_k = floor(16 + alpha * k / N)`` channels (the paper's Eq. 2). A block is

    BN -> conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, then out = BN(...) + pad(shortcut)

with no ReLU after the addition (the paper's Fig. 6(d)); the shortcut is x, average-pooled 2x2 when the block
downsamples (the official code's ``AvgPool2d((2, 2), stride=(2, 2))``), with d_{k-1} <= d_k channels: the missing
ones are zeros. The last BN and the addition are one fused op: ``self.bn3(out, shortcut)`` with
``activation="identity"`` and the narrower shortcut read as is (no zero-padded copy). Stem: conv3x3 16 -> BN (no
ReLU); head: BN -> ReLU -> global average pool -> fc.

A property of this design: the residual stream reaches the loss only through training-mode BatchNorms (each block's
bn1, bn_final) and the shortcuts carry a per-channel constant through unchanged, so in training the biases of the
stem's BN and of every block's bn3 get exactly zero gradient (they matter at eval, through the running statistics;
weight decay alone moves them).

Widths: the official code (jhkim89/PyramidNet addpyramidnet.lua, dyhan0920/PyramidNet-PyTorch) rounds
16 + alpha * k / N to the nearest integer where the paper floors it; for alpha = 270 (alpha / N = 5) the two agree,
for alpha = 48 rounding gives 1,772,706 parameters where flooring gives 1,739,730 (the paper: "1.7M"). Module and
parameter names are the official PyTorch code's (conv1, bn1, layer1..3 of bn1/conv1/bn2/conv2/bn3, bn_final, fc).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import cifar_blocks, init_weights, conv3x3
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["PyramidBasicBlock", "PyramidNet", "pyramidnet110_a48", "pyramidnet110_a270", "pyramid_widths"]


def pyramid_widths(num_blocks: int, alpha: float, base: int = 16) -> list[int]:
    """The additive widths ``floor(base + alpha * k / num_blocks)`` of blocks k = 1..num_blocks."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the widening over the whole net), got {alpha}")
    return [math.floor(base + alpha * k / num_blocks) for k in range(1, num_blocks + 1)]


class PyramidBasicBlock(nn.Module):
    """bn1 (BN) -> conv1 (stride) -> bn2 (BN+ReLU) -> conv2 -> bn3 (BN + zero-padded shortcut), no final ReLU.

    Args:
        inplanes, planes: input and output channels (inplanes <= planes).
        stride: 1, or 2 with a 2x2 average-pooled shortcut.
        fused: False builds the same block on the pure PyTorch reference.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, fused: bool = True) -> None:
        super().__init__()
        if inplanes > planes:
            raise ValueError(f"inplanes must be <= planes (the shortcut is zero-padded), got {inplanes} > {planes}")
        self.bn1 = BatchNormAct2d(inplanes, activation="identity", fused=fused)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn3 = BatchNormAct2d(planes, activation="identity", fused=fused)
        self.downsample = nn.AvgPool2d(2, 2) if stride != 1 else None
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.bn2(self.conv1(self.bn1(x))))
        return self.bn3(out, shortcut)


class PyramidNet(nn.Module):
    """Additive PyramidNet for CIFAR with basic blocks (see the module docstring).

    conv1 3x3 16 -> bn1 (BN) -> layer1..3 ((depth - 2) / 6 :class:`PyramidBasicBlock` s each, widths
    :func:`pyramid_widths`, stride 2 on the first block of layers 2 and 3) -> bn_final (BN+ReLU) -> avgpool -> fc.
    Initialisation as torchvision's ResNet (kaiming fan-out convolutions, BN 1 / 0), the official code's.

    Args:
        depth: 6n + 2.
        alpha: the widening over the whole net (the last block has floor(16 + alpha) channels).
        num_classes: output logits.
        fused: False builds the same model on the pure PyTorch reference.
        in_channels: input image channels.
    """

    def __init__(
        self, depth: int, alpha: float, num_classes: int = 10, *, fused: bool = True, in_channels: int = 3
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        widths = pyramid_widths(3 * n, alpha)
        self.fused = bool(fused)
        self.alpha = alpha
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = BatchNormAct2d(16, activation="identity", fused=fused)
        inplanes = 16
        for i in range(3):
            blocks = []
            for j in range(n):
                planes = widths[i * n + j]
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(PyramidBasicBlock(inplanes, planes, stride, fused=fused))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = BatchNormAct2d(inplanes, activation="relu", fused=fused)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, zero_init_residual=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(self.bn_final(x)), 1))


def _builder(alpha: int, params: str) -> Any:
    def build(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> PyramidNet:
        return PyramidNet(110, alpha, num_classes, fused=fused, **kwargs)

    build.__name__ = build.__qualname__ = f"pyramidnet110_a{alpha}"
    build.__doc__ = f"""Additive PyramidNet-110, alpha = {alpha} (Han et al. 2017): {params} parameters for 10 classes.

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: in_channels (see :class:`PyramidNet`).
    """
    return register_model(build)


pyramidnet110_a48 = _builder(48, "1,739,730")
pyramidnet110_a270 = _builder(270, "28,485,477")

"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), WRN-d-k with dropout.

Pre-activation basic blocks, B(3, 3) with dropout between the convolutions (the paper's section 2.4):

    bn1 (BN+ReLU) -> conv1 3x3 (stride) -> bn2 (BN+ReLU) -> dropout -> conv2 3x3, plus the shortcut

The shortcut is x, or a 1x1 convolution (stride) of the pre-activated bn1(x) when the shape changes (the first block
of every stage). Stem conv3x3 16; stages of 16k, 32k, 64k channels with (d - 4) / 6 blocks each; head BN -> ReLU ->
global average pool -> fc. This is the official PyTorch port's layout (xternalz/WideResNet-pytorch, the layout of
szagoruyko/wide-residual-networks), with this project's names (conv1, layer1..3 of bn1/conv1/bn2/conv2/downsample,
bn_final, fc) and torchvision's initialisation.

What is fused: each BN + ReLU is one :class:`fusedres.nn.BatchNormAct2d` pass. A pre-activation block ends with a
convolution, not a BatchNorm, so the residual addition stays a plain ``+``; dropout draws its mask from the global
generator in forward order (``F.dropout``), the same for the fused and the reference model seeded alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import init_weights, conv1x1, conv3x3
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["WideBasicBlock", "WideResNet", "wide_resnet28_10"]


class WideBasicBlock(nn.Module):
    """bn1 (BN+ReLU) -> conv1 -> bn2 (BN+ReLU) -> dropout -> conv2, plus x or downsample(bn1(x)).

    Args:
        inplanes, planes: input and output channels.
        stride: conv1's stride (and the 1x1 shortcut's).
        drop_rate: dropout probability between the convolutions (training only).
        fused: False builds the same block on the pure PyTorch reference.
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, drop_rate: float = 0.0, *, fused: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.bn1 = BatchNormAct2d(inplanes, activation="relu", fused=fused)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = conv1x1(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
        self.drop_rate = float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        pre = self.bn1(x)
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = F.dropout(self.bn2(self.conv1(pre)), self.drop_rate, self.training)
        return self.conv2(out) + shortcut

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}"


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR: conv1 3x3 16 -> layer1..3 -> bn_final (BN+ReLU) -> avgpool -> fc.

    Args:
        depth: 6n + 4 (n :class:`WideBasicBlock` s per stage).
        widen_factor: k (stages of 16k, 32k, 64k channels).
        drop_rate: dropout between each block's convolutions.
        num_classes: output logits.
        fused: False builds the same model on the pure PyTorch reference.
        in_channels: input image channels.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        *,
        fused: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        inplanes = 16
        for i in range(3):
            planes = 16 * widen_factor * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(WideBasicBlock(inplanes, planes, stride, drop_rate, fused=fused))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = BatchNormAct2d(inplanes, activation="relu", fused=fused)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, zero_init_residual=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.bn_final(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def wide_resnet28_10(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> WideResNet:
    """WRN-28-10 with dropout 0.3 (Zagoruyko & Komodakis 2016): 36,479,194 parameters for 10 classes.

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: drop_rate (default 0.3), in_channels (see :class:`WideResNet`).
    """
    kwargs.setdefault("drop_rate", 0.3)
    return WideResNet(28, 10, num_classes=num_classes, fused=fused, **kwargs)

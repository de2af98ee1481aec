"""CIFAR ResNet with gated skip connections: ``out = relu(alpha * F(x) + (1 - alpha) * shortcut)``.

alpha is a per-sample, per-channel gate computed from the branch's own output, squeeze-and-excitation style:
``alpha = sigmoid(W GAP(F(x)) + b)`` with ``W: Linear(C, C)``, where F(x) = bn2(conv2(bn1(conv1(x)))) is the
branch's BatchNorm output. Otherwise He et al.'s ResNet-20 layout (:class:`fusedres.models.CifarResNet`: names,
option-A shortcuts, initialisation; the gate keeps nn.Linear's default initialisation, so alpha starts near 0.5).

Why the block end is not one fused op: alpha reads F(x) (its spatial mean), so F(x) must exist before the gate can
be computed, and the block end ``alpha * F(x) + (1 - alpha) * shortcut`` then runs after the gate. The fused path
computes F(x) with :class:`fusedres.nn.BatchNormAct2d` (``activation="identity"``, one pass), the gate on the
(N, C) means, then the block end in plain PyTorch (a few elementwise passes). Fusing the BatchNorm with the gated
end would need GAP(F(x)) before F(x) exists: it is an affine function of the per-(n, c) means of conv2's output
given the batch statistics, so a statistics pass could produce it (the route issue 14 proposes for
squeeze-and-excitation); this model does not take it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import cifar_blocks, init_weights, conv3x3
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["GatedBasicBlock", "GatedResNet", "gated_resnet20"]


class GatedBasicBlock(nn.Module):
    """conv1 -> bn1 (BN+ReLU) -> conv2 -> bn2 (BN) = F; out = relu(alpha * F + (1 - alpha) * shortcut).

    The shortcut is x subsampled by ``stride`` with ``inplanes <= planes`` channels, the others zero (option A):
    on those channels the block end is relu(alpha * F).

    Args:
        inplanes, planes: input and output channels (inplanes <= planes).
        stride: 1 or 2 (on conv1 and the shortcut).
        fused: False builds the same block on the pure PyTorch reference.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, fused: bool = True) -> None:
        super().__init__()
        if inplanes > planes:
            raise ValueError(f"inplanes must be <= planes (the shortcut is zero-padded), got {inplanes} > {planes}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNormAct2d(planes, activation="identity", fused=fused)
        self.gate = nn.Linear(planes, planes)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        f = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        alpha = torch.sigmoid(self.gate(f.mean((2, 3))))[:, :, None, None]
        out = alpha * f
        cr = shortcut.shape[1]
        carried = (1 - alpha[:, :cr]) * shortcut
        if cr < f.shape[1]:
            carried = F.pad(carried, (0, 0, 0, 0, 0, f.shape[1] - cr))
        return torch.relu(out + carried)


class GatedResNet(nn.Module):
    """He et al.'s CIFAR ResNet with :class:`GatedBasicBlock` s: conv1 -> bn1 -> layer1..3 -> avgpool -> fc.

    Args:
        depth: 6n + 2.
        num_classes: output logits.
        fused: False builds the same model on the pure PyTorch reference.
        in_channels: input image channels.
    """

    def __init__(self, depth: int, num_classes: int = 10, *, fused: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = BatchNormAct2d(16, activation="relu", fused=fused)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(GatedBasicBlock(inplanes, planes, stride, fused=fused))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def gated_resnet20(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> GatedResNet:
    """ResNet-20 with gated skips: 286,186 parameters for 10 classes (resnet20's 269,722 plus 9 gates).

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: in_channels (see :class:`GatedResNet`).
    """
    return GatedResNet(20, num_classes, fused=fused, **kwargs)

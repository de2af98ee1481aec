"""Shake-Shake regularised ResNets for CIFAR (Gastaldi 2017, "Shake-Shake regularization"), Shake-Shake-Image.

A block has two residual branches, each ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, and computes

    out = shortcut + alpha_n * BN(b1) + (1 - alpha_n) * BN(b2)      (no ReLU after the sum)

with alpha_n ~ U(0, 1) drawn per sample in training; the backward pass uses an independent beta_n ~ U(0, 1) in
alpha's place ("Shake-Shake-Image", the paper's best CIFAR-10 setting); at eval alpha = 0.5. The sum is two fused
block ends of :class:`fusedres.nn.BatchNormAct2d` (``activation="identity"``)::

    t   = branch2.bn2(u2, residual=shortcut, scale=1 - alpha, backward_scale=1 - beta)
    out = branch1.bn2(u1, residual=t,        scale=alpha,     backward_scale=beta)

where u1, u2 are the branches' conv2 outputs: no scaled copies and no separate additions. The last block's second
block end also applies the network's final ReLU (``activation="relu"``): nothing else reads its sum.

Shortcut: the identity when the width does not change; otherwise (the first block of every stage, the first with
stride 1) Gastaldi's: ReLU, then two 1x1 convolutions of planes / 2 channels, one on x subsampled by the stride,
one on x shifted by one pixel right and down (zeros shifted in) then subsampled, concatenated, BN. Stem: conv3x3 16
-> BN (no ReLU: every branch starts with one); head: ReLU -> global average pool -> fc. Layout, names aside, and
initialisation (kaiming fan-out convolutions, BN 1 / 0, zero fc bias) are the official Torch code's
(xgastaldi/shake-shake models/shakeshake.lua, shakeshakeblock.lua). The branches share one ReLU of x (computed once
per block: the block's input is also the identity shortcut, which is not rectified).

Random draws: alpha then beta, ``torch.rand(N, device=x.device)`` in float32 whatever the model's dtype, at the
start of each block's forward (the official code draws beta in backward; drawing it in forward gives the same
distribution and makes a step reproducible from the seed alone), so a fused and a reference model seeded alike
draw the same alpha and beta.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import cifar_blocks, init_weights, conv1x1, conv3x3
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["ShakeBranch", "ShakeShakeBlock", "ShakeShakeResNet", "ShakeShortcut", "shake_shake_26_2x32d",
           "shake_shake_26_2x96d"]  # fmt: skip


class ShakeBranch(nn.Module):
    """One residual branch after its leading ReLU: conv1 (stride) -> bn1 (BN+ReLU) -> conv2; then bn2.

    ``forward`` returns conv2's output: ``bn2`` is applied by :class:`ShakeShakeBlock`, fused with the shake and the
    shortcut (it is this branch's module, so the state_dict reads as the branch's layers).

    Args:
        inplanes, planes: input and output channels.
        stride: conv1's stride.
        activation: bn2's activation ("identity", or "relu" in the network's last block).
        fused: False builds the same branch on the pure PyTorch reference.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, activation: str, *, fused: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNormAct2d(planes, activation=activation, fused=fused)

    def forward(self, r: Tensor) -> Tensor:
        """r = relu(x): Tensor[N, inplanes, H, W] -> conv2's output Tensor[N, planes, H / stride, W / stride]."""
        return self.conv2(self.bn1(self.conv1(r)))


class ShakeShortcut(nn.Module):
    """Gastaldi's shortcut when the width changes: cat(conv1(sub(r)), conv2(sub(shift(r)))) -> bn (BN), r = relu(x).

    ``sub`` subsamples by the stride (a 1x1 average pool in the official code), ``shift`` moves the map one pixel
    right and down (``F.pad(r, (1, -1, 1, -1))``), so the two halves see different pixels.

    Args:
        inplanes, planes: input and output channels (planes even).
        stride: subsampling factor.
        fused: False builds the same module on the pure PyTorch reference.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, *, fused: bool = True) -> None:
        super().__init__()
        if planes % 2 != 0:
            raise ValueError(f"planes must be even (two halves of planes / 2 channels), got {planes}")
        self.conv1 = conv1x1(inplanes, planes // 2)
        self.conv2 = conv1x1(inplanes, planes // 2)
        self.bn = BatchNormAct2d(planes, activation="identity", fused=fused)
        self.stride = stride

    def forward(self, r: Tensor) -> Tensor:
        """r = relu(x): Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        s = self.stride
        y1 = self.conv1(r[:, :, ::s, ::s])
        y2 = self.conv2(F.pad(r, (1, -1, 1, -1))[:, :, ::s, ::s])
        return self.bn(torch.cat([y1, y2], 1))


class ShakeShakeBlock(nn.Module):
    """shortcut + alpha * BN(branch1) + (1 - alpha) * BN(branch2), backward with beta (see the module docstring).

    Args:
        inplanes, planes: input and output channels.
        stride: stride of the branches' conv1 and of the shortcut.
        activation: "identity", or "relu" to apply the network's final ReLU in the block end (the last block).
        fused: False builds the same block on the pure PyTorch reference.
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, activation: str = "identity", *, fused: bool = True
    ) -> None:
        super().__init__()
        if inplanes == planes and stride != 1:
            raise ValueError(f"a block that keeps the width ({planes}) must have stride 1, got {stride}")
        self.branch1 = ShakeBranch(inplanes, planes, stride, activation, fused=fused)
        self.branch2 = ShakeBranch(inplanes, planes, stride, "identity", fused=fused)
        self.shortcut = ShakeShortcut(inplanes, planes, stride, fused=fused) if inplanes != planes else None

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        n = x.shape[0]
        if self.training:
            alpha = torch.rand(n, device=x.device)
            beta = torch.rand(n, device=x.device)
        else:
            alpha, beta = torch.full((n,), 0.5, device=x.device), None
        r = torch.relu(x)
        shortcut = x if self.shortcut is None else self.shortcut(r)
        u1, u2 = self.branch1(r), self.branch2(r)
        a = alpha.to(u1.dtype)
        b = beta.to(u1.dtype) if beta is not None else None
        t = self.branch2.bn2(u2, shortcut, 1 - a, 1 - b if b is not None else None)
        return self.branch1.bn2(u1, t, a, b)


class ShakeShakeResNet(nn.Module):
    """Gastaldi's CIFAR Shake-Shake ResNet: conv1 3x3 16 -> bn1 (BN) -> layer1..3 -> ReLU -> avgpool -> fc.

    layer i holds (depth - 2) / 6 :class:`ShakeShakeBlock` s of ``width * 2**i`` channels (stride 2 on the first
    block of layers 2 and 3); the final ReLU is fused into the last block's end.

    Args:
        depth: 6n + 2 (26 in the paper: 4 blocks per stage).
        width: channels of the first stage ("32d", "96d": 32, 96).
        num_classes: output logits.
        fused: False builds the same model on the pure PyTorch reference.
        in_channels: input image channels.
    """

    def __init__(
        self, depth: int, width: int, num_classes: int = 10, *, fused: bool = True, in_channels: int = 3
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = BatchNormAct2d(16, activation="identity", fused=fused)
        inplanes = 16
        for i in range(3):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                last = i == 2 and j == n - 1
                blocks.append(ShakeShakeBlock(inplanes, planes, stride, "relu" if last else "identity", fused=fused))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self, zero_init_residual=False)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))  # ReLU'd by the last block
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _builder(width: int, params: str) -> Any:
    def build(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> ShakeShakeResNet:
        return ShakeShakeResNet(26, width, num_classes, fused=fused, **kwargs)

    build.__name__ = build.__qualname__ = f"shake_shake_26_2x{width}d"
    build.__doc__ = f"""Shake-Shake-Image 26 2x{width}d (Gastaldi 2017): {params} parameters for 10 classes.

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: in_channels (see :class:`ShakeShakeResNet`).
    """
    return register_model(build)


shake_shake_26_2x32d = _builder(32, "2,923,162")
shake_shake_26_2x96d = _builder(96, "26,192,922")

"""Squeeze-and-excitation ResNets (Hu et al. 2018, "Squeeze-and-Excitation Networks").

An SE module rescales each channel of a residual branch by a gate computed from the branch itself:
``s = sigmoid(W2 relu(W1 GAP(y) + b1) + b2)`` per (n, c), where ``y`` is the branch output, ``W1: C -> C / r``,
``W2: C / r -> C`` (Hu et al.'s Eq. 2-3 and Fig. 3, the "SE-ResNet module"). Where SE sits: on the residual branch,
after the block's last BatchNorm and before the shortcut is added (Hu et al. Fig. 3; timm's ``Bottleneck``:
``bn3 -> se -> + shortcut -> act3``). The block ends as

    out = relu(y * s + shortcut),   y = BN(conv(...)),   s = SE(y)

Models:

* ``se_resnet50``: ResNet-50 (torchvision's V1.5 Bottleneck, stride on the 3x3 conv) with an SE module in every
  block, with timm's ``seresnet50`` module names, shapes and reduction (``timm.layers.SEModule`` with its defaults:
  ``rd_channels = make_divisible(C / 16, 8, round_limit=0)`` = C / 16 for the widths 256..2048), so
  ``load_state_dict(timm.create_model("seresnet50").state_dict(), strict=True)`` works and the two models compute
  the same function. 28,088,024 parameters for 1000 classes (Hu et al.'s Table 2 rounds SE-ResNet-50 to 28.1M).
* ``se_resnet20``, ``se_resnet56``, ``se_resnet110``: He et al.'s CIFAR ResNets (:class:`~fusedres.models.CifarResNet`:
  3x3 16-channel stem, stages of 16, 32 and 64 channels, option-A shortcuts) with an SE module after each block's
  last BatchNorm, reduction r = 16 (the ratio Hu et al. use throughout, their section 6.4 ablates it; their CIFAR
  experiments integrate SE into ResNet-110 and ResNet-164 the same way): ``rd_channels = max(1, C // 16)`` = 1, 2
  and 4 in the three stages. timm's divisor-8 rule would give 8 everywhere (ratios 2, 4 and 8), which is not r = 16,
  so the CIFAR models use the plain division. The state_dict is resnetN's plus the ``se`` keys.

Why the block end is not one fused op (docs/design.md section 10, last bullets): the block-end op computes
``act(s * BN(x) + r)`` in one pass given a *precomputed* scale ``s`` (its ``scale`` argument), but SE's ``s`` is a
function of ``BN(x)`` itself (its spatial mean), so ``BN(x)`` must exist before ``s`` can, and ``s`` before the
block-end op could run. The fused path (``fused=True``) therefore runs the block's last BatchNorm as a fused
:class:`fusedres.nn.BatchNormAct2d` with ``activation="identity"`` and no residual (one pass, statistics and
normalise), the SE module on the (N, C) means, then ``relu(y * s + shortcut)`` in plain PyTorch. Every other
BatchNorm + ReLU pair is fused as in :mod:`fusedres.models.resnet` (and the downsample's BN is a fused identity
BatchNorm). ``fused=False`` builds the same modules on the pure PyTorch reference. (GAP(BN(x)) is an affine function
of the per-(n, c) means of x given the batch statistics, so a statistics pass could return it and let the block end
be one op; not done, see design.md section 10.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import (
    BasicBlock,
    Bottleneck,
    NormLayer,
    ResNet,
    ShortcutA,
    cifar_blocks,
    init_weights,
    conv3x3,
    make_norm,
)

__all__ = [
    "SEBasicBlock",
    "SEBottleneck",
    "SECifarResNet",
    "SEModule",
    "se_resnet20",
    "se_resnet50",
    "se_resnet56",
    "se_resnet110",
    "timm_rd_channels",
]


def timm_rd_channels(channels: int, rd_ratio: float = 1.0 / 16, rd_divisor: int = 8) -> int:
    """timm's ``SEModule`` reduction width: ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.

    The nearest multiple of ``rd_divisor`` to ``channels * rd_ratio`` (halves round up), at least ``rd_divisor``.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    v = channels * rd_ratio
    return max(rd_divisor, int(v + rd_divisor / 2) // rd_divisor * rd_divisor)


class SEModule(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(relu(fc1(GAP(x)))))`` per (n, c).

    The parameter names and shapes of ``timm.layers.SEModule`` (``fc1``: Conv2d(C, rd, 1) with bias, ``bn``:
    Identity, ``act``: ReLU, ``fc2``: Conv2d(rd, C, 1) with bias, ``gate``: Sigmoid), so its state_dict is timm's.
    Plain PyTorch: it runs on (N, C, 1, 1) tensors, a negligible cost next to the block's (N, C, H, W) passes.

    Args:
        channels: C of the Tensor[N, C, H, W] it rescales.
        rd_channels: width of the bottleneck (C / r for reduction r).
    """

    def __init__(self, channels: int, rd_channels: int) -> None:
        super().__init__()
        if channels < 1 or rd_channels < 1:
            raise ValueError(f"channels and rd_channels must be >= 1, got {channels} and {rd_channels}")
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def scale(self, x: Tensor) -> Tensor:
        """x: Tensor[N, C, H, W] -> the excitation s: Tensor[N, C, 1, 1] in (0, 1)."""
        squeezed = x.mean((2, 3), keepdim=True)
        return self.gate(self.fc2(self.act(self.bn(self.fc1(squeezed)))))

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, C, H, W] -> x * s (timm's SEModule.forward)."""
        return x * self.scale(x)


def _se_block_end(y: Tensor, se: SEModule, shortcut: Tensor) -> Tensor:
    """relu(y * SE(y) + shortcut): plain PyTorch in the fused model too (SE's scale needs y; see the module doc)."""
    return torch.relu(y * se.scale(y) + shortcut)


class SEBottleneck(Bottleneck):
    """:class:`~fusedres.models.Bottleneck` with SE: conv1 -> bn1 -> conv2 -> bn2 -> conv3 -> bn3 (BN) -> se,
    then relu(bn3 * s + shortcut).

    bn1 and bn2 are fused BN+ReLU, bn3 a fused identity BatchNorm (the module doc says why the block end is not
    fused). ``se`` has timm's ``seresnet50`` reduction (:func:`timm_rd_channels`). Arguments are torchvision's
    ``Bottleneck``'s, plus ``fused``.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        *,
        fused: bool = True,
    ) -> None:
        # downsample is attached after se, so that the module (and state_dict) order is timm's.
        super().__init__(inplanes, planes, stride, None, groups, base_width, dilation, norm_layer, fused=fused)
        outplanes = planes * self.expansion
        self.bn3 = make_norm(norm_layer, outplanes, "identity", fused)
        self.se = SEModule(outplanes, timm_rd_channels(outplanes))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, 4 * planes, H / stride, W / stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return _se_block_end(self.bn3(self.conv3(out)), self.se, identity)


class SEBasicBlock(BasicBlock):
    """:class:`~fusedres.models.BasicBlock` with SE: conv1 -> bn1 (BN+ReLU) -> conv2 -> bn2 (BN) -> se, then
    relu(bn2 * s + shortcut).

    Args:
        inplanes, planes, stride, downsample: as :class:`~fusedres.models.BasicBlock`.
        reduction: SE reduction ratio r: ``rd_channels = max(1, planes // r)``.
        norm_layer, fused: as :class:`~fusedres.models.BasicBlock`.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        reduction: int = 16,
        norm_layer: NormLayer | None = None,
        fused: bool = True,
    ) -> None:
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        super().__init__(inplanes, planes, stride, None, norm_layer=norm_layer, fused=fused)
        self.bn2 = make_norm(norm_layer, planes, "identity", fused)
        self.se = SEModule(planes, max(1, planes // reduction))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        return _se_block_end(self.bn2(self.conv2(out)), self.se, identity)


class SECifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet with :class:`SEBasicBlock` s: conv1 3x3 16 -> bn1 -> layer1..3 -> avgpool -> fc.

    :class:`~fusedres.models.CifarResNet`'s layout, names, option-A shortcuts (:class:`~fusedres.models.ShortcutA`)
    and initialisation (torchvision's, which gives the SE module's 1x1 convs kaiming-normal fan-out weights as
    timm's ResNet does).

    Args:
        depth: 6n + 2.
        num_classes: output logits.
        reduction: SE reduction ratio r (Hu et al.: 16).
        fused, zero_init_residual, norm_layer, in_channels: as :class:`~fusedres.models.CifarResNet`.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        reduction: int = 16,
        fused: bool = True,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = make_norm(norm_layer, 16, "relu", self.fused)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = ShortcutA(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
                blocks.append(
                    SEBasicBlock(
                        inplanes, planes, stride, downsample, reduction=reduction, norm_layer=norm_layer, fused=fused
                    )
                )
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def se_resnet50(
    *,
    fused: bool = True,
    num_classes: int = 1000,
    zero_init_residual: bool = False,
    replace_stride_with_dilation: Sequence[bool] | None = None,
    norm_layer: NormLayer | None = None,
) -> ResNet:
    """SE-ResNet-50 (Hu et al. 2018) with timm's ``seresnet50`` names: 28,088,024 parameters for 1000 classes.

    Args:
        fused: False builds the same model on the pure PyTorch reference.
        num_classes, zero_init_residual, replace_stride_with_dilation, norm_layer: torchvision's :class:`ResNet`
            arguments (zero_init_residual zeroes each bn3's weight, as timm's default ``zero_init_last``).

    Returns:
        A :class:`~fusedres.models.ResNet` of :class:`SEBottleneck` s whose state_dict keys and shapes are timm's
        ``seresnet50``'s.
    """
    return ResNet(
        SEBottleneck,
        [3, 4, 6, 3],
        num_classes,
        zero_init_residual,
        replace_stride_with_dilation=replace_stride_with_dilation,
        norm_layer=norm_layer,
        fused=fused,
    )


_SE_CIFAR_PARAMS = {20: "272,095", 56: "860,137", 110: "1,742,200"}


def _se_cifar_builder(depth: int) -> Callable[..., SECifarResNet]:
    def build(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> SECifarResNet:
        return SECifarResNet(depth, num_classes, fused=fused, **kwargs)

    build.__name__ = build.__qualname__ = f"se_resnet{depth}"
    build.__doc__ = f"""SE-ResNet-{depth} for CIFAR: He et al.'s ResNet-{depth} with SE (r = 16) after each block's
    last BatchNorm; {(depth - 2) // 6} blocks per stage, {_SE_CIFAR_PARAMS[depth]} parameters for 10 classes.

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: reduction, zero_init_residual, norm_layer, in_channels (see :class:`SECifarResNet`).
    """
    return register_model(build)


se_resnet20 = _se_cifar_builder(20)
se_resnet56 = _se_cifar_builder(56)
se_resnet110 = _se_cifar_builder(110)

"""ResNets with fused BatchNorm + residual add + ReLU: torchvision's ImageNet models, He et al.'s CIFAR ones.

ImageNet models (``resnet18`` ... ``resnet152``, ``resnext50_32x4d``, ``wide_resnet50_2``) have torchvision's
signatures, module names, "V1.5" stride placement (the stride of a Bottleneck is on its 3x3 conv) and
initialisation, so ``model.load_state_dict(torchvision.models.resnet50().state_dict(), strict=True)`` works and the
two models compute the same function. What changes is inside the blocks:

* every BatchNorm followed by a ReLU is one :class:`fusedres.nn.BatchNormAct2d` (``activation="relu"``);
* the last BatchNorm of a block takes the shortcut: ``out = self.bn2(out, identity)`` is
  ``relu(bn2(out) + identity)`` in one pass (``bn3`` in a Bottleneck);
* the BatchNorm of the ``downsample`` branch is a ``BatchNormAct2d(activation="identity")``.

There are no ``relu`` modules (the activation lives in the BatchNorm; a ReLU has no state, so the state_dict keys are
torchvision's). ``fused=False`` builds the same modules on the pure PyTorch reference (``BatchNormAct2d(...,
fused=False)``): one definition, two implementations, interchangeable state_dicts.

CIFAR models (He et al. 2016, "Deep Residual Learning", section 4.2): ``resnet20/32/44/56/110`` have a 3x3 16-channel
stem, three stages of n BasicBlocks with 16, 32 and 64 channels (depth 6n + 2) and parameter-free "option A"
shortcuts (subsample by 2 and zero-pad the new channels); ``plain20/32/44/56`` are the same nets without shortcuts
(the paper's plain baselines, :class:`PlainBasicBlock`). The pre-activation variants ``preact_resnet20`` ...
``preact_resnet110`` (He et al. 2016, "Identity Mappings in Deep Residual Networks") order each block
BN -> ReLU -> conv -> BN -> ReLU -> conv, plus a final BN -> ReLU before the pooling.

``norm_layer`` (every builder): None uses :class:`fusedres.nn.BatchNormAct2d`. Otherwise a callable called as
``norm_layer(num_features, activation=..., fused=...)`` (activation is "relu" or "identity") that returns a module
called as ``norm(x)`` and ``norm(x, residual)`` computing ``act(norm(x) + residual)``, e.g.
``functools.partial(BatchNormAct2d, eps=1e-3, momentum=0.01)`` or a ``BatchNormAct2d`` subclass. A plain
``nn.BatchNorm2d`` (or ``nn.GroupNorm``) cannot apply the activation or take the residual and is refused with a
ValueError; for such a model use torchvision's builder and :func:`fusedres.convert`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "PlainBasicBlock",
    "PreActBasicBlock",
    "PreActResNet",
    "ResNet",
    "ShortcutA",
    "plain20",
    "plain32",
    "plain44",
    "plain56",
    "preact_resnet20",
    "preact_resnet32",
    "preact_resnet44",
    "preact_resnet56",
    "preact_resnet110",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]

NormLayer = Callable[..., nn.Module]


def make_norm(norm_layer: NormLayer | None, num_features: int, activation: str, fused: bool) -> nn.Module:
    """``norm_layer(num_features, activation=activation, fused=fused)``, checked against the contract above.

    Args:
        norm_layer: None (:class:`fusedres.nn.BatchNormAct2d`) or a callable of the module docstring's contract.
        num_features: channels C of the Tensor[N, C, H, W] it normalises.
        activation: "relu" or "identity".
        fused: False selects the pure PyTorch reference implementation.

    Returns:
        The module; ValueError when norm_layer cannot take these arguments or its module cannot take a residual,
        TypeError when norm_layer is not callable or does not return an nn.Module.
    """
    if norm_layer is None:
        return BatchNormAct2d(num_features, activation=activation, fused=fused)
    expectation = (
        "norm_layer must be a callable taking (num_features, activation=..., fused=...) and returning a module "
        "called as norm(x, residual=None) that computes act(norm(x) + residual), e.g. fusedres.nn.BatchNormAct2d "
        "or functools.partial(BatchNormAct2d, eps=1e-3); a plain nn.BatchNorm2d/nn.GroupNorm cannot fuse the "
        "activation or the residual (for such a model use torchvision's builder and fusedres.convert)"
    )
    name = getattr(norm_layer, "__name__", None) or repr(norm_layer)
    if not callable(norm_layer):
        raise TypeError(f"{expectation}; got {name}")
    try:
        module = norm_layer(num_features, activation=activation, fused=fused)
    except TypeError as exc:
        raise ValueError(f"{expectation}; calling {name} failed: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise TypeError(f"{expectation}; {name} returned a {type(module).__name__}")
    try:
        inspect.signature(module.forward).bind(None, None)
    except TypeError:
        raise ValueError(
            f"{expectation}; {type(module).__name__}.forward{inspect.signature(module.forward)} takes no residual"
        ) from None
    return module


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's)."""
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv1 -> bn1 (BN+ReLU) -> conv2 -> bn2 (BN + shortcut + ReLU); shortcut = downsample(x) or x.

    Arguments are torchvision's ``BasicBlock``'s (groups=1 and base_width=64 only, no dilation), plus ``fused``.
    """

    expansion: int = 1

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
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got {groups} and {base_width}")
        if dilation > 1:
            raise NotImplementedError(f"BasicBlock does not support dilation > 1, got {dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = make_norm(norm_layer, planes, "relu", fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_norm(norm_layer, planes, "relu", fused)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), identity)


class PlainBasicBlock(nn.Module):
    """A :class:`BasicBlock` without its shortcut: conv1 -> bn1 (BN+ReLU) -> conv2 -> bn2 (BN+ReLU).

    He et al.'s "plain" counterpart of a residual block (2016, section 4.2): the same modules under the same names,
    so a plain CIFAR net and the ResNet of the same depth have interchangeable state_dicts (option-A shortcuts hold
    no parameters).
    """

    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, *, norm_layer: NormLayer | None = None, fused: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = make_norm(norm_layer, planes, "relu", fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_norm(norm_layer, planes, "relu", fused)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


class Bottleneck(nn.Module):
    """conv1 1x1 -> bn1 -> conv2 3x3 (stride, groups) -> bn2 -> conv3 1x1 -> bn3 (BN + shortcut + ReLU).

    torchvision's V1.5 Bottleneck (stride on the 3x3 conv); bn1 and bn2 are BN+ReLU. Arguments are torchvision's,
    plus ``fused``.
    """

    expansion: int = 4

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
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = make_norm(norm_layer, width, "relu", fused)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = make_norm(norm_layer, width, "relu", fused)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = make_norm(norm_layer, planes * self.expansion, "relu", fused)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, 4 * planes, H / stride, W / stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), identity)


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's initialisation: kaiming_normal (fan_out) convs, BN weight 1 and bias 0, default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        # The residual branch starts at zero, so every block starts as the identity (Goyal et al. 2017): the last
        # BN's weight, or in a pre-activation block (whose branch ends with a conv) the last conv's weight.
        for m in model.modules():
            if isinstance(m, Bottleneck):
                last = m.bn3
            elif isinstance(m, BasicBlock):
                last = m.bn2
            elif isinstance(m, PreActBasicBlock):
                nn.init.zeros_(m.conv2.weight)
                continue
            else:
                continue
            if getattr(last, "weight", None) is not None:
                nn.init.constant_(last.weight, 0)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with fused blocks; arguments are torchvision's plus ``fused`` (see the module doc).

    Stem conv1 7x7/2 -> bn1 (BN+ReLU) -> maxpool 3x3/2 -> layer1..layer4 -> avgpool -> fc.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: NormLayer | None = None,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must hold 4 block counts, got {list(layers)}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation must be None or hold 3 booleans, got {replace_stride_with_dilation}"
            )
        self._norm_layer = norm_layer
        self.fused = bool(fused)
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm_layer, self.inplanes, "relu", self.fused)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                make_norm(self._norm_layer, planes * block.expansion, "identity", self.fused),
            )
        kw = {"norm_layer": self._norm_layer, "fused": self.fused}
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, **kw)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes, planes, groups=self.groups, base_width=self.base_width, dilation=self.dilation, **kw
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, 3, H, W] -> logits Tensor[N, num_classes]."""
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016)


class ShortcutA(nn.Module):
    """He et al.'s parameter-free "option A" shortcut: ``x[:, :, ::stride, ::stride]`` with zero channels appended.

    Tensor[N, in_planes, H, W] -> Tensor[N, out_planes, ceil(H / stride), ceil(W / stride)] in x's memory format
    (so that the fused BatchNorm reads the residual in place).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"out_planes must be >= in_planes, got {out_planes} and {in_planes}")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.out_planes == self.in_planes:
            return x
        n, _, h, w = x.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, self.out_planes, h, w), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        out[:, : self.in_planes] = x
        return out

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def cifar_blocks(depth: int) -> int:
    """Blocks per stage of a CIFAR ResNet of `depth` layers (He et al.: 6n + 2)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: conv1 3x3 16 -> bn1 -> layer1..3 (16, 32, 64 channels) -> avgpool -> fc.

    Each stage holds (depth - 2) / 6 :class:`BasicBlock` s; the first block of stages 2 and 3 has stride 2 and a
    :class:`ShortcutA` ``downsample``. Initialisation as torchvision's ResNet.

    Args:
        depth: 6n + 2.
        num_classes: output logits.
        fused, zero_init_residual, norm_layer: as :class:`ResNet`.
        in_channels: input image channels.
        shortcut: False builds He et al.'s "plain" net of the same depth: :class:`PlainBasicBlock` s, no shortcuts
            (``zero_init_residual`` is refused: it would zero the only path).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        fused: bool = True,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        in_channels: int = 3,
        shortcut: bool = True,
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        if zero_init_residual and not shortcut:
            raise ValueError("zero_init_residual=True needs shortcut=True (a plain net has no residual branch)")
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = make_norm(norm_layer, 16, "relu", self.fused)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if not shortcut:
                    blocks.append(PlainBasicBlock(inplanes, planes, stride, norm_layer=norm_layer, fused=fused))
                else:
                    downsample = ShortcutA(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
                    blocks.append(BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm_layer, fused=fused))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] (32x32 for CIFAR) -> logits Tensor[N, num_classes]."""
        x = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBasicBlock(nn.Module):
    """bn1 (BN+ReLU) -> conv1 -> bn2 (BN+ReLU) -> conv2, plus the shortcut (He et al., "Identity Mappings").

    The shortcut is ``x``, or the pre-activated ``bn1(x)`` when ``preact_shortcut`` (the paper's choice for the
    first block after the stem and for blocks that change the shape), then ``downsample`` when there is one.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        preact_shortcut: bool = False,
        norm_layer: NormLayer | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.bn1 = make_norm(norm_layer, inplanes, "relu", fused)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = make_norm(norm_layer, planes, "relu", fused)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.preact_shortcut = bool(preact_shortcut)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        pre = self.bn1(x)
        shortcut = pre if self.preact_shortcut else x
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.conv2(self.bn2(self.conv1(pre))) + shortcut

    def extra_repr(self) -> str:
        return f"preact_shortcut={self.preact_shortcut}"


class PreActResNet(nn.Module):
    """Pre-activation CIFAR ResNet: conv1 3x3 16 -> layer1..3 -> bn_final (BN+ReLU) -> avgpool -> fc.

    Stages and option-A shortcuts as :class:`CifarResNet`; the first block and every block with a shortcut
    module take the pre-activated input as their shortcut. ``zero_init_residual`` zeroes each block's conv2.
    Arguments as :class:`CifarResNet`.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        *,
        fused: bool = True,
        zero_init_residual: bool = False,
        norm_layer: NormLayer | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        self.fused = bool(fused)
        self.conv1 = conv3x3(in_channels, 16)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = ShortcutA(inplanes, planes, stride) if stride != 1 or inplanes != planes else None
                first = i == 0 and j == 0
                blocks.append(
                    PreActBasicBlock(
                        inplanes,
                        planes,
                        stride,
                        downsample,
                        preact_shortcut=first or downsample is not None,
                        norm_layer=norm_layer,
                        fused=fused,
                    )
                )
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn_final = make_norm(norm_layer, 64, "relu", self.fused)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] -> logits Tensor[N, num_classes]."""
        x = self.bn_final(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------------------------
# Builders


_IMAGENET_DOC = """torchvision's ``{name}`` ({paper}) with fused BatchNorm + residual + ReLU.

    Args:
        fused: False builds the same model on the pure PyTorch reference.
        num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation, norm_layer:
            torchvision's :class:`ResNet` arguments (norm_layer: see :mod:`fusedres.models.resnet`).

    Returns:
        A :class:`ResNet` whose state_dict keys and shapes are torchvision's ``{name}``'s.
    """


def _imagenet_builder(
    name: str, block: type[BasicBlock | Bottleneck], layers: list[int], groups: int, width_per_group: int, paper: str
) -> Callable[..., ResNet]:
    def build(
        *,
        fused: bool = True,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = groups,
        width_per_group: int = width_per_group,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: NormLayer | None = None,
    ) -> ResNet:
        return ResNet(
            block,
            layers,
            num_classes,
            zero_init_residual,
            groups,
            width_per_group,
            replace_stride_with_dilation,
            norm_layer,
            fused=fused,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = _IMAGENET_DOC.format(name=name, paper=paper)
    return register_model(build)


_HE = "He et al. 2016, Deep Residual Learning for Image Recognition"
resnet18 = _imagenet_builder("resnet18", BasicBlock, [2, 2, 2, 2], 1, 64, _HE)
resnet34 = _imagenet_builder("resnet34", BasicBlock, [3, 4, 6, 3], 1, 64, _HE)
resnet50 = _imagenet_builder("resnet50", Bottleneck, [3, 4, 6, 3], 1, 64, _HE)
resnet101 = _imagenet_builder("resnet101", Bottleneck, [3, 4, 23, 3], 1, 64, _HE)
resnet152 = _imagenet_builder("resnet152", Bottleneck, [3, 8, 36, 3], 1, 64, _HE)
resnext50_32x4d = _imagenet_builder(
    "resnext50_32x4d", Bottleneck, [3, 4, 6, 3], 32, 4, "Xie et al. 2017, ResNeXt: 32 groups of width 4"
)
wide_resnet50_2 = _imagenet_builder(
    "wide_resnet50_2", Bottleneck, [3, 4, 6, 3], 1, 128, "Zagoruyko & Komodakis 2016: bottleneck width x2"
)


_CIFAR_DOC = """{kind} ResNet-{depth} for CIFAR ({n} blocks per stage{params}).

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: zero_init_residual, norm_layer, in_channels (see :class:`{cls}`).
    """


def _cifar_builder(depth: int, preact: bool) -> Callable[..., nn.Module]:
    cls = PreActResNet if preact else CifarResNet

    def build(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> nn.Module:
        return cls(depth, num_classes, fused=fused, **kwargs)

    build.__name__ = build.__qualname__ = f"{'preact_' if preact else ''}resnet{depth}"
    params = {20: "269,722", 32: "464,154", 44: "658,586", 56: "853,018", 110: "1,727,962"}
    build.__doc__ = _CIFAR_DOC.format(
        kind="Pre-activation" if preact else "He et al.'s",
        depth=depth,
        n=(depth - 2) // 6,
        params="" if preact else f", {params[depth]} parameters for 10 classes",
        cls=cls.__name__,
    )
    return register_model(build)


def _plain_builder(depth: int) -> Callable[..., CifarResNet]:
    def build(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> CifarResNet:
        return CifarResNet(depth, num_classes, fused=fused, shortcut=False, **kwargs)

    build.__name__ = build.__qualname__ = f"plain{depth}"
    build.__doc__ = f"""He et al.'s plain-{depth}: ResNet-{depth} for CIFAR without its shortcuts (the paper's Figure 1).

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: norm_layer, in_channels (see :class:`CifarResNet`).
    """
    return register_model(build)


resnet20 = _cifar_builder(20, preact=False)
resnet32 = _cifar_builder(32, preact=False)
resnet44 = _cifar_builder(44, preact=False)
resnet56 = _cifar_builder(56, preact=False)
resnet110 = _cifar_builder(110, preact=False)
preact_resnet20 = _cifar_builder(20, preact=True)
preact_resnet32 = _cifar_builder(32, preact=True)
preact_resnet44 = _cifar_builder(44, preact=True)
preact_resnet56 = _cifar_builder(56, preact=True)
preact_resnet110 = _cifar_builder(110, preact=True)
plain20 = _plain_builder(20)
plain32 = _plain_builder(32)
plain44 = _plain_builder(44)
plain56 = _plain_builder(56)

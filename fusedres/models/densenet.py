"""DenseNets (Huang et al. 2017) with torchvision's module names, fused and memory-efficient.

``densenet121/161/169/201`` build torchvision's ImageNet models (``load_state_dict(torchvision_model.state_dict(),
strict=True)`` works) and ``densenet_bc_100`` the CIFAR DenseNet-BC (k=12, L=100). ``fused=True`` (default) runs
the dense blocks on ``fusedres.dense_batch_norm_act`` with statistics computed once per feature map and, with
``memory_efficient=True`` (default), the recompute-in-backward bottleneck of :mod:`fusedres.nn.dense_layer`:
training memory grows linearly with depth, running statistics are updated once per forward.
``fused=False`` builds the same model on the pure PyTorch reference (``torch.cat`` + ``F.batch_norm`` + ReLU +
conv, as torchvision); ``fused=False, checkpoint=True`` is torchvision's ``memory_efficient=True``
(``torch.utils.checkpoint`` of each bottleneck, which updates running statistics twice per step).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.nn.batchnorm import BatchNormAct2d
from fusedres.nn.dense_layer import DenseBlock, DenseNormAct2d, DenseTransition

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc_100"]


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC: ``features`` (stem, ``denseblockN``, ``transitionN``, ``norm5``) -> ``classifier``.

    ImageNet stem (``small_inputs=False``): ``conv0`` 7x7/2 -> ``norm0`` (+ReLU) -> ``pool0`` 3x3/2 max pool.
    CIFAR stem (``small_inputs=True``): ``conv0`` 3x3/1 only (the first block's layers begin with BN-ReLU).
    The ReLUs are fused into the norms (``norm0``, ``normN``, ``norm5`` are :class:`fusedres.nn.BatchNormAct2d`
    subclasses), so torchvision's parameter-free ``relu0`` etc. are not modules; every parameter and buffer has
    torchvision's name, and torchvision's initialisation is used.

    Args:
        growth_rate: k, feature maps added per layer.
        block_config: layers per dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck factor (bn_size * k channels inside a layer).
        drop_rate: dropout after each layer.
        num_classes: logits.
        compression: a transition keeps ``int(compression * C)`` channels (0.5 in DenseNet-BC).
        small_inputs: CIFAR stem instead of the ImageNet one.
        fused: fused kernels; False builds the pure PyTorch reference.
        memory_efficient: (fused) recompute each BN/act output in backward instead of storing it.
        checkpoint: (fused=False only) torchvision-style checkpointing of each layer's cat + norm1 + ReLU + conv1,
            the benchmark's "checkpoint" baseline; it updates running statistics twice per step.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        *,
        compression: float = 0.5,
        small_inputs: bool = False,
        fused: bool = True,
        memory_efficient: bool = True,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if checkpoint and fused:
            raise ValueError("checkpoint=True is the reference's torchvision-style baseline: it needs fused=False")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if len(block_config) == 0 or any(n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty sequence of positive layer counts, got {block_config}")
        self.fused = bool(fused)
        self.memory_efficient = bool(memory_efficient)
        self.checkpoint = bool(checkpoint)
        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", BatchNormAct2d(num_init_features, fused=fused)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers,
                num_features,
                bn_size,
                growth_rate,
                drop_rate,
                fused=fused,
                memory_efficient=memory_efficient,
                checkpoint=checkpoint,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression)
                trans = DenseTransition(num_features, out_features, fused=fused, memory_efficient=memory_efficient)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = out_features
        # torchvision applies ReLU after norm5 in forward(); here it is norm5's activation.
        self.features.add_module("norm5", DenseNormAct2d(num_features, fused=fused))
        self.classifier = nn.Linear(num_features, num_classes)

        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, 3, H, W] -> logits Tensor[N, num_classes]."""
        out = self.features(x)  # relu(norm5(cat(maps))), the maps read in place when fused
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


_BUILDER_ARGS = """
    Args:
        fused: fused kernels (default); False builds the pure PyTorch reference with the same state_dict.
        memory_efficient: (fused) recompute BN/act outputs in backward: memory linear in depth.
        num_classes: logits.
        **kwargs: growth_rate, bn_size, drop_rate, compression, checkpoint (fused=False only) of
            :class:`DenseNet`.
"""


@register_model
def densenet121(*, fused: bool = True, memory_efficient: bool = True, num_classes: int = 1000, **kwargs) -> DenseNet:
    kwargs.setdefault("growth_rate", 32)
    return DenseNet(
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        num_classes=num_classes,
        fused=fused,
        memory_efficient=memory_efficient,
        **kwargs,
    )


@register_model
def densenet161(*, fused: bool = True, memory_efficient: bool = True, num_classes: int = 1000, **kwargs) -> DenseNet:
    kwargs.setdefault("growth_rate", 48)
    return DenseNet(
        block_config=(6, 12, 36, 24),
        num_init_features=96,
        num_classes=num_classes,
        fused=fused,
        memory_efficient=memory_efficient,
        **kwargs,
    )


@register_model
def densenet169(*, fused: bool = True, memory_efficient: bool = True, num_classes: int = 1000, **kwargs) -> DenseNet:
    kwargs.setdefault("growth_rate", 32)
    return DenseNet(
        block_config=(6, 12, 32, 32),
        num_init_features=64,
        num_classes=num_classes,
        fused=fused,
        memory_efficient=memory_efficient,
        **kwargs,
    )


@register_model
def densenet201(*, fused: bool = True, memory_efficient: bool = True, num_classes: int = 1000, **kwargs) -> DenseNet:
    kwargs.setdefault("growth_rate", 32)
    return DenseNet(
        block_config=(6, 12, 48, 32),
        num_init_features=64,
        num_classes=num_classes,
        fused=fused,
        memory_efficient=memory_efficient,
        **kwargs,
    )


densenet121.__doc__ = "torchvision's DenseNet-121 (k=32, blocks 6-12-24-16, 64 stem channels).\n" + _BUILDER_ARGS
densenet161.__doc__ = "torchvision's DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels).\n" + _BUILDER_ARGS
densenet169.__doc__ = "torchvision's DenseNet-169 (k=32, blocks 6-12-32-32, 64 stem channels).\n" + _BUILDER_ARGS
densenet201.__doc__ = "torchvision's DenseNet-201 (k=32, blocks 6-12-48-32, 64 stem channels).\n" + _BUILDER_ARGS


@register_model
def densenet_bc_100(*, fused: bool = True, memory_efficient: bool = True, num_classes: int = 10, **kwargs) -> DenseNet:
    kwargs.setdefault("growth_rate", 12)
    return DenseNet(
        block_config=(16, 16, 16),
        num_init_features=2 * kwargs["growth_rate"],
        num_classes=num_classes,
        small_inputs=True,
        fused=fused,
        memory_efficient=memory_efficient,
        **kwargs,
    )


densenet_bc_100.__doc__ = (
    "DenseNet-BC (L=100, k=12) for 32x32 images: 3x3 stem with 2k channels, three blocks of 16 bottleneck layers\n"
    "(bn_size 4), transitions with compression 0.5, BN-ReLU-global pool-linear; 769,162 parameters for 10 classes.\n"
    + _BUILDER_ARGS
)

"""He et al.'s CIFAR ResNet with stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth").

Each residual block l = 1..L survives with probability ``p_l = 1 - l / L * (1 - p_L)`` (the paper's linear decay,
its Eq. 4, p_L = 0.5 for ResNet-110; the stem counts as l = 0 with p_0 = 1). The block end is one fused op:

    out = relu(m_n / p_l * BN(conv2(...)) + shortcut),   m_n ~ Bernoulli(p_l) per sample n (training only)

i.e. ``self.bn2(out, shortcut, scale=m / p_l)`` with :class:`fusedres.nn.BatchNormAct2d`. A dropped sample
(m_n = 0) gets exactly ``relu(shortcut)``; the kernel does not read its branch values.

Conventions (where they differ from the paper, and why):

* **Per-sample drop, 1 / p scaling at train time** (timm's ``drop_path``, Larsson et al.'s FractalNet
  "drop-path"): m is drawn per sample and a surviving branch is scaled by 1 / p_l, so eval needs no scaling
  (``scale=None``: the plain block). The paper instead drops the whole block for the mini-batch (one Bernoulli
  draw per block and step, ``gate`` in the official Torch code, yueatsprograms/Stochastic_Depth main.lua) and
  scales the branch by p_l at test time (its Eq. 5; ResidualDrop.lua ``mul(1 - self.deathRate)``). Both give the
  branch the same expected contribution; per-sample draws give a lower-variance gradient at the same cost, since
  the fused op skips nothing either way (a batch-level drop could skip the branch's convolutions, which this
  per-sample form cannot).
* **Shortcuts**: He et al.'s ResNet-110 "option A" (subsample by 2, zero channels appended), passed to the fused
  op as the narrower residual view ``x[:, :, ::2, ::2]`` (read in place, no padded copy), so the model has
  resnet110's parameters and state_dict keys (1,727,962 parameters; ``resnet110``'s state_dict loads strictly).
  The official stochastic-depth code averages 2x2 windows instead of subsampling and gives its convolutions a
  bias.

Random draws: ``torch.rand(N, device=x.device)`` in float32 whatever the model's dtype, one call per block in
forward order, so a fused and a reference model (or a float32 and a float64 one) seeded alike draw the same masks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusedres.models._registry import register_model
from fusedres.models.resnet import cifar_blocks, init_weights, conv3x3
from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["StochasticDepthBasicBlock", "StochasticDepthResNet", "linear_decay_survival", "resnet110_sd"]


def linear_decay_survival(num_blocks: int, p_last: float) -> list[float]:
    """Huang et al.'s linear decay: ``p_l = 1 - l / L * (1 - p_last)`` for the blocks l = 1..L (= num_blocks)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not 0.0 < p_last <= 1.0:
        raise ValueError(f"p_last must be in (0, 1], got {p_last}")
    return [1.0 - l / num_blocks * (1.0 - p_last) for l in range(1, num_blocks + 1)]


class StochasticDepthBasicBlock(nn.Module):
    """conv1 -> bn1 (BN+ReLU) -> conv2 -> bn2 (m / p * BN + shortcut, ReLU) in one fused op.

    The shortcut is ``x``, subsampled by ``stride``, with ``inplanes <= planes`` channels (the fused op treats the
    missing ones as zeros: He et al.'s option A without a padded copy).

    Args:
        inplanes, planes: input and output channels (inplanes <= planes).
        stride: 1 or 2 (on conv1 and the shortcut).
        survival_prob: p in (0, 1]; 1 never drops.
        fused: False builds the same block on the pure PyTorch reference.
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, survival_prob: float = 1.0, *, fused: bool = True
    ) -> None:
        super().__init__()
        if inplanes > planes:
            raise ValueError(f"inplanes must be <= planes (the shortcut is zero-padded), got {inplanes} > {planes}")
        if not 0.0 < survival_prob <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = BatchNormAct2d(planes, activation="relu", fused=fused)
        self.stride = stride
        self.survival_prob = float(survival_prob)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, inplanes, H, W] -> Tensor[N, planes, H / stride, W / stride]."""
        # Drawn first, in float32 on x's device: the same masks for any dtype and for fused and reference.
        keep = torch.rand(x.shape[0], device=x.device) < self.survival_prob if self._drops() else None
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        out = self.conv2(self.bn1(self.conv1(x)))
        scale = keep.to(out.dtype).div_(self.survival_prob) if keep is not None else None
        return self.bn2(out, shortcut, scale)

    def _drops(self) -> bool:
        return self.training and self.survival_prob < 1.0

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}"


class StochasticDepthResNet(nn.Module):
    """He et al.'s CIFAR ResNet (:class:`fusedres.models.CifarResNet`'s layout and names) with stochastic depth.

    conv1 3x3 16 -> bn1 (BN+ReLU) -> layer1..3 (16, 32, 64 channels, (depth - 2) / 6 blocks each) -> avgpool -> fc.
    Block l of L = 3 (depth - 2) / 6 survives with :func:`linear_decay_survival`'s p_l. Initialisation as
    torchvision's ResNet.

    Args:
        depth: 6n + 2.
        num_classes: output logits.
        p_last: survival probability p_L of the last block (1 turns stochastic depth off).
        fused: False builds the same model on the pure PyTorch reference.
        in_channels: input image channels.
    """

    def __init__(
        self, depth: int, num_classes: int = 10, *, p_last: float = 0.5, fused: bool = True, in_channels: int = 3
    ) -> None:
        super().__init__()
        n = cifar_blocks(depth)
        survival = iter(linear_decay_survival(3 * n, p_last))
        self.fused = bool(fused)
        self.p_last = float(p_last)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = BatchNormAct2d(16, activation="relu", fused=fused)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(StochasticDepthBasicBlock(inplanes, planes, stride, next(survival), fused=fused))
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
def resnet110_sd(*, num_classes: int = 10, fused: bool = True, **kwargs: Any) -> StochasticDepthResNet:
    """ResNet-110 with stochastic depth (Huang et al. 2016): linear decay to p_L = 0.5 over its 54 blocks.

    1,727,962 parameters for 10 classes (resnet110's; its state_dict loads strictly).

    Args:
        num_classes: output logits (10 for CIFAR-10).
        fused: False builds the same model on the pure PyTorch reference.
        **kwargs: p_last, in_channels (see :class:`StochasticDepthResNet`).
    """
    return StochasticDepthResNet(110, num_classes, fused=fused, **kwargs)

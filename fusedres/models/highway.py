"""Highway networks (Srivastava et al. 2015): a fully connected one and a convolutional one.

One definition builds both the fused model and the reference model (``fused=False``): the same modules, the same
parameter names and shapes, so a state_dict moves between them unchanged and they compute the same function.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fusedres.nn.batchnorm import BatchNormAct2d
from fusedres.nn.highway import Highway, HighwayConv2d

__all__ = ["HighwayConvNet", "HighwayMLP", "highway_convnet", "highway_mlp"]

# highway_mlp's defaults fit ``python -m fusedres train``'s images (3x32x32, digits upsampled or CIFAR-10), flattened.
MLP_IN_FEATURES = 3 * 32 * 32
MLP_HIDDEN = 256
MLP_DEPTH = 10


class HighwayMLP(nn.Module):
    """``stem`` Linear(in_features, hidden) -> ``layers``: depth x Highway(hidden) -> ``fc`` Linear(hidden, classes).

    The input is flattened from dimension 1 (Tensor[N, in_features], or e.g. Tensor[N, 1, 28, 28] with
    in_features=784). Keyword arguments are those of :func:`highway_mlp`.
    """

    def __init__(
        self,
        in_features: int = MLP_IN_FEATURES,
        hidden: int = MLP_HIDDEN,
        depth: int = MLP_DEPTH,
        num_classes: int = 10,
        *,
        fused: bool = True,
        activation: str = "relu",
        gate_bias: float = -2.0,
        coupled: bool = True,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.in_features = int(in_features)
        self.stem = nn.Linear(in_features, hidden)
        self.layers = nn.Sequential(
            *(
                Highway(hidden, activation=activation, gate_bias=gate_bias, coupled=coupled, fused=fused)
                for _ in range(depth)
            )
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, *] with prod(*) = in_features -> logits Tensor[N, num_classes]."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} values per sample (flattened from dim 1), got shape "
                f"{list(x.shape)}: build highway_mlp(in_features=...) for this input"
            )
        return self.fc(self.layers(self.stem(x)))


class HighwayConvNet(nn.Module):
    """``conv1`` 3x3 + ``bn1`` BatchNormAct2d -> ``layers``: depth x HighwayConv2d -> ``avgpool`` -> ``fc``.

    Highway blocks keep the resolution and the channel count (their carry is their input). Keyword arguments are
    those of :func:`highway_convnet`; the stem's BatchNorm + ReLU is fused too when ``fused=True``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        depth: int = 6,
        num_classes: int = 10,
        *,
        fused: bool = True,
        activation: str = "relu",
        gate_bias: float = -2.0,
        coupled: bool = True,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(channels, activation="relu", fused=fused)
        self.layers = nn.Sequential(
            *(
                HighwayConv2d(
                    channels, kernel_size, activation=activation, gate_bias=gate_bias, coupled=coupled, fused=fused
                )
                for _ in range(depth)
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] -> logits Tensor[N, num_classes]."""
        x = self.layers(self.bn1(self.conv1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def highway_mlp(
    in_features: int = MLP_IN_FEATURES,
    hidden: int = MLP_HIDDEN,
    depth: int = MLP_DEPTH,
    num_classes: int = 10,
    *,
    fused: bool = True,
    activation: str = "relu",
    gate_bias: float = -2.0,
    coupled: bool = True,
) -> HighwayMLP:
    """A fully connected highway network.

    The defaults (``get_model("highway_mlp")``) take the 3x32x32 images of ``python -m fusedres train`` (3072
    features once flattened): 10 highway layers of width 256, 10 classes.

    Args:
        in_features: input features (the input is flattened from dimension 1).
        hidden: width of every highway layer.
        depth: number of :class:`fusedres.nn.Highway` layers.
        num_classes: output logits.
        fused: False builds the same model on ``fusedres.reference.highway_packed``.
        activation, gate_bias, coupled: of every highway layer (see :mod:`fusedres.nn.highway` for the
            gate-bias convention).
    """
    return HighwayMLP(
        in_features,
        hidden,
        depth,
        num_classes,
        fused=fused,
        activation=activation,
        gate_bias=gate_bias,
        coupled=coupled,
    )


def highway_convnet(
    in_channels: int = 3,
    channels: int = 64,
    depth: int = 6,
    num_classes: int = 10,
    *,
    fused: bool = True,
    **kwargs: Any,
) -> HighwayConvNet:
    """A convolutional highway network for small images (CIFAR-sized by default).

    Args:
        in_channels: input image channels.
        channels: width of the stem and of every :class:`fusedres.nn.HighwayConv2d` block.
        depth: number of highway blocks.
        num_classes: output logits.
        fused: False builds the same model on the pure PyTorch references.
        **kwargs: activation, gate_bias, coupled, kernel_size of the highway blocks.
    """
    return HighwayConvNet(in_channels, channels, depth, num_classes, fused=fused, **kwargs)

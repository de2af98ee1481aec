"""Highway layers: one projection (Linear or conv) packed as [transform, gate(, carry gate)] + the fused gate.

``Highway(F)`` is an ``nn.Linear(F, 2F)`` whose output feeds :func:`fusedres.highway_packed` with the layer's input
as the carry; ``HighwayConv2d(C)`` is an ``nn.Conv2d(C, 2C, k, padding="same")`` feeding it along the channel
dimension. Both subclass the torch module that computes their projection, so the parameters are exactly
``weight`` and ``bias`` of that module (a checkpoint of the projection loads as is).

Gate-bias convention (ours, Srivastava et al. 2015 "Training Very Deep Networks")
-----------------------------------------------------------------------------------
The packed projection is ``[transform | gate]`` (coupled) or ``[transform | gate | carry_gate]`` (free carry),
in that order along the packed dimension, each part ``features`` wide. ``gate`` is the *transform* gate:

* coupled:     ``y = act(h) * sigmoid(g) + x * (1 - sigmoid(g))``, the gate's bias starts at ``gate_bias``
  (default -2.0: ``sigmoid(-2) = 0.12``, so a fresh layer mostly carries its input, as Srivastava recommends,
  -1 to -3 for deep networks);
* free carry:  ``y = act(h) * sigmoid(g) + x * sigmoid(c)``, the transform gate's bias starts at ``gate_bias``
  and the carry gate's at ``-gate_bias`` (+2.0 by default: ``sigmoid(2) = 0.88``), so that both forms start as
  the same function of a zero-weight projection: 0.12 of the transform plus 0.88 of the carry.
* the transform part's bias keeps ``nn.Linear``/``nn.Conv2d``'s default initialisation.

Other libraries, for converting weights:

* AllenNLP ``Highway`` packs ``[nonlinear | gate]`` where its gate is the *carry* gate
  (``y = g * x + (1 - g) * act(h)``) and fills that half's bias with **+1**. Its gate logits are the negation of
  ours: to load it, negate the gate rows of the weight and of the bias (AllenNLP's +1 is our -1).
* Keras 1's / Keras 2's legacy ``Highway`` names its gate ``W_carry``/``b_carry`` but multiplies the *transform* by
  it (``y = act(xW + b) * t + (1 - t) * x``, ``t = sigmoid(x W_carry + b_carry)``) and initialises ``b_carry`` to
  ``transform_bias = -2``: the name says carry, the effect is our transform gate with our default bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fusedres.validation import check_highway_activation

__all__ = ["Highway", "HighwayConv2d"]


def _highway_packed(fused: bool) -> Callable[..., Tensor]:
    """The fused functional or the pure PyTorch reference (imported on first use)."""
    if fused:
        from fusedres.ops.highway import highway_packed
    else:
        from fusedres.reference.highway import highway_packed
    return highway_packed


class _HighwayMixin:
    """Gate-bias initialisation, forward and extra_repr shared by Highway and HighwayConv2d.

    The parent (nn.Linear or nn.Conv2d) that follows this mixin in the subclass's MRO owns the parameters; its
    output is packed along ``_packed_dim``.
    """

    features: int
    activation: str
    gate_bias: float
    coupled: bool
    fused: bool
    bias: Tensor | None
    _packed_dim: int

    def _setup(self, features: int, activation: str, gate_bias: float, coupled: bool, fused: bool) -> None:
        self.features = int(features)
        self.activation = check_highway_activation(activation)
        self.gate_bias = float(gate_bias)
        self.coupled = bool(coupled)
        self.fused = bool(fused)
        self._init_gate_bias()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        if hasattr(self, "gate_bias"):  # the parent's __init__ calls this before _setup has run
            self._init_gate_bias()

    def _init_gate_bias(self) -> None:
        f = self.features
        with torch.no_grad():
            assert self.bias is not None
            self.bias[f : 2 * f].fill_(self.gate_bias)
            if not self.coupled:
                self.bias[2 * f : 3 * f].fill_(-self.gate_bias)

    def forward(self, input: Tensor) -> Tensor:
        projected = super().forward(input)  # type: ignore[misc]
        return _highway_packed(self.fused)(
            projected, input, activation=self.activation, dim=self._packed_dim, free_carry=not self.coupled
        )

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, activation={self.activation}, gate_bias={self.gate_bias}"  # type: ignore[misc]
        if not self.coupled:
            s += ", coupled=False"
        if not self.fused:
            s += ", fused=False"
        return s


class Highway(_HighwayMixin, nn.Linear):
    """A fully connected highway layer: ``nn.Linear(features, 2*features)`` (3x when ``coupled=False``) + gate.

    Args:
        features: size of the last dimension of the input and the output.
        activation: of the transform part: "relu", "tanh", "sigmoid" or "identity".
        gate_bias: initial bias of the transform gate (the carry gate of the free form starts at ``-gate_bias``);
            see the module docstring for the convention and how AllenNLP and Keras differ.
        coupled: True: carry gate = 1 - transform gate; False: a third, free carry gate.
        fused: False runs the pure PyTorch reference (one definition builds both; same parameters).
        device, dtype: of the parameters.

    Shape:
        input: Tensor[*, features]; output: the same shape.
    """

    _packed_dim = -1

    def __init__(
        self,
        features: int,
        *,
        activation: str = "relu",
        gate_bias: float = -2.0,
        coupled: bool = True,
        fused: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(features, (2 if coupled else 3) * features, bias=True, device=device, dtype=dtype)
        self._setup(features, activation, gate_bias, coupled, fused)


class HighwayConv2d(_HighwayMixin, nn.Conv2d):
    """A convolutional highway layer: ``nn.Conv2d(channels, 2*channels, kernel_size, padding="same")`` + gate.

    The projection's channels are packed ``[transform | gate]`` (``[transform | gate | carry_gate]`` when
    ``coupled=False``); the carry is the input itself, so the spatial size and channel count are kept.

    Args:
        channels: input and output channels.
        kernel_size: of the stride-1 convolution (``padding="same"``).
        activation, gate_bias, coupled, fused: as in :class:`Highway`.
        device, dtype: of the parameters.

    Shape:
        input: Tensor[N, channels, H, W] (any memory format the convolution accepts); output: the same shape.
    """

    _packed_dim = 1

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int] = 3,
        *,
        activation: str = "relu",
        gate_bias: float = -2.0,
        coupled: bool = True,
        fused: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            channels,
            (2 if coupled else 3) * channels,
            kernel_size,
            padding="same",
            bias=True,
            device=device,
            dtype=dtype,
        )
        self._setup(channels, activation, gate_bias, coupled, fused)

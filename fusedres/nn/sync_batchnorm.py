"""Synchronised BatchNorm with a fused residual add and activation, and a converter that keeps the fusions.

``SyncBatchNormAct2d`` is an ``nn.SyncBatchNorm`` (same parameters, buffers, state_dict keys, ``process_group``
and running-statistics behaviour) whose forward is ``act(sync_batch_norm(input) + residual)`` on the fused
building-block kernels (:mod:`fusedres.ops.sync_bn`). Unlike PyTorch's it accepts CPU tensors (gloo).

``convert_sync_batchnorm(model)`` is ``nn.SyncBatchNorm.convert_sync_batchnorm`` for fused models: every
``fusedres.nn.BatchNormAct*`` keeps its activation (and, since the residual is an argument of ``forward``, the
fused blocks that pass one keep working), and every plain ``nn.BatchNorm*`` becomes a
``SyncBatchNormAct2d(activation="identity")`` — see :func:`convert_sync_batchnorm` for why.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.ops.bn_act import batch_norm_act as _fused_batch_norm_act
from fusedres.ops.sync_bn import distributed_world_size, has_sync_kernels, sync_batch_norm_act
from fusedres.validation import MASK_ACTIVATIONS, check_activation

__all__ = ["DistributedDataParallel", "SyncBatchNormAct2d", "convert_sync_batchnorm"]

_warned_devices: set[str] = set()


class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """``act(nn.SyncBatchNorm(input) + residual)`` with the fused kernels, on any device they serve (CPU too).

    Like ``nn.SyncBatchNorm`` it accepts any Tensor[N, C, *] (here with 0 to 3 spatial dimensions) despite the
    ``2d`` in its name, which says it replaces ``fusedres.nn.BatchNormAct2d``. Training with an initialised
    process group of more than one rank synchronises the statistics (two collectives per layer and step, the
    same pattern as PyTorch's); eval mode, and training without a group or with a group of one, run the
    single-call fused op of ``fusedres.nn.BatchNormAct2d``. ``fused=False`` runs PyTorch's own
    ``nn.SyncBatchNorm.forward`` then the add and the activation (the reference; PyTorch refuses CPU tensors
    when synchronising), and so does a device that the native module has no building-block kernels for (with a
    warning).

    Args: those of ``nn.SyncBatchNorm`` (num_features, eps, momentum, affine, track_running_stats,
    process_group, device, dtype, bias), then activation ("relu", "identity", "leaky_relu" or "relu6"), negative_slope
    (leaky_relu slope) and fused.
    """

    # silu is not among them: its backward recomputes the pre-activation, which the synchronised backward's
    # building-block ops (bn_act_backward_reduce / bn_act_backward_elemt) cannot.
    _activations = MASK_ACTIVATIONS

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        fused: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias=bias
        )
        self.activation = check_activation(activation, self._activations, "SyncBatchNormAct2d")
        self.negative_slope = float(negative_slope)
        self.fused = bool(fused)

    def _check_input_dim(self, input: Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"expected 2D to 5D input (got {input.dim()}D input)")

    def _act(self, z: Tensor, residual: Tensor | None) -> Tensor:
        if residual is not None:
            z = z + residual
        if self.activation == "relu":
            return torch.relu(z)
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        if self.activation == "relu6":
            return F.relu6(z)
        return z

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """act(sync_batch_norm(input) + residual).

        Args:
            input: Tensor[N, C, *] (N may be 0 on some ranks when synchronising).
            residual: Tensor of input's shape and dtype, or None.

        Returns:
            Tensor of input's shape.
        """
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self.fused:
            return self._act(super().forward(input), residual)
        # The same decisions as nn.SyncBatchNorm.forward, except that num_batches_tracked is incremented only
        # once the op has succeeded (a rejected call changes no state), as in fusedres.nn.BatchNormAct2d.
        count_batch = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is None:  # cumulative moving average
            exponential_average_factor = 1.0 / float(self.num_batches_tracked + 1) if count_batch else 0.0
        else:
            exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        process_group = self.process_group if self.process_group else None
        need_sync = bn_training and self.training and distributed_world_size(process_group) > 1
        if need_sync and not has_sync_kernels(input.device.type):
            device_type = input.device.type
            if device_type not in _warned_devices:
                _warned_devices.add(device_type)
                warnings.warn(
                    f"SyncBatchNormAct2d: the native module has no building-block kernels for {device_type} "
                    "tensors; using nn.SyncBatchNorm then a separate add and activation",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self._act(super().forward(input), residual)
        kwargs = {"residual": residual, "activation": self.activation, "negative_slope": self.negative_slope}
        if need_sync:
            out = sync_batch_norm_act(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                exponential_average_factor,
                self.eps,
                process_group=process_group,
                **kwargs,
            )
        else:
            out = _fused_batch_norm_act(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                exponential_average_factor,
                self.eps,
                **kwargs,
            )
        if count_batch:
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if not self.fused:
            s += ", fused=False"
        return s


def _to_sync(module: _BatchNorm, process_group: Any | None) -> SyncBatchNormAct2d:
    """A SyncBatchNormAct2d sharing ``module``'s parameters and buffers (so device, dtype, requires_grad and
    values are kept, as in PyTorch's converter)."""
    out = SyncBatchNormAct2d(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        device="meta",  # placeholders only: replaced by the module's own tensors below
        bias=module.bias is not None if module.affine else True,
        activation=getattr(module, "activation", "identity"),
        negative_slope=getattr(module, "negative_slope", 0.01),
        fused=getattr(module, "fused", True),
    )
    out.weight = module.weight
    out.bias = module.bias
    out.running_mean = module.running_mean
    out.running_var = module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.train(module.training)
    if hasattr(module, "qconfig"):
        out.qconfig = module.qconfig
    return out


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replaces every BatchNorm layer of ``module`` by a :class:`SyncBatchNormAct2d` that keeps its fusion.

    ``fusedres.nn.BatchNormAct1d/2d/3d`` keep their activation, negative_slope and fused flag; the residual is
    an argument of ``forward``, so blocks that pass one stay fused. Plain ``nn.BatchNorm1d/2d/3d`` (and
    ``nn.SyncBatchNorm``) become ``SyncBatchNormAct2d(activation="identity")``, not ``nn.SyncBatchNorm``: it
    *is* an ``nn.SyncBatchNorm`` (isinstance checks, state_dict and ``process_group`` unchanged) computing the
    same function, but it also runs on CPU with gloo, where PyTorch's refuses the input, uses the fused
    kernels, and falls back to ``nn.SyncBatchNorm.forward`` itself on devices without them. Parameters and
    buffers are shared, not copied (as in PyTorch's converter): device, dtype, requires_grad and the train/eval
    mode are kept. Existing SyncBatchNormAct2d layers are rebuilt with the new ``process_group``.

    Args:
        module: the model (or a single BatchNorm layer).
        process_group: the group whose ranks share the statistics (default: the world).

    Returns:
        ``module`` with its BatchNorm layers replaced, or the new layer when ``module`` itself is one.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, _BatchNorm):
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """``nn.parallel.DistributedDataParallel`` that also accepts CPU modules holding fused SyncBatchNormAct2d.

    PyTorch's DDP refuses every ``nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU
    modules") because PyTorch's own SyncBatchNorm kernel needs a GPU. ``SyncBatchNormAct2d`` is an
    ``nn.SyncBatchNorm`` that runs on CPU (gloo), so this subclass only narrows that refusal to the layers that
    would run PyTorch's kernel (``nn.SyncBatchNorm`` itself, ``fused=False``, or no native CPU kernels).
    Everything else is DDP's; on GPU modules it is exactly DDP.
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type != "cpu":
            return super()._passing_sync_batchnorm_handle(module)
        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not (
                isinstance(layer, SyncBatchNormAct2d) and layer.fused and has_sync_kernels("cpu")
            ):
                self._log_and_throw(
                    ValueError,
                    f"{type(layer).__name__} layers only work with GPU modules (PyTorch's SyncBatchNorm kernel); "
                    "use fusedres.nn.convert_sync_batchnorm to get fused SyncBatchNormAct2d layers that run on CPU",
                )
        return None

"""``fusedres.convert``: put fused BatchNorm + residual + activation modules into an existing model.

``fusedres.convert(model)`` walks the model top-down. For each module whose exact type has a registered converter
(torchvision's and timm's residual blocks, dense layers, norm-act layers, ...), the converter replaces what that
type's forward owns; then, in every plain ``nn.Sequential``, a BatchNorm directly followed by ``nn.ReLU``,
``nn.LeakyReLU``, ``nn.ReLU6`` or ``nn.SiLU`` becomes one fused BatchNorm; last, every BatchNorm nobody fused or
decided about (a BatchNorm alone) becomes a fused one with ``activation="identity"`` (:mod:`fusedres.convert.lone`:
faster than ``nn.BatchNorm2d`` even with nothing to fuse). Each BatchNorm keeps its parameters, buffers (the same
objects) and state_dict key. What each library gets:

* :mod:`fusedres.convert.torchvision`: ResNet / ResNeXt / Wide ResNet blocks and stem, DenseNet (layers, blocks with
  statistics reuse, transitions, norm5 + ReLU), RegNet's ``ResBottleneckBlock`` end.
* :mod:`fusedres.convert.timm`: timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` norm-act layers (ResNetV2, RegNet,
  DenseNet, DLA, DPN, ...), the ResNet family's blocks (BN + act pairs, downsample, the block end when no SE or
  active drop_path sits before the add) and stem, RegNet's block end, DenseNet's layers and transitions.
* :mod:`fusedres.convert.sequential`: the BatchNorm -> activation pairs of any Sequential, and shortcut projections.
* :mod:`fusedres.convert.lone`: every BatchNorm left alone, whatever holds it (MobileNet / EfficientNet projections).

A library's converters are registered the first time convert() runs while the library is imported.

A BatchNorm a converter cannot fuse with what follows it (before an SE module, an active drop_path, a Hardswish)
runs fused alone, listed with the reason in ``ConvertReport.alone``. Everything else is left as it is, and every
BatchNorm left is listed with the reason in the :class:`ConvertReport`
(``convert(model, report=True)``; the summary is also logged at INFO level on the ``fusedres.convert`` logger).
Only exact module types are converted (a subclass may have a different forward), never a module with hooks (a hook
between the BN and the activation would see other values), and only activations the kernels compute (ReLU,
LeakyReLU, ReLU6, SiLU; Hardswish, GELU, ... are reported as "not fused by the kernels yet"). The new modules keep
the train/eval mode, device, dtype and ``requires_grad``; with ``inplace=True`` an optimizer built on the original
parameters keeps working.

Extension points: ``register_converter(module_type)`` registers a function for an exact module type, called as
``fn(module, name, ctx)``; it returns the replacement module (or the module itself) and reports through ``ctx``
(see :class:`ConvertContext`). ``register_branch_op(module_type)`` classifies a module that may sit between a
residual block's last BatchNorm and its shortcut add (see :func:`block_end_problem`).
"""

from fusedres.convert._core import _CONVERTERS as _CONVERTERS  # the registry itself, for tests and tools
from fusedres.convert._core import (
    ActivationSpec,
    BranchOp,
    ConvertContext,
    ConvertedNorm,
    ConvertReport,
    UntouchedNorm,
    activation_spec,
    block_end_problem,
    branch_op,
    branch_scale,
    register_branch_op,
    register_converter,
)
from fusedres.convert._walk import convert, load_library_converters

__all__ = [
    "ActivationSpec",
    "BranchOp",
    "ConvertContext",
    "ConvertReport",
    "ConvertedNorm",
    "UntouchedNorm",
    "activation_spec",
    "block_end_problem",
    "branch_op",
    "branch_scale",
    "convert",
    "load_library_converters",
    "register_branch_op",
    "register_converter",
]

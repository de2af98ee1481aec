"""torchvision-style model builders; ``fused=False`` builds the same model on the pure PyTorch references.

``list_models()`` names every builder, ``get_model(name, **kwargs)`` calls one.
"""

from fusedres.models._registry import get_model, get_model_builder, list_models, register_model
from fusedres.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_bc_100
from fusedres.models.gated import GatedBasicBlock, GatedResNet, gated_resnet20
from fusedres.models.highway import HighwayConvNet, HighwayMLP, highway_convnet, highway_mlp
from fusedres.models.pyramidnet import PyramidBasicBlock, PyramidNet, pyramidnet110_a48, pyramidnet110_a270
from fusedres.models.resnet import (  # every builder registers itself on import
    BasicBlock,
    Bottleneck,
    CifarResNet,
    PreActBasicBlock,
    PreActResNet,
    ResNet,
    ShortcutA,
    preact_resnet20,
    preact_resnet32,
    preact_resnet44,
    preact_resnet56,
    preact_resnet110,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)
from fusedres.models.se_resnet import (
    SEBasicBlock,
    SEBottleneck,
    SECifarResNet,
    SEModule,
    se_resnet20,
    se_resnet50,
    se_resnet56,
    se_resnet110,
)
from fusedres.models.shake_shake import ShakeShakeBlock, ShakeShakeResNet, shake_shake_26_2x32d, shake_shake_26_2x96d
from fusedres.models.stochastic_depth import StochasticDepthBasicBlock, StochasticDepthResNet, resnet110_sd
from fusedres.models.wide_resnet import WideBasicBlock, WideResNet, wide_resnet28_10

for _builder in (highway_mlp, highway_convnet):
    register_model(_builder)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "DenseNet",
    "GatedBasicBlock",
    "GatedResNet",
    "HighwayConvNet",
    "HighwayMLP",
    "PreActBasicBlock",
    "PreActResNet",
    "PyramidBasicBlock",
    "PyramidNet",
    "ResNet",
    "SEBasicBlock",
    "SEBottleneck",
    "SECifarResNet",
    "SEModule",
    "ShakeShakeBlock",
    "ShakeShakeResNet",
    "ShortcutA",
    "StochasticDepthBasicBlock",
    "StochasticDepthResNet",
    "WideBasicBlock",
    "WideResNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc_100",
    "gated_resnet20",
    "get_model",
    "get_model_builder",
    "highway_convnet",
    "highway_mlp",
    "list_models",
    "preact_resnet110",
    "preact_resnet20",
    "preact_resnet32",
    "preact_resnet44",
    "preact_resnet56",
    "pyramidnet110_a270",
    "pyramidnet110_a48",
    "register_model",
    "resnet101",
    "resnet110",
    "resnet110_sd",
    "resnet152",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnext50_32x4d",
    "se_resnet110",
    "se_resnet20",
    "se_resnet50",
    "se_resnet56",
    "shake_shake_26_2x32d",
    "shake_shake_26_2x96d",
    "wide_resnet28_10",
    "wide_resnet50_2",
]

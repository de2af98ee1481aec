"""torchvision-style model builders; ``fused=False`` builds the same model on the pure PyTorch references.

``list_models()`` names every builder, ``get_model(name, **kwargs)`` calls one.
"""

from fusedres.models._registry import get_model, get_model_builder, list_models, register_model
from fusedres.models.densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_bc_100
from fusedres.models.highway import HighwayConvNet, HighwayMLP, highway_convnet, highway_mlp
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

for _builder in (highway_mlp, highway_convnet):
    register_model(_builder)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "DenseNet",
    "HighwayConvNet",
    "HighwayMLP",
    "PreActBasicBlock",
    "PreActResNet",
    "ResNet",
    "ShortcutA",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet_bc_100",
    "get_model",
    "get_model_builder",
    "highway_convnet",
    "highway_mlp",
    "list_models",
    "preact_resnet20",
    "preact_resnet32",
    "preact_resnet44",
    "preact_resnet56",
    "preact_resnet110",
    "register_model",
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

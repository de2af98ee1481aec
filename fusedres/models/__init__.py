"""torchvision-style model builders; ``fused=False`` builds the same model on the pure PyTorch references."""

from fusedres.models.highway import HighwayConvNet, HighwayMLP, highway_convnet, highway_mlp

__all__ = ["HighwayConvNet", "HighwayMLP", "highway_convnet", "highway_mlp"]

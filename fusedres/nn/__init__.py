"""Drop-in modules built on the fused ops."""

from fusedres.nn.batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from fusedres.nn.block_end import DropPathBatchNormAct2d
from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.nn.dense_layer import DenseBlock, DenseFeatures, DenseLayer, DenseNormAct2d, DenseTransition
from fusedres.nn.highway import Highway, HighwayConv2d
from fusedres.nn.sync_batchnorm import DistributedDataParallel, SyncBatchNormAct2d, convert_sync_batchnorm

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "DenseBatchNormAct2d",
    "DenseBlock",
    "DenseFeatures",
    "DenseLayer",
    "DenseNormAct2d",
    "DenseTransition",
    "DistributedDataParallel",
    "DropPathBatchNormAct2d",
    "Highway",
    "HighwayConv2d",
    "SyncBatchNormAct2d",
    "convert_sync_batchnorm",
]

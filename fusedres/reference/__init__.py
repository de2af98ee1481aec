"""Pure-PyTorch reference implementations of the fusedres ops (test oracles and fallbacks)."""

from fusedres.reference.bn_act import batch_norm_act
from fusedres.reference.dense import dense_batch_norm_act
from fusedres.reference.highway import highway, highway_packed
from fusedres.validation import ACTIVATIONS, HIGHWAY_ACTIVATIONS

__all__ = ["ACTIVATIONS", "HIGHWAY_ACTIVATIONS", "batch_norm_act", "dense_batch_norm_act", "highway", "highway_packed"]

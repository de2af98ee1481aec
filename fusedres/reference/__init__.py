"""Pure-PyTorch reference implementations of the fusedres ops (test oracles and fallbacks)."""

from fusedres.reference.bn_act import ACTIVATIONS, batch_norm_act
from fusedres.reference.dense import dense_batch_norm_act
from fusedres.reference.highway import HIGHWAY_ACTIVATIONS, highway, highway_packed

__all__ = ["ACTIVATIONS", "HIGHWAY_ACTIVATIONS", "batch_norm_act", "dense_batch_norm_act", "highway", "highway_packed"]

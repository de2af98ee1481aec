"""Pure-PyTorch reference implementations of the fusedres ops (test oracles and fallbacks)."""

from fusedres.reference.bn_act import ACTIVATIONS, batch_norm_act

__all__ = ["ACTIVATIONS", "batch_norm_act"]

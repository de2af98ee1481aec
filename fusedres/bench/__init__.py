"""``python -m fusedres bench`` (its options: fusedres/cli/bench.py), one module per part:

* harness:  machine facts, the allocator setting, alternating measurement, ratio statistics, saved bytes, row figures;
* sections: the op sections in one table (OP_SECTIONS): bn_act, highway, dense (one module each);
* models:   the model rows (one training step, fused vs reference vs torch.compile, and peak memory);
* memory:   the fresh-process worker that measures a training step's peak memory;
* table:    the one table renderer; report: runs the sections and the models, prints and writes the report;
* plot:     the --plot PNG.

Layers only call down: report -> sections / models -> harness, table, memory.
"""

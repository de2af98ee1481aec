// Every op schema of the fusedres library, in one place. Backends register their kernels in
// csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL; fake (meta) kernels live in fusedres/ops/*.py.
#include <torch/extension.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#endif

#include "cpu/bn_act_kernel.h"

TORCH_LIBRARY(fusedres, m) {
  // act(batch_norm(input) + residual). Returns (output, save_mean, save_invstd, mask):
  //   output       input's shape, dtype and memory format;
  //   save_mean    [C] batch mean (training) or running mean (eval), float64 for float64 input else float32;
  //   save_invstd  [C] 1/sqrt(var + eps), same dtype;
  //   mask         uint8 [mask_bytes(numel)] packed bits in the output's memory order (z > 0 for relu / leaky_relu,
  //                0 < z < 6 for relu6, see math::act_mask_bit), or [0] for identity and silu (no mask).
  // activation: "relu", "identity", "leaky_relu", "relu6" or "silu".
  // Updates running_mean / running_var in place when training and they are given (after the kernels succeed).
  m.def(
      "bn_act_forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // bn_act_forward's output as one differentiable op: its autograd node is C++ (csrc/bn_act_autograd.cpp: the
  // eager path, no Python on the way), calling bn_act_forward / bn_act_backward and saving what they need.
  m.def(
      "bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, float negative_slope) "
      "-> Tensor");
  // Gradients of bn_act_forward. output_mask = (input, residual, weight, bias); gradients not asked for are
  // returned as empty [0] tensors. training=False differentiates the eval form (constant statistics).
  // bias, residual: the forward's, read only by "silu", whose backward recomputes the pre-activation
  // z = (input - save_mean) * save_invstd * weight + bias + residual (no mask; docs/design.md section 1).
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "Tensor mask, bool training, str activation, float negative_slope, bool[4] output_mask, Tensor? bias=None, "
      "Tensor? residual=None) -> (Tensor, Tensor, Tensor, Tensor)");

  // The same op in its building blocks (docs/design.md section 7), for synchronised BatchNorm and for statistics
  // computed once and reused (dense blocks). Same kernels, same numerics, same mask contract as above.
  //   bn_stats: per-channel batch mean and biased variance of input [N, C, *], each [C] in the accumulation
  //   dtype (float64 for float64 input, else float32); shifted two-pass sums, stable for a large mean.
  m.def("bn_stats(Tensor input) -> (Tensor, Tensor)");
  //   bn_act_elemt: the normalise half: act((input - mean) * invstd * weight + bias + residual) with given
  //   per-channel mean / invstd (acc dtype [C]). Returns (output, mask) exactly as bn_act_forward does.
  m.def(
      "bn_act_elemt(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "str activation, float negative_slope) -> (Tensor, Tensor)");
  //   bn_act_backward_reduce: per-channel (sum_dz, sum_dz_xhat), acc dtype [C], dz = grad_out * act'(z),
  //   xhat = (input - save_mean) * save_invstd.
  m.def(
      "bn_act_backward_reduce(Tensor grad_out, Tensor input, Tensor save_mean, Tensor save_invstd, Tensor mask, "
      "str activation, float negative_slope) -> (Tensor, Tensor)");
  //   bn_act_backward_elemt: training-form input gradient from sums taken over `count` values per channel
  //   (all ranks' for SyncBN): grad_input = w * invstd * (dz - sum_dz / count - xhat * sum_dz_xhat / count),
  //   grad_residual = dz. output_mask = (input, residual); gradients not asked for are empty [0] tensors.
  m.def(
      "bn_act_backward_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "Tensor mask, Tensor sum_dz, Tensor sum_dz_xhat, int count, str activation, float negative_slope, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  // The block end of a residual network's variants (docs/design.md section 10):
  //   act(scale * batch_norm(input) + residual)
  // scale: (N,) per sample or (N, C) (stochastic depth, squeeze-and-excitation, gates, Shake-Shake's alpha), any
  // floating dtype; a per-sample 0 drops the sample's branch (its input values are not read). residual: input's
  // shape but Cr <= C channels (channels Cr.. get none: PyramidNet's zero-padded shortcut), any strides (a
  // subsampled view is read in place). Returns (output, save_mean, save_invstd, mask) exactly as bn_act_forward
  // does; activation: "relu", "identity", "leaky_relu" or "relu6". Updates the running statistics like
  // bn_act_forward.
  m.def(
      "block_end_forward(Tensor input, Tensor? residual, Tensor? scale, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, "
      "float negative_slope) -> (Tensor, Tensor, Tensor, Tensor)");
  // block_end_forward's output as one differentiable op (C++ autograd node: csrc/block_end_autograd.cpp);
  // backward_scale (scale's shape, or None) replaces scale in the gradients of input, weight and bias.
  m.def(
      "block_end(Tensor input, Tensor? residual, Tensor? scale, Tensor? backward_scale, Tensor? weight, "
      "Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, float eps, "
      "str activation, float negative_slope) -> Tensor");
  // Gradients (input, residual, scale, weight, bias) of block_end_forward per output_mask (others: empty [0]).
  // scale: the one the branch's gradient uses (the forward's, or Shake-Shake's backward scale beta); the scale's
  // own gradient is sum(dz * batch_norm(input)) in the accumulation dtype with scale's shape (it reads bias).
  // grad_residual: (N, residual_channels, *) dense in input's memory format.
  m.def(
      "block_end_backward(Tensor grad_out, Tensor input, Tensor? scale, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, Tensor mask, int residual_channels, bool training, str activation, "
      "float negative_slope, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // act(batch_norm(cat(inputs, 1))) without building the concatenation (docs/design.md section 3). The inputs agree
  // in N, spatial size, dtype and device and may differ in channels; C = sum of their channels. Returns
  // (output [N, C, *] dense in inputs[0]'s suggested memory format, save_mean [C], save_invstd [C], mask):
  //   mask  uint8: one segment per input, segment j = mask_bytes(inputs[j].numel()) bytes, bit i = element i of
  //         inputs[j] in its dense memory order (the output's format); [0] for identity.
  //   batch_mean / batch_var: optional precomputed batch statistics of the concatenation ([C] acc dtype, biased
  //         variance), training only: used instead of reducing the inputs (a dense block computes each feature
  //         map's statistics once, with bn_stats); the running statistics are updated from them.
  m.def(
      "dense_bn_act_forward(Tensor[] inputs, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor? batch_mean, Tensor? batch_var, bool training, float momentum, float eps, "
      "str activation, float negative_slope) -> (Tensor, Tensor, Tensor, Tensor)");
  // dense_bn_act_forward's output as one differentiable op (C++ autograd node: csrc/dense_autograd.cpp).
  m.def(
      "dense_bn_act(Tensor[] inputs, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? batch_mean, Tensor? batch_var, bool training, float momentum, float eps, str activation, "
      "float negative_slope) -> Tensor");
  // Gradients of dense_bn_act_forward: (grad_inputs, grad_weight, grad_bias). grad_inputs[j] is dense like
  // inputs[j] when input_mask[j], else an empty [0] tensor; param_mask = (weight, bias).
  m.def(
      "dense_bn_act_backward(Tensor grad_out, Tensor[] inputs, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, Tensor mask, bool training, str activation, float negative_slope, bool[] input_mask, "
      "bool[2] param_mask) -> (Tensor[], Tensor, Tensor)");

  // Highway gate (csrc/common/highway_math.h): y = act(transform) * sigmoid(gate) + carry * (1 - sigmoid(gate)),
  // or, with carry_gate, y = act(transform) * sigmoid(gate) + carry * sigmoid(carry_gate). All operands have the
  // same shape and dtype; the output is dense in transform's suggested memory format. activation: "relu", "tanh",
  // "sigmoid" or "identity".
  m.def("highway_forward(Tensor transform, Tensor gate, Tensor carry, Tensor? carry_gate, str activation) -> Tensor");
  // highway_forward / highway_packed_forward as differentiable ops (C++ autograd nodes: csrc/highway_autograd.cpp).
  m.def("highway(Tensor transform, Tensor gate, Tensor carry, Tensor? carry_gate, str activation) -> Tensor");
  m.def("highway_packed(Tensor projected, Tensor carry, int dim, bool free_carry, str activation) -> Tensor");
  // Gradients w.r.t. (transform, gate, carry, carry_gate) as selected by output_mask (others: empty [0] tensors),
  // each dense in transform's suggested memory format. Recomputes the sigmoid and activation from the inputs.
  m.def(
      "highway_backward(Tensor grad_out, Tensor transform, Tensor gate, Tensor carry, Tensor? carry_gate, "
      "str activation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Packed form: `projected` holds [transform, gate] (free_carry: [transform, gate, carry_gate]) concatenated
  // along `dim` (the output of one Linear(d, 2d) / conv to 2C channels); the parts are read in place.
  m.def(
      "highway_packed_forward(Tensor projected, Tensor carry, int dim, bool free_carry, str activation) -> Tensor");
  // Returns (grad_projected, grad_carry) per output_mask; grad_projected is dense like projected.
  m.def(
      "highway_packed_backward(Tensor grad_out, Tensor projected, Tensor carry, int dim, bool free_carry, "
      "str activation, bool[2] output_mask) -> (Tensor, Tensor)");
}

namespace {

bool cuda_compiled() {
#ifdef FUSEDRES_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cuda_archs() {
#ifdef FUSEDRES_CUDA_ARCHS
  return FUSEDRES_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedres native kernels (ops are registered under torch.ops.fusedres)";
  m.def("cuda_compiled", &cuda_compiled, "Whether the CUDA kernels were compiled into this build");
  m.def("cpu_capability", &fusedres::cpu::bn_act_cpu_capability,
        "Instruction set of the CPU kernels chosen for this machine (DEFAULT, AVX2, AVX512)");
  m.def("cuda_archs", &cuda_archs, "TORCH_CUDA_ARCH_LIST the CUDA kernels were built for");
#ifdef TORCH_VERSION
  m.attr("torch_version") = TORCH_VERSION;
#else
  m.attr("torch_version") = "unknown";
#endif
}

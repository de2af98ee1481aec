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
  //   mask         uint8 [mask_bytes(numel)] packed z > 0 bits in the output's memory order, or [0] for identity.
  // Updates running_mean / running_var in place when training and they are given (after the kernels succeed).
  m.def(
      "bn_act_forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, float negative_slope) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of bn_act_forward. output_mask = (input, residual, weight, bias); gradients not asked for are
  // returned as empty [0] tensors. training=False differentiates the eval form (constant statistics).
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
      "Tensor mask, bool training, str activation, float negative_slope, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Highway gate (csrc/common/highway_math.h): y = act(transform) * sigmoid(gate) + carry * (1 - sigmoid(gate)),
  // or, with carry_gate, y = act(transform) * sigmoid(gate) + carry * sigmoid(carry_gate). All operands have the
  // same shape and dtype; the output is dense in transform's suggested memory format. activation: "relu", "tanh",
  // "sigmoid" or "identity".
  m.def("highway_forward(Tensor transform, Tensor gate, Tensor carry, Tensor? carry_gate, str activation) -> Tensor");
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

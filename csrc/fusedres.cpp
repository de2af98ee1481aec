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

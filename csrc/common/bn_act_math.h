// Per-element math of BatchNorm + residual + activation, shared by the CPU kernels, the CUDA kernels
// and the CUDA emulator tests. Plain C++ only: no ATen, no CUDA intrinsics.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(EMU_CUDA_EMULATION)
#define FUSEDRES_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_HD inline
#endif

namespace fusedres {
namespace math {

// Activation codes, the same numbers on every backend (see parse_activation in bn_act.h).
//   kReLU6: min(max(z, 0), 6) (torch.nn.functional.relu6 = hardtanh(z, 0, 6)); backward from a 1-bit mask.
//   kSiLU:  z * sigmoid(z); a smooth activation: its backward recomputes z from the saved input and statistics
//           (docs/design.md section 1, "what is saved"), no mask.
enum ActKind : int { kIdentity = 0, kReLU = 1, kLeakyReLU = 2, kReLU6 = 3, kSiLU = 4 };

// Bytes of the packed activation mask for `numel` elements: one bit per element in the output's memory
// order (bit i of 32-bit word w is element 32*w + i, little-endian), rounded up to whole 32-bit words plus
// one spare word so that an unaligned 32-bit read at any element's bit offset stays inside the buffer.
FUSEDRES_HD long long mask_bytes(long long numel) { return ((numel + 31) / 32 + 1) * 4; }

// Whether the activation's backward reads a saved 1-bit mask (identity needs nothing; SiLU recomputes z).
FUSEDRES_HD bool act_has_mask(int act) { return act == kReLU || act == kLeakyReLU || act == kReLU6; }

// Whether the activation's backward needs the pre-activation z itself, recomputed from the input, the saved
// statistics, weight, bias and the residual.
FUSEDRES_HD bool act_needs_z(int act) { return act == kSiLU; }

// exp in the accumulation type: std::exp's float / double overloads on the host, the CUDA math library's on
// the device.
template <typename acc_t>
FUSEDRES_HD acc_t act_exp(acc_t v) {
  using std::exp;
  return exp(v);
}

// y = act(z). ReLU propagates NaN like torch.relu (NaN > 0 is false, so test z < 0 instead); ReLU6 likewise
// (clamp keeps NaN). SiLU is PyTorch's CPU formula z / (1 + exp(-z)): -0 for very negative z, NaN at -inf
// (-inf / inf) as torch.nn.functional.silu.
template <typename acc_t>
FUSEDRES_HD acc_t act_forward(acc_t z, int act, acc_t negative_slope) {
  if (act == kReLU) return z < acc_t(0) ? acc_t(0) : z;
  if (act == kLeakyReLU) return z > acc_t(0) ? z : z * negative_slope;
  if (act == kReLU6) return z < acc_t(0) ? acc_t(0) : (z > acc_t(6) ? acc_t(6) : z);
  if (act == kSiLU) return z / (acc_t(1) + act_exp(-z));
  return z;
}

// The mask bit kept for backward. ReLU / LeakyReLU: z > 0 (the test PyTorch's threshold / leaky_relu backward
// uses). ReLU6: 0 < z < 6, the open interval where PyTorch's hardtanh_backward passes the gradient (0 at z = 0 and
// z = 6). NaN gives 0 for both, as for ReLU: no gradient flows back through a NaN pre-activation. (PyTorch's own
// relu6 gradient at NaN is 0 in its vectorised CPU loop and 1 in its scalar tail and on CUDA.)
template <typename acc_t>
FUSEDRES_HD bool act_mask_bit(acc_t z, int act) {
  if (act == kReLU6) return z > acc_t(0) && z < acc_t(6);
  return z > acc_t(0);
}

// dz = dy * act'(z), from the saved mask bit (activations with act_has_mask, and identity).
template <typename acc_t>
FUSEDRES_HD acc_t act_backward(acc_t dy, bool bit, int act, acc_t negative_slope) {
  // Two compares, as before ReLU6 existed: a third pushed a CUDA reduce kernel (double) past its register budget.
  if (act == kLeakyReLU) return bit ? dy : dy * negative_slope;
  if (act == kIdentity) return dy;
  return bit ? dy : acc_t(0);  // kReLU, kReLU6
}

// dz = dy * silu'(z) = dy * s * (1 + z * (1 - s)), s = 1 / (1 + exp(-z)): PyTorch's silu_backward formula, so the
// special values agree (NaN at z = +-inf and NaN).
template <typename acc_t>
FUSEDRES_HD acc_t silu_backward(acc_t dy, acc_t z) {
  const acc_t s = acc_t(1) / (acc_t(1) + act_exp(-z));
  return dy * s * (acc_t(1) + z * (acc_t(1) - s));
}

// Training-mode input gradient: dx = k * (dz - mean_dz - xhat * mean_dz_xhat), k = w * invstd,
// mean_dz = sum(dz) / M, mean_dz_xhat = sum(dz * xhat) / M.
template <typename acc_t>
FUSEDRES_HD acc_t bn_grad_input(acc_t dz, acc_t xhat, acc_t k, acc_t mean_dz, acc_t mean_dz_xhat) {
  return k * (dz - mean_dz - xhat * mean_dz_xhat);
}

}  // namespace math
}  // namespace fusedres

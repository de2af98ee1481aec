// Per-element math of BatchNorm + residual + activation, shared by the CPU kernels, the CUDA kernels
// and the CUDA emulator tests. Plain C++ only: no ATen, no CUDA intrinsics.
#pragma once

#if defined(__CUDACC__) || defined(EMU_CUDA_EMULATION)
#define FUSEDRES_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_HD inline
#endif

namespace fusedres {
namespace math {

// Activation codes, the same numbers on every backend (see parse_activation in bn_act.h).
enum ActKind : int { kIdentity = 0, kReLU = 1, kLeakyReLU = 2 };

// Bytes of the packed activation mask for `numel` elements: one bit per element in the output's memory
// order (bit i of 32-bit word w is element 32*w + i, little-endian), rounded up to whole 32-bit words plus
// one spare word so that an unaligned 32-bit read at any element's bit offset stays inside the buffer.
FUSEDRES_HD long long mask_bytes(long long numel) { return ((numel + 31) / 32 + 1) * 4; }

// Whether the activation needs a mask for its backward (identity does not).
FUSEDRES_HD bool act_has_mask(int act) { return act != kIdentity; }

// y = act(z). ReLU propagates NaN like torch.relu (NaN > 0 is false, so test z < 0 instead).
template <typename acc_t>
FUSEDRES_HD acc_t act_forward(acc_t z, int act, acc_t negative_slope) {
  if (act == kReLU) return z < acc_t(0) ? acc_t(0) : z;
  if (act == kLeakyReLU) return z > acc_t(0) ? z : z * negative_slope;
  return z;
}

// The mask bit kept for backward: z > 0 (the same test PyTorch's threshold/leaky_relu backward uses).
template <typename acc_t>
FUSEDRES_HD bool act_mask_bit(acc_t z) {
  return z > acc_t(0);
}

// dz = dy * act'(z), from the saved mask bit.
template <typename acc_t>
FUSEDRES_HD acc_t act_backward(acc_t dy, bool positive, int act, acc_t negative_slope) {
  if (act == kReLU) return positive ? dy : acc_t(0);
  if (act == kLeakyReLU) return positive ? dy : dy * negative_slope;
  return dy;
}

// Training-mode input gradient: dx = k * (dz - mean_dz - xhat * mean_dz_xhat), k = w * invstd,
// mean_dz = sum(dz) / M, mean_dz_xhat = sum(dz * xhat) / M.
template <typename acc_t>
FUSEDRES_HD acc_t bn_grad_input(acc_t dz, acc_t xhat, acc_t k, acc_t mean_dz, acc_t mean_dz_xhat) {
  return k * (dz - mean_dz - xhat * mean_dz_xhat);
}

}  // namespace math
}  // namespace fusedres

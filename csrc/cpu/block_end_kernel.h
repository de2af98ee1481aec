// CPU kernels of the block end act(scale * batch_norm(x) + residual) (csrc/block_end.h): the interface between the op
// glue (block_end.cpp) and the vectorised kernels of block_end_kernel_impl.h, which are compiled into the bn_act
// kernel translation units (bn_act_kernel_{default,avx2,avx512}.cpp: they are built on its primitives) and chosen at
// run time (cpu/cpu_capability.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedres {
namespace cpu {

// The residual as it lies in memory: `channels` (<= C) channels, element (n, c, s) at
// data[n * stride_n + c * stride_c + spatial_offset[s]] (any strides: a subsampled view is read in place). Channels
// from `channels` on get no residual (PyramidNet's zero-padded shortcut). data is null when there is no residual.
struct BlockEndResidual {
  const void* data = nullptr;
  int64_t channels = 0;
  int64_t stride_n = 0, stride_c = 0;
  const int64_t* spatial_offset = nullptr;  // S offsets
  bool planes_dense = false;                // spatial_offset[s] == s: an NCHW plane is S contiguous values
};

// The branch scale, acc_t (double for double input, float otherwise): [N] per sample, or [N, C]. Null: 1.
struct BlockEndScale {
  const void* data = nullptr;
  bool per_channel = false;
};

// Dense (N, C, S) input in one of BnActGeom's two layouts (csrc/bn_act.h); per-channel arrays acc_t[C].
struct BlockEndForwardArgs {
  c10::ScalarType dtype;
  int64_t N, C, S;
  bool channels_last;
  bool training;
  int act;  // identity or a mask activation (math::act_has_mask)
  double negative_slope;
  double eps;
  const void* x;
  BlockEndResidual residual;
  BlockEndScale scale;
  const void* weight;
  const void* bias;
  void* y;         // dense like x
  uint8_t* mask;   // math::mask_bytes(numel) bytes, any content (the kernel zeroes it); null for identity
  void* mean;      // written in training, read in eval
  void* invstd;    // written in training, read in eval
  void* var;       // biased batch variance, written in training
};

struct BlockEndBackwardArgs {
  c10::ScalarType dtype;
  int64_t N, C, S;
  bool channels_last;
  bool training;
  int act;
  double negative_slope;
  const void* dy;  // dense like x
  const void* x;
  const uint8_t* mask;  // null for identity
  BlockEndScale scale;  // the scale the branch's gradient uses (the forward's, or Shake-Shake's backward scale)
  const void* mean;
  const void* invstd;
  const void* weight;
  void* dx;                   // dense like x; null when not wanted
  void* dresidual;            // dense (N, residual_channels, S) in x's layout; null when not wanted
  int64_t residual_channels;  // Cr
  // Outputs, null when not wanted: nc_sums acc_t[2][N][C] = per (n, c) (sum dz, sum dz * (x - mean)) (the forward
  // scale's gradient); c_sums acc_t[2][C] = (sum scale * dz, invstd * sum scale * dz * (x - mean)) = (grad_bias,
  // grad_weight).
  void* nc_sums;
  void* c_sums;
};

using BlockEndForwardFn = void (*)(const BlockEndForwardArgs&);
using BlockEndBackwardFn = void (*)(const BlockEndBackwardArgs&);

#define FUSEDRES_DECLARE_BLOCK_END_KERNELS(CAP)                    \
  namespace CAP {                                                  \
  void block_end_forward_kernel(const BlockEndForwardArgs& args);   \
  void block_end_backward_kernel(const BlockEndBackwardArgs& args); \
  }
FUSEDRES_DECLARE_BLOCK_END_KERNELS(DEFAULT)
#if defined(__x86_64__)
FUSEDRES_DECLARE_BLOCK_END_KERNELS(AVX2)
FUSEDRES_DECLARE_BLOCK_END_KERNELS(AVX512)
#endif
#undef FUSEDRES_DECLARE_BLOCK_END_KERNELS

BlockEndForwardFn block_end_forward_dispatch();
BlockEndBackwardFn block_end_backward_dispatch();

}  // namespace cpu
}  // namespace fusedres

// CPU kernels of BatchNorm + residual + activation: the interface between the op glue (bn_act.cpp) and
// the vectorised kernels, which are compiled once per CPU capability (bn_act_kernel_{default,avx2,avx512}.cpp,
// all from bn_act_kernel_impl.h) and chosen at run time like ATen's own DispatchStub does.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedres {
namespace cpu {

// Dense (N, C, S) tensors; see BnActGeom in bn_act.h for the two layouts. Per-channel arrays are acc_t
// (double for double input, float otherwise), contiguous, C elements.
struct BnActForwardArgs {
  c10::ScalarType dtype;
  int64_t N, C, S;
  bool channels_last;
  bool training;
  int act;
  double negative_slope;
  double eps;
  const void* x;
  const void* residual;  // may be null
  void* y;               // null in training: statistics only (mean, invstd, var), nothing else is written
  int64_t y_ld;          // 0: y is dense like x; else y's leading dimension (y is a channel slice of a wider
                         // tensor): NCHW y(n, c, s) = y[n * y_ld + c * S + s], channels_last y[(n * S + s) * y_ld + c]
  uint8_t* mask;         // zero-filled, math::mask_bytes(numel) bytes; null for identity
  const void* weight;    // acc_t[C]
  const void* bias;      // acc_t[C]
  void* mean;            // acc_t[C]: written in training, read in eval
  void* invstd;          // acc_t[C]: written in training, read in eval
  void* var;             // acc_t[C]: biased batch variance, written in training
  int64_t stream_bytes;  // 0: this call's output size decides non-temporal stores; else the size of the whole
                         // output this call writes a part of (the dense op writes the concatenation input by input)
};

struct BnActBackwardArgs {
  c10::ScalarType dtype;
  int64_t N, C, S;
  bool channels_last;
  bool training;
  int act;
  double negative_slope;
  const void* dy;
  int64_t dy_ld;         // 0: dy is dense like x; else its leading dimension (as y_ld of the forward)
  const void* x;
  const uint8_t* mask;   // null for identity
  const void* mean;      // acc_t[C]
  const void* invstd;    // acc_t[C]
  const void* weight;    // acc_t[C]
  void* dx;              // null when not wanted
  void* dresidual;       // null when not wanted
  void* sum_dz;          // acc_t[C], null when the reduction is not needed
  void* sum_dz_xhat;     // acc_t[C], null when the reduction is not needed
  // SiLU only (math::act_needs_z): its backward recomputes z = (x - mean) * w * invstd + bias (+ residual).
  const void* bias;      // acc_t[C]; null for the other activations
  const void* residual;  // dense like x; null when the forward had no residual (or the activation is not SiLU)
  // sums_given: sum_dz / sum_dz_xhat are inputs (taken over `count` values per channel, e.g. across ranks):
  // no reduction runs and the training-form dx uses them with `count` instead of N * S.
  bool sums_given;
  int64_t count;
  int64_t stream_bytes;  // as in BnActForwardArgs, for dx / dresidual
};

using BnActForwardFn = void (*)(const BnActForwardArgs&);
using BnActBackwardFn = void (*)(const BnActBackwardArgs&);
// The dense op's channels_last path: all inputs in one pass over row blocks (parts[j]: input j, with y / dy at
// its first channel of the wide output and y_ld / dy_ld = the output's channels; no residual, no dresidual,
// no given sums; same N, S, dtype, activation and training flag in every part).
using DenseForwardFn = void (*)(const BnActForwardArgs* parts, int64_t n_parts);
using DenseBackwardFn = void (*)(const BnActBackwardArgs* parts, int64_t n_parts);

#define FUSEDRES_DECLARE_CPU_KERNELS(CAP)                     \
  namespace CAP {                                             \
  void bn_act_forward_kernel(const BnActForwardArgs& args);   \
  void bn_act_backward_kernel(const BnActBackwardArgs& args); \
  void dense_forward_cl_kernel(const BnActForwardArgs* parts, int64_t n_parts);   \
  void dense_backward_cl_kernel(const BnActBackwardArgs* parts, int64_t n_parts); \
  const char* capability_name();                              \
  }
FUSEDRES_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__)
FUSEDRES_DECLARE_CPU_KERNELS(AVX2)
FUSEDRES_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef FUSEDRES_DECLARE_CPU_KERNELS

// The best kernel set for this CPU, honouring ATEN_CPU_CAPABILITY like ATen.
BnActForwardFn bn_act_forward_dispatch();
BnActBackwardFn bn_act_backward_dispatch();
DenseForwardFn dense_forward_cl_dispatch();
DenseBackwardFn dense_backward_cl_dispatch();
const char* bn_act_cpu_capability();

}  // namespace cpu
}  // namespace fusedres

// Small helpers shared by every kernel header of csrc/cuda: integer helpers for the host/device sizing functions,
// and the conversions between storage types (float, double, __half, __nv_bfloat16) and accumulation types.
// ATen-free like the kernel headers, so the CUDA emulator build (tests/cuda_emu) compiles it with g++.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"

// Half-precision storage types. Host-usable headers, so the emulator build gets them too when the toolkit's
// include directory is on its path; without them only float and double kernels exist there.
#if defined(__CUDACC__)
#define FUSEDRES_HAVE_CUDA_HALF 1
#elif defined(__has_include)
#if __has_include(<cuda_fp16.h>) && __has_include(<cuda_bf16.h>)
#define FUSEDRES_HAVE_CUDA_HALF 1
#endif
#endif
#ifdef FUSEDRES_HAVE_CUDA_HALF
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fusedres {
namespace gpu {

constexpr int kMaxGridY = 65535;

FUSEDRES_HOST_DEVICE_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FUSEDRES_HOST_DEVICE_INLINE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
FUSEDRES_HOST_DEVICE_INLINE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// Scalar conversion (storage type <-> accumulation type)
// ---------------------------------------------------------------------------------------------------------

FUSEDRES_HOST_DEVICE_INLINE float to_acc(float v) { return v; }
FUSEDRES_HOST_DEVICE_INLINE double to_acc(double v) { return v; }
#ifdef FUSEDRES_HAVE_CUDA_HALF
// Intrinsics rather than conversion operators: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
FUSEDRES_HOST_DEVICE_INLINE float to_acc(__half v) { return __half2float(v); }
FUSEDRES_HOST_DEVICE_INLINE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

template <typename scalar_t>
struct FromAcc {
  template <typename acc_t>
  static FUSEDRES_HOST_DEVICE_INLINE scalar_t convert(acc_t v) {
    return static_cast<scalar_t>(v);
  }
};
#ifdef FUSEDRES_HAVE_CUDA_HALF
template <>
struct FromAcc<__half> {
  static FUSEDRES_HOST_DEVICE_INLINE __half convert(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  static FUSEDRES_HOST_DEVICE_INLINE __nv_bfloat16 convert(float v) { return __float2bfloat16_rn(v); }
};
#endif

template <typename scalar_t, typename acc_t>
FUSEDRES_HOST_DEVICE_INLINE scalar_t from_acc(acc_t v) {
  return FromAcc<scalar_t>::convert(v);
}

}  // namespace gpu
}  // namespace fusedres

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

// Products and sums rounded one by one, never contracted into a fused multiply-add: where a kernel must reproduce
// a chain of separate ATen ops (the running-statistics update of bn_act_update_running_stats, one ATen kernel per
// product and per sum), nvcc's default contraction would round differently. (The emulator defines the intrinsics.)
FUSEDRES_DEVICE_INLINE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FUSEDRES_DEVICE_INLINE double mul_rn(double a, double b) { return __dmul_rn(a, b); }
FUSEDRES_DEVICE_INLINE float add_rn(float a, float b) { return __fadd_rn(a, b); }
FUSEDRES_DEVICE_INLINE double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---------------------------------------------------------------------------------------------------------
// Per-channel vectors of a dtype chosen at run time
// ---------------------------------------------------------------------------------------------------------

// The running statistics of a BatchNorm are float32 or the input's dtype (a half model keeps half running
// statistics with float accumulation; a float64 input may keep float32 ones). A run-time dtype code instead of a
// template parameter: one kernel instance per (storage, accumulation) type covers them all, and the per-channel
// switch is warp-uniform.
enum StatDtype : int { kStatFloat = 0, kStatDouble = 1, kStatHalf = 2, kStatBFloat16 = 3 };

FUSEDRES_HOST_DEVICE_INLINE int64_t stat_dtype_bytes(int dtype) {
  return dtype == kStatDouble ? 8 : dtype == kStatFloat ? 4 : 2;
}

// A dense [C] vector of dtype `dtype`, read and written in the accumulation type; data == nullptr: absent.
struct StatVector {
  void* data;
  int dtype;
  FUSEDRES_HOST_DEVICE_INLINE bool present() const { return data != nullptr; }
  // The vector from element c0 on (a channel slice); absent stays absent.
  FUSEDRES_HOST_DEVICE_INLINE StatVector offset(int64_t c0) const {
    return {data == nullptr ? nullptr : static_cast<char*>(data) + c0 * stat_dtype_bytes(dtype), dtype};
  }
  template <typename acc_t>
  FUSEDRES_DEVICE_INLINE acc_t load(int64_t c) const {
    switch (dtype) {
      case kStatDouble: return static_cast<acc_t>(static_cast<const double*>(data)[c]);
#ifdef FUSEDRES_HAVE_CUDA_HALF
      case kStatHalf: return static_cast<acc_t>(to_acc(static_cast<const __half*>(data)[c]));
      case kStatBFloat16: return static_cast<acc_t>(to_acc(static_cast<const __nv_bfloat16*>(data)[c]));
#endif
      default: return static_cast<acc_t>(static_cast<const float*>(data)[c]);
    }
  }
  // Rounded once to the storage type, as ATen's copy_ of the acc_t result does (a float64 value bound for half
  // storage is first rounded to float, as c10::Half's conversion from double does).
  template <typename acc_t>
  FUSEDRES_DEVICE_INLINE void store(int64_t c, acc_t v) const {
    switch (dtype) {
      case kStatDouble: static_cast<double*>(data)[c] = static_cast<double>(v); break;
#ifdef FUSEDRES_HAVE_CUDA_HALF
      case kStatHalf: static_cast<__half*>(data)[c] = from_acc<__half>(static_cast<float>(v)); break;
      case kStatBFloat16: static_cast<__nv_bfloat16*>(data)[c] = from_acc<__nv_bfloat16>(static_cast<float>(v)); break;
#endif
      default: static_cast<float*>(data)[c] = static_cast<float>(v); break;
    }
  }
};

}  // namespace gpu
}  // namespace fusedres

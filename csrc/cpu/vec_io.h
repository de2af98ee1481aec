// Vector helpers shared by the CPU kernel implementations (bn_act_kernel_impl.h, highway_kernel_impl.h):
// loads/stores of one acc_t vector from any of the four float dtypes, and non-temporal stores for outputs far
// larger than the caches. Included after CPU_CAPABILITY is defined, so everything lives in the
// capability-specific namespace like at::vec::Vectorized itself.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including vec_io.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fusedres {
namespace cpu {
namespace CPU_CAPABILITY {

// Accumulation type: double for double, float for float, BFloat16 and Half.
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads and stores of one vector of acc_t (float or double) from T (float, double, BFloat16, Half).
template <typename T>
struct VecIO {
  using acc_t = acc_type_t<T>;
  using V = at::vec::Vectorized<acc_t>;
  static constexpr int W = V::size();
  static V load(const T* p) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }
  static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, W);
    }
  }
  // The first n values (0 < n < W) at p; the other lanes are zero. Masked loads/stores where the ISA has them
  // (Vectorized<float/double>::loadu(p, n) on AVX-512), so short rows and run tails stay vectorised.
  static V load_n(const T* p, int n) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return V::loadu(p, n);
    } else {
      T tmp[W] = {};
      std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(T));
      return load(tmp);
    }
  }
  // Stores the first n values (0 < n < W) of v at p.
  static void store_n(T* p, const V& v, int n) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p, n);
    } else {
      T tmp[W];
      store(tmp, v);
      std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(T));
    }
  }
};

// Non-temporal stores for outputs much larger than the caches: they skip the read-for-ownership a normal
// store costs, so each output written moves half the bytes.
constexpr int64_t kStreamBytes = 16 * 1024 * 1024;

template <typename T>
constexpr bool can_stream() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
  return false;
#endif
}

// Non-temporal store of v at p (p aligned to the vector size); a normal store where can_stream<T>() is false.
template <typename T, typename V>
inline void store_stream(T* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, v);
  else if constexpr (std::is_same_v<T, double>) _mm512_stream_pd(p, v);
  else VecIO<T>::store(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, v);
  else if constexpr (std::is_same_v<T, double>) _mm256_stream_pd(p, v);
  else VecIO<T>::store(p, v);
#else
  VecIO<T>::store(p, v);
#endif
}

// Orders this thread's non-temporal stores before whatever reads the outputs next.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

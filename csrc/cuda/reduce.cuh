// The project's warp and block reductions: warp shuffles plus shared memory, written once and used by every
// kernel. Only __shfl_down_sync and __syncthreads are used (no CUB, no inline PTX, no cooperative groups) so
// the same code runs under the CUDA emulator in tests. Every reduction combines values in a fixed order, so
// results are bitwise reproducible run to run (no atomics).
//
// A reduced type T provides, as overloads in this namespace:
//   T merge(const T& a, const T& b)           associative combination (a first, b second)
//   T shfl_down(const T& v, unsigned delta)   __shfl_down_sync of every member
// and T{} (value-initialised) must be the identity of merge. Types placed in __shared__ memory must have no
// constructors or default member initialisers, hence plain aggregates.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"

namespace fusedres {
namespace gpu {

constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 1024 / kWarpSize;

// Two sums reduced together (the backward's sum of dz and sum of dz * (x - mean)).
template <typename T>
struct SumPair {
  T first;
  T second;
};

template <typename T>
FUSEDRES_HOST_DEVICE_INLINE SumPair<T> merge(const SumPair<T>& a, const SumPair<T>& b) {
  return {a.first + b.first, a.second + b.second};
}

// Welford state of a set of values: their count n, mean and m2 = sum of squared deviations from the mean.
// Unlike E[x^2] - E[x]^2 it does not cancel catastrophically when |mean| >> std. The count is kept in T
// (as PyTorch's own Welford does): it is exact up to 2^24 values per state in float, and beyond that it
// only weights merges, where a relative error of 1e-7 is harmless.
template <typename T>
struct WelfordStats {
  T mean;
  T m2;
  T n;
};

template <typename T>
FUSEDRES_HOST_DEVICE_INLINE void welford_push(WelfordStats<T>& s, T x) {
  s.n += T(1);
  const T delta = x - s.mean;
  s.mean += delta / s.n;
  s.m2 += delta * (x - s.mean);
}

// Chan et al.'s parallel merge. Either side may be empty (n == 0); both empty stays empty. Branch-free: the
// empty-empty case divides by 1 instead (b.n == 0, so b_share is 0 and a comes back) through a select rather than
// an early return, so a chain of merges (the finalize kernels') is straight-line code whose loads can all be issued
// ahead. For n != 0 the same operations as with the early return: the same bits.
template <typename T>
FUSEDRES_HOST_DEVICE_INLINE WelfordStats<T> merge(const WelfordStats<T>& a, const WelfordStats<T>& b) {
  const T n = a.n + b.n;
  const T delta = b.mean - a.mean;
  const T b_share = b.n / (n == T(0) ? T(1) : n);
  return {a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.n * b_share, n};
}

FUSEDRES_DEVICE_INLINE float shfl_down(float v, unsigned delta) {
  return __shfl_down_sync(kFullWarpMask, v, delta);
}

FUSEDRES_DEVICE_INLINE double shfl_down(double v, unsigned delta) {
  return __shfl_down_sync(kFullWarpMask, v, delta);
}

template <typename T>
FUSEDRES_DEVICE_INLINE SumPair<T> shfl_down(const SumPair<T>& v, unsigned delta) {
  return {shfl_down(v.first, delta), shfl_down(v.second, delta)};
}

template <typename T>
FUSEDRES_DEVICE_INLINE WelfordStats<T> shfl_down(const WelfordStats<T>& v, unsigned delta) {
  return {shfl_down(v.mean, delta), shfl_down(v.m2, delta), shfl_down(v.n, delta)};
}

// Reduces v over the 32 lanes of the calling warp; the result is valid in lane 0 only. All 32 lanes must
// call it (full-mask shuffles): callers keep it out of lane-divergent branches.
template <typename T>
FUSEDRES_DEVICE_INLINE T warp_reduce(T v) {
#pragma unroll
  for (unsigned delta = kWarpSize / 2; delta > 0; delta >>= 1) v = merge(v, shfl_down(v, delta));
  return v;
}

// Reduces v over a 1-D block whose blockDim.x is a multiple of 32 (at most 1024); the result is valid in
// thread 0 only. `warp_partials` is __shared__ storage for kMaxWarpsPerBlock values. Every thread of the block
// must call it (it contains __syncthreads); a caller that reuses `warp_partials` afterwards must
// __syncthreads() first.
template <typename T>
FUSEDRES_DEVICE_INLINE T block_reduce(T v, T* warp_partials) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
  v = warp_reduce(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    // The whole first warp takes part (full-mask shuffles); lanes without a partial bring the identity.
    v = lane < num_warps ? warp_partials[lane] : T{};
    v = warp_reduce(v);
  }
  return v;
}

// Reduces v over threadIdx.y separately for every threadIdx.x of a 2-D block (blockDim.y a power of two);
// the result is valid in the threads with threadIdx.y == 0. Used where threadIdx.x is a channel, so the lanes
// of a warp hold different channels and warp shuffles do not apply. `column_partials` is __shared__ storage
// for blockDim.x * blockDim.y values. Every thread must call it; reuse of the storage needs a __syncthreads().
template <typename T>
FUSEDRES_DEVICE_INLINE T column_reduce(T v, T* column_partials) {
  const int x = static_cast<int>(threadIdx.x);
  const int y = static_cast<int>(threadIdx.y);
  const int width = static_cast<int>(blockDim.x);
  column_partials[y * width + x] = v;
  __syncthreads();
  // Tree over y: at each step rows [half, 2 * half) are read (written one step earlier, behind the barrier)
  // and rows [0, half) are written, so no row is read and written in the same step.
  for (int half = static_cast<int>(blockDim.y) / 2; half > 0; half /= 2) {
    if (y < half) {
      v = merge(v, column_partials[(y + half) * width + x]);
      column_partials[y * width + x] = v;
    }
    __syncthreads();
  }
  return v;
}

}  // namespace gpu
}  // namespace fusedres

// Vectorised, multithreaded CPU kernels of the highway gate. Included by exactly one translation unit per CPU
// capability, each defining CPU_CAPABILITY (DEFAULT, AVX2, AVX512) first, so that at::vec::Vectorized and
// everything here lives in a capability-specific namespace.
//
// Work is the rows view of csrc/highway.h: `rows` rows of `cols` contiguous elements per operand. It is cut
// into chunks of at most kChunk columns of one row, spread over threads with at::parallel_for; each chunk is
// one pass: the forward reads transform, gate, carry (carry_gate) and writes the output, the backward reads
// grad_out and the inputs and writes the requested gradients. Values are computed in float (double for
// double) with at::vec::Vectorized, the tail of a chunk with the scalar functions of common/highway_math.h.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including highway_kernel_impl.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/highway_math.h"
#include "cpu/highway_kernel.h"
#include "cpu/vec_io.h"

namespace fusedres {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using math::kHwIdentity;
using math::kHwReLU;
using math::kHwSigmoid;
using math::kHwTanh;

// Columns of one row handled as one unit of work (small enough to balance threads on a single dense row).
constexpr int64_t kChunk = 16384;
// Elements below which the whole call runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

// Bytes a streamed vector store must be aligned to.
constexpr int64_t kVecBytes =
#if defined(CPU_CAPABILITY_AVX512)
    64;
#else
    32;
#endif

// Stores v at p: non-temporal when STREAM (p then kVecBytes-aligned), else a normal (converting) store.
template <bool STREAM, typename T, typename V>
inline void store_out(T* p, const V& v) {
  if constexpr (STREAM && can_stream<T>()) {
    store_stream(p, v);
  } else {
    VecIO<T>::store(p, v);
  }
}

// Elements [c0, c0 + head) to handle one by one so that every non-null output of `outs` is kVecBytes-aligned
// at c0 + head; -1 when the outputs are misaligned relative to each other (then nothing is streamed).
template <typename T, size_t N>
inline int64_t stream_head(const std::array<T*, N>& outs, int64_t c0, int64_t c1) {
  int64_t mis = -1;
  for (T* p : outs) {
    if (p == nullptr) continue;
    const auto m = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p + c0) % kVecBytes);
    if (m % static_cast<int64_t>(sizeof(T)) != 0 || (mis >= 0 && m != mis)) return -1;
    mis = m;
  }
  if (mis < 0) return -1;
  return std::min<int64_t>(c1 - c0, ((kVecBytes - mis) % kVecBytes) / static_cast<int64_t>(sizeof(T)));
}

// Stable logistic function, as math::stable_sigmoid: e = exp(-|g|) never overflows; 1/(1+e) for g >= 0 and
// e/(1+e) below, exactly 1 at +inf and 0 at -inf.
template <typename V>
inline V sigmoid_vec(const V& g) {
  const V one(1);
  const V e = g.abs().neg().exp();
  const V r = one / (one + e);
  return V::blendv(e * r, r, g >= V(0));
}

template <int ACT, typename V>
inline V act_vec(const V& h) {
  if constexpr (ACT == kHwReLU) return at::vec::maximum(h, V(0));  // propagates NaN like torch.relu
  else if constexpr (ACT == kHwTanh) return h.tanh();
  else if constexpr (ACT == kHwSigmoid) return sigmoid_vec(h);
  else return h;
}

// up * act'(h) given H = act(h) (math::highway_act_backward: relu selects, so a non-finite up stays out of the
// off branch).
template <int ACT, typename V>
inline V act_backward_vec(const V& up, const V& h, const V& H) {
  if constexpr (ACT == kHwReLU) return V::blendv(V(0), up, h > V(0));
  else if constexpr (ACT == kHwTanh) return up * (V(1) - H * H);
  else if constexpr (ACT == kHwSigmoid) return up * (H * (V(1) - H));
  else return up;
}

// Calls f(row, begin, end) for every chunk of the rows view, in parallel when the call is large enough.
template <typename F>
void for_each_chunk(const HighwayRows& shape, F&& f) {
  const int64_t chunks_per_row = (shape.cols + kChunk - 1) / kChunk;
  const int64_t chunk_len = std::min(shape.cols, kChunk);
  const int64_t total = shape.rows * chunks_per_row;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(chunk_len, 1));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / chunks_per_row;
      const int64_t c0 = (i % chunks_per_row) * kChunk;
      f(row, c0, std::min(shape.cols, c0 + kChunk));
    }
    stream_fence();
  });
}

template <typename T>
inline const T* in_row(const HighwayOperand& o, int64_t row) {
  return static_cast<const T*>(o.data) + row * o.row_stride;
}

template <typename T>
inline T* out_row(const HighwayOutOperand& o, int64_t row) {
  return o.data == nullptr ? nullptr : static_cast<T*>(o.data) + row * o.row_stride;
}

template <typename T, int ACT, bool FREE>
void forward_typed(const HighwayForwardArgs& a) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const bool stream = can_stream<T>() && a.shape.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  for_each_chunk(a.shape, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* h = in_row<T>(a.transform, row);
    const T* g = in_row<T>(a.gate, row);
    const T* x = in_row<T>(a.carry, row);
    const T* c = FREE ? in_row<T>(a.carry_gate, row) : nullptr;
    T* y = out_row<T>(a.out, row);
    auto scalar = [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t cj = FREE ? static_cast<acc_t>(c[j]) : acc_t(0);
        y[j] = static_cast<T>(math::highway_forward<acc_t>(static_cast<acc_t>(h[j]), static_cast<acc_t>(g[j]),
                                                            static_cast<acc_t>(x[j]), cj, ACT, FREE));
      }
    };
    auto vec = [&](auto streamed, int64_t j0, int64_t j1) {
      int64_t j = j0;
      for (; j + W <= j1; j += W) {
        const V H = act_vec<ACT>(IO::load(h + j));
        const V Tg = sigmoid_vec(IO::load(g + j));
        const V X = IO::load(x + j);
        const V gate_x = FREE ? sigmoid_vec(IO::load(c + j)) : V(1) - Tg;
        store_out<decltype(streamed)::value>(y + j, H * Tg + X * gate_x);
      }
      return j;
    };
    const int64_t head = stream ? stream_head(std::array<T*, 1>{y}, c0, c1) : -1;
    int64_t j;
    if (head >= 0) {
      scalar(c0, c0 + head);
      j = vec(std::true_type{}, c0 + head, c1);
    } else {
      j = vec(std::false_type{}, c0, c1);
    }
    scalar(j, c1);
  });
}

template <typename T, int ACT, bool FREE>
void backward_typed(const HighwayBackwardArgs& a) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const bool stream = can_stream<T>() && a.shape.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  for_each_chunk(a.shape, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* dy = in_row<T>(a.grad_out, row);
    const T* h = in_row<T>(a.transform, row);
    const T* g = in_row<T>(a.gate, row);
    const T* x = in_row<T>(a.carry, row);
    const T* c = FREE ? in_row<T>(a.carry_gate, row) : nullptr;
    T* dh = out_row<T>(a.grad_transform, row);
    T* dg = out_row<T>(a.grad_gate, row);
    T* dx = out_row<T>(a.grad_carry, row);
    T* dc = FREE ? out_row<T>(a.grad_carry_gate, row) : nullptr;
    auto scalar = [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        acc_t gh, gg, gx, gc;
        const acc_t cj = FREE ? static_cast<acc_t>(c[j]) : acc_t(0);
        math::highway_backward<acc_t>(static_cast<acc_t>(dy[j]), static_cast<acc_t>(h[j]),
                                      static_cast<acc_t>(g[j]), static_cast<acc_t>(x[j]), cj, ACT, FREE, &gh, &gg,
                                      &gx, &gc);
        if (dh != nullptr) dh[j] = static_cast<T>(gh);
        if (dg != nullptr) dg[j] = static_cast<T>(gg);
        if (dx != nullptr) dx[j] = static_cast<T>(gx);
        if (dc != nullptr) dc[j] = static_cast<T>(gc);
      }
    };
    auto vec = [&](auto streamed, int64_t j0, int64_t j1) {
      constexpr bool S = decltype(streamed)::value;
      const V one(1);
      int64_t j = j0;
      for (; j + W <= j1; j += W) {
        const V DY = IO::load(dy + j);
        const V Tg = sigmoid_vec(IO::load(g + j));
        if (dh != nullptr || dg != nullptr) {
          const V hv = IO::load(h + j);
          const V H = act_vec<ACT>(hv);
          if (dh != nullptr) store_out<S>(dh + j, act_backward_vec<ACT>(DY * Tg, hv, H));
          if (dg != nullptr) {
            const V dT = Tg * (one - Tg);
            if constexpr (FREE) {
              store_out<S>(dg + j, DY * H * dT);
            } else {
              store_out<S>(dg + j, DY * (H - IO::load(x + j)) * dT);
            }
          }
        }
        if constexpr (FREE) {
          if (dx != nullptr || dc != nullptr) {
            const V Sc = sigmoid_vec(IO::load(c + j));
            if (dx != nullptr) store_out<S>(dx + j, DY * Sc);
            if (dc != nullptr) store_out<S>(dc + j, DY * IO::load(x + j) * Sc * (one - Sc));
          }
        } else {
          if (dx != nullptr) store_out<S>(dx + j, DY * (one - Tg));
        }
      }
      return j;
    };
    const int64_t head = stream ? stream_head(std::array<T*, 4>{dh, dg, dx, dc}, c0, c1) : -1;
    int64_t j;
    if (head >= 0) {
      scalar(c0, c0 + head);
      j = vec(std::true_type{}, c0 + head, c1);
    } else {
      j = vec(std::false_type{}, c0, c1);
    }
    scalar(j, c1);
  });
}

template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case kHwReLU:
      f(std::integral_constant<int, kHwReLU>{});
      break;
    case kHwTanh:
      f(std::integral_constant<int, kHwTanh>{});
      break;
    case kHwSigmoid:
      f(std::integral_constant<int, kHwSigmoid>{});
      break;
    default:
      f(std::integral_constant<int, kHwIdentity>{});
      break;
  }
}

template <typename F>
void dispatch_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

void highway_forward_kernel(const HighwayForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "highway_forward_cpu", [&] {
    dispatch_act(args.act, [&](auto act) {
      dispatch_bool(args.free_carry, [&](auto fc) { forward_typed<scalar_t, act(), fc()>(args); });
    });
  });
}

void highway_backward_kernel(const HighwayBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "highway_backward_cpu", [&] {
    dispatch_act(args.act, [&](auto act) {
      dispatch_bool(args.free_carry, [&](auto fc) { backward_typed<scalar_t, act(), fc()>(args); });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

// CUDA kernels of the highway gate and the host/device sizing function that picks their launch shape. Compiled by
// nvcc for the launcher (highway.cu, through highway_launch.cuh) and by a host compiler against the CUDA emulator
// in tests (tests/test_cuda_emulated_highway.py), so this header uses no ATen, c10, CUB or inline PTX.
//
// Every operand is `rows` rows of `cols` contiguous elements with its own row stride (in elements), the view
// csrc/highway.h describes: an unpacked op is one row of numel elements; the parts of a packed projection are
// read in place with row stride parts * cols. Purely elementwise (no reductions, no shared memory, no
// collectives); the per-element math is that of csrc/common/highway_math.h (the CPU kernels' functions), written
// here without branches and with the activation as a template parameter (see "Device math" below).
//
// Kernels, launched with the shape of highway_launch_config(), one instantiation per activation and carry form:
//   highway_forward_kernel   y = act(h) * sigmoid(g) + x * (1 - sigmoid(g))   (free carry: + x * sigmoid(c))
//   highway_backward_kernel  dh, dg, dx (and dc), each optional, in one pass over dy, h, g, x (and c)
// Both use the same 2-D walk: threadIdx.x / blockIdx.x along a row's columns (kHighwayUnroll elements per thread,
// kHighwayUnroll * blockDim.x consecutive columns per block tile, lane-strided so that a warp's loads coalesce),
// threadIdx.y / blockIdx.y over rows; both grid dimensions stride, so any (rows, cols) is covered by a bounded grid.
//
// Scalars: float, double, __half and __nv_bfloat16; acc_t is double for double and float otherwise.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"
#include "kernel_common.cuh"
#include "../common/highway_math.h"

namespace fusedres {
namespace gpu {

// ---------------------------------------------------------------------------------------------------------
// Sizing: one host/device function shared by the launcher and the emulator tests
// ---------------------------------------------------------------------------------------------------------

constexpr int kHighwayThreads = 256;
constexpr int kHighwayUnroll = 4;        // elements per thread per tile: independent loads in flight
constexpr int kHighwayBlocksPerSm = 8;   // 8 x 256 threads fill an SM; the grid strides over the rest
// Register cap through __launch_bounds__: at least 3 resident blocks (<= 85 registers). Uncapped, the unrolled
// float64 backward took ~108 registers (2 blocks per SM); a cap of 4 blocks (64 registers) makes it spill.
constexpr int kHighwayMinBlocksPerSm = 3;

struct HighwayShape {
  int64_t rows, cols;
};

struct HighwayLaunch {
  HighwayShape shape;
  dim3 grid, block;
};

// Launch shape for a (rows, cols) problem on a device with `num_sms` multiprocessors. The block is 256 threads:
// blockDim.x is the smallest power of two with blockDim.x * kHighwayUnroll >= cols (at most 256), so short rows
// (a packed projection of small width) give a block several rows instead of idle threads; blockDim.y takes the
// rest. Valid for rows * cols == 0 as well (every extent at least 1), though the launcher returns before
// launching anything then.
FUSEDRES_HOST_DEVICE_INLINE HighwayLaunch highway_launch_config(int64_t rows, int64_t cols, int num_sms) {
  HighwayLaunch L;
  L.shape.rows = rows;
  L.shape.cols = cols;
  int64_t tx = 1;
  while (tx < kHighwayThreads && tx * kHighwayUnroll < cols) tx *= 2;
  const int64_t ty = kHighwayThreads / tx;
  const int64_t col_tiles = max_i64(ceil_div(cols, tx * kHighwayUnroll), 1);
  const int64_t row_tiles = max_i64(ceil_div(rows, ty), 1);
  const int64_t target = max_i64(num_sms, 1) * kHighwayBlocksPerSm;
  const int64_t gx = min_i64(col_tiles, target);
  const int64_t gy = min_i64(min_i64(row_tiles, max_i64(target / gx, 1)), kMaxGridY);
  L.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  L.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  return L;
}

// ---------------------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------------------

// Element (row, col) of an operand is data[row * row_stride + col] (64-bit offsets).
template <typename scalar_t>
struct HighwayIn {
  const scalar_t* data;  // nullptr: absent (carry_gate of the coupled form)
  int64_t row_stride;
};

template <typename scalar_t>
struct HighwayOut {
  scalar_t* data;  // nullptr: not requested
  int64_t row_stride;
};

template <typename scalar_t>
struct HighwayForwardKernelArgs {
  HighwayIn<scalar_t> transform, gate, carry, carry_gate;  // carry_gate.data != nullptr: free carry form
  HighwayOut<scalar_t> out;
  int act;  // math::HighwayAct: selects the kernel instantiation (highway_launch.cuh)
};

template <typename scalar_t>
struct HighwayBackwardKernelArgs {
  HighwayIn<scalar_t> grad_out, transform, gate, carry, carry_gate;  // carry_gate.data != nullptr: free carry
  HighwayOut<scalar_t> grad_transform, grad_gate, grad_carry, grad_carry_gate;
  int act;
};

// The walk both kernels share: calls f(row, col) for every element this thread owns, kHighwayUnroll columns at a
// time (f receives the first column and a validity per unrolled slot, so loads of a tile are issued together).
template <typename F>
FUSEDRES_DEVICE_INLINE void highway_for_each_tile(const HighwayShape sh, F&& f) {
  const int64_t tile = int64_t(blockDim.x) * kHighwayUnroll;
  const int64_t col_start = int64_t(blockIdx.x) * tile + threadIdx.x;
  const int64_t col_step = int64_t(gridDim.x) * tile;
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t row = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; row < sh.rows; row += row_step) {
    for (int64_t col = col_start; col < sh.cols; col += col_step) f(row, col);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Device math: the formulas of csrc/common/highway_math.h without branches, the activation and carry form as
// template parameters. The CPU kernels keep highway_math.h's functions (their results do not change); these differ
// from them by rounding only (exact libm exp / tanh in float and double), or, for 16-bit storage, by the error of
// the fast intrinsics, far below the 11 (half) or 8 (bfloat16) significant bits the result is stored with.
// ---------------------------------------------------------------------------------------------------------

// Fast intrinsics where the result is stored in 16 bits and computed in float: __expf (ex2.approx, relative
// error 2 + 1.2 |x| ulp of float, so < 1e-5 relative over the |x| <= 18 used below) and __fdividef.
template <typename scalar_t, typename acc_t>
constexpr bool kHighwayFastMath = sizeof(scalar_t) == 2 && sizeof(acc_t) == 4;

template <bool kFast, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_exp(acc_t x) {
  if constexpr (kFast) {
    return __expf(x);
  } else {
    using std::exp;
    return exp(x);
  }
}

// 1 / d for d in [1, 2] (the sigmoid's 1 + exp(-|g|)) or d in [1, e^18 + 1] (the tanh below): __fdividef is exact
// enough there and needs no special-case path (IEEE division calls a slow-path subroutine for edge operands).
template <bool kFast, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_recip(acc_t d) {
  if constexpr (kFast) {
    return __fdividef(1.0f, d);
  } else {
    return acc_t(1) / d;
  }
}

// Stable logistic function without a branch: e = exp(-|g|) in (0, 1] never overflows; 1 / (1 + e) for g >= 0 and
// e / (1 + e) otherwise, chosen by a select. Exactly 1 at +inf and 0 at -inf; NaN propagates.
template <bool kFast, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_sigmoid(acc_t g) {
  using std::fabs;
  const acc_t e = hw_exp<kFast>(-fabs(g));
  const acc_t s = hw_recip<kFast>(acc_t(1) + e);
  return g >= acc_t(0) ? s : e * s;
}

// tanh: the accurate library function, or for 16-bit storage sign(h) * (1 - 2 / (exp(2|h|) + 1)), whose
// cancellation near 0 is avoided by the odd Taylor polynomial below |h| = 1/8 (relative error < 3e-7 there);
// |h| is clamped at 9 (tanh(9) rounds to 1 in float) so that exp stays finite. A NaN passes the compares as NaN.
template <bool kFast, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_tanh(acc_t h) {
  if constexpr (kFast) {
    const float m = fabsf(h);
    const float a = m > 9.0f ? 9.0f : m;
    const float big = 1.0f - 2.0f * hw_recip<true>(__expf(2.0f * a) + 1.0f);
    const float a2 = a * a;
    const float small = a * (1.0f + a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f)));
    return copysignf(a < 0.125f ? small : big, h);
  } else {
    using std::tanh;
    return tanh(h);
  }
}

// H = act(h), math::highway_act with the activation fixed at compile time.
template <int kAct, bool kFast, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_act(acc_t h) {
  if constexpr (kAct == math::kHwReLU) return h < acc_t(0) ? acc_t(0) : h;  // NaN propagates like torch.relu
  if constexpr (kAct == math::kHwTanh) return hw_tanh<kFast>(h);
  if constexpr (kAct == math::kHwSigmoid) return hw_sigmoid<kFast>(h);
  return h;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels: one instantiation per storage type, activation (math::HighwayAct) and carry form, chosen by the
// launcher (highway_launch.cuh), so the loop holds one activation's code and loads only the operands its form
// reads.
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayMinBlocksPerSm)
    highway_forward_kernel(const HighwayForwardKernelArgs<scalar_t> a, const HighwayShape sh) {
  constexpr bool kFast = kHighwayFastMath<scalar_t, acc_t>;
  const int64_t lane_step = blockDim.x;
  highway_for_each_tile(sh, [&](int64_t row, int64_t col0) {
    const scalar_t* h = a.transform.data + row * a.transform.row_stride;
    const scalar_t* g = a.gate.data + row * a.gate.row_stride;
    const scalar_t* x = a.carry.data + row * a.carry.row_stride;
    const scalar_t* c = kFreeCarry ? a.carry_gate.data + row * a.carry_gate.row_stride : nullptr;
    scalar_t* y = a.out.data + row * a.out.row_stride;
    acc_t hv[kHighwayUnroll], gv[kHighwayUnroll], xv[kHighwayUnroll], cv[kHighwayUnroll];
#pragma unroll
    for (int j = 0; j < kHighwayUnroll; ++j) {
      const int64_t col = col0 + j * lane_step;
      hv[j] = gv[j] = xv[j] = cv[j] = acc_t(0);
      if (col < sh.cols) {
        hv[j] = to_acc(h[col]);
        gv[j] = to_acc(g[col]);
        xv[j] = to_acc(x[col]);
        if constexpr (kFreeCarry) cv[j] = to_acc(c[col]);
      }
    }
#pragma unroll
    for (int j = 0; j < kHighwayUnroll; ++j) {
      const int64_t col = col0 + j * lane_step;
      if (col < sh.cols) {
        const acc_t H = hw_act<kAct, kFast>(hv[j]);
        const acc_t T = hw_sigmoid<kFast>(gv[j]);
        acc_t out;
        if constexpr (kFreeCarry) {
          out = H * T + xv[j] * hw_sigmoid<kFast>(cv[j]);
        } else {
          out = H * T + xv[j] * (acc_t(1) - T);
        }
        y[col] = from_acc<scalar_t>(out);
      }
    }
  });
}

// One pass: reads dy, h, g (always), x (when a gradient that needs it is requested: grad_gate of the coupled form,
// grad_carry_gate of the free form) and c (free form); writes the requested gradients. The formulas of
// math::highway_backward (dh = act_backward(dy*T) below):
//   coupled:    dh = dy*T*act'(h); dg = dy*(H - x)*T*(1 - T); dx = dy*(1 - T)
//   free carry: dh = dy*T*act'(h); dg = dy*H*T*(1 - T); dx = dy*S; dc = dy*x*S*(1 - S), S = sigmoid(c)
template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayMinBlocksPerSm)
    highway_backward_kernel(const HighwayBackwardKernelArgs<scalar_t> a, const HighwayShape sh) {
  constexpr bool kFast = kHighwayFastMath<scalar_t, acc_t>;
  const bool need_x = kFreeCarry ? a.grad_carry_gate.data != nullptr : a.grad_gate.data != nullptr;
  const int64_t lane_step = blockDim.x;
  highway_for_each_tile(sh, [&](int64_t row, int64_t col0) {
    const scalar_t* dy = a.grad_out.data + row * a.grad_out.row_stride;
    const scalar_t* h = a.transform.data + row * a.transform.row_stride;
    const scalar_t* g = a.gate.data + row * a.gate.row_stride;
    const scalar_t* x = a.carry.data + row * a.carry.row_stride;
    const scalar_t* c = kFreeCarry ? a.carry_gate.data + row * a.carry_gate.row_stride : nullptr;
    acc_t dyv[kHighwayUnroll], hv[kHighwayUnroll], gv[kHighwayUnroll], xv[kHighwayUnroll], cv[kHighwayUnroll];
#pragma unroll
    for (int j = 0; j < kHighwayUnroll; ++j) {
      const int64_t col = col0 + j * lane_step;
      dyv[j] = hv[j] = gv[j] = xv[j] = cv[j] = acc_t(0);
      if (col < sh.cols) {
        dyv[j] = to_acc(dy[col]);
        hv[j] = to_acc(h[col]);
        gv[j] = to_acc(g[col]);
        if (need_x) xv[j] = to_acc(x[col]);
        if constexpr (kFreeCarry) cv[j] = to_acc(c[col]);
      }
    }
#pragma unroll
    for (int j = 0; j < kHighwayUnroll; ++j) {
      const int64_t col = col0 + j * lane_step;
      if (col >= sh.cols) continue;
      const acc_t d = dyv[j];
      const acc_t H = hw_act<kAct, kFast>(hv[j]);
      const acc_t T = hw_sigmoid<kFast>(gv[j]);
      const acc_t dh = math::highway_act_backward(d * T, hv[j], H, kAct);  // kAct constant: folded
      acc_t dg, dx, dc = acc_t(0);
      if constexpr (kFreeCarry) {
        const acc_t S = hw_sigmoid<kFast>(cv[j]);
        dg = d * H * T * (acc_t(1) - T);
        dx = d * S;
        dc = d * xv[j] * S * (acc_t(1) - S);
      } else {
        dg = d * (H - xv[j]) * T * (acc_t(1) - T);
        dx = d * (acc_t(1) - T);
      }
      if (a.grad_transform.data != nullptr) {
        a.grad_transform.data[row * a.grad_transform.row_stride + col] = from_acc<scalar_t>(dh);
      }
      if (a.grad_gate.data != nullptr) a.grad_gate.data[row * a.grad_gate.row_stride + col] = from_acc<scalar_t>(dg);
      if (a.grad_carry.data != nullptr) {
        a.grad_carry.data[row * a.grad_carry.row_stride + col] = from_acc<scalar_t>(dx);
      }
      if (kFreeCarry && a.grad_carry_gate.data != nullptr) {
        a.grad_carry_gate.data[row * a.grad_carry_gate.row_stride + col] = from_acc<scalar_t>(dc);
      }
    }
  });
}

}  // namespace gpu
}  // namespace fusedres

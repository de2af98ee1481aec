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
// each in two walks (see "Kernels" below): the aligned one (16-byte accesses, 32-bit indices inside a row, no
// per-element bounds check) where every operand's pointer and row stride allow it (highway_aligned()), and the
// strided one (strided_highway_*_kernel: one element per access, 64-bit indices) otherwise. Both walk columns along
// threadIdx.x / blockIdx.x and rows along threadIdx.y / blockIdx.y; both grid dimensions stride, so any
// (rows, cols) is covered by a bounded grid.
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
// The aligned float64 backward (five 16-byte packs in flight plus nine row pointers) spills 20 B under the cap of
// 3 blocks on sm_90 (free carry): it gets the cap of 2 blocks (128 registers); it then takes 68-80 registers, so 3
// blocks still fit. The other kernels keep the cap of 3.
template <typename scalar_t>
constexpr int kHighwayBackwardMinBlocksPerSm = sizeof(scalar_t) == 8 ? 2 : kHighwayMinBlocksPerSm;

struct HighwayShape {
  int64_t rows, cols;
};

struct HighwayLaunch {
  HighwayShape shape;
  dim3 grid, block;
};

// Launch shape for a (rows, cols) problem on a device with `num_sms` multiprocessors, each thread taking
// `per_thread` consecutive-in-the-tile columns per step (kHighwayUnroll for the strided walk, one 16-byte pack,
// kHighwayVec<scalar_t>, for the aligned one). The block is 256 threads: blockDim.x is the smallest power of two
// with blockDim.x * per_thread >= cols (at most 256), so short rows (a packed projection of small width) give a
// block several rows instead of idle threads; blockDim.y takes the rest. Valid for rows * cols == 0 as well
// (every extent at least 1), though the launcher returns before launching anything then.
FUSEDRES_HOST_DEVICE_INLINE HighwayLaunch highway_launch_config(int64_t rows, int64_t cols, int num_sms,
                                                                int per_thread = kHighwayUnroll) {
  HighwayLaunch L;
  L.shape.rows = rows;
  L.shape.cols = cols;
  int64_t tx = 1;
  while (tx < kHighwayThreads && tx * per_thread < cols) tx *= 2;
  const int64_t ty = kHighwayThreads / tx;
  const int64_t col_tiles = max_i64(ceil_div(cols, tx * per_thread), 1);
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

// The aligned walk's condition for one operand (absent operands pass): its (0, 0) element on a 16-byte boundary
// and, when there is more than one row, a row stride that keeps every row's start there.
template <typename scalar_t, typename Operand>
FUSEDRES_HOST_DEVICE_INLINE bool highway_operand_aligned(const Operand& o, int64_t rows) {
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(scalar_t));
  if (o.data == nullptr) return true;
  return reinterpret_cast<uintptr_t>(o.data) % 16 == 0 && (rows <= 1 || o.row_stride % kVec == 0);
}

// Shapes whose row index and index inside a row fit in 32 bits with their grid strides added: a row stride is at
// most kMaxGridY * 256 < 2^24, a pack stride num_sms * kHighwayBlocksPerSm * 256 (< 2^30 for any real device), so
// an index below 2^30 plus either stays below 2^31.
FUSEDRES_HOST_DEVICE_INLINE bool highway_fits_int32(int64_t rows, int64_t cols) {
  return rows < (int64_t(1) << 30) && cols < (int64_t(1) << 30);
}

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

// Per-element forward and backward: the formulas of math::highway_forward / math::highway_backward, shared by
// both walks below so that the aligned and the strided kernels compute exactly the same values.
template <int kAct, bool kFast, bool kFreeCarry, typename acc_t>
FUSEDRES_DEVICE_INLINE acc_t hw_forward_elem(acc_t h, acc_t g, acc_t x, acc_t c) {
  const acc_t H = hw_act<kAct, kFast>(h);
  const acc_t T = hw_sigmoid<kFast>(g);
  if constexpr (kFreeCarry) {
    return H * T + x * hw_sigmoid<kFast>(c);
  } else {
    (void)c;
    return H * T + x * (acc_t(1) - T);
  }
}

template <typename acc_t>
struct HighwayGrads {
  acc_t dh, dg, dx, dc;
};

// One pass: the formulas of math::highway_backward (dh = act_backward(dy*T) below):
//   coupled:    dh = dy*T*act'(h); dg = dy*(H - x)*T*(1 - T); dx = dy*(1 - T)
//   free carry: dh = dy*T*act'(h); dg = dy*H*T*(1 - T); dx = dy*S; dc = dy*x*S*(1 - S), S = sigmoid(c)
template <int kAct, bool kFast, bool kFreeCarry, typename acc_t>
FUSEDRES_DEVICE_INLINE HighwayGrads<acc_t> hw_backward_elem(acc_t d, acc_t h, acc_t g, acc_t x, acc_t c) {
  const acc_t H = hw_act<kAct, kFast>(h);
  const acc_t T = hw_sigmoid<kFast>(g);
  HighwayGrads<acc_t> r;
  r.dh = math::highway_act_backward(d * T, h, H, kAct);  // kAct constant: folded
  if constexpr (kFreeCarry) {
    const acc_t S = hw_sigmoid<kFast>(c);
    r.dg = d * H * T * (acc_t(1) - T);
    r.dx = d * S;
    r.dc = d * x * S * (acc_t(1) - S);
  } else {
    (void)c;
    r.dg = d * (H - x) * T * (acc_t(1) - T);
    r.dx = d * (acc_t(1) - T);
    r.dc = acc_t(0);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels: one instantiation per storage type, activation (math::HighwayAct) and carry form, chosen by the
// launcher (highway_launch.cuh), so the loop holds one activation's code and loads only the operands its form
// reads. Two walks, chosen at run time by the launcher (highway_aligned()):
//   highway_{forward,backward}_kernel          aligned: every operand's (0, 0) element 16-byte aligned, every
//       row stride a multiple of kHighwayVec elements, rows and cols below 2^30. One 16-byte access (a
//       HighwayPack: 4 float, 8 half / bfloat16, 2 double) per operand and iteration, 32-bit indices inside a
//       row (64-bit row offsets, once per row), no per-element bounds check; the cols % kHighwayVec elements at
//       the end of each row are done one at a time by the first block column.
//   strided_highway_{forward,backward}_kernel  any pointers and strides: kHighwayUnroll elements per thread,
//       one load each, 64-bit indices, a bounds check per element.
// ---------------------------------------------------------------------------------------------------------

// Elements per 16-byte access.
template <typename scalar_t>
constexpr int kHighwayVec = 16 / static_cast<int>(sizeof(scalar_t));

// 16 bytes of one operand: a load or store of a HighwayPack through a reinterpret_cast pointer is one 128-bit
// instruction (LDG.E.128 / STG.E.128) on the device and a struct copy under the emulator.
template <typename scalar_t>
struct alignas(16) HighwayPack {
  scalar_t v[kHighwayVec<scalar_t>];
};

// The aligned walk: for every row this thread visits, row_fn(row) gives the row's pack function (its operand
// row pointers computed once per row, outside the pack loop), called for every 16-byte pack this thread owns;
// tail(row, col) takes the cols % V elements at the end of the row. Indices inside a row are 32-bit (rows, cols
// < 2^30 are the launcher's condition, so neither an index nor its grid stride overflows); a row's offset is
// 64-bit.
template <typename scalar_t, typename RowFn, typename TailFn>
FUSEDRES_DEVICE_INLINE void highway_for_each_pack(const HighwayShape sh, RowFn&& row_fn, TailFn&& tail) {
  constexpr int V = kHighwayVec<scalar_t>;
  const int rows = static_cast<int>(sh.rows);
  const int cols = static_cast<int>(sh.cols);
  const int packs = cols / V;
  const int tail_start = packs * V;
  const int pack_start = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int pack_step = static_cast<int>(gridDim.x * blockDim.x);
  const int row_step = static_cast<int>(gridDim.y * blockDim.y);
  for (int row = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y); row < rows; row += row_step) {
    auto f = row_fn(row);
    for (int p = pack_start; p < packs; p += pack_step) f(p);
    if (blockIdx.x == 0) {
      // Not unrolled: fewer than V iterations in all, and an unrolled copy would outweigh the pack loop in code.
#pragma unroll 1
      for (int col = tail_start + static_cast<int>(threadIdx.x); col < cols; col += static_cast<int>(blockDim.x)) {
        tail(row, col);
      }
    }
  }
}

template <typename scalar_t>
FUSEDRES_DEVICE_INLINE const HighwayPack<scalar_t>* hw_row_packs(const HighwayIn<scalar_t>& o, int row) {
  return reinterpret_cast<const HighwayPack<scalar_t>*>(o.data + int64_t(row) * o.row_stride);
}

template <typename scalar_t>
FUSEDRES_DEVICE_INLINE HighwayPack<scalar_t>* hw_row_packs(const HighwayOut<scalar_t>& o, int row) {
  return reinterpret_cast<HighwayPack<scalar_t>*>(o.data + int64_t(row) * o.row_stride);
}

template <typename T>
FUSEDRES_DEVICE_INLINE const T& hw_at(const HighwayIn<T>& o, int row, int col) {
  return o.data[int64_t(row) * o.row_stride + col];
}

template <typename T>
FUSEDRES_DEVICE_INLINE T& hw_at(const HighwayOut<T>& o, int row, int col) {
  return o.data[int64_t(row) * o.row_stride + col];
}

template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayMinBlocksPerSm)
    highway_forward_kernel(const HighwayForwardKernelArgs<scalar_t> a, const HighwayShape sh) {
  constexpr bool kFast = kHighwayFastMath<scalar_t, acc_t>;
  constexpr int V = kHighwayVec<scalar_t>;
  using Pack = HighwayPack<scalar_t>;
  highway_for_each_pack<scalar_t>(
      sh,
      [&](int row) {
        const Pack* h = hw_row_packs(a.transform, row);
        const Pack* g = hw_row_packs(a.gate, row);
        const Pack* x = hw_row_packs(a.carry, row);
        const Pack* c = kFreeCarry ? hw_row_packs(a.carry_gate, row) : nullptr;
        Pack* y = hw_row_packs(a.out, row);
        return [=](int p) {
          const Pack hp = h[p], gp = g[p], xp = x[p];
          Pack cp = hp;
          if constexpr (kFreeCarry) cp = c[p];
          Pack yp;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            yp.v[j] = from_acc<scalar_t>(hw_forward_elem<kAct, kFast, kFreeCarry>(
                to_acc(hp.v[j]), to_acc(gp.v[j]), to_acc(xp.v[j]), to_acc(cp.v[j])));
          }
          y[p] = yp;
        };
      },
      [&](int row, int col) {
        const acc_t c = kFreeCarry ? to_acc(hw_at(a.carry_gate, row, col)) : acc_t(0);
        hw_at(a.out, row, col) = from_acc<scalar_t>(hw_forward_elem<kAct, kFast, kFreeCarry>(
            to_acc(hw_at(a.transform, row, col)), to_acc(hw_at(a.gate, row, col)), to_acc(hw_at(a.carry, row, col)),
            c));
      });
}

// Reads dy, h, g (always), x (when a gradient that needs it is requested: grad_gate of the coupled form,
// grad_carry_gate of the free form) and c (free form); writes the requested gradients.
template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayBackwardMinBlocksPerSm<scalar_t>)
    highway_backward_kernel(const HighwayBackwardKernelArgs<scalar_t> a, const HighwayShape sh) {
  constexpr bool kFast = kHighwayFastMath<scalar_t, acc_t>;
  constexpr int V = kHighwayVec<scalar_t>;
  using Pack = HighwayPack<scalar_t>;
  const bool need_x = kFreeCarry ? a.grad_carry_gate.data != nullptr : a.grad_gate.data != nullptr;
  // Which gradients are stored: tested as these flags (kernel-wide) rather than as the row pointers (registers of
  // 64-bit compares in every iteration).
  const bool want_dh = a.grad_transform.data != nullptr, want_dg = a.grad_gate.data != nullptr;
  const bool want_dx = a.grad_carry.data != nullptr, want_dc = kFreeCarry && a.grad_carry_gate.data != nullptr;
  highway_for_each_pack<scalar_t>(
      sh,
      [&](int row) {
        const Pack* dy = hw_row_packs(a.grad_out, row);
        const Pack* h = hw_row_packs(a.transform, row);
        const Pack* g = hw_row_packs(a.gate, row);
        const Pack* x = need_x ? hw_row_packs(a.carry, row) : nullptr;
        const Pack* c = kFreeCarry ? hw_row_packs(a.carry_gate, row) : nullptr;
        Pack* dh = want_dh ? hw_row_packs(a.grad_transform, row) : nullptr;
        Pack* dg = want_dg ? hw_row_packs(a.grad_gate, row) : nullptr;
        Pack* dx = want_dx ? hw_row_packs(a.grad_carry, row) : nullptr;
        Pack* dc = want_dc ? hw_row_packs(a.grad_carry_gate, row) : nullptr;
        return [=](int p) {
          const Pack dyp = dy[p], hp = h[p], gp = g[p];
          // x unread: the gradients that use it are not stored, so any stand-in (h) serves.
          Pack xp = hp, cp = hp;
          if (need_x) xp = x[p];
          if constexpr (kFreeCarry) cp = c[p];
          Pack dhp, dgp, dxp, dcp;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const HighwayGrads<acc_t> r = hw_backward_elem<kAct, kFast, kFreeCarry>(
                to_acc(dyp.v[j]), to_acc(hp.v[j]), to_acc(gp.v[j]), to_acc(xp.v[j]), to_acc(cp.v[j]));
            dhp.v[j] = from_acc<scalar_t>(r.dh);
            dgp.v[j] = from_acc<scalar_t>(r.dg);
            dxp.v[j] = from_acc<scalar_t>(r.dx);
            dcp.v[j] = from_acc<scalar_t>(r.dc);
          }
          if (want_dh) dh[p] = dhp;
          if (want_dg) dg[p] = dgp;
          if (want_dx) dx[p] = dxp;
          if (want_dc) dc[p] = dcp;
        };
      },
      [&](int row, int col) {
        const acc_t x = need_x ? to_acc(hw_at(a.carry, row, col)) : acc_t(0);
        const acc_t c = kFreeCarry ? to_acc(hw_at(a.carry_gate, row, col)) : acc_t(0);
        const HighwayGrads<acc_t> r = hw_backward_elem<kAct, kFast, kFreeCarry>(
            to_acc(hw_at(a.grad_out, row, col)), to_acc(hw_at(a.transform, row, col)),
            to_acc(hw_at(a.gate, row, col)), x, c);
        if (a.grad_transform.data != nullptr) hw_at(a.grad_transform, row, col) = from_acc<scalar_t>(r.dh);
        if (a.grad_gate.data != nullptr) hw_at(a.grad_gate, row, col) = from_acc<scalar_t>(r.dg);
        if (a.grad_carry.data != nullptr) hw_at(a.grad_carry, row, col) = from_acc<scalar_t>(r.dx);
        if (kFreeCarry && a.grad_carry_gate.data != nullptr) {
          hw_at(a.grad_carry_gate, row, col) = from_acc<scalar_t>(r.dc);
        }
      });
}

// The strided walk (any pointer alignment and row stride, 64-bit indices): kHighwayUnroll elements per thread per
// tile, lane-strided so that a warp's loads coalesce, loads of a tile issued together.
template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayMinBlocksPerSm)
    strided_highway_forward_kernel(const HighwayForwardKernelArgs<scalar_t> a, const HighwayShape sh) {
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
        y[col] = from_acc<scalar_t>(hw_forward_elem<kAct, kFast, kFreeCarry>(hv[j], gv[j], xv[j], cv[j]));
      }
    }
  });
}

template <typename scalar_t, typename acc_t, int kAct, bool kFreeCarry>
__global__ void __launch_bounds__(kHighwayThreads, kHighwayMinBlocksPerSm)
    strided_highway_backward_kernel(const HighwayBackwardKernelArgs<scalar_t> a, const HighwayShape sh) {
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
      const HighwayGrads<acc_t> r = hw_backward_elem<kAct, kFast, kFreeCarry>(dyv[j], hv[j], gv[j], xv[j], cv[j]);
      if (a.grad_transform.data != nullptr) {
        a.grad_transform.data[row * a.grad_transform.row_stride + col] = from_acc<scalar_t>(r.dh);
      }
      if (a.grad_gate.data != nullptr) a.grad_gate.data[row * a.grad_gate.row_stride + col] = from_acc<scalar_t>(r.dg);
      if (a.grad_carry.data != nullptr) {
        a.grad_carry.data[row * a.grad_carry.row_stride + col] = from_acc<scalar_t>(r.dx);
      }
      if (kFreeCarry && a.grad_carry_gate.data != nullptr) {
        a.grad_carry_gate.data[row * a.grad_carry_gate.row_stride + col] = from_acc<scalar_t>(r.dc);
      }
    }
  });
}

}  // namespace gpu
}  // namespace fusedres

// CUDA kernels of bn_act (BatchNorm + residual + activation) and the host/device sizing function that picks
// their launch shapes. Compiled by nvcc for the launchers (bn_act_forward.cu, bn_act_backward.cu, which launch them
// through bn_act_launch.cuh) and by a host compiler against the CUDA emulator in tests
// (tests/test_cuda_emulated.py), so this header uses no ATen, c10, CUB or inline PTX.
//
// The input is seen as (N, C, S), S = prod(spatial), dense in one of two layouts (BnActGeom in bn_act.h):
//   NCHW           offset(n, c, s) = (n * C + c) * S + s
//   channels_last  offset(n, c, s) = (n * S + s) * C + c
// Within a channel the M = N * S values are numbered m = n * S + s in both layouts. Reductions split each
// channel's range of m into P chunks ("partials"), reduce every (chunk, channel) in its own block and merge the
// P partials of a channel in a fixed order in a second kernel: no atomics, no inter-block waits, and the same
// bits on every run (float64 results are deterministic, as tests expect).
//
// Kernels, launched with the shapes of bn_act_launch_config():
//   bn_act_reduce_nchw_kernel<Op>           grid (C, P), 1-D blocks: block (c, p) reduces chunk p of channel c
//   bn_act_reduce_channels_last_kernel<Op>  grid (C / tile, P), 2-D blocks: threadIdx.x = channel in the tile,
//                                           threadIdx.y strides over the rows m of chunk p
//       Op = BnActStatsOp      forward training statistics: Welford (count, mean, m2) of x - pivot
//            BnActGradSumsOp   backward: sum of dz and of dz * (x - mean)
//   bn_act_stats_finalize_kernel       merges the Welford partials -> mean, invstd, biased var; updates the running
//                                      statistics (momentum, unbiased variance) when given
//   bn_act_forward_elementwise_kernel  y = act((x - mean) * w * invstd + bias (+ r)) and the packed mask bits; in
//                                      eval from the running statistics, whose mean / invstd it also writes out
//   bn_act_backward_finalize_kernel    merges the gradient partials -> sum dz, sum dz * xhat, dx coefficients
//   bn_act_backward_given_sums_kernel  dx coefficients from given sums over `count` values (bn_act_backward_elemt)
//   bn_act_backward_elementwise_kernel dz = act'(dy); grad_input and/or grad_residual
//
// The output y of the forward and grad_out of the backward may be a channel slice of a wider (N, C_total, S)
// tensor (dense_bn_act_*: input j of a virtual concatenation): LeadingDim maps their linear index.
//
// Scalars: float, double, __half and __nv_bfloat16 (the launchers map c10::Half / c10::BFloat16 onto the
// last two; the layouts are identical). acc_t is double for double and float otherwise.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"
#include "kernel_common.cuh"
#include "reduce.cuh"
#include "../common/bn_act_math.h"

namespace fusedres {
namespace gpu {

// ---------------------------------------------------------------------------------------------------------
// Launch constants
// ---------------------------------------------------------------------------------------------------------

constexpr int kElementwiseThreads = 256;
// Elements per thread per span: a warp handles kWarpSpan consecutive elements (kElementwiseUnroll mask words)
// with lane l taking elements l, l + 32, ...: coalesced loads, and each group of 32 is one __ballot_sync.
constexpr int kElementwiseUnroll = 4;
constexpr int kWarpSpan = kWarpSize * kElementwiseUnroll;
// Resident blocks per SM assumed without a device to ask (kFixedOccupancy below): 8 x 256 threads fill an SM.
constexpr int kElementwiseBlocksPerSm = 8;

constexpr int kNchwReduceMaxThreads = 512;
constexpr int kNchwReduceMinThreads = 64;
constexpr int kChannelsLastReduceThreads = 256;  // tile width (channels) x rows
constexpr int kChannelsLastMaxTile = 32;         // one warp spans 32 channels of a row: 128-byte loads in fp32
constexpr int kReduceUnroll = 4;                 // loads in flight per thread in the reduction loops
constexpr int kReduceBlocksPerSm = 4;
constexpr int kReduceMinValuesPerThread = 8;  // do not split a channel so finely that threads idle

constexpr int kFinalizeWarps = 8;   // channels per finalize block: one warp each
constexpr int kFinalizeUnroll = 4;  // partials each lane loads before merging them (loads in flight)
constexpr int kChannelThreads = 256;

// ---------------------------------------------------------------------------------------------------------
// Index arithmetic without integer division on the device
// ---------------------------------------------------------------------------------------------------------

// A 64-bit integer `/` or `%` is a called subroutine on the GPU (~70 instructions, and the registers live across
// the call are saved to the stack, which ptxas reports as spills). Kernels therefore split indices with a
// double-precision reciprocal made on the host: for 0 <= n < 2^52 the estimate trunc(n * (1/d)) is off by at most
// one (two roundings of relative size 2^-53 each), and one integer correction step makes it exact. Tensors
// have far fewer than 2^52 elements.
FUSEDRES_HOST_DEVICE_INLINE int64_t floor_div_by_reciprocal(int64_t n, int64_t d, double inv_d) {
  int64_t q = static_cast<int64_t>(static_cast<double>(n) * inv_d);
  const int64_t r = n - q * d;
  if (r < 0) {
    --q;
  } else if (r >= d) {
    ++q;
  }
  return q;
}

// i = q * D + r (0 <= r < D), with q kept modulo E.
struct DivModCursor {
  int64_t q, r;
};

// Splits indices by D (and the quotient modulo E) with floor_div_by_reciprocal, and follows an index as it
// advances by a fixed step with two compare-and-subtracts (valid because q, step.q < E and r, step.r < D).
// Built on the host by make_divmod_indexer (the reciprocals need a floating-point division).
struct DivModIndexer {
  int64_t D, E;
  double inv_D, inv_E;
  FUSEDRES_HOST_DEVICE_INLINE DivModCursor at(int64_t i) const {
    const int64_t q = floor_div_by_reciprocal(i, D, inv_D);
    return {q - floor_div_by_reciprocal(q, E, inv_E) * E, i - q * D};
  }
  FUSEDRES_HOST_DEVICE_INLINE void advance(DivModCursor& p, const DivModCursor& step) const {
    p.r += step.r;
    int64_t carry = 0;
    if (p.r >= D) {
      p.r -= D;
      carry = 1;
    }
    p.q += step.q + carry;
    if (p.q >= E) p.q -= E;
  }
};

FUSEDRES_HOST_DEVICE_INLINE DivModIndexer make_divmod_indexer(int64_t D, int64_t E) {
  D = D > 0 ? D : 1;
  E = E > 0 ? E : 1;
  return {D, E, 1.0 / static_cast<double>(D), 1.0 / static_cast<double>(E)};
}

// Offset of element i (linear index in the dense (N, C, S) layout) in a tensor whose consecutive "outer" blocks of
// D = C * S (NCHW: one n) or D = C (channels_last: one row) elements lie `ld` apart instead of D: a channel slice
// of a wider tensor. offset = i + (i / D) * (ld - D); extra == 0 (dense) is the identity without a division.
struct LeadingDim {
  int64_t D, extra;
  double inv_D;
  FUSEDRES_HOST_DEVICE_INLINE int64_t operator()(int64_t i) const {
    return extra == 0 ? i : i + floor_div_by_reciprocal(i, D, inv_D) * extra;
  }
};

// ld == 0 or ld == the dense value: the identity.
FUSEDRES_HOST_DEVICE_INLINE LeadingDim make_leading_dim(int64_t C, int64_t S, bool channels_last, int64_t ld) {
  int64_t D = channels_last ? C : C * S;
  D = D > 0 ? D : 1;
  return {D, ld == 0 ? 0 : ld - D, 1.0 / static_cast<double>(D)};
}

// ---------------------------------------------------------------------------------------------------------
// Sizing: one host/device function shared by the launchers and the emulator tests
// ---------------------------------------------------------------------------------------------------------

// Geometry and derived sizes, passed by value to the kernels.
struct BnActShape {
  int64_t N, C, S;
  int64_t M;           // values per channel, N * S
  int64_t numel;       // N * C * S
  int64_t chunk;       // values m of one channel per reduction partial (>= 1)
  int64_t partials;    // P = ceil(M / chunk) (>= 1); partial arrays are [P][C]
  int64_t mask_words;  // 32-bit words of the mask buffer including the spare one; 0 without a mask
  int64_t warp_spans;  // elementwise work items of kWarpSpan elements: cover numel and every mask word
  // Linear index -> channel: (i / S) % C in NCHW (quotient), i % C in channels_last (remainder).
  DivModIndexer channel_of_index;
  // Value m of a channel -> (n, s) = (m / S, m % S), for the NCHW reduction.
  DivModIndexer sample_of_value;
};

struct BnActLaunch {
  BnActShape shape;
  bool channels_last;                    // the layout the shapes were made for (picks the kernel variants)
  dim3 reduce_grid, reduce_block;        // bn_act_reduce_{nchw,channels_last}_kernel (layout-specific)
  dim3 finalize_grid, finalize_block;    // bn_act_{stats,backward}_finalize_kernel
  dim3 channel_grid, channel_block;      // bn_act_backward_given_sums_kernel
  dim3 elementwise_grid, elementwise_block;
};

// Blocks of a kernel that are resident on one multiprocessor at once, for the two kernels whose grids are sized to
// fill the device: the .cu launchers ask the CUDA runtime (cudaOccupancyMaxActiveBlocksPerMultiprocessor, for the
// very instantiations they launch: bn_act_occupancy.h), so a kernel that needs more registers gets a smaller grid
// rather than a second wave; the emulator tests pass kFixedOccupancy (no device to ask).
struct BnActOccupancy {
  int elementwise;  // the elementwise kernel, blocks of kElementwiseThreads
  int reduce;       // the reduction kernel at its largest block (kNchwReduceMaxThreads / kChannelsLastReduceThreads)
};
constexpr BnActOccupancy kFixedOccupancy{kElementwiseBlocksPerSm, kReduceBlocksPerSm};

// Launch shapes for an (N, C, S) problem in the given layout on a device with `num_sms` multiprocessors, each
// holding occ's resident blocks (one full wave: the elementwise grid strides, the reduction splits each channel
// into about num_sms * occ.reduce / channel-tiles partials). has_mask: the activation keeps a backward mask
// (math::act_has_mask). Valid for numel == 0 as well (every extent at least 1), though launchers return before
// launching anything then.
FUSEDRES_HOST_DEVICE_INLINE BnActLaunch bn_act_launch_config(int64_t N, int64_t C, int64_t S, bool channels_last,
                                                             bool has_mask, int num_sms, const BnActOccupancy& occ) {
  BnActLaunch L;
  BnActShape& sh = L.shape;
  L.channels_last = channels_last;
  sh.N = N;
  sh.C = C;
  sh.S = S;
  sh.M = N * S;
  sh.numel = sh.M * C;
  sh.mask_words = has_mask ? math::mask_bytes(sh.numel) / 4 : 0;
  sh.channel_of_index = channels_last ? make_divmod_indexer(C, 1) : make_divmod_indexer(S, C);
  sh.sample_of_value = make_divmod_indexer(S, N);
  // The elementwise kernels also cover mask words past the last element (the spare word) so that every word
  // of the buffer is written and the launcher can allocate it uninitialised.
  sh.warp_spans = ceil_div(max_i64(ceil_div(sh.numel, kWarpSize), sh.mask_words), kElementwiseUnroll);

  const int64_t target_blocks = max_i64(num_sms, 1) * max_i64(occ.reduce, 1);
  const int64_t M = max_i64(sh.M, 1);
  // Split channels into chunks until the grid has about target_blocks blocks, but keep at least
  // kReduceMinValuesPerThread values per thread.
  int64_t tiles = 1, threads_per_channel = 1;
  int tile = 1;
  if (channels_last) {
    while (tile < kChannelsLastMaxTile && tile < C) tile *= 2;  // narrow tiles when C < 32: no idle lanes
    tiles = ceil_div(max_i64(C, 1), tile);
    threads_per_channel = kChannelsLastReduceThreads / tile;
  } else {
    tiles = max_i64(C, 1);
    threads_per_channel = kNchwReduceMaxThreads;
  }
  int64_t P = ceil_div(target_blocks, tiles);
  P = min_i64(P, ceil_div(M, threads_per_channel * kReduceMinValuesPerThread));
  P = max_i64(1, min_i64(P, kMaxGridY));
  sh.chunk = ceil_div(M, P);
  sh.partials = ceil_div(M, sh.chunk);  // no empty trailing partial
  if (channels_last) {
    L.reduce_grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(sh.partials));
    L.reduce_block = dim3(static_cast<unsigned>(tile), static_cast<unsigned>(kChannelsLastReduceThreads / tile));
  } else {
    int threads = kNchwReduceMaxThreads;  // fewer threads for short chunks (small spatial size and batch)
    while (threads > kNchwReduceMinThreads && int64_t(threads) * kReduceMinValuesPerThread > sh.chunk) threads /= 2;
    L.reduce_grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(sh.partials));
    L.reduce_block = dim3(static_cast<unsigned>(threads));
  }

  L.finalize_grid = dim3(static_cast<unsigned>(ceil_div(max_i64(C, 1), kFinalizeWarps)));
  L.finalize_block = dim3(kWarpSize * kFinalizeWarps);
  L.channel_grid = dim3(static_cast<unsigned>(ceil_div(max_i64(C, 1), kChannelThreads)));
  L.channel_block = dim3(kChannelThreads);

  const int64_t warps_per_block = kElementwiseThreads / kWarpSize;
  const int64_t blocks = min_i64(ceil_div(sh.warp_spans, warps_per_block),
                                 max_i64(num_sms, 1) * max_i64(occ.elementwise, 1));
  L.elementwise_grid = dim3(static_cast<unsigned>(max_i64(blocks, 1)));
  L.elementwise_block = dim3(kElementwiseThreads);
  return L;
}

FUSEDRES_DEVICE_INLINE float acc_sqrt(float v) { return sqrtf(v); }
FUSEDRES_DEVICE_INLINE double acc_sqrt(double v) { return sqrt(v); }

// Bit i % 32 of little-endian 32-bit word i / 32 is element i (the layout of math::mask_bytes).
FUSEDRES_DEVICE_INLINE bool mask_bit(const uint32_t* mask, int64_t i) {
  return (mask[i >> 5] >> (i & 31)) & 1u;
}

// The normalised, affine value z = (x - mean) * scale + shift, scale = w * invstd (bn_scale), shift = b: every
// kernel that recomputes z uses these two, so the forward and the backward agree (docs/design.md section 1).
// Centred first, not folded into x * scale + (b - mean * scale): for an input whose mean is large against its
// standard deviation, x - mean is exact (x and mean are within a factor of 2 of each other), whereas the folded
// form cancels two values of size |mean| * scale and loses about |mean| / std units of rounding (tests:
// test_large_mean_within_2x_pytorch in tests/test_cuda_emulated.py).
template <typename acc_t>
FUSEDRES_HOST_DEVICE_INLINE acc_t bn_scale(acc_t w, acc_t invstd) {
  return w * invstd;
}
template <typename acc_t>
FUSEDRES_HOST_DEVICE_INLINE acc_t bn_normalize(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return (x - mean) * scale + shift;
}

// ---------------------------------------------------------------------------------------------------------
// Walking indices
// ---------------------------------------------------------------------------------------------------------

// Memory offset of value m of channel c in NCHW, m advancing by a fixed stride: m -> (n, s) = (q, r) by S.
// (q modulo N is n itself while m < M; past the end the offset is never used.)
struct NchwChannelWalker {
  DivModIndexer ix;
  DivModCursor ns, step;
  int64_t c, C, S;
  FUSEDRES_DEVICE_INLINE NchwChannelWalker(const BnActShape& sh, int64_t channel, int64_t m, int64_t stride)
      : ix(sh.sample_of_value), ns(ix.at(m)), step(ix.at(stride)), c(channel), C(sh.C), S(sh.S) {}
  FUSEDRES_DEVICE_INLINE int64_t offset() const { return (ns.q * C + c) * S + ns.r; }
  FUSEDRES_DEVICE_INLINE void advance() { ix.advance(ns, step); }
};

// Memory offset of value m of channel c in channels_last: m * C + c.
struct ChannelsLastChannelWalker {
  int64_t off, step;
  FUSEDRES_DEVICE_INLINE ChannelsLastChannelWalker(const BnActShape& sh, int64_t channel, int64_t m,
                                                    int64_t stride)
      : off(m * sh.C + channel), step(stride * sh.C) {}
  FUSEDRES_DEVICE_INLINE int64_t offset() const { return off; }
  FUSEDRES_DEVICE_INLINE void advance() { off += step; }
};

// The spans of the elementwise kernels, walked grid-stride by whole warps. Span k covers elements
// [k * kWarpSpan, (k + 1) * kWarpSpan) and mask words [k * kElementwiseUnroll, (k + 1) * kElementwiseUnroll);
// lane l takes elements k * kWarpSpan + j * 32 + l for j < kElementwiseUnroll. The loop bound depends on the
// warp index only, so all 32 lanes run the same iterations and may call warp collectives inside.
// Requires blockDim.x to be a multiple of 32.
template <bool kChannelsLast>
class ElementwiseSpans {
 public:
  FUSEDRES_DEVICE_INLINE explicit ElementwiseSpans(const BnActShape& sh)
      : ix_(sh.channel_of_index),
        lane_(static_cast<int>(threadIdx.x) % kWarpSize),
        span_((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize),
        span_stride_(int64_t(gridDim.x) * blockDim.x / kWarpSize),
        end_(sh.warp_spans),
        pos_(ix_.at(span_ * kWarpSpan + lane_)),
        span_step_(ix_.at(span_stride_ * kWarpSpan)),
        lane_step_(ix_.at(kWarpSize)) {}

  FUSEDRES_DEVICE_INLINE bool active() const { return span_ < end_; }
  FUSEDRES_DEVICE_INLINE void next() {
    span_ += span_stride_;
    ix_.advance(pos_, span_step_);
  }
  FUSEDRES_DEVICE_INLINE int lane() const { return lane_; }
  // Linear index of this lane's element j: first_index() + j * kWarpSize.
  FUSEDRES_DEVICE_INLINE int64_t first_index() const { return span_ * kWarpSpan + lane_; }
  // Index of the mask word this lane stores (lanes < kElementwiseUnroll store one word each).
  FUSEDRES_DEVICE_INLINE int64_t lane_word() const { return span_ * kElementwiseUnroll + lane_; }
  // Channels of this lane's kElementwiseUnroll elements.
  FUSEDRES_DEVICE_INLINE void channels(int64_t (&channel)[kElementwiseUnroll]) const {
    DivModCursor p = pos_;
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      channel[j] = kChannelsLast ? p.r : p.q;
      ix_.advance(p, lane_step_);
    }
  }

 private:
  DivModIndexer ix_;
  int lane_;
  int64_t span_, span_stride_, end_;
  DivModCursor pos_, span_step_, lane_step_;
};

// ---------------------------------------------------------------------------------------------------------
// Per-channel reductions
// ---------------------------------------------------------------------------------------------------------

// Forward partials, each [P][C]: Welford state of chunk p of channel c at p * C + c.
template <typename acc_t>
struct WelfordPartials {
  using State = WelfordStats<acc_t>;
  acc_t* mean;
  acc_t* m2;
  acc_t* n;
  FUSEDRES_DEVICE_INLINE void store(int64_t i, const WelfordStats<acc_t>& s) const {
    mean[i] = s.mean;
    m2[i] = s.m2;
    n[i] = s.n;
  }
  FUSEDRES_DEVICE_INLINE WelfordStats<acc_t> load(int64_t i) const { return {mean[i], m2[i], n[i]}; }
};

// Backward partials, each [P][C]: sum of dz and of dz * (x - mean) over chunk p of channel c.
template <typename acc_t>
struct GradSumPartials {
  using State = SumPair<acc_t>;
  acc_t* sum_dz;
  acc_t* sum_dz_xmu;
  FUSEDRES_DEVICE_INLINE void store(int64_t i, const SumPair<acc_t>& s) const {
    sum_dz[i] = s.first;
    sum_dz_xmu[i] = s.second;
  }
  FUSEDRES_DEVICE_INLINE SumPair<acc_t> load(int64_t i) const { return {sum_dz[i], sum_dz_xmu[i]}; }
};

// A reduction Op for the reduce kernels provides
//   State      reduced type (see reduce.cuh)          Value    what one load yields
//   Channel    per-channel constants, loaded once     Partials where the per-block results go
//   Channel channel(int64_t c) const;  Value load(const Channel&, int64_t offset) const;
//   static void accumulate(State&, const Value&);     Partials partials;
// Loads and accumulation are separate so that kReduceUnroll loads are issued before the dependent updates.

// Forward training statistics of x, shifted: the partials are the Welford states of x - pivot, with the pivot the
// channel's first value (m = 0), the same in every block of the channel; the finalize adds it back to the mean.
// For an input whose mean is large against its standard deviation, x - pivot is exact and of the size of the
// deviations, so the running mean and m2 keep their precision; a float running mean of the values themselves moves
// in steps of ulp(mean) (~|mean| * 6e-8), which at a mean of 1e4 standard deviations put 1e-3 relative errors into
// the variance. A non-finite first value gives the pivot 0: the unshifted statistics, inf and NaN propagating as
// they did without a pivot (v - v is 0 exactly for finite v).
template <typename scalar_t, typename acc_t>
struct BnActStatsOp {
  using State = WelfordStats<acc_t>;
  using Value = acc_t;
  struct Channel {
    acc_t pivot;
  };
  const scalar_t* x;
  int64_t pivot_stride;  // channel c's first value is x[c * pivot_stride]: S in NCHW, 1 in channels_last
  WelfordPartials<acc_t> partials;

  FUSEDRES_DEVICE_INLINE Channel channel(int64_t c) const {
    const acc_t v = to_acc(x[c * pivot_stride]);
    return {v - v == acc_t(0) ? v : acc_t(0)};
  }
  FUSEDRES_DEVICE_INLINE Value load(const Channel& ch, int64_t off) const { return to_acc(x[off]) - ch.pivot; }
  static FUSEDRES_DEVICE_INLINE void accumulate(State& s, const Value& v) { welford_push(s, v); }
};

// Backward sums: dz = act'(dy) from the mask bit (SiLU: from z recomputed as bn_normalize(x, mean, w * invstd,
// bias) (+ residual), docs/design.md section 1); sum dz and sum dz * (x - mean). The invstd factor of
// xhat = (x - mean) * invstd is applied once per channel in the finalize kernel instead of per element.
// SiLU is a compile-time variant (kSiLU): with one runtime branch for both, the channels_last reduce kernel needs
// more registers than its launch bounds allow and spills (ptxas, sm_90); apart, each fits.
template <typename scalar_t, typename acc_t, bool kSiLU = false>
struct BnActGradSumsOp {
  using State = SumPair<acc_t>;
  using Value = SumPair<acc_t>;  // (dz, x - mean)
  struct ChannelMask {
    acc_t mean;
  };
  struct ChannelSiLU {
    acc_t mean;
    acc_t scale;  // w * invstd
    acc_t shift;  // bias
  };
  // Only what the variant reads: unused per-channel values still cost registers (the double instance spilled).
  using Channel = std::conditional_t<kSiLU, ChannelSiLU, ChannelMask>;
  const scalar_t* grad_out;
  LeadingDim grad_out_ld;  // grad_out may be a channel slice of a wider tensor
  const scalar_t* x;
  const uint32_t* mask;  // nullptr for activations without a mask
  const acc_t* mean;
  int act;
  acc_t negative_slope;
  GradSumPartials<acc_t> partials;
  // kSiLU only: what z is recomputed from; nullptr for the other activations.
  const acc_t* invstd = nullptr;
  const acc_t* weight = nullptr;
  const acc_t* bias = nullptr;
  const scalar_t* residual = nullptr;  // dense like x; nullptr without a residual

  FUSEDRES_DEVICE_INLINE Channel channel(int64_t c) const {
    if constexpr (kSiLU) {
      return {mean[c], bn_scale(weight[c], invstd[c]), bias[c]};
    } else {
      return {mean[c]};
    }
  }
  FUSEDRES_DEVICE_INLINE Value load(const Channel& ch, int64_t off) const {
    const acc_t dy = to_acc(grad_out[grad_out_ld(off)]);
    const acc_t xv = to_acc(x[off]);
    const acc_t d = xv - ch.mean;
    if constexpr (kSiLU) {
      acc_t z = bn_normalize(xv, ch.mean, ch.scale, ch.shift);
      if (residual != nullptr) z += to_acc(residual[off]);
      return {math::silu_backward(dy, z), d};
    } else {
      const bool positive = mask != nullptr && mask_bit(mask, off);
      return {math::act_backward(dy, positive, act, negative_slope), d};
    }
  }
  static FUSEDRES_DEVICE_INLINE void accumulate(State& s, const Value& v) {
    s.first += v.first;
    s.second += v.first * v.second;
  }
};

// Accumulates the values m = first, first + stride, ... < end of one channel into `state`, where `walker`
// (positioned at `first`, advancing by `stride`) gives each value's memory offset.
template <typename Op, typename Walker>
FUSEDRES_DEVICE_INLINE void accumulate_channel_range(const Op& op, const typename Op::Channel& ch, int64_t first,
                                                     int64_t end, int64_t stride, Walker& walker,
                                                     typename Op::State& state) {
  for (int64_t m = first; m < end; m += kReduceUnroll * stride) {
    typename Op::Value v[kReduceUnroll];
#pragma unroll
    for (int j = 0; j < kReduceUnroll; ++j) {
      v[j] = typename Op::Value{};
      if (m + j * stride < end) v[j] = op.load(ch, walker.offset());
      walker.advance();
    }
#pragma unroll
    for (int j = 0; j < kReduceUnroll; ++j) {
      if (m + j * stride < end) Op::accumulate(state, v[j]);
    }
  }
}

// NCHW: block (c, p) reduces chunk p of channel c; its values are runs of S contiguous elements, read by
// consecutive threads. Requires blockDim.x to be a multiple of 32 (at most kNchwReduceMaxThreads).
template <typename Op>
__global__ void __launch_bounds__(kNchwReduceMaxThreads) bn_act_reduce_nchw_kernel(const Op op, const BnActShape sh) {
  using State = typename Op::State;
  STATIC_SHARED(State, warp_partials, kMaxWarpsPerBlock);
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t begin = p * sh.chunk;
  const int64_t end = min_i64(sh.M, begin + sh.chunk);
  const int64_t first = begin + threadIdx.x;
  NchwChannelWalker walker(sh, c, first, blockDim.x);
  State state{};
  accumulate_channel_range(op, op.channel(c), first, end, blockDim.x, walker, state);
  state = block_reduce(state, warp_partials);
  if (threadIdx.x == 0) op.partials.store(p * sh.C + c, state);
}

// channels_last: rows of C contiguous values. Block (t, p) reduces chunk p of the blockDim.x channels of tile t:
// threadIdx.x picks the channel (consecutive lanes read consecutive addresses of a row), threadIdx.y strides over
// the rows; the per-channel results are then merged over threadIdx.y. Requires blockDim.y to be a power of two
// and blockDim.x * blockDim.y <= kChannelsLastReduceThreads.
template <typename Op>
__global__ void __launch_bounds__(kChannelsLastReduceThreads)
    bn_act_reduce_channels_last_kernel(const Op op, const BnActShape sh) {
  using State = typename Op::State;
  STATIC_SHARED(State, column_partials, kChannelsLastReduceThreads);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t begin = p * sh.chunk;
  const int64_t end = min_i64(sh.M, begin + sh.chunk);
  State state{};
  if (c < sh.C) {
    const int64_t first = begin + threadIdx.y;
    ChannelsLastChannelWalker walker(sh, c, first, blockDim.y);
    accumulate_channel_range(op, op.channel(c), first, end, blockDim.y, walker, state);
  }
  // Threads of channels past C take part with the identity: column_reduce contains barriers.
  state = column_reduce(state, column_partials);
  if (threadIdx.y == 0 && c < sh.C) op.partials.store(p * sh.C + c, state);
}

// The channel of the calling warp in a finalize kernel (1-D blocks of kFinalizeWarps warps, a channel each).
FUSEDRES_DEVICE_INLINE int64_t finalize_channel() {
  return int64_t(blockIdx.x) * kFinalizeWarps + static_cast<int64_t>(threadIdx.x) / kWarpSize;
}

// Merges partials 0 .. num_partials - 1 of channel c (the calling warp's, finalize_channel()) in a fixed order: lane l
// merges partials l, l + 32, l + 64, ... in turn, kFinalizeUnroll loads issued before their merges, then the 32 lane
// results are merged by the shuffle tree of warp_reduce. A lane's chain of dependent merges is P / 32 long (not P / 8
// behind a shared-memory tree, as with a channel per thread), with no barrier, and the same bits on every run. The
// result is valid in lane 0; all 32 lanes of the warp must call it (c is the same in all of them).
template <typename Partials, typename State = typename Partials::State>
FUSEDRES_DEVICE_INLINE State merge_channel_partials(const Partials& partials, int64_t num_partials, int64_t C,
                                                    int64_t c) {
  const int64_t lane = static_cast<int64_t>(threadIdx.x) % kWarpSize;
  State state{};
  if (c < C) {  // warp-uniform
    for (int64_t p0 = lane; p0 < num_partials; p0 += kFinalizeUnroll * kWarpSize) {
      State v[kFinalizeUnroll];
#pragma unroll
      for (int j = 0; j < kFinalizeUnroll; ++j) {
        const int64_t p = p0 + j * kWarpSize;
        v[j] = p < num_partials ? partials.load(p * C + c) : State{};  // State{}: the identity of merge
      }
#pragma unroll
      for (int j = 0; j < kFinalizeUnroll; ++j) state = merge(state, v[j]);
    }
  }
  return warp_reduce(state);
}

// Per-channel results of the forward statistics, each [C].
template <typename acc_t>
struct BnActChannelStats {
  acc_t* mean;
  acc_t* invstd;
  acc_t* var;  // biased batch variance
};

// The running-statistics update folded into the statistics finalize: the formula and rounding order of the host
// helper bn_act_update_running_stats (bn_act_host.cpp, one ATen op per product and sum there):
//   running_mean = momentum * mean + (1 - momentum) * running_mean
//   running_var  = momentum * (var * unbias) + (1 - momentum) * running_var,   unbias = M / (M - 1)
// in acc_t with each product and sum rounded (mul_rn / add_rn), then rounded once to the running statistics' dtype.
// momentum, keep = 1 - momentum and unbias are rounded to acc_t from double on the host, as ATen rounds a double
// scalar operand.
template <typename acc_t>
struct BnActRunningUpdate {
  StatVector mean, var;  // mean absent: nothing to update
  acc_t momentum, keep, unbias;
};

// Training: merges the P Welford partials of each channel (of x - pivot: op.channel(c) gives the pivot back);
// mean = pivot + their mean, var = m2 / M, invstd = 1 / sqrt(var + eps) (the mean itself is the centre of
// bn_normalize: nothing folds it into a shift); then the running statistics, each channel's two new values computed
// before either is stored. A warp per channel: 1-D blocks of kFinalizeWarps warps, grid ceil(C / kFinalizeWarps).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize * kFinalizeWarps)
    bn_act_stats_finalize_kernel(const BnActStatsOp<scalar_t, acc_t> op, const BnActShape sh, const acc_t eps,
                                 const BnActChannelStats<acc_t> out, const BnActRunningUpdate<acc_t> run) {
  const int64_t c = finalize_channel();
  const WelfordStats<acc_t> s = merge_channel_partials(op.partials, sh.partials, sh.C, c);
  if (threadIdx.x % kWarpSize != 0 || c >= sh.C) return;
  const acc_t var = s.m2 / static_cast<acc_t>(sh.M);
  const acc_t invstd = acc_t(1) / acc_sqrt(var + eps);
  const acc_t mean = op.channel(c).pivot + s.mean;
  out.mean[c] = mean;
  out.invstd[c] = invstd;
  out.var[c] = var;
  if (run.mean.present()) {
    const acc_t new_mean = add_rn(mul_rn(mean, run.momentum), mul_rn(run.mean.template load<acc_t>(c), run.keep));
    const acc_t new_var = add_rn(mul_rn(mul_rn(var, run.unbias), run.momentum),
                                 mul_rn(run.var.template load<acc_t>(c), run.keep));
    run.mean.store(c, new_mean);
    run.var.store(c, new_var);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward elementwise
// ---------------------------------------------------------------------------------------------------------

// The statistics the forward elementwise kernel normalises with: given in acc_t (mean, invstd: the batch statistics
// of the finalize, or bn_act_elemt's), or the running statistics (eval), read in their own dtype, with
// invstd = 1 / sqrt(running_var + eps) (the formula of the training invstd) formed per element: no kernel ahead of
// the elementwise pass derives per-channel values.
template <typename acc_t>
struct BnActNormStats {
  const acc_t* mean;    // [C], or nullptr: from the running statistics
  const acc_t* invstd;  // [C], or nullptr: from the running statistics
  StatVector running_mean, running_var;
  acc_t eps;
  acc_t* save_mean;    // running statistics only: [C] the running mean in acc_t, written (the op's save_mean)
  acc_t* save_invstd;  // running statistics only: [C] 1 / sqrt(running_var + eps), written (the op's save_invstd)

  FUSEDRES_DEVICE_INLINE acc_t running_invstd(int64_t c) const {
    return acc_t(1) / acc_sqrt(running_var.template load<acc_t>(c) + eps);
  }
  // Centre and invstd of channel c.
  FUSEDRES_DEVICE_INLINE void at(int64_t c, acc_t& m, acc_t& istd) const {
    if (mean != nullptr) {  // kernel argument: the same in every thread
      m = mean[c];
      istd = invstd[c];
    } else {
      m = running_mean.template load<acc_t>(c);
      istd = running_invstd(c);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct BnActForwardArgs {
  const scalar_t* x;
  const scalar_t* residual;  // nullptr: no residual
  BnActNormStats<acc_t> stats;
  const acc_t* weight;  // [C] scale = bn_scale(weight, invstd)
  const acc_t* bias;    // [C] the shift of bn_normalize
  scalar_t* y;
  LeadingDim y_ld;  // y may be a channel slice of a wider tensor
  uint32_t* mask;   // mask_words words, or nullptr for activations without a mask
  int act;
  acc_t negative_slope;
};

// y = act(z), z = bn_normalize(x, mean[c], bn_scale(weight[c], invstd[c]), bias[c]) (+ r), and the mask bit of
// every element, one 32-bit word per 32 consecutive elements built with __ballot_sync. Every mask word, including
// those past the last element, is written exactly once, so the buffer needs no zeroing. From the running statistics
// the grid also writes save_mean / save_invstd (grid-stride over the channels; nothing in the kernel reads them), so
// that eval is this one launch. 1-D blocks of a multiple of 32 threads.
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kElementwiseThreads)
    bn_act_forward_elementwise_kernel(const BnActForwardArgs<scalar_t, acc_t> a, const BnActShape sh) {
  if (a.stats.save_mean != nullptr) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < sh.C; c += stride) {
      a.stats.save_mean[c] = a.stats.running_mean.template load<acc_t>(c);
      a.stats.save_invstd[c] = a.stats.running_invstd(c);
    }
  }
  for (ElementwiseSpans<kChannelsLast> spans(sh); spans.active(); spans.next()) {
    int64_t channel[kElementwiseUnroll];
    spans.channels(channel);
    const int64_t first = spans.first_index();
    acc_t z[kElementwiseUnroll];
    bool valid[kElementwiseUnroll];
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      valid[j] = i < sh.numel;
      z[j] = acc_t(0);
      if (valid[j]) {
        const int64_t c = channel[j];
        acc_t mean, invstd;
        a.stats.at(c, mean, invstd);
        z[j] = bn_normalize(to_acc(a.x[i]), mean, bn_scale(a.weight[c], invstd), a.bias[c]);
        if (a.residual != nullptr) z[j] += to_acc(a.residual[i]);
      }
    }
    uint32_t word = 0;  // lane j < kElementwiseUnroll keeps the word of group j
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      if (valid[j]) a.y[a.y_ld(i)] = from_acc<scalar_t>(math::act_forward(z[j], a.act, a.negative_slope));
      if (a.mask != nullptr) {  // kernel argument: the same in every lane
        // All 32 lanes vote (the span loop is warp-uniform); lanes past numel vote 0, so the bits of the
        // partial last word and of the spare word are 0.
        const uint32_t bits = __ballot_sync(kFullWarpMask, valid[j] && math::act_mask_bit(z[j], a.act));
        if (spans.lane() == j) word = bits;
      }
    }
    if (a.mask != nullptr && spans.lane() < kElementwiseUnroll && spans.lane_word() < sh.mask_words) {
      a.mask[spans.lane_word()] = word;  // lanes 0..3 store 4 consecutive words
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// Per-channel results of the backward reduction, each [C].
template <typename acc_t>
struct BnActGradChannelCoeffs {
  acc_t* sum_dz;        // grad_bias before the dtype cast; nullptr when not needed
  acc_t* sum_dz_xhat;   // grad_weight before the dtype cast; nullptr when not needed
  acc_t* k;             // w * invstd; nullptr (and the two below too): sums only, the weight is not read
  acc_t* mean_dz;       // sum_dz / M
  acc_t* mean_dz_xhat;  // sum_dz_xhat / M
};

// Merges the first num_partials gradient partials of each channel (0: no reduction was run, the sums are 0)
// and derives what bn_act_backward_elementwise_kernel needs. A warp per channel, as bn_act_stats_finalize_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kWarpSize * kFinalizeWarps)
    bn_act_backward_finalize_kernel(const GradSumPartials<acc_t> partials, const int64_t num_partials,
                                    const BnActShape sh, const acc_t* __restrict__ invstd,
                                    const acc_t* __restrict__ weight, const BnActGradChannelCoeffs<acc_t> out) {
  const int64_t c = finalize_channel();
  const SumPair<acc_t> s = merge_channel_partials(partials, num_partials, sh.C, c);
  if (threadIdx.x % kWarpSize != 0 || c >= sh.C) return;
  const acc_t istd = invstd[c];
  const acc_t sum_dz = s.first;
  const acc_t sum_dz_xhat = s.second * istd;
  const acc_t M = static_cast<acc_t>(sh.M);
  if (out.sum_dz != nullptr) out.sum_dz[c] = sum_dz;
  if (out.sum_dz_xhat != nullptr) out.sum_dz_xhat[c] = sum_dz_xhat;
  if (out.k == nullptr) return;
  out.k[c] = weight[c] * istd;
  out.mean_dz[c] = sum_dz / M;
  out.mean_dz_xhat[c] = sum_dz_xhat / M;
}

// bn_act_backward_elemt: the dx coefficients from sums taken elsewhere over `count` values per channel (all
// ranks' of a synchronised BatchNorm): k = w * invstd, mean_dz = sum_dz / count, mean_dz_xhat = sum_dz_xhat /
// count. 1-D grid over channels.
template <typename acc_t>
__global__ void __launch_bounds__(kChannelThreads)
    bn_act_backward_given_sums_kernel(const acc_t* __restrict__ sum_dz, const acc_t* __restrict__ sum_dz_xhat,
                                      const acc_t count, const acc_t* __restrict__ invstd,
                                      const acc_t* __restrict__ weight, const BnActGradChannelCoeffs<acc_t> out,
                                      const int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  out.k[c] = weight[c] * invstd[c];
  out.mean_dz[c] = sum_dz[c] / count;
  out.mean_dz_xhat[c] = sum_dz_xhat[c] / count;
}

template <typename scalar_t, typename acc_t>
struct BnActBackwardArgs {
  const scalar_t* grad_out;
  LeadingDim grad_out_ld;  // grad_out may be a channel slice of a wider tensor
  const scalar_t* x;
  const uint32_t* mask;  // nullptr for activations without a mask
  const acc_t* mean;     // [C] save_mean
  const acc_t* invstd;   // [C] save_invstd
  BnActGradChannelCoeffs<acc_t> coeffs;
  scalar_t* grad_input;     // nullptr: not requested
  scalar_t* grad_residual;  // nullptr: not requested
  int act;
  acc_t negative_slope;
  bool training;  // false: statistics are constants, dx = dz * bn_scale(weight, invstd)
  // Eval input gradient (then required), and SiLU (math::act_needs_z): z = bn_normalize(x, mean, bn_scale(weight,
  // invstd), bias) (+ residual); may be nullptr otherwise.
  const acc_t* weight = nullptr;
  const acc_t* bias = nullptr;
  const scalar_t* residual = nullptr;  // dense like x; nullptr without a residual
};

// dz = act'(z) * dy from the mask; grad_residual = dz; grad_input = bn_grad_input(dz, xhat, ...) in training,
// dz * k in eval. Same span walk as the forward (no collectives here, but one index path for both).
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kElementwiseThreads)
    bn_act_backward_elementwise_kernel(const BnActBackwardArgs<scalar_t, acc_t> a, const BnActShape sh) {
  const bool need_z = math::act_needs_z(a.act);
  const bool need_x = (a.training && a.grad_input != nullptr) || need_z;
  for (ElementwiseSpans<kChannelsLast> spans(sh); spans.active(); spans.next()) {
    int64_t channel[kElementwiseUnroll];
    spans.channels(channel);
    const int64_t first = spans.first_index();
    acc_t dz[kElementwiseUnroll], xv[kElementwiseUnroll];
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      dz[j] = acc_t(0);
      xv[j] = acc_t(0);
      if (i < sh.numel) {
        const acc_t dy = to_acc(a.grad_out[a.grad_out_ld(i)]);
        if (need_x) xv[j] = to_acc(a.x[i]);
        if (need_z) {
          const int64_t c = channel[j];
          acc_t z = bn_normalize(xv[j], a.mean[c], bn_scale(a.weight[c], a.invstd[c]), a.bias[c]);
          if (a.residual != nullptr) z += to_acc(a.residual[i]);
          dz[j] = math::silu_backward(dy, z);
        } else {
          const bool positive = a.mask != nullptr && mask_bit(a.mask, i);
          dz[j] = math::act_backward(dy, positive, a.act, a.negative_slope);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      if (i >= sh.numel) continue;
      const int64_t c = channel[j];
      if (a.grad_residual != nullptr) a.grad_residual[i] = from_acc<scalar_t>(dz[j]);
      if (a.grad_input != nullptr) {
        acc_t dx;
        if (a.training) {
          const acc_t xhat = (xv[j] - a.mean[c]) * a.invstd[c];
          dx = math::bn_grad_input(dz[j], xhat, a.coeffs.k[c], a.coeffs.mean_dz[c], a.coeffs.mean_dz_xhat[c]);
        } else {
          dx = dz[j] * bn_scale(a.weight[c], a.invstd[c]);  // the k of the finalize, formed here
        }
        a.grad_input[i] = from_acc<scalar_t>(dx);
      }
    }
  }
}

}  // namespace gpu
}  // namespace fusedres

// CUDA kernels of the block end y = act(s * batch_norm(x) + r) (docs/design.md section 10) and the sizing function
// of their launches. ATen-free like bn_act_kernels.cuh, whose statistics sequence, index helpers and reduction
// helpers they reuse: compiled by nvcc for the launcher (block_end.cu, through block_end_launch.cuh) and by a host
// compiler against the CUDA emulator in tests (tests/test_cuda_emulated_block_end.py).
//
// The input is seen as (N, C, S) in one of bn_act's two dense layouts. Beyond bn_act:
//   s   the branch scale, acc_t, [N] per sample or [N, C]; absent: 1. A per-sample 0 drops the sample: its forward
//       reads only the residual, its backward sums are skipped (unless the scale's own gradient needs them), its dx
//       reads only x.
//   r   the residual where it lies: Cr <= C channels (channels Cr.. get none), element (n, c, s) at
//       data[n * stride_n + c * stride_c + spatial_offset[s]] (spatial_offset nullptr: s), any strides.
// Forward: BatchNorm's statistics (bn_act_forward_launch, statistics only), then
//   block_end_forward_elementwise_kernel  z = bn_normalize(x, mean_c, s_nc * w_c * invstd_c, s_nc * b_c) + r.
// Backward, with dz = act'(dy) from the mask and the backward scale beta:
//   block_end_backward_reduce_{nchw,channels_last}_kernel  per (n, c) A = sum dz, B = sum dz * (x - mean): bn_act's
//       reduction loop with one partial per sample (chunk = S), so partial p * C + c is (n, c) = (n0 + p, c);
//   block_end_backward_combine_kernel  per channel sum beta * A, sum beta * B -> (grad_bias, grad_weight) and the
//       dx coefficients k = w * invstd, d = k * sum(beta A) / M, q = k * invstd^2 * sum(beta B) / M (eval: 0);
//   block_end_backward_elementwise_kernel  dx = k * beta_nc * dz - d - (x - mean) * q, dresidual = dz on c < Cr
//       (dense (N, Cr, S) in x's layout).
// The forward scale's gradient w * invstd * B + b * A is formed by the launcher from A and B.
#pragma once

#include <cstdint>

#include "bn_act_kernels.cuh"

namespace fusedres {
namespace gpu {

// ---------------------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------------------

// The branch scale: data[n] (per sample) or data[n * C + c]; data == nullptr: 1.
template <typename acc_t>
struct BlockEndScaleView {
  const acc_t* data;
  bool per_channel;
  int64_t C;
  FUSEDRES_HOST_DEVICE_INLINE acc_t at(int64_t n, int64_t c) const {
    return data == nullptr ? acc_t(1) : data[per_channel ? n * C + c : n];
  }
  // A per-sample 0: the sample's branch is dropped (a 0 of a per-(n, c) scale is an ordinary value, as on the CPU).
  FUSEDRES_HOST_DEVICE_INLINE bool dropped(int64_t n) const {
    return data != nullptr && !per_channel && data[n] == acc_t(0);
  }
};

// The residual as it lies in memory (BlockEndResidualLayout of csrc/block_end.h); data == nullptr: none.
template <typename scalar_t>
struct BlockEndResidualView {
  const scalar_t* data;
  int64_t channels;  // Cr (0 without a residual)
  int64_t stride_n, stride_c;
  const int64_t* spatial_offset;  // [S] offsets of the flat spatial index; nullptr: s itself (dense planes)
  FUSEDRES_DEVICE_INLINE int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return n * stride_n + c * stride_c + (spatial_offset != nullptr ? spatial_offset[s] : s);
  }
};

// (n, c, s) of the linear index i of the dense (N, C, S) layout, by reciprocals (see floor_div_by_reciprocal).
struct BlockEndIndexer {
  DivModIndexer inner;  // NCHW (S, C): i -> ((i / S) % C, i % S) = (c, s); channels_last (C, S): (s, c)
  int64_t CS;           // C * S: i / CS = n in both layouts
  double inv_CS;
};

FUSEDRES_HOST_DEVICE_INLINE BlockEndIndexer make_block_end_indexer(int64_t C, int64_t S, bool channels_last) {
  const int64_t CS = C * S > 0 ? C * S : 1;
  return {channels_last ? make_divmod_indexer(C, S) : make_divmod_indexer(S, C), CS, 1.0 / static_cast<double>(CS)};
}

template <bool kChannelsLast>
FUSEDRES_DEVICE_INLINE void block_end_split(const BlockEndIndexer& ix, int64_t i, int64_t& n, int64_t& c,
                                            int64_t& s) {
  const DivModCursor p = ix.inner.at(i);
  c = kChannelsLast ? p.r : p.q;
  s = kChannelsLast ? p.q : p.r;
  n = floor_div_by_reciprocal(i, ix.CS, ix.inv_CS);
}

// ---------------------------------------------------------------------------------------------------------
// Sizing
// ---------------------------------------------------------------------------------------------------------

struct BlockEndLaunch {
  BnActLaunch bn;  // bn_act's shapes: the forward statistics, the elementwise spans, the channel grid
  // The per-(n, c) reduction: one partial per sample, at most samples_per_launch samples per launch (grid y).
  int64_t samples_per_launch;
  unsigned sample_reduce_grid_x;
  dim3 sample_reduce_block;
  BlockEndIndexer index;
};

// Launch shapes for an (N, C, S) problem (see bn_act_launch_config); max_samples_per_launch bounds grid y of the
// per-sample reduction (the hardware's kMaxGridY; the emulator tests pass less to run several launches).
// occ: as bn_act_launch_config's (the launcher's for the kernels of the direction it runs).
FUSEDRES_HOST_DEVICE_INLINE BlockEndLaunch block_end_launch_config(int64_t N, int64_t C, int64_t S,
                                                                   bool channels_last, bool has_mask, int num_sms,
                                                                   const BnActOccupancy& occ,
                                                                   int64_t max_samples_per_launch = kMaxGridY) {
  BlockEndLaunch L;
  L.bn = bn_act_launch_config(N, C, S, channels_last, has_mask, num_sms, occ);
  L.samples_per_launch = max_i64(1, min_i64(max_i64(N, 1), min_i64(max_samples_per_launch, kMaxGridY)));
  L.index = make_block_end_indexer(C, S, channels_last);
  if (channels_last) {
    int tile = 1;
    while (tile < kChannelsLastMaxTile && tile < C) tile *= 2;  // as bn_act: no idle lanes when C < 32
    L.sample_reduce_grid_x = static_cast<unsigned>(ceil_div(max_i64(C, 1), tile));
    L.sample_reduce_block = dim3(static_cast<unsigned>(tile), static_cast<unsigned>(kChannelsLastReduceThreads / tile));
  } else {
    int threads = kNchwReduceMaxThreads;  // a plane of S values per block: fewer threads for small planes
    while (threads > kNchwReduceMinThreads && int64_t(threads) * kReduceMinValuesPerThread > S) threads /= 2;
    L.sample_reduce_grid_x = static_cast<unsigned>(max_i64(C, 1));
    L.sample_reduce_block = dim3(static_cast<unsigned>(threads));
  }
  return L;
}

// The shape the reduce kernels walk for `samples` consecutive samples: M = samples * S values per channel in
// chunks of S, so partial p is sample p of the launch.
FUSEDRES_HOST_DEVICE_INLINE BnActShape block_end_sample_shape(const BlockEndLaunch& L, int64_t samples) {
  BnActShape sh = L.bn.shape;
  sh.N = samples;
  sh.M = samples * sh.S;
  sh.numel = sh.M * sh.C;
  sh.chunk = max_i64(sh.S, 1);
  sh.partials = samples;
  sh.sample_of_value = make_divmod_indexer(sh.S, samples);
  return sh;
}

// ---------------------------------------------------------------------------------------------------------
// Forward elementwise
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BlockEndForwardArgs {
  const scalar_t* x;
  BlockEndResidualView<scalar_t> residual;
  BlockEndScaleView<acc_t> scale;
  BnActNormStats<acc_t> stats;  // the batch statistics (training), or the running statistics (eval): as bn_act's
  const acc_t* weight;  // [C]
  const acc_t* bias;    // [C]
  scalar_t* y;          // dense like x
  uint32_t* mask;       // mask_words words (all written), or nullptr for activations without a mask
  int act;
  acc_t negative_slope;
  BlockEndIndexer index;
};

// y = act(z), z = bn_normalize(x, mean_c, s * w_c * invstd_c, s * b_c) + r (r on channels c < Cr; a dropped sample:
// z = r, x not read), and the mask bits, one __ballot_sync per 32 consecutive elements as in
// bn_act_forward_elementwise_kernel: every mask word, the spare one included, is written exactly once. From the
// running statistics (eval) the grid also writes save_mean / save_invstd, as bn_act's: eval is this one launch.
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kElementwiseThreads)
    block_end_forward_elementwise_kernel(const BlockEndForwardArgs<scalar_t, acc_t> a, const BnActShape sh) {
  if (a.stats.save_mean != nullptr) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < sh.C; c += stride) {
      a.stats.save_mean[c] = a.stats.running_mean.template load<acc_t>(c);
      a.stats.save_invstd[c] = a.stats.running_invstd(c);
    }
  }
  for (ElementwiseSpans<kChannelsLast> spans(sh); spans.active(); spans.next()) {
    const int64_t first = spans.first_index();
    uint32_t word = 0;  // lane j < kElementwiseUnroll keeps the word of group j
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      const bool valid = i < sh.numel;
      acc_t z = acc_t(0);
      if (valid) {
        int64_t n, c, s;
        block_end_split<kChannelsLast>(a.index, i, n, c, s);
        // The statistics first: from the running statistics, float64's division and square root are called
        // subroutines, and with fewer values live across them (no residual yet) nothing is spilled (ptxas, sm_90).
        acc_t mean, invstd;
        a.stats.at(c, mean, invstd);
        if (c < a.residual.channels) z = to_acc(a.residual.data[a.residual.offset(n, c, s)]);
        if (!a.scale.dropped(n)) {
          const acc_t sc = a.scale.at(n, c);
          z += bn_normalize(to_acc(a.x[i]), mean, sc * bn_scale(a.weight[c], invstd), sc * a.bias[c]);
        }
        a.y[i] = from_acc<scalar_t>(math::act_forward(z, a.act, a.negative_slope));
      }
      if (a.mask != nullptr) {  // kernel argument: the same in every lane
        // All 32 lanes vote (the span loop is warp-uniform); lanes past numel vote 0.
        const uint32_t bits = __ballot_sync(kFullWarpMask, valid && math::act_mask_bit(z, a.act));
        if (spans.lane() == j) word = bits;
      }
    }
    if (a.mask != nullptr && spans.lane() < kElementwiseUnroll && spans.lane_word() < sh.mask_words) {
      a.mask[spans.lane_word()] = word;  // lanes 0..3 store 4 consecutive words
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: per-(n, c) sums
// ---------------------------------------------------------------------------------------------------------

// Reduction Op (see BnActGradSumsOp) of dz and dz * (x - mean) over the samples of one launch: offsets from the
// walkers are relative to the launch's first sample, `base` elements into the tensors (the mask is indexed by the
// absolute element, so its pointer cannot be advanced instead).
template <typename scalar_t, typename acc_t>
struct BlockEndGradSumsOp {
  using State = SumPair<acc_t>;
  using Value = SumPair<acc_t>;  // (dz, x - mean)
  struct Channel {
    acc_t mean;
  };
  const scalar_t* grad_out;
  const scalar_t* x;
  const uint32_t* mask;  // nullptr for identity
  const acc_t* mean;
  int act;
  acc_t negative_slope;
  int64_t base;                     // n0 * C * S
  GradSumPartials<acc_t> partials;  // (A, B) from the launch's first sample on: [samples][C]

  FUSEDRES_DEVICE_INLINE Channel channel(int64_t c) const { return {mean[c]}; }
  FUSEDRES_DEVICE_INLINE Value load(const Channel& ch, int64_t off) const {
    const int64_t i = base + off;
    const bool positive = mask != nullptr && mask_bit(mask, i);
    return {math::act_backward(to_acc(grad_out[i]), positive, act, negative_slope), to_acc(x[i]) - ch.mean};
  }
  static FUSEDRES_DEVICE_INLINE void accumulate(State& s, const Value& v) {
    s.first += v.first;
    s.second += v.first * v.second;
  }
};

// Which (n, c) sums nothing reads: with enabled (the forward scale's gradient not wanted), those whose backward
// scale is 0: the channel sums leave them out, so they are not computed (a dropped sample's dy is not read).
template <typename acc_t>
struct BlockEndSkip {
  BlockEndScaleView<acc_t> beta;
  bool enabled;
  int64_t n0;  // the launch's first sample
  FUSEDRES_DEVICE_INLINE bool operator()(int64_t p, int64_t c) const {
    return enabled && beta.data != nullptr && beta.at(n0 + p, c) == acc_t(0);
  }
};

// NCHW: block (c, p) sums the plane (n0 + p, c) (S contiguous values, consecutive threads on consecutive values).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kNchwReduceMaxThreads)
    block_end_backward_reduce_nchw_kernel(const BlockEndGradSumsOp<scalar_t, acc_t> op, const BnActShape sh,
                                          const BlockEndSkip<acc_t> skip) {
  using State = SumPair<acc_t>;
  STATIC_SHARED(State, warp_partials, kMaxWarpsPerBlock);
  const int64_t c = blockIdx.x;
  const int64_t p = blockIdx.y;
  if (skip(p, c)) {  // the same in every thread of the block: they all leave before the reduction's barriers
    if (threadIdx.x == 0) op.partials.store(p * sh.C + c, State{});
    return;
  }
  const int64_t begin = p * sh.chunk;
  const int64_t end = min_i64(sh.M, begin + sh.chunk);
  const int64_t first = begin + threadIdx.x;
  NchwChannelWalker walker(sh, c, first, blockDim.x);
  State state{};
  accumulate_channel_range(op, op.channel(c), first, end, blockDim.x, walker, state);
  state = block_reduce(state, warp_partials);
  if (threadIdx.x == 0) op.partials.store(p * sh.C + c, state);
}

// channels_last: block (t, p) sums the rows of sample n0 + p for the blockDim.x channels of tile t (threadIdx.x the
// channel, threadIdx.y strides over the rows), then merges over threadIdx.y, as bn_act_reduce_channels_last_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelsLastReduceThreads)
    block_end_backward_reduce_channels_last_kernel(const BlockEndGradSumsOp<scalar_t, acc_t> op, const BnActShape sh,
                                                   const BlockEndSkip<acc_t> skip) {
  using State = SumPair<acc_t>;
  STATIC_SHARED(State, column_partials, kChannelsLastReduceThreads);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  const int64_t begin = p * sh.chunk;
  const int64_t end = min_i64(sh.M, begin + sh.chunk);
  State state{};
  if (c < sh.C && !skip(p, c)) {
    const int64_t first = begin + threadIdx.y;
    ChannelsLastChannelWalker walker(sh, c, first, blockDim.y);
    accumulate_channel_range(op, op.channel(c), first, end, blockDim.y, walker, state);
  }
  // Every thread takes part (column_reduce contains barriers); skipped and absent channels bring the identity.
  state = column_reduce(state, column_partials);
  if (threadIdx.y == 0 && c < sh.C) op.partials.store(p * sh.C + c, state);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: per-channel combine
// ---------------------------------------------------------------------------------------------------------

// The dx coefficients per channel, each [C]: k = w * invstd (times beta_nc per element), d and q (training only).
template <typename acc_t>
struct BlockEndGradCoeffs {
  acc_t* k;
  acc_t* d;
  acc_t* q;
};

template <typename acc_t>
struct BlockEndCombineArgs {
  const acc_t* A;  // [N][C] sum dz, or nullptr: no sums were taken (eval, input gradient only)
  const acc_t* B;  // [N][C] sum dz * (x - mean)
  BlockEndScaleView<acc_t> beta;
  const acc_t* invstd;
  const acc_t* weight;
  acc_t* sum_dz;       // [C] sum beta * A = grad_bias, or nullptr
  acc_t* sum_dz_xhat;  // [C] invstd * sum beta * B = grad_weight, or nullptr
  BlockEndGradCoeffs<acc_t> coeffs;  // k == nullptr: no input gradient
  int64_t N, C, M;
  bool training;
};

// One thread per channel sums over the samples in a fixed order (no reduction across threads). Terms with
// beta = 0 are left out, not multiplied: their sums may be skipped (BlockEndSkip), and a dropped sample's NaN stays
// out of the other samples' gradients (as on the CPU). 1-D grid over channels.
template <typename acc_t>
__global__ void __launch_bounds__(kChannelThreads) block_end_backward_combine_kernel(
    const BlockEndCombineArgs<acc_t> a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  acc_t sg(0), sgx(0);
  if (a.A != nullptr) {
    for (int64_t n = 0; n < a.N; ++n) {
      const acc_t bt = a.beta.at(n, c);
      if (bt != acc_t(0)) {
        sg += bt * a.A[n * a.C + c];
        sgx += bt * a.B[n * a.C + c];
      }
    }
  }
  const acc_t istd = a.invstd[c];
  if (a.sum_dz != nullptr) a.sum_dz[c] = sg;
  if (a.sum_dz_xhat != nullptr) a.sum_dz_xhat[c] = sgx * istd;
  if (a.coeffs.k == nullptr) return;
  const acc_t k = bn_scale(a.weight[c], istd);
  const acc_t M = static_cast<acc_t>(a.M);
  a.coeffs.k[c] = k;
  a.coeffs.d[c] = a.training ? k * sg / M : acc_t(0);
  a.coeffs.q[c] = a.training ? k * istd * istd * sgx / M : acc_t(0);
}

// ---------------------------------------------------------------------------------------------------------
// Backward elementwise
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BlockEndBackwardArgs {
  const scalar_t* grad_out;
  const scalar_t* x;
  const uint32_t* mask;  // nullptr for identity
  const acc_t* mean;
  BlockEndScaleView<acc_t> beta;
  BlockEndGradCoeffs<acc_t> coeffs;
  scalar_t* grad_input;     // dense like x, or nullptr
  scalar_t* grad_residual;  // dense (N, Cr, S) in x's layout, or nullptr
  int64_t residual_channels;
  int act;
  acc_t negative_slope;
  bool training;
  BlockEndIndexer index;
};

// dz = act'(dy); grad_residual = dz on c < Cr; grad_input = (k_c * beta_nc) * dz - d_c - (x - mean_c) * q_c
// (eval: the first term). Where neither needs dz (beta_nc * k_c == 0 and no residual gradient), dy and the mask are
// not read: a dropped sample's dx reads only x. Same span walk as the forward (no collectives here).
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kElementwiseThreads)
    block_end_backward_elementwise_kernel(const BlockEndBackwardArgs<scalar_t, acc_t> a, const BnActShape sh) {
  for (ElementwiseSpans<kChannelsLast> spans(sh); spans.active(); spans.next()) {
    const int64_t first = spans.first_index();
#pragma unroll
    for (int j = 0; j < kElementwiseUnroll; ++j) {
      const int64_t i = first + j * kWarpSize;
      if (i >= sh.numel) continue;
      int64_t n, c, s;
      block_end_split<kChannelsLast>(a.index, i, n, c, s);
      const bool want_dr = a.grad_residual != nullptr && c < a.residual_channels;
      const acc_t k = a.grad_input != nullptr ? a.coeffs.k[c] * a.beta.at(n, c) : acc_t(0);
      acc_t dz(0);
      if (want_dr || k != acc_t(0)) {
        const bool positive = a.mask != nullptr && mask_bit(a.mask, i);
        dz = math::act_backward(to_acc(a.grad_out[i]), positive, a.act, a.negative_slope);
      }
      if (want_dr) {
        const int64_t Cr = a.residual_channels;
        const int64_t r = kChannelsLast ? (n * sh.S + s) * Cr + c : (n * Cr + c) * sh.S + s;
        a.grad_residual[r] = from_acc<scalar_t>(dz);
      }
      if (a.grad_input != nullptr) {
        acc_t dx = k * dz;
        if (a.training) dx = dx - a.coeffs.d[c] - (to_acc(a.x[i]) - a.mean[c]) * a.coeffs.q[c];
        a.grad_input[i] = from_acc<scalar_t>(dx);
      }
    }
  }
}

}  // namespace gpu
}  // namespace fusedres

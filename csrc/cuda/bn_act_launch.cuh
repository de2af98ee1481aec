// Host-side launch sequences of bn_act: which kernels run, in which order, with which launch shapes
// (bn_act_launch_config) and on which buffers. No ATen: the launchers (bn_act_forward.cu, bn_act_backward.cu, and
// bn_act_split.cu / dense.cu for the building-block ops and, through dense_launch.cuh, the dense ops) allocate,
// check and call these functions, and the emulator tests (tests/cuda_emu/emu_bn_act.cpp) call exactly the same
// functions on host buffers, so the sequence itself is tested without a GPU.
//
// Sequences (launches in order):
//   bn_act_forward_launch, training     reduce, stats finalize, forward elementwise   (bn_act_forward training)
//                          statistics only (y == nullptr): reduce, stats finalize       (bn_stats)
//                          eval         forward elementwise                           (eval, bn_act_elemt)
//   bn_act_backward_launch              [reduce, backward finalize,] [backward elementwise]
//                          eval, input / residual gradients only: backward elementwise
//                          sums only (no gradient buffers): reduce, backward finalize  (bn_act_backward_reduce)
//   bn_act_backward_elemt_launch        given-sums coefficients, backward elementwise (bn_act_backward_elemt)
// These are all the kernels an op runs: the running-statistics update is part of the stats finalize (training), and
// in eval the elementwise kernel reads the running statistics themselves and writes save_mean / save_invstd. The
// .cu launchers only allocate and check around these calls (no ATen compute op for the statistics), except for
// running statistics that are not contiguous, which keep the host helpers (bn_act_update_running_stats /
// bn_act_eval_stats). (Argument preparation still runs ATen copies where it must: bn_act_dense for inputs not dense
// in their layout, bn_act_params for a weight / bias not in acc_t or absent (ones / zeros); none for dense inputs
// with acc_t parameters, the case the counts are for.) tests/test_cuda_emulated.py (test_launch_counts) counts each
// sequence's launches, and its test_launchers_leave_statistics_to_the_sequence checks the launchers' source for those
// host helpers.
//
// Define FUSEDRES_LAUNCH_CHECK() before including this header: C10_CUDA_KERNEL_LAUNCH_CHECK() in the launchers;
// the emulator build gets a no-op from cuda_compat.cuh (emu::launch throws on a bad launch).
#pragma once

#include <cstdint>
#include <type_traits>

#include "bn_act_kernels.cuh"
#include "cuda_compat.cuh"

#ifndef FUSEDRES_LAUNCH_CHECK
#error "define FUSEDRES_LAUNCH_CHECK() (e.g. as C10_CUDA_KERNEL_LAUNCH_CHECK()) before including bn_act_launch.cuh"
#endif

namespace fusedres {
namespace gpu {

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// Workspace of the forward, in acc_t elements: in training the biased batch variance [C] (at
// bn_act_forward_var_offset, where no var buffer is given) and the Welford partials 3 x [P][C]; nothing in eval (the
// elementwise kernel forms the scale w * invstd itself).
FUSEDRES_HOST_DEVICE_INLINE int64_t bn_act_forward_workspace_elems(const BnActLaunch& L, bool training) {
  const int64_t C = L.shape.C;
  return training ? C + 3 * L.shape.partials * C : 0;
}
FUSEDRES_HOST_DEVICE_INLINE int64_t bn_act_forward_var_offset(const BnActLaunch& L) {
  (void)L;
  return 0;
}

template <typename scalar_t, typename acc_t>
struct BnActForwardBuffers {
  const scalar_t* x;         // numel, dense in the layout of L
  const scalar_t* residual;  // numel, or nullptr
  const acc_t* weight;       // [C]
  const acc_t* bias;         // [C]
  acc_t* save_mean;          // [C]: written in training and in eval from running statistics; else (eval without
                             // running statistics: bn_act_elemt) the mean to use (read)
  acc_t* save_invstd;        // [C]: as save_mean; in eval from running statistics 1 / sqrt(running_var + eps)
  acc_t* var;                // [C] biased batch variance (training), or nullptr: kept in the workspace at
                             // bn_act_forward_var_offset(L)
  scalar_t* y;               // numel; nullptr in training: statistics only (no elementwise pass, no mask)
  int64_t y_ld;              // 0: y dense like x; else y is a channel slice of a wider tensor with this leading
                             // dimension: NCHW y(n, c, s) = y[n * y_ld + c * S + s], channels_last y[m * y_ld + c]
  uint32_t* mask;            // L.shape.mask_words words (all written), or nullptr for activations without a mask
  acc_t* workspace;          // bn_act_forward_workspace_elems(L, training), uninitialised
  // Running statistics [C] in their own dtype, or absent: training updates them (with momentum), eval normalises
  // with them. Both or neither.
  StatVector running_mean = {nullptr, kStatFloat};
  StatVector running_var = {nullptr, kStatFloat};
  double momentum = 0;
};

// The finalize's running-statistics update for a training call over L's M values per channel (absent without
// running statistics). Rounded from double as the host helper's ATen scalars are.
template <typename scalar_t, typename acc_t>
FUSEDRES_HOST_DEVICE_INLINE BnActRunningUpdate<acc_t> bn_act_running_update(
    const BnActLaunch& L, const BnActForwardBuffers<scalar_t, acc_t>& b) {
  const double M = static_cast<double>(L.shape.M);
  return {b.running_mean, b.running_var, static_cast<acc_t>(b.momentum), static_cast<acc_t>(1.0 - b.momentum),
          static_cast<acc_t>(M / (M - 1.0))};
}

// Training: statistics reduction -> finalize (mean, invstd, var; the running statistics updated) -> elementwise;
// with y == nullptr only the statistics (mean, invstd, var; weight and bias are not read). Eval: the elementwise
// pass alone, normalising with the running statistics (save_mean / save_invstd written) or, without them, with the
// given save_mean / save_invstd. Requires L.shape.numel > 0.
// The statistics an elementwise forward normalises with: in eval with running statistics, those (it also writes
// save_mean / save_invstd from them: no launch of its own); otherwise the given save_mean / save_invstd (the batch
// statistics in training, computed by the finalize kernel before it). B: any buffers struct with running_mean,
// running_var (StatVector), save_mean and save_invstd (acc_t*): bn_act's and the block end's.
template <typename acc_t, typename B>
FUSEDRES_HOST_DEVICE_INLINE BnActNormStats<acc_t> bn_act_norm_stats(bool training, const B& b, acc_t eps) {
  if (!training && b.running_mean.present()) {
    return {nullptr, nullptr, b.running_mean, b.running_var, eps, b.save_mean, b.save_invstd};
  }
  return {b.save_mean, b.save_invstd, StatVector{nullptr, kStatFloat}, StatVector{nullptr, kStatFloat}, eps, nullptr,
          nullptr};
}

template <typename scalar_t, typename acc_t>
void bn_act_forward_launch(const BnActLaunch& L, const BnActForwardBuffers<scalar_t, acc_t>& b, bool training,
                           acc_t eps, int act, acc_t negative_slope, cudaStream_t stream) {
  const int64_t C = L.shape.C;
  const bool stats_only = b.y == nullptr;
  if (training) {
    const int64_t partial_elems = L.shape.partials * C;
    acc_t* part = b.workspace + C;
    const WelfordPartials<acc_t> partials{part, part + partial_elems, part + 2 * partial_elems};
    const BnActStatsOp<scalar_t, acc_t> op{b.x, L.channels_last ? int64_t(1) : L.shape.S, partials};
    if (L.channels_last) {
      KERNEL_LAUNCH((bn_act_reduce_channels_last_kernel<BnActStatsOp<scalar_t, acc_t>>), L.reduce_grid,
                    L.reduce_block, 0, stream, op, L.shape);
    } else {
      KERNEL_LAUNCH((bn_act_reduce_nchw_kernel<BnActStatsOp<scalar_t, acc_t>>), L.reduce_grid, L.reduce_block, 0,
                    stream, op, L.shape);
    }
    FUSEDRES_LAUNCH_CHECK();
    const BnActChannelStats<acc_t> stats{b.save_mean, b.save_invstd,
                                         b.var != nullptr ? b.var : b.workspace + bn_act_forward_var_offset(L)};
    KERNEL_LAUNCH((bn_act_stats_finalize_kernel<scalar_t, acc_t>), L.finalize_grid, L.finalize_block, 0, stream,
                  op, L.shape, eps, stats, bn_act_running_update(L, b));
    FUSEDRES_LAUNCH_CHECK();
    if (stats_only) return;
  }

  const BnActNormStats<acc_t> norm = bn_act_norm_stats(training, b, eps);
  const LeadingDim y_ld = make_leading_dim(C, L.shape.S, L.channels_last, b.y_ld);
  const BnActForwardArgs<scalar_t, acc_t> args{b.x,    b.residual, norm,   b.weight, b.bias,
                                                b.y,    y_ld,       b.mask, act,      negative_slope};
  if (L.channels_last) {
    KERNEL_LAUNCH((bn_act_forward_elementwise_kernel<scalar_t, acc_t, true>), L.elementwise_grid,
                  L.elementwise_block, 0, stream, args, L.shape);
  } else {
    KERNEL_LAUNCH((bn_act_forward_elementwise_kernel<scalar_t, acc_t, false>), L.elementwise_grid,
                  L.elementwise_block, 0, stream, args, L.shape);
  }
  FUSEDRES_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// Per-channel sums are needed for the parameter gradients and for the training-mode input gradient.
FUSEDRES_HOST_DEVICE_INLINE bool bn_act_backward_needs_sums(bool training, bool want_input, bool want_weight,
                                                            bool want_bias) {
  return want_weight || want_bias || (training && want_input);
}

// Workspace of the backward, in acc_t elements: k, mean_dz, mean_dz_xhat [C]; with sums, the partials 2 x [P][C].
FUSEDRES_HOST_DEVICE_INLINE int64_t bn_act_backward_workspace_elems(const BnActLaunch& L, bool need_sums) {
  const int64_t C = L.shape.C;
  return 3 * C + (need_sums ? 2 * L.shape.partials * C : 0);
}

template <typename scalar_t, typename acc_t>
struct BnActBackwardBuffers {
  const scalar_t* grad_out;  // numel, dense in the layout of L (grad_out_ld == 0) or a channel slice
  int64_t grad_out_ld;       // 0, or grad_out's leading dimension (as y_ld of BnActForwardBuffers)
  const scalar_t* x;         // numel
  const uint32_t* mask;      // the forward's mask words, or nullptr for activations without a mask
  const acc_t* mean;         // [C] save_mean
  const acc_t* invstd;       // [C] save_invstd
  const acc_t* weight;       // [C]; may be nullptr when no gradient buffer is given (sums only)
  scalar_t* grad_input;      // numel, or nullptr: not requested
  scalar_t* grad_residual;   // numel, or nullptr: not requested
  acc_t* sum_dz;             // [C] (grad_bias in acc_t); non-null exactly when bn_act_backward_needs_sums
  acc_t* sum_dz_xhat;        // [C] (grad_weight in acc_t); non-null exactly when bn_act_backward_needs_sums
  acc_t* workspace;          // bn_act_backward_workspace_elems(L, need_sums), uninitialised
  // SiLU only (math::act_needs_z), whose backward recomputes z = (x - mean) * weight * invstd + bias (+ residual):
  const acc_t* bias = nullptr;          // [C] (zeros when the forward had none); weight is then required too
  const scalar_t* residual = nullptr;   // numel, dense like x; nullptr without a residual
};

// The backward elementwise kernel in L's layout.
template <typename scalar_t, typename acc_t>
void bn_act_backward_elementwise(const BnActLaunch& L, const BnActBackwardArgs<scalar_t, acc_t>& args,
                                 cudaStream_t stream) {
  if (L.channels_last) {
    KERNEL_LAUNCH((bn_act_backward_elementwise_kernel<scalar_t, acc_t, true>), L.elementwise_grid,
                  L.elementwise_block, 0, stream, args, L.shape);
  } else {
    KERNEL_LAUNCH((bn_act_backward_elementwise_kernel<scalar_t, acc_t, false>), L.elementwise_grid,
                  L.elementwise_block, 0, stream, args, L.shape);
  }
  FUSEDRES_LAUNCH_CHECK();
}

// [gradient sums reduction -> ] finalize (sums, dx coefficients) -> elementwise (grad_input / grad_residual).
// Sums only (bn_act_backward_reduce): no gradient buffers, the finalize writes sum_dz / sum_dz_xhat alone.
// Requires L.shape.numel > 0 and at least one output requested.
template <typename scalar_t, typename acc_t>
void bn_act_backward_launch(const BnActLaunch& L, const BnActBackwardBuffers<scalar_t, acc_t>& b, bool training,
                            int act, acc_t negative_slope, cudaStream_t stream) {
  const int64_t C = L.shape.C;
  const bool need_sums = b.sum_dz != nullptr;
  const bool need_elementwise = b.grad_input != nullptr || b.grad_residual != nullptr;
  const int64_t partial_elems = need_sums ? L.shape.partials * C : 0;
  acc_t* ws = b.workspace;
  const BnActGradChannelCoeffs<acc_t> coeffs =
      need_elementwise ? BnActGradChannelCoeffs<acc_t>{b.sum_dz, b.sum_dz_xhat, ws, ws + C, ws + 2 * C}
                       : BnActGradChannelCoeffs<acc_t>{b.sum_dz, b.sum_dz_xhat, nullptr, nullptr, nullptr};
  const GradSumPartials<acc_t> partials{ws + 3 * C, ws + 3 * C + partial_elems};
  const LeadingDim grad_out_ld = make_leading_dim(C, L.shape.S, L.channels_last, b.grad_out_ld);

  // The sums kernel, instantiated apart for SiLU (BnActGradSumsOp's kSiLU: a shared one spills registers).
  auto launch_sums = [&](auto silu) {
    using Op = BnActGradSumsOp<scalar_t, acc_t, decltype(silu)::value>;
    const Op op{b.grad_out, grad_out_ld, b.x,      b.mask,   b.mean, act,       negative_slope,
                partials,   b.invstd,    b.weight, b.bias,   b.residual};
    if (L.channels_last) {
      KERNEL_LAUNCH((bn_act_reduce_channels_last_kernel<Op>), L.reduce_grid, L.reduce_block, 0, stream, op, L.shape);
    } else {
      KERNEL_LAUNCH((bn_act_reduce_nchw_kernel<Op>), L.reduce_grid, L.reduce_block, 0, stream, op, L.shape);
    }
    FUSEDRES_LAUNCH_CHECK();
  };
  if (need_sums) {
    if (math::act_needs_z(act)) {
      launch_sums(std::true_type{});
    } else {
      launch_sums(std::false_type{});
    }
  }
  if (need_sums) {
    // (The eval input gradient dz * w * invstd needs no coefficients from here: the elementwise kernel forms its
    // factor per element, so an eval backward without parameter gradients is that one launch.)
    KERNEL_LAUNCH((bn_act_backward_finalize_kernel<acc_t>), L.finalize_grid, L.finalize_block, 0, stream, partials,
                  L.shape.partials, L.shape, b.invstd, b.weight, coeffs);
    FUSEDRES_LAUNCH_CHECK();
  }
  if (need_elementwise) {
    const BnActBackwardArgs<scalar_t, acc_t> args{b.grad_out,   grad_out_ld,     b.x,  b.mask, b.mean,
                                                  b.invstd,     coeffs,          b.grad_input, b.grad_residual,
                                                  act,          negative_slope,  training, b.weight, b.bias,
                                                  b.residual};
    bn_act_backward_elementwise(L, args, stream);
  }
}

// Workspace of bn_act_backward_elemt_launch, in acc_t elements: k, mean_dz, mean_dz_xhat [C].
FUSEDRES_HOST_DEVICE_INLINE int64_t bn_act_backward_elemt_workspace_elems(const BnActLaunch& L) {
  return 3 * L.shape.C;
}

// bn_act_backward_elemt: the training-form input gradient (and/or grad_residual = dz) from per-channel sums taken
// over `count` values (b.sum_dz / b.sum_dz_xhat are read, not written): given-sums coefficients -> elementwise.
// Requires L.shape.numel > 0, count >= 1 and at least one gradient buffer.
template <typename scalar_t, typename acc_t>
void bn_act_backward_elemt_launch(const BnActLaunch& L, const BnActBackwardBuffers<scalar_t, acc_t>& b,
                                  int64_t count, int act, acc_t negative_slope, cudaStream_t stream) {
  const int64_t C = L.shape.C;
  acc_t* ws = b.workspace;
  const BnActGradChannelCoeffs<acc_t> coeffs{nullptr, nullptr, ws, ws + C, ws + 2 * C};
  if (b.grad_input != nullptr) {
    KERNEL_LAUNCH((bn_act_backward_given_sums_kernel<acc_t>), L.channel_grid, L.channel_block, 0, stream, b.sum_dz,
                  b.sum_dz_xhat, static_cast<acc_t>(count), b.invstd, b.weight, coeffs, C);
    FUSEDRES_LAUNCH_CHECK();
  }
  const LeadingDim grad_out_ld = make_leading_dim(C, L.shape.S, L.channels_last, b.grad_out_ld);
  const BnActBackwardArgs<scalar_t, acc_t> args{b.grad_out,   grad_out_ld,    b.x,  b.mask, b.mean,
                                                b.invstd,     coeffs,         b.grad_input, b.grad_residual,
                                                act,          negative_slope, /*training=*/true};
  bn_act_backward_elementwise(L, args, stream);
}

}  // namespace gpu
}  // namespace fusedres

// Host-side launch sequences of the block end (block_end_kernels.cuh): which kernels run, in which order, with which
// launch shapes (block_end_launch_config) and on which buffers. No ATen: the launcher (block_end.cu) allocates,
// checks and calls these functions, and the emulator tests (tests/cuda_emu/emu_block_end.cpp) call exactly the same
// functions on host buffers.
//
// Sequences (launches in order):
//   block_end_forward_launch   training  bn_act's statistics (reduce, stats finalize: the running statistics
//                                        updated there), forward elementwise
//                              eval      forward elementwise (from the running statistics: save_mean / save_invstd
//                                        written by it)
//   block_end_backward_launch  [per-sample reduce, once per group of samples_per_launch samples,]
//                              [combine,] [backward elementwise]
//
// Define FUSEDRES_LAUNCH_CHECK() before including this header (see bn_act_launch.cuh).
#pragma once

#include <cstdint>

#include "bn_act_launch.cuh"
#include "block_end_kernels.cuh"
#include "cuda_compat.cuh"

namespace fusedres {
namespace gpu {

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// Workspace of the forward, in acc_t elements: bn_act's statistics workspace in training, nothing in eval.
FUSEDRES_HOST_DEVICE_INLINE int64_t block_end_forward_workspace_elems(const BlockEndLaunch& L, bool training) {
  return training ? bn_act_forward_workspace_elems(L.bn, true) : 0;
}

template <typename scalar_t, typename acc_t>
struct BlockEndForwardBuffers {
  const scalar_t* x;  // numel, dense in the layout of L
  BlockEndResidualView<scalar_t> residual;
  BlockEndScaleView<acc_t> scale;
  const acc_t* weight;  // [C]
  const acc_t* bias;    // [C]
  acc_t* save_mean;     // [C]: written (in eval without running statistics: the mean to use, read)
  acc_t* save_invstd;   // [C]: written (in eval without running statistics: the invstd to use, read)
  acc_t* var;           // [C] biased batch variance, written in training (the running-statistics update)
  scalar_t* y;          // numel
  uint32_t* mask;       // L.bn.shape.mask_words words (all written), or nullptr for activations without a mask
  acc_t* workspace;     // block_end_forward_workspace_elems(L, training), uninitialised
  // The running statistics [C] (both or neither): training updates them in bn_act's statistics finalize, eval
  // normalises with them (save_mean / save_invstd written by the elementwise kernel).
  StatVector running_mean = {nullptr, kStatFloat};
  StatVector running_var = {nullptr, kStatFloat};
  double momentum = 0;
};

// Training: BatchNorm's statistics (the sequence of bn_statistics, bn_act_forward_launch without an output), then
// the elementwise pass. Eval: the elementwise pass on the given statistics. Requires numel > 0.
template <typename scalar_t, typename acc_t>
void block_end_forward_launch(const BlockEndLaunch& L, const BlockEndForwardBuffers<scalar_t, acc_t>& b,
                              bool training, acc_t eps, int act, acc_t negative_slope, cudaStream_t stream) {
  if (training) {
    const BnActForwardBuffers<scalar_t, acc_t> stats{b.x,           nullptr,       nullptr,   nullptr,
                                                     b.save_mean,   b.save_invstd, b.var,     nullptr,
                                                     0,             nullptr,       b.workspace, b.running_mean,
                                                     b.running_var, b.momentum};
    bn_act_forward_launch(L.bn, stats, true, eps, math::kIdentity, acc_t(0), stream);
  }
  const BnActNormStats<acc_t> norm = bn_act_norm_stats(training, b, eps);
  const BlockEndForwardArgs<scalar_t, acc_t> args{b.x,    b.residual, b.scale, norm,    b.weight,      b.bias,
                                                  b.y,    b.mask,     act,     negative_slope, L.index};
  if (L.bn.channels_last) {
    KERNEL_LAUNCH((block_end_forward_elementwise_kernel<scalar_t, acc_t, true>), L.bn.elementwise_grid,
                  L.bn.elementwise_block, 0, stream, args, L.bn.shape);
  } else {
    KERNEL_LAUNCH((block_end_forward_elementwise_kernel<scalar_t, acc_t, false>), L.bn.elementwise_grid,
                  L.bn.elementwise_block, 0, stream, args, L.bn.shape);
  }
  FUSEDRES_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// Workspace of the backward, in acc_t elements: k, d, q [C], and A, B [N][C] when nc_sums is not given.
FUSEDRES_HOST_DEVICE_INLINE int64_t block_end_backward_workspace_elems(const BlockEndLaunch& L) {
  return 3 * L.bn.shape.C + 2 * L.bn.shape.N * L.bn.shape.C;
}

template <typename scalar_t, typename acc_t>
struct BlockEndBackwardBuffers {
  const scalar_t* grad_out;  // numel, dense in the layout of L
  const scalar_t* x;         // numel
  const uint32_t* mask;      // the forward's mask words, or nullptr for identity
  const acc_t* mean;         // [C] save_mean
  const acc_t* invstd;       // [C] save_invstd
  const acc_t* weight;       // [C]
  BlockEndScaleView<acc_t> beta;  // the scale the branch's gradient uses
  scalar_t* grad_input;      // numel, or nullptr
  scalar_t* grad_residual;   // N * Cr * S dense in x's layout, or nullptr
  int64_t residual_channels;  // Cr
  acc_t* nc_sums;            // [2][N][C] (A, B) for the forward scale's gradient, or nullptr: not wanted
  acc_t* sum_dz;             // [C] grad_bias in acc_t, or nullptr
  acc_t* sum_dz_xhat;        // [C] grad_weight in acc_t, or nullptr
  acc_t* workspace;          // block_end_backward_workspace_elems(L), uninitialised
};

// The per-(n, c) sums are taken when anything reads them: the scale's gradient, the parameter gradients, or the
// training-mode input gradient.
FUSEDRES_HOST_DEVICE_INLINE bool block_end_backward_needs_sums(bool training, bool want_input, bool want_nc,
                                                               bool want_params) {
  return want_nc || want_params || (training && want_input);
}

// Requires numel > 0 and at least one output requested.
template <typename scalar_t, typename acc_t>
void block_end_backward_launch(const BlockEndLaunch& L, const BlockEndBackwardBuffers<scalar_t, acc_t>& b,
                               bool training, int act, acc_t negative_slope, cudaStream_t stream) {
  const int64_t N = L.bn.shape.N, C = L.bn.shape.C, S = L.bn.shape.S;
  const bool want_params = b.sum_dz != nullptr || b.sum_dz_xhat != nullptr;
  const bool need_sums =
      block_end_backward_needs_sums(training, b.grad_input != nullptr, b.nc_sums != nullptr, want_params);
  acc_t* ws = b.workspace;
  acc_t* A = b.nc_sums != nullptr ? b.nc_sums : ws + 3 * C;
  acc_t* B = A + N * C;
  if (need_sums) {
    for (int64_t n0 = 0; n0 < N; n0 += L.samples_per_launch) {
      const int64_t samples = min_i64(L.samples_per_launch, N - n0);
      const BnActShape sh = block_end_sample_shape(L, samples);
      const BlockEndGradSumsOp<scalar_t, acc_t> op{b.grad_out, b.x, b.mask, b.mean, act, negative_slope, n0 * C * S,
                                                   GradSumPartials<acc_t>{A + n0 * C, B + n0 * C}};
      // Without the scale's gradient, the sums of (n, c) with beta 0 are not read: skipped.
      const BlockEndSkip<acc_t> skip{b.beta, b.nc_sums == nullptr, n0};
      const dim3 grid(L.sample_reduce_grid_x, static_cast<unsigned>(samples));
      if (L.bn.channels_last) {
        KERNEL_LAUNCH((block_end_backward_reduce_channels_last_kernel<scalar_t, acc_t>), grid, L.sample_reduce_block,
                      0, stream, op, sh, skip);
      } else {
        KERNEL_LAUNCH((block_end_backward_reduce_nchw_kernel<scalar_t, acc_t>), grid, L.sample_reduce_block, 0,
                      stream, op, sh, skip);
      }
      FUSEDRES_LAUNCH_CHECK();
    }
  }
  const BlockEndGradCoeffs<acc_t> coeffs =
      b.grad_input != nullptr ? BlockEndGradCoeffs<acc_t>{ws, ws + C, ws + 2 * C}
                              : BlockEndGradCoeffs<acc_t>{nullptr, nullptr, nullptr};
  if (want_params || b.grad_input != nullptr) {
    const BlockEndCombineArgs<acc_t> args{need_sums ? A : nullptr, need_sums ? B : nullptr,
                                          b.beta,                  b.invstd,
                                          b.weight,                b.sum_dz,
                                          b.sum_dz_xhat,           coeffs,
                                          N,                       C,
                                          N * S,                   training};
    KERNEL_LAUNCH((block_end_backward_combine_kernel<acc_t>), L.bn.channel_grid, L.bn.channel_block, 0, stream,
                  args);
    FUSEDRES_LAUNCH_CHECK();
  }
  if (b.grad_input != nullptr || b.grad_residual != nullptr) {
    const BlockEndBackwardArgs<scalar_t, acc_t> args{b.grad_out,      b.x,        b.mask,          b.mean,
                                                     b.beta,          coeffs,     b.grad_input,    b.grad_residual,
                                                     b.residual_channels, act,    negative_slope,  training,
                                                     L.index};
    if (L.bn.channels_last) {
      KERNEL_LAUNCH((block_end_backward_elementwise_kernel<scalar_t, acc_t, true>), L.bn.elementwise_grid,
                    L.bn.elementwise_block, 0, stream, args, L.bn.shape);
    } else {
      KERNEL_LAUNCH((block_end_backward_elementwise_kernel<scalar_t, acc_t, false>), L.bn.elementwise_grid,
                    L.bn.elementwise_block, 0, stream, args, L.bn.shape);
    }
    FUSEDRES_LAUNCH_CHECK();
  }
}

}  // namespace gpu
}  // namespace fusedres

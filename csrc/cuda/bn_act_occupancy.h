// Resident blocks per multiprocessor (gpu::BnActOccupancy) of the kernels whose grids bn_act_launch_config sizes to
// fill the device, asked of the CUDA runtime for the very instantiations a launcher runs. Included by .cu files only
// (the CUDA runtime's occupancy API has no emulator counterpart; the emulator tests pass gpu::kFixedOccupancy).
#pragma once

#include <array>
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include "cuda/launcher_common.h"
#include "cuda/block_end_launch.cuh"
#include "cuda/bn_act_launch.cuh"

namespace fusedres {

// cudaOccupancyMaxActiveBlocksPerMultiprocessor for `kernel` with blocks of `threads` threads and no dynamic shared
// memory, at least 1. Asked once per kernel and device (the answer depends only on the kernel's registers and static
// shared memory and on the device), so the query costs no launch overhead after the first call. Every call site
// of a kernel passes the same `threads`.
template <auto kernel>
int resident_blocks(int threads) {
  constexpr int kCachedDevices = 64;
  static std::array<std::atomic<int>, kCachedDevices> cache{};  // 0: not asked yet
  const int device = c10::cuda::current_device();
  const bool cached = device >= 0 && device < kCachedDevices;
  int blocks = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (blocks == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    blocks = blocks > 0 ? blocks : 1;
    if (cached) cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// The reduction kernel of a layout, for Op, at its largest block.
template <typename Op>
int reduce_resident_blocks(bool channels_last) {
  return channels_last ? resident_blocks<&gpu::bn_act_reduce_channels_last_kernel<Op>>(gpu::kChannelsLastReduceThreads)
                       : resident_blocks<&gpu::bn_act_reduce_nchw_kernel<Op>>(gpu::kNchwReduceMaxThreads);
}

// The forward: statistics reduction and forward elementwise kernel (bn_act_forward, bn_stats, bn_act_elemt, dense).
template <typename kscalar_t, typename acc_t>
gpu::BnActOccupancy bn_act_forward_occupancy_for(bool channels_last) {
  const int elementwise =
      channels_last ? resident_blocks<&gpu::bn_act_forward_elementwise_kernel<kscalar_t, acc_t, true>>(
                          gpu::kElementwiseThreads)
                    : resident_blocks<&gpu::bn_act_forward_elementwise_kernel<kscalar_t, acc_t, false>>(
                          gpu::kElementwiseThreads);
  return {elementwise, reduce_resident_blocks<gpu::BnActStatsOp<kscalar_t, acc_t>>(channels_last)};
}

// The backward: gradient-sums reduction (the SiLU variant when silu) and backward elementwise kernel.
template <typename kscalar_t, typename acc_t>
gpu::BnActOccupancy bn_act_backward_occupancy_for(bool channels_last, bool silu) {
  const int elementwise =
      channels_last ? resident_blocks<&gpu::bn_act_backward_elementwise_kernel<kscalar_t, acc_t, true>>(
                          gpu::kElementwiseThreads)
                    : resident_blocks<&gpu::bn_act_backward_elementwise_kernel<kscalar_t, acc_t, false>>(
                          gpu::kElementwiseThreads);
  const int reduce = silu ? reduce_resident_blocks<gpu::BnActGradSumsOp<kscalar_t, acc_t, true>>(channels_last)
                          : reduce_resident_blocks<gpu::BnActGradSumsOp<kscalar_t, acc_t, false>>(channels_last);
  return {elementwise, reduce};
}

// The block end: bn_act's statistics reduction and the block end's own elementwise kernel of the direction (its
// backward's per-sample reduction has a grid of C x samples, not sized by occupancy).
template <typename kscalar_t, typename acc_t>
gpu::BnActOccupancy block_end_occupancy_for(bool channels_last, bool forward) {
  int elementwise;
  if (forward) {
    elementwise = channels_last ? resident_blocks<&gpu::block_end_forward_elementwise_kernel<kscalar_t, acc_t, true>>(
                                      gpu::kElementwiseThreads)
                                : resident_blocks<&gpu::block_end_forward_elementwise_kernel<kscalar_t, acc_t, false>>(
                                      gpu::kElementwiseThreads);
  } else {
    elementwise = channels_last ? resident_blocks<&gpu::block_end_backward_elementwise_kernel<kscalar_t, acc_t, true>>(
                                      gpu::kElementwiseThreads)
                                : resident_blocks<&gpu::block_end_backward_elementwise_kernel<kscalar_t, acc_t, false>>(
                                      gpu::kElementwiseThreads);
  }
  return {elementwise, reduce_resident_blocks<gpu::BnActStatsOp<kscalar_t, acc_t>>(channels_last)};
}

// The same for the kernels of an input dtype (the launchers size before their dtype dispatch).
inline gpu::BnActOccupancy bn_act_forward_occupancy(at::ScalarType dtype, bool channels_last) {
  gpu::BnActOccupancy occ{};
  FUSEDRES_DISPATCH_FLOATING(dtype, "bn_act_forward_occupancy",
                             [&] { occ = bn_act_forward_occupancy_for<kscalar_t, acc_t>(channels_last); });
  return occ;
}
inline gpu::BnActOccupancy bn_act_backward_occupancy(at::ScalarType dtype, bool channels_last, bool silu) {
  gpu::BnActOccupancy occ{};
  FUSEDRES_DISPATCH_FLOATING(dtype, "bn_act_backward_occupancy",
                             [&] { occ = bn_act_backward_occupancy_for<kscalar_t, acc_t>(channels_last, silu); });
  return occ;
}
inline gpu::BnActOccupancy block_end_occupancy(at::ScalarType dtype, bool channels_last, bool forward) {
  gpu::BnActOccupancy occ{};
  FUSEDRES_DISPATCH_FLOATING(dtype, "block_end_occupancy",
                             [&] { occ = block_end_occupancy_for<kscalar_t, acc_t>(channels_last, forward); });
  return occ;
}

}  // namespace fusedres

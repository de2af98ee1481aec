// Host-side launch sequences of the highway gate: which kernel runs with which launch shape
// (highway_launch_config) on which operands. No ATen: the launcher (highway.cu) checks, allocates and calls these
// functions, and the emulator tests (tests/cuda_emu/emu_highway.cpp) call exactly the same functions on host
// buffers, so the sequence itself is tested without a GPU.
//
// Define FUSEDRES_LAUNCH_CHECK() before including this header: C10_CUDA_KERNEL_LAUNCH_CHECK() in the launcher;
// the emulator build gets a no-op from cuda_compat.cuh (emu::launch throws on a bad launch).
#pragma once

#include "cuda_compat.cuh"
#include "highway_kernels.cuh"

#ifndef FUSEDRES_LAUNCH_CHECK
#error "define FUSEDRES_LAUNCH_CHECK() (e.g. as C10_CUDA_KERNEL_LAUNCH_CHECK()) before including highway_launch.cuh"
#endif

namespace fusedres {
namespace gpu {

// y for every element. Requires rows * cols > 0.
template <typename scalar_t, typename acc_t>
void highway_forward_launch(const HighwayLaunch& L, const HighwayForwardKernelArgs<scalar_t>& a,
                            cudaStream_t stream) {
  KERNEL_LAUNCH((highway_forward_kernel<scalar_t, acc_t>), L.grid, L.block, 0, stream, a, L.shape);
  FUSEDRES_LAUNCH_CHECK();
}

// The requested gradients for every element, in one pass. Requires rows * cols > 0; launches nothing when no
// gradient is requested.
template <typename scalar_t, typename acc_t>
void highway_backward_launch(const HighwayLaunch& L, const HighwayBackwardKernelArgs<scalar_t>& a,
                             cudaStream_t stream) {
  if (a.grad_transform.data == nullptr && a.grad_gate.data == nullptr && a.grad_carry.data == nullptr &&
      a.grad_carry_gate.data == nullptr) {
    return;
  }
  KERNEL_LAUNCH((highway_backward_kernel<scalar_t, acc_t>), L.grid, L.block, 0, stream, a, L.shape);
  FUSEDRES_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace fusedres

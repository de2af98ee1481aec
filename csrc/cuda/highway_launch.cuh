// Host-side launch sequences of the highway gate: which kernel runs (aligned or strided walk) with which launch
// shape (highway_launch_config) on which operands. No ATen: the launcher (highway.cu) checks, allocates and calls these
// functions, and the emulator tests (tests/cuda_emu/emu_highway.cpp) call exactly the same functions on host
// buffers, so the sequence itself is tested without a GPU.
//
// Define FUSEDRES_LAUNCH_CHECK() before including this header: C10_CUDA_KERNEL_LAUNCH_CHECK() in the launcher;
// the emulator build gets a no-op from cuda_compat.cuh (emu::launch throws on a bad launch).
#pragma once

#include <type_traits>

#include "cuda_compat.cuh"
#include "highway_kernels.cuh"

#ifndef FUSEDRES_LAUNCH_CHECK
#error "define FUSEDRES_LAUNCH_CHECK() (e.g. as C10_CUDA_KERNEL_LAUNCH_CHECK()) before including highway_launch.cuh"
#endif

namespace fusedres {
namespace gpu {

// Calls f(integral_constant<int, act>, bool_constant<free_carry>) for the runtime activation and carry form: the
// kernels are instantiated per activation (no switch in their loops) and per form (the coupled form loads no carry
// gate). C++17 (the emulator tests' g++ build): generic lambdas, no template lambdas.
template <typename F>
void highway_dispatch(int act, bool free_carry, F&& f) {
  auto with_form = [&](auto act_c) {
    if (free_carry) {
      f(act_c, std::true_type{});
    } else {
      f(act_c, std::false_type{});
    }
  };
  switch (act) {
    case math::kHwReLU:
      return with_form(std::integral_constant<int, math::kHwReLU>{});
    case math::kHwTanh:
      return with_form(std::integral_constant<int, math::kHwTanh>{});
    case math::kHwSigmoid:
      return with_form(std::integral_constant<int, math::kHwSigmoid>{});
    default:
      return with_form(std::integral_constant<int, math::kHwIdentity>{});
  }
}

// Whether the aligned kernels (16-byte accesses, 32-bit indices) may run: every operand, read or written, passes
// highway_operand_aligned and the shape fits 32-bit indices; otherwise the strided kernels run.
template <typename scalar_t, typename... Operands>
bool highway_aligned(const HighwayShape& sh, const Operands&... ops) {
  return highway_fits_int32(sh.rows, sh.cols) && (highway_operand_aligned<scalar_t>(ops, sh.rows) && ...);
}

template <typename scalar_t>
bool highway_forward_aligned(const HighwayShape& sh, const HighwayForwardKernelArgs<scalar_t>& a) {
  return highway_aligned<scalar_t>(sh, a.transform, a.gate, a.carry, a.carry_gate, a.out);
}

template <typename scalar_t>
bool highway_backward_aligned(const HighwayShape& sh, const HighwayBackwardKernelArgs<scalar_t>& a) {
  return highway_aligned<scalar_t>(sh, a.grad_out, a.transform, a.gate, a.carry, a.carry_gate, a.grad_transform,
                                   a.grad_gate, a.grad_carry, a.grad_carry_gate);
}

// y for every element of a (rows, cols) problem on a device with num_sms multiprocessors. Requires
// rows * cols > 0.
template <typename scalar_t, typename acc_t>
void highway_forward_launch(const HighwayShape& sh, int num_sms, const HighwayForwardKernelArgs<scalar_t>& a,
                            cudaStream_t stream) {
  const bool aligned = highway_forward_aligned(sh, a);
  const HighwayLaunch L =
      highway_launch_config(sh.rows, sh.cols, num_sms, aligned ? kHighwayVec<scalar_t> : kHighwayUnroll);
  highway_dispatch(a.act, a.carry_gate.data != nullptr, [&](auto act_c, auto free_c) {
    constexpr int kAct = decltype(act_c)::value;
    constexpr bool kFreeCarry = decltype(free_c)::value;
    if (aligned) {
      KERNEL_LAUNCH((highway_forward_kernel<scalar_t, acc_t, kAct, kFreeCarry>), L.grid, L.block, 0, stream, a,
                    L.shape);
    } else {
      KERNEL_LAUNCH((strided_highway_forward_kernel<scalar_t, acc_t, kAct, kFreeCarry>), L.grid, L.block, 0,
                    stream, a, L.shape);
    }
    FUSEDRES_LAUNCH_CHECK();
  });
}

// The requested gradients for every element, in one pass. Requires rows * cols > 0; launches nothing when no
// gradient is requested.
template <typename scalar_t, typename acc_t>
void highway_backward_launch(const HighwayShape& sh, int num_sms, const HighwayBackwardKernelArgs<scalar_t>& a,
                             cudaStream_t stream) {
  if (a.grad_transform.data == nullptr && a.grad_gate.data == nullptr && a.grad_carry.data == nullptr &&
      a.grad_carry_gate.data == nullptr) {
    return;
  }
  const bool aligned = highway_backward_aligned(sh, a);
  const HighwayLaunch L =
      highway_launch_config(sh.rows, sh.cols, num_sms, aligned ? kHighwayVec<scalar_t> : kHighwayUnroll);
  highway_dispatch(a.act, a.carry_gate.data != nullptr, [&](auto act_c, auto free_c) {
    constexpr int kAct = decltype(act_c)::value;
    constexpr bool kFreeCarry = decltype(free_c)::value;
    if (aligned) {
      KERNEL_LAUNCH((highway_backward_kernel<scalar_t, acc_t, kAct, kFreeCarry>), L.grid, L.block, 0, stream, a,
                    L.shape);
    } else {
      KERNEL_LAUNCH((strided_highway_backward_kernel<scalar_t, acc_t, kAct, kFreeCarry>), L.grid, L.block, 0,
                    stream, a, L.shape);
    }
    FUSEDRES_LAUNCH_CHECK();
  });
}

}  // namespace gpu
}  // namespace fusedres

// What every thin CUDA launcher (.cu) of this project shares: the ATen/CUDA headers they use, the launch check
// the ATen-free launch sequences call, and the mapping from c10's half types to CUDA's.
// Included by .cu files only (it uses ATen, hence .h): kernels and launch sequences stay in the ATen-free .cuh headers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#define FUSEDRES_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// The one dtype dispatch of the launchers: float, double, bfloat16 and half. `body` (a lambda, called once) sees
// scalar_t (ATen's element type), kscalar_t (the kernels' element type: CUDA's half types, kernel_scalar_t below)
// and acc_t (the accumulation type: double for double, else float, as bn_act_acc_type).
#define FUSEDRES_DISPATCH_FLOATING(dtype, name, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, [&] {            \
    using kscalar_t = ::fusedres::kernel_scalar_t<scalar_t>;                             \
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;    \
    __VA_ARGS__();                                                                        \
  })

namespace fusedres {

// The kernels are written against CUDA's own half types (the kernel headers have no c10); c10::Half and
// c10::BFloat16 have the same size and bit layout, so data pointers are reinterpreted.
template <typename T>
using kernel_scalar_t =
    std::conditional_t<std::is_same_v<T, at::Half>, __half,
                       std::conditional_t<std::is_same_v<T, at::BFloat16>, __nv_bfloat16, T>>;

}  // namespace fusedres

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

#include <optional>
#include <type_traits>

#include "cuda/kernel_common.cuh"

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

// Running statistics the kernels read / update in place: given, and dense (a 1-D view with another stride keeps the
// host helpers bn_act_update_running_stats / bn_act_eval_stats, as on the CPU).
inline bool running_stats_on_device(const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var) {
  return running_mean.has_value() && running_mean->defined() && running_var.has_value() && running_var->defined() &&
         running_mean->is_contiguous() && running_var->is_contiguous();
}

// A [C] running-statistics tensor for the kernels (its dtype as a run-time code); absent when not on_device.
inline gpu::StatVector stat_vector(const std::optional<at::Tensor>& t, bool on_device) {
  if (!on_device) return {nullptr, gpu::kStatFloat};
  const at::ScalarType dtype = t->scalar_type();
  const int code = dtype == at::kDouble     ? gpu::kStatDouble
                   : dtype == at::kHalf     ? gpu::kStatHalf
                   : dtype == at::kBFloat16 ? gpu::kStatBFloat16
                                            : gpu::kStatFloat;
  TORCH_INTERNAL_ASSERT(code != gpu::kStatFloat || dtype == at::kFloat, "running statistics of dtype ", dtype);
  return {t->data_ptr(), code};
}

}  // namespace fusedres

// Chooses the CPU kernel build for this machine once, from ATen's own capability (which honours the
// ATEN_CPU_CAPABILITY environment variable), so our kernels and ATen's use the same instruction set.
#include <ATen/Version.h>

#include <string>

#include "cpu/bn_act_kernel.h"

namespace fusedres {
namespace cpu {
namespace {

enum class Cap { kDefault, kAVX2, kAVX512 };

Cap detect() {
#if defined(__x86_64__)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Cap::kAVX512;
  }
  if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Cap::kAVX2;
  }
#endif
  return Cap::kDefault;
}

Cap capability() {
  static const Cap cap = detect();
  return cap;
}

}  // namespace

BnActForwardFn bn_act_forward_dispatch() {
  switch (capability()) {
#if defined(__x86_64__)
    case Cap::kAVX512:
      return &AVX512::bn_act_forward_kernel;
    case Cap::kAVX2:
      return &AVX2::bn_act_forward_kernel;
#endif
    default:
      return &DEFAULT::bn_act_forward_kernel;
  }
}

BnActBackwardFn bn_act_backward_dispatch() {
  switch (capability()) {
#if defined(__x86_64__)
    case Cap::kAVX512:
      return &AVX512::bn_act_backward_kernel;
    case Cap::kAVX2:
      return &AVX2::bn_act_backward_kernel;
#endif
    default:
      return &DEFAULT::bn_act_backward_kernel;
  }
}

const char* bn_act_cpu_capability() {
  switch (capability()) {
#if defined(__x86_64__)
    case Cap::kAVX512:
      return AVX512::capability_name();
    case Cap::kAVX2:
      return AVX2::capability_name();
#endif
    default:
      return DEFAULT::capability_name();
  }
}

}  // namespace cpu
}  // namespace fusedres

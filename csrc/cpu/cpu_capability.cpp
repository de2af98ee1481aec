#include "cpu/cpu_capability.h"

#include <ATen/Version.h>

#include <string>

namespace fusedres {
namespace cpu {
namespace {

Cap detect() {
#if defined(__x86_64__)
  const std::string cap = at::get_cpu_capability();
#ifndef FUSEDRES_NO_AVX512
  if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Cap::kAVX512;
  }
#endif
  if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Cap::kAVX2;
  }
#endif
  return Cap::kDefault;
}

}  // namespace

Cap capability() {
  static const Cap cap = detect();
  return cap;
}

}  // namespace cpu
}  // namespace fusedres

// CPU kernels of the highway gate: the interface between the op glue (highway.cpp) and the vectorised kernels,
// compiled once per CPU capability (highway_kernel_{default,avx2,avx512}.cpp, all from highway_kernel_impl.h)
// and chosen at run time (cpu/cpu_capability.h). Arguments: HighwayForwardArgs / HighwayBackwardArgs, the
// rows view of csrc/highway.h.
#pragma once

#include "highway.h"

namespace fusedres {
namespace cpu {

using HighwayForwardFn = void (*)(const HighwayForwardArgs&);
using HighwayBackwardFn = void (*)(const HighwayBackwardArgs&);

#define FUSEDRES_DECLARE_HIGHWAY_KERNELS(CAP)                   \
  namespace CAP {                                               \
  void highway_forward_kernel(const HighwayForwardArgs& args);   \
  void highway_backward_kernel(const HighwayBackwardArgs& args); \
  }
FUSEDRES_DECLARE_HIGHWAY_KERNELS(DEFAULT)
#if defined(__x86_64__)
FUSEDRES_DECLARE_HIGHWAY_KERNELS(AVX2)
FUSEDRES_DECLARE_HIGHWAY_KERNELS(AVX512)
#endif
#undef FUSEDRES_DECLARE_HIGHWAY_KERNELS

// The best kernel set for this CPU (the same choice as bn_act's).
HighwayForwardFn highway_forward_dispatch();
HighwayBackwardFn highway_backward_dispatch();

}  // namespace cpu
}  // namespace fusedres

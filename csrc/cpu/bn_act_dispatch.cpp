// Picks the bn_act kernel build for this machine's capability (cpu/cpu_capability.h).
#include "cpu/bn_act_kernel.h"
#include "cpu/cpu_capability.h"

namespace fusedres {
namespace cpu {

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

DenseForwardFn dense_forward_cl_dispatch() {
  switch (capability()) {
#if defined(__x86_64__)
    case Cap::kAVX512:
      return &AVX512::dense_forward_cl_kernel;
    case Cap::kAVX2:
      return &AVX2::dense_forward_cl_kernel;
#endif
    default:
      return &DEFAULT::dense_forward_cl_kernel;
  }
}

DenseBackwardFn dense_backward_cl_dispatch() {
  switch (capability()) {
#if defined(__x86_64__)
    case Cap::kAVX512:
      return &AVX512::dense_backward_cl_kernel;
    case Cap::kAVX2:
      return &AVX2::dense_backward_cl_kernel;
#endif
    default:
      return &DEFAULT::dense_backward_cl_kernel;
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

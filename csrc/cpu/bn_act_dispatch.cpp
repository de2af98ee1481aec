// Picks the bn_act kernel build for this machine's capability (cpu/cpu_capability.h).
#include "cpu/bn_act_kernel.h"
#include "cpu/cpu_capability.h"

namespace fusedres {
namespace cpu {

BnActForwardFn bn_act_forward_dispatch() { return FUSEDRES_PICK_ISA(bn_act_forward_kernel); }

BnActBackwardFn bn_act_backward_dispatch() { return FUSEDRES_PICK_ISA(bn_act_backward_kernel); }

DenseForwardFn dense_forward_cl_dispatch() { return FUSEDRES_PICK_ISA(dense_forward_cl_kernel); }

DenseBackwardFn dense_backward_cl_dispatch() { return FUSEDRES_PICK_ISA(dense_backward_cl_kernel); }

const char* bn_act_cpu_capability() { return FUSEDRES_PICK_ISA(capability_name)(); }

}  // namespace cpu
}  // namespace fusedres

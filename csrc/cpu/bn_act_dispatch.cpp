// Picks the build of the kernels compiled into the bn_act translation units (bn_act, the dense op's channels_last
// path, the block end) for this machine's capability (cpu/cpu_capability.h).
#include "cpu/bn_act_kernel.h"
#include "cpu/block_end_kernel.h"
#include "cpu/cpu_capability.h"

namespace fusedres {
namespace cpu {

BnActForwardFn bn_act_forward_dispatch() { return FUSEDRES_PICK_ISA(bn_act_forward_kernel); }

BnActBackwardFn bn_act_backward_dispatch() { return FUSEDRES_PICK_ISA(bn_act_backward_kernel); }

DenseForwardFn dense_forward_cl_dispatch() { return FUSEDRES_PICK_ISA(dense_forward_cl_kernel); }

DenseBackwardFn dense_backward_cl_dispatch() { return FUSEDRES_PICK_ISA(dense_backward_cl_kernel); }

BlockEndForwardFn block_end_forward_dispatch() { return FUSEDRES_PICK_ISA(block_end_forward_kernel); }

BlockEndBackwardFn block_end_backward_dispatch() { return FUSEDRES_PICK_ISA(block_end_backward_kernel); }

const char* bn_act_cpu_capability() { return FUSEDRES_PICK_ISA(capability_name)(); }

}  // namespace cpu
}  // namespace fusedres

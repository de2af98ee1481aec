// Baseline build of the CPU kernels (no ISA extension beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/bn_act_kernel_impl.h"
#include "cpu/dense_kernel_impl.h"
#include "cpu/block_end_kernel_impl.h"

// Baseline build of the highway CPU kernels (no ISA extension beyond the compiler's default).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/highway_kernel_impl.h"

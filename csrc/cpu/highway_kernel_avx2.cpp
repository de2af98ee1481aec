// AVX2 + FMA build of the highway CPU kernels; selected at run time only on CPUs that have them.
// See bn_act_kernel_avx2.cpp for why the ISA macros are defined by hand.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/highway_kernel_impl.h"
#endif

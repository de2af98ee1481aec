// AVX-512 (F, BW, VL, DQ) build of the CPU kernels; selected at run time only on CPUs that have them.
// See bn_act_kernel_avx2.cpp for why the ISA macros are defined by hand.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/isa_macros_avx512.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/bn_act_kernel_impl.h"
#include "cpu/dense_kernel_impl.h"
#include "cpu/block_end_kernel_impl.h"
#endif

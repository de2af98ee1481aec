// AVX-512 (F, BW, VL, DQ) build of the highway CPU kernels; selected at run time only on CPUs that have them.
// See bn_act_kernel_avx2.cpp for why the ISA macros are defined by hand.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#include "cpu/isa_macros_avx2.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/highway_kernel_impl.h"
#endif

// AVX2 + FMA build of the CPU kernels; selected at run time only on CPUs that have them.
// `#pragma GCC target` switches code generation for this translation unit but, unlike -mavx2, does not
// define the ISA macros that ATen's vector headers and sleef.h test, so they are defined here too.
#if defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/bn_act_kernel_impl.h"
#include "cpu/dense_kernel_impl.h"
#include "cpu/block_end_kernel_impl.h"
#endif

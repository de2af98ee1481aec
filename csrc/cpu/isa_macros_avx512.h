// The predefined macros -mavx512f -mavx512bw -mavx512vl -mavx512dq (and the AVX2 set) would set; for translation
// units that enable those ISAs with `#pragma GCC target` (included before any other header of the unit).
#pragma once
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

// The only file that knows whether kernels are compiled by nvcc for the GPU or by a host compiler for the
// CUDA emulator (tests run the same kernel source on the CPU). Kernel headers use DYN_SHARED for dynamic
// shared memory and launch through KERNEL_LAUNCH; nothing else may depend on which compiler is in use.
#pragma once

// Function qualifiers for kernel helpers; the emulator defines __host__ / __device__ / __forceinline__ too.
#define FUSEDRES_DEVICE_INLINE __device__ __forceinline__
#define FUSEDRES_HOST_DEVICE_INLINE __host__ __device__ __forceinline__

#if defined(__CUDACC__)
#include <cuda_runtime.h>
// Dynamic shared memory: one untyped extern array, reinterpreted. Declaring `extern __shared__ T name[]`
// with different T in different template instantiations is an nvcc error; one byte array avoids it.
#define DYN_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char name##_raw_[]; \
  T* name = reinterpret_cast<T*>(name##_raw_)
// Static shared memory: `STATIC_SHARED(T, name, count);` declares `T name[count]` in shared memory. Kernels use it
// instead of a bare __shared__ array so that the emulator can poison the array at the start of every block
// (a read before the block wrote it then yields 0xFF bytes, NaN in floating point): the emulator's own poisoning
// misses function-local statics of template instantiations, which is every kernel here.
#define STATIC_SHARED(T, name, count) __shared__ T name[count]
// A template kernel must be wrapped in parentheses: KERNEL_LAUNCH((k<float, 4>), grid, block, 0, stream, ...).
#define KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#else
// The CUDA emulator (tests/cuda_emu/cuda_emu.h; the emulator test build puts tests/cuda_emu on the include path).
#include "cuda_emu.h"
#define DYN_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
// Blocks run one after another, so a function-local static is per-block shared memory; the first thread of a block
// to reach the declaration poisons it.
#define STATIC_SHARED(T, name, count) \
  static T name[count];               \
  ::emu::block_shared(name, sizeof(name))
// The emulator runs the grid synchronously on the calling thread; there are no streams. Every launch is logged
// by name (the coverage test checks that each __global__ kernel of csrc/cuda ran under the emulator).
#define KERNEL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::record_launch(#kernel), ::emu::launch(kernel, grid, block, smem, __VA_ARGS__))
// The same declaration as CUDA's driver_types.h (a repeated identical typedef is allowed), so host launch code
// can name the stream type.
typedef struct CUstream_st* cudaStream_t;
// emu::launch reports errors by throwing emu::Error, so there is nothing to check after a launch.
#ifndef FUSEDRES_LAUNCH_CHECK
#define FUSEDRES_LAUNCH_CHECK() ((void)0)
#endif
#endif

// The CPU kernel build (instruction set) chosen for this machine, shared by every op's dispatcher.
#pragma once

namespace fusedres {
namespace cpu {

enum class Cap { kDefault, kAVX2, kAVX512 };

// Chosen once from ATen's own capability (which honours ATEN_CPU_CAPABILITY), so our kernels and ATen's use
// the same instruction set, and only where the CPU really has every extension the build was compiled for.
Cap capability();

}  // namespace cpu
}  // namespace fusedres

// The build of kernel entry point `fn` for this machine: &AVX512::fn, &AVX2::fn or &DEFAULT::fn (each kernel
// header is compiled once per instruction-set namespace, csrc/cpu/*_kernel_<isa>.cpp). A macro because the
// namespace is part of the name; used inside namespace fusedres::cpu.
#if defined(__x86_64__) && defined(FUSEDRES_NO_AVX512)
// Built without the AVX-512 kernels (setup.py's FUSEDRES_NO_AVX512): capability() never answers kAVX512.
#define FUSEDRES_PICK_ISA(fn) (::fusedres::cpu::capability() == ::fusedres::cpu::Cap::kAVX2 ? &AVX2::fn : &DEFAULT::fn)
#elif defined(__x86_64__)
#define FUSEDRES_PICK_ISA(fn)                                  \
  (::fusedres::cpu::capability() == ::fusedres::cpu::Cap::kAVX512 \
       ? &AVX512::fn                                           \
       : ::fusedres::cpu::capability() == ::fusedres::cpu::Cap::kAVX2 ? &AVX2::fn : &DEFAULT::fn)
#else
#define FUSEDRES_PICK_ISA(fn) (&DEFAULT::fn)
#endif

namespace fusedres {
namespace cpu {

}  // namespace cpu
}  // namespace fusedres

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

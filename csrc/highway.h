// Host-side pieces of the highway gate shared by the CPU and CUDA backends: argument checks, the "rows" view
// every kernel works on and the kernel argument structs. Implemented in csrc/highway_host.cpp (host compiler
// only); the .cu launchers include it for declarations.
//
// Kernels see every operand as `rows` rows of `cols` contiguous elements, each operand with its own row stride
// (in elements):
//   unpacked op: every operand is made dense in transform's suggested memory format (a copy only when it is not
//     already), so all of them share one memory order: rows = 1, cols = numel, row stride = numel.
//   packed op: `projected` is made dense in its suggested memory format (a copy only when it is not already).
//     With `dim` at position p of its memory order (dims sorted by stride, outermost first), and
//     parts = 2 (3 for free_carry), part = projected.size(dim) / parts:
//       rows = product of the sizes of the dims before p, cols = part * product of the sizes after p,
//       row stride of every part = parts * cols, part k (0 transform, 1 gate, 2 carry_gate) starts k * cols
//       elements after the first element.
//     So the parts are read in place, never split or copied. carry, the output and grad_carry are dense in the
//     same memory format with the part's shape (carry copied to it when needed): row stride = cols.
//     grad_projected is dense like projected and is written through the same part view.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/highway_math.h"

namespace fusedres {

// "relu" | "tanh" | "sigmoid" | "identity" -> math::HighwayAct; anything else is an error naming the argument.
int parse_highway_activation(c10::string_view activation);

struct HighwayRows {
  int64_t rows = 0, cols = 0;
  int64_t numel() const { return rows * cols; }
};

// One input operand of a kernel: data pointer of its first element (of row 0) and its row stride in elements.
struct HighwayOperand {
  const void* data = nullptr;
  int64_t row_stride = 0;
};

// One output operand; data == nullptr when the output is not wanted.
struct HighwayOutOperand {
  void* data = nullptr;
  int64_t row_stride = 0;
};

// Everything a forward kernel needs. All operands have `dtype` and the geometry `shape`.
struct HighwayForwardArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  HighwayRows shape;
  int act = math::kHwReLU;
  bool free_carry = false;
  HighwayOperand transform, gate, carry;
  HighwayOperand carry_gate;  // data == nullptr unless free_carry
  HighwayOutOperand out;
};

// Everything a backward kernel needs. Outputs not asked for have data == nullptr (grad_carry_gate always does
// when !free_carry). One pass reads grad_out, transform, gate, carry (and carry_gate) and writes the grads.
struct HighwayBackwardArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  HighwayRows shape;
  int act = math::kHwReLU;
  bool free_carry = false;
  HighwayOperand grad_out, transform, gate, carry;
  HighwayOperand carry_gate;  // data == nullptr unless free_carry
  HighwayOutOperand grad_transform, grad_gate, grad_carry, grad_carry_gate;
};

// Checks of the unpacked op: transform, gate, carry (and carry_gate) all the same shape, the same floating
// dtype (float32, float64, bfloat16, float16) and the same device. `grad_out` (backward) likewise when given.
void check_highway(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                   const std::optional<at::Tensor>& carry_gate, const at::Tensor* grad_out = nullptr);

// Checks of the packed op; returns dim wrapped to [0, projected.dim()). projected.size(dim) must be divisible
// by 2 (3 for free_carry); carry (and grad_out when given) must have the part's shape, projected's dtype and
// device.
int64_t check_highway_packed(const at::Tensor& projected, const at::Tensor& carry, int64_t dim, bool free_carry,
                             const at::Tensor* grad_out = nullptr);

// The shape of one part of a packed projection (projected's shape with size(dim) / parts along dim).
std::vector<int64_t> highway_part_sizes(const at::Tensor& projected, int64_t dim, bool free_carry);

// A prepared call: the dense operands (kept alive here while the kernel runs), the outputs and the kernel
// arguments pointing into them. Backends run their kernel on `args` when `args.shape.numel() > 0`.
struct HighwayForwardPlan {
  std::array<at::Tensor, 4> inputs;  // dense operands (or the dense projection + carry)
  at::Tensor out;
  HighwayForwardArgs args;
};

struct HighwayBackwardPlan {
  std::array<at::Tensor, 5> inputs;
  // Unpacked: (grad_transform, grad_gate, grad_carry, grad_carry_gate). Packed: (grad_projected, grad_carry,
  // -, -). Gradients not asked for are empty [0] tensors (the schemas have no optional returns).
  std::array<at::Tensor, 4> grads;
  HighwayBackwardArgs args;
};

// Unpacked op: checks, dense operands in transform's suggested memory format, output allocated (not written).
HighwayForwardPlan highway_forward_plan(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                                        const std::optional<at::Tensor>& carry_gate, c10::string_view activation);

HighwayBackwardPlan highway_backward_plan(const at::Tensor& grad_out, const at::Tensor& transform,
                                          const at::Tensor& gate, const at::Tensor& carry,
                                          const std::optional<at::Tensor>& carry_gate, c10::string_view activation,
                                          std::array<bool, 4> output_mask);

// Packed op: checks, rows view of projected (no copy of the parts), output allocated (not written).
HighwayForwardPlan highway_packed_forward_plan(const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                                               bool free_carry, c10::string_view activation);

HighwayBackwardPlan highway_packed_backward_plan(const at::Tensor& grad_out, const at::Tensor& projected,
                                                 const at::Tensor& carry, int64_t dim, bool free_carry,
                                                 c10::string_view activation, std::array<bool, 2> output_mask);

}  // namespace fusedres

// CPU backend of the four highway ops: checks, dense operands and the rows view come from the shared host code
// (csrc/highway_host.cpp), then the vectorised kernels of highway_kernel_impl.h for this machine's ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "cpu/highway_kernel.h"
#include "highway.h"

namespace fusedres {
namespace cpu {

HighwayForwardFn highway_forward_dispatch() { return FUSEDRES_PICK_ISA(highway_forward_kernel); }

HighwayBackwardFn highway_backward_dispatch() { return FUSEDRES_PICK_ISA(highway_backward_kernel); }

}  // namespace cpu

namespace {

at::Tensor run_forward(HighwayForwardPlan p) {
  if (p.args.shape.numel() > 0) cpu::highway_forward_dispatch()(p.args);
  return p.out;
}

void run_backward(const HighwayBackwardPlan& p) {
  const auto& a = p.args;
  const bool any = a.grad_transform.data || a.grad_gate.data || a.grad_carry.data || a.grad_carry_gate.data;
  if (a.shape.numel() > 0 && any) cpu::highway_backward_dispatch()(a);
}

at::Tensor highway_forward_cpu(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                               const std::optional<at::Tensor>& carry_gate, c10::string_view activation) {
  return run_forward(highway_forward_plan(transform, gate, carry, carry_gate, activation));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> highway_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
    const std::optional<at::Tensor>& carry_gate, c10::string_view activation, std::array<bool, 4> output_mask) {
  HighwayBackwardPlan p = highway_backward_plan(grad_out, transform, gate, carry, carry_gate, activation, output_mask);
  run_backward(p);
  return {p.grads[0], p.grads[1], p.grads[2], p.grads[3]};
}

at::Tensor highway_packed_forward_cpu(const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                                      bool free_carry, c10::string_view activation) {
  return run_forward(highway_packed_forward_plan(projected, carry, dim, free_carry, activation));
}

std::tuple<at::Tensor, at::Tensor> highway_packed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& projected,
                                                               const at::Tensor& carry, int64_t dim, bool free_carry,
                                                               c10::string_view activation,
                                                               std::array<bool, 2> output_mask) {
  HighwayBackwardPlan p =
      highway_packed_backward_plan(grad_out, projected, carry, dim, free_carry, activation, output_mask);
  run_backward(p);
  return {p.grads[0], p.grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("highway_forward", &highway_forward_cpu);
  m.impl("highway_backward", &highway_backward_cpu);
  m.impl("highway_packed_forward", &highway_packed_forward_cpu);
  m.impl("highway_packed_backward", &highway_packed_backward_cpu);
}

}  // namespace fusedres

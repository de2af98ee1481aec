// CUDA launcher of the highway gate (the four highway ops): checks, the rows view of the operands and the output
// allocation come from the host helpers shared with the CPU backend (highway_host.cpp), the kernels and their
// launch shape from highway_kernels.cuh, and the launch sequence from highway_launch.cuh (shared with the
// emulator tests).
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "highway.h"
#include "cuda/launcher_common.h"
#include "cuda/highway_launch.cuh"

namespace fusedres {
namespace {

template <typename scalar_t>
gpu::HighwayIn<scalar_t> kernel_in(const HighwayOperand& o) {
  return {static_cast<const scalar_t*>(o.data), o.row_stride};
}

template <typename scalar_t>
gpu::HighwayOut<scalar_t> kernel_out(const HighwayOutOperand& o) {
  return {static_cast<scalar_t*>(o.data), o.row_stride};
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

void run_forward(const HighwayForwardArgs& args) {
  if (args.shape.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(args.free_carry == (args.carry_gate.data != nullptr));
  const gpu::HighwayShape shape{args.shape.rows, args.shape.cols};
  const int sms = num_sms();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(args.dtype, "highway_forward_cuda", [&] {
    const gpu::HighwayForwardKernelArgs<kscalar_t> a{kernel_in<kscalar_t>(args.transform),
                                                     kernel_in<kscalar_t>(args.gate),
                                                     kernel_in<kscalar_t>(args.carry),
                                                     kernel_in<kscalar_t>(args.carry_gate),
                                                     kernel_out<kscalar_t>(args.out),
                                                     args.act};
    gpu::highway_forward_launch<kscalar_t, acc_t>(shape, sms, a, stream);
  });
}

void run_backward(const HighwayBackwardArgs& args) {
  if (args.shape.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(args.free_carry == (args.carry_gate.data != nullptr));
  TORCH_INTERNAL_ASSERT(args.free_carry || args.grad_carry_gate.data == nullptr);
  const gpu::HighwayShape shape{args.shape.rows, args.shape.cols};
  const int sms = num_sms();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(args.dtype, "highway_backward_cuda", [&] {
    const gpu::HighwayBackwardKernelArgs<kscalar_t> a{kernel_in<kscalar_t>(args.grad_out),
                                                      kernel_in<kscalar_t>(args.transform),
                                                      kernel_in<kscalar_t>(args.gate),
                                                      kernel_in<kscalar_t>(args.carry),
                                                      kernel_in<kscalar_t>(args.carry_gate),
                                                      kernel_out<kscalar_t>(args.grad_transform),
                                                      kernel_out<kscalar_t>(args.grad_gate),
                                                      kernel_out<kscalar_t>(args.grad_carry),
                                                      kernel_out<kscalar_t>(args.grad_carry_gate),
                                                      args.act};
    gpu::highway_backward_launch<kscalar_t, acc_t>(shape, sms, a, stream);
  });
}

at::Tensor highway_forward_cuda(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                                const std::optional<at::Tensor>& carry_gate, c10::string_view activation) {
  const c10::cuda::CUDAGuard device_guard(transform.device());
  HighwayForwardPlan plan = highway_forward_plan(transform, gate, carry, carry_gate, activation);
  run_forward(plan.args);
  return plan.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> highway_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
    const std::optional<at::Tensor>& carry_gate, c10::string_view activation, std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard device_guard(transform.device());
  HighwayBackwardPlan plan =
      highway_backward_plan(grad_out, transform, gate, carry, carry_gate, activation, output_mask);
  run_backward(plan.args);
  return {plan.grads[0], plan.grads[1], plan.grads[2], plan.grads[3]};
}

at::Tensor highway_packed_forward_cuda(const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                                       bool free_carry, c10::string_view activation) {
  const c10::cuda::CUDAGuard device_guard(projected.device());
  HighwayForwardPlan plan = highway_packed_forward_plan(projected, carry, dim, free_carry, activation);
  run_forward(plan.args);
  return plan.out;
}

std::tuple<at::Tensor, at::Tensor> highway_packed_backward_cuda(const at::Tensor& grad_out,
                                                                const at::Tensor& projected, const at::Tensor& carry,
                                                                int64_t dim, bool free_carry,
                                                                c10::string_view activation,
                                                                std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard device_guard(projected.device());
  HighwayBackwardPlan plan =
      highway_packed_backward_plan(grad_out, projected, carry, dim, free_carry, activation, output_mask);
  run_backward(plan.args);
  return {plan.grads[0], plan.grads[1]};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("highway_forward", &fusedres::highway_forward_cuda);
  m.impl("highway_backward", &fusedres::highway_backward_cuda);
  m.impl("highway_packed_forward", &fusedres::highway_packed_forward_cuda);
  m.impl("highway_packed_backward", &fusedres::highway_packed_backward_cuda);
}

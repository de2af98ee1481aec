// CUDA launcher of bn_act_forward: checks and parameters come from the host helpers shared with the CPU backend
// (bn_act_host.cpp), the kernels and their launch shapes from bn_act_kernels.cuh, and the sequence of launches from
// bn_act_launch.cuh (shared with the emulator tests), which also updates (training) or reads (eval) the running
// statistics: this file allocates and launches, and runs no ATen op on the statistics (except the host helpers'
// fallback for non-contiguous running statistics).
// bn_act_backward has its own translation unit so that the two compile in parallel.
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "bn_act.h"
#include "cuda/launcher_common.h"
#include "cuda/bn_act_launch.cuh"
#include "cuda/bn_act_occupancy.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double negative_slope) {
  const int act = parse_activation(activation);
  const BnActGeom g =
      check_bn_act_forward(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act);
  const c10::cuda::CUDAGuard device_guard(input.device());

  const at::Tensor x = bn_act_dense(input, g);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor r = has_residual ? bn_act_dense(*residual, g) : at::Tensor();
  const at::ScalarType acc = bn_act_acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const bool has_mask = math::act_has_mask(act);
  const int64_t mask_bytes = has_mask ? math::mask_bytes(g.numel()) : 0;
  const int64_t C = g.C;

  // The kernels index x, r and the output with the offsets of g's layout, so all three must be dense in it.
  at::Tensor output = at::empty_like(x, g.format);
  TORCH_INTERNAL_ASSERT(x.is_contiguous(g.format) && output.is_contiguous(g.format) &&
                        (!has_residual || r.is_contiguous(g.format)));

  // Same statistics as the CPU backend returns: batch statistics (zeros when there is no data) in training,
  // the running statistics in eval (written by the elementwise kernel from the running statistics themselves).
  const bool device_running = running_stats_on_device(running_mean, running_var);
  at::Tensor save_mean, save_invstd;
  if (training) {
    save_mean = g.numel() == 0 ? at::zeros({C}, acc_opts) : at::empty({C}, acc_opts);
    save_invstd = g.numel() == 0 ? at::zeros({C}, acc_opts) : at::empty({C}, acc_opts);
  } else if (device_running && g.numel() > 0) {
    save_mean = at::empty({C}, acc_opts);
    save_invstd = at::empty({C}, acc_opts);
  } else {  // no elements to launch a kernel for, or non-contiguous running statistics
    std::tie(save_mean, save_invstd) = bn_act_eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (g.numel() == 0) {
    // Nothing to normalise: a zeroed mask, running statistics untouched.
    return {output, save_mean, save_invstd, at::zeros({mask_bytes}, x.options().dtype(at::kByte))};
  }

  // Every mask word, the spare one included, is written by the elementwise kernel: no zeroing needed.
  at::Tensor mask = at::empty({mask_bytes}, x.options().dtype(at::kByte));
  const std::pair<at::Tensor, at::Tensor> params = bn_act_params(weight, bias, C, acc, x.device());
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(g.N, g.C, g.S, g.channels_last, has_mask,
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                bn_act_forward_occupancy(x.scalar_type(), g.channels_last));

  at::Tensor workspace = at::empty({gpu::bn_act_forward_workspace_elems(L, training)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_act_forward_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
    const gpu::BnActForwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        has_residual ? reinterpret_cast<const kscalar_t*>(r.const_data_ptr<scalar_t>()) : nullptr,
        params.first.const_data_ptr<acc_t>(),
        params.second.const_data_ptr<acc_t>(),
        save_mean.mutable_data_ptr<acc_t>(),
        save_invstd.mutable_data_ptr<acc_t>(),
        /*var=*/nullptr,
        reinterpret_cast<kscalar_t*>(output.mutable_data_ptr<scalar_t>()),
        /*y_ld=*/0,
        has_mask ? reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<uint8_t>()) : nullptr,
        workspace.mutable_data_ptr<acc_t>(),
        stat_vector(running_mean, device_running),
        stat_vector(running_var, device_running),
        momentum};
    gpu::bn_act_forward_launch(L, buffers, training, static_cast<acc_t>(eps), act, static_cast<acc_t>(negative_slope),
                               stream);
  });

  // Fallback for non-contiguous running statistics only (the finalize kernel updated contiguous ones): ATen ops
  // on the same stream, so ordered after the kernels.
  if (training && !device_running) {
    const at::Tensor batch_var = workspace.narrow(0, gpu::bn_act_forward_var_offset(L), C);
    bn_act_update_running_stats(running_mean, running_var, save_mean, batch_var, g.M(), momentum);
  }
  return {output, save_mean, save_invstd, mask};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("bn_act_forward", &fusedres::bn_act_forward_cuda); }

// CUDA launcher of bn_act_backward: checks and parameters from the host helpers shared with the CPU backend
// (bn_act_host.cpp), kernels and launch shapes from bn_act_kernels.cuh, the sequence of launches from
// bn_act_launch.cuh (shared with the emulator tests). The forward is in bn_act_forward.cu.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  const int act = parse_activation(activation);
  const BnActGeom g =
      check_bn_act_backward(grad_out, input, weight, save_mean, save_invstd, mask, act, bias, residual);
  const c10::cuda::CUDAGuard device_guard(input.device());

  const at::Tensor dy = bn_act_dense(grad_out, g);
  const at::Tensor x = bn_act_dense(input, g);
  const at::ScalarType acc = bn_act_acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const int64_t C = g.C;
  const bool want_input = output_mask[0], want_residual = output_mask[1];
  const bool want_weight = output_mask[2], want_bias = output_mask[3];
  // Same rule as the CPU backend: parameter gradients in the weight's dtype, or the accumulation dtype.
  const at::ScalarType param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : acc;

  // SiLU recomputes the pre-activation: bias (zeros when absent) and the residual, dense like x.
  const bool needs_z = math::act_needs_z(act);
  // (not a structured binding: the dispatch lambda below captures them)
  const std::pair<at::Tensor, at::Tensor> params =
      bn_act_params(weight, needs_z ? bias : std::nullopt, C, acc, x.device());
  const at::Tensor& w = params.first;
  const at::Tensor& b = params.second;
  const at::Tensor r =
      needs_z && residual.has_value() && residual->defined() ? bn_act_dense(*residual, g) : at::Tensor();
  at::Tensor grad_input = want_input ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor grad_residual = want_residual ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  // The kernels index every per-element tensor with the offsets of g's layout.
  TORCH_INTERNAL_ASSERT(dy.is_contiguous(g.format) && x.is_contiguous(g.format) &&
                        (!want_input || grad_input.is_contiguous(g.format)) &&
                        (!want_residual || grad_residual.is_contiguous(g.format)));

  const bool need_sums = gpu::bn_act_backward_needs_sums(training, want_input, want_weight, want_bias);
  const bool need_elementwise = want_input || want_residual;
  // Parameter gradients not asked for: empty, with the options of w (as the CPU backend returns them).
  auto param_grad = [&](bool wanted, const at::Tensor& sum) {
    return wanted ? sum.to(param_dtype) : bn_act_empty_like_none(w);
  };
  if (g.numel() == 0 || (!need_sums && !need_elementwise)) {
    // Sums over no values are 0; one tensor each, so the two gradients never alias.
    return {grad_input, grad_residual, param_grad(want_weight, at::zeros({C}, acc_opts)),
            param_grad(want_bias, at::zeros({C}, acc_opts))};
  }

  const at::Tensor mean = save_mean.contiguous();
  const at::Tensor invstd = save_invstd.contiguous();
  const bool has_mask = math::act_has_mask(act);
  // The kernels read the mask as 32-bit words: contiguous and 4-byte aligned (a mask straight from
  // bn_act_forward is; a view at an odd offset is copied).
  at::Tensor mask_words = mask.contiguous();
  if (has_mask && reinterpret_cast<uintptr_t>(mask_words.const_data_ptr()) % alignof(uint32_t) != 0) {
    mask_words = mask_words.clone();
  }
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(g.N, g.C, g.S, g.channels_last, has_mask,
                                at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                bn_act_backward_occupancy(x.scalar_type(), g.channels_last, needs_z));

  // sum_dz / sum_dz_xhat become grad_bias / grad_weight (without a copy when the dtype already matches).
  at::Tensor sum_dz = need_sums ? at::empty({C}, acc_opts) : at::Tensor();
  at::Tensor sum_dz_xhat = need_sums ? at::empty({C}, acc_opts) : at::Tensor();
  at::Tensor workspace = at::empty({gpu::bn_act_backward_workspace_elems(L, need_sums)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_act_backward_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
    const gpu::BnActBackwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(dy.const_data_ptr<scalar_t>()),
        /*grad_out_ld=*/0,
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        has_mask ? reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<uint8_t>()) : nullptr,
        mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(),
        want_input ? reinterpret_cast<kscalar_t*>(grad_input.mutable_data_ptr<scalar_t>()) : nullptr,
        want_residual ? reinterpret_cast<kscalar_t*>(grad_residual.mutable_data_ptr<scalar_t>()) : nullptr,
        need_sums ? sum_dz.mutable_data_ptr<acc_t>() : nullptr,
        need_sums ? sum_dz_xhat.mutable_data_ptr<acc_t>() : nullptr,
        workspace.mutable_data_ptr<acc_t>(),
        needs_z ? b.const_data_ptr<acc_t>() : nullptr,
        r.defined() ? reinterpret_cast<const kscalar_t*>(r.const_data_ptr<scalar_t>()) : nullptr};
    gpu::bn_act_backward_launch(L, buffers, training, act, static_cast<acc_t>(negative_slope), stream);
  });

  return {grad_input, grad_residual, param_grad(want_weight, sum_dz_xhat), param_grad(want_bias, sum_dz)};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) { m.impl("bn_act_backward", &fusedres::bn_act_backward_cuda); }

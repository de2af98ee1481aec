// CUDA launchers of the bn_act building-block ops (docs/design.md section 7): bn_stats, bn_act_elemt,
// bn_act_backward_reduce and bn_act_backward_elemt. Checks, parameters and outputs follow the CPU backend
// (cpu/bn_act.cpp, host helpers of bn_act_host.cpp); the launch sequences are those of bn_act_launch.cuh
// (shared with the emulator tests): statistics only, eval-form elementwise, sums only, given-sums elementwise.
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

// forward: the forward's kernels run (bn_stats, bn_act_elemt), else the backward's (without SiLU, which these ops
// do not take).
gpu::BnActLaunch launch_config(const BnActGeom& g, bool has_mask, at::ScalarType dtype, bool forward) {
  return gpu::bn_act_launch_config(g.N, g.C, g.S, g.channels_last, has_mask,
                                   at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                   forward ? bn_act_forward_occupancy(dtype, g.channels_last)
                                           : bn_act_backward_occupancy(dtype, g.channels_last, false));
}

// The kernels read the mask as 32-bit words: contiguous and 4-byte aligned (a mask straight from a forward op is;
// a view at an odd offset is copied).
at::Tensor mask_words_of(const at::Tensor& mask, bool has_mask) {
  at::Tensor words = mask.contiguous();
  if (has_mask && reinterpret_cast<uintptr_t>(words.const_data_ptr()) % alignof(uint32_t) != 0) {
    words = words.clone();
  }
  return words;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input) {
  const BnActGeom g = check_bn_stats(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto acc_opts = input.options().dtype(bn_act_acc_type(input.scalar_type()));
  if (g.numel() == 0) {
    // No values: zeros, as the CPU backend returns (a rank with an empty batch contributes count 0).
    return {at::zeros({g.C}, acc_opts), at::zeros({g.C}, acc_opts)};
  }
  const at::Tensor x = bn_act_dense(input, g);
  TORCH_INTERNAL_ASSERT(x.is_contiguous(g.format));
  at::Tensor mean = at::empty({g.C}, acc_opts), var = at::empty({g.C}, acc_opts);
  at::Tensor invstd = at::empty({g.C}, acc_opts);  // written by the finalize kernel, not returned
  const gpu::BnActLaunch L = launch_config(g, false, x.scalar_type(), true);
  at::Tensor workspace = at::empty({gpu::bn_act_forward_workspace_elems(L, true)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_stats_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == bn_act_acc_type(x.scalar_type()));
    const gpu::BnActForwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        nullptr,
        nullptr,
        nullptr,
        mean.mutable_data_ptr<acc_t>(),
        invstd.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(),
        /*y=*/nullptr,  // statistics only
        0,
        nullptr,
        workspace.mutable_data_ptr<acc_t>()};
    // eps only enters the unused invstd.
    gpu::bn_act_forward_launch(L, buffers, /*training=*/true, acc_t(1), math::kIdentity, acc_t(0), stream);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_act_elemt_cuda(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                     const at::Tensor& invstd, c10::string_view activation,
                                                     double negative_slope) {
  const int act = parse_activation(activation);
  const BnActGeom g = check_bn_act_elemt(input, residual, weight, bias, mean, invstd, act);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = bn_act_dense(input, g);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor r = has_residual ? bn_act_dense(*residual, g) : at::Tensor();
  const at::ScalarType acc = bn_act_acc_type(x.scalar_type());
  const bool has_mask = math::act_has_mask(act);
  const int64_t mask_bytes = has_mask ? math::mask_bytes(g.numel()) : 0;
  at::Tensor output = at::empty_like(x, g.format);
  TORCH_INTERNAL_ASSERT(x.is_contiguous(g.format) && output.is_contiguous(g.format) &&
                        (!has_residual || r.is_contiguous(g.format)));
  if (g.numel() == 0) return {output, at::zeros({mask_bytes}, x.options().dtype(at::kByte))};

  // Every mask word, the spare one included, is written by the elementwise kernel: no zeroing needed.
  at::Tensor mask = at::empty({mask_bytes}, x.options().dtype(at::kByte));
  const std::pair<at::Tensor, at::Tensor> params = bn_act_params(weight, bias, g.C, acc, x.device());
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  const gpu::BnActLaunch L = launch_config(g, has_mask, x.scalar_type(), true);
  at::Tensor workspace = at::empty({gpu::bn_act_forward_workspace_elems(L, false)}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_act_elemt_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == bn_act_acc_type(x.scalar_type()));
    const gpu::BnActForwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        has_residual ? reinterpret_cast<const kscalar_t*>(r.const_data_ptr<scalar_t>()) : nullptr,
        params.first.const_data_ptr<acc_t>(),
        params.second.const_data_ptr<acc_t>(),
        const_cast<acc_t*>(m.const_data_ptr<acc_t>()),  // read only in the eval sequence
        const_cast<acc_t*>(is.const_data_ptr<acc_t>()),
        nullptr,
        reinterpret_cast<kscalar_t*>(output.mutable_data_ptr<scalar_t>()),
        0,
        has_mask ? reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<uint8_t>()) : nullptr,
        workspace.mutable_data_ptr<acc_t>()};
    gpu::bn_act_forward_launch(L, buffers, /*training=*/false, acc_t(0), act, static_cast<acc_t>(negative_slope),
                               stream);
  });
  return {output, mask};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const at::Tensor& save_mean,
                                                               const at::Tensor& save_invstd, const at::Tensor& mask,
                                                               c10::string_view activation, double negative_slope) {
  const int act = parse_mask_activation(activation, "bn_act_backward_reduce");
  const BnActGeom g = check_bn_act_backward(grad_out, input, std::nullopt, save_mean, save_invstd, mask, act);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const auto acc_opts = input.options().dtype(bn_act_acc_type(input.scalar_type()));
  if (g.numel() == 0) return {at::zeros({g.C}, acc_opts), at::zeros({g.C}, acc_opts)};
  const at::Tensor dy = bn_act_dense(grad_out, g), x = bn_act_dense(input, g);
  TORCH_INTERNAL_ASSERT(dy.is_contiguous(g.format) && x.is_contiguous(g.format));
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const bool has_mask = math::act_has_mask(act);
  const at::Tensor mask_words = mask_words_of(mask, has_mask);
  at::Tensor sum_dz = at::empty({g.C}, acc_opts), sum_dz_xhat = at::empty({g.C}, acc_opts);
  const gpu::BnActLaunch L = launch_config(g, has_mask, x.scalar_type(), false);
  at::Tensor workspace = at::empty({gpu::bn_act_backward_workspace_elems(L, true)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_act_backward_reduce_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == bn_act_acc_type(x.scalar_type()));
    const gpu::BnActBackwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(dy.const_data_ptr<scalar_t>()),
        0,
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        has_mask ? reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<uint8_t>()) : nullptr,
        mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(),
        /*weight=*/nullptr,  // sums only: not read
        nullptr,
        nullptr,
        sum_dz.mutable_data_ptr<acc_t>(),
        sum_dz_xhat.mutable_data_ptr<acc_t>(),
        workspace.mutable_data_ptr<acc_t>()};
    gpu::bn_act_backward_launch(L, buffers, /*training=*/true, act, static_cast<acc_t>(negative_slope), stream);
  });
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, const at::Tensor& sum_dz,
    const at::Tensor& sum_dz_xhat, int64_t count, c10::string_view activation, double negative_slope,
    std::array<bool, 2> output_mask) {
  const int act = parse_mask_activation(activation, "bn_act_backward_elemt");
  const BnActGeom g = check_bn_act_backward_elemt(grad_out, input, weight, save_mean, save_invstd, mask, sum_dz,
                                                  sum_dz_xhat, count, act);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::ScalarType acc = bn_act_acc_type(input.scalar_type());
  const bool want_input = output_mask[0], want_residual = output_mask[1];
  const at::Tensor x = bn_act_dense(input, g);
  at::Tensor grad_input = want_input ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor grad_residual = want_residual ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  if (g.numel() == 0 || !(want_input || want_residual)) return {grad_input, grad_residual};
  const at::Tensor dy = bn_act_dense(grad_out, g);
  TORCH_INTERNAL_ASSERT(dy.is_contiguous(g.format) && x.is_contiguous(g.format) &&
                        (!want_input || grad_input.is_contiguous(g.format)) &&
                        (!want_residual || grad_residual.is_contiguous(g.format)));
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor sdz = sum_dz.contiguous(), sdzx = sum_dz_xhat.contiguous();
  const at::Tensor w = bn_act_params(weight, std::nullopt, g.C, acc, x.device()).first;
  const bool has_mask = math::act_has_mask(act);
  const at::Tensor mask_words = mask_words_of(mask, has_mask);
  const gpu::BnActLaunch L = launch_config(g, has_mask, x.scalar_type(), false);
  at::Tensor workspace = at::empty({gpu::bn_act_backward_elemt_workspace_elems(L)}, x.options().dtype(acc));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "bn_act_backward_elemt_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == bn_act_acc_type(x.scalar_type()));
    const gpu::BnActBackwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(dy.const_data_ptr<scalar_t>()),
        0,
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        has_mask ? reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<uint8_t>()) : nullptr,
        mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(),
        want_input ? reinterpret_cast<kscalar_t*>(grad_input.mutable_data_ptr<scalar_t>()) : nullptr,
        want_residual ? reinterpret_cast<kscalar_t*>(grad_residual.mutable_data_ptr<scalar_t>()) : nullptr,
        const_cast<acc_t*>(sdz.const_data_ptr<acc_t>()),  // read only in this sequence
        const_cast<acc_t*>(sdzx.const_data_ptr<acc_t>()),
        workspace.mutable_data_ptr<acc_t>()};
    gpu::bn_act_backward_elemt_launch(L, buffers, count, act, static_cast<acc_t>(negative_slope), stream);
  });
  return {grad_input, grad_residual};
}


}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("bn_stats", &fusedres::bn_stats_cuda);
  m.impl("bn_act_elemt", &fusedres::bn_act_elemt_cuda);
  m.impl("bn_act_backward_reduce", &fusedres::bn_act_backward_reduce_cuda);
  m.impl("bn_act_backward_elemt", &fusedres::bn_act_backward_elemt_cuda);
}

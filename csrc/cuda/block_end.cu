// CUDA launcher of block_end_forward / block_end_backward (docs/design.md section 10): checks, parameters, the
// residual's layout and the running-statistics update come from the host helpers shared with the CPU backend
// (block_end_host.cpp, bn_act_host.cpp), the kernels and their launch shapes from block_end_kernels.cuh, and the
// sequence of launches from block_end_launch.cuh (shared with the emulator tests). The results match the CPU op's
// (csrc/cpu/block_end.cpp): same outputs, dtypes and memory formats.
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "block_end.h"
#include "cuda/launcher_common.h"
#include "cuda/block_end_launch.cuh"
#include "cuda/bn_act_occupancy.h"

namespace fusedres {
namespace {

template <typename acc_t>
gpu::BlockEndScaleView<acc_t> scale_view(const at::Tensor& s, int64_t C) {
  if (!s.defined()) return {nullptr, false, C};
  return {s.const_data_ptr<acc_t>(), s.dim() == 2, C};
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_end_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, c10::string_view activation, double negative_slope) {
  const int act = parse_block_end_activation(activation);
  const BnActGeom g = check_block_end_forward(input, residual, scale, weight, bias, running_mean, running_var,
                                              training, momentum, eps);
  const c10::cuda::CUDAGuard device_guard(input.device());

  const at::Tensor x = bn_act_dense(input, g);
  const at::ScalarType acc = bn_act_acc_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  const bool has_mask = math::act_has_mask(act);
  const int64_t mask_bytes = has_mask ? math::mask_bytes(g.numel()) : 0;
  const int64_t C = g.C;

  at::Tensor output = at::empty_like(x, g.format);
  TORCH_INTERNAL_ASSERT(x.is_contiguous(g.format) && output.is_contiguous(g.format));
  // Contiguous running statistics are updated by bn_act's statistics finalize (training) or normalised with by the
  // elementwise kernel, which writes save_mean / save_invstd (eval); the host helpers only for other ones.
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
    return {output, save_mean, save_invstd, at::zeros({mask_bytes}, x.options().dtype(at::kByte))};
  }

  // Every mask word, the spare one included, is written by the elementwise kernel: no zeroing needed.
  at::Tensor mask = at::empty({mask_bytes}, x.options().dtype(at::kByte));
  const std::pair<at::Tensor, at::Tensor> params = bn_act_params(weight, bias, C, acc, x.device());
  const at::Tensor s = block_end_scale(scale, acc);
  const bool has_residual = residual.has_value() && residual->defined();
  // The residual is read in place (any strides); its spatial offsets go to the device only when its planes are not
  // dense (a subsampled view), else the kernel uses s itself.
  BlockEndResidualLayout layout;
  at::Tensor offsets;
  if (has_residual) {
    layout = block_end_residual_layout(*residual);
    if (!layout.planes_dense) {
      const int64_t S = static_cast<int64_t>(layout.spatial_offset.size());
      at::Tensor host = at::empty({S}, at::TensorOptions().dtype(at::kLong));
      std::memcpy(host.mutable_data_ptr<int64_t>(), layout.spatial_offset.data(), sizeof(int64_t) * S);
      offsets = host.to(x.device());
    }
  }
  const gpu::BlockEndLaunch L =
      gpu::block_end_launch_config(g.N, g.C, g.S, g.channels_last, has_mask, num_sms(),
                                   block_end_occupancy(x.scalar_type(), g.channels_last, true));
  at::Tensor var = at::empty({C}, acc_opts);
  at::Tensor workspace = at::empty({gpu::block_end_forward_workspace_elems(L, training)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "block_end_forward_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
    const gpu::BlockEndResidualView<kscalar_t> r{
        has_residual ? reinterpret_cast<const kscalar_t*>(residual->const_data_ptr<scalar_t>()) : nullptr,
        has_residual ? layout.channels : 0, layout.stride_n, layout.stride_c,
        offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr};
    const gpu::BlockEndForwardBuffers<kscalar_t, acc_t> buffers{
        reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
        r,
        scale_view<acc_t>(s, C),
        params.first.const_data_ptr<acc_t>(),
        params.second.const_data_ptr<acc_t>(),
        save_mean.mutable_data_ptr<acc_t>(),
        save_invstd.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(),
        reinterpret_cast<kscalar_t*>(output.mutable_data_ptr<scalar_t>()),
        has_mask ? reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<uint8_t>()) : nullptr,
        workspace.mutable_data_ptr<acc_t>(),
        stat_vector(running_mean, device_running),
        stat_vector(running_var, device_running),
        momentum};
    gpu::block_end_forward_launch(L, buffers, training, static_cast<acc_t>(eps), act,
                                  static_cast<acc_t>(negative_slope), stream);
  });

  // Non-contiguous running statistics only: ATen ops on the same stream, so ordered after the kernels.
  if (training && !device_running) {
    bn_act_update_running_stats(running_mean, running_var, save_mean, var, g.M(), momentum);
  }
  return {output, save_mean, save_invstd, mask};
}

// Gradients (input, residual, scale, weight, bias) per output_mask; the others are empty [0] tensors (as the CPU op).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_end_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, const at::Tensor& mask, int64_t residual_channels, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 5> output_mask) {
  const int act = parse_block_end_activation(activation);
  const BnActGeom g = check_block_end_backward(grad_out, input, scale, weight, bias, save_mean, save_invstd, mask,
                                               residual_channels, act);
  const c10::cuda::CUDAGuard device_guard(input.device());

  const at::ScalarType acc = bn_act_acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const bool need_dx = output_mask[0], need_dr = output_mask[1], need_ds = output_mask[2],
             need_dw = output_mask[3], need_db = output_mask[4];
  const int64_t C = g.C;
  const at::Tensor x = bn_act_dense(input, g);
  const at::Tensor s = block_end_scale(scale, acc);
  // (not a structured binding: the dispatch lambda below captures them)
  const std::pair<at::Tensor, at::Tensor> params = bn_act_params(weight, bias, C, acc, x.device());
  const at::Tensor& w = params.first;
  const at::Tensor& b = params.second;
  at::Tensor dx = need_dx ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor dr = bn_act_empty_like_none(x);
  if (need_dr) {
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
    shape[1] = residual_channels;
    dr = at::empty(shape, input.options().memory_format(g.format));
  }
  // nc_sums: per (n, c) sum dz and sum dz * (x - mean), for the scale's gradient; c_sums: (grad_bias, grad_weight).
  // Zeros: with no values (numel == 0) every sum is 0, as on the CPU.
  at::Tensor nc_sums = need_ds ? at::zeros({2, g.N, C}, acc_opts) : at::Tensor();
  at::Tensor c_sums = (need_dw || need_db) ? at::zeros({2, C}, acc_opts) : at::Tensor();
  const int64_t dr_numel = need_dr ? dr.numel() : 0;

  if (g.numel() > 0 && (need_dx || (need_dr && dr_numel > 0) || need_ds || need_dw || need_db)) {
    const at::Tensor dy = bn_act_dense(grad_out, g);
    const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
    TORCH_INTERNAL_ASSERT(dy.is_contiguous(g.format) && x.is_contiguous(g.format) &&
                          (!need_dx || dx.is_contiguous(g.format)) && (!need_dr || dr.is_contiguous(g.format)));
    const bool has_mask = math::act_has_mask(act);
    // The kernels read the mask as 32-bit words: contiguous and 4-byte aligned (a view at an odd offset is copied).
    at::Tensor mask_words = mask.contiguous();
    if (has_mask && reinterpret_cast<uintptr_t>(mask_words.const_data_ptr()) % alignof(uint32_t) != 0) {
      mask_words = mask_words.clone();
    }
    const gpu::BlockEndLaunch L =
        gpu::block_end_launch_config(g.N, g.C, g.S, g.channels_last, has_mask, num_sms(),
                                     block_end_occupancy(x.scalar_type(), g.channels_last, false));
    at::Tensor workspace = at::empty({gpu::block_end_backward_workspace_elems(L)}, acc_opts);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

    FUSEDRES_DISPATCH_FLOATING(x.scalar_type(), "block_end_backward_cuda", [&] {
      TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
      acc_t* cs = c_sums.defined() ? c_sums.mutable_data_ptr<acc_t>() : nullptr;
      const gpu::BlockEndBackwardBuffers<kscalar_t, acc_t> buffers{
          reinterpret_cast<const kscalar_t*>(dy.const_data_ptr<scalar_t>()),
          reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()),
          has_mask ? reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<uint8_t>()) : nullptr,
          mean.const_data_ptr<acc_t>(),
          invstd.const_data_ptr<acc_t>(),
          w.const_data_ptr<acc_t>(),
          scale_view<acc_t>(s, C),
          need_dx ? reinterpret_cast<kscalar_t*>(dx.mutable_data_ptr<scalar_t>()) : nullptr,
          dr_numel > 0 ? reinterpret_cast<kscalar_t*>(dr.mutable_data_ptr<scalar_t>()) : nullptr,
          residual_channels,
          need_ds ? nc_sums.mutable_data_ptr<acc_t>() : nullptr,
          cs,
          cs != nullptr ? cs + C : nullptr,
          workspace.mutable_data_ptr<acc_t>()};
      gpu::block_end_backward_launch(L, buffers, training, act, static_cast<acc_t>(negative_slope), stream);
    });
  }
  // After the kernels (ATen ops on the same stream); the formulas and the copies are the CPU op's.
  auto [ds, dw, db] = block_end_param_grads(nc_sums, c_sums, w, b, save_invstd, s, weight, bias, need_ds, need_dw,
                                            need_db);
  return {dx, dr, ds, dw, db};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("block_end_forward", &fusedres::block_end_forward_cuda);
  m.impl("block_end_backward", &fusedres::block_end_backward_cuda);
}

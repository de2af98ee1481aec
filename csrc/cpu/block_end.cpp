// CPU backend of block_end_forward / block_end_backward: argument checks and allocation (host code shared with
// bn_act: csrc/block_end_host.cpp, csrc/bn_act_host.cpp), then the vectorised kernels of block_end_kernel_impl.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "block_end.h"
#include "cpu/block_end_kernel.h"
#include "cpu/kernel_args.h"

namespace fusedres {
namespace {

cpu::BlockEndScale scale_arg(const at::Tensor& s) {
  cpu::BlockEndScale out;
  out.data = s.defined() ? s.const_data_ptr() : nullptr;
  out.per_channel = s.defined() && s.dim() == 2;
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_end_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, c10::string_view activation, double negative_slope) {
  const int act = parse_block_end_activation(activation);
  const BnActGeom g = check_block_end_forward(input, residual, scale, weight, bias, running_mean, running_var,
                                              training, momentum, eps);
  const auto acc = bn_act_acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const at::Tensor x = bn_act_dense(input, g);
  at::Tensor y = at::empty_like(x, g.format);
  at::Tensor mask = cpu::mask_for(g, act, input.options());
  auto [w, b] = bn_act_params(weight, bias, g.C, acc, input.device());
  auto [mean, invstd, var] = cpu::stat_outputs(g, training, running_mean, running_var, eps, acc_opts);
  if (g.numel() == 0) return {y, mean, invstd, mask};

  const at::Tensor s = block_end_scale(scale, acc);
  const bool has_res = residual.has_value() && residual->defined();
  const BlockEndResidualLayout layout = has_res ? block_end_residual_layout(*residual) : BlockEndResidualLayout{};
  cpu::BlockEndForwardArgs args{};
  args.dtype = input.scalar_type();
  args.N = g.N;
  args.C = g.C;
  args.S = g.S;
  args.channels_last = g.channels_last;
  args.training = training;
  args.act = act;
  args.negative_slope = negative_slope;
  args.eps = eps;
  args.x = x.const_data_ptr();
  if (has_res) {
    args.residual = {residual->const_data_ptr(), layout.channels, layout.stride_n, layout.stride_c,
                     layout.spatial_offset.data(), layout.planes_dense};
  }
  args.scale = scale_arg(s);
  args.weight = w.const_data_ptr();
  args.bias = b.const_data_ptr();
  args.y = y.mutable_data_ptr();
  args.mask = math::act_has_mask(act) ? mask.mutable_data_ptr<uint8_t>() : nullptr;
  args.mean = mean.mutable_data_ptr();
  args.invstd = invstd.mutable_data_ptr();
  args.var = training ? var.mutable_data_ptr() : nullptr;
  cpu::block_end_forward_dispatch()(args);

  if (training) bn_act_update_running_stats(running_mean, running_var, mean, var, g.M(), momentum);
  return {y, mean, invstd, mask};
}

// Gradients (input, residual, scale, weight, bias) per output_mask; the others are empty [0] tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_end_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, const at::Tensor& mask, int64_t residual_channels, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 5> output_mask) {
  const int act = parse_block_end_activation(activation);
  const BnActGeom g = check_block_end_backward(grad_out, input, scale, weight, bias, save_mean, save_invstd, mask,
                                               residual_channels, act);
  const auto acc = bn_act_acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const bool need_dx = output_mask[0], need_dr = output_mask[1], need_ds = output_mask[2],
             need_dw = output_mask[3], need_db = output_mask[4];
  const at::Tensor x = bn_act_dense(input, g);
  const at::Tensor s = block_end_scale(scale, acc);
  auto [w, b] = bn_act_params(weight, bias, g.C, acc, input.device());
  at::Tensor dx = need_dx ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor dr = bn_act_empty_like_none(x);
  if (need_dr) {
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
    shape[1] = residual_channels;
    dr = at::empty(shape, input.options().memory_format(g.format));
  }
  // nc_sums: per (n, c) sum dz and sum dz * (x - mean), for the scale's gradient; c_sums: (grad_bias, grad_weight).
  at::Tensor nc_sums = need_ds ? at::zeros({2, g.N, g.C}, acc_opts) : at::Tensor();
  at::Tensor c_sums = (need_dw || need_db) ? at::zeros({2, g.C}, acc_opts) : at::Tensor();
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();

  if (g.numel() > 0 && (need_dx || need_dr || need_ds || need_dw || need_db)) {
    const at::Tensor dy = bn_act_dense(grad_out, g);
    cpu::BlockEndBackwardArgs args{};
    args.dtype = input.scalar_type();
    args.N = g.N;
    args.C = g.C;
    args.S = g.S;
    args.channels_last = g.channels_last;
    args.training = training;
    args.act = act;
    args.negative_slope = negative_slope;
    args.dy = dy.const_data_ptr();
    args.x = x.const_data_ptr();
    args.mask = math::act_has_mask(act) ? mask.const_data_ptr<uint8_t>() : nullptr;
    args.scale = scale_arg(s);
    args.mean = mean.const_data_ptr();
    args.invstd = invstd.const_data_ptr();
    args.weight = w.const_data_ptr();
    args.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
    args.dresidual = need_dr && residual_channels > 0 ? dr.mutable_data_ptr() : nullptr;
    args.residual_channels = residual_channels;
    args.nc_sums = need_ds ? nc_sums.mutable_data_ptr() : nullptr;
    args.c_sums = c_sums.defined() ? c_sums.mutable_data_ptr() : nullptr;
    cpu::block_end_backward_dispatch()(args);
  }
  auto [ds, dw, db] =
      block_end_param_grads(nc_sums, c_sums, w, b, invstd, s, weight, bias, need_ds, need_dw, need_db);
  return {dx, dr, ds, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("block_end_forward", &block_end_forward_cpu);
  m.impl("block_end_backward", &block_end_backward_cpu);
}

}  // namespace fusedres

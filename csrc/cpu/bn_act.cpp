// CPU backend of bn_act_forward / bn_act_backward: argument checks and allocation (shared host code in
// bn_act_host.cpp), then the vectorised kernels of bn_act_kernel_impl.h for this machine's ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bn_act.h"
#include "cpu/bn_act_kernel.h"
#include "cpu/kernel_args.h"

namespace fusedres {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double negative_slope) {
  const int act = parse_activation(activation);
  const BnActGeom g =
      check_bn_act_forward(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act);
  const auto acc = bn_act_acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const at::Tensor x = bn_act_dense(input, g);
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor r = has_res ? bn_act_dense(*residual, g) : at::Tensor();
  at::Tensor y = at::empty_like(x, g.format);
  at::Tensor mask = cpu::mask_for(g, act, input.options());
  auto [w, b] = bn_act_params(weight, bias, g.C, acc, input.device());
  auto [mean, invstd, var] = cpu::stat_outputs(g, training, running_mean, running_var, eps, acc_opts);
  if (g.numel() == 0) return {y, mean, invstd, mask};

  cpu::BnActForwardArgs args = cpu::forward_args(g, input.scalar_type(), training, act, negative_slope, eps);
  args.x = x.const_data_ptr();
  args.residual = has_res ? r.const_data_ptr() : nullptr;
  args.y = y.mutable_data_ptr();
  args.mask = math::act_has_mask(act) ? mask.mutable_data_ptr<uint8_t>() : nullptr;
  args.weight = w.const_data_ptr();
  args.bias = b.const_data_ptr();
  args.mean = mean.mutable_data_ptr();
  args.invstd = invstd.mutable_data_ptr();
  args.var = training ? var.mutable_data_ptr() : nullptr;
  cpu::bn_act_forward_dispatch()(args);

  if (training) bn_act_update_running_stats(running_mean, running_var, mean, var, g.M(), momentum);
  return {y, mean, invstd, mask};
}

// The backward kernel arguments shared by bn_act_backward and its split form (training; callers set the rest).
cpu::BnActBackwardArgs backward_tensor_args(const BnActGeom& g, const at::Tensor& input, const at::Tensor& dy,
                                     const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                     const at::Tensor& w, const at::Tensor& mask, int act, double negative_slope) {
  cpu::BnActBackwardArgs args = cpu::backward_args(g, input.scalar_type(), true, act, negative_slope);
  args.dy = dy.const_data_ptr();
  args.x = x.const_data_ptr();
  args.mask = math::act_has_mask(act) ? mask.const_data_ptr<uint8_t>() : nullptr;
  args.mean = mean.const_data_ptr();
  args.invstd = invstd.const_data_ptr();
  args.weight = w.const_data_ptr();
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  const int act = parse_activation(activation);
  const BnActGeom g =
      check_bn_act_backward(grad_out, input, weight, save_mean, save_invstd, mask, act, bias, residual);
  const auto acc = bn_act_acc_type(input.scalar_type());
  const bool need_dx = output_mask[0], need_dr = output_mask[1], need_dw = output_mask[2], need_db = output_mask[3];
  const bool reduce = need_dw || need_db || (training && need_dx);
  const at::Tensor dy = bn_act_dense(grad_out, g);
  const at::Tensor x = bn_act_dense(input, g);
  const bool has_w = weight.has_value() && weight->defined();
  const at::Tensor w = has_w ? weight->to(acc).contiguous() : at::ones({g.C}, input.options().dtype(acc));
  at::Tensor dx = need_dx ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor dr = need_dr ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor sum_dz = at::zeros({reduce ? g.C : 0}, input.options().dtype(acc));
  at::Tensor sum_dz_xhat = at::zeros({reduce ? g.C : 0}, input.options().dtype(acc));

  if (g.numel() > 0 && (reduce || need_dx || need_dr)) {
    const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
    cpu::BnActBackwardArgs args = backward_tensor_args(g, input, dy, x, mean, invstd, w, mask, act, negative_slope);
    // SiLU recomputes the pre-activation: bias (zeros when absent) and the residual, dense like x.
    at::Tensor b, r;
    if (math::act_needs_z(act)) {
      b = bn_act_params(std::nullopt, bias, g.C, acc, input.device()).second;
      if (residual.has_value() && residual->defined()) r = bn_act_dense(*residual, g);
      args.bias = b.const_data_ptr();
      args.residual = r.defined() ? r.const_data_ptr() : nullptr;
    }
    args.training = training;
    args.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
    args.dresidual = need_dr ? dr.mutable_data_ptr() : nullptr;
    args.sum_dz = reduce ? sum_dz.mutable_data_ptr() : nullptr;
    args.sum_dz_xhat = reduce ? sum_dz_xhat.mutable_data_ptr() : nullptr;
    cpu::bn_act_backward_dispatch()(args);
  }
  const auto param_dtype = has_w ? weight->scalar_type() : acc;
  at::Tensor dw = need_dw ? sum_dz_xhat.to(param_dtype) : bn_act_empty_like_none(w);
  at::Tensor db = need_db ? sum_dz.to(param_dtype) : bn_act_empty_like_none(w);
  return {dx, dr, dw, db};
}

// ---- the building blocks (statistics / normalise / backward reduce / backward elementwise) ----

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  const BnActGeom g = check_bn_stats(input);
  const auto acc_opts = input.options().dtype(bn_act_acc_type(input.scalar_type()));
  at::Tensor mean = at::zeros({g.C}, acc_opts), var = at::zeros({g.C}, acc_opts);
  if (g.numel() == 0) return {mean, var};  // no values: zeros (a rank with an empty batch contributes count 0)
  const at::Tensor x = bn_act_dense(input, g);
  const at::Tensor invstd = at::empty({g.C}, acc_opts);  // written by the kernel, not returned
  const auto [w, b] = bn_act_params(std::nullopt, std::nullopt, g.C, acc_opts.dtype().toScalarType(), input.device());
  // eps only enters the unused invstd
  cpu::BnActForwardArgs args = cpu::forward_args(g, input.scalar_type(), true, math::kIdentity, 0.0, 1.0);
  args.x = x.const_data_ptr();
  args.y = nullptr;  // statistics only
  args.weight = w.const_data_ptr();
  args.bias = b.const_data_ptr();
  args.mean = mean.mutable_data_ptr();
  args.invstd = invstd.mutable_data_ptr();
  args.var = var.mutable_data_ptr();
  cpu::bn_act_forward_dispatch()(args);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_act_elemt_cpu(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                    const at::Tensor& invstd, c10::string_view activation,
                                                    double negative_slope) {
  const int act = parse_activation(activation);
  const BnActGeom g = check_bn_act_elemt(input, residual, weight, bias, mean, invstd, act);
  const at::Tensor x = bn_act_dense(input, g);
  const bool has_res = residual.has_value() && residual->defined();
  const at::Tensor r = has_res ? bn_act_dense(*residual, g) : at::Tensor();
  at::Tensor y = at::empty_like(x, g.format);
  at::Tensor mask = cpu::mask_for(g, act, input.options());
  if (g.numel() == 0) return {y, mask};
  const auto [w, b] = bn_act_params(weight, bias, g.C, bn_act_acc_type(input.scalar_type()), input.device());
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  // training = false: the normalise pass with the given statistics
  cpu::BnActForwardArgs args = cpu::forward_args(g, input.scalar_type(), false, act, negative_slope, 0.0);
  args.x = x.const_data_ptr();
  args.residual = has_res ? r.const_data_ptr() : nullptr;
  args.y = y.mutable_data_ptr();
  args.mask = math::act_has_mask(act) ? mask.mutable_data_ptr<uint8_t>() : nullptr;
  args.weight = w.const_data_ptr();
  args.bias = b.const_data_ptr();
  args.mean = const_cast<void*>(m.const_data_ptr());     // read only in this mode
  args.invstd = const_cast<void*>(is.const_data_ptr());  // read only in this mode
  cpu::bn_act_forward_dispatch()(args);
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& save_mean,
                                                              const at::Tensor& save_invstd, const at::Tensor& mask,
                                                              c10::string_view activation, double negative_slope) {
  const int act = parse_mask_activation(activation, "bn_act_backward_reduce");
  const BnActGeom g = check_bn_act_backward(grad_out, input, std::nullopt, save_mean, save_invstd, mask, act);
  const auto acc_opts = input.options().dtype(bn_act_acc_type(input.scalar_type()));
  at::Tensor sum_dz = at::zeros({g.C}, acc_opts), sum_dz_xhat = at::zeros({g.C}, acc_opts);
  if (g.numel() == 0) return {sum_dz, sum_dz_xhat};
  const at::Tensor dy = bn_act_dense(grad_out, g), x = bn_act_dense(input, g);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor w = at::ones({g.C}, acc_opts);
  cpu::BnActBackwardArgs args = backward_tensor_args(g, input, dy, x, mean, invstd, w, mask, act, negative_slope);
  args.sum_dz = sum_dz.mutable_data_ptr();
  args.sum_dz_xhat = sum_dz_xhat.mutable_data_ptr();
  cpu::bn_act_backward_dispatch()(args);
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, const at::Tensor& sum_dz,
    const at::Tensor& sum_dz_xhat, int64_t count, c10::string_view activation, double negative_slope,
    std::array<bool, 2> output_mask) {
  const int act = parse_mask_activation(activation, "bn_act_backward_elemt");
  const BnActGeom g = check_bn_act_backward_elemt(grad_out, input, weight, save_mean, save_invstd, mask, sum_dz,
                                                  sum_dz_xhat, count, act);
  const auto acc = bn_act_acc_type(input.scalar_type());
  const bool need_dx = output_mask[0], need_dr = output_mask[1];
  const at::Tensor x = bn_act_dense(input, g);
  at::Tensor dx = need_dx ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  at::Tensor dr = need_dr ? at::empty_like(x, g.format) : bn_act_empty_like_none(x);
  if (g.numel() == 0 || !(need_dx || need_dr)) return {dx, dr};
  const at::Tensor dy = bn_act_dense(grad_out, g);
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  const at::Tensor w = (weight.has_value() && weight->defined()) ? weight->to(acc).contiguous()
                                                                 : at::ones({g.C}, input.options().dtype(acc));
  const at::Tensor sdz = sum_dz.contiguous(), sdzx = sum_dz_xhat.contiguous();
  cpu::BnActBackwardArgs args = backward_tensor_args(g, input, dy, x, mean, invstd, w, mask, act, negative_slope);
  args.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
  args.dresidual = need_dr ? dr.mutable_data_ptr() : nullptr;
  args.sum_dz = const_cast<void*>(sdz.const_data_ptr());  // inputs: sums_given
  args.sum_dz_xhat = const_cast<void*>(sdzx.const_data_ptr());
  args.sums_given = true;
  args.count = count;
  cpu::bn_act_backward_dispatch()(args);
  return {dx, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_act_elemt", &bn_act_elemt_cpu);
  m.impl("bn_act_backward_reduce", &bn_act_backward_reduce_cpu);
  m.impl("bn_act_backward_elemt", &bn_act_backward_elemt_cpu);
}

}  // namespace fusedres

// CPU backend of bn_act_forward / bn_act_backward: argument checks and allocation (shared host code in
// bn_act_host.cpp), then the vectorised kernels of bn_act_kernel_impl.h for this machine's ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bn_act.h"
#include "cpu/bn_act_kernel.h"

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
  at::Tensor mask = math::act_has_mask(act) ? at::zeros({math::mask_bytes(g.numel())}, input.options().dtype(at::kByte))
                                            : at::empty({0}, input.options().dtype(at::kByte));
  auto [w, b] = bn_act_params(weight, bias, g.C, acc, input.device());
  at::Tensor mean, invstd, var;
  if (training) {
    mean = at::zeros({g.C}, acc_opts);
    invstd = at::zeros({g.C}, acc_opts);
    var = at::zeros({g.C}, acc_opts);
  } else {
    std::tie(mean, invstd) = bn_act_eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (g.numel() == 0) return {y, mean, invstd, mask};

  cpu::BnActForwardArgs args{};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, bool training,
    c10::string_view activation, double negative_slope, std::array<bool, 4> output_mask) {
  const int act = parse_activation(activation);
  const BnActGeom g = check_bn_act_backward(grad_out, input, weight, save_mean, save_invstd, mask, act);
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
    cpu::BnActBackwardArgs args{};
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
    args.mean = mean.const_data_ptr();
    args.invstd = invstd.const_data_ptr();
    args.weight = w.const_data_ptr();
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

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace fusedres

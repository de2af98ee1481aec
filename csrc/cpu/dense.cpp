// CPU backend of dense_bn_act_forward / dense_bn_act_backward: each input is read where it lies and its channel
// slice of the wide output (grad_out) is written (read) through a leading dimension; the concatenation is never
// built. NCHW: the bn_act kernels run once per input (an input's channels are whole planes of the output).
// channels_last: one pass over row blocks covers all inputs (an output row holds every input's channels).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/bn_act_kernel.h"
#include "cpu/kernel_args.h"
#include "dense.h"

namespace fusedres {
namespace {

std::vector<int64_t> wide_sizes(const at::Tensor& x0, int64_t C) {
  std::vector<int64_t> sizes(x0.sizes().begin(), x0.sizes().end());
  sizes[1] = C;
  return sizes;
}

void* at_channel_mut(const at::Tensor& t, int64_t c) {
  return static_cast<char*>(t.mutable_data_ptr()) + c * t.element_size();
}

const void* at_channel_const(const at::Tensor& t, int64_t c) {
  return static_cast<const char*>(t.const_data_ptr()) + c * t.element_size();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bn_act_forward_cpu(
    at::TensorList inputs, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& batch_mean, const std::optional<at::Tensor>& batch_var, bool training,
    double momentum, double eps, c10::string_view activation, double negative_slope) {
  const int act = parse_basic_activation(activation, "dense_bn_act_forward");
  const DenseGeom g = check_dense_forward(inputs, weight, bias, running_mean, running_var, batch_mean, batch_var,
                                          training, momentum, eps, act);
  const at::Tensor& x0 = inputs[0];
  const auto acc = bn_act_acc_type(x0.scalar_type());
  const auto acc_opts = x0.options().dtype(acc);
  const bool given = batch_mean.has_value() && batch_mean->defined();
  const bool has_mask = math::act_has_mask(act);
  at::Tensor y = at::empty(wide_sizes(x0, g.C), x0.options().memory_format(g.format));
  at::Tensor mask = at::zeros({g.mask_offsets.back()}, x0.options().dtype(at::kByte));
  at::Tensor mean, invstd, var;
  if (training && given) {
    // Precomputed statistics (a copy: outputs never alias inputs); invstd as the kernels compute it, in double.
    mean = batch_mean->clone();
    var = *batch_var;
    invstd = (batch_var->to(at::kDouble) + eps).rsqrt().to(acc);
  } else if (training) {
    mean = at::zeros({g.C}, acc_opts);
    invstd = at::zeros({g.C}, acc_opts);
    var = at::zeros({g.C}, acc_opts);
  } else {
    std::tie(mean, invstd) = bn_act_eval_stats(*running_mean, *running_var, eps, acc);
  }
  if (y.numel() == 0) return {y, mean, invstd, mask};

  const std::vector<at::Tensor> xs = dense_inputs(inputs, g);
  const auto [w, b] = bn_act_params(weight, bias, g.C, acc, x0.device());
  const bool reduce_here = training && !given;
  std::vector<cpu::BnActForwardArgs> parts;
  for (size_t j = 0; j < xs.size(); ++j) {
    if (xs[j].numel() == 0) continue;
    const int64_t c0 = g.offsets[j];
    // training = reduce_here; else the normalise pass with the given / running statistics
    cpu::BnActForwardArgs args =
        cpu::forward_args(g.input_geom(j), x0.scalar_type(), reduce_here, act, negative_slope, eps);
    args.x = xs[j].const_data_ptr();
    args.y = static_cast<char*>(y.mutable_data_ptr()) + g.output_offset(j) * y.element_size();
    args.y_ld = g.output_ld();
    args.mask = has_mask ? mask.mutable_data_ptr<uint8_t>() + g.mask_offsets[j] : nullptr;
    args.weight = at_channel_const(w, c0);
    args.bias = at_channel_const(b, c0);
    args.mean = at_channel_mut(mean, c0);
    args.invstd = at_channel_mut(invstd, c0);
    args.var = reduce_here ? at_channel_mut(var, c0) : nullptr;
    args.stream_bytes = static_cast<int64_t>(y.nbytes());  // the inputs write one output
    parts.push_back(args);
  }
  if (g.channels_last) {
    cpu::dense_forward_cl_dispatch()(parts.data(), static_cast<int64_t>(parts.size()));
  } else {
    for (const cpu::BnActForwardArgs& args : parts) cpu::bn_act_forward_dispatch()(args);
  }
  if (training) bn_act_update_running_stats(running_mean, running_var, mean, var, g.M(), momentum);
  return {y, mean, invstd, mask};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dense_bn_act_backward_cpu(
    const at::Tensor& grad_out, at::TensorList inputs, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, bool training,
    c10::string_view activation, double negative_slope, c10::List<bool> input_mask_list,
    std::array<bool, 2> param_mask) {
  const int act = parse_basic_activation(activation, "dense_bn_act_backward");
  const std::vector<bool> input_mask(input_mask_list.begin(), input_mask_list.end());
  const DenseGeom g = check_dense_backward(grad_out, inputs, weight, save_mean, save_invstd, mask, act, input_mask);
  const at::Tensor& x0 = inputs[0];
  const auto acc = bn_act_acc_type(x0.scalar_type());
  const auto acc_opts = x0.options().dtype(acc);
  const bool need_dw = param_mask[0], need_db = param_mask[1];
  const bool has_w = weight.has_value() && weight->defined();
  const at::Tensor w = has_w ? weight->to(acc).contiguous() : at::ones({g.C}, acc_opts);
  const bool any_sums = need_dw || need_db || (training && std::find(input_mask.begin(), input_mask.end(), true) !=
                                                                   input_mask.end());
  at::Tensor sum_dz = at::zeros({any_sums ? g.C : 0}, acc_opts);
  at::Tensor sum_dz_xhat = at::zeros({any_sums ? g.C : 0}, acc_opts);
  std::vector<at::Tensor> grads;
  grads.reserve(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) {
    grads.push_back(input_mask[j] ? at::empty(inputs[j].sizes(), x0.options().memory_format(g.format))
                                  : bn_act_empty_like_none(x0));
  }
  if (grad_out.numel() > 0) {
    int64_t dx_bytes = 0;  // the input gradients written, all together
    for (const at::Tensor& gr : grads) dx_bytes += static_cast<int64_t>(gr.nbytes());
    const std::vector<at::Tensor> xs = dense_inputs(inputs, g);
    const at::Tensor dy = grad_out.contiguous(g.format);
    const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
    std::vector<cpu::BnActBackwardArgs> parts;
    for (size_t j = 0; j < xs.size(); ++j) {
      // This input's channels need the sums for the parameter gradients or for its own training-form dx.
      const bool reduce = need_dw || need_db || (training && input_mask[j]);
      if (xs[j].numel() == 0 || !(reduce || input_mask[j])) continue;
      const int64_t c0 = g.offsets[j];
      cpu::BnActBackwardArgs args =
          cpu::backward_args(g.input_geom(j), x0.scalar_type(), training, act, negative_slope);
      args.dy = static_cast<const char*>(dy.const_data_ptr()) + g.output_offset(j) * dy.element_size();
      args.dy_ld = g.output_ld();
      args.x = xs[j].const_data_ptr();
      args.mask = math::act_has_mask(act) ? mask.const_data_ptr<uint8_t>() + g.mask_offsets[j] : nullptr;
      args.mean = at_channel_const(mean, c0);
      args.invstd = at_channel_const(invstd, c0);
      args.weight = at_channel_const(w, c0);
      args.dx = input_mask[j] ? grads[j].mutable_data_ptr() : nullptr;
      args.sum_dz = reduce ? at_channel_mut(sum_dz, c0) : nullptr;
      args.sum_dz_xhat = reduce ? at_channel_mut(sum_dz_xhat, c0) : nullptr;
      args.stream_bytes = dx_bytes;
      parts.push_back(args);
    }
    if (g.channels_last) {
      cpu::dense_backward_cl_dispatch()(parts.data(), static_cast<int64_t>(parts.size()));
    } else {
      for (const cpu::BnActBackwardArgs& args : parts) cpu::bn_act_backward_dispatch()(args);
    }
  }
  const auto param_dtype = has_w ? weight->scalar_type() : acc;
  at::Tensor dw = need_dw ? sum_dz_xhat.to(param_dtype) : at::empty({0}, acc_opts);
  at::Tensor db = need_db ? sum_dz.to(param_dtype) : at::empty({0}, acc_opts);
  return {grads, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CPU, m) {
  m.impl("dense_bn_act_forward", &dense_bn_act_forward_cpu);
  m.impl("dense_bn_act_backward", &dense_bn_act_backward_cpu);
}

}  // namespace fusedres

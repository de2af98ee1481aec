// fusedres::bn_act: bn_act_forward + bn_act_backward as one differentiable op, with its autograd in C++
// (why: csrc/autograd_common.h). It saves input, weight, save_mean, save_invstd and the 1-bit mask; for SiLU also
// bias and residual (references to inputs: its backward recomputes the pre-activation). Works for every backend
// that implements bn_act_forward / bn_act_backward (the ops are called through the dispatcher below the autograd
// key).
#include <torch/library.h>

#include <string>

#include "autograd_common.h"

namespace fusedres {
namespace {

using namespace fusedres::autograd;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum, double eps,
    c10::string_view activation, double negative_slope) {
  static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
      double, double, c10::string_view, double)>("fusedres::bn_act_forward");
  return op.call(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                 negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const OptTensor& weight, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, const at::Tensor& mask, bool training, c10::string_view activation,
    double negative_slope, std::array<bool, 4> output_mask, const OptTensor& bias, const OptTensor& residual) {
  static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      bool, c10::string_view, double, std::array<bool, 4>, const OptTensor&, const OptTensor&)>(
      "fusedres::bn_act_backward");
  return op.call(grad_out, input, weight, save_mean, save_invstd, mask, training, activation, negative_slope,
                 output_mask, bias, residual);
}

constexpr const char* kDoubleBackward = "fusedres.batch_norm_act does not support double backward";

class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& residual,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training, double momentum, double eps,
                            const std::string& activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, mask] = call_forward(input, residual, weight, bias, running_mean,
                                                               running_var, training, momentum, eps, activation,
                                                               negative_slope);
    // SiLU's backward recomputes z from input, statistics, weight, bias and residual (docs/design.md section 1):
    // references to the caller's tensors, no new memory unless the caller frees them.
    const bool needs_z = activation == "silu";
    ctx->save_for_backward({input, defined(weight) ? *weight : at::Tensor(), save_mean, save_invstd, mask,
                            needs_z && defined(bias) ? *bias : at::Tensor(),
                            needs_z && defined(residual) ? *residual : at::Tensor()});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    // Autograd edges exist only for the tensors that were given: their positions among the edges.
    ctx->saved_data["residual_edge"] = defined(residual) ? int64_t(1) : int64_t(-1);
    save_param_edges(ctx, defined(residual) ? 2 : 1, weight, bias);
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kNumArgs = 11;  // forward's arguments after ctx
    variable_list grads(kNumArgs);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const bool need_input = ctx->needs_input_grad(0), need_residual = needs_edge(ctx, "residual_edge"),
               need_weight = needs_edge(ctx, "weight_edge"), need_bias = needs_edge(ctx, "bias_edge");
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    // For identity d(residual) is grad_out itself: no need to have the kernel copy it.
    const bool residual_from_kernel = need_residual && activation != "identity";
    const std::array<bool, 4> output_mask{need_input, residual_from_kernel, need_weight, need_bias};
    at::Tensor gi, gr, gw, gb;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    if (need_input || residual_from_kernel || need_weight || need_bias) {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::NoGradGuard no_grad;
      std::tie(gi, gr, gw, gb) = call_backward(grad_out, input, opt(weight), saved[2], saved[3], saved[4],
                                               ctx->saved_data["training"].toBool(), activation,
                                               ctx->saved_data["negative_slope"].toDouble(), output_mask,
                                               opt(saved[5]), opt(saved[6]));
    }
    grads[0] = need_input ? gi : at::Tensor();
    grads[1] = residual_from_kernel ? gr : (need_residual ? grad_out : at::Tensor());
    grads[2] = need_weight ? gw.to(weight.scalar_type()) : at::Tensor();
    grads[3] = need_bias ? gb.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt())) : at::Tensor();
    refuse_double_backward(grads, {input, grad_out, weight}, kDoubleBackward);
    return grads;
  }
};

at::Tensor bn_act_autograd(const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
                           const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                           bool training, double momentum, double eps, c10::string_view activation,
                           double negative_slope) {
  return BnActFunction::apply(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                              std::string(activation.data(), activation.size()), negative_slope);
}

// Below autograd (no gradient wanted, or inference tensors): the forward op's output.
at::Tensor bn_act_no_grad(const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
                          const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                          bool training, double momentum, double eps, c10::string_view activation,
                          double negative_slope) {
  return std::get<0>(call_forward(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                                  activation, negative_slope));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) { m.impl("bn_act", &bn_act_autograd); }
TORCH_LIBRARY_IMPL(fusedres, CompositeExplicitAutograd, m) { m.impl("bn_act", &bn_act_no_grad); }

}  // namespace fusedres

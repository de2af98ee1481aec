// fusedres::block_end: block_end_forward + block_end_backward as one differentiable op, with its autograd in C++
// (why: csrc/autograd_common.h). It saves input, weight, bias, the scale the backward uses (backward_scale if given,
// else scale), save_mean, save_invstd and the 1-bit mask (docs/design.md section 10).
#include <torch/library.h>

#include <string>

#include "autograd_common.h"

namespace fusedres {
namespace {

using namespace fusedres::autograd;

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult call_forward(const at::Tensor& input, const OptTensor& residual, const OptTensor& scale,
                           const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                           const OptTensor& running_var, bool training, double momentum, double eps,
                           c10::string_view activation, double negative_slope) {
  static auto op = typed_op<ForwardResult(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&, const OptTensor&, bool, double, double,
                                          c10::string_view, double)>("fusedres::block_end_forward");
  return op.call(input, residual, scale, weight, bias, running_mean, running_var, training, momentum, eps,
                 activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const OptTensor& scale, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask,
    int64_t residual_channels, bool training, c10::string_view activation, double negative_slope,
    std::array<bool, 5> output_mask) {
  static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, int64_t, bool, c10::string_view, double, std::array<bool, 5>)>(
      "fusedres::block_end_backward");
  return op.call(grad_out, input, scale, weight, bias, save_mean, save_invstd, mask, residual_channels, training,
                 activation, negative_slope, output_mask);
}

constexpr const char* kDoubleBackward = "fusedres.batch_norm_act (block end) does not support double backward";

class BlockEndFunction : public torch::autograd::Function<BlockEndFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& residual,
                            const OptTensor& scale, const OptTensor& backward_scale, const OptTensor& weight,
                            const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                            bool training, double momentum, double eps, const std::string& activation,
                            double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, mask] = call_forward(input, residual, scale, weight, bias, running_mean,
                                                               running_var, training, momentum, eps, activation,
                                                               negative_slope);
    const OptTensor& grad_scale = defined(backward_scale) ? backward_scale : scale;
    ctx->save_for_backward({input, defined(weight) ? *weight : at::Tensor(), defined(bias) ? *bias : at::Tensor(),
                            defined(grad_scale) ? *grad_scale : at::Tensor(), save_mean, save_invstd, mask});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["residual_channels"] = defined(residual) ? residual->size(1) : int64_t(0);
    ctx->saved_data["scale_dtype"] = defined(scale) ? static_cast<int64_t>(scale->scalar_type()) : int64_t(-1);
    // Autograd edges exist only for the tensors that were given: their positions among the edges.
    int64_t next = 1;
    ctx->saved_data["residual_edge"] = defined(residual) ? next++ : int64_t(-1);
    ctx->saved_data["scale_edge"] = defined(scale) ? next++ : int64_t(-1);
    if (defined(backward_scale)) ++next;  // never differentiated (Shake-Shake's beta is a random draw)
    save_param_edges(ctx, next, weight, bias);
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t kNumArgs = 13;  // forward's arguments after ctx
    variable_list grads(kNumArgs);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const bool need_input = ctx->needs_input_grad(0), need_residual = needs_edge(ctx, "residual_edge"),
               need_scale = needs_edge(ctx, "scale_edge"), need_weight = needs_edge(ctx, "weight_edge"),
               need_bias = needs_edge(ctx, "bias_edge");
    const std::array<bool, 5> output_mask{need_input, need_residual, need_scale, need_weight, need_bias};
    if (!(need_input || need_residual || need_scale || need_weight || need_bias)) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    at::Tensor gi, gr, gs, gw, gb;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::NoGradGuard no_grad;
      std::tie(gi, gr, gs, gw, gb) =
          call_backward(grad_out, input, opt(saved[3]), opt(saved[1]), opt(saved[2]), saved[4], saved[5], saved[6],
                        ctx->saved_data["residual_channels"].toInt(), ctx->saved_data["training"].toBool(),
                        ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble(),
                        output_mask);
    }
    grads[0] = need_input ? gi : at::Tensor();
    grads[1] = need_residual ? gr : at::Tensor();
    grads[2] = need_scale ? gs.to(static_cast<at::ScalarType>(ctx->saved_data["scale_dtype"].toInt())) : at::Tensor();
    grads[4] = need_weight ? gw : at::Tensor();
    grads[5] = need_bias ? gb : at::Tensor();
    refuse_double_backward(grads, {input, grad_out, saved[1]}, kDoubleBackward);
    return grads;
  }
};

at::Tensor block_end_autograd(const at::Tensor& input, const OptTensor& residual, const OptTensor& scale,
                              const OptTensor& backward_scale, const OptTensor& weight, const OptTensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var, bool training,
                              double momentum, double eps, c10::string_view activation, double negative_slope) {
  return BlockEndFunction::apply(input, residual, scale, backward_scale, weight, bias, running_mean, running_var,
                                 training, momentum, eps, std::string(activation.data(), activation.size()),
                                 negative_slope);
}

// Below autograd (no gradient wanted, or inference tensors): the forward op's output.
at::Tensor block_end_no_grad(const at::Tensor& input, const OptTensor& residual, const OptTensor& scale,
                             const OptTensor& backward_scale, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& running_mean, const OptTensor& running_var, bool training,
                             double momentum, double eps, c10::string_view activation, double negative_slope) {
  (void)backward_scale;
  return std::get<0>(call_forward(input, residual, scale, weight, bias, running_mean, running_var, training,
                                  momentum, eps, activation, negative_slope));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) { m.impl("block_end", &block_end_autograd); }
TORCH_LIBRARY_IMPL(fusedres, CompositeExplicitAutograd, m) { m.impl("block_end", &block_end_no_grad); }

}  // namespace fusedres

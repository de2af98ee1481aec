// fusedres::dense_bn_act: dense_bn_act_forward's output as one differentiable op, with its autograd in C++ (why:
// csrc/autograd_common.h). It saves weight, save_mean, save_invstd, the 1-bit mask and the inputs (references to
// the caller's feature maps), and calls dense_bn_act_forward / _backward through the dispatcher below the
// autograd key, as the Python Function of fusedres/ops/dense.py does under torch.compile.
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

#include "autograd_common.h"

namespace fusedres {
namespace {

using namespace fusedres::autograd;

constexpr const char* kDoubleBackward = "fusedres.dense_batch_norm_act does not support double backward";

// The arguments after `inputs`, in the schema's order.
constexpr size_t kNumArgs = 11;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_forward(
    at::TensorList inputs, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& batch_mean, const OptTensor& batch_var, bool training,
    double momentum, double eps, c10::string_view activation, double negative_slope) {
  static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      at::TensorList, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, bool, double, double, c10::string_view, double)>("fusedres::dense_bn_act_forward");
  return op.call(inputs, weight, bias, running_mean, running_var, batch_mean, batch_var, training, momentum, eps,
                 activation, negative_slope);
}

class DenseBnActFunction : public torch::autograd::Function<DenseBnActFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, const OptTensor& weight,
                            const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                            const OptTensor& batch_mean, const OptTensor& batch_var, bool training, double momentum,
                            double eps, const std::string& activation, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, mask] = call_forward(inputs, weight, bias, running_mean, running_var,
                                                               batch_mean, batch_var, training, momentum, eps,
                                                               activation, negative_slope);
    variable_list to_save{defined(weight) ? *weight : at::Tensor(), save_mean, save_invstd, mask};
    to_save.insert(to_save.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    save_param_edges(ctx, static_cast<int64_t>(inputs.size()), weight, bias);  // edges: the inputs', then these
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const variable_list inputs(saved.begin() + 4, saved.end());
    const size_t n = inputs.size();
    variable_list grads(n + kNumArgs);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const std::array<bool, 2> param_mask{needs_edge(ctx, "weight_edge"), needs_edge(ctx, "bias_edge")};
    c10::List<bool> input_mask;
    bool any = param_mask[0] || param_mask[1];
    for (size_t j = 0; j < n; ++j) {
      input_mask.push_back(ctx->needs_input_grad(j));
      any = any || ctx->needs_input_grad(j);
    }
    if (!any) return grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::NoGradGuard no_grad;
      static auto op = typed_op<std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
          const at::Tensor&, at::TensorList, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          bool, c10::string_view, double, c10::List<bool>, std::array<bool, 2>)>("fusedres::dense_bn_act_backward");
      auto [gi, gw, gb] = op.call(grad_out, inputs, opt(weight), saved[1], saved[2], saved[3],
                                  ctx->saved_data["training"].toBool(), ctx->saved_data["activation"].toStringRef(),
                                  ctx->saved_data["negative_slope"].toDouble(), input_mask, param_mask);
      for (size_t j = 0; j < n; ++j) grads[j] = input_mask.get(j) ? gi[j] : at::Tensor();
      grads[n] = param_mask[0] ? gw.to(weight.scalar_type()) : at::Tensor();
      grads[n + 1] =
          param_mask[1] ? gb.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt())) : at::Tensor();
    }
    variable_list deps{weight, grad_out};
    deps.insert(deps.end(), inputs.begin(), inputs.end());
    refuse_double_backward(grads, std::move(deps), kDoubleBackward);
    return grads;
  }
};

at::Tensor dense_bn_act_autograd(at::TensorList inputs, const OptTensor& weight, const OptTensor& bias,
                                 const OptTensor& running_mean, const OptTensor& running_var,
                                 const OptTensor& batch_mean, const OptTensor& batch_var, bool training,
                                 double momentum, double eps, c10::string_view activation, double negative_slope) {
  return DenseBnActFunction::apply(inputs, weight, bias, running_mean, running_var, batch_mean, batch_var, training,
                                   momentum, eps, std::string(activation.data(), activation.size()),
                                   negative_slope);
}

// Below autograd (no gradient wanted, or inference tensors): the forward op's output.
at::Tensor dense_bn_act_no_grad(at::TensorList inputs, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& running_mean, const OptTensor& running_var,
                                const OptTensor& batch_mean, const OptTensor& batch_var, bool training,
                                double momentum, double eps, c10::string_view activation, double negative_slope) {
  return std::get<0>(call_forward(inputs, weight, bias, running_mean, running_var, batch_mean, batch_var, training,
                                  momentum, eps, activation, negative_slope));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) { m.impl("dense_bn_act", &dense_bn_act_autograd); }
TORCH_LIBRARY_IMPL(fusedres, CompositeExplicitAutograd, m) { m.impl("dense_bn_act", &dense_bn_act_no_grad); }

}  // namespace fusedres

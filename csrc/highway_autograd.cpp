// fusedres::highway and fusedres::highway_packed: the highway gate ops as differentiable ops, with their autograd
// in C++ (why: csrc/autograd_common.h). Each node saves only its inputs (the backward recomputes the sigmoid and
// the activation, docs/design.md section 2) and calls highway_[packed_]forward / _backward through the
// dispatcher below the autograd key, as the Python Functions of fusedres/ops/highway.py do under torch.compile.
#include <torch/library.h>

#include <array>
#include <string>

#include "autograd_common.h"

namespace fusedres {
namespace {

using namespace fusedres::autograd;

constexpr const char* kDoubleBackward = "fusedres.highway does not support double backward";

at::Tensor call_forward(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                        const OptTensor& carry_gate, c10::string_view activation) {
  static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                       c10::string_view)>("fusedres::highway_forward");
  return op.call(transform, gate, carry, carry_gate, activation);
}

at::Tensor call_packed_forward(const at::Tensor& projected, const at::Tensor& carry, int64_t dim, bool free_carry,
                               c10::string_view activation) {
  static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, c10::string_view)>(
      "fusedres::highway_packed_forward");
  return op.call(projected, carry, dim, free_carry, activation);
}

class HighwayFunction : public torch::autograd::Function<HighwayFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& transform, const at::Tensor& gate,
                            const at::Tensor& carry, const OptTensor& carry_gate, const std::string& activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = call_forward(transform, gate, carry, carry_gate, activation);
    ctx->save_for_backward({transform, gate, carry, defined(carry_gate) ? *carry_gate : at::Tensor()});
    ctx->saved_data["activation"] = activation;
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(5);  // forward's arguments after ctx
    const at::Tensor& grad_out = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const bool has_carry_gate = saved[3].defined();
    // Edges exist for the tensors given: carry_gate's is the fourth when present.
    const std::array<bool, 4> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                    has_carry_gate && ctx->needs_input_grad(3)};
    if (!grad_out.defined() || !(needs[0] || needs[1] || needs[2] || needs[3])) return grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::NoGradGuard no_grad;
      static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
          c10::string_view, std::array<bool, 4>)>("fusedres::highway_backward");
      auto [gt, gg, gc, gcg] = op.call(grad_out, saved[0], saved[1], saved[2], opt(saved[3]),
                                       ctx->saved_data["activation"].toStringRef(), needs);
      const at::Tensor all[4] = {gt, gg, gc, gcg};
      for (int i = 0; i < 4; ++i) grads[i] = needs[i] ? all[i] : at::Tensor();
    }
    refuse_double_backward(grads, {saved[0], saved[1], saved[2], saved[3], grad_out}, kDoubleBackward);
    return grads;
  }
};

class HighwayPackedFunction : public torch::autograd::Function<HighwayPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                            bool free_carry, const std::string& activation) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = call_packed_forward(projected, carry, dim, free_carry, activation);
    ctx->save_for_backward({projected, carry});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["free_carry"] = free_carry;
    ctx->saved_data["activation"] = activation;
    ctx->set_materialize_grads(false);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(5);  // forward's arguments after ctx
    const at::Tensor& grad_out = grad_outputs[0];
    const std::array<bool, 2> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grad_out.defined() || !(needs[0] || needs[1])) return grads;
    const auto saved = ctx->get_saved_variables();
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::NoGradGuard no_grad;
      static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, c10::string_view,
          std::array<bool, 2>)>("fusedres::highway_packed_backward");
      auto [gp, gc] = op.call(grad_out, saved[0], saved[1], ctx->saved_data["dim"].toInt(),
                              ctx->saved_data["free_carry"].toBool(), ctx->saved_data["activation"].toStringRef(),
                              needs);
      grads[0] = needs[0] ? gp : at::Tensor();
      grads[1] = needs[1] ? gc : at::Tensor();
    }
    refuse_double_backward(grads, {saved[0], saved[1], grad_out}, kDoubleBackward);
    return grads;
  }
};

at::Tensor highway_autograd(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                            const OptTensor& carry_gate, c10::string_view activation) {
  return HighwayFunction::apply(transform, gate, carry, carry_gate, std::string(activation.data(), activation.size()));
}

at::Tensor highway_packed_autograd(const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                                   bool free_carry, c10::string_view activation) {
  return HighwayPackedFunction::apply(projected, carry, dim, free_carry,
                                      std::string(activation.data(), activation.size()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, Autograd, m) {
  m.impl("highway", &highway_autograd);
  m.impl("highway_packed", &highway_packed_autograd);
}
// Below autograd (no gradient wanted, or inference tensors): the forward ops.
TORCH_LIBRARY_IMPL(fusedres, CompositeExplicitAutograd, m) {
  m.impl("highway", &call_forward);
  m.impl("highway_packed", &call_packed_forward);
}

}  // namespace fusedres

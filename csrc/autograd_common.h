// What the C++ autograd nodes of the fused ops share (csrc/*_autograd.cpp).
//
// Why C++ nodes: in eager mode a Python torch.autograd.Function costs ~60-100 us per call (forward and backward
// together) on a 2-core CPU, more than the kernels of a cache-resident layer. Each node calls the op's registered
// forward / backward ops through the dispatcher below the autograd key, so its numerics are those of the Python
// Function that torch.compile traces (fusedres/ops/*.py), and it saves the same tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <string>

namespace fusedres::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

inline bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }
inline OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The typed handle of a registered fusedres op (looked up once per call site: keep the result in a static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Autograd edges exist only for the tensors a node was given: records where the optional weight and bias sit among
// them, from edge `next` on, and bias's dtype (its gradient is returned in it).
inline void save_param_edges(AutogradContext* ctx, int64_t next, const OptTensor& weight, const OptTensor& bias) {
  ctx->saved_data["weight_edge"] = defined(weight) ? next++ : int64_t(-1);
  ctx->saved_data["bias_edge"] = defined(bias) ? next++ : int64_t(-1);
  ctx->saved_data["bias_dtype"] = defined(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
}

// Whether backward must compute the gradient of the edge recorded under `key` (-1: the tensor was not given).
inline bool needs_edge(AutogradContext* ctx, const char* key) {
  const int64_t e = ctx->saved_data[key].toInt();
  return e >= 0 && ctx->needs_input_grad(static_cast<size_t>(e));
}

// Identity on gradients computed with create_graph=True, whose own backward raises `message`: differentiating
// the gradients of a fused op again fails loudly instead of silently treating them as constants.
class RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
 public:
  // grads and dependencies: defined tensors only.
  static variable_list forward(AutogradContext* ctx, at::TensorList grads, at::TensorList dependencies,
                               const std::string& message) {
    (void)dependencies;
    ctx->saved_data["message"] = message;
    variable_list out;
    out.reserve(grads.size());
    for (const auto& g : grads) out.push_back(g.view_as(g));
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    (void)grad_outputs;
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

// When backward runs with create_graph=True (grad mode on inside the node), routes the defined entries of
// `grads` through RefuseDoubleBackward, on the graph of `dependencies` (what the gradients are functions of).
inline void refuse_double_backward(variable_list& grads, variable_list dependencies, const char* message) {
  if (!at::GradMode::is_enabled()) return;
  variable_list given, deps;
  for (const auto& g : grads) {
    if (g.defined()) given.push_back(g);
  }
  for (const auto& d : dependencies) {
    if (d.defined()) deps.push_back(d);
  }
  const variable_list refused =
      RefuseDoubleBackward::apply(at::TensorList(given), at::TensorList(deps), std::string(message));
  for (size_t i = 0, k = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) grads[i] = refused[k++];
  }
}

}  // namespace fusedres::autograd

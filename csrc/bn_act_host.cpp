#include "bn_act.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cmath>

namespace fusedres {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// A per-channel vector argument: 1-D, C elements, float32 or the input's dtype, same device as the input.
void check_channel_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                          int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == C, name, " must be a 1-D tensor with ", C,
              " elements (the number of channels of input, dim 1), got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == input.scalar_type(), name,
              " must have dtype float32 or the input's dtype (", input.scalar_type(), "), got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), name, " must be on the same device as input (", input.device(),
              "), got ", t->device());
}

// A [C] per-channel vector of the accumulation dtype on input's device (save_mean, sums, ...).
void check_acc_vector(const at::Tensor& t, const char* name, const at::Tensor& input, int64_t C) {
  const auto acc = bn_act_acc_type(input.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == C && t.scalar_type() == acc && t.device() == input.device(), name,
              " must be a 1-D ", acc, " tensor with ", C, " elements on ", input.device(), ", got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
}

BnActGeom geometry_of(const at::Tensor& input) {
  BnActGeom g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  g.format = input.dim() >= 4 ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  // (N, C) inputs and spatial size 1 are rows of C in memory whatever the nominal format.
  g.channels_last = g.format != at::MemoryFormat::Contiguous || g.S == 1;
  return g;
}

}  // namespace

int parse_activation(c10::string_view activation) {
  if (activation == "relu") return math::kReLU;
  if (activation == "identity") return math::kIdentity;
  if (activation == "leaky_relu") return math::kLeakyReLU;
  if (activation == "relu6") return math::kReLU6;
  if (activation == "silu") return math::kSiLU;
  TORCH_CHECK_VALUE(false, "activation must be one of 'relu', 'identity', 'leaky_relu', 'relu6', 'silu', got '",
                    std::string(activation.data(), activation.size()), "'");
}

int parse_mask_activation(c10::string_view activation, const char* op) {
  const bool known = activation == "relu" || activation == "identity" || activation == "leaky_relu" ||
                     activation == "relu6";
  TORCH_CHECK_VALUE(known, "activation must be one of 'relu', 'identity', 'leaky_relu', 'relu6' for ", op, ", got '",
                    std::string(activation.data(), activation.size()),
                    "' (silu's backward recomputes the pre-activation from bias and residual, which only "
                    "bn_act_backward takes)");
  return parse_activation(activation);
}

int parse_basic_activation(c10::string_view activation, const char* op) {
  const bool known = activation == "relu" || activation == "identity" || activation == "leaky_relu";
  TORCH_CHECK_VALUE(known, "activation must be one of 'relu', 'identity', 'leaky_relu' for ", op, ", got '",
                    std::string(activation.data(), activation.size()), "'");
  return parse_activation(activation);
}

namespace {

// An optional residual (forward: added before the activation; backward, silu: read to recompute z) has input's
// shape, dtype and device.
void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& input) {
  if (!residual.has_value() || !residual->defined()) return;
  TORCH_CHECK(residual->sizes() == input.sizes(), "residual must have the same shape as input, got ",
              residual->sizes(), " and ", input.sizes());
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "residual must have the same dtype as input (",
              input.scalar_type(), "), got ", residual->scalar_type());
  TORCH_CHECK(residual->device() == input.device(), "residual must be on the same device as input (",
              input.device(), "), got ", residual->device());
}

// The checks bn_act_forward and bn_act_elemt share: input, residual, weight and bias.
BnActGeom check_input_residual_params(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5,
              "input must have 2 to 5 dimensions ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got ",
              input.dim(), " dimensions of shape ", input.sizes());
  TORCH_CHECK(is_float_type(input.scalar_type()),
              "input must have a floating dtype (float32, float64, bfloat16 or float16), got ",
              input.scalar_type());
  const BnActGeom g = geometry_of(input);
  check_residual(residual, input);
  check_channel_vector(weight, "weight", input, g.C);
  check_channel_vector(bias, "bias", input, g.C);
  return g;
}

}  // namespace

BnActGeom check_bn_act_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double momentum,
                               double eps, int act) {
  const BnActGeom g = check_input_residual_params(input, residual, weight, bias);
  check_channel_vector(running_mean, "running_mean", input, g.C);
  check_channel_vector(running_var, "running_var", input, g.C);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, "running_mean and running_var must be given together (both or neither), got ",
              has_rm ? "running_mean only" : "running_var only");
  TORCH_CHECK(training || has_rm, "running_mean and running_var must be given when training=False");
  TORCH_CHECK(eps > 0 || (eps == 0 && !training), "eps must be positive, got ", eps);
  TORCH_CHECK(std::isfinite(momentum), "momentum must be a finite number, got ", momentum);
  if (training && g.numel() > 0) {
    TORCH_CHECK_VALUE(g.M() > 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
  (void)act;
  return g;
}

BnActGeom check_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                const at::Tensor& save_invstd, const at::Tensor& mask, int act,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(input.dim() >= 2 && input.dim() <= 5, "input must have 2 to 5 dimensions, got shape ",
              input.sizes());
  TORCH_CHECK(is_float_type(input.scalar_type()), "input must have a floating dtype, got ", input.scalar_type());
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "grad_out must have the same shape as input, got ",
              grad_out.sizes(), " and ", input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "grad_out must have the same dtype as input (",
              input.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "grad_out must be on the same device as input");
  const BnActGeom g = geometry_of(input);
  check_channel_vector(weight, "weight", input, g.C);
  check_channel_vector(bias, "bias", input, g.C);
  check_residual(residual, input);
  check_acc_vector(save_mean, "save_mean", input, g.C);
  check_acc_vector(save_invstd, "save_invstd", input, g.C);
  const int64_t want = math::act_has_mask(act) ? math::mask_bytes(g.numel()) : 0;
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == want &&
                  mask.device() == input.device(),
              "mask must be the uint8 tensor of ", want, " bytes returned by bn_act_forward, got ",
              mask.scalar_type(), " of shape ", mask.sizes());
  return g;
}

BnActGeom check_bn_stats(const at::Tensor& input) {
  return check_input_residual_params(input, std::nullopt, std::nullopt, std::nullopt);
}

BnActGeom check_bn_act_elemt(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& mean, const at::Tensor& invstd, int act) {
  (void)act;
  const BnActGeom g = check_input_residual_params(input, residual, weight, bias);
  check_acc_vector(mean, "mean", input, g.C);
  check_acc_vector(invstd, "invstd", input, g.C);
  return g;
}

BnActGeom check_bn_act_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                      const at::Tensor& save_invstd, const at::Tensor& mask, const at::Tensor& sum_dz,
                                      const at::Tensor& sum_dz_xhat, int64_t count, int act) {
  const BnActGeom g = check_bn_act_backward(grad_out, input, weight, save_mean, save_invstd, mask, act);
  check_acc_vector(sum_dz, "sum_dz", input, g.C);
  check_acc_vector(sum_dz_xhat, "sum_dz_xhat", input, g.C);
  TORCH_CHECK(count >= 1, "count must be at least 1 (values per channel the sums were taken over), got ", count);
  return g;
}

at::ScalarType bn_act_acc_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor bn_act_dense(const at::Tensor& t, const BnActGeom& g) { return t.contiguous(g.format); }

std::pair<at::Tensor, at::Tensor> bn_act_params(const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, int64_t C,
                                                at::ScalarType acc, at::Device device) {
  const auto opts = at::TensorOptions().dtype(acc).device(device);
  at::Tensor w = (weight.has_value() && weight->defined()) ? weight->to(acc).contiguous() : at::ones({C}, opts);
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->to(acc).contiguous() : at::zeros({C}, opts);
  return {w, b};
}

std::pair<at::Tensor, at::Tensor> bn_act_eval_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                                    double eps, at::ScalarType acc) {
  // A copy, never the buffer itself: the op's outputs must not alias its inputs.
  at::Tensor mean = running_mean.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor invstd = (running_var.to(acc) + eps).rsqrt().contiguous();
  return {mean, invstd};
}

void bn_act_update_running_stats(const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                 const at::Tensor& var_biased, int64_t M, double momentum) {
  if (!running_mean.has_value() || !running_mean->defined()) return;
  const at::Tensor& rm = *running_mean;
  const at::Tensor& rv = *running_var;
  if (rm.is_cpu() && rm.is_contiguous() && rv.is_contiguous() && rm.scalar_type() == mean.scalar_type() &&
      rv.scalar_type() == mean.scalar_type() && mean.is_contiguous() && var_biased.is_contiguous()) {
    // CPU, buffers in the accumulation dtype: one loop over C instead of ~8 small ATen ops (~20 us a call). The
    // same roundings as the ATen expression below (products in acc_t, then their sum).
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_act_update_running_stats", [&] {
      const scalar_t m = static_cast<scalar_t>(momentum), keep = static_cast<scalar_t>(1.0 - momentum);
      const scalar_t unbias = static_cast<scalar_t>(static_cast<double>(M) / static_cast<double>(M - 1));
      const scalar_t* bm = mean.const_data_ptr<scalar_t>();
      const scalar_t* bv = var_biased.const_data_ptr<scalar_t>();
      scalar_t* pm = rm.mutable_data_ptr<scalar_t>();
      scalar_t* pv = rv.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < rm.numel(); ++c) {
        const volatile scalar_t batch_term = bm[c] * m, run_term = pm[c] * keep;  // no fma: match ATen
        pm[c] = batch_term + run_term;
        const volatile scalar_t var_term = (bv[c] * unbias) * m, run_var_term = pv[c] * keep;
        pv[c] = var_term + run_var_term;
      }
    });
    return;
  }
  // Compute both new values before writing either, so the update is all-or-nothing.
  const at::Tensor unbiased = var_biased * (static_cast<double>(M) / static_cast<double>(M - 1));
  // Same expression and order as PyTorch's CPU kernel: momentum * batch + (1 - momentum) * running.
  const at::Tensor new_mean = mean * momentum + running_mean->to(mean.scalar_type()) * (1.0 - momentum);
  const at::Tensor new_var = unbiased * momentum + running_var->to(mean.scalar_type()) * (1.0 - momentum);
  running_mean->copy_(new_mean);
  running_var->copy_(new_var);
}

at::Tensor bn_act_empty_like_none(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace fusedres

#include "block_end.h"

#include <ATen/ATen.h>

namespace fusedres {

namespace {

// scale / backward scale: (N,) or (N, C), a floating dtype, on input's device.
void check_scale(const std::optional<at::Tensor>& scale, const at::Tensor& input) {
  if (!scale.has_value() || !scale->defined()) return;
  const int64_t N = input.size(0), C = input.size(1);
  const bool per_sample = scale->dim() == 1 && scale->size(0) == N;
  const bool per_channel = scale->dim() == 2 && scale->size(0) == N && scale->size(1) == C;
  TORCH_CHECK(per_sample || per_channel, "scale must have shape (N,) = (", N, ",) or (N, C) = (", N, ", ", C,
              ") for input of shape ", input.sizes(), ", got ", scale->sizes());
  TORCH_CHECK(at::isFloatingType(scale->scalar_type()), "scale must have a floating dtype, got ",
              scale->scalar_type());
  TORCH_CHECK(scale->device() == input.device(), "scale must be on the same device as input (", input.device(),
              "), got ", scale->device());
}

}  // namespace

int parse_block_end_activation(c10::string_view activation) {
  TORCH_CHECK_VALUE(activation != "silu",
                    "activation 'silu' is not supported by the block end (batch_norm_act with scale or a residual "
                    "with fewer channels): its backward would recompute the pre-activation from the scaled, padded "
                    "residual; use 'relu', 'identity', 'leaky_relu' or 'relu6'");
  return parse_activation(activation);
}

BnActGeom check_block_end_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                  double eps) {
  const BnActGeom g = check_bn_act_forward(input, std::nullopt, weight, bias, running_mean, running_var, training,
                                           momentum, eps, math::kIdentity);
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    bool same = r.dim() == input.dim() && r.size(0) == input.size(0) && r.size(1) <= input.size(1);
    for (int64_t d = 2; same && d < input.dim(); ++d) same = r.size(d) == input.size(d);
    TORCH_CHECK(same, "residual must have input's shape ", input.sizes(),
                " except for at most as many channels (dim 1), got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == input.scalar_type(), "residual must have the same dtype as input (",
                input.scalar_type(), "), got ", r.scalar_type());
    TORCH_CHECK(r.device() == input.device(), "residual must be on the same device as input (", input.device(),
                "), got ", r.device());
  }
  check_scale(scale, input);
  return g;
}

BnActGeom check_block_end_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                                   const at::Tensor& save_invstd, const at::Tensor& mask, int64_t residual_channels,
                                   int act) {
  const BnActGeom g = check_bn_act_backward(grad_out, input, weight, save_mean, save_invstd, mask, act, bias);
  TORCH_CHECK(residual_channels >= 0 && residual_channels <= g.C, "residual_channels must be in [0, ", g.C,
              "] (input's channels), got ", residual_channels);
  check_scale(scale, input);
  return g;
}

BlockEndResidualLayout block_end_residual_layout(const at::Tensor& residual) {
  BlockEndResidualLayout l;
  l.channels = residual.size(1);
  l.stride_n = residual.stride(0);
  l.stride_c = residual.stride(1);
  int64_t S = 1;
  for (int64_t d = 2; d < residual.dim(); ++d) S *= residual.size(d);
  l.spatial_offset.assign(static_cast<size_t>(S), 0);
  // The flat spatial index s walks the last dimension fastest, as input's dense (N, C, S) view does.
  std::vector<int64_t> idx(static_cast<size_t>(std::max<int64_t>(0, residual.dim() - 2)), 0);
  l.planes_dense = true;
  for (int64_t s = 0; s < S; ++s) {
    int64_t off = 0;
    for (size_t k = 0; k < idx.size(); ++k) off += idx[k] * residual.stride(static_cast<int64_t>(k) + 2);
    l.spatial_offset[static_cast<size_t>(s)] = off;
    l.planes_dense = l.planes_dense && off == s;
    for (int64_t k = static_cast<int64_t>(idx.size()) - 1; k >= 0; --k) {  // next multi-index
      if (++idx[static_cast<size_t>(k)] < residual.size(k + 2)) break;
      idx[static_cast<size_t>(k)] = 0;
    }
  }
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_end_param_grads(
    const at::Tensor& nc_sums, const at::Tensor& c_sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& invstd, const at::Tensor& s, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool need_scale, bool need_weight, bool need_bias) {
  const auto acc = w.scalar_type();
  auto dtype_of = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->scalar_type() : acc;
  };
  // Copies (copy=true): the rows of one c_sums buffer would alias each other.
  at::Tensor dw = need_weight ? c_sums[1].to(dtype_of(weight), false, true) : bn_act_empty_like_none(w);
  at::Tensor db = need_bias ? c_sums[0].to(dtype_of(bias), false, true) : bn_act_empty_like_none(w);
  at::Tensor ds = bn_act_empty_like_none(w);
  if (need_scale) {
    // d out / d scale_nc = sum_s dz * batch_norm(x) = w * invstd * sum dz (x - mean) + b * sum dz.
    const at::Tensor per_nc = nc_sums[1] * (w * invstd.to(acc)).unsqueeze(0) + nc_sums[0] * b.unsqueeze(0);
    ds = (s.defined() && s.dim() == 1) ? per_nc.sum(1) : per_nc;
  }
  return {ds, dw, db};
}

at::Tensor block_end_scale(const std::optional<at::Tensor>& scale, at::ScalarType acc) {
  if (!scale.has_value() || !scale->defined()) return at::Tensor();
  return scale->to(acc).contiguous();
}

}  // namespace fusedres

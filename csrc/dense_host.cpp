#include "dense.h"

#include <ATen/ATen.h>

namespace fusedres {

BnActGeom DenseGeom::input_geom(size_t j) const {
  BnActGeom g;
  g.N = N;
  g.C = channels[j];
  g.S = S;
  g.channels_last = channels_last;
  g.format = format;
  return g;
}

BnActGeom DenseGeom::output_geom() const {
  BnActGeom g = input_geom(0);
  g.C = C;
  return g;
}

int64_t DenseGeom::output_offset(size_t j) const { return channels_last ? offsets[j] : offsets[j] * S; }

int64_t DenseGeom::output_ld() const { return channels_last ? C : C * S; }

namespace {

// The geometry of the virtual concatenation; checks the list and what every input must share with inputs[0].
DenseGeom dense_geometry(at::TensorList inputs, bool has_mask) {
  TORCH_CHECK(!inputs.empty(), "inputs must be a non-empty list of tensors");
  const at::Tensor& x0 = inputs[0];
  for (size_t j = 0; j < inputs.size(); ++j) {
    const at::Tensor& x = inputs[j];
    TORCH_CHECK(x.defined(), "inputs[", j, "] must be a tensor, got an undefined tensor");
    TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "inputs[", j,
                "] must have 2 to 5 dimensions ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got shape ",
                x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
                    x.scalar_type() == at::kHalf,
                "inputs[", j, "] must have a floating dtype (float32, float64, bfloat16 or float16), got ",
                x.scalar_type());
    if (j == 0) continue;
    TORCH_CHECK(x.dim() == x0.dim(), "inputs[", j, "] must have as many dimensions as inputs[0] (", x0.dim(),
                "), got shape ", x.sizes());
    TORCH_CHECK(x.size(0) == x0.size(0), "inputs[", j, "] must have the batch size of inputs[0] (", x0.size(0),
                "), got shape ", x.sizes());
    TORCH_CHECK(x.sizes().slice(2) == x0.sizes().slice(2), "inputs[", j,
                "] must have the spatial size of inputs[0] (", x0.sizes().slice(2), "), got shape ", x.sizes());
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), "inputs[", j, "] must have the dtype of inputs[0] (",
                x0.scalar_type(), "), got ", x.scalar_type());
    TORCH_CHECK(x.device() == x0.device(), "inputs[", j, "] must be on the device of inputs[0] (", x0.device(),
                "), got ", x.device());
  }
  DenseGeom g;
  g.N = x0.size(0);
  g.S = 1;
  for (int64_t d = 2; d < x0.dim(); ++d) g.S *= x0.size(d);
  g.format = x0.dim() >= 4 ? x0.suggest_memory_format() : at::MemoryFormat::Contiguous;
  g.channels_last = g.format != at::MemoryFormat::Contiguous || g.S == 1;
  int64_t mask_offset = 0;
  for (const at::Tensor& x : inputs) {
    g.offsets.push_back(g.C);
    g.channels.push_back(x.size(1));
    g.mask_offsets.push_back(mask_offset);
    g.C += x.size(1);
    if (has_mask) mask_offset += math::mask_bytes(x.numel());
  }
  g.mask_offsets.push_back(mask_offset);
  return g;
}

// The output as a (meta-free) tensor shape: inputs[0]'s shape with C channels.
std::vector<int64_t> output_sizes(const at::Tensor& x0, int64_t C) {
  std::vector<int64_t> sizes(x0.sizes().begin(), x0.sizes().end());
  sizes[1] = C;
  return sizes;
}

}  // namespace

DenseGeom check_dense_forward(at::TensorList inputs, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& batch_mean, const std::optional<at::Tensor>& batch_var,
                              bool training, double momentum, double eps, int act) {
  const DenseGeom g = dense_geometry(inputs, math::act_has_mask(act));
  // Everything about the parameters, running statistics, eps and momentum is checked as for bn_act_forward on
  // an input of the concatenation's shape (a meta tensor: nothing is allocated).
  const at::Tensor probe = at::empty(output_sizes(inputs[0], g.C), inputs[0].options().device(at::kMeta));
  const auto device = inputs[0].device();
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) {
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->device() == device, t == &weight ? "weight" : t == &bias ? "bias" : t == &running_mean
                                                                                           ? "running_mean"
                                                                                           : "running_var",
                  " must be on the device of the inputs (", device, "), got ", (*t)->device());
    }
  }
  auto on_meta = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return at::empty(t->sizes(), t->options().device(at::kMeta));
  };
  check_bn_act_forward(probe, std::nullopt, on_meta(weight), on_meta(bias), on_meta(running_mean),
                       on_meta(running_var), training, momentum, eps, act);
  const bool has_bm = batch_mean.has_value() && batch_mean->defined();
  const bool has_bv = batch_var.has_value() && batch_var->defined();
  TORCH_CHECK(has_bm == has_bv, "batch_mean and batch_var must be given together (both or neither), got ",
              has_bm ? "batch_mean only" : "batch_var only");
  if (has_bm) {
    TORCH_CHECK(training, "batch_mean and batch_var (precomputed batch statistics) are only used when training=True");
    const auto acc = bn_act_acc_type(inputs[0].scalar_type());
    for (const auto* t : {&batch_mean, &batch_var}) {
      const at::Tensor& v = **t;
      TORCH_CHECK(v.dim() == 1 && v.numel() == g.C && v.scalar_type() == acc && v.device() == device,
                  t == &batch_mean ? "batch_mean" : "batch_var", " must be a 1-D ", acc, " tensor with ", g.C,
                  " elements (the channels of all inputs) on ", device, ", got ", v.scalar_type(), " of shape ",
                  v.sizes(), " on ", v.device());
    }
  }
  return g;
}

DenseGeom check_dense_backward(const at::Tensor& grad_out, at::TensorList inputs,
                               const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                               const at::Tensor& save_invstd, const at::Tensor& mask, int act,
                               const std::vector<bool>& input_mask) {
  const DenseGeom g = dense_geometry(inputs, math::act_has_mask(act));
  TORCH_CHECK(input_mask.size() == inputs.size(), "input_mask must have one entry per input (", inputs.size(),
              "), got ", input_mask.size());
  const auto want = output_sizes(inputs[0], g.C);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(want), "grad_out must have the shape of the concatenated inputs ",
              at::IntArrayRef(want), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == inputs[0].scalar_type(), "grad_out must have the dtype of the inputs (",
              inputs[0].scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == inputs[0].device(), "grad_out must be on the device of the inputs (",
              inputs[0].device(), "), got ", grad_out.device());
  const auto acc = bn_act_acc_type(inputs[0].scalar_type());
  for (const auto* t : {&save_mean, &save_invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == g.C && t->scalar_type() == acc && t->device() == inputs[0].device(),
                t == &save_mean ? "save_mean" : "save_invstd", " must be a 1-D ", acc, " tensor with ", g.C,
                " elements on ", inputs[0].device(), ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ",
                t->device());
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == g.C, "weight must be a 1-D tensor with ", g.C,
                " elements (the channels of all inputs), got shape ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == at::kFloat || weight->scalar_type() == inputs[0].scalar_type(),
                "weight must have dtype float32 or the inputs' dtype (", inputs[0].scalar_type(), "), got ",
                weight->scalar_type());
    TORCH_CHECK(weight->device() == inputs[0].device(), "weight must be on the device of the inputs (",
                inputs[0].device(), "), got ", weight->device());
  }
  const int64_t want_bytes = g.mask_offsets.back();
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 1 && mask.numel() == want_bytes &&
                  mask.device() == inputs[0].device(),
              "mask must be the uint8 tensor of ", want_bytes, " bytes returned by dense_bn_act_forward, got ",
              mask.scalar_type(), " of shape ", mask.sizes());
  return g;
}

std::vector<at::Tensor> dense_inputs(at::TensorList inputs, const DenseGeom& g) {
  std::vector<at::Tensor> out;
  out.reserve(inputs.size());
  for (const at::Tensor& x : inputs) out.push_back(x.contiguous(g.format));
  return out;
}

}  // namespace fusedres

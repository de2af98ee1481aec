#include "highway.h"

#include <ATen/ATen.h>

#include <string>

namespace fusedres {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// `t` must match `like` (named like_name) in shape, dtype and device.
void check_same(const at::Tensor& t, const char* name, c10::IntArrayRef sizes, const at::Tensor& like,
                const char* like_name) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have the same shape as ", like_name, ", got ", t.sizes(), " and ",
              sizes);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the same dtype as ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on the same device as ", like_name, " (", like.device(),
              "), got ", t.device());
}

// The memory format every dense operand and output of a call uses (Contiguous below 4 dimensions).
at::MemoryFormat format_of(const at::Tensor& t) { return t.suggest_memory_format(); }

HighwayOperand operand(const at::Tensor& t, int64_t row_stride) { return {t.const_data_ptr(), row_stride}; }

HighwayOutOperand out_operand(at::Tensor& t, bool wanted, int64_t row_stride) {
  return wanted ? HighwayOutOperand{t.mutable_data_ptr(), row_stride} : HighwayOutOperand{};
}

at::Tensor empty_in(c10::IntArrayRef sizes, const at::Tensor& like, at::MemoryFormat fmt) {
  return at::empty(sizes, like.options().memory_format(fmt));
}

at::Tensor none_like(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Rows view of a dense (non-overlapping) tensor split into `parts` (>= 2) equal parts along `dim`: see highway.h.
// size(dim) >= 2, so the dims before `dim` in memory order are exactly those (of size > 1) with a larger stride.
HighwayRows packed_rows(const at::Tensor& dense, int64_t dim, int64_t parts) {
  HighwayRows r;
  if (dense.numel() == 0) return r;
  const int64_t sd = dense.stride(dim);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dense.dim(); ++d) {
    if (d == dim || dense.size(d) == 1) continue;  // size-1 dims may have any stride and do not matter
    (dense.stride(d) > sd ? outer : inner) *= dense.size(d);
  }
  TORCH_INTERNAL_ASSERT(inner == sd, "highway: projected is not dense");
  r.rows = outer;
  r.cols = dense.size(dim) / parts * inner;
  return r;
}

}  // namespace

int parse_highway_activation(c10::string_view activation) {
  if (activation == "relu") return math::kHwReLU;
  if (activation == "tanh") return math::kHwTanh;
  if (activation == "sigmoid") return math::kHwSigmoid;
  if (activation == "identity") return math::kHwIdentity;
  TORCH_CHECK_VALUE(false, "activation must be one of 'relu', 'tanh', 'sigmoid', 'identity', got '",
                    std::string(activation.data(), activation.size()), "'");
}

void check_highway(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                   const std::optional<at::Tensor>& carry_gate, const at::Tensor* grad_out) {
  TORCH_CHECK(is_float_type(transform.scalar_type()),
              "transform must have a floating dtype (float32, float64, bfloat16 or float16), got ",
              transform.scalar_type());
  const auto sizes = transform.sizes();
  check_same(gate, "gate", sizes, transform, "transform");
  check_same(carry, "carry", sizes, transform, "transform");
  if (carry_gate.has_value() && carry_gate->defined()) {
    check_same(*carry_gate, "carry_gate", sizes, transform, "transform");
  }
  if (grad_out != nullptr) check_same(*grad_out, "grad_out", sizes, transform, "transform");
}

std::vector<int64_t> highway_part_sizes(const at::Tensor& projected, int64_t dim, bool free_carry) {
  std::vector<int64_t> sizes = projected.sizes().vec();
  sizes[dim] /= free_carry ? 3 : 2;
  return sizes;
}

int64_t check_highway_packed(const at::Tensor& projected, const at::Tensor& carry, int64_t dim, bool free_carry,
                             const at::Tensor* grad_out) {
  TORCH_CHECK(projected.dim() >= 1, "projected must have at least one dimension, got a 0-dimensional tensor");
  TORCH_CHECK(is_float_type(projected.scalar_type()),
              "projected must have a floating dtype (float32, float64, bfloat16 or float16), got ",
              projected.scalar_type());
  const int64_t nd = projected.dim();
  TORCH_CHECK_INDEX(dim >= -nd && dim < nd, "dim must be in [", -nd, ", ", nd - 1, "] for projected of shape ",
                    projected.sizes(), ", got ", dim);
  const int64_t d = dim < 0 ? dim + nd : dim;
  const int64_t parts = free_carry ? 3 : 2;
  TORCH_CHECK(projected.size(d) % parts == 0, "projected.size(dim) must be ",
              free_carry ? "divisible by 3 (3 * features: transform, gate, carry_gate)"
                         : "even (2 * features: transform, gate)",
              ", got projected of shape ", projected.sizes(), " and dim=", dim);
  const auto part = highway_part_sizes(projected, d, free_carry);
  check_same(carry, "carry", part, projected, "one part of projected");
  if (grad_out != nullptr) check_same(*grad_out, "grad_out", part, projected, "one part of projected");
  return d;
}

HighwayForwardPlan highway_forward_plan(const at::Tensor& transform, const at::Tensor& gate, const at::Tensor& carry,
                                        const std::optional<at::Tensor>& carry_gate, c10::string_view activation) {
  const int act = parse_highway_activation(activation);
  check_highway(transform, gate, carry, carry_gate);
  const bool free_carry = carry_gate.has_value() && carry_gate->defined();
  const auto fmt = format_of(transform);
  HighwayForwardPlan p;
  p.inputs = {transform.contiguous(fmt), gate.contiguous(fmt), carry.contiguous(fmt),
              free_carry ? carry_gate->contiguous(fmt) : at::Tensor()};
  p.out = empty_in(transform.sizes(), transform, fmt);
  const int64_t n = transform.numel();
  auto& a = p.args;
  a.dtype = transform.scalar_type();
  a.shape = {n > 0 ? 1 : 0, n};
  a.act = act;
  a.free_carry = free_carry;
  a.transform = operand(p.inputs[0], n);
  a.gate = operand(p.inputs[1], n);
  a.carry = operand(p.inputs[2], n);
  if (free_carry) a.carry_gate = operand(p.inputs[3], n);
  a.out = out_operand(p.out, true, n);
  return p;
}

HighwayBackwardPlan highway_backward_plan(const at::Tensor& grad_out, const at::Tensor& transform,
                                          const at::Tensor& gate, const at::Tensor& carry,
                                          const std::optional<at::Tensor>& carry_gate, c10::string_view activation,
                                          std::array<bool, 4> output_mask) {
  const int act = parse_highway_activation(activation);
  check_highway(transform, gate, carry, carry_gate, &grad_out);
  const bool free_carry = carry_gate.has_value() && carry_gate->defined();
  const auto fmt = format_of(transform);
  HighwayBackwardPlan p;
  p.inputs = {grad_out.contiguous(fmt), transform.contiguous(fmt), gate.contiguous(fmt), carry.contiguous(fmt),
              free_carry ? carry_gate->contiguous(fmt) : at::Tensor()};
  output_mask[3] = output_mask[3] && free_carry;
  for (int i = 0; i < 4; ++i) {
    p.grads[i] = output_mask[i] ? empty_in(transform.sizes(), transform, fmt) : none_like(transform);
  }
  const int64_t n = transform.numel();
  auto& a = p.args;
  a.dtype = transform.scalar_type();
  a.shape = {n > 0 ? 1 : 0, n};
  a.act = act;
  a.free_carry = free_carry;
  a.grad_out = operand(p.inputs[0], n);
  a.transform = operand(p.inputs[1], n);
  a.gate = operand(p.inputs[2], n);
  a.carry = operand(p.inputs[3], n);
  if (free_carry) a.carry_gate = operand(p.inputs[4], n);
  a.grad_transform = out_operand(p.grads[0], output_mask[0], n);
  a.grad_gate = out_operand(p.grads[1], output_mask[1], n);
  a.grad_carry = out_operand(p.grads[2], output_mask[2], n);
  a.grad_carry_gate = out_operand(p.grads[3], output_mask[3], n);
  return p;
}

namespace {

// Operand k of the packed view of `dense` (row stride parts * cols, k * cols elements from the start).
HighwayOperand part_operand(const at::Tensor& dense, const HighwayRows& r, int64_t parts, int64_t k) {
  const auto* base = static_cast<const char*>(dense.const_data_ptr());
  return {base + k * r.cols * static_cast<int64_t>(dense.element_size()), parts * r.cols};
}

HighwayOutOperand part_out_operand(at::Tensor& dense, const HighwayRows& r, int64_t parts, int64_t k) {
  auto* base = static_cast<char*>(dense.mutable_data_ptr());
  return {base + k * r.cols * static_cast<int64_t>(dense.element_size()), parts * r.cols};
}

}  // namespace

HighwayForwardPlan highway_packed_forward_plan(const at::Tensor& projected, const at::Tensor& carry, int64_t dim,
                                               bool free_carry, c10::string_view activation) {
  const int act = parse_highway_activation(activation);
  const int64_t d = check_highway_packed(projected, carry, dim, free_carry);
  const int64_t parts = free_carry ? 3 : 2;
  const auto fmt = format_of(projected);
  HighwayForwardPlan p;
  p.inputs = {projected.contiguous(fmt), carry.contiguous(fmt), at::Tensor(), at::Tensor()};
  p.out = empty_in(highway_part_sizes(projected, d, free_carry), projected, fmt);
  const HighwayRows r = packed_rows(p.inputs[0], d, parts);
  auto& a = p.args;
  a.dtype = projected.scalar_type();
  a.shape = r;
  a.act = act;
  a.free_carry = free_carry;
  if (r.numel() == 0) return p;
  // carry and the output are dense in projected's memory format, so their dims come in the same memory order and
  // their rows view is (r.rows, r.cols) with row stride r.cols.
  TORCH_INTERNAL_ASSERT(p.out.numel() == r.numel() && p.inputs[1].numel() == r.numel());
  a.transform = part_operand(p.inputs[0], r, parts, 0);
  a.gate = part_operand(p.inputs[0], r, parts, 1);
  if (free_carry) a.carry_gate = part_operand(p.inputs[0], r, parts, 2);
  a.carry = operand(p.inputs[1], r.cols);
  a.out = out_operand(p.out, true, r.cols);
  return p;
}

HighwayBackwardPlan highway_packed_backward_plan(const at::Tensor& grad_out, const at::Tensor& projected,
                                                 const at::Tensor& carry, int64_t dim, bool free_carry,
                                                 c10::string_view activation, std::array<bool, 2> output_mask) {
  const int act = parse_highway_activation(activation);
  const int64_t d = check_highway_packed(projected, carry, dim, free_carry, &grad_out);
  const int64_t parts = free_carry ? 3 : 2;
  const auto fmt = format_of(projected);
  HighwayBackwardPlan p;
  p.inputs = {grad_out.contiguous(fmt), projected.contiguous(fmt), carry.contiguous(fmt), at::Tensor(),
              at::Tensor()};
  p.grads[0] = output_mask[0] ? empty_in(projected.sizes(), projected, fmt) : none_like(projected);
  p.grads[1] = output_mask[1] ? empty_in(highway_part_sizes(projected, d, free_carry), projected, fmt)
                              : none_like(projected);
  const HighwayRows r = packed_rows(p.inputs[1], d, parts);
  auto& a = p.args;
  a.dtype = projected.scalar_type();
  a.shape = r;
  a.act = act;
  a.free_carry = free_carry;
  if (r.numel() == 0) return p;
  TORCH_INTERNAL_ASSERT(p.inputs[0].numel() == r.numel() && p.inputs[2].numel() == r.numel());
  a.grad_out = operand(p.inputs[0], r.cols);
  a.transform = part_operand(p.inputs[1], r, parts, 0);
  a.gate = part_operand(p.inputs[1], r, parts, 1);
  if (free_carry) a.carry_gate = part_operand(p.inputs[1], r, parts, 2);
  a.carry = operand(p.inputs[2], r.cols);
  if (output_mask[0]) {
    a.grad_transform = part_out_operand(p.grads[0], r, parts, 0);
    a.grad_gate = part_out_operand(p.grads[0], r, parts, 1);
    if (free_carry) a.grad_carry_gate = part_out_operand(p.grads[0], r, parts, 2);
  }
  a.grad_carry = out_operand(p.grads[1], output_mask[1], r.cols);
  return p;
}

}  // namespace fusedres

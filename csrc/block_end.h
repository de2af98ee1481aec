// Host-side pieces of the block end act(scale * batch_norm(input) + residual) (docs/design.md section 10): the
// argument checks and the residual's layout, shared by every backend. The per-channel parameters, statistics and
// running-statistics update are bn_act's (csrc/bn_act.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

#include "bn_act.h"

namespace fusedres {

// "identity" | "relu" | "leaky_relu" | "relu6" -> math::ActKind; "silu" and anything else are errors naming the
// argument.
int parse_block_end_activation(c10::string_view activation);

// Checks every argument of block_end_forward (errors name the argument and the expectation) and returns the
// geometry of input. Nothing is modified. residual: input's shape except for at most as many channels, any strides;
// scale: (N,) or (N, C), floating, on input's device.
BnActGeom check_block_end_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                  double eps);

// Checks the arguments of block_end_backward and returns the geometry.
BnActGeom check_block_end_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                                   const at::Tensor& save_invstd, const at::Tensor& mask, int64_t residual_channels,
                                   int act);

// Where the residual's values lie, in elements: (n, c, s) at data + n * stride_n + c * stride_c + spatial_offset[s]
// (s the flat spatial index of input's shape). planes_dense: spatial_offset[s] == s.
struct BlockEndResidualLayout {
  int64_t channels = 0, stride_n = 0, stride_c = 0;
  std::vector<int64_t> spatial_offset;
  bool planes_dense = false;
};
BlockEndResidualLayout block_end_residual_layout(const at::Tensor& residual);

// The scale / weight / bias gradients of block_end_backward from the kernels' sums (every backend):
//   nc_sums [2, N, C] (per (n, c) sum dz, sum dz (x - mean); read when need_scale), c_sums [2, C] (grad_bias,
//   grad_weight in the accumulation dtype; read when need_weight or need_bias); w, b, invstd: acc [C]; s: the
//   backward's scale as block_end_scale returned it (its shape decides the scale gradient's).
// grad_scale = w * invstd * sum dz (x - mean) + b * sum dz (summed over C for a per-sample scale), acc dtype;
// grad_weight / grad_bias in weight's / bias's dtype (acc when absent). Each a fresh tensor (an op's outputs must
// not alias one another), or an empty [0] one when not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_end_param_grads(
    const at::Tensor& nc_sums, const at::Tensor& c_sums, const at::Tensor& w, const at::Tensor& b,
    const at::Tensor& invstd, const at::Tensor& s, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool need_scale, bool need_weight, bool need_bias);

// The scale as a contiguous accumulation-dtype tensor of its shape ((N,) or (N, C)); undefined when absent.
at::Tensor block_end_scale(const std::optional<at::Tensor>& scale, at::ScalarType acc);

}  // namespace fusedres

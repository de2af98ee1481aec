// Host-side pieces of the BatchNorm + residual + activation op shared by the CPU and CUDA backends:
// argument checks, canonical geometry, per-channel parameter preparation and the running-statistics update.
// Compiled by the host compiler only (csrc/bn_act_host.cpp); the .cu launchers include it for declarations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/bn_act_math.h"

namespace fusedres {

// The input seen as (N, C, S), S = prod(spatial), in one of two dense layouts:
//   channels_last == false: offset(n, c, s) = (n * C + c) * S + s          (NCHW-like, planes of S)
//   channels_last == true:  offset(n, c, s) = (n * S + s) * C + c          (rows of C; also (N, C) inputs)
struct BnActGeom {
  int64_t N = 0, C = 0, S = 0;
  bool channels_last = false;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;  // memory format of the output
  int64_t M() const { return N * S; }
  int64_t numel() const { return N * C * S; }
};

// "identity" | "relu" | "leaky_relu" | "relu6" | "silu" -> math::ActKind; anything else is an error naming the
// argument.
int parse_activation(c10::string_view activation);
// parse_activation for the ops whose backward has no access to the pre-activation (the building blocks
// bn_act_backward_reduce / bn_act_backward_elemt, which take no bias and residual): everything but "silu". `op`
// names the op in the error.
int parse_mask_activation(c10::string_view activation, const char* op);
// parse_activation for the dense op: "identity", "relu" or "leaky_relu" only (its kernels implement those).
int parse_basic_activation(c10::string_view activation, const char* op);

// Checks every argument of bn_act_forward (errors name the argument and the expectation) and returns the
// geometry. Nothing is modified.
BnActGeom check_bn_act_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double momentum,
                               double eps, int act);

// Checks the arguments of bn_act_backward and returns the geometry. bias / residual (the forward's) are checked
// like bn_act_forward's; only SiLU reads them.
BnActGeom check_bn_act_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                const at::Tensor& save_invstd, const at::Tensor& mask, int act,
                                const std::optional<at::Tensor>& bias = std::nullopt,
                                const std::optional<at::Tensor>& residual = std::nullopt);

// Checks of the building-block ops (csrc/fusedres.cpp). Each returns the geometry; nothing is modified.
BnActGeom check_bn_stats(const at::Tensor& input);
BnActGeom check_bn_act_elemt(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& mean, const at::Tensor& invstd, int act);
// bn_act_backward_reduce: check_bn_act_backward without a weight.
// bn_act_backward_elemt: check_bn_act_backward plus sum_dz / sum_dz_xhat ([C] acc dtype) and count >= 1.
BnActGeom check_bn_act_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                                      const at::Tensor& save_invstd, const at::Tensor& mask, const at::Tensor& sum_dz,
                                      const at::Tensor& sum_dz_xhat, int64_t count, int act);

// Accumulation dtype: double for double inputs, float otherwise. save_mean / save_invstd use it.
at::ScalarType bn_act_acc_type(at::ScalarType input_dtype);

// `t` laid out densely in memory format `fmt` (a copy only when it is not already).
at::Tensor bn_act_dense(const at::Tensor& t, const BnActGeom& g);

// Per-channel weight and bias as contiguous acc-dtype tensors on `device` (ones / zeros when absent).
std::pair<at::Tensor, at::Tensor> bn_act_params(const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, int64_t C,
                                                at::ScalarType acc, at::Device device);

// Eval-mode statistics: (mean, invstd) in acc dtype from the running buffers.
std::pair<at::Tensor, at::Tensor> bn_act_eval_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                                    double eps, at::ScalarType acc);

// running_mean <- (1 - m) * running_mean + m * mean; running_var <- (1 - m) * running_var + m * var * M / (M - 1).
// `var_biased` is the biased batch variance in acc dtype. Called only after the kernels succeeded, so a
// failing call leaves the buffers untouched.
void bn_act_update_running_stats(const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                 const at::Tensor& var_biased, int64_t M, double momentum);

// Empty outputs returned for gradients that were not requested (the op schema has no optional returns).
at::Tensor bn_act_empty_like_none(const at::Tensor& like);

}  // namespace fusedres

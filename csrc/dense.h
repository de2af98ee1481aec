// Host-side pieces of the dense concatenation + BatchNorm + activation op (dense_bn_act_forward/backward)
// shared by the CPU and CUDA backends: argument checks and the geometry of the virtual concatenation.
// Per-input work reuses the bn_act kernels: input j is a dense (N, C_j, S) tensor whose channels are the
// output's channels [offset_j, offset_j + C_j); the output / grad_out are read and written at that channel
// offset with a leading dimension of C (see y_ld / dy_ld in cpu/bn_act_kernel.h and the CUDA launch sequence).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "bn_act.h"

namespace fusedres {

struct DenseGeom {
  int64_t N = 0, S = 0, C = 0;      // C = sum of the inputs' channels
  bool channels_last = false;       // layout shared by every (densified) input and the output
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  std::vector<int64_t> channels;    // C_j
  std::vector<int64_t> offsets;     // first output channel of input j
  std::vector<int64_t> mask_offsets;  // byte offset of input j's mask segment; back() = total bytes (0: no mask)
  int64_t M() const { return N * S; }
  // Input j as a bn_act geometry (N, C_j, S) in the common layout.
  BnActGeom input_geom(size_t j) const;
  // The output as a bn_act geometry (N, C, S).
  BnActGeom output_geom() const;
  // Offset, in elements, of input j's first channel inside the output: offsets[j] * S (NCHW) or offsets[j] (CL).
  int64_t output_offset(size_t j) const;
  // Leading dimension of the output seen from one input: C * S (NCHW, between consecutive n) or C (CL rows).
  int64_t output_ld() const;
};

// Checks every argument of dense_bn_act_forward (errors name the argument, with the input's index) and
// returns the geometry. Nothing is modified.
DenseGeom check_dense_forward(at::TensorList inputs, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var,
                              const std::optional<at::Tensor>& batch_mean, const std::optional<at::Tensor>& batch_var,
                              bool training, double momentum, double eps, int act);

// Checks the arguments of dense_bn_act_backward and returns the geometry.
DenseGeom check_dense_backward(const at::Tensor& grad_out, at::TensorList inputs,
                               const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                               const at::Tensor& save_invstd, const at::Tensor& mask, int act,
                               const std::vector<bool>& input_mask);

// The inputs, each dense in the common memory format (a copy only for an input that is not).
std::vector<at::Tensor> dense_inputs(at::TensorList inputs, const DenseGeom& g);

}  // namespace fusedres

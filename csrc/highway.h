// Host-side pieces of the highway gate shared by the CPU and CUDA backends: argument checks and the "rows" view
// every kernel works on. Implemented in csrc/highway_host.cpp (host compiler only).
//
// Kernels see every operand as `rows` rows of `cols` contiguous elements with its own row stride (in elements):
// a dense tensor is one row of numel elements; a half (or third) of a packed projection `projected` split along
// `dim` is rows = prod of the dims before `dim` in memory order, cols = the rest, row stride = 2*cols (3*cols),
// and the gate half starts `cols` elements after the transform half. So the packed halves are read in place.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>

#include "common/highway_math.h"

namespace fusedres {

// "relu" | "tanh" | "sigmoid" | "identity" -> math::HighwayAct; anything else is an error naming the argument.
int parse_highway_activation(c10::string_view activation);

struct HighwayRows {
  int64_t rows = 0, cols = 0;
};

// One operand of a kernel: data pointer of its first element (of row 0) and its row stride in elements.
struct HighwayOperand {
  const void* data = nullptr;
  int64_t row_stride = 0;
};

}  // namespace fusedres

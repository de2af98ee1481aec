// The geometry and activation fields of the CPU kernels' arguments, set the same way by every host function
// (bn_act and its building blocks in cpu/bn_act.cpp, the dense op in cpu/dense.cpp); pointers are the caller's.
#pragma once

#include <ATen/ATen.h>

#include "bn_act.h"
#include "cpu/bn_act_kernel.h"

namespace fusedres {
namespace cpu {

// The activation mask a forward returns: the kernels write every byte of it (csrc/cpu/bn_act_kernel_impl.h,
// prepare_mask), so it is allocated uninitialised; zeros when the kernel does not run (no values).
inline at::Tensor mask_for(const BnActGeom& g, int act, const at::TensorOptions& opts) {
  const auto bytes = opts.dtype(at::kByte);
  if (!math::act_has_mask(act)) return at::empty({0}, bytes);
  const int64_t n = math::mask_bytes(g.numel());
  return g.numel() > 0 ? at::empty({n}, bytes) : at::zeros({n}, bytes);
}

// A forward's (save_mean, save_invstd, batch variance): training, written whole by the kernel (zeros only when it
// does not run: no values); eval, from the running statistics (var undefined).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> stat_outputs(const BnActGeom& g, bool training,
                                                                   const std::optional<at::Tensor>& running_mean,
                                                                   const std::optional<at::Tensor>& running_var,
                                                                   double eps, const at::TensorOptions& acc_opts) {
  if (!training) {
    auto [mean, invstd] = bn_act_eval_stats(*running_mean, *running_var, eps, acc_opts.dtype().toScalarType());
    return {mean, invstd, at::Tensor()};
  }
  auto alloc = [&] { return g.numel() > 0 ? at::empty({g.C}, acc_opts) : at::zeros({g.C}, acc_opts); };
  return {alloc(), alloc(), alloc()};
}

inline BnActForwardArgs forward_args(const BnActGeom& g, c10::ScalarType dtype, bool training, int act,
                                     double negative_slope, double eps) {
  BnActForwardArgs args{};
  args.dtype = dtype;
  args.N = g.N;
  args.C = g.C;
  args.S = g.S;
  args.channels_last = g.channels_last;
  args.training = training;
  args.act = act;
  args.negative_slope = negative_slope;
  args.eps = eps;
  return args;
}

inline BnActBackwardArgs backward_args(const BnActGeom& g, c10::ScalarType dtype, bool training, int act,
                                       double negative_slope) {
  BnActBackwardArgs args{};
  args.dtype = dtype;
  args.N = g.N;
  args.C = g.C;
  args.S = g.S;
  args.channels_last = g.channels_last;
  args.training = training;
  args.act = act;
  args.negative_slope = negative_slope;
  return args;
}

}  // namespace cpu
}  // namespace fusedres

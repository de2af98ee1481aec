// The geometry and activation fields of the CPU kernels' arguments, set the same way by every host function
// (bn_act and its building blocks in cpu/bn_act.cpp, the dense op in cpu/dense.cpp); pointers are the caller's.
#pragma once

#include "bn_act.h"
#include "cpu/bn_act_kernel.h"

namespace fusedres {
namespace cpu {

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

// Per-element math of the highway gate, shared by the CPU kernels, the CUDA kernels and the CUDA emulator tests.
// Plain C++ only (std::exp / std::tanh on the host, the CUDA math library's overloads on the device).
//   coupled:    T = sigmoid(g), H = act(h), y = H*T + x*(1 - T)
//   free carry: y = H*sigmoid(g) + x*sigmoid(c)
#pragma once

#include <cmath>

#include "common/bn_act_math.h"  // FUSEDRES_HD

namespace fusedres {
namespace math {

// Highway transform activations, the same numbers on every backend (see parse_highway_activation).
enum HighwayAct : int { kHwIdentity = 0, kHwReLU = 1, kHwTanh = 2, kHwSigmoid = 3 };

// Numerically stable logistic function: never evaluates exp of a positive argument, so no overflow for large |g|,
// exactly 1 at +inf and 0 at -inf (no NaN).
template <typename acc_t>
FUSEDRES_HD acc_t stable_sigmoid(acc_t g) {
  using std::exp;
  if (g >= acc_t(0)) return acc_t(1) / (acc_t(1) + exp(-g));
  const acc_t e = exp(g);
  return e / (acc_t(1) + e);
}

// H = act(h).
template <typename acc_t>
FUSEDRES_HD acc_t highway_act(acc_t h, int act) {
  using std::tanh;
  if (act == kHwReLU) return h < acc_t(0) ? acc_t(0) : h;  // NaN propagates like torch.relu
  if (act == kHwTanh) return tanh(h);
  if (act == kHwSigmoid) return stable_sigmoid(h);
  return h;
}

// up * act'(h) given H = act(h), up the gradient arriving at H. relu selects (up where h > 0, else 0) rather than
// multiplying by 0 / 1, as PyTorch's threshold_backward does: a NaN or infinite up (or h = NaN) gives 0 where the
// branch is off, not NaN.
template <typename acc_t>
FUSEDRES_HD acc_t highway_act_backward(acc_t up, acc_t h, acc_t H, int act) {
  if (act == kHwReLU) return h > acc_t(0) ? up : acc_t(0);
  if (act == kHwTanh) return up * (acc_t(1) - H * H);
  if (act == kHwSigmoid) return up * (H * (acc_t(1) - H));
  return up;
}

// Forward of one element. free_carry: c is the carry-gate logit; otherwise c is ignored.
template <typename acc_t>
FUSEDRES_HD acc_t highway_forward(acc_t h, acc_t g, acc_t x, acc_t c, int act, bool free_carry) {
  const acc_t H = highway_act(h, act);
  const acc_t T = stable_sigmoid(g);
  if (free_carry) return H * T + x * stable_sigmoid(c);
  return H * T + x * (acc_t(1) - T);
}

// Backward of one element: gradients w.r.t. h, g, x and (free carry) c. Recomputes T, H from the inputs.
//   coupled:    dh = dy*T*act'(h); dg = dy*(H - x)*T*(1 - T); dx = dy*(1 - T)
//   free carry: dh = dy*T*act'(h); dg = dy*H*T*(1 - T); dx = dy*S; dc = dy*x*S*(1 - S), S = sigmoid(c)
template <typename acc_t>
FUSEDRES_HD void highway_backward(acc_t dy, acc_t h, acc_t g, acc_t x, acc_t c, int act, bool free_carry, acc_t* dh,
                                  acc_t* dg, acc_t* dx, acc_t* dc) {
  const acc_t H = highway_act(h, act);
  const acc_t T = stable_sigmoid(g);
  *dh = highway_act_backward(dy * T, h, H, act);
  if (free_carry) {
    const acc_t S = stable_sigmoid(c);
    *dg = dy * H * T * (acc_t(1) - T);
    *dx = dy * S;
    *dc = dy * x * S * (acc_t(1) - S);
  } else {
    *dg = dy * (H - x) * T * (acc_t(1) - T);
    *dx = dy * (acc_t(1) - T);
    *dc = acc_t(0);
  }
}

}  // namespace math
}  // namespace fusedres

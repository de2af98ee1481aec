// Test library: the bn_act CUDA launch sequences (csrc/cuda/bn_act_launch.cuh and, for the dense ops,
// csrc/cuda/dense_launch.cuh: the very functions the .cu launchers call) run under the CUDA emulator (cuda_emu.h)
// on host buffers. Built by g++ at test time
// (tests/test_cuda_emulated.py) without torch headers and called through ctypes.
//
// Conventions of the C interface: dtype 0 float32, 1 float64, 2 float16, 3 bfloat16 (the last two only when
// emu_has_half()); per-channel arrays (weight, bias, statistics, parameter gradients) are in the accumulation
// type (float64 for float64, else float32); element buffers are dense in the given layout; optional outputs are
// nullptr when not wanted. Entry points return 0, or 1 after an emulator error (emu_last_error()). A leading
// dimension argument (y_ld, dy_ld) of 0 means dense; else the buffer is a channel slice (see BnActForwardBuffers).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "cuda/dense_launch.cuh"

namespace {

namespace gpu = fusedres::gpu;

// No device to ask for resident blocks (the launchers' bn_act_occupancy.h): the fixed figures, which the shapes of
// the tests were chosen for.
constexpr gpu::BnActOccupancy kOcc = gpu::kFixedOccupancy;

std::string g_error;

template <typename acc_t>
std::vector<acc_t> poisoned(int64_t n) {  // unwritten workspace reads show up as NaN
  return std::vector<acc_t>(static_cast<size_t>(n > 0 ? n : 1), std::numeric_limits<acc_t>::quiet_NaN());
}

template <typename scalar_t, typename acc_t>
void forward(const gpu::BnActLaunch& L, int training, int act, double eps, double slope, const void* x,
             const void* residual, const void* weight, const void* bias, void* save_mean, void* save_invstd, void* y,
             void* mask, void* batch_var, const gpu::StatVector& running_mean, const gpu::StatVector& running_var,
             double momentum) {
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::bn_act_forward_workspace_elems(L, training != 0));
  const gpu::BnActForwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(x),
                                                    static_cast<const scalar_t*>(residual),
                                                    static_cast<const acc_t*>(weight),
                                                    static_cast<const acc_t*>(bias),
                                                    static_cast<acc_t*>(save_mean),
                                                    static_cast<acc_t*>(save_invstd),
                                                    nullptr,
                                                    static_cast<scalar_t*>(y),
                                                    0,
                                                    static_cast<uint32_t*>(mask),
                                                    ws.data(),
                                                    running_mean,
                                                    running_var,
                                                    momentum};
  gpu::bn_act_forward_launch(L, b, training != 0, static_cast<acc_t>(eps), act, static_cast<acc_t>(slope), nullptr);
  if (training && batch_var != nullptr) {
    std::memcpy(batch_var, ws.data() + gpu::bn_act_forward_var_offset(L), sizeof(acc_t) * L.shape.C);
  }
}

template <typename scalar_t, typename acc_t>
void backward(const gpu::BnActLaunch& L, int training, int act, double slope, const void* grad_out, const void* x,
              const void* mask, const void* mean, const void* invstd, const void* weight, void* grad_input,
              void* grad_residual, void* grad_weight, void* grad_bias, const void* bias, const void* residual) {
  const int64_t C = L.shape.C;
  const bool need_sums = gpu::bn_act_backward_needs_sums(training != 0, grad_input != nullptr,
                                                         grad_weight != nullptr, grad_bias != nullptr);
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::bn_act_backward_workspace_elems(L, need_sums));
  std::vector<acc_t> sum_dz = poisoned<acc_t>(C), sum_dz_xhat = poisoned<acc_t>(C);
  const gpu::BnActBackwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(grad_out),
                                                     0,
                                                     static_cast<const scalar_t*>(x),
                                                     static_cast<const uint32_t*>(mask),
                                                     static_cast<const acc_t*>(mean),
                                                     static_cast<const acc_t*>(invstd),
                                                     static_cast<const acc_t*>(weight),
                                                     static_cast<scalar_t*>(grad_input),
                                                     static_cast<scalar_t*>(grad_residual),
                                                     need_sums ? sum_dz.data() : nullptr,
                                                     need_sums ? sum_dz_xhat.data() : nullptr,
                                                     ws.data(),
                                                     static_cast<const acc_t*>(bias),
                                                     static_cast<const scalar_t*>(residual)};
  gpu::bn_act_backward_launch(L, b, training != 0, act, static_cast<acc_t>(slope), nullptr);
  if (grad_weight != nullptr) std::memcpy(grad_weight, sum_dz_xhat.data(), sizeof(acc_t) * C);
  if (grad_bias != nullptr) std::memcpy(grad_bias, sum_dz.data(), sizeof(acc_t) * C);
}

template <typename scalar_t, typename acc_t>
void stats(const gpu::BnActLaunch& L, const void* x, void* mean, void* var) {
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::bn_act_forward_workspace_elems(L, true));
  std::vector<acc_t> invstd = poisoned<acc_t>(L.shape.C);
  const gpu::BnActForwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(x),
                                                    nullptr,
                                                    nullptr,
                                                    nullptr,
                                                    static_cast<acc_t*>(mean),
                                                    invstd.data(),
                                                    static_cast<acc_t*>(var),
                                                    nullptr,
                                                    0,
                                                    nullptr,
                                                    ws.data()};
  gpu::bn_act_forward_launch(L, b, true, acc_t(1), fusedres::math::kIdentity, acc_t(0), nullptr);
}

template <typename scalar_t, typename acc_t>
void elemt(const gpu::BnActLaunch& L, int act, double slope, const void* x, const void* residual, const void* weight,
           const void* bias, const void* mean, const void* invstd, void* y, int64_t y_ld, void* mask) {
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::bn_act_forward_workspace_elems(L, false));
  const gpu::BnActForwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(x),
                                                    static_cast<const scalar_t*>(residual),
                                                    static_cast<const acc_t*>(weight),
                                                    static_cast<const acc_t*>(bias),
                                                    const_cast<acc_t*>(static_cast<const acc_t*>(mean)),
                                                    const_cast<acc_t*>(static_cast<const acc_t*>(invstd)),
                                                    nullptr,
                                                    static_cast<scalar_t*>(y),
                                                    y_ld,
                                                    static_cast<uint32_t*>(mask),
                                                    ws.data()};
  gpu::bn_act_forward_launch(L, b, false, acc_t(0), act, static_cast<acc_t>(slope), nullptr);
}

// bn_act_backward_reduce (count < 0: sums written) or bn_act_backward_elemt (count >= 1: sums read).
template <typename scalar_t, typename acc_t>
void backward_split(const gpu::BnActLaunch& L, int act, double slope, const void* grad_out, int64_t dy_ld,
                    const void* x, const void* mask, const void* mean, const void* invstd, const void* weight,
                    void* sum_dz, void* sum_dz_xhat, int64_t count, void* grad_input, void* grad_residual) {
  const bool reduce = count < 0;
  std::vector<acc_t> ws = poisoned<acc_t>(reduce ? gpu::bn_act_backward_workspace_elems(L, true)
                                                 : gpu::bn_act_backward_elemt_workspace_elems(L));
  const gpu::BnActBackwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(grad_out),
                                                     dy_ld,
                                                     static_cast<const scalar_t*>(x),
                                                     static_cast<const uint32_t*>(mask),
                                                     static_cast<const acc_t*>(mean),
                                                     static_cast<const acc_t*>(invstd),
                                                     static_cast<const acc_t*>(weight),
                                                     static_cast<scalar_t*>(grad_input),
                                                     static_cast<scalar_t*>(grad_residual),
                                                     static_cast<acc_t*>(sum_dz),
                                                     static_cast<acc_t*>(sum_dz_xhat),
                                                     ws.data()};
  if (reduce) {
    gpu::bn_act_backward_launch(L, b, true, act, static_cast<acc_t>(slope), nullptr);
  } else {
    gpu::bn_act_backward_elemt_launch(L, b, count, act, static_cast<acc_t>(slope), nullptr);
  }
}

template <typename scalar_t, typename acc_t>
void dense_forward(const gpu::DenseLaunch& D, int reduce, int act, double eps, double slope, const void* const* xs,
                   const void* weight, const void* bias, void* mean, void* invstd, void* var, void* y, void* mask,
                   const gpu::StatVector& running_mean, const gpu::StatVector& running_var, double momentum) {
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::dense_forward_workspace_elems(D, reduce != 0));
  std::vector<const scalar_t*> x(D.inputs.size());
  for (size_t j = 0; j < x.size(); ++j) x[j] = static_cast<const scalar_t*>(xs[j]);
  const gpu::DenseForwardBuffers<scalar_t, acc_t> b{x.data(),
                                                    static_cast<const acc_t*>(weight),
                                                    static_cast<const acc_t*>(bias),
                                                    static_cast<acc_t*>(mean),
                                                    static_cast<acc_t*>(invstd),
                                                    static_cast<acc_t*>(var),
                                                    static_cast<scalar_t*>(y),
                                                    static_cast<uint32_t*>(mask),
                                                    ws.data(),
                                                    running_mean,
                                                    running_var,
                                                    momentum};
  gpu::dense_forward_launch(D, b, reduce != 0, static_cast<acc_t>(eps), act, static_cast<acc_t>(slope), nullptr);
}

template <typename scalar_t, typename acc_t>
void dense_backward(const gpu::DenseLaunch& D, int training, int want_params, int act, double slope,
                    const void* grad_out, const void* const* xs, const void* mask, const void* mean,
                    const void* invstd, const void* weight, void* const* grad_inputs, void* sum_dz,
                    void* sum_dz_xhat) {
  const bool need_sums = sum_dz != nullptr;
  std::vector<acc_t> ws = poisoned<acc_t>(gpu::dense_backward_workspace_elems(D, need_sums));
  std::vector<const scalar_t*> x(D.inputs.size());
  std::vector<scalar_t*> gi(D.inputs.size());
  for (size_t j = 0; j < x.size(); ++j) {
    x[j] = static_cast<const scalar_t*>(xs[j]);
    gi[j] = static_cast<scalar_t*>(grad_inputs[j]);
  }
  const gpu::DenseBackwardBuffers<scalar_t, acc_t> b{static_cast<const scalar_t*>(grad_out),
                                                     x.data(),
                                                     static_cast<const uint32_t*>(mask),
                                                     static_cast<const acc_t*>(mean),
                                                     static_cast<const acc_t*>(invstd),
                                                     static_cast<const acc_t*>(weight),
                                                     gi.data(),
                                                     static_cast<acc_t*>(sum_dz),
                                                     static_cast<acc_t*>(sum_dz_xhat),
                                                     ws.data()};
  gpu::dense_backward_launch(D, b, training != 0, want_params != 0, act, static_cast<acc_t>(slope), nullptr);
}

// Runs f<scalar_t, acc_t>() for the dtype code; returns 0, or 1 with g_error set.
template <typename F>
int dispatch(int dtype, F&& f) {
  g_error.clear();
  try {
    switch (dtype) {
      case 0: f(float{}, float{}); return 0;
      case 1: f(double{}, double{}); return 0;
#ifdef FUSEDRES_HAVE_CUDA_HALF
      case 2: f(__half{}, float{}); return 0;
      case 3: f(__nv_bfloat16{}, float{}); return 0;
#endif
      default: g_error = "unsupported dtype code " + std::to_string(dtype); return 1;
    }
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
}

}  // namespace

extern "C" {

int emu_has_half() {
#ifdef FUSEDRES_HAVE_CUDA_HALF
  return 1;
#else
  return 0;
#endif
}

// order: 0 ascending, 1 descending, 2 random (with seed). Resets fault injection.
void emu_configure(int order, unsigned seed) {
  emu::Config& c = emu::config();
  c.order = order == 1 ? emu::Order::Descending : order == 2 ? emu::Order::Random : emu::Order::Ascending;
  c.seed = seed;
  c.drop_sync_file.clear();
  c.drop_sync_line = 0;
}

// Makes the __syncthreads() at line `line` of the file whose path ends with `file_suffix` a no-op.
void emu_drop_sync(const char* file_suffix, int line) {
  emu::config().drop_sync_file = file_suffix != nullptr ? file_suffix : "";
  emu::config().drop_sync_line = line;
}

const char* emu_last_error() { return g_error.c_str(); }

// Kernels launched so far, one "count<TAB>kernel expression" line each, into buf (NUL-terminated when it fits);
// returns the length needed without the NUL.
int64_t emu_launch_log(char* buf, int64_t len) {
  std::string s;
  for (const auto& [name, count] : emu::launch_log()) s += std::to_string(count) + "\t" + name + "\n";
  if (buf != nullptr && len > static_cast<int64_t>(s.size())) std::memcpy(buf, s.c_str(), s.size() + 1);
  return static_cast<int64_t>(s.size());
}

// Launch shapes as the launchers compute them, into out[0..7]: P, reduce block x and y, elementwise grid, mask words,
// reduce grid x, warp spans, elementwise block. Resident blocks per SM (what the launchers get from the occupancy
// API): elementwise_occ / reduce_occ, or the fixed figures of the other entry points where 0.
void emu_launch_config(int64_t N, int64_t C, int64_t S, int channels_last, int has_mask, int num_sms,
                       int elementwise_occ, int reduce_occ, int64_t* out) {
  const gpu::BnActOccupancy occ{elementwise_occ > 0 ? elementwise_occ : kOcc.elementwise,
                                reduce_occ > 0 ? reduce_occ : kOcc.reduce};
  const gpu::BnActLaunch L = gpu::bn_act_launch_config(N, C, S, channels_last != 0, has_mask != 0, num_sms, occ);
  out[0] = L.shape.partials;
  out[1] = L.reduce_block.x;
  out[2] = L.reduce_block.y;
  out[3] = L.elementwise_grid.x;
  out[4] = L.shape.mask_words;
  out[5] = L.reduce_grid.x;
  out[6] = L.shape.warp_spans;
  out[7] = L.elementwise_block.x;
}

// Forward (bn_act_forward's kernels). Training writes save_mean, save_invstd and batch_var (biased, may be
// nullptr) and updates running_mean / running_var (dtype code rs_dtype, as StatDtype; nullptr: none) with momentum;
// eval with running statistics reads them and writes save_mean / save_invstd, without (running_mean nullptr) reads
// save_mean / save_invstd. mask: nullptr for identity, else mask_bytes(numel) bytes, 4-byte aligned.
int emu_bn_act_forward(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int training,
                       int act, double eps, double negative_slope, const void* x, const void* residual,
                       const void* weight, const void* bias, void* save_mean, void* save_invstd, void* y, void* mask,
                       void* batch_var, void* running_mean, void* running_var, int rs_dtype, double momentum) {
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  const gpu::StatVector rm{running_mean, rs_dtype}, rv{running_var, rs_dtype};
  return dispatch(dtype, [&](auto s, auto a) {
    forward<decltype(s), decltype(a)>(L, training, act, eps, negative_slope, x, residual, weight, bias, save_mean,
                                      save_invstd, y, mask, batch_var, rm, rv, momentum);
  });
}

// Backward (bn_act_backward's kernels): the outputs that are not nullptr are computed. bias (acc dtype [C]) and
// residual (nullptr: none) are read by silu only, which recomputes the pre-activation from them.
int emu_bn_act_backward(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int training,
                        int act, double negative_slope, const void* grad_out, const void* x, const void* mask,
                        const void* mean, const void* invstd, const void* weight, void* grad_input,
                        void* grad_residual, void* grad_weight, void* grad_bias, const void* bias,
                        const void* residual) {
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    backward<decltype(s), decltype(a)>(L, training, act, negative_slope, grad_out, x, mask, mean, invstd, weight,
                                       grad_input, grad_residual, grad_weight, grad_bias, bias, residual);
  });
}

// bn_stats: mean and biased variance (acc dtype [C]).
int emu_bn_stats(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, const void* x,
                 void* mean, void* var) {
  const gpu::BnActLaunch L = gpu::bn_act_launch_config(N, C, S, channels_last != 0, false, num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) { stats<decltype(s), decltype(a)>(L, x, mean, var); });
}

// bn_act_elemt: the eval-form forward with the given mean / invstd; y may be a channel slice (y_ld).
int emu_bn_act_elemt(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int act,
                     double negative_slope, const void* x, const void* residual, const void* weight, const void* bias,
                     const void* mean, const void* invstd, void* y, int64_t y_ld, void* mask) {
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    elemt<decltype(s), decltype(a)>(L, act, negative_slope, x, residual, weight, bias, mean, invstd, y, y_ld, mask);
  });
}

// bn_act_backward_reduce: sum_dz, sum_dz_xhat written; grad_out may be a channel slice (dy_ld).
int emu_bn_act_backward_reduce(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int act,
                               double negative_slope, const void* grad_out, int64_t dy_ld, const void* x,
                               const void* mask, const void* mean, const void* invstd, void* sum_dz,
                               void* sum_dz_xhat) {
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    backward_split<decltype(s), decltype(a)>(L, act, negative_slope, grad_out, dy_ld, x, mask, mean, invstd, nullptr,
                                             sum_dz, sum_dz_xhat, -1, nullptr, nullptr);
  });
}

// bn_act_backward_elemt: the gradients that are not nullptr, from the given sums over `count` values.
int emu_bn_act_backward_elemt(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int act,
                              double negative_slope, const void* grad_out, int64_t dy_ld, const void* x,
                              const void* mask, const void* mean, const void* invstd, const void* weight,
                              const void* sum_dz, const void* sum_dz_xhat, int64_t count, void* grad_input,
                              void* grad_residual) {
  const gpu::BnActLaunch L =
      gpu::bn_act_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    backward_split<decltype(s), decltype(a)>(L, act, negative_slope, grad_out, dy_ld, x, mask, mean, invstd, weight,
                                             const_cast<void*>(sum_dz), const_cast<void*>(sum_dz_xhat), count,
                                             grad_input, grad_residual);
  });
}

// Dense launch shape, into out[0..1 + 2 * k]: total mask words, output leading dimension, then per input its mask
// word offset and its channel offset.
void emu_dense_launch_config(int64_t k, int64_t N, int64_t S, const int64_t* channels, int channels_last,
                             int has_mask, int num_sms, int64_t* out) {
  const gpu::DenseLaunch D = gpu::dense_launch_config(N, S, std::vector<int64_t>(channels, channels + k),
                                                      channels_last != 0, has_mask != 0, num_sms, kOcc);
  out[0] = D.mask_words;
  out[1] = D.output_ld;
  for (int64_t j = 0; j < k; ++j) {
    out[2 + 2 * j] = D.mask_word_offset[j];
    out[3 + 2 * j] = D.channel_offset[j];
  }
}

// dense_bn_act_forward's kernels: xs[j] dense (N, channels[j], S); reduce = 1: batch statistics written to
// mean / invstd / var and running_mean / running_var (nullptr: none; dtype code rs_dtype) updated with momentum;
// else with running statistics they are normalised with (mean / invstd written), without them mean / invstd are
// read. y dense (N, sum channels, S); mask: all segments or nullptr.
int emu_dense_forward(int dtype, int64_t k, int64_t N, int64_t S, const int64_t* channels, int channels_last,
                      int num_sms, int reduce, int act, double eps, double negative_slope, const void* const* xs,
                      const void* weight, const void* bias, void* mean, void* invstd, void* var, void* y, void* mask,
                      void* running_mean, void* running_var, int rs_dtype, double momentum) {
  const gpu::DenseLaunch D = gpu::dense_launch_config(N, S, std::vector<int64_t>(channels, channels + k),
                                                      channels_last != 0, fusedres::math::act_has_mask(act),
                                                          num_sms, kOcc);
  const gpu::StatVector rm{running_mean, rs_dtype}, rv{running_var, rs_dtype};
  return dispatch(dtype, [&](auto s, auto a) {
    dense_forward<decltype(s), decltype(a)>(D, reduce, act, eps, negative_slope, xs, weight, bias, mean, invstd, var,
                                            y, mask, rm, rv, momentum);
  });
}

// dense_bn_act_backward's kernels: grad_inputs[j] nullptr when not wanted; sum_dz / sum_dz_xhat [C] (nullptr when
// no input needs them); want_params: every input's sums are computed.
int emu_dense_backward(int dtype, int64_t k, int64_t N, int64_t S, const int64_t* channels, int channels_last,
                       int num_sms, int training, int want_params, int act, double negative_slope,
                       const void* grad_out, const void* const* xs, const void* mask, const void* mean,
                       const void* invstd, const void* weight, void* const* grad_inputs, void* sum_dz,
                       void* sum_dz_xhat) {
  const gpu::DenseLaunch D = gpu::dense_launch_config(N, S, std::vector<int64_t>(channels, channels + k),
                                                      channels_last != 0, fusedres::math::act_has_mask(act),
                                                          num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    dense_backward<decltype(s), decltype(a)>(D, training, want_params, act, negative_slope, grad_out, xs, mask, mean,
                                             invstd, weight, grad_inputs, sum_dz, sum_dz_xhat);
  });
}

}  // extern "C"

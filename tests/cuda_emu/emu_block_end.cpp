// Test library: the block end CUDA launch sequences (csrc/cuda/block_end_launch.cuh, the very functions the .cu
// launcher calls) run under the CUDA emulator (cuda_emu.h) on host buffers. Built by g++ at test time
// (tests/test_cuda_emulated_block_end.py, with the build helper of tests/_cuda_emu.py) without torch headers and
// called through ctypes.
//
// Conventions of the C interface: dtype 0 float32, 1 float64, 2 float16, 3 bfloat16 (the last two only when
// emu_has_half()); per-channel and per-sample arrays (weight, bias, statistics, scale, sums) are in the accumulation
// type; x, y, grad_out, grad_input and grad_residual are dense in the given layout; the residual is a pointer with
// (channels, stride_n, stride_c, spatial offsets or nullptr) as BlockEndResidualLayout describes it; the scale is
// nullptr (none) or [N] / [N, C] (per_channel); outputs not wanted are nullptr. Entry points return 0, or 1 after an
// emulator error (emu_last_error()). The workspaces are filled with NaN, so a read of an unwritten element shows.
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "cuda/block_end_launch.cuh"

namespace {

namespace gpu = fusedres::gpu;

// No device to ask for resident blocks (the launchers' bn_act_occupancy.h): the fixed figures, which the shapes of
// the tests were chosen for.
constexpr gpu::BnActOccupancy kOcc = gpu::kFixedOccupancy;

std::string g_error;

template <typename acc_t>
std::vector<acc_t> poisoned(int64_t n) {
  return std::vector<acc_t>(static_cast<size_t>(n > 0 ? n : 1), std::numeric_limits<acc_t>::quiet_NaN());
}

template <typename acc_t>
gpu::BlockEndScaleView<acc_t> scale_view(const void* scale, int per_channel, int64_t C) {
  return {static_cast<const acc_t*>(scale), per_channel != 0, C};
}

// Runs f(scalar_t{}, acc_t{}) for the dtype code; returns 0, or 1 with g_error set.
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

const char* emu_last_error() { return g_error.c_str(); }

// Kernels launched so far, one "count<TAB>kernel expression" line each, into buf (NUL-terminated when it fits);
// returns the length needed without the NUL.
int64_t emu_launch_log(char* buf, int64_t len) {
  std::string s;
  for (const auto& [name, count] : emu::launch_log()) s += std::to_string(count) + "\t" + name + "\n";
  if (buf != nullptr && len > static_cast<int64_t>(s.size())) std::memcpy(buf, s.c_str(), s.size() + 1);
  return static_cast<int64_t>(s.size());
}

// Launch shapes of the per-sample reduction, into out[0..3]: samples per launch, grid x, block x, block y.
void emu_block_end_launch_config(int64_t N, int64_t C, int64_t S, int channels_last, int num_sms,
                                 int64_t max_samples_per_launch, int64_t* out) {
  const gpu::BlockEndLaunch L =
      gpu::block_end_launch_config(N, C, S, channels_last != 0, true, num_sms, kOcc,
                                   max_samples_per_launch);
  out[0] = L.samples_per_launch;
  out[1] = L.sample_reduce_grid_x;
  out[2] = L.sample_reduce_block.x;
  out[3] = L.sample_reduce_block.y;
}

// Forward. Training writes save_mean, save_invstd and var; eval reads save_mean / save_invstd (running mean,
// 1/sqrt(running_var + eps)). mask: nullptr for identity, else mask_bytes(numel) bytes, 4-byte aligned.
int emu_block_end_forward(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms, int training,
                          int act, double eps, double negative_slope, const void* x, const void* residual,
                          int64_t residual_channels, int64_t stride_n, int64_t stride_c,
                          const int64_t* spatial_offset, const void* scale, int scale_per_channel,
                          const void* weight, const void* bias, void* save_mean, void* save_invstd, void* var,
                          void* y, void* mask, void* running_mean, void* running_var, int rs_dtype,
                          double momentum) {
  const gpu::BlockEndLaunch L =
      gpu::block_end_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc);
  return dispatch(dtype, [&](auto s, auto a) {
    using T = decltype(s);
    using A = decltype(a);
    std::vector<A> ws = poisoned<A>(gpu::block_end_forward_workspace_elems(L, training != 0));
    const gpu::BlockEndForwardBuffers<T, A> b{
        static_cast<const T*>(x),
        {static_cast<const T*>(residual), residual != nullptr ? residual_channels : 0, stride_n, stride_c,
         spatial_offset},
        scale_view<A>(scale, scale_per_channel, C),
        static_cast<const A*>(weight),
        static_cast<const A*>(bias),
        static_cast<A*>(save_mean),
        static_cast<A*>(save_invstd),
        static_cast<A*>(var),
        static_cast<T*>(y),
        static_cast<uint32_t*>(mask),
        ws.data(),
        gpu::StatVector{running_mean, rs_dtype},
        gpu::StatVector{running_var, rs_dtype},
        momentum};
    gpu::block_end_forward_launch(L, b, training != 0, static_cast<A>(eps), act, static_cast<A>(negative_slope),
                                  nullptr);
  });
}

// Backward: the outputs that are not nullptr are computed. nc_sums: [2][N][C] (sum dz, sum dz * (x - mean)) per
// (n, c); sum_dz / sum_dz_xhat: grad_bias / grad_weight in the accumulation type. max_samples_per_launch: the
// per-sample reduction's grid y bound (the hardware's when <= 0).
int emu_block_end_backward(int dtype, int64_t N, int64_t C, int64_t S, int channels_last, int num_sms,
                           int64_t max_samples_per_launch, int training, int act, double negative_slope,
                           const void* grad_out, const void* x, const void* mask, const void* mean,
                           const void* invstd, const void* weight, const void* beta, int beta_per_channel,
                           void* grad_input, void* grad_residual, int64_t residual_channels, void* nc_sums,
                           void* sum_dz, void* sum_dz_xhat) {
  const gpu::BlockEndLaunch L =
      gpu::block_end_launch_config(N, C, S, channels_last != 0, fusedres::math::act_has_mask(act), num_sms, kOcc,
                                   max_samples_per_launch > 0 ? max_samples_per_launch : gpu::kMaxGridY);
  return dispatch(dtype, [&](auto s, auto a) {
    using T = decltype(s);
    using A = decltype(a);
    std::vector<A> ws = poisoned<A>(gpu::block_end_backward_workspace_elems(L));
    const gpu::BlockEndBackwardBuffers<T, A> b{static_cast<const T*>(grad_out),
                                               static_cast<const T*>(x),
                                               static_cast<const uint32_t*>(mask),
                                               static_cast<const A*>(mean),
                                               static_cast<const A*>(invstd),
                                               static_cast<const A*>(weight),
                                               scale_view<A>(beta, beta_per_channel, C),
                                               static_cast<T*>(grad_input),
                                               static_cast<T*>(grad_residual),
                                               residual_channels,
                                               static_cast<A*>(nc_sums),
                                               static_cast<A*>(sum_dz),
                                               static_cast<A*>(sum_dz_xhat),
                                               ws.data()};
    gpu::block_end_backward_launch(L, b, training != 0, act, static_cast<A>(negative_slope), nullptr);
  });
}

}  // extern "C"

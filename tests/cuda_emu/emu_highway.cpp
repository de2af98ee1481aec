// Test library: the highway CUDA launch sequences (csrc/cuda/highway_launch.cuh, the very functions the .cu
// launcher calls) run under the CUDA emulator (cuda_emu.h) on host buffers. Built by g++ at test time
// (tests/test_cuda_emulated_highway.py) without torch headers and called through ctypes.
//
// Conventions of the C interface: dtype 0 float32, 1 float64, 2 float16, 3 bfloat16 (the last two only when
// emu_has_half()). Every operand is a pointer to its element (0, 0) and a row stride in elements (the rows view of
// csrc/highway.h); absent inputs (carry_gate of the coupled form) and outputs not wanted are nullptr. Entry points
// return 0, or 1 after an emulator error (emu_last_error()).
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#include "cuda/highway_launch.cuh"

namespace {

namespace gpu = fusedres::gpu;

std::string g_error;

template <typename T>
gpu::HighwayIn<T> in(const void* p, int64_t stride) {
  return {static_cast<const T*>(p), stride};
}

template <typename T>
gpu::HighwayOut<T> out(void* p, int64_t stride) {
  return {static_cast<T*>(p), stride};
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

// order: 0 ascending, 1 descending, 2 random (with seed).
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

// Launch shape as the launcher computes it for the strided walk (per_thread = 4) or the aligned one (per_thread =
// 16 / element size), into out[0..3]: grid x, grid y, block x, block y.
void emu_highway_launch_config(int64_t rows, int64_t cols, int num_sms, int per_thread, int64_t* o) {
  const gpu::HighwayLaunch L = gpu::highway_launch_config(rows, cols, num_sms, per_thread);
  o[0] = L.grid.x;
  o[1] = L.grid.y;
  o[2] = L.block.x;
  o[3] = L.block.y;
}

// y = highway(h, g, x[, c]); c == nullptr: the coupled form.
int emu_highway_forward(int dtype, int64_t rows, int64_t cols, int num_sms, int act, const void* h, int64_t hs,
                        const void* g, int64_t gs, const void* x, int64_t xs, const void* c, int64_t cs, void* y,
                        int64_t ys) {
  return dispatch(dtype, [&](auto s, auto a) {
    using T = decltype(s);
    const gpu::HighwayForwardKernelArgs<T> args{in<T>(h, hs), in<T>(g, gs), in<T>(x, xs), in<T>(c, cs),
                                                out<T>(y, ys), act};
    gpu::highway_forward_launch<T, decltype(a)>({rows, cols}, num_sms, args, nullptr);
  });
}

// The gradients whose pointers are not nullptr.
int emu_highway_backward(int dtype, int64_t rows, int64_t cols, int num_sms, int act, const void* dy, int64_t dys,
                         const void* h, int64_t hs, const void* g, int64_t gs, const void* x, int64_t xs,
                         const void* c, int64_t cs, void* dh, int64_t dhs, void* dg, int64_t dgs, void* dx,
                         int64_t dxs, void* dc, int64_t dcs) {
  return dispatch(dtype, [&](auto s, auto a) {
    using T = decltype(s);
    const gpu::HighwayBackwardKernelArgs<T> args{in<T>(dy, dys),  in<T>(h, hs),    in<T>(g, gs),
                                                 in<T>(x, xs),    in<T>(c, cs),    out<T>(dh, dhs),
                                                 out<T>(dg, dgs), out<T>(dx, dxs), out<T>(dc, dcs),
                                                 act};
    gpu::highway_backward_launch<T, decltype(a)>({rows, cols}, num_sms, args, nullptr);
  });
}

}  // extern "C"

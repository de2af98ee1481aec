// oneDNN's batch normalization with its fused ReLU, training forward + backward, NHWC float32: the reference
// point issue 12 names for the fused op on CPU ("the best CPU BatchNorm we know of"). Built and driven by
// benchmarks/onednn/compare.py, which times fusedres.batch_norm_act on the same shapes in the same run.
//
// Usage: bn_relu N C H W ITERS [cold]
// Prints one line per timed iteration pair: "fwd_ms bwd_ms". Buffers are allocated once and reused, as benchdnn
// does (the tensors stay in cache when they fit); `cold` streams a 64 MiB buffer between iterations so that
// every call starts with its tensors out of cache, as in a network's training step.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

using namespace dnnl;
using clk = std::chrono::steady_clock;

static double ms_since(clk::time_point t) {
  return std::chrono::duration<double, std::milli>(clk::now() - t).count();
}

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s N C H W ITERS [cold]\n", argv[0]);
    return 2;
  }
  const memory::dim N = std::atol(argv[1]), C = std::atol(argv[2]), H = std::atol(argv[3]), W = std::atol(argv[4]);
  const int iters = std::atoi(argv[5]);
  const bool cold = argc > 6 && std::string(argv[6]) == "cold";

  engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const memory::desc data_md({N, C, H, W}, memory::data_type::f32, memory::format_tag::nhwc);
  const memory::desc chan_md({C}, memory::data_type::f32, memory::format_tag::x);
  const auto flags = normalization_flags::use_scale | normalization_flags::use_shift |
                     normalization_flags::fuse_norm_relu;
  const float eps = 1e-5f;
  auto fwd_pd = batch_normalization_forward::primitive_desc(eng, prop_kind::forward_training, data_md, data_md,
                                                            eps, flags);
  auto bwd_pd = batch_normalization_backward::primitive_desc(eng, prop_kind::backward, data_md, data_md, data_md,
                                                             eps, flags, fwd_pd);
  memory src(data_md, eng), dst(data_md, eng), diff_dst(data_md, eng), diff_src(data_md, eng);
  memory scale(chan_md, eng), shift(chan_md, eng), diff_scale(chan_md, eng), diff_shift(chan_md, eng);
  memory mean(fwd_pd.mean_desc(), eng), var(fwd_pd.variance_desc(), eng), ws(fwd_pd.workspace_desc(), eng);

  const size_t n = static_cast<size_t>(N * C * H * W);
  auto* s = static_cast<float*>(src.get_data_handle());
  auto* dd = static_cast<float*>(diff_dst.get_data_handle());
  unsigned seed = 1;
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    s[i] = static_cast<float>(seed >> 8) / 16777216.0f * 2.0f - 1.0f;
    dd[i] = static_cast<float>((seed >> 4) & 0xffff) / 65536.0f - 0.5f;
  }
  for (memory::dim c = 0; c < C; ++c) {
    static_cast<float*>(scale.get_data_handle())[c] = 1.0f + 0.01f * static_cast<float>(c);
    static_cast<float*>(shift.get_data_handle())[c] = 0.1f;
  }
  batch_normalization_forward fwd(fwd_pd);
  batch_normalization_backward bwd(bwd_pd);
  std::vector<char> flush(cold ? (64u << 20) : 0);
  volatile char sink = 0;

  for (int it = -3; it < iters; ++it) {  // three untimed warm-up iterations
    if (cold) {
      for (size_t i = 0; i < flush.size(); i += 64) flush[i] = static_cast<char>(flush[i] + 1);
      sink = flush[it & 1023];
    }
    auto t0 = clk::now();
    fwd.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift},
                       {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_WORKSPACE, ws}});
    strm.wait();
    const double f = ms_since(t0);
    if (cold) {
      for (size_t i = 0; i < flush.size(); i += 64) flush[i] = static_cast<char>(flush[i] + 1);
    }
    auto t1 = clk::now();
    bwd.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_SCALE, scale},
                       {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}, {DNNL_ARG_WORKSPACE, ws},
                       {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, diff_scale},
                       {DNNL_ARG_DIFF_SHIFT, diff_shift}});
    strm.wait();
    const double b = ms_since(t1);
    if (it >= 0) std::printf("%.4f %.4f\n", f, b);
  }
  (void)sink;
  return 0;
}

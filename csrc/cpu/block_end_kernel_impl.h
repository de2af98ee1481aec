// Vectorised, multithreaded CPU kernels of the block end y = act(s * batch_norm(x) + r) (docs/design.md section 10),
// built on the primitives of bn_act_kernel_impl.h (included before this header in the same translation unit, once
// per CPU capability).
//
// The scale s (per sample, or per sample and channel) makes the normalise an affine map per (n, c):
//   z = (x - center_c) * (s_nc * scale_c) + s_nc * shift_c + r      (FwdCoef's centre / scale / shift, scaled)
// so the forward is BatchNorm's statistics pass plus one forward_run per NCHW plane (per-run coefficients) or per
// channels_last row (the sample's coefficient arrays). The backward needs, per (n, c), A = sum dz and
// B = sum dz * (x - mean): the branch's gradient g = beta_nc * dz (beta: the backward scale) sums per channel to
// sum g = sum_n beta A and sum g * (x - mean) = sum_n beta B, and the forward scale's gradient is
// sum dz * batch_norm(x) = w * invstd * B + b * A. Then
//   dx = (w * invstd * beta_nc) * dz - d_c - (x - mean_c) * q_c,
//   d_c = w * invstd * sum g / M, q_c = w * invstd^2 * sum g (x - mean) / M     (training; eval: d = q = 0).
// A sample whose per-sample scale is 0 (a dropped block) costs what the math needs: its forward reads only the
// residual, its sums are skipped, its dx reads only x.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including block_end_kernel_impl.h"
#endif

#include "cpu/block_end_kernel.h"

namespace fusedres {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// The residual's runs where they lie: a plane (NCHW) or a row's first Cr values (channels_last) as a pointer to
// contiguous values, gathered into the caller's buffer only when the view is not contiguous there.
template <typename T>
struct ResidualRuns {
  const T* base;
  int64_t Cr, stride_n, stride_c, S;
  const int64_t* soff;
  bool planes_dense;

  explicit ResidualRuns(const BlockEndResidual& r, int64_t S_)
      : base(static_cast<const T*>(r.data)), Cr(r.data != nullptr ? r.channels : 0), stride_n(r.stride_n),
        stride_c(r.stride_c), S(S_), soff(r.spatial_offset), planes_dense(r.planes_dense) {}

  const T* plane(int64_t n, int64_t c, T* buf) const {
    const T* p = base + n * stride_n + c * stride_c;
    if (planes_dense) return p;
    for (int64_t s = 0; s < S; ++s) buf[s] = p[soff[s]];
    return buf;
  }
  const T* row(int64_t n, int64_t s, T* buf) const {
    const T* p = base + n * stride_n + soff[s];
    if (stride_c == 1) return p;
    for (int64_t c = 0; c < Cr; ++c) buf[c] = p[c * stride_c];
    return buf;
  }
};

// The per-(n, c) branch scale, 1 when there is none.
template <typename acc_t>
struct ScaleOf {
  const acc_t* s;
  bool per_channel;
  int64_t C;
  explicit ScaleOf(const BlockEndScale& sc, int64_t C_)
      : s(static_cast<const acc_t*>(sc.data)), per_channel(sc.per_channel), C(C_) {}
  acc_t operator()(int64_t n, int64_t c) const { return s == nullptr ? acc_t(1) : s[per_channel ? n * C + c : n]; }
  // A per-sample scale of 0: the sample's branch is dropped.
  bool dropped(int64_t n) const { return s != nullptr && !per_channel && s[n] == acc_t(0); }
};

// y = act(0) = 0 for `len` values (every supported activation maps 0 to 0, and its mask bit for 0 is 0).
template <typename T, int ACT>
void zero_run(T* y, int64_t len, BitWriter* bw) {
  std::fill(y, y + len, T(0));
  if constexpr (kMaskAct<ACT>) {
    for (int64_t i = 0; i < len; i += 32) bw->append(0u, static_cast<int>(std::min<int64_t>(32, len - i)));
  }
}

template <typename T, int ACT>
void block_end_forward_typed(const BlockEndForwardArgs& a) {
  using acc_t = acc_type_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t* b = static_cast<const acc_t*>(a.bias);
  acc_t* mean = static_cast<acc_t*>(a.mean);
  acc_t* invstd = static_cast<acc_t*>(a.invstd);
  acc_t* var = static_cast<acc_t*>(a.var);
  const acc_t slope = static_cast<acc_t>(a.negative_slope);
  const int64_t N = a.N, C = a.C, S = a.S, M = N * S;
  const ResidualRuns<T> res(a.residual, S);
  const int64_t Cr = res.Cr;
  const ScaleOf<acc_t> scale(a.scale, C);
  if constexpr (kMaskAct<ACT>) prepare_mask(a.mask, N * C * S, false);  // BitWriter ORs the words runs share
  const acc_t zero(0), one(1);

  // Channel c's coefficients: from the batch statistics (training, written out too) or the given ones (eval).
  auto coef = [&](int64_t c, double mu, double v) {
    if (!a.training) return FwdCoef<acc_t>{mean[c], w[c] * invstd[c], b[c]};
    const double is = 1.0 / std::sqrt(v + a.eps);
    mean[c] = static_cast<acc_t>(mu);
    var[c] = static_cast<acc_t>(v);
    invstd[c] = static_cast<acc_t>(is);
    return FwdCoef<acc_t>::from(mu, is, w[c], b[c]);
  };

  if (!a.channels_last) {
    auto plane = [&](int64_t n, int64_t c, const FwdCoef<acc_t>& k, T* buf, BitWriter& bw) {
      const int64_t off = (n * C + c) * S;
      const T* r = c < Cr ? res.plane(n, c, buf) : nullptr;
      if (scale.dropped(n)) {
        if (r != nullptr) {
          forward_run<T, ACT, false, false>(r, nullptr, y + off, S, &zero, &one, &zero, slope, &bw);
        } else {
          zero_run<T, ACT>(y + off, S, &bw);
        }
        return;
      }
      const acc_t s = scale(n, c), ks = s * k.scale, kb = s * k.shift;
      if (r != nullptr) {
        forward_run<T, ACT, true, false>(x + off, r, y + off, S, &k.center, &ks, &kb, slope, &bw);
      } else {
        forward_run<T, ACT, false, false>(x + off, nullptr, y + off, S, &k.center, &ks, &kb, slope, &bw);
      }
    };
    // Every channel's statistics, then the planes in memory order, one mask writer per task (atomics only at its
    // ends), as bn_act's forward for cache-resident tensors.
    std::vector<FwdCoef<acc_t>> k(C);
    at::parallel_for(0, C, channel_grain(M), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double mu = 0, v = 0;
        if (a.training) stats_nchw_channel(x, N, C, S, c, mu, v);
        k[c] = coef(c, mu, v);
      }
    });
    const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, S));
    at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
      std::vector<T> buf(res.planes_dense ? 0 : S);
      BitWriter bw(a.mask, p0 * S, p1 * S);
      for (int64_t p = p0; p < p1; ++p) plane(p / C, p % C, k[p % C], buf.data(), bw);
    });
    return;
  }

  // channels_last: statistics over all rows, then each sample's coefficient arrays, then one pass over rows.
  std::vector<double> mu(C, 0.0), v(C, 0.0);
  if (a.training) stats_channels_last<T>(x, M, C, mu.data(), v.data());
  std::vector<acc_t> center(C), kscale(C), kshift(C);
  for (int64_t c = 0; c < C; ++c) {
    const FwdCoef<acc_t> k = coef(c, mu[c], v[c]);
    center[c] = k.center;
    kscale[c] = k.scale;
    kshift[c] = k.shift;
  }
  std::vector<acc_t> sscale(N * C), sshift(N * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t s = scale(n, c);
      sscale[n * C + c] = s * kscale[c];
      sshift[n * C + c] = s * kshift[c];
    }
  }
  const std::vector<acc_t> zeros(C, acc_t(0)), ones(C, acc_t(1));
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, C));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> buf(Cr);
    BitWriter bw(a.mask, r0 * C, r1 * C);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / S, off = row * C;
      const T* r = Cr > 0 ? res.row(n, row - n * S, buf.data()) : nullptr;
      if (scale.dropped(n)) {
        if (Cr > 0) {
          forward_run<T, ACT, false, true>(r, nullptr, y + off, Cr, zeros.data(), ones.data(), zeros.data(), slope,
                                           &bw);
        }
        if (C > Cr) zero_run<T, ACT>(y + off + Cr, C - Cr, &bw);
        continue;
      }
      const acc_t* ks = sscale.data() + n * C;
      const acc_t* kb = sshift.data() + n * C;
      if (Cr > 0) forward_run<T, ACT, true, true>(x + off, r, y + off, Cr, center.data(), ks, kb, slope, &bw);
      if (C > Cr) {
        forward_run<T, ACT, false, true>(x + off + Cr, nullptr, y + off + Cr, C - Cr, center.data() + Cr, ks + Cr,
                                         kb + Cr, slope, &bw);
      }
    }
  });
}

// The backward's elementwise pass over one run: dx = a * dz - d - (x - mean) * q (TRAIN; eval: a * dz) and
// dr = dz on the run's first dr_len values. PER_ELEM: mean / a / d / q are arrays indexed like the run (a
// channels_last row), else single values. DZ = false: the branch's scale is 0 and no dr is wanted, so dz is not
// needed (dy and the mask are not read): dx = -d - (x - mean) * q.
template <typename T, int ACT, bool PER_ELEM, bool TRAIN, bool DZ>
void block_end_backward_run(const T* dy, const T* x, T* dx, T* dr, int64_t len, int64_t dr_len, BitReader* br,
                            const acc_type_t<T>* mean, const acc_type_t<T>* a, const acc_type_t<T>* d,
                            const acc_type_t<T>* q, acc_type_t<T> slope) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const V vslope(slope), vmean(mean[0]), va(a[0]), vd(TRAIN ? d[0] : 0), vq(TRAIN ? q[0] : 0);
  // One vector (n == W) or the run's tail (n < W lanes).
  auto step = [&](int64_t i, int n) {
    const bool full = n == W;
    V dz(0);
    if constexpr (DZ) {
      const V g = full ? IO::load(dy + i) : IO::load_n(dy + i, n);
      dz = full ? dz_vec<ACT>(g, br, vslope) : dz_vec_n<ACT>(g, br, vslope, n);
    }
    if (dr != nullptr && i < dr_len) {
      const int64_t m = std::min<int64_t>(n, dr_len - i);
      if (m == W) {
        IO::store(dr + i, dz);
      } else {
        IO::store_n(dr + i, dz, static_cast<int>(m));
      }
    }
    if (dx == nullptr) return;
    V out = DZ ? (PER_ELEM ? (full ? V::loadu(a + i) : V::loadu(a + i, n)) : va) * dz : V(0);
    if constexpr (TRAIN) {
      const V m = PER_ELEM ? (full ? V::loadu(mean + i) : V::loadu(mean + i, n)) : vmean;
      const V dd = PER_ELEM ? (full ? V::loadu(d + i) : V::loadu(d + i, n)) : vd;
      const V qq = PER_ELEM ? (full ? V::loadu(q + i) : V::loadu(q + i, n)) : vq;
      const V xv = full ? IO::load(x + i) : IO::load_n(x + i, n);
      out = out - dd - (xv - m) * qq;
    }
    if (full) {
      IO::store(dx + i, out);
    } else {
      IO::store_n(dx + i, out, n);
    }
  };
  int64_t i = 0;
  for (; i + W <= len; i += W) step(i, W);
  if (i < len) step(i, static_cast<int>(len - i));
}

template <typename T, int ACT, bool TRAIN>
void block_end_backward_typed(const BlockEndBackwardArgs& a) {
  using acc_t = acc_type_t<T>;
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.dx);
  T* dr = static_cast<T*>(a.dresidual);
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t slope = static_cast<acc_t>(a.negative_slope);
  const int64_t N = a.N, C = a.C, S = a.S, M = N * S;
  const int64_t Cr = dr != nullptr ? a.residual_channels : 0;
  const ScaleOf<acc_t> beta(a.scale, C);
  const bool want_nc = a.nc_sums != nullptr;
  const bool want_c = a.c_sums != nullptr || (TRAIN && dx != nullptr);
  const bool elementwise = dx != nullptr || dr != nullptr;
  // Per (n, c): A = sum dz, B = sum dz * (x - mean), in double; a (n, c) whose sums nothing uses is skipped.
  std::vector<double> A(N * C, 0.0), B(N * C, 0.0);
  auto sums_needed = [&](int64_t n, int64_t c) { return want_nc || (want_c && beta(n, c) != acc_t(0)); };
  // Per channel: sg = sum beta A, sgx = sum beta B; the elementwise coefficients d and q from them.
  std::vector<double> sg(C, 0.0), sgx(C, 0.0);
  std::vector<acc_t> kd(C, acc_t(0)), kq(C, acc_t(0)), wi(C);
  auto channel_sums = [&](int64_t c) {
    for (int64_t n = 0; n < N; ++n) {
      const double bt = static_cast<double>(beta(n, c));
      if (bt != 0.0) {
        sg[c] += bt * A[n * C + c];
        sgx[c] += bt * B[n * C + c];
      }
    }
    const double wis = static_cast<double>(w[c]) * static_cast<double>(invstd[c]);
    wi[c] = static_cast<acc_t>(wis);
    if (TRAIN) {
      kd[c] = static_cast<acc_t>(wis * sg[c] / static_cast<double>(M));
      kq[c] = static_cast<acc_t>(wis * static_cast<double>(invstd[c]) * static_cast<double>(invstd[c]) * sgx[c] /
                                 static_cast<double>(M));
    }
  };

  if (!a.channels_last) {
    // One thread per channel: its planes' sums, then their elementwise pass while they are in L2.
    at::parallel_for(0, C, channel_grain(M), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          if (!sums_needed(n, c)) continue;
          const int64_t off = (n * C + c) * S;
          BitReader br(a.mask, off);
          backward_reduce_run<T, ACT>(dy + off, x + off, S, &br, mean[c], slope, A[n * C + c], B[n * C + c]);
        }
        channel_sums(c);
        if (!elementwise) continue;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * S;
          T* drp = c < Cr ? dr + (n * Cr + c) * S : nullptr;
          T* dxp = dx != nullptr ? dx + off : nullptr;
          const acc_t an = wi[c] * beta(n, c);
          BitReader br(a.mask, off);
          if (an == acc_t(0) && drp == nullptr) {
            if (dxp == nullptr) continue;
            if constexpr (TRAIN) {
              block_end_backward_run<T, ACT, false, true, false>(dy + off, x + off, dxp, nullptr, S, 0, &br, &mean[c],
                                                                 &an, &kd[c], &kq[c], slope);
            } else {
              std::fill(dxp, dxp + S, T(0));
            }
            continue;
          }
          block_end_backward_run<T, ACT, false, TRAIN, true>(dy + off, x + off, dxp, drp, S, S, &br, &mean[c], &an,
                                                             &kd[c], &kq[c], slope);
        }
      }
    });
  } else {
    // channels_last: each sample's column sums (one thread per sample, blocks of rows folded into double).
    const int64_t block = std::min<int64_t>(kReduceBlock, rows_per_block(C, sizeof(T)));
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> s1(C), s2(C);
      for (int64_t n = n0; n < n1; ++n) {
        bool any = false;
        for (int64_t c = 0; c < C && !any; ++c) any = sums_needed(n, c);
        if (!any) continue;
        for (int64_t b0 = n * S; b0 < (n + 1) * S; b0 += block) {
          const int64_t nb = std::min((n + 1) * S, b0 + block) - b0;
          std::fill(s1.begin(), s1.end(), acc_t(0));
          std::fill(s2.begin(), s2.end(), acc_t(0));
          column_reduce<T, kGrad, ACT>(x, dy, C, a.mask, b0, nb, C, mean, slope, s1.data(), s2.data());
          for (int64_t c = 0; c < C; ++c) {
            A[n * C + c] += static_cast<double>(s1[c]);
            B[n * C + c] += static_cast<double>(s2[c]);
          }
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) channel_sums(c);
    if (elementwise) {
      std::vector<acc_t> ka(N * C);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) ka[n * C + c] = wi[c] * beta(n, c);
      }
      const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, C));
      at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t n = row / S, off = row * C;
          T* dxp = dx != nullptr ? dx + off : nullptr;
          T* drp = Cr > 0 ? dr + row * Cr : nullptr;
          BitReader br(a.mask, off);
          if (beta.dropped(n) && drp == nullptr) {
            if (dxp == nullptr) continue;
            if constexpr (TRAIN) {
              block_end_backward_run<T, ACT, true, true, false>(dy + off, x + off, dxp, nullptr, C, 0, &br, mean,
                                                                ka.data() + n * C, kd.data(), kq.data(), slope);
            } else {
              std::fill(dxp, dxp + C, T(0));
            }
            continue;
          }
          block_end_backward_run<T, ACT, true, TRAIN, true>(dy + off, x + off, dxp, drp, C, Cr, &br, mean,
                                                            ka.data() + n * C, kd.data(), kq.data(), slope);
        }
      });
    }
  }

  if (want_nc) {
    acc_t* out = static_cast<acc_t*>(a.nc_sums);
    for (int64_t i = 0; i < N * C; ++i) {
      out[i] = static_cast<acc_t>(A[i]);
      out[N * C + i] = static_cast<acc_t>(B[i]);
    }
  }
  if (a.c_sums != nullptr) {
    acc_t* out = static_cast<acc_t*>(a.c_sums);
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<acc_t>(sg[c]);
      out[C + c] = static_cast<acc_t>(sgx[c] * static_cast<double>(invstd[c]));
    }
  }
}

// The activations of the block end: identity and the mask ones (SiLU's backward would recompute z from a scaled,
// padded residual; its host code refuses it before any kernel).
template <typename F>
void dispatch_mask_act(int act, F&& f) {
  if (act == kReLU6) {
    f(std::integral_constant<int, kReLU6>{});
  } else {
    dispatch_basic_act(act, f);
  }
}

}  // namespace

void block_end_forward_kernel(const BlockEndForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "block_end_forward_cpu", [&] {
    dispatch_mask_act(args.act, [&](auto act) { block_end_forward_typed<scalar_t, act()>(args); });
  });
}

void block_end_backward_kernel(const BlockEndBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "block_end_backward_cpu", [&] {
    dispatch_mask_act(args.act, [&](auto act) {
      dispatch_bool(args.training, [&](auto train) { block_end_backward_typed<scalar_t, act(), train()>(args); });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

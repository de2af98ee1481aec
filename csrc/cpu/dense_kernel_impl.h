// The dense op's channels_last CPU kernels: every input of the concatenation walked in one pass over row blocks
// (statistics, forward, backward reduce and elementwise), on the primitives of bn_act_kernel_impl.h. Included
// right after that header by the same translation unit per CPU capability (bn_act_kernel_{default,avx2,avx512}.cpp).
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/bn_act_kernel_impl.h (with CPU_CAPABILITY defined) before dense_kernel_impl.h"
#endif

namespace fusedres {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------------------------------------------
// Lane-range masked loads / stores (float and double on AVX2 / AVX-512): lanes [a, b) of a vector from / to
// base[a..b), other lanes zero (loads) or untouched memory (stores). Masked-off lanes never fault, so base may
// point before the first element. They let the dense channels_last kernels walk each input flat, whole vectors
// at a time, while its rows of C_j channels sit at a stride of the wide output's channels.
template <typename T>
constexpr bool has_lane_masks() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<T, float> || std::is_same_v<T, double>;
#else
  return false;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
inline uint32_t lane_bits(int a, int b) { return ((1u << b) - 1u) & ~((1u << a) - 1u); }
inline Vectorized<float> load_lanes(const float* base, int a, int b) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>(lane_bits(a, b)), base);
}
inline void store_lanes(float* base, const Vectorized<float>& v, int a, int b) {
  _mm512_mask_storeu_ps(base, static_cast<__mmask16>(lane_bits(a, b)), v);
}
inline Vectorized<double> load_lanes(const double* base, int a, int b) {
  return _mm512_maskz_loadu_pd(static_cast<__mmask8>(lane_bits(a, b)), base);
}
inline void store_lanes(double* base, const Vectorized<double>& v, int a, int b) {
  _mm512_mask_storeu_pd(base, static_cast<__mmask8>(lane_bits(a, b)), v);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i lane_mask32(int a, int b) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(a - 1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(b), idx));
}
inline __m256i lane_mask64(int a, int b) {
  const __m256i idx = _mm256_setr_epi64x(0, 1, 2, 3);
  return _mm256_and_si256(_mm256_cmpgt_epi64(idx, _mm256_set1_epi64x(a - 1)),
                          _mm256_cmpgt_epi64(_mm256_set1_epi64x(b), idx));
}
inline Vectorized<float> load_lanes(const float* base, int a, int b) { return _mm256_maskload_ps(base, lane_mask32(a, b)); }
inline void store_lanes(float* base, const Vectorized<float>& v, int a, int b) {
  _mm256_maskstore_ps(base, lane_mask32(a, b), v);
}
inline Vectorized<double> load_lanes(const double* base, int a, int b) {
  return _mm256_maskload_pd(base, lane_mask64(a, b));
}
inline void store_lanes(double* base, const Vectorized<double>& v, int a, int b) {
  _mm256_maskstore_pd(base, lane_mask64(a, b), v);
}
#else
template <typename T, typename V>
inline V load_lanes(const T*, int, int) { TORCH_INTERNAL_ASSERT(false, "load_lanes needs AVX2 or AVX-512"); }
template <typename T, typename V>
inline void store_lanes(T*, const V&, int, int) { TORCH_INTERNAL_ASSERT(false, "store_lanes needs AVX2 or AVX-512"); }
#endif

// Position of flat element e of a channels_last input with C channels: row and column, advanced a vector at a
// time; pieces(f) calls f(lane_begin, lane_end, row, col) for the row segments the current vector spans.
struct FlatCursor {
  int64_t row, col, C;
  template <int W, typename F>
  void pieces(F&& f) const {
    int lane = 0;
    int64_t r = row, c = col;
    while (lane < W) {
      const int n = static_cast<int>(std::min<int64_t>(W - lane, C - c));
      f(lane, lane + n, r, c);
      lane += n;
      ++r;
      c = 0;
    }
  }
  template <int W>
  void advance() {
    col += W;
    while (col >= C) {
      col -= C;
      ++row;
    }
  }
};

// The vector at the cursor, gathered from (scattered to) rows of stride ld: lane-masked loads / stores per row
// segment on AVX-512; on AVX2 two 128-bit halves (masked AVX2 loads / stores are slow on some CPUs, e.g. AMD
// Zen 3), which needs C % 4 == 0 (see dense_flat).
template <typename T>
inline Vectorized<acc_type_t<T>> gather_rows(const T* base, int64_t ld, const FlatCursor& cur) {
  constexpr int W = VecIO<T>::W;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    auto half = [&](int h) {
      int64_t r = cur.row, c = cur.col + 4 * h;
      while (c >= cur.C) {
        c -= cur.C;
        ++r;
      }
      return _mm_loadu_ps(base + r * ld + c);
    };
    return _mm256_insertf128_ps(_mm256_castps128_ps256(half(0)), half(1), 1);
  }
#endif
  Vectorized<acc_type_t<T>> g(0);
  cur.pieces<W>([&](int la, int lb, int64_t r, int64_t c) { g = g + load_lanes(base + r * ld + c - la, la, lb); });
  return g;
}

template <typename T>
inline void scatter_rows(T* base, int64_t ld, const FlatCursor& cur, const Vectorized<acc_type_t<T>>& v) {
  constexpr int W = VecIO<T>::W;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    auto half = [&](int h, __m128 q) {
      int64_t r = cur.row, c = cur.col + 4 * h;
      while (c >= cur.C) {
        c -= cur.C;
        ++r;
      }
      _mm_storeu_ps(base + r * ld + c, q);
    };
    half(0, _mm256_castps256_ps128(v));
    half(1, _mm256_extractf128_ps(v, 1));
    return;
  }
#endif
  cur.pieces<W>([&](int la, int lb, int64_t r, int64_t c) { store_lanes(base + r * ld + c - la, v, la, lb); });
}

// Per-channel values repeated over the period P = lcm(C, W) of a flat walk (so vector k of a walk that starts
// at a multiple of P uses entries [(k * W) % P, + W)).
template <typename acc_t>
std::vector<acc_t> periodic(const acc_t* v, int64_t C, int W) {
  const int64_t P = C / std::gcd<int64_t>(C, W) * W;
  std::vector<acc_t> out(P);
  for (int64_t i = 0; i < P; ++i) out[i] = v[i % C];
  return out;
}

// Whether the dense channels_last kernels can walk the inputs flat: lane masks for T, whole mask bytes per
// vector, whole vectors in every block of rows (M and the blocks are multiples of W rows), and on AVX2 float
// inputs whose C is a multiple of 4 (gather_rows / scatter_rows).
template <typename T, typename P>
inline bool dense_flat(int64_t M, const P* parts, int64_t n_parts) {
  constexpr int W = VecIO<T>::W;
  if (!(has_lane_masks<T>() && W % 8 == 0 && M % W == 0)) return false;
#if defined(CPU_CAPABILITY_AVX2)
  if (std::is_same_v<T, float>) {
    for (int64_t j = 0; j < n_parts; ++j) {
      if (parts[j].C % 4 != 0) return false;  // gather_rows / scatter_rows move 128-bit halves
    }
  }
#endif
  return true;
}

// ---------------------------------------------------------------------------------------------------
// The dense op's channels_last path. parts[j] describes input j (same N, S, dtype, activation; x_j dense with
// C_j channels; y / dy point at the input's first channel of the wide output, y_ld / dy_ld = the output's
// channels). Run input by input, every pass would touch each output row's cache lines once per input (an output
// row holds all inputs' channels); here each row block of the output is written (read) whole while in cache.

// Statistics per input (training) or the given ones, then one pass over row blocks writing every input's
// channels of the block's output rows.
template <typename T, int ACT>
void dense_forward_cl_typed(const BnActForwardArgs* parts, int64_t n_parts) {
  using acc_t = acc_type_t<T>;
  const int64_t M = parts[0].N * parts[0].S, Cw = parts[0].y_ld;
  const acc_t slope = static_cast<acc_t>(parts[0].negative_slope);
  std::vector<std::vector<acc_t>> center(n_parts), scale(n_parts), shift(n_parts);
  for (int64_t j = 0; j < n_parts; ++j) {
    const BnActForwardArgs& a = parts[j];
    const int64_t C = a.C;
    const acc_t* w = static_cast<const acc_t*>(a.weight);
    const acc_t* b = static_cast<const acc_t*>(a.bias);
    acc_t* mean = static_cast<acc_t*>(a.mean);
    acc_t* invstd = static_cast<acc_t*>(a.invstd);
    center[j].resize(C);
    scale[j].resize(C);
    shift[j].resize(C);
    std::vector<double> mu, v;
    if (a.training) {
      mu.resize(C);
      v.resize(C);
      stats_channels_last<T>(static_cast<const T*>(a.x), M, C, mu.data(), v.data());
    }
    for (int64_t c = 0; c < C; ++c) {
      FwdCoef<acc_t> k{mean[c], w[c] * invstd[c], b[c]};
      if (a.training) {
        const double is = 1.0 / std::sqrt(v[c] + a.eps);
        mean[c] = static_cast<acc_t>(mu[c]);
        static_cast<acc_t*>(a.var)[c] = static_cast<acc_t>(v[c]);
        invstd[c] = static_cast<acc_t>(is);
        k = FwdCoef<acc_t>::from(mu[c], is, w[c], b[c]);
      }
      center[j][c] = k.center;
      scale[j][c] = k.scale;
      shift[j][c] = k.shift;
    }
  }
  const int64_t block = std::max<int64_t>(1, rows_per_block(Cw, sizeof(T)) / 2);
  if constexpr (has_lane_masks<T>()) {
    if (dense_flat<T>(M, parts, n_parts)) {
      // Each input walked flat in whole vectors (its rows are contiguous in x_j), the lanes stored to the wide
      // output row by row with lane-masked stores; the mask written directly. Row blocks of W multiples keep
      // every walk starting at a multiple of the coefficient period, and each output block is written whole.
      using V = Vectorized<acc_t>;
      constexpr int W = VecIO<T>::W;
      std::vector<std::vector<acc_t>> pc(n_parts), ps(n_parts), ph(n_parts);
      for (int64_t j = 0; j < n_parts; ++j) {
        pc[j] = periodic(center[j].data(), parts[j].C, W);
        ps[j] = periodic(scale[j].data(), parts[j].C, W);
        ph[j] = periodic(shift[j].data(), parts[j].C, W);
        if (ACT != kIdentity) prepare_mask(parts[j].mask, M * parts[j].C, true);
      }
      const int64_t fb = std::max<int64_t>(W, block / W * W);
      const int64_t nblocks = (M + fb - 1) / fb;
      const V vslope(slope);
      at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t b0 = k * fb, b1 = std::min(M, b0 + fb);
          for (int64_t j = 0; j < n_parts; ++j) {
            const int64_t C = parts[j].C, P = static_cast<int64_t>(pc[j].size());
            const T* x = static_cast<const T*>(parts[j].x);
            T* y = static_cast<T*>(parts[j].y);
            DirectBitWriter<W % 8 == 0 ? W : 8> bw(parts[j].mask, b0 * C);
            FlatCursor cur{b0, 0, C};
            int64_t phase = 0;
            for (int64_t e = b0 * C; e < b1 * C; e += W) {
              V z = at::vec::fmadd(V::loadu(x + e) - V::loadu(pc[j].data() + phase), V::loadu(ps[j].data() + phase),
                                   V::loadu(ph[j].data() + phase));
              if constexpr (ACT == kReLU) {
                bw.append(gt_zero_bits(z), W);
                z = relu_vec(z);
              } else if constexpr (ACT == kLeakyReLU) {
                const uint32_t bits = gt_zero_bits(z);
                bw.append(bits, W);
                z = select_bits(bits, z, z * vslope);
              }
              scatter_rows(y, Cw, cur, z);
              cur.advance<W>();
              phase += W;
              if (phase == P) phase = 0;
            }
          }
        }
      });
      return;
    }
  }
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, Cw));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = r0; b0 < r1; b0 += block) {
      const int64_t b1 = std::min(r1, b0 + block);
      for (int64_t j = 0; j < n_parts; ++j) {
        const BnActForwardArgs& a = parts[j];
        const int64_t C = a.C;
        const T* x = static_cast<const T*>(a.x);
        T* y = static_cast<T*>(a.y);
        BitWriter bw(a.mask, b0 * C, b1 * C);
        for (int64_t row = b0; row < b1; ++row) {
          forward_run<T, ACT, false, true>(x + row * C, nullptr, y + row * Cw, C, center[j].data(), scale[j].data(),
                                           shift[j].data(),
                                           slope, &bw);
        }
      }
    }
  });
}

// Reductions (parts with sum_dz set) over row blocks with every input's columns of the block's dy rows, then
// the elementwise dx (parts with dx set) the same way. Deterministic: fixed row chunks, merged in order.
template <typename T, int ACT, bool TRAIN>
void dense_backward_cl_typed(const BnActBackwardArgs* parts, int64_t n_parts) {
  using acc_t = acc_type_t<T>;
  const int64_t M = parts[0].N * parts[0].S, Cw = parts[0].dy_ld;
  const acc_t slope = static_cast<acc_t>(parts[0].negative_slope);
  std::vector<int64_t> first(n_parts + 1, 0);  // part j's channels in the per-chunk partial sums
  bool any_reduce = false;
  for (int64_t j = 0; j < n_parts; ++j) {
    first[j + 1] = first[j] + parts[j].C;
    any_reduce = any_reduce || parts[j].sum_dz != nullptr;
  }
  const int64_t Csum = first[n_parts];
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kReduceBlock, rows_per_block(Cw, sizeof(T)) / 2));
  std::vector<double> sdz(Csum, 0.0), sdzxc(Csum, 0.0);
  if (any_reduce) {
    const int64_t chunks = num_row_chunks(M, Cw);
    std::vector<double> pdz(chunks * Csum, 0.0), pdzx(chunks * Csum, 0.0);
    // Flat walks (see dense_forward_cl_typed) need chunks and blocks of whole vectors: multiples of W rows.
    constexpr int kW = VecIO<T>::W;
    const bool flat = dense_flat<T>(M, parts, n_parts);
    const int64_t fblock = flat ? std::max<int64_t>(kW, block / kW * kW) : block;
    const int64_t fper = ((M + chunks - 1) / chunks + kW - 1) / kW * kW;
    std::vector<std::vector<acc_t>> pmean(n_parts);
    if (flat) {
      for (int64_t j = 0; j < n_parts; ++j) pmean[j] = periodic(static_cast<const acc_t*>(parts[j].mean), parts[j].C, kW);
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> bdz(Csum), bdzx(Csum), a1, a2;
      for (int64_t ch = c0; ch < c1; ++ch) {
        int64_t r0, r1;
        if (flat) {
          r0 = std::min(M, ch * fper);
          r1 = std::min(M, r0 + fper);
        } else {
          chunk_bounds(M, chunks, ch, r0, r1);
        }
        for (int64_t b0 = r0; b0 < r1; b0 += fblock) {
          const int64_t nb = std::min(r1, b0 + fblock) - b0;
          std::fill(bdz.begin(), bdz.end(), acc_t(0));
          std::fill(bdzx.begin(), bdzx.end(), acc_t(0));
          for (int64_t j = 0; j < n_parts; ++j) {
            const BnActBackwardArgs& a = parts[j];
            if (a.sum_dz == nullptr) continue;
            if constexpr (has_lane_masks<T>()) {
              if (flat) {
                // Sums per position of the coefficient period, folded into channels at the end of the block.
                using V = Vectorized<acc_t>;
                const int64_t C = a.C, P = static_cast<int64_t>(pmean[j].size());
                a1.assign(P, acc_t(0));
                a2.assign(P, acc_t(0));
                const T* x = static_cast<const T*>(a.x);
                const T* dy = static_cast<const T*>(a.dy);
                DirectBitReader<kW % 8 == 0 ? kW : 8> br(a.mask, b0 * C);
                FlatCursor cur{b0, 0, C};
                const V vslope(slope);
                int64_t phase = 0;
                for (int64_t e = b0 * C; e < (b0 + nb) * C; e += kW) {
                  const V dz = dz_vec<ACT>(gather_rows(dy, Cw, cur), &br, vslope);
                  const V d = V::loadu(x + e) - V::loadu(pmean[j].data() + phase);
                  (V::loadu(a1.data() + phase) + dz).store(a1.data() + phase);
                  at::vec::fmadd(dz, d, V::loadu(a2.data() + phase)).store(a2.data() + phase);
                  cur.advance<kW>();
                  phase += kW;
                  if (phase == P) phase = 0;
                }
                for (int64_t i = 0; i < P; ++i) {
                  bdz[first[j] + i % C] += a1[i];
                  bdzx[first[j] + i % C] += a2[i];
                }
                continue;
              }
            }
            column_reduce<T, kGrad, ACT>(static_cast<const T*>(a.x), static_cast<const T*>(a.dy), Cw, a.mask, b0, nb,
                                         a.C, static_cast<const acc_t*>(a.mean), slope, bdz.data() + first[j],
                                         bdzx.data() + first[j]);
          }
          for (int64_t k = 0; k < Csum; ++k) {
            pdz[ch * Csum + k] += static_cast<double>(bdz[k]);
            pdzx[ch * Csum + k] += static_cast<double>(bdzx[k]);
          }
        }
      }
    });
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t k = 0; k < Csum; ++k) {
        sdz[k] += pdz[ch * Csum + k];
        sdzxc[k] += pdzx[ch * Csum + k];
      }
    }
    for (int64_t j = 0; j < n_parts; ++j) {
      const BnActBackwardArgs& a = parts[j];
      if (a.sum_dz == nullptr) continue;
      const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
      for (int64_t c = 0; c < a.C; ++c) {
        static_cast<acc_t*>(a.sum_dz)[c] = static_cast<acc_t>(sdz[first[j] + c]);
        static_cast<acc_t*>(a.sum_dz_xhat)[c] = static_cast<acc_t>(sdzxc[first[j] + c] * static_cast<double>(invstd[c]));
      }
    }
  }
  // Per-channel coefficients, as in backward_typed (training needs this part's sums).
  std::vector<acc_t> ka(Csum), kmdz(Csum, acc_t(0)), kq(Csum, acc_t(0));
  bool any_dx = false;
  for (int64_t j = 0; j < n_parts; ++j) {
    const BnActBackwardArgs& a = parts[j];
    if (a.dx == nullptr) continue;
    any_dx = true;
    TORCH_INTERNAL_ASSERT(!TRAIN || a.sum_dz != nullptr, "dense backward kernel: training dx needs the sums");
    const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
    const acc_t* w = static_cast<const acc_t*>(a.weight);
    for (int64_t c = 0; c < a.C; ++c) {
      const double is = static_cast<double>(invstd[c]), k = static_cast<double>(w[c]) * is;
      ka[first[j] + c] = static_cast<acc_t>(k);
      if constexpr (TRAIN) {
        kmdz[first[j] + c] = static_cast<acc_t>(sdz[first[j] + c] / static_cast<double>(M));
        kq[first[j] + c] = static_cast<acc_t>(k * is * is * sdzxc[first[j] + c] / static_cast<double>(M));
      }
    }
  }
  if (!any_dx) return;
  if constexpr (has_lane_masks<T>()) {
    if (dense_flat<T>(M, parts, n_parts)) {
      // As the flat forward: each input walked in whole vectors, dy gathered from the wide rows with lane-masked
      // loads, dx_j (dense like x_j) stored whole, the mask read directly.
      using V = Vectorized<acc_t>;
      constexpr int W = VecIO<T>::W;
      std::vector<std::vector<acc_t>> pa(n_parts), pm(n_parts), pmean(n_parts), pq(n_parts);
      for (int64_t j = 0; j < n_parts; ++j) {
        if (parts[j].dx == nullptr) continue;
        const int64_t f = first[j];
        pa[j] = periodic(ka.data() + f, parts[j].C, W);
        pm[j] = periodic(kmdz.data() + f, parts[j].C, W);
        pmean[j] = periodic(static_cast<const acc_t*>(parts[j].mean), parts[j].C, W);
        pq[j] = periodic(kq.data() + f, parts[j].C, W);
      }
      const int64_t fb = std::max<int64_t>(W, block / W * W);
      const int64_t nblocks = (M + fb - 1) / fb;
      const V vslope(slope);
      at::parallel_for(0, nblocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t b0 = k * fb, b1 = std::min(M, b0 + fb);
          for (int64_t j = 0; j < n_parts; ++j) {
            const BnActBackwardArgs& a = parts[j];
            if (a.dx == nullptr) continue;
            const int64_t C = a.C, P = static_cast<int64_t>(pa[j].size());
            const T* x = static_cast<const T*>(a.x);
            const T* dy = static_cast<const T*>(a.dy);
            T* dx = static_cast<T*>(a.dx);
            DirectBitReader<W % 8 == 0 ? W : 8> br(a.mask, b0 * C);
            FlatCursor cur{b0, 0, C};
            int64_t phase = 0;
            for (int64_t e = b0 * C; e < b1 * C; e += W) {
              const V dz = dz_vec<ACT>(gather_rows(dy, Cw, cur), &br, vslope);
              const V va = V::loadu(pa[j].data() + phase);
              if constexpr (TRAIN) {
                (va * (dz - V::loadu(pm[j].data() + phase)) -
                 (V::loadu(x + e) - V::loadu(pmean[j].data() + phase)) * V::loadu(pq[j].data() + phase))
                    .store(dx + e);
              } else {
                (va * dz).store(dx + e);
              }
              cur.advance<W>();
              phase += W;
              if (phase == P) phase = 0;
            }
          }
        }
      });
      return;
    }
  }
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, Cw));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = r0; b0 < r1; b0 += block) {
      const int64_t b1 = std::min(r1, b0 + block);
      for (int64_t j = 0; j < n_parts; ++j) {
        const BnActBackwardArgs& a = parts[j];
        if (a.dx == nullptr) continue;
        const int64_t C = a.C, f = first[j];
        const BwdCoef<acc_t> k{static_cast<const acc_t*>(a.mean), ka.data() + f, kmdz.data() + f, kq.data() + f};
        const T* x = static_cast<const T*>(a.x);
        const T* dy = static_cast<const T*>(a.dy);
        T* dx = static_cast<T*>(a.dx);
        BitReader br(a.mask, b0 * C);
        for (int64_t row = b0; row < b1; ++row) {
          backward_elementwise_run<T, ACT, true, TRAIN, true, false>(dy + row * Cw, x + row * C, dx + row * C,
                                                                     nullptr, C, &br, k, slope);
        }
      }
    }
  });
}

}  // namespace

void dense_forward_cl_kernel(const BnActForwardArgs* parts, int64_t n_parts) {
  if (n_parts == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, parts[0].dtype, "dense_forward_cl_cpu", [&] {
    dispatch_act(parts[0].act, [&](auto act) { dense_forward_cl_typed<scalar_t, act()>(parts, n_parts); });
  });
}

void dense_backward_cl_kernel(const BnActBackwardArgs* parts, int64_t n_parts) {
  if (n_parts == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, parts[0].dtype, "dense_backward_cl_cpu", [&] {
    dispatch_act(parts[0].act, [&](auto act) {
      dispatch_bool(parts[0].training,
                    [&](auto train) { dense_backward_cl_typed<scalar_t, act(), train()>(parts, n_parts); });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

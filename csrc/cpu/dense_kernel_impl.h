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
// Row-major walk for float inputs whose channel counts are all multiples of 4 (DenseNets: growth rates 12, 32,
// 48, first inputs of 24, 64, 96 channels...): row by row, every input's segment of the wide output row in 8- and
// 4-lane pieces. Each wide y / dy row is then written / read once, in order, one sequential stream for the
// hardware prefetcher. The input-by-input walk over a block of rows (below) touches each wide row's cache lines
// once per input, in a stride pattern the prefetcher follows badly: on a Zen 3 its backward waited on those
// loads most of the time and the whole op ran 3.4x slower in channels_last than in NCHW.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
template <int L>
struct Lanes;

template <>
struct Lanes<8> {
  using V = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  // max(0, z) returns z when z is NaN: NaN propagates like torch.relu (as relu_vec).
  static V relu(V z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }
  static uint32_t gt_zero(V z) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ)));
  }
  // Lane i: bit i of `bits` set ? a : b.
  static V select(uint32_t bits, V a, V b) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m));
  }
};

template <>
struct Lanes<4> {
  using V = __m128;
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V v) { _mm_storeu_ps(p, v); }
  static V set1(float a) { return _mm_set1_ps(a); }
  static V add(V a, V b) { return _mm_add_ps(a, b); }
  static V sub(V a, V b) { return _mm_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm_fmadd_ps(a, b, c); }
  static V relu(V z) { return _mm_max_ps(_mm_setzero_ps(), z); }
  static uint32_t gt_zero(V z) { return static_cast<uint32_t>(_mm_movemask_ps(_mm_cmp_ps(z, _mm_setzero_ps(), _CMP_GT_OQ))); }
  static V select(uint32_t bits, V a, V b) {
    const __m128i lane = _mm_setr_epi32(1, 2, 4, 8);
    const __m128i m = _mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(static_cast<int>(bits)), lane), lane);
    return _mm_blendv_ps(b, a, _mm_castsi128_ps(m));
  }
};

// Calls f(std::integral_constant<int, L>, c) for the pieces of a segment of C channels (C % 4 == 0): 8-lane
// pieces, then one 4-lane piece if 4 channels are left.
template <typename F>
inline void for_pieces(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) f(std::integral_constant<int, 8>{}, c);
  if (c < C) f(std::integral_constant<int, 4>{}, c);
}

// Whether the row-major walk applies: float, an activation it implements, every input's C a multiple of 4.
template <typename T, int ACT, typename P>
inline bool dense_rows(const P* parts, int64_t n_parts) {
  if (!std::is_same_v<T, float> || !(ACT == kIdentity || ACT == kReLU || ACT == kLeakyReLU)) return false;
  for (int64_t j = 0; j < n_parts; ++j) {
    if (parts[j].C % 4 != 0) return false;
  }
  return true;
}

// dz of one piece from dy and its mask bits (as dz_vec).
template <int ACT, int L>
inline typename Lanes<L>::V dz_piece(typename Lanes<L>::V dy, uint32_t bits, float slope) {
  using Ln = Lanes<L>;
  if constexpr (ACT == kIdentity) {
    return dy;
  } else {
    return Ln::select(bits, dy, ACT == kReLU ? Ln::set1(0.f) : Ln::mul(dy, Ln::set1(slope)));
  }
}

// The walk goes by units of kDenseUnitRows rows: within a unit, input by input, piece by piece, row by row. The
// unit's wide rows (8 x the output's channels) stay in L1 while its inputs are visited, the per-piece coefficients
// are loaded once per unit, and a unit's mask bits of input j (8 rows x C_j bits = C_j bytes) are whole bytes,
// owned by one thread: written without atomics, read at a fixed offset.
constexpr int64_t kDenseUnitRows = 8;

// One input of the walk, with the fields the loops need hoisted out of the argument structs.
struct DenseRowPart {
  int64_t C, first;
  const float* x;
  float* out;       // y (forward) or dx (backward); null: not wanted
  const float* dy;  // backward
  uint8_t* mask;
};

template <typename P>
std::vector<DenseRowPart> row_parts(const P* parts, int64_t n_parts, const int64_t* first) {
  std::vector<DenseRowPart> out(n_parts);
  for (int64_t j = 0; j < n_parts; ++j) {
    out[j].C = parts[j].C;
    out[j].first = first[j];
    out[j].x = static_cast<const float*>(parts[j].x);
    if constexpr (std::is_same_v<P, BnActForwardArgs>) {
      out[j].out = static_cast<float*>(parts[j].y);
      out[j].dy = nullptr;
      out[j].mask = parts[j].mask;
    } else {
      out[j].out = static_cast<float*>(parts[j].dx);
      out[j].dy = static_cast<const float*>(parts[j].dy);
      out[j].mask = const_cast<uint8_t*>(parts[j].mask);
    }
  }
  return out;
}

// Prefetch of an input's rows `ahead` units ahead (negative: behind, for a walk backwards); each input is its
// own stream, too many for the hardware prefetcher to follow alone.
inline void prefetch_unit(const float* x, int64_t C, int64_t ahead = 2) {
  const char* p = reinterpret_cast<const char*>(x + ahead * kDenseUnitRows * C);
  for (int64_t b = 0; b < kDenseUnitRows * C * 4; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// Prefetch of an input's segment (C values at row stride ld) of the dy rows `ahead` units ahead. Read input by
// input, a unit's wide dy rows are visited segment by segment at a row stride of the whole output: a pattern the
// hardware prefetcher does not follow (profiled on a Zen 3: the backward waited on these loads most of its time).
inline void prefetch_rows(const float* p, int64_t ld, int64_t C, int64_t ahead = 2) {
  p += ahead * kDenseUnitRows * ld;
  for (int64_t r = 0; r < kDenseUnitRows; ++r) {
    __builtin_prefetch(p + r * ld, 0, 3);
    __builtin_prefetch(p + r * ld + C - 1, 0, 3);
  }
}

// A unit's mask bits of one input, appended in element order through a register. The unit owns whole bytes
// (kDenseUnitRows x C bits = C bytes, C % 4 == 0: whole 32-bit words too), so every store is plain and
// sequential: no read-modify-write of bytes another piece has just written (each such store-to-load pair that
// overlaps only partly stalls store forwarding).
class UnitBits {
 public:
  explicit UnitBits(uint8_t* p) : p_(p) {}
  void append(uint32_t bits, int n) {
    buf_ |= static_cast<uint64_t>(bits) << n_;
    n_ += n;
    if (n_ >= 32) {
      const uint32_t w = static_cast<uint32_t>(buf_);
      std::memcpy(p_, &w, 4);
      p_ += 4;
      buf_ >>= 32;
      n_ -= 32;
    }
  }
  // The last, partial unit: its remaining bits as whole bytes (bits past the last element are zero).
  void finish() {
    for (; n_ > 0; n_ -= 8) {
      *p_++ = static_cast<uint8_t>(buf_);
      buf_ >>= 8;
    }
  }

 private:
  uint8_t* p_;
  uint64_t buf_ = 0;
  int n_ = 0;
};

// Copies n floats from a staging buffer to dst with non-temporal stores (dst's unaligned head and the tail with
// plain ones): outputs larger than the caches are written without the read-for-ownership of a plain store.
inline void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 32 != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// y rows = act((x_j - centre) * scale + shift) for every input; centre / scale / shift in wide channel order.
// A unit is walked input by input, row by row, piece by piece (the mask bits in element order). With `stream`,
// the unit's wide rows are assembled in a per-thread staging buffer (in L1) and written out with non-temporal
// stores (an input's segment of a row is too short and too unaligned to stream by itself).
template <int ACT>
void dense_forward_rows(const BnActForwardArgs* parts, int64_t n_parts, const int64_t* first, const float* center,
                        const float* scale, const float* shift, float slope, int64_t M, int64_t Cw, bool stream) {
  const std::vector<DenseRowPart> rp = row_parts(parts, n_parts, first);
  if (ACT != kIdentity) {
    for (const DenseRowPart& p : rp) prepare_mask(p.mask, M * p.C, true);  // every unit writes its bytes whole
  }
  float* y = rp[0].out;  // input 0 starts at the output's channel 0
  const int64_t units = (M + kDenseUnitRows - 1) / kDenseUnitRows;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, Cw * kDenseUnitRows));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> stage(stream ? kDenseUnitRows * Cw : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t row0 = u * kDenseUnitRows, nr = std::min(M, row0 + kDenseUnitRows) - row0;
      float* yu = stream ? stage.data() : y + row0 * Cw;
      for (const DenseRowPart& p : rp) {
        const int64_t C = p.C, f = p.first;
        const float* xu = p.x + row0 * C;
        prefetch_unit(xu, C);
        UnitBits bits_out(ACT != kIdentity ? p.mask + u * C : nullptr);
        for (int64_t r = 0; r < nr; ++r) {
          for_pieces(C, [&](auto l, int64_t c) {
            constexpr int L = decltype(l)::value;
            using Ln = Lanes<L>;
            auto z = Ln::fmadd(Ln::sub(Ln::load(xu + r * C + c), Ln::load(center + f + c)), Ln::load(scale + f + c),
                               Ln::load(shift + f + c));
            if constexpr (ACT != kIdentity) {
              const uint32_t bits = Ln::gt_zero(z);
              bits_out.append(bits, L);
              z = ACT == kReLU ? Ln::relu(z) : Ln::select(bits, z, Ln::mul(z, Ln::set1(slope)));
            }
            Ln::store(yu + r * Cw + f + c, z);
          });
        }
        if (ACT != kIdentity) bits_out.finish();
      }
      if (stream) stream_copy(y + row0 * Cw, stage.data(), nr * Cw);
    }
    if (stream) stream_fence();
  });
}

// Per-channel (sum dz, sum dz * (x - mean)) in wide channel order for the parts with sum_dz set: per
// row chunk (fixed, so the result is deterministic) float sums over blocks of kDenseSumRows rows, folded into
// double.
constexpr int64_t kDenseSumRows = 128;

template <int ACT>
void dense_reduce_rows(const BnActBackwardArgs* parts, int64_t n_parts, const int64_t* first, int64_t Csum,
                       const float* mean, float slope, int64_t M, int64_t Cw, double* sdz, double* sdzxc) {
  const std::vector<DenseRowPart> all = row_parts(parts, n_parts, first);
  std::vector<DenseRowPart> rp;  // the parts whose sums are wanted
  for (int64_t j = 0; j < n_parts; ++j) {
    if (parts[j].sum_dz != nullptr) rp.push_back(all[j]);
  }
  const int64_t units = (M + kDenseUnitRows - 1) / kDenseUnitRows;
  const int64_t chunks = num_row_chunks(M, Cw);
  std::vector<double> pdz(chunks * Csum, 0.0), pdzx(chunks * Csum, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> s1(Csum), s2(Csum);
    for (int64_t ch = c0; ch < c1; ++ch) {
      int64_t u0, u1;
      chunk_bounds(units, chunks, ch, u0, u1);
      // Backwards through the chunk: the elementwise pass that follows walks it forwards, and so starts on the rows
      // read last here, still in the last-level cache.
      for (int64_t b1 = u1; b1 > u0; b1 -= kDenseSumRows / kDenseUnitRows) {
        const int64_t b0 = std::max(u0, b1 - kDenseSumRows / kDenseUnitRows);
        std::fill(s1.begin(), s1.end(), 0.f);
        std::fill(s2.begin(), s2.end(), 0.f);
        for (int64_t u = b1 - 1; u >= b0; --u) {
          const int64_t row0 = u * kDenseUnitRows, nr = std::min(M, row0 + kDenseUnitRows) - row0;
          for (const DenseRowPart& p : rp) {
            const int64_t C = p.C, f = p.first;
            const float* xu = p.x + row0 * C;
            const float* dyu = p.dy + row0 * Cw;
            const uint8_t* mu = p.mask != nullptr ? p.mask + u * C : nullptr;
            if (u >= 2) {
              prefetch_unit(xu, C, -2);
              prefetch_rows(dyu, Cw, C, -2);
            }
            for_pieces(C, [&](auto l, int64_t c) {
              constexpr int L = decltype(l)::value;
              using Ln = Lanes<L>;
              const auto vm = Ln::load(mean + f + c);
              auto a1 = Ln::set1(0.f), a2 = Ln::set1(0.f);
              for (int64_t r = 0; r < nr; ++r) {
                const uint32_t bits = ACT == kIdentity ? 0u : read_bits(mu, r * C + c, L);
                const auto dz = dz_piece<ACT, L>(Ln::load(dyu + r * Cw + c), bits, slope);
                a1 = Ln::add(a1, dz);
                a2 = Ln::fmadd(dz, Ln::sub(Ln::load(xu + r * C + c), vm), a2);
              }
              Ln::store(s1.data() + f + c, Ln::add(Ln::load(s1.data() + f + c), a1));
              Ln::store(s2.data() + f + c, Ln::add(Ln::load(s2.data() + f + c), a2));
            });
          }
        }
        for (int64_t k = 0; k < Csum; ++k) {
          pdz[ch * Csum + k] += static_cast<double>(s1[k]);
          pdzx[ch * Csum + k] += static_cast<double>(s2[k]);
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
}

// dx_j rows (parts with dx set): a * (dz - mdz) - (x - mean) * q (TRAIN) or a * dz; coefficients in wide order.
// An input's dx rows of a unit are contiguous (8 x C values): with `stream` they are assembled in a staging
// buffer and written out with non-temporal stores.
template <int ACT, bool TRAIN>
void dense_backward_rows(const BnActBackwardArgs* parts, int64_t n_parts, const int64_t* first, const float* ka,
                         const float* kmdz, const float* mean, const float* kq, float slope, int64_t M, int64_t Cw,
                         bool stream) {
  std::vector<DenseRowPart> rp;
  int64_t cmax = 0;
  for (const DenseRowPart& p : row_parts(parts, n_parts, first)) {
    if (p.out != nullptr) rp.push_back(p);
    cmax = std::max(cmax, p.C);
  }
  const int64_t units = (M + kDenseUnitRows - 1) / kDenseUnitRows;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, Cw * kDenseUnitRows));
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    std::vector<float> stage(stream ? kDenseUnitRows * cmax : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t row0 = u * kDenseUnitRows, nr = std::min(M, row0 + kDenseUnitRows) - row0;
      for (const DenseRowPart& p : rp) {
        const int64_t C = p.C, f = p.first;
        const float* xu = p.x + row0 * C;
        const float* dyu = p.dy + row0 * Cw;
        float* dxu = stream ? stage.data() : p.out + row0 * C;
        const uint8_t* mu = p.mask != nullptr ? p.mask + u * C : nullptr;
        if constexpr (TRAIN) prefetch_unit(xu, C);
        if (u + 2 < units) prefetch_rows(dyu, Cw, C);
        for (int64_t r = 0; r < nr; ++r) {
          for_pieces(C, [&](auto l, int64_t c) {
            constexpr int L = decltype(l)::value;
            using Ln = Lanes<L>;
            const uint32_t bits = ACT == kIdentity ? 0u : read_bits(mu, r * C + c, L);
            const auto dz = dz_piece<ACT, L>(Ln::load(dyu + r * Cw + c), bits, slope);
            if constexpr (TRAIN) {
              const auto vm = Ln::load(mean + f + c);
              Ln::store(dxu + r * C + c, Ln::sub(Ln::mul(Ln::load(ka + f + c), Ln::sub(dz, Ln::load(kmdz + f + c))),
                                                 Ln::mul(Ln::sub(Ln::load(xu + r * C + c), vm), Ln::load(kq + f + c))));
            } else {
              Ln::store(dxu + r * C + c, Ln::mul(Ln::load(ka + f + c), dz));
            }
          });
        }
        if (stream) stream_copy(p.out + row0 * C, stage.data(), nr * C);
      }
    }
    if (stream) stream_fence();
  });
}
#endif  // AVX2 || AVX512

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
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (dense_rows<T, ACT>(parts, n_parts)) {
      std::vector<float> wc, ws, wh;  // the coefficients in wide channel order
      for (int64_t j = 0; j < n_parts; ++j) {
        wc.insert(wc.end(), center[j].begin(), center[j].end());
        ws.insert(ws.end(), scale[j].begin(), scale[j].end());
        wh.insert(wh.end(), shift[j].begin(), shift[j].end());
      }
      std::vector<int64_t> first(n_parts + 1, 0);
      for (int64_t j = 0; j < n_parts; ++j) first[j + 1] = first[j] + parts[j].C;
      // Stream y when it is larger than the caches (as forward_typed).
      const bool stream = M * Cw * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
      dense_forward_rows<ACT>(parts, n_parts, first.data(), wc.data(), ws.data(), wh.data(), slope, M, Cw, stream);
      return;
    }
  }
#endif
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
  bool rows = false;  // the row-major walk (float, C_j % 4 == 0)
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  rows = dense_rows<T, ACT>(parts, n_parts);
#endif
  std::vector<acc_t> wmean;  // every part's mean in wide channel order (row-major walk)
  if (rows) {
    for (int64_t j = 0; j < n_parts; ++j) {
      const acc_t* m = static_cast<const acc_t*>(parts[j].mean);
      wmean.insert(wmean.end(), m, m + parts[j].C);
    }
  }
  if (any_reduce && rows) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      dense_reduce_rows<ACT>(parts, n_parts, first.data(), Csum, wmean.data(), slope, M, Cw, sdz.data(),
                             sdzxc.data());
    }
#endif
  } else if (any_reduce) {
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
  }
  if (any_reduce) {
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
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (rows) {
      int64_t dx_bytes = 0;  // stream the dx when they are larger than the caches together (as backward_typed)
      for (int64_t j = 0; j < n_parts; ++j) {
        if (parts[j].dx != nullptr) dx_bytes += M * parts[j].C * static_cast<int64_t>(sizeof(float));
      }
      dense_backward_rows<ACT, TRAIN>(parts, n_parts, first.data(), ka.data(), kmdz.data(), wmean.data(), kq.data(),
                                      slope, M, Cw, dx_bytes >= kStreamBytes);
      return;
    }
  }
#endif
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
    dispatch_basic_act(parts[0].act, [&](auto act) { dense_forward_cl_typed<scalar_t, act()>(parts, n_parts); });
  });
}

void dense_backward_cl_kernel(const BnActBackwardArgs* parts, int64_t n_parts) {
  if (n_parts == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, parts[0].dtype, "dense_backward_cl_cpu", [&] {
    dispatch_basic_act(parts[0].act, [&](auto act) {
      dispatch_bool(parts[0].training,
                    [&](auto train) { dense_backward_cl_typed<scalar_t, act(), train()>(parts, n_parts); });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

// Vectorised, multithreaded CPU kernels of BatchNorm + residual + activation (the dense op's channels_last
// kernels, built on these primitives, are in dense_kernel_impl.h). Included by exactly one
// translation unit per CPU capability, each defining CPU_CAPABILITY (DEFAULT, AVX2, AVX512) first, so that
// at::vec::Vectorized and everything here lives in a capability-specific namespace.
//
// Layouts (see BnActGeom): NCHW-like tensors are N*C planes of S contiguous values; a channel's planes are
// processed by one thread from statistics to output while they are hot in L2. channels_last tensors are
// N*S rows of C contiguous values; statistics are per-thread partials over row blocks merged at the end.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including bn_act_kernel_impl.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <numeric>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "common/bn_act_math.h"
#include "cpu/bn_act_kernel.h"
#include "cpu/vec_io.h"

namespace fusedres {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using math::kIdentity;
using math::kLeakyReLU;
using math::kReLU;
using math::kReLU6;
using math::kSiLU;

// Activations whose backward reads the 1-bit mask (math::act_has_mask), and the one that recomputes z instead.
template <int ACT>
constexpr bool kMaskAct = ACT == kReLU || ACT == kLeakyReLU || ACT == kReLU6;
template <int ACT>
constexpr bool kZAct = ACT == kSiLU;

// Values per reduction block: short enough that float partial sums stay accurate to ~1e-7 relative,
// long enough that folding them into double costs nothing.
constexpr int64_t kReduceBlock = 2048;
// Bytes of a channels_last row block reduced in one go (two passes over it stay in L2).
constexpr int64_t kRowBlockBytes = 256 * 1024;
// Bytes (of every tensor a column reduction reads) of a row tile: column_reduce walks its groups of channels tile
// by tile, so that a row's later groups find its lines in L1 (see column_reduce).
constexpr int64_t kColumnTileBytes = 16 * 1024;
// Elements below which a parallel loop runs on the calling thread.
constexpr int64_t kParallelGrain = 32768;

// Elements to handle one by one so that p + result is 64-byte aligned (all of them if it never is).
template <typename T>
inline int64_t head_to_align(const T* p, int64_t len) {
  const auto mis = reinterpret_cast<uintptr_t>(p) % 64;
  if (mis % sizeof(T) != 0) return len;
  return std::min<int64_t>(len, static_cast<int64_t>(((64 - mis) % 64) / sizeof(T)));
}

// Lane i of the result is bit i: z > 0 (ordered compare, NaN gives 0).
inline uint32_t gt_zero_bits(const Vectorized<float>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ));
#elif defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ)));
#else
  float tmp[Vectorized<float>::size()];
  z.store(tmp);
  uint32_t bits = 0;
  for (int i = 0; i < Vectorized<float>::size(); ++i) bits |= static_cast<uint32_t>(tmp[i] > 0.f) << i;
  return bits;
#endif
}

inline uint32_t gt_zero_bits(const Vectorized<double>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  return static_cast<uint32_t>(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ));
#elif defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(z, _mm256_setzero_pd(), _CMP_GT_OQ)));
#else
  double tmp[Vectorized<double>::size()];
  z.store(tmp);
  uint32_t bits = 0;
  for (int i = 0; i < Vectorized<double>::size(); ++i) bits |= static_cast<uint32_t>(tmp[i] > 0.0) << i;
  return bits;
#endif
}

// Lane i: bit i of `bits` set ? a : b.
inline Vectorized<float> select_bits(uint32_t bits, const Vectorized<float>& a, const Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(static_cast<__mmask16>(bits), b, a);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
  return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m));
#else
  float ta[Vectorized<float>::size()], tb[Vectorized<float>::size()];
  a.store(ta);
  b.store(tb);
  for (int i = 0; i < Vectorized<float>::size(); ++i) ta[i] = ((bits >> i) & 1u) ? ta[i] : tb[i];
  return Vectorized<float>::loadu(ta);
#endif
}

inline Vectorized<double> select_bits(uint32_t bits, const Vectorized<double>& a, const Vectorized<double>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_pd(static_cast<__mmask8>(bits), b, a);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi64x(1, 2, 4, 8);
  const __m256i m =
      _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(static_cast<long long>(bits)), lane), lane);
  return _mm256_blendv_pd(b, a, _mm256_castsi256_pd(m));
#else
  double ta[Vectorized<double>::size()], tb[Vectorized<double>::size()];
  a.store(ta);
  b.store(tb);
  for (int i = 0; i < Vectorized<double>::size(); ++i) ta[i] = ((bits >> i) & 1u) ? ta[i] : tb[i];
  return Vectorized<double>::loadu(ta);
#endif
}

// relu that propagates NaN like torch.relu in one instruction: max(0, z) returns its second operand (z) when
// either is NaN.
template <typename V>
inline V relu_vec(const V& z) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return _mm512_max_ps(_mm512_setzero_ps(), z);
  if constexpr (std::is_same_v<V, Vectorized<double>>) return _mm512_max_pd(_mm512_setzero_pd(), z);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return _mm256_max_ps(_mm256_setzero_ps(), z);
  if constexpr (std::is_same_v<V, Vectorized<double>>) return _mm256_max_pd(_mm256_setzero_pd(), z);
#endif
  return at::vec::maximum(z, V(0));
}

// min(max(z, 0), 6) propagating NaN (and keeping -0) like torch.nn.functional.relu6: min(6, t) returns its second
// operand (t) when either is NaN, as max does above.
template <typename V>
inline V relu6_vec(const V& z) {
  const V t = relu_vec(z);
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return _mm512_min_ps(_mm512_set1_ps(6.f), t);
  if constexpr (std::is_same_v<V, Vectorized<double>>) return _mm512_min_pd(_mm512_set1_pd(6.0), t);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) return _mm256_min_ps(_mm256_set1_ps(6.f), t);
  if constexpr (std::is_same_v<V, Vectorized<double>>) return _mm256_min_pd(_mm256_set1_pd(6.0), t);
#endif
  return at::vec::minimum(t, V(6));
}

// Lane i of the result is bit i: ReLU6's derivative is 1, i.e. not (z <= 0 or z >= 6) (math::act_mask_bit; NaN
// gives 1 as in PyTorch's hardtanh_backward). The "not less-or-equal" / "not greater-or-equal" compares are
// unordered, so true for NaN.
template <typename V>
inline uint32_t relu6_bits(const V& z) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    return static_cast<uint32_t>(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ) &
                                 _mm512_cmp_ps_mask(z, _mm512_set1_ps(6.f), _CMP_LT_OQ));
  } else {
    return static_cast<uint32_t>(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ) &
                                 _mm512_cmp_pd_mask(z, _mm512_set1_pd(6.0), _CMP_LT_OQ));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ),
                                                                  _mm256_cmp_ps(z, _mm256_set1_ps(6.f), _CMP_LT_OQ))));
  } else {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(z, _mm256_setzero_pd(), _CMP_GT_OQ),
                                                                  _mm256_cmp_pd(z, _mm256_set1_pd(6.0), _CMP_LT_OQ))));
  }
#else
  typename V::value_type tmp[V::size()];
  z.store(tmp);
  uint32_t bits = 0;
  for (int i = 0; i < V::size(); ++i) bits |= static_cast<uint32_t>(math::act_mask_bit(tmp[i], kReLU6)) << i;
  return bits;
#endif
}

// y = act(z) for one vector; *bits receives the mask bits of the activations that keep one (kMaskAct).
// SiLU is PyTorch's own vectorised formula z / (1 + exp(-z)) with at::vec's exp (Sleef, 1 ulp), so it rounds as
// torch.nn.functional.silu does.
template <int ACT, typename V>
inline V act_vec(const V& z, const V& vslope, uint32_t* bits) {
  if constexpr (ACT == kReLU) {
    *bits = gt_zero_bits(z);
    return relu_vec(z);
  } else if constexpr (ACT == kLeakyReLU) {
    *bits = gt_zero_bits(z);
    return select_bits(*bits, z, z * vslope);
  } else if constexpr (ACT == kReLU6) {
    *bits = relu6_bits(z);
    return relu6_vec(z);
  } else if constexpr (ACT == kSiLU) {
    return z / (V(1) + z.neg().exp());
  } else {
    return z;
  }
}

// dy * silu'(z) = dy * s * (1 + z * (1 - s)), s = 1 / (1 + exp(-z)): PyTorch's vectorised silu_backward.
template <typename V>
inline V silu_grad_vec(const V& dy, const V& z) {
  const V one(1);
  const V s = one / (one + z.neg().exp());
  return dy * s * (one + z * (one - s));
}

// ---------------------------------------------------------------------------------------------------
// Packed mask: bit i of the little-endian byte stream is element i in memory order. A writer owns the bit
// range [start, end); words wholly inside it are stored plainly, the (at most two) words it shares with a
// neighbouring range are OR-ed atomically, so the mask buffer must start zeroed.
class BitWriter {
 public:
  BitWriter(uint8_t* base, int64_t start, int64_t end)
      : words_(reinterpret_cast<uint32_t*>(base)), start_(start), end_(end), word_(start >> 5),
        nbuf_(static_cast<int>(start & 31)) {}
  BitWriter(const BitWriter&) = delete;
  BitWriter& operator=(const BitWriter&) = delete;
  ~BitWriter() { finish(); }

  // Appends the low n bits of `bits` (n <= 32, higher bits zero).
  void append(uint32_t bits, int n) {
    buf_ |= static_cast<uint64_t>(bits) << nbuf_;
    nbuf_ += n;
    if (nbuf_ >= 32) {
      flush(static_cast<uint32_t>(buf_));
      buf_ >>= 32;
      nbuf_ -= 32;
      ++word_;
    }
  }

  void finish() {
    if (words_ != nullptr && nbuf_ > static_cast<int>(word_ == (start_ >> 5) ? (start_ & 31) : 0)) {
      flush(static_cast<uint32_t>(buf_));
    }
    words_ = nullptr;
  }

 private:
  void flush(uint32_t v) {
    const int64_t first = word_ << 5;
    if (first >= start_ && first + 32 <= end_) {
      words_[word_] = v;
    } else {
      __atomic_fetch_or(&words_[word_], v, __ATOMIC_RELAXED);
    }
  }

  uint32_t* words_;
  int64_t start_, end_;
  int64_t word_;
  uint64_t buf_ = 0;
  int nbuf_;
};

// The n bits (n <= 24) starting at bit `pos` of the mask (reads 4 bytes: the mask has a spare trailing word).
inline uint32_t read_bits(const uint8_t* base, int64_t pos, int n) {
  uint32_t w;
  std::memcpy(&w, base + (pos >> 3), sizeof(w));
  return (w >> (pos & 7)) & ((1u << n) - 1u);
}

class BitReader {
 public:
  BitReader(const uint8_t* base, int64_t start) : base_(base), pos_(start) {}
  // The next n bits (n <= 24). Reads 4 bytes at the current byte: the mask has a spare trailing word.
  uint32_t take(int n) {
    const uint32_t bits = read_bits(base_, pos_, n);
    pos_ += n;
    return bits;
  }

 private:
  const uint8_t* base_;
  int64_t pos_;
};

// Direct mask I/O for runs made of whole vectors that start at an element offset divisible by W, with W a
// multiple of 8: each vector owns W / 8 whole bytes of the mask, so its bits are stored (loaded) with one
// plain byte store (load): no shifting buffer, no atomics, and no need for a zeroed mask. BitWriter / BitReader
// handle every other geometry. Same sequential interface: append(bits, W) / take(W).
template <int W>
class DirectBitWriter {
  static_assert(W % 8 == 0, "direct mask stores need whole bytes per vector");

 public:
  explicit DirectBitWriter(uint8_t* base, int64_t start) : p_(base != nullptr ? base + (start >> 3) : nullptr) {}
  void append(uint32_t bits, int /*n == W*/) {
    if constexpr (W == 8) {
      *p_ = static_cast<uint8_t>(bits);
    } else {
      std::memcpy(p_, &bits, W / 8);  // little-endian: the low W bits
    }
    p_ += W / 8;
  }

 private:
  uint8_t* p_;
};

template <int W>
class DirectBitReader {
  static_assert(W % 8 == 0, "direct mask loads need whole bytes per vector");

 public:
  explicit DirectBitReader(const uint8_t* base, int64_t start)
      : p_(base != nullptr ? base + (start >> 3) : nullptr) {}
  uint32_t take(int /*n == W*/) {
    uint32_t bits = 0;
    if constexpr (W == 8) {
      bits = *p_;
    } else {
      std::memcpy(&bits, p_, W / 8);
    }
    p_ += W / 8;
    return bits;
  }

 private:
  const uint8_t* p_;
};

// Whether runs of `len` elements starting at multiples of `len` can use the direct mask I/O for T's vectors.
template <typename T>
inline bool direct_mask(int64_t len) {
  constexpr int W = VecIO<T>::W;
  return W % 8 == 0 && len % W == 0;
}

// The mask a kernel writes: whole when the direct path writes every bit (only the bytes past the last element
// are cleared, so the buffer's content is deterministic), zeroed first otherwise (BitWriter ORs shared words).
inline void prepare_mask(uint8_t* mask, int64_t numel, bool direct) {
  if (mask == nullptr) return;
  const int64_t total = math::mask_bytes(numel);
  const int64_t first = direct ? numel / 8 : 0;
  std::memset(mask + first, 0, static_cast<size_t>(total - first));
}

template <typename V>
inline typename V::value_type hsum(const V& v) {
  return at::vec::vec_reduce_all<typename V::value_type>([](V& a, V& b) { return a + b; }, v);
}

// ---------------------------------------------------------------------------------------------------
// Statistics of one contiguous run, blockwise in acc_t and folded into double: sum(x - center) and
// sum((x - center)^2). The second pass is the numerically stable half of two-pass variance; the first is taken
// about a pivot near the mean so that its acc_t partial sums stay of the size of the deviations.
template <typename T, bool SQ_DEV>
double run_reduce(const T* x, int64_t len, typename VecIO<T>::acc_t center) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int W = IO::W;
  const V vc(center);
  double total = 0;
  int64_t i = 0;
  while (i < len) {
    const int64_t stop = std::min(len, i + kReduceBlock);
    V a0(0), a1(0);
    for (; i + 2 * W <= stop; i += 2 * W) {
      const V v0 = IO::load(x + i) - vc, v1 = IO::load(x + i + W) - vc;
      if constexpr (SQ_DEV) {
        a0 = at::vec::fmadd(v0, v0, a0);
        a1 = at::vec::fmadd(v1, v1, a1);
      } else {
        a0 = a0 + v0;
        a1 = a1 + v1;
      }
    }
    acc_t s = hsum(a0 + a1);
    for (; i < stop; ++i) {
      const acc_t v = static_cast<acc_t>(x[i]) - center;
      s += SQ_DEV ? v * v : v;
    }
    total += static_cast<double>(s);
  }
  return total;
}

// Forward elementwise over one contiguous run: z = (x - center) * scale + shift (+ r); y = act(z); mask bits.
// center is the mean rounded to acc_t and shift = bias - (mean - center) * scale, so no large mean * scale is
// ever cancelled: inputs with a large mean keep their precision (x - center is exact when x is near the mean).
// PER_ELEM: center/scale/shift are arrays indexed like the run (a channels_last row); else one value each.
// BW: BitWriter (any geometry), or DirectBitWriter<W> (len a multiple of W; no scalar head is taken).
template <typename T, int ACT, bool RES, bool PER_ELEM, typename BW = BitWriter>
void forward_run(const T* x, const T* r, T* y, int64_t len, const acc_type_t<T>* center, const acc_type_t<T>* scale,
                 const acc_type_t<T>* shift, acc_type_t<T> slope, BW* bw, bool stream = false) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int W = IO::W;
  constexpr bool kDirect = !std::is_same_v<BW, BitWriter>;
  const V vcenter(center[0]), vscale(scale[0]), vshift(shift[0]), vslope(slope);
  auto one = [&](int64_t i) {
    const int64_t j = PER_ELEM ? i : 0;
    acc_t z = (static_cast<acc_t>(x[i]) - center[j]) * scale[j] + shift[j];
    if constexpr (RES) z += static_cast<acc_t>(r[i]);
    if constexpr (kMaskAct<ACT> && !kDirect) bw->append(math::act_mask_bit(z, ACT) ? 1u : 0u, 1);
    y[i] = static_cast<T>(math::act_forward(z, ACT, slope));
  };
  stream = stream && can_stream<T>();
  int64_t i = 0;
  if (stream) {
    const int64_t head = head_to_align(y, len);
    if constexpr (kDirect) {
      stream = head == 0;  // the direct writer takes whole vectors only
    } else {
      for (; i < head; ++i) one(i);
    }
  }
  for (; i + W <= len; i += W) {
    const V c = PER_ELEM ? V::loadu(center + i) : vcenter;
    const V s = PER_ELEM ? V::loadu(scale + i) : vscale;
    const V b = PER_ELEM ? V::loadu(shift + i) : vshift;
    V z = at::vec::fmadd(IO::load(x + i) - c, s, b);
    if constexpr (RES) z = z + IO::load(r + i);
    uint32_t bits = 0;
    z = act_vec<ACT>(z, vslope, &bits);
    if constexpr (kMaskAct<ACT>) bw->append(bits, W);
    if (stream) {
      store_stream(y + i, z);
    } else {
      IO::store(y + i, z);
    }
  }
  if constexpr (!kDirect) {
    if (const int n = static_cast<int>(len - i); n > 0) {  // the tail as one partial vector (zero lanes beyond n)
      const V c = PER_ELEM ? V::loadu(center + i, n) : vcenter;
      const V s = PER_ELEM ? V::loadu(scale + i, n) : vscale;
      const V b = PER_ELEM ? V::loadu(shift + i, n) : vshift;
      V z = at::vec::fmadd(IO::load_n(x + i, n) - c, s, b);
      if constexpr (RES) z = z + IO::load_n(r + i, n);
      uint32_t bits = 0;
      z = act_vec<ACT>(z, vslope, &bits);
      if constexpr (kMaskAct<ACT>) bw->append(bits & ((1u << n) - 1u), n);
      IO::store_n(y + i, z, n);
    }
  }
}

// dz = dy * act'(z) for one vector, from the mask bits (mask activations and identity; SiLU: dz_vec_z).
template <int ACT, typename V, typename BR>
inline V dz_vec(const V& dy, BR* br, const V& vslope) {
  static_assert(!kZAct<ACT>, "SiLU's dz needs z: dz_vec_z");
  if constexpr (ACT == kIdentity) {
    return dy;
  } else {
    const uint32_t bits = br->take(V::size());
    return select_bits(bits, dy, ACT == kLeakyReLU ? dy * vslope : V(0));
  }
}

// dz for any activation: from the mask bits, or (SiLU) from z = zf(), the pre-activation recomputed by the caller
// only when it is needed.
template <int ACT, typename V, typename BR, typename ZF>
inline V dz_vec_z(const V& dy, BR* br, const V& vslope, ZF&& zf) {
  if constexpr (kZAct<ACT>) {
    return silu_grad_vec(dy, zf());
  } else {
    return dz_vec<ACT>(dy, br, vslope);
  }
}

// dz for the first n (< V::size()) lanes of a partial vector (dy's other lanes are zero, and so are dz's).
template <int ACT, typename V, typename BR>
inline V dz_vec_n(const V& dy, BR* br, const V& vslope, int n) {
  static_assert(!kZAct<ACT>, "SiLU's dz needs z: dz_vec_n_z");
  if constexpr (ACT == kIdentity) {
    return dy;
  } else {
    const uint32_t bits = br->take(n);
    return select_bits(bits, dy, ACT == kLeakyReLU ? dy * vslope : V(0));
  }
}

// dz_vec_n for any activation. SiLU: lanes n.. are set to 0 (silu'(z) of the padding lanes' z may be inf or NaN,
// and 0 * NaN would reach the sums).
template <int ACT, typename V, typename BR, typename ZF>
inline V dz_vec_n_z(const V& dy, BR* br, const V& vslope, int n, ZF&& zf) {
  if constexpr (kZAct<ACT>) {
    return V::set(V(0), silu_grad_vec(dy, zf()), n);
  } else {
    return dz_vec_n<ACT>(dy, br, vslope, n);
  }
}

// dz for one value; z is read only by SiLU (callers pass the recomputed pre-activation, or anything otherwise).
template <int ACT, typename acc_t, typename BR>
inline acc_t dz_scalar(acc_t dy, BR* br, acc_t slope, acc_t z) {
  if constexpr (ACT == kIdentity) {
    return dy;
  } else if constexpr (kZAct<ACT>) {
    return math::silu_backward(dy, z);
  } else {
    return math::act_backward(dy, br->take(1) != 0u, ACT, slope);
  }
}

// What SiLU's backward recomputes z = (x - mean) * scale + shift (+ r) from (docs/design.md section 1): the
// residual (indexed like x; null when there is none) and, per channel, scale = w * invstd and shift = bias (a
// single value for a run of one channel, arrays indexed by channel for channels_last rows). Unused (all null) for
// the other activations.
template <typename T>
struct ZSrc {
  const T* r = nullptr;
  const acc_type_t<T>* scale = nullptr;
  const acc_type_t<T>* shift = nullptr;
  // The same source for the values starting `off` elements further (the residual pointer moves, the
  // per-channel coefficients do not).
  ZSrc shifted(int64_t off) const { return {r != nullptr ? r + off : nullptr, scale, shift}; }
};

// Backward reduction over one contiguous run of a single channel: (sum dz, sum dz * (x - mean)). Two vectors per
// step into independent accumulators, so the loop is not bound by the add / fma latency chain.
// zs: SiLU's z source (scale / shift: the channel's single values; r: the run's residual or null).
template <typename T, int ACT, typename BR = BitReader>
void backward_reduce_run(const T* dy, const T* x, int64_t len, BR* br, acc_type_t<T> mean,
                         acc_type_t<T> slope, double& sum_dz, double& sum_dzxc, const ZSrc<T>& zs = {}) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int W = IO::W;
  const V vmean(mean), vslope(slope);
  const V vzs(kZAct<ACT> ? zs.scale[0] : acc_t(0)), vzb(kZAct<ACT> ? zs.shift[0] : acc_t(0));
  // SiLU's z from d = x - mean (the same difference the sums use) and the residual.
  auto z_of = [&](const V& d, int64_t pos) {
    V z = at::vec::fmadd(d, vzs, vzb);
    if (zs.r != nullptr) z = z + IO::load(zs.r + pos);
    return z;
  };
  int64_t i = 0;
  while (i < len) {
    const int64_t stop = std::min(len, i + kReduceBlock);
    V a0(0), b0(0), a1(0), b1(0);
    for (; i + 2 * W <= stop; i += 2 * W) {
      const V d0 = IO::load(x + i) - vmean, d1 = IO::load(x + i + W) - vmean;
      const V dz0 = dz_vec_z<ACT>(IO::load(dy + i), br, vslope, [&] { return z_of(d0, i); });
      const V dz1 = dz_vec_z<ACT>(IO::load(dy + i + W), br, vslope, [&] { return z_of(d1, i + W); });
      a0 = a0 + dz0;
      a1 = a1 + dz1;
      b0 = at::vec::fmadd(dz0, d0, b0);
      b1 = at::vec::fmadd(dz1, d1, b1);
    }
    for (; i + W <= stop; i += W) {
      const V d = IO::load(x + i) - vmean;
      const V dz = dz_vec_z<ACT>(IO::load(dy + i), br, vslope, [&] { return z_of(d, i); });
      a0 = a0 + dz;
      b0 = at::vec::fmadd(dz, d, b0);
    }
    if (const int n = static_cast<int>(stop - i); n > 0) {  // lanes beyond n: dz = 0, so they add nothing
      const V d = IO::load_n(x + i, n) - vmean;
      const V dz = dz_vec_n_z<ACT>(IO::load_n(dy + i, n), br, vslope, n, [&] {
        V z = at::vec::fmadd(d, vzs, vzb);
        if (zs.r != nullptr) z = z + IO::load_n(zs.r + i, n);
        return z;
      });
      a0 = a0 + dz;
      b0 = at::vec::fmadd(dz, d, b0);
      i = stop;
    }
    const acc_t sa = hsum(a0 + a1), sb = hsum(b0 + b1);
    sum_dz += static_cast<double>(sa);
    sum_dzxc += static_cast<double>(sb);
  }
}

// Per-channel backward coefficients: dx = a * (dz - mdz) - (x - mean) * q in training
// (a = w * invstd, mdz = sum dz / M, q = a * invstd * sum(dz * xc) / M); dx = a * dz in eval.
// SiLU also recomputes z = (x - mean) * a + shift (+ r), shift = bias; shift is null for the other activations.
template <typename acc_t>
struct BwdCoef {
  const acc_t* mean;
  const acc_t* a;
  const acc_t* mdz;
  const acc_t* q;
  const acc_t* shift = nullptr;
};

// Backward elementwise over one contiguous run: dx (TRAIN or eval form) and/or dresidual = dz.
// r: SiLU's residual for this run (indexed like x), or null.
template <typename T, int ACT, bool PER_ELEM, bool TRAIN, bool DX, bool DR, typename BR = BitReader>
void backward_elementwise_run(const T* dy, const T* x, T* dx, T* dr, int64_t len, BR* br,
                              const BwdCoef<acc_type_t<T>>& k, acc_type_t<T> slope, bool stream = false,
                              const T* r = nullptr) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int W = IO::W;
  const V vslope(slope), vmean(k.mean[0]), va(k.a[0]), vmdz(TRAIN ? k.mdz[0] : acc_t(0)),
      vq(TRAIN ? k.q[0] : acc_t(0)), vshift(kZAct<ACT> ? k.shift[0] : acc_t(0));
  // SiLU's pre-activation of the vector at i (n < W: a partial one).
  auto z_vec = [&](int64_t i, int n) {
    const V mean = PER_ELEM ? V::loadu(k.mean + i, n) : vmean;
    const V a = PER_ELEM ? V::loadu(k.a + i, n) : va;
    const V b = PER_ELEM ? V::loadu(k.shift + i, n) : vshift;
    V z = at::vec::fmadd((n == W ? IO::load(x + i) : IO::load_n(x + i, n)) - mean, a, b);
    if (r != nullptr) z = z + (n == W ? IO::load(r + i) : IO::load_n(r + i, n));
    return z;
  };
  auto one = [&](int64_t i) {
    const int64_t j = PER_ELEM ? i : 0;
    acc_t z = 0;
    if constexpr (kZAct<ACT>) {
      z = (static_cast<acc_t>(x[i]) - k.mean[j]) * k.a[j] + k.shift[j];
      if (r != nullptr) z += static_cast<acc_t>(r[i]);
    }
    const acc_t dz = dz_scalar<ACT>(static_cast<acc_t>(dy[i]), br, slope, z);
    if constexpr (DR) dr[i] = static_cast<T>(dz);
    if constexpr (DX) {
      if constexpr (TRAIN) {
        dx[i] = static_cast<T>(k.a[j] * (dz - k.mdz[j]) - (static_cast<acc_t>(x[i]) - k.mean[j]) * k.q[j]);
      } else {
        dx[i] = static_cast<T>(k.a[j] * dz);
      }
    }
  };
  auto put = [&](T* p, const V& v, bool nt) {
    if (nt) {
      store_stream(p, v);
    } else {
      IO::store(p, v);
    }
  };
  // Both outputs are streamed only when they are equally misaligned (they are: same allocator, same offset).
  stream = stream && can_stream<T>() &&
           (!(DX && DR) || reinterpret_cast<uintptr_t>(dx) % 64 == reinterpret_cast<uintptr_t>(dr) % 64);
  int64_t i = 0;
  if (stream) {
    const int64_t head = head_to_align(DX ? dx : dr, len);
    if constexpr (!std::is_same_v<BR, BitReader>) {
      stream = head == 0;  // the direct reader takes whole vectors only
    } else {
      for (; i < head; ++i) one(i);
    }
  }
  for (; i + W <= len; i += W) {
    const V dz = dz_vec_z<ACT>(IO::load(dy + i), br, vslope, [&] { return z_vec(i, W); });
    if constexpr (DR) put(dr + i, dz, stream);
    if constexpr (DX) {
      const V a = PER_ELEM ? V::loadu(k.a + i) : va;
      if constexpr (TRAIN) {
        const V mean = PER_ELEM ? V::loadu(k.mean + i) : vmean;
        const V mdz = PER_ELEM ? V::loadu(k.mdz + i) : vmdz;
        const V q = PER_ELEM ? V::loadu(k.q + i) : vq;
        put(dx + i, a * (dz - mdz) - (IO::load(x + i) - mean) * q, stream);
      } else {
        put(dx + i, a * dz, stream);
      }
    }
  }
  if (const int n = static_cast<int>(len - i); n > 0) {  // the tail as one partial vector
    const V dz = dz_vec_n_z<ACT>(IO::load_n(dy + i, n), br, vslope, n, [&] { return z_vec(i, n); });
    if constexpr (DR) IO::store_n(dr + i, dz, n);
    if constexpr (DX) {
      const V a = PER_ELEM ? V::loadu(k.a + i, n) : va;
      if constexpr (TRAIN) {
        const V mean = PER_ELEM ? V::loadu(k.mean + i, n) : vmean;
        const V mdz = PER_ELEM ? V::loadu(k.mdz + i, n) : vmdz;
        const V q = PER_ELEM ? V::loadu(k.q + i, n) : vq;
        IO::store_n(dx + i, a * (dz - mdz) - (IO::load_n(x + i, n) - mean) * q, n);
      } else {
        IO::store_n(dx + i, a * dz, n);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// channels_last rows of whole vectors (C = nv * W, W a multiple of 8): the elementwise passes as one loop over
// rows, with the per-channel coefficients loaded once per row (held in registers when NV, the compile-time
// number of vectors per row, is small) and the mask read / written directly (DirectBitWriter / Reader).
// NV == 0: any such C, nv = C / W at run time.

// Software prefetch distance of the row loops, and a prefetch of the cache lines of one row (past the end of
// the tensor it is a harmless hint: prefetches never fault).
constexpr int64_t kPrefetchBytes = 2048;

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 3);
}

template <typename T, int ACT, bool RES, int NV>
void forward_rows(const T* x, const T* r, T* y, int64_t y_ld, uint8_t* mask, int64_t r0, int64_t r1, int64_t C,
                  const acc_type_t<T>* center, const acc_type_t<T>* scale, const acc_type_t<T>* shift,
                  acc_type_t<T> slope, bool stream) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const int64_t nv = NV > 0 ? NV : C / W;
  const V vslope(slope);
  stream = stream && can_stream<T>() && reinterpret_cast<uintptr_t>(y) % (W * sizeof(T)) == 0 &&
           (y_ld * static_cast<int64_t>(sizeof(T))) % (W * static_cast<int64_t>(sizeof(T))) == 0;
  DirectBitWriter<W % 8 == 0 ? W : 8> bw(mask, r0 * C);
  // Rows are short: prefetch the inputs a few KB ahead (the hardware prefetcher alone leaves L3 latency exposed).
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(T))));
  for (int64_t row = r0; row < r1; ++row) {
    const T* xr = x + row * C;
    T* yr = y + row * y_ld;
    prefetch_row(x + (row + ahead) * C, C);
    if constexpr (RES) prefetch_row(r + (row + ahead) * C, C);
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t j = v * W;
      V z = at::vec::fmadd(IO::load(xr + j) - V::loadu(center + j), V::loadu(scale + j), V::loadu(shift + j));
      if constexpr (RES) z = z + IO::load(r + row * C + j);
      uint32_t bits = 0;
      z = act_vec<ACT>(z, vslope, &bits);
      if constexpr (kMaskAct<ACT>) bw.append(bits, W);
      if (stream) {
        store_stream(yr + j, z);
      } else {
        IO::store(yr + j, z);
      }
    }
  }
  if (stream) stream_fence();
}

// dx = a * (dz - mdz) - (x - mean) * q (training) or a * dz (eval), and/or dresidual = dz, for rows [r0, r1).
// r: SiLU's residual (dense like x), or null.
template <typename T, int ACT, bool TRAIN, bool DX, bool DR, int NV>
void backward_rows(const T* dy, int64_t dy_ld, const T* x, T* dx, T* dr, const uint8_t* mask, int64_t r0, int64_t r1,
                   int64_t C, const BwdCoef<acc_type_t<T>>& k, acc_type_t<T> slope, bool stream,
                   const T* r = nullptr) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  const int64_t nv = NV > 0 ? NV : C / W;
  const V vslope(slope);
  stream = stream && can_stream<T>() && reinterpret_cast<uintptr_t>(DX ? dx : dr) % (W * sizeof(T)) == 0 &&
           (!(DX && DR) || reinterpret_cast<uintptr_t>(dx) % 64 == reinterpret_cast<uintptr_t>(dr) % 64);
  auto put = [&](T* p, const V& v) {
    if (stream) {
      store_stream(p, v);
    } else {
      IO::store(p, v);
    }
  };
  DirectBitReader<W % 8 == 0 ? W : 8> br(mask, r0 * C);
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(T))));
  // Local copies of the coefficient pointers: stores through T* could alias the struct's fields for the compiler.
  const acc_type_t<T>* const ka = k.a;
  const acc_type_t<T>* const kmdz = k.mdz;
  const acc_type_t<T>* const kmean = k.mean;
  const acc_type_t<T>* const kq = k.q;
  const acc_type_t<T>* const kshift = k.shift;
  for (int64_t row = r0; row < r1; ++row) {
    const T* dyr = dy + row * dy_ld;
    const int64_t off = row * C;
    prefetch_row(dy + (row + ahead) * dy_ld, C);
    if constexpr ((DX && TRAIN) || kZAct<ACT>) prefetch_row(x + off + ahead * C, C);
    if constexpr (kZAct<ACT>) {
      if (r != nullptr) prefetch_row(r + off + ahead * C, C);
    }
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t j = v * W;
      const V dz = dz_vec_z<ACT>(IO::load(dyr + j), &br, vslope, [&] {
        V z = at::vec::fmadd(IO::load(x + off + j) - V::loadu(kmean + j), V::loadu(ka + j), V::loadu(kshift + j));
        if (r != nullptr) z = z + IO::load(r + off + j);
        return z;
      });
      if constexpr (DR) put(dr + off + j, dz);
      if constexpr (DX) {
        if constexpr (TRAIN) {
          put(dx + off + j,
              V::loadu(ka + j) * (dz - V::loadu(kmdz + j)) - (IO::load(x + off + j) - V::loadu(kmean + j)) * V::loadu(kq + j));
        } else {
          put(dx + off + j, V::loadu(ka + j) * dz);
        }
      }
    }
  }
  if (stream) stream_fence();
}

// Calls f(std::integral_constant<int, NV>) with NV = C / W for narrow rows (1 to 4 vectors), else NV = 0.
template <int W, typename F>
void dispatch_row_vectors(int64_t C, F&& f) {
  switch (C / W) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 3:
      f(std::integral_constant<int, 3>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
      break;
  }
}

// ---------------------------------------------------------------------------------------------------
// channels_last helpers: rows of C values. Work is split into a fixed number of row chunks (independent of
// how the runtime schedules threads), each producing its own partial results, merged in chunk order, so
// results are deterministic for a given thread count.
inline int64_t num_row_chunks(int64_t rows, int64_t C) {
  if (rows * C < kParallelGrain) return 1;  // threads cost more than they save on small tensors
  return std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
}

// Channels handed to one task of a per-channel parallel loop: at least kParallelGrain elements of work.
inline int64_t channel_grain(int64_t M) { return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, M)); }

inline void chunk_bounds(int64_t rows, int64_t chunks, int64_t i, int64_t& begin, int64_t& end) {
  const int64_t per = (rows + chunks - 1) / chunks;
  begin = std::min(rows, i * per);
  end = std::min(rows, begin + per);
}

inline int64_t rows_per_block(int64_t C, int64_t elem_size) {
  return std::max<int64_t>(1, kRowBlockBytes / std::max<int64_t>(1, C * elem_size));
}

// Column reductions over a block of channels_last rows. A group of G vectors of channels keeps its partial
// sums in registers over all rows of the block (accumulating row by row into arrays would serialise on
// store-to-load forwarding when C is small); remaining channels go one vector, then one value, at a time.
//   kStats0: s1 += x - center                      (pivoted sum, to find the block centre)
//   kStats1: s1 += x - center, s2 += (x - center)^2
//   kGrad:   s1 += dz, s2 += dz * (x - center)      (dz from dy and the mask; center = the batch mean)
enum ColumnOp { kStats0, kStats1, kGrad };

// G vectors of channels x U rows per step: G * U independent accumulator pairs, so that narrow tensors (C of one or
// two vectors) are not bound by the latency of one add / fma chain per vector.
// kGrad with SiLU: zs gives z = (x - center) * scale + shift (+ r), per channel (center = the batch mean).
template <typename T, int OP, int ACT, int G, int U>
inline void column_group(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0, int64_t nrows,
                         int64_t C, int64_t j, const acc_type_t<T>* center, acc_type_t<T> slope, acc_type_t<T>* s1,
                         acc_type_t<T>* s2, const ZSrc<T>& zs) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int W = IO::W;
  constexpr bool kZ = OP == kGrad && kZAct<ACT>;
  V c[G], a1[G * U], a2[G * U], zsc[kZ ? G : 1], zsh[kZ ? G : 1];
  for (int g = 0; g < G; ++g) c[g] = V::loadu(center + j + g * W);
  if constexpr (kZ) {
    for (int g = 0; g < G; ++g) {
      zsc[g] = V::loadu(zs.scale + j + g * W);
      zsh[g] = V::loadu(zs.shift + j + g * W);
    }
  }
  for (int k = 0; k < G * U; ++k) {
    a1[k] = V(0);
    a2[k] = V(0);
  }
  const V vslope(slope);
  auto step = [&](int64_t row, int u) {
    const int64_t off = row * C + j;
    for (int g = 0; g < G; ++g) {
      const int k = u * G + g;
      const V d = IO::load(x + off + g * W) - c[g];
      if constexpr (OP == kGrad) {
        V dz = IO::load(dy + row * dy_ld + j + g * W);
        if constexpr (kZ) {
          V z = at::vec::fmadd(d, zsc[g], zsh[g]);
          if (zs.r != nullptr) z = z + IO::load(zs.r + off + g * W);
          dz = silu_grad_vec(dz, z);
        } else if constexpr (ACT != kIdentity) {
          dz = select_bits(read_bits(mask, off + g * W, W), dz, ACT == kLeakyReLU ? dz * vslope : V(0));
        }
        a1[k] = a1[k] + dz;
        a2[k] = at::vec::fmadd(dz, d, a2[k]);
      } else {
        a1[k] = a1[k] + d;
        if constexpr (OP == kStats1) a2[k] = at::vec::fmadd(d, d, a2[k]);
      }
    }
  };
  int64_t r = 0;
  for (; r + U <= nrows; r += U) {
    for (int u = 0; u < U; ++u) step(row0 + r + u, u);
  }
  for (; r < nrows; ++r) step(row0 + r, 0);
  for (int g = 0; g < G; ++g) {
    V t1 = a1[g], t2 = a2[g];
    for (int u = 1; u < U; ++u) {
      t1 = t1 + a1[u * G + g];
      t2 = t2 + a2[u * G + g];
    }
    (V::loadu(s1 + j + g * W) + t1).store(s1 + j + g * W);
    if constexpr (OP != kStats0) (V::loadu(s2 + j + g * W) + t2).store(s2 + j + g * W);
  }
}

// The last C - j (< W) channels as one partial vector per row (masked loads; the other lanes stay zero).
template <typename T, int OP, int ACT>
inline void column_tail(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0, int64_t nrows,
                        int64_t C, int64_t j, const acc_type_t<T>* center, acc_type_t<T> slope, acc_type_t<T>* s1,
                        acc_type_t<T>* s2, const ZSrc<T>& zs) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr bool kZ = OP == kGrad && kZAct<ACT>;
  const int n = static_cast<int>(C - j);
  const V c = V::loadu(center + j, n), vslope(slope);
  const V zsc = kZ ? V::loadu(zs.scale + j, n) : V(0), zsh = kZ ? V::loadu(zs.shift + j, n) : V(0);
  V a1(0), a2(0);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t off = (row0 + r) * C + j;
    const V d = IO::load_n(x + off, n) - c;
    if constexpr (OP == kGrad) {
      V dz = IO::load_n(dy + (row0 + r) * dy_ld + j, n);
      if constexpr (kZ) {
        V z = at::vec::fmadd(d, zsc, zsh);
        if (zs.r != nullptr) z = z + IO::load_n(zs.r + off, n);
        dz = V::set(V(0), silu_grad_vec(dz, z), n);  // lanes n..: 0, not 0 * silu'(padding z)
      } else if constexpr (ACT != kIdentity) {
        dz = select_bits(read_bits(mask, off, n), dz, ACT == kLeakyReLU ? dz * vslope : V(0));
      }
      a1 = a1 + dz;
      a2 = at::vec::fmadd(dz, d, a2);
    } else {
      a1 = a1 + d;
      if constexpr (OP == kStats1) a2 = at::vec::fmadd(d, d, a2);
    }
  }
  (V::loadu(s1 + j, n) + a1).store(s1 + j, n);
  if constexpr (OP != kStats0) (V::loadu(s2 + j, n) + a2).store(s2 + j, n);
}

// The last C - j (< W) channels when the row holds at least W (C >= W): the row's last W values as one full vector
// (channels C - W .. C - 1, overlapping the previous group), lanes of channels below j cleared with a bit mask
// (cleared, not multiplied: an infinite value in a lane already counted must not become a NaN here). A partial
// load without hardware masking (AVX2) goes through a stack copy and a store-forwarding stall on every row.
template <typename T, int OP, int ACT>
inline void column_tail_overlap(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0,
                                int64_t nrows, int64_t C, int64_t j, const acc_type_t<T>* center, acc_type_t<T> slope,
                                acc_type_t<T>* s1, acc_type_t<T>* s2, const ZSrc<T>& zs) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = acc_type_t<T>;
  constexpr bool kZ = OP == kGrad && kZAct<ACT>;
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  constexpr int W = IO::W;
  const int64_t j0 = C - W;
  acc_t keep_lanes[W];
  for (int l = 0; l < W; ++l) {
    const bits_t b = j0 + l >= j ? ~bits_t(0) : bits_t(0);
    std::memcpy(&keep_lanes[l], &b, sizeof(b));
  }
  const V keep = V::loadu(keep_lanes), c = V::loadu(center + j0), vslope(slope);
  const V zsc = kZ ? V::loadu(zs.scale + j0) : V(0), zsh = kZ ? V::loadu(zs.shift + j0) : V(0);
  V a1(0), a2(0);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t off = (row0 + r) * C + j0;
    const V d = (IO::load(x + off) - c) & keep;
    if constexpr (OP == kGrad) {
      V dz = IO::load(dy + (row0 + r) * dy_ld + j0);
      if constexpr (kZ) {
        V z = at::vec::fmadd(d, zsc, zsh);
        if (zs.r != nullptr) z = z + IO::load(zs.r + off);
        dz = silu_grad_vec(dz, z);
      } else if constexpr (ACT != kIdentity) {
        dz = select_bits(read_bits(mask, off, W), dz, ACT == kLeakyReLU ? dz * vslope : V(0));
      }
      dz = dz & keep;
      a1 = a1 + dz;
      a2 = at::vec::fmadd(dz, d, a2);
    } else {
      a1 = a1 + d;
      if constexpr (OP == kStats1) a2 = at::vec::fmadd(d, d, a2);
    }
  }
  // Lanes below j hold exact zeros: adding them leaves those channels' sums unchanged.
  (V::loadu(s1 + j0) + a1).store(s1 + j0);
  if constexpr (OP != kStats0) (V::loadu(s2 + j0) + a2).store(s2 + j0);
}

// The backward's sums (kGrad) over rows of more than one group of channels are walked in tiles of a few rows
// (kColumnTileBytes): every group over the tile's rows, then the next tile. Walking each group over the whole
// block instead reads each row in pieces a block apart: for C >= 1024 the rows are pages apart, where the hardware
// prefetchers stop, and the lines of the row's other groups are gone by the time they are read. Each group adds
// its tile's sums into s1 / s2 (in L1).
template <typename T, int OP, int ACT = kIdentity>
void column_reduce(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0, int64_t nrows,
                   int64_t C, const acc_type_t<T>* center, acc_type_t<T> slope, acc_type_t<T>* s1, acc_type_t<T>* s2,
                   const ZSrc<T>& zs = {});

template <typename T, int OP, int ACT>
void column_reduce_tile(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0, int64_t nrows,
                        int64_t C, const acc_type_t<T>* center, acc_type_t<T> slope, acc_type_t<T>* s1,
                        acc_type_t<T>* s2, const ZSrc<T>& zs) {
  constexpr int W = VecIO<T>::W;
  int64_t j = 0;
  for (; j + 4 * W <= C; j += 4 * W) {
    column_group<T, OP, ACT, 4, 1>(x, dy, dy_ld, mask, row0, nrows, C, j, center, slope, s1, s2, zs);
  }
  if (j + 2 * W <= C) {
    column_group<T, OP, ACT, 2, 2>(x, dy, dy_ld, mask, row0, nrows, C, j, center, slope, s1, s2, zs);
    j += 2 * W;
  }
  if (j + W <= C) {
    column_group<T, OP, ACT, 1, 4>(x, dy, dy_ld, mask, row0, nrows, C, j, center, slope, s1, s2, zs);
    j += W;
  }
  if (j < C && C >= W) {
    column_tail_overlap<T, OP, ACT>(x, dy, dy_ld, mask, row0, nrows, C, j, center, slope, s1, s2, zs);
  } else if (j < C) {
    column_tail<T, OP, ACT>(x, dy, dy_ld, mask, row0, nrows, C, j, center, slope, s1, s2, zs);
  }
}

template <typename T, int OP, int ACT>
void column_reduce(const T* x, const T* dy, int64_t dy_ld, const uint8_t* mask, int64_t row0, int64_t nrows,
                   int64_t C, const acc_type_t<T>* center, acc_type_t<T> slope, acc_type_t<T>* s1, acc_type_t<T>* s2,
                   const ZSrc<T>& zs) {
  constexpr int W = VecIO<T>::W;
  // The statistics (one tensor) measured no faster tiled at C = 2048 (AMD EPYC Zen 3): only the backward's sums
  // (two tensors and the mask) are tiled; they ran 1.9x faster at 16x2048x7x7 channels_last.
  if (OP != kGrad || C <= 4 * W) {  // one group per row: nothing to come back for
    column_reduce_tile<T, OP, ACT>(x, dy, dy_ld, mask, row0, nrows, C, center, slope, s1, s2, zs);
    return;
  }
  const int64_t row_bytes = 2 * C * static_cast<int64_t>(sizeof(T));  // x and dy
  const int64_t tile = std::max<int64_t>(4, kColumnTileBytes / row_bytes);
  for (int64_t t0 = 0; t0 < nrows; t0 += tile) {
    column_reduce_tile<T, OP, ACT>(x, dy, dy_ld, mask, row0 + t0, std::min(tile, nrows - t0), C, center, slope, s1,
                                   s2, zs);
  }
}

// Batch mean and biased variance of a channels_last tensor. Per row block (sized to stay in L2), shifted
// sums of d = x - centre and d^2 give the block's exact mean (centre + sum d / n) and M2 (sum d^2 - (sum d)^2 / n),
// accurate while the centre is near the block mean: the chunk's first block finds one with a pass of x - pivot
// (pivot = its first row, so the float sums stay small even for inputs with a large mean), later blocks use the
// chunk's mean so far.
// Blocks merge into per-chunk (count, mean, M2) in double with Chan et al.'s formula, then chunks merge.
template <typename T>
void stats_channels_last(const T* x, int64_t rows, int64_t C, double* mean_out, double* var_out) {
  using acc_t = acc_type_t<T>;
  const int64_t chunks = num_row_chunks(rows, C);
  std::vector<double> cmean(chunks * C, 0.0), cm2(chunks * C, 0.0);
  std::vector<int64_t> ccount(chunks, 0);
  const int64_t block = rows_per_block(C, sizeof(T));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> center(C), s1(C), s2(C);
    for (int64_t ch = c0; ch < c1; ++ch) {
      int64_t r0, r1;
      chunk_bounds(rows, chunks, ch, r0, r1);
      double* tmean = cmean.data() + ch * C;
      double* tm2 = cm2.data() + ch * C;
      int64_t count = 0;
      for (int64_t b0 = r0; b0 < r1; b0 += block) {
        const int64_t b1 = std::min(r1, b0 + block), nb = b1 - b0;
        if (count == 0) {
          // The chunk's first block: a pivoted pass finds a centre near its mean.
          for (int64_t j = 0; j < C; ++j) center[j] = static_cast<acc_t>(x[b0 * C + j]);
          std::fill(s1.begin(), s1.end(), acc_t(0));
          column_reduce<T, kStats0>(x, nullptr, 0, nullptr, b0 + 1, nb - 1, C, center.data(), acc_t(0), s1.data(),
                                    nullptr);
          for (int64_t j = 0; j < C; ++j) {
            center[j] = static_cast<acc_t>(static_cast<double>(center[j]) + static_cast<double>(s1[j]) / nb);
          }
        } else {
          // Later blocks: the chunk's mean so far is the centre (one pass per block).
          for (int64_t j = 0; j < C; ++j) center[j] = static_cast<acc_t>(tmean[j]);
        }
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        column_reduce<T, kStats1>(x, nullptr, 0, nullptr, b0, nb, C, center.data(), acc_t(0), s1.data(), s2.data());
        const double tot = static_cast<double>(count + nb);
        for (int64_t j = 0; j < C; ++j) {
          const double d1 = static_cast<double>(s1[j]);
          const double bmean = static_cast<double>(center[j]) + d1 / nb;
          const double bm2 = std::max(0.0, static_cast<double>(s2[j]) - d1 * d1 / nb);
          const double delta = bmean - tmean[j];
          tmean[j] += delta * static_cast<double>(nb) / tot;
          tm2[j] += bm2 + delta * delta * static_cast<double>(count) * nb / tot;
        }
        count += nb;
      }
      ccount[ch] = count;
    }
  });
  for (int64_t j = 0; j < C; ++j) {
    double m = 0, m2 = 0;
    int64_t n = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t nb = ccount[ch];
      if (nb == 0) continue;
      const double tot = static_cast<double>(n + nb);
      const double delta = cmean[ch * C + j] - m;
      m += delta * static_cast<double>(nb) / tot;
      m2 += cm2[ch * C + j] + delta * delta * static_cast<double>(n) * nb / tot;
      n += nb;
    }
    mean_out[j] = m;
    var_out[j] = n > 0 ? m2 / static_cast<double>(n) : 0.0;
  }
  // A channel with an infinite or NaN value: the centred sums and the merges above form inf - inf (a centre or a
  // chunk mean at +-Inf) and give NaN where PyTorch's plain sum gives +-Inf. Such a channel is summed again the plain
  // way (mean = sum / n, then the squared deviations from it), so non-finite values propagate as in PyTorch; finite
  // channels never take this path.
  for (int64_t j = 0; j < C; ++j) {
    if (std::isfinite(mean_out[j]) && std::isfinite(var_out[j])) continue;
    double sum = 0;
    for (int64_t r = 0; r < rows; ++r) sum += static_cast<double>(x[r * C + j]);
    const double mu = sum / static_cast<double>(rows);
    double m2 = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double d = static_cast<double>(x[r * C + j]) - mu;
      m2 += d * d;
    }
    mean_out[j] = mu;
    var_out[j] = m2 / static_cast<double>(rows);
  }
}

// Batch mean and biased variance of channel c of an NCHW tensor (N planes of S values), in double. The sum is of
// x - pivot, pivot = the channel's first value (0 if it is not finite, so inf and NaN propagate as in a plain sum):
// acc_t partial sums of the values themselves lose ~|mean| / std units of rounding of the mean when the mean is
// large (issue 17: a mean off by 1.6 ulps at 1e3 std put 2.5x PyTorch's float32 error into grad_weight);
// stats_channels_last pivots the same way. The second pass sums squared deviations from that mean.
template <typename T>
void stats_nchw_channel(const T* x, int64_t N, int64_t C, int64_t S, int64_t c, double& mean_out, double& var_out) {
  using acc_t = acc_type_t<T>;
  const acc_t first = static_cast<acc_t>(x[c * S]);
  const acc_t pivot = std::isfinite(static_cast<double>(first)) ? first : acc_t(0);
  const double M = static_cast<double>(N * S);
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) sum += run_reduce<T, false>(x + (n * C + c) * S, S, pivot);
  const double mu = static_cast<double>(pivot) + sum / M;
  double m2 = 0;
  for (int64_t n = 0; n < N; ++n) m2 += run_reduce<T, true>(x + (n * C + c) * S, S, static_cast<acc_t>(mu));
  mean_out = mu;
  var_out = m2 / M;
}

// ---------------------------------------------------------------------------------------------------
// Per-channel normalise coefficients (see forward_run): z = (x - center) * scale + shift, from the statistics
// in double (training) or the given acc_t ones (eval, building blocks: center = mean exactly).
template <typename acc_t>
struct FwdCoef {
  acc_t center, scale, shift;
  static FwdCoef from(double mu, double is, acc_t w, acc_t b) {
    FwdCoef k;
    k.center = static_cast<acc_t>(mu);
    k.scale = static_cast<acc_t>(static_cast<double>(w) * is);
    // The correction only where it is a number: d == 0 (the mean is exact in acc_t) or an infinite scale (an
    // infinite weight) leave shift = b, so z = (x - centre) * scale + b (not 0 * inf or inf - inf = NaN).
    const double d = mu - static_cast<double>(k.center);
    k.shift = (d == 0 || !std::isfinite(static_cast<double>(k.scale)))
                  ? b
                  : static_cast<acc_t>(static_cast<double>(b) - d * k.scale);
    return k;
  }
};

template <typename T, int ACT, bool RES>
void forward_typed(const BnActForwardArgs& a) {
  using acc_t = acc_type_t<T>;
  constexpr int W = VecIO<T>::W;
  const T* x = static_cast<const T*>(a.x);
  const T* r = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  const acc_t* b = static_cast<const acc_t*>(a.bias);
  acc_t* mean = static_cast<acc_t*>(a.mean);
  acc_t* invstd = static_cast<acc_t*>(a.invstd);
  acc_t* var = static_cast<acc_t*>(a.var);
  const acc_t slope = static_cast<acc_t>(a.negative_slope);
  const int64_t N = a.N, C = a.C, S = a.S, M = N * S;
  // Leading dimension of y: between consecutive n (NCHW) or rows (channels_last); y may be a channel slice.
  const int64_t y_ld = a.y_ld != 0 ? a.y_ld : (a.channels_last ? C : C * S);
  // Non-temporal stores for outputs far larger than the caches, but not into channels_last rows shared with
  // other calls (partial cache lines would be written back piecemeal).
  const int64_t out_bytes = a.stream_bytes > 0 ? a.stream_bytes : N * C * S * static_cast<int64_t>(sizeof(T));
  const bool stream = out_bytes >= kStreamBytes && !(a.channels_last && y_ld != C);
  const bool stats_only = y == nullptr;
  TORCH_INTERNAL_ASSERT(!stats_only || a.training, "bn_act forward kernel: y may be null only in training");
  // Runs (NCHW planes of S, channels_last rows of C) of whole vectors write the mask directly.
  constexpr int kDirectW = W % 8 == 0 ? W : 8;  // direct is false when W is not a multiple of 8
  const bool direct = direct_mask<T>(a.channels_last ? C : S);
  if (!stats_only && kMaskAct<ACT>) prepare_mask(a.mask, N * C * S, direct);
  auto eval_coef = [&](int64_t c) { return FwdCoef<acc_t>{mean[c], w[c] * invstd[c], b[c]}; };

  if (!a.channels_last) {
    // One plane (n, c) of S values.
    auto plane = [&](int64_t n, int64_t c, const FwdCoef<acc_t>& k) {
      const int64_t off = (n * C + c) * S;
      const T* rp = RES ? r + off : nullptr;
      T* yp = y + n * y_ld + c * S;
      if (direct) {
        DirectBitWriter<kDirectW> bw(a.mask, off);
        forward_run<T, ACT, RES, false>(x + off, rp, yp, S, &k.center, &k.scale, &k.shift, slope, &bw, stream);
      } else {
        BitWriter bw(a.mask, off, off + S);
        forward_run<T, ACT, RES, false>(x + off, rp, yp, S, &k.center, &k.scale, &k.shift, slope, &bw, stream);
      }
    };
    // Training statistics of channel c (stored), and its normalise coefficients.
    auto channel_stats = [&](int64_t c) {
      double mu, v;
      stats_nchw_channel(x, N, C, S, c, mu, v);
      const double is = 1.0 / std::sqrt(v + a.eps);
      mean[c] = static_cast<acc_t>(mu);
      var[c] = static_cast<acc_t>(v);
      invstd[c] = static_cast<acc_t>(is);
      return FwdCoef<acc_t>::from(mu, is, w[c], b[c]);
    };
    if (a.training && (stats_only || (direct && stream))) {
      // Outputs far larger than the caches: one thread per channel from statistics to output, so the channel's
      // planes stay in L2 across the three passes (sum, squared deviations, normalise) and DRAM sees x once.
      at::parallel_for(0, C, channel_grain(M), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const FwdCoef<acc_t> k = channel_stats(c);
          if (stats_only) continue;
          for (int64_t n = 0; n < N; ++n) plane(n, c, k);
        }
        if (stream) stream_fence();
      });
    } else {
      // Cache-resident tensors (or planes that share mask words): every channel's statistics first, then the
      // planes in memory order, as in eval. Walking a channel's N planes (S values each, C * S apart) to normalise
      // them costs more than the L2 it saves once x fits in the caches (one thread, 128x64x16x16 float: 1.63 ms
      // per channel vs 1.27 ms for the two phases; 16x256x14x14, a per-plane mask writer with atomics at both
      // ends of every plane: 1.39 vs 0.57 ms).
      std::vector<FwdCoef<acc_t>> k(C);
      if (a.training) {
        at::parallel_for(0, C, channel_grain(M), [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) k[c] = channel_stats(c);
        });
      } else {
        for (int64_t c = 0; c < C; ++c) k[c] = eval_coef(c);
      }
      const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, S));
      if (direct) {
        at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) plane(p / C, p % C, k[p % C]);
          if (stream) stream_fence();
        });
      } else {
        // Planes not made of whole vectors share mask words: one BitWriter per task (atomics only at its ends).
        at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
          BitWriter bw(a.mask, p0 * S, p1 * S);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t n = p / C, c = p % C, off = p * S;
            forward_run<T, ACT, RES, false>(x + off, RES ? r + off : nullptr, y + n * y_ld + c * S, S, &k[c].center,
                                            &k[c].scale, &k[c].shift, slope, &bw, stream);
          }
          if (stream) stream_fence();
        });
      }
    }
    return;
  }

  // channels_last: statistics over all rows first (they span the whole tensor), then one normalise pass.
  std::vector<acc_t> center(C), scale(C), shift(C);
  if (a.training) {
    std::vector<double> mu(C), v(C);
    stats_channels_last<T>(x, M, C, mu.data(), v.data());
    for (int64_t c = 0; c < C; ++c) {
      const double is = 1.0 / std::sqrt(v[c] + a.eps);
      mean[c] = static_cast<acc_t>(mu[c]);
      var[c] = static_cast<acc_t>(v[c]);
      invstd[c] = static_cast<acc_t>(is);
      const FwdCoef<acc_t> k = FwdCoef<acc_t>::from(mu[c], is, w[c], b[c]);
      center[c] = k.center;
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
    if (stats_only) return;
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const FwdCoef<acc_t> k = eval_coef(c);
      center[c] = k.center;
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
  }
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, C));
  if (direct) {
    dispatch_row_vectors<W>(C, [&](auto nv) {
      at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
        forward_rows<T, ACT, RES, nv()>(x, r, y, y_ld, a.mask, r0, r1, C, center.data(), scale.data(), shift.data(),
                                        slope, stream);
      });
    });
    return;
  }
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    BitWriter bw(a.mask, r0 * C, r1 * C);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t off = row * C;
      forward_run<T, ACT, RES, true>(x + off, RES ? r + off : nullptr, y + row * y_ld, C, center.data(), scale.data(),
                                     shift.data(), slope, &bw, stream);
    }
    if (stream) stream_fence();
  });
}

template <typename T, int ACT, bool TRAIN, bool DX, bool DR>
void backward_typed(const BnActBackwardArgs& a) {
  using acc_t = acc_type_t<T>;
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.dx);
  T* dr = static_cast<T*>(a.dresidual);
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
  const acc_t* w = static_cast<const acc_t*>(a.weight);
  acc_t* sum_dz = static_cast<acc_t*>(a.sum_dz);
  acc_t* sum_dzxhat = static_cast<acc_t*>(a.sum_dz_xhat);
  // SiLU recomputes z = (x - mean) * w * invstd + bias (+ residual) (docs/design.md section 1).
  const acc_t* bias = static_cast<const acc_t*>(a.bias);
  const T* res = static_cast<const T*>(a.residual);
  TORCH_INTERNAL_ASSERT(!kZAct<ACT> || bias != nullptr, "bn_act backward kernel: SiLU needs the bias");
  // sums_given: the sums are inputs (over a.count values, e.g. all ranks' of a synchronised BatchNorm).
  const bool reduce = sum_dz != nullptr && !a.sums_given;
  const acc_t slope = static_cast<acc_t>(a.negative_slope);
  const int64_t N = a.N, C = a.C, S = a.S;
  const int64_t M = N * S;  // rows (channels_last) or values per channel held here
  // Values per channel the means are taken over: all ranks' when the sums are given.
  const double count = static_cast<double>(a.sums_given ? a.count : M);
  const int64_t dy_ld = a.dy_ld != 0 ? a.dy_ld : (a.channels_last ? C : C * S);
  TORCH_INTERNAL_ASSERT(!a.sums_given || (sum_dz != nullptr && sum_dzxhat != nullptr && a.count > 0),
                        "bn_act backward kernel: sums_given needs both sums and count > 0");
  // The given sums as the kernel uses them: sum dz and sum dz * (x - mean) = sum_dz_xhat / invstd.
  auto given_sums = [&](int64_t c, double* sdz, double* sdzxc) {
    *sdz = static_cast<double>(sum_dz[c]);
    *sdzxc = static_cast<double>(sum_dzxhat[c]) / static_cast<double>(invstd[c]);
  };
  // dx and dresidual are dense even when dy is a slice.
  const bool stream =
      (a.stream_bytes > 0 ? a.stream_bytes : N * C * S * static_cast<int64_t>(sizeof(T))) >= kStreamBytes;
  constexpr bool kElementwise = DX || DR;
  // Runs (NCHW planes, channels_last rows) of whole vectors read the mask directly (see DirectBitReader).
  constexpr int kDirectW = VecIO<T>::W % 8 == 0 ? VecIO<T>::W : 8;
  const bool direct = direct_mask<T>(a.channels_last ? C : S);

  // Per-channel coefficients of the elementwise pass, from the channel's reduction (training) or not (eval).
  auto coefficients = [&](int64_t c, double sdz, double sdzxc, acc_t* ka, acc_t* kmdz, acc_t* kq) {
    const double is = static_cast<double>(invstd[c]);
    const double k = static_cast<double>(w[c]) * is;
    *ka = static_cast<acc_t>(k);
    *kmdz = static_cast<acc_t>(sdz / count);
    *kq = static_cast<acc_t>(k * is * is * sdzxc / count);
  };

  if (!a.channels_last) {
    // One thread per channel: the reduction and the elementwise pass read the channel while it is in L2.
    at::parallel_for(0, C, channel_grain(M), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double sdz = 0, sdzxc = 0;
        if (a.sums_given) given_sums(c, &sdz, &sdzxc);
        // SiLU's z coefficients: scale = w * invstd rounded as the elementwise pass's `a`, shift = bias.
        const acc_t zscale = kZAct<ACT> ? static_cast<acc_t>(static_cast<double>(w[c]) * static_cast<double>(invstd[c]))
                                        : acc_t(0);
        const acc_t zshift = kZAct<ACT> ? bias[c] : acc_t(0);
        const ZSrc<T> zs{res, &zscale, &zshift};
        if (reduce) {
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c) * S;
            if (direct) {
              DirectBitReader<kDirectW> br(a.mask, off);
              backward_reduce_run<T, ACT>(dy + n * dy_ld + c * S, x + off, S, &br, mean[c], slope, sdz, sdzxc,
                                          zs.shifted(off));
            } else {
              BitReader br(a.mask, off);
              backward_reduce_run<T, ACT>(dy + n * dy_ld + c * S, x + off, S, &br, mean[c], slope, sdz, sdzxc,
                                          zs.shifted(off));
            }
          }
          sum_dz[c] = static_cast<acc_t>(sdz);
          sum_dzxhat[c] = static_cast<acc_t>(sdzxc * static_cast<double>(invstd[c]));
        }
        if constexpr (kElementwise) {
          acc_t ka, kmdz, kq;
          coefficients(c, sdz, sdzxc, &ka, &kmdz, &kq);
          const BwdCoef<acc_t> k{mean + c, &ka, &kmdz, &kq, &zshift};
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c) * S;
            const T* dyp = dy + n * dy_ld + c * S;
            T* dxp = DX ? dx + off : nullptr;
            T* drp = DR ? dr + off : nullptr;
            const T* rp = res != nullptr ? res + off : nullptr;
            if (direct) {
              DirectBitReader<kDirectW> br(a.mask, off);
              backward_elementwise_run<T, ACT, false, TRAIN, DX, DR>(dyp, x + off, dxp, drp, S, &br, k, slope, stream,
                                                                     rp);
            } else {
              BitReader br(a.mask, off);
              backward_elementwise_run<T, ACT, false, TRAIN, DX, DR>(dyp, x + off, dxp, drp, S, &br, k, slope, stream,
                                                                     rp);
            }
          }
        }
      }
      if (stream) stream_fence();
    });
    return;
  }

  // channels_last: per-chunk partial reductions over row blocks (acc_t per block, double per chunk).
  std::vector<double> sdz(C, 0.0), sdzxc(C, 0.0);
  // SiLU's z coefficients per channel (see the NCHW path): scale = w * invstd, shift = bias.
  std::vector<acc_t> zscale(kZAct<ACT> ? C : 0);
  for (int64_t c = 0; c < static_cast<int64_t>(zscale.size()); ++c) {
    zscale[c] = static_cast<acc_t>(static_cast<double>(w[c]) * static_cast<double>(invstd[c]));
  }
  const ZSrc<T> zs{res, zscale.data(), bias};
  if (a.sums_given) {
    for (int64_t c = 0; c < C; ++c) given_sums(c, &sdz[c], &sdzxc[c]);
  }
  if (reduce) {
    const int64_t chunks = num_row_chunks(M, C);
    std::vector<double> pdz(chunks * C, 0.0), pdzx(chunks * C, 0.0);
    const int64_t block = std::min<int64_t>(kReduceBlock, rows_per_block(C, sizeof(T)));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> bdz(C), bdzx(C);
      for (int64_t ch = c0; ch < c1; ++ch) {
        int64_t r0, r1;
        chunk_bounds(M, chunks, ch, r0, r1);
        for (int64_t b0 = r0; b0 < r1; b0 += block) {
          const int64_t b1 = std::min(r1, b0 + block);
          std::fill(bdz.begin(), bdz.end(), acc_t(0));
          std::fill(bdzx.begin(), bdzx.end(), acc_t(0));
          column_reduce<T, kGrad, ACT>(x, dy, dy_ld, a.mask, b0, b1 - b0, C, mean, slope, bdz.data(), bdzx.data(),
                                       zs);
          for (int64_t j = 0; j < C; ++j) {
            pdz[ch * C + j] += static_cast<double>(bdz[j]);
            pdzx[ch * C + j] += static_cast<double>(bdzx[j]);
          }
        }
      }
    });
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t j = 0; j < C; ++j) {
        sdz[j] += pdz[ch * C + j];
        sdzxc[j] += pdzx[ch * C + j];
      }
    }
    for (int64_t j = 0; j < C; ++j) {
      sum_dz[j] = static_cast<acc_t>(sdz[j]);
      sum_dzxhat[j] = static_cast<acc_t>(sdzxc[j] * static_cast<double>(invstd[j]));
    }
  }
  if constexpr (kElementwise) {
    std::vector<acc_t> ka(C), kmdz(C), kq(C);
    for (int64_t c = 0; c < C; ++c) coefficients(c, sdz[c], sdzxc[c], &ka[c], &kmdz[c], &kq[c]);
    const BwdCoef<acc_t> k{mean, ka.data(), kmdz.data(), kq.data(), kZAct<ACT> ? bias : nullptr};
    const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, C));
    if (direct) {
      dispatch_row_vectors<VecIO<T>::W>(C, [&](auto nv) {
        at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
          backward_rows<T, ACT, TRAIN, DX, DR, nv()>(dy, dy_ld, x, dx, dr, a.mask, r0, r1, C, k, slope, stream, res);
        });
      });
      return;
    }
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      BitReader br(a.mask, r0 * C);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t off = row * C;
        backward_elementwise_run<T, ACT, true, TRAIN, DX, DR>(dy + row * dy_ld, x + off, DX ? dx + off : nullptr,
                                                              DR ? dr + off : nullptr, C, &br, k, slope, stream,
                                                              res != nullptr ? res + off : nullptr);
      }
      if (stream) stream_fence();
    });
  }
}

// Turns runtime flags into template arguments. dispatch_act: every activation of bn_act; dispatch_basic_act: the
// ones the dense op supports (identity, relu, leaky_relu; its host code refuses the others before any kernel).
template <typename F>
void dispatch_basic_act(int act, F&& f) {
  switch (act) {
    case kReLU:
      f(std::integral_constant<int, kReLU>{});
      break;
    case kLeakyReLU:
      f(std::integral_constant<int, kLeakyReLU>{});
      break;
    default:
      TORCH_INTERNAL_ASSERT(act == kIdentity, "dense kernels: unsupported activation code ", act);
      f(std::integral_constant<int, kIdentity>{});
      break;
  }
}

template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case kReLU6:
      f(std::integral_constant<int, kReLU6>{});
      break;
    case kSiLU:
      f(std::integral_constant<int, kSiLU>{});
      break;
    default:
      dispatch_basic_act(act, f);
      break;
  }
}

template <typename F>
void dispatch_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace

void bn_act_forward_kernel(const BnActForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "bn_act_forward_cpu", [&] {
    dispatch_act(args.act, [&](auto act) {
      dispatch_bool(args.residual != nullptr, [&](auto res) { forward_typed<scalar_t, act(), res()>(args); });
    });
  });
}

void bn_act_backward_kernel(const BnActBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "bn_act_backward_cpu", [&] {
    dispatch_act(args.act, [&](auto act) {
      dispatch_bool(args.training, [&](auto train) {
        dispatch_bool(args.dx != nullptr, [&](auto dx) {
          dispatch_bool(args.dresidual != nullptr,
                        [&](auto dr) { backward_typed<scalar_t, act(), train(), dx(), dr()>(args); });
        });
      });
    });
  });
}

const char* capability_name() { return C10_STRINGIZE(CPU_CAPABILITY); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedres

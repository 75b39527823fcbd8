// Products of many float32 rows with a narrow side, on the CPU: out (R, M) = rows (R, K) @ w^T + bias,
// w (M, K), where either M or K is an adapter's hidden width (at most 32) and the other its host's
// width; and the weight gradients' a^T b over the rows of a (R, p) and b (R, q), one of p and q narrow.
// BLAS blocks for square-ish products and lost most of this CPU's speed on these: on this project's
// 2-core AMD EPYC (Zen 4) VM, MKL ran IPT's 2304 x 576 -> 24 at about 115 GFLOP/s and EDT's
// 32768 x 180 -> 12 at about 30, oneDNN's 1x1 convolution at 125 and 25. These loops keep a block of
// results in registers and stream the wide side once:
// - narrow output (the head, du: M <= 32, AVX2 + FMA): 12 rows (AVX2: 3-8) x M outputs, each step of K
//   a broadcast value of each row times a row of w^T, over chunks of 128 values of K;
// - narrow input (the tail, the input gradient: K <= 32, AVX-512F): 6 rows x 64 columns, each step of
//   K a broadcast value of each row times 64 values of w^T's row;
// - weight gradients (AVX-512F): 12 narrow columns x 32 wide ones, summed over chunks of 128 rows,
//   each thread's rows into its own partial sums, added in order.
// On AVX2 alone the narrow-input loop (its 8-wide version) measured no faster than oneDNN, so those
// machines keep ATen's products for it and the weight gradients.
// Measured alone (medians of 5 interleaved rounds, this VM, whose speed drifts 10-40% between
// minutes), these loops / MKL / oneDNN's convolution, in ms: IPT 48x48 (2304 rows, 576 <-> 24) the
// head 0.39 / 0.56 / 0.51, the tail 0.39 / 0.55 / 0.52, a weight gradient 0.35 / 0.55 (MKL); 18432
// rows the head 3.1 / 7.9 / 4.2, a weight gradient 5.1 / 6.7; EDT 64x64 x 8 (32768 rows, 180 <->
// 12) the head 1.1 / 3.7 / 4.5, the tail 2.2 / 6.7 / 4.2, a weight gradient 1.0 / 3.2; 4096 rows
// 0.13 / 0.28 / 0.17, 0.13 / 0.21 / 0.19, 0.10 / 0.20. (A first version kept one row's results in
// registers and read all of w for every row: fine for EDT's 12 x 180, from L1, but IPT's 24 x 576 came
// from L2 and ran 1.5-4x slower than oneDNN.) Their float32 results are as close to float64 as MKL's
// or closer (IPT's head 2.9e-7 of the largest value against MKL's 4.4e-7).
// Rows are split over torch's threads. The ISA is read from the CPU at run time (the extension is
// built for generic x86-64), and tests cap it (set_cpu_isa_cap) to run each version here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // the AVX-512 masked loads and stores (used only in functions built for AVX-512F)
#endif

namespace moce_fast {

namespace {

int& isa_cap() {
  static int cap = 2;
  return cap;
}

int detected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const int isa = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
  }();
  return isa;
#else
  return 0;
#endif
}

const char* isa_name(int isa) { return isa == 2 ? "avx512" : isa == 1 ? "avx2" : "none"; }

int isa_level(const std::string& name) {
  if (name == "avx512") return 2;
  if (name == "avx2") return 1;
  if (name == "none") return 0;
  TORCH_CHECK(false, "set_cpu_isa_cap: expected \"avx512\", \"avx2\" or \"none\", got \"", name, "\"");
  return 0;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOCE_NARROW_KERNELS 1
#define MOCE_ALWAYS_INLINE __attribute__((always_inline)) inline

typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef float v16f __attribute__((vector_size(64), aligned(4)));
// (GCC warns that passing these vector types by value changes the ABI where AVX is off: these helpers
// are always inlined into functions built for AVX2 / AVX-512, so no call passes one)
#pragma GCC diagnostic ignored "-Wpsabi"
template <class V>
MOCE_ALWAYS_INLINE V load_vec(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
MOCE_ALWAYS_INLINE void store_vec(float* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Narrow output, RB rows at a time: o[i][0, m) = b + sum_c x[i][c] wp[c][.] for m <= WP = 16 NZ + 8 NY,
// wp (K, WP) and b (WP) zero past m. The RB x WP block of results stays in registers (16-wide vectors
// and 8-wide ones: IPT's 24 as one of each, which fill both of Zen 4's 256-bit FMA pipes as three
// 8-wide ones would, and both of a server Xeon's 512-bit ones), each step of K one broadcast value of
// each row times wp's row, over chunks of kOutChunk values of K whose sums are then added to the total
// (one running sum over IPT's 576 was 3x less accurate than MKL: 1.3e-6 of the largest value against
// 4.4e-7; chunked 2.9e-7). PF: prefetch the next RB rows' line of x every 16 steps (a stream of many
// rows from DRAM: IPT 48x48 x 8's head 3.1-3.3 -> 2.6-2.7 ms).
constexpr int64_t kOutChunk = 128;

template <int NZ, int NY, int RB, bool PF>
MOCE_ALWAYS_INLINE void narrow_out_tile(const float* x, int64_t ldx, int64_t k, const float* wp, const float* b,
                                        float* o, int64_t ldo, int64_t m) {
  constexpr int WP = 16 * NZ + 8 * NY;
  float tot[RB][WP];  // the sums of the finished chunks of K (in L1)
  for (int i = 0; i < RB; ++i) std::memcpy(tot[i], b, sizeof tot[i]);
  for (int64_t c0 = 0; c0 < k; c0 += kOutChunk) {
    const int64_t c1 = std::min(k, c0 + kOutChunk);
    v16f az[RB][NZ > 0 ? NZ : 1];
    v8f ay[RB][NY > 0 ? NY : 1];
    for (int i = 0; i < RB; ++i) {
      for (int l = 0; l < NZ; ++l) az[i][l] = v16f{};
      for (int l = 0; l < NY; ++l) ay[i][l] = v8f{};
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (PF && c % 16 == 0)
        for (int i = 0; i < RB; ++i) __builtin_prefetch(x + (i + RB) * ldx + c);
      v16f bz[NZ > 0 ? NZ : 1];
      v8f by[NY > 0 ? NY : 1];
      for (int l = 0; l < NZ; ++l) bz[l] = load_vec<v16f>(wp + c * WP + 16 * l);
      for (int l = 0; l < NY; ++l) by[l] = load_vec<v8f>(wp + c * WP + 16 * NZ + 8 * l);
      for (int i = 0; i < RB; ++i) {
        const float a = x[i * ldx + c];
        for (int l = 0; l < NZ; ++l) az[i][l] += bz[l] * a;
        for (int l = 0; l < NY; ++l) ay[i][l] += by[l] * a;
      }
    }
    for (int i = 0; i < RB; ++i) {
      for (int l = 0; l < NZ; ++l) store_vec(tot[i] + 16 * l, load_vec<v16f>(tot[i] + 16 * l) + az[i][l]);
      for (int l = 0; l < NY; ++l)
        store_vec(tot[i] + 16 * NZ + 8 * l, load_vec<v8f>(tot[i] + 16 * NZ + 8 * l) + ay[i][l]);
    }
  }
  for (int i = 0; i < RB; ++i) std::memcpy(o + i * ldo, tot[i], m * sizeof(float));
}

template <int NZ, int NY, int RB>
MOCE_ALWAYS_INLINE void narrow_out_rows(const float* x, int64_t ldx, int64_t k, const float* wp, const float* b,
                                        float* o, int64_t ldo, int64_t m, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) narrow_out_tile<NZ, NY, RB, true>(x + r * ldx, ldx, k, wp, b, o + r * ldo, ldo, m);
  for (; r < r1; ++r) narrow_out_tile<NZ, NY, 1, false>(x + r * ldx, ldx, k, wp, b, o + r * ldo, ldo, m);
}

// wp's width (m rounded up to 8) picks the register block: with AVX-512's 32 registers 12 rows (at most
// 24 accumulators, wp's row and the broadcast); with AVX2's 16, 8 / 6 / 4 / 3 rows of 1-4 8-wide vectors.
__attribute__((target("avx512f,avx2,fma"), flatten)) void narrow_out_avx512(const float* x, int64_t ldx, int64_t k,
                                                                            const float* wp, int64_t wpw,
                                                                            const float* b, float* o, int64_t ldo,
                                                                            int64_t m, int64_t r0, int64_t r1) {
  switch (wpw) {
    case 8: narrow_out_rows<0, 1, 12>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    case 16: narrow_out_rows<1, 0, 12>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    case 24: narrow_out_rows<1, 1, 12>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    default: narrow_out_rows<2, 0, 12>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
  }
}

__attribute__((target("avx2,fma"), flatten)) void narrow_out_avx2(const float* x, int64_t ldx, int64_t k,
                                                                  const float* wp, int64_t wpw, const float* b,
                                                                  float* o, int64_t ldo, int64_t m, int64_t r0,
                                                                  int64_t r1) {
  switch (wpw) {
    case 8: narrow_out_rows<0, 1, 8>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    case 16: narrow_out_rows<0, 2, 6>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    case 24: narrow_out_rows<0, 3, 4>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
    default: narrow_out_rows<0, 4, 3>(x, ldx, k, wp, b, o, ldo, m, r0, r1); break;
  }
}

#define MOCE_AVX512 __attribute__((target("avx512f,avx2,fma"), always_inline)) inline

// The lanes [0, n) of a 16-wide vector (all for n >= 16, none for n <= 0).
MOCE_AVX512 __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Narrow input, RB rows x NC 16-wide column vectors from column c0: o[i][c] = bp[c] + sum_j u[i][j] t[j][c];
// t (K, mp) and bp (mp) zero past m (mp: m rounded up to 16), the last vector's lanes past m not stored.
template <int NC, int RB>
MOCE_AVX512 void narrow_in_tile(const float* u, int64_t ldu, int64_t k, const float* t, int64_t mp, const float* bp,
                                int64_t c0, float* o, int64_t ldo, int64_t m) {
  v16f acc[RB][NC];
  for (int i = 0; i < RB; ++i)
    for (int l = 0; l < NC; ++l) acc[i][l] = load_vec<v16f>(bp + c0 + 16 * l);
  for (int64_t j = 0; j < k; ++j) {
    v16f tv[NC];
    for (int l = 0; l < NC; ++l) tv[l] = load_vec<v16f>(t + j * mp + c0 + 16 * l);
    for (int i = 0; i < RB; ++i) {
      const float a = u[i * ldu + j];
      for (int l = 0; l < NC; ++l) acc[i][l] += tv[l] * a;
    }
  }
  const int64_t last = c0 + 16 * (NC - 1);
  const __mmask16 mask = first_lanes(m - last);
  for (int i = 0; i < RB; ++i) {
    float* dst = o + i * ldo;
    for (int l = 0; l < NC - 1; ++l) store_vec(dst + c0 + 16 * l, acc[i][l]);
    _mm512_mask_storeu_ps(dst + last, mask, reinterpret_cast<__m512>(acc[i][NC - 1]));
  }
}

template <int NC>
MOCE_AVX512 void narrow_in_rows(const float* u, int64_t ldu, int64_t k, const float* t, int64_t mp, const float* bp,
                                int64_t c0, float* o, int64_t ldo, int64_t m, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 6 <= r1; r += 6) narrow_in_tile<NC, 6>(u + r * ldu, ldu, k, t, mp, bp, c0, o + r * ldo, ldo, m);
  for (; r < r1; ++r) narrow_in_tile<NC, 1>(u + r * ldu, ldu, k, t, mp, bp, c0, o + r * ldo, ldo, m);
}

// 6 rows x 64 columns at a time (24 accumulators), over blocks of 96 rows (their u stays in L1 across
// the column blocks) and, within one, the column blocks of t (K x 64 values each).
__attribute__((target("avx512f,avx2,fma"), flatten)) void narrow_in_avx512(const float* u, int64_t ldu, int64_t k,
                                                                           const float* t, int64_t mp, const float* bp,
                                                                           float* o, int64_t ldo, int64_t m,
                                                                           int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; rb += 96) {
    const int64_t re = std::min(r1, rb + 96);
    for (int64_t c0 = 0; c0 < mp; c0 += 64) {
      switch (std::min<int64_t>(4, (mp - c0) / 16)) {
        case 1: narrow_in_rows<1>(u, ldu, k, t, mp, bp, c0, o, ldo, m, rb, re); break;
        case 2: narrow_in_rows<2>(u, ldu, k, t, mp, bp, c0, o, ldo, m, rb, re); break;
        case 3: narrow_in_rows<3>(u, ldu, k, t, mp, bp, c0, o, ldo, m, rb, re); break;
        default: narrow_in_rows<4>(u, ldu, k, t, mp, bp, c0, o, ldo, m, rb, re); break;
      }
    }
  }
}

// Rows per chunk of the weight gradient's loop: its wide rows stay in L2 while each column block and group
// of narrow columns passes over them.
constexpr int64_t kTChunk = 128;

// Weight gradient, NB narrow columns from j0 x 32 wide columns from c0, over rows [r0, r1):
// g[j0 + j][c] += sum_r s[r][j0 + j] w[r][c] (c < q), the 256 x 32 block of sums in registers. pf: the
// same columns pf values further on in w, prefetched (the next chunk, read as short strided runs that
// the hardware prefetchers left to DRAM: IPT 48x48 x 8's weight gradient 9-15 -> 3-4 ms).
template <int NB>
MOCE_AVX512 void narrow_t_tile(const float* s, int64_t lds, int64_t j0, const float* w, int64_t ldw, int64_t r0,
                               int64_t r1, int64_t c0, int64_t q, float* g, int64_t ldg, int64_t pf) {
  const __mmask16 m0 = first_lanes(q - c0), m1 = first_lanes(q - c0 - 16);
  const bool full = q - c0 >= 32;
  v16f acc[NB][2];
  for (int j = 0; j < NB; ++j) acc[j][0] = acc[j][1] = v16f{};
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * ldw + c0;
    if (pf) {
      __builtin_prefetch(wr + pf);
      __builtin_prefetch(wr + pf + 16);
    }
    v16f w0, w1;
    if (full) {
      w0 = load_vec<v16f>(wr), w1 = load_vec<v16f>(wr + 16);
    } else {
      w0 = reinterpret_cast<v16f>(_mm512_maskz_loadu_ps(m0, wr));
      w1 = reinterpret_cast<v16f>(_mm512_maskz_loadu_ps(m1, wr + 16));
    }
    const float* sr = s + r * lds + j0;
    for (int j = 0; j < NB; ++j) {
      const float a = sr[j];
      acc[j][0] += w0 * a;
      acc[j][1] += w1 * a;
    }
  }
  for (int j = 0; j < NB; ++j) {
    float* dst = g + (j0 + j) * ldg + c0;
    const v16f g0 = reinterpret_cast<v16f>(_mm512_maskz_loadu_ps(m0, dst)) + acc[j][0];
    const v16f g1 = reinterpret_cast<v16f>(_mm512_maskz_loadu_ps(m1, dst + 16)) + acc[j][1];
    _mm512_mask_storeu_ps(dst, m0, reinterpret_cast<__m512>(g0));
    _mm512_mask_storeu_ps(dst + 16, m1, reinterpret_cast<__m512>(g1));
  }
}

template <int NB>
MOCE_AVX512 void narrow_t_columns(const float* s, int64_t lds, int64_t j0, const float* w, int64_t ldw, int64_t r0,
                                  int64_t r1, int64_t q, float* g, int64_t ldg, int64_t pf) {
  for (int64_t c0 = 0; c0 < q; c0 += 32) narrow_t_tile<NB>(s, lds, j0, w, ldw, r0, r1, c0, q, g, ldg, pf);
}

// g (n, q) += s[r0:r1]^T w[r0:r1] for s (R, n <= 32), w (R, q): per chunk of kTChunk rows, each group of up
// to 12 narrow columns times each 32-wide column block (24 accumulators); the next chunk's rows
// prefetched during the first group's pass.
__attribute__((target("avx512f,avx2,fma"), flatten)) void narrow_t_avx512(const float* s, int64_t lds, int64_t n,
                                                                          const float* w, int64_t ldw, int64_t q,
                                                                          float* g, int64_t r0, int64_t r1) {
  for (int64_t rc = r0; rc < r1; rc += kTChunk) {
    const int64_t re = std::min(r1, rc + kTChunk);
    for (int64_t j0 = 0; j0 < n; j0 += 12) {
      const int64_t pf = j0 == 0 && re + kTChunk <= r1 ? kTChunk * ldw : 0;
      switch (std::min<int64_t>(12, n - j0)) {
#define MOCE_CASE(nb) \
  case nb:            \
    narrow_t_columns<nb>(s, lds, j0, w, ldw, rc, re, q, g, q, pf); \
    break;
        MOCE_CASE(1) MOCE_CASE(2) MOCE_CASE(3) MOCE_CASE(4) MOCE_CASE(5) MOCE_CASE(6)
        MOCE_CASE(7) MOCE_CASE(8) MOCE_CASE(9) MOCE_CASE(10) MOCE_CASE(11) MOCE_CASE(12)
#undef MOCE_CASE
      }
    }
  }
}
#endif

// How many parts [0, r) is split into: at most torch's thread count, each at least `grain` rows.
int64_t row_parts(int64_t r, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), r / std::max<int64_t>(grain, 1)));
}

// Runs fn(p, r0, r1) in parallel on each part p of [0, r) in `parts` parts, each a multiple of `align`
// rows (the register block) but the last.
template <class F>
void for_row_parts(int64_t r, int64_t parts, int64_t align, const F& fn) {
  const int64_t per = ((r + parts - 1) / parts + align - 1) / align * align;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t a = std::min(r, p * per), e = std::min(r, a + per);
      if (a < e) fn(p, a, e);
    }
  });
}

// Rows per task of the parallel loops: about 64 KiB of rows, at least 16.
int64_t rows_grain(int64_t width) { return std::max<int64_t>(16, 16384 / std::max<int64_t>(width, 1)); }

}  // namespace

std::string cpu_isa() { return isa_name(std::min(detected_isa(), isa_cap())); }

std::string set_cpu_isa_cap(const std::string& name) {
  const std::string before = isa_name(isa_cap());
  isa_cap() = isa_level(name);
  return before;
}

const char* narrow_kind(at::ScalarType dtype, int64_t k, int64_t m) {
  if (dtype != at::kFloat || k < 1 || m < 1) return nullptr;
  const int isa = std::min(detected_isa(), isa_cap());
  if (isa >= 1 && m <= kNarrowWidth && k > kNarrowWidth) return "narrow_out";
  if (isa >= 2 && k <= kNarrowWidth && m > kNarrowWidth) return "narrow_in";
  return nullptr;
}

const char* narrow_product_kind(const at::Tensor& rows, const at::Tensor& w) {
  if (rows.dim() != 2 || !unit_rows(rows) || w.dim() != 2 || w.size(1) != rows.size(1)) return nullptr;
  return narrow_kind(rows.scalar_type(), rows.size(1), w.size(0));
}

at::Tensor narrow_rows_times(const at::Tensor& rows, const at::Tensor& w, const at::Tensor& bias, at::Tensor out) {
  const char* kind = narrow_product_kind(rows, w);
  TORCH_CHECK(kind != nullptr, "narrow_rows_times: no narrow CPU product for rows ", rows.sizes(), " ",
              rows.scalar_type(), " and w ", w.sizes(), " on this CPU (ISA ", cpu_isa(), ")");
  const int64_t r = rows.size(0), k = rows.size(1), m = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kFloat && (!bias.defined() || (bias.numel() == m && bias.scalar_type() == at::kFloat)),
              "narrow_rows_times: expected float32 w (", m, ", ", k, ") and bias (", m, ")");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == r && out.size(1) == m &&
                  unit_rows(out),
              "narrow_rows_times: expected a float32 out (", r, ", ", m, ") of contiguous rows, got ", out.sizes(),
              " with strides ", out.strides());
  const float* wd = w.data_ptr<float>();  // read through its strides (the backward passes w^T views)
  const int64_t ws0 = w.stride(0), ws1 = w.stride(1);
  const float* x = rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldx = rows.stride(0), ldo = out.stride(0);
#ifdef MOCE_NARROW_KERNELS
  if (std::strcmp(kind, "narrow_out") == 0) {  // w^T packed as (K, m rounded up to 8), zero past m
    const int64_t wpw = (m + 7) / 8 * 8;
    std::vector<float> wp(k * wpw, 0.f), b(wpw, 0.f);
    for (int64_t c = 0; c < k; ++c)
      for (int64_t j = 0; j < m; ++j) wp[c * wpw + j] = wd[j * ws0 + c * ws1];
    if (bias.defined()) std::memcpy(b.data(), bias.contiguous().data_ptr<float>(), m * sizeof(float));
    const bool avx512 = std::min(detected_isa(), isa_cap()) >= 2;
    for_row_parts(r, row_parts(r, rows_grain(k)), 12, [&](int64_t, int64_t r0, int64_t r1) {
      if (avx512)
        narrow_out_avx512(x, ldx, k, wp.data(), wpw, b.data(), o, ldo, m, r0, r1);
      else
        narrow_out_avx2(x, ldx, k, wp.data(), wpw, b.data(), o, ldo, m, r0, r1);
    });
  } else {  // w^T as (K, m rounded up to 16), zero past m
    const int64_t mp = (m + 15) / 16 * 16;
    std::vector<float> t(k * mp, 0.f), bp(mp, 0.f);
    for (int64_t c = 0; c < m; ++c)
      for (int64_t j = 0; j < k; ++j) t[j * mp + c] = wd[c * ws0 + j * ws1];
    if (bias.defined()) std::memcpy(bp.data(), bias.contiguous().data_ptr<float>(), m * sizeof(float));
    for_row_parts(r, row_parts(r, rows_grain(m)), 6, [&](int64_t, int64_t r0, int64_t r1) {
      narrow_in_avx512(x, ldx, k, t.data(), mp, bp.data(), o, ldo, m, r0, r1);
    });
  }
#endif
  return out;
}

bool narrow_t_takes(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != 2 || b.dim() != 2 || a.size(0) != b.size(0) || !unit_rows(a) || !unit_rows(b) ||
      a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || std::min(detected_isa(), isa_cap()) < 2)
    return false;
  const int64_t p = a.size(1), q = b.size(1);
  return std::min(p, q) >= 1 && std::min(p, q) <= kNarrowWidth && std::max(p, q) > kNarrowWidth;
}

at::Tensor narrow_t_product(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(narrow_t_takes(a, b), "narrow_t_product: no narrow CPU product for a ", a.sizes(), " ",
              a.scalar_type(), " and b ", b.sizes(), " ", b.scalar_type(), " on this CPU (ISA ", cpu_isa(), ")");
  const bool a_narrow = a.size(1) <= kNarrowWidth;
  const auto& s = a_narrow ? a : b;  // the narrow side
  const auto& w = a_narrow ? b : a;
  const int64_t r = a.size(0), n = s.size(1), q = w.size(1);
  // one (n, q) partial sum per part of the rows, added in part order into the result (or its transpose)
  const int64_t parts = row_parts(r, kTChunk);
  std::vector<float> acc(parts * n * q, 0.f);
  auto out = at::empty(a_narrow ? std::vector<int64_t>{n, q} : std::vector<int64_t>{q, n}, w.options());
  float* o = out.data_ptr<float>();
#ifdef MOCE_NARROW_KERNELS
  const float *sp = s.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int64_t lds = s.stride(0), ldw = w.stride(0);
  for_row_parts(r, parts, 1, [&](int64_t p, int64_t r0, int64_t r1) {
    narrow_t_avx512(sp, lds, n, wp, ldw, q, acc.data() + p * n * q, r0, r1);
  });
#endif
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < q; ++c) {
      float v = acc[j * q + c];
      for (int64_t p = 1; p < parts; ++p) v += acc[(p * n + j) * q + c];
      o[a_narrow ? j * q + c : c * n + j] = v;
    }
  return out;
}

}  // namespace moce_fast

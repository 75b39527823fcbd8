// Products of many float32 rows with a narrow side, on the CPU: out (R, M) = rows (R, K) @ w^T + bias,
// w (M, K), where either M or K is an adapter's hidden width (at most 32) and the other its host's
// width. BLAS blocks for square-ish products: MKL ran EDT's head (32768 x 180 -> 12) at about 31
// GFLOP/s on this project's 2-core AMD EPYC (Zen 4) VM, oneDNN's 1x1 convolution at about 27, and
// EDT's tail (12 -> 180) at 16 (MKL) and 45 (oneDNN), against a peak of about 166. These two loops
// keep one row's accumulators in registers instead:
// - narrow output (the head, du: M <= 32): each row's M dot products of length K as 8-wide partial
//   sums over K, up to 12 outputs at a time, summed across lanes at the row's end (AVX2 + FMA);
// - narrow input (the tail, the input gradient: K <= 32): each row's M outputs as up to 12 16-wide
//   vectors, each the sum of K broadcast-times-row-of-w^T products (AVX-512F; on AVX2 alone the
//   8-wide version measured no faster than oneDNN, so those machines keep ATen's products).
// Measured alone (medians, this VM, whose speed drifts 10-40% between minutes): EDT 64x64 x 8, the
// head 1.4-2.7 ms against MKL's 3.6-4.8 and oneDNN's 2.7-5.7, the tail 1.6-2.7 against oneDNN's
// 1.9-2.9; at 4096 rows 0.13-0.21 / 0.25-0.29 / 0.15-0.18 and 0.14-0.24 / 0.16 (MKL) / 0.14-0.18.
// Only where w has at most 4096 values (kNarrowWeights: it is read once per row, so it must stay in
// L1): IPT's 24 x 576 came from L2 and ran 1.5-4x slower than oneDNN (2304 and 18432 rows), and
// two rows per pass over w spilled (AVX2's 16 registers) and ran slower still.
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
typedef float v4f __attribute__((vector_size(16), aligned(4)));

// (halves by memcpy, not __builtin_shufflevector: that needs GCC 12, and the extension also builds with
// whatever compiler the GPU image has)
MOCE_ALWAYS_INLINE float lane_sum(v8f a) {
  v4f lo, hi;
  std::memcpy(&lo, &a, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof lo, sizeof hi);
  const v4f h = lo + hi;
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// out[j] = b[j] + x . wp[j] for JB outputs; wp rows are KP >= K long, zero past K.
template <int JB>
MOCE_ALWAYS_INLINE void narrow_out_row(const float* x, int64_t k, const float* wp, int64_t kp, const float* b,
                                       float* out) {
  v8f acc[JB];
  for (int j = 0; j < JB; ++j) acc[j] = v8f{};
  const int64_t full = k / 8 * 8;
  for (int64_t c = 0; c < full; c += 8) {
    v8f xv;
    std::memcpy(&xv, x + c, sizeof xv);
    for (int j = 0; j < JB; ++j) {
      v8f wv;
      std::memcpy(&wv, wp + j * kp + c, sizeof wv);
      acc[j] += xv * wv;
    }
  }
  if (full < k) {  // the last K % 8 values, zero-padded
    float pad[8] = {};
    std::memcpy(pad, x + full, (k - full) * sizeof(float));
    v8f xv;
    std::memcpy(&xv, pad, sizeof xv);
    for (int j = 0; j < JB; ++j) {
      v8f wv;
      std::memcpy(&wv, wp + j * kp + full, sizeof wv);
      acc[j] += xv * wv;
    }
  }
  for (int j = 0; j < JB; ++j) out[j] = b[j] + lane_sum(acc[j]);
}

template <int JB>
MOCE_ALWAYS_INLINE void narrow_out_rows(const float* x, int64_t ldx, int64_t k, const float* wp, int64_t kp,
                                        const float* b, float* out, int64_t ldo, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) narrow_out_row<JB>(x + r * ldx, k, wp, kp, b, out + r * ldo);
}

__attribute__((target("avx2,fma"), flatten)) void narrow_out_avx2(const float* x, int64_t ldx, int64_t k,
                                                                  const float* wp, int64_t kp, const float* b,
                                                                  float* out, int64_t ldo, int64_t m, int64_t r0,
                                                                  int64_t r1) {
  // the outputs in blocks of up to 12 (12 accumulators, the row's vector and w's: 14 of 16 ymm registers)
  for (int64_t j0 = 0; j0 < m; j0 += 12) {
    const float* w = wp + j0 * kp;
    float* o = out + j0;
    switch (std::min<int64_t>(12, m - j0)) {
#define MOCE_CASE(n) \
  case n:            \
    narrow_out_rows<n>(x, ldx, k, w, kp, b + j0, o, ldo, r0, r1); \
    break;
      MOCE_CASE(1) MOCE_CASE(2) MOCE_CASE(3) MOCE_CASE(4) MOCE_CASE(5) MOCE_CASE(6)
      MOCE_CASE(7) MOCE_CASE(8) MOCE_CASE(9) MOCE_CASE(10) MOCE_CASE(11) MOCE_CASE(12)
#undef MOCE_CASE
    }
  }
}

// out[i][c0 + 16 l ...] for RB rows and NC 16-wide column blocks: bias + sum_j u[i][j] t[j][...]; t
// rows are MP >= M long, zero past M; the last block's columns past M are not stored.
template <int NC, int RB>
MOCE_ALWAYS_INLINE void narrow_in_row(const float* u, int64_t k, const float* t, int64_t mp, const float* bp,
                                      int64_t c0, float* out, int64_t m) {
  v16f acc[RB][NC];
  for (int i = 0; i < RB; ++i)
    for (int l = 0; l < NC; ++l) std::memcpy(&acc[i][l], bp + c0 + 16 * l, sizeof(v16f));
  for (int64_t j = 0; j < k; ++j) {
    v16f uj[RB];
    for (int i = 0; i < RB; ++i) uj[i] = v16f{} + u[i * k + j];
    for (int l = 0; l < NC; ++l) {
      v16f tv;
      std::memcpy(&tv, t + j * mp + c0 + 16 * l, sizeof tv);
      for (int i = 0; i < RB; ++i) acc[i][l] += uj[i] * tv;
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int l = 0; l < NC; ++l) {
      const int64_t c = c0 + 16 * l;
      if (c + 16 <= m)
        std::memcpy(out + i * m + c, &acc[i][l], sizeof(v16f));
      else if (c < m)
        std::memcpy(out + i * m + c, &acc[i][l], (m - c) * sizeof(float));
    }
}

template <int NC>
MOCE_ALWAYS_INLINE void narrow_in_rows(const float* u, int64_t ldu, int64_t k, const float* t, int64_t mp,
                                       const float* bp, int64_t c0, float* out, int64_t ldo, int64_t m, int64_t r0,
                                       int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) narrow_in_row<NC, 1>(u + r * ldu, k, t, mp, bp, c0, out + r * ldo, m);
}

__attribute__((target("avx512f,avx2,fma"), flatten)) void narrow_in_avx512(const float* u, int64_t ldu, int64_t k,
                                                                           const float* t, int64_t mp, const float* bp,
                                                                           float* out, int64_t ldo, int64_t m,
                                                                           int64_t r0, int64_t r1) {
  // the columns in blocks of up to 12 vectors (12 accumulators, u[j] and t's: 14 of 32 zmm registers;
  // two rows at a time, sharing t's loads, measured slower)
  for (int64_t c0 = 0; c0 < m; c0 += 12 * 16) {
    switch (std::min<int64_t>(12, (m - c0 + 15) / 16)) {
#define MOCE_CASE(n) \
  case n:            \
    narrow_in_rows<n>(u, ldu, k, t, mp, bp, c0, out, ldo, m, r0, r1); \
    break;
      MOCE_CASE(1) MOCE_CASE(2) MOCE_CASE(3) MOCE_CASE(4) MOCE_CASE(5) MOCE_CASE(6)
      MOCE_CASE(7) MOCE_CASE(8) MOCE_CASE(9) MOCE_CASE(10) MOCE_CASE(11) MOCE_CASE(12)
#undef MOCE_CASE
    }
  }
}
#endif

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
  if (dtype != at::kFloat || k < 1 || m < 1 || m * k > kNarrowWeights) return nullptr;
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
  const auto wc = w.contiguous();
  const float* wd = wc.data_ptr<float>();
  const float* x = rows.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t ldx = rows.stride(0), ldo = out.stride(0);
#ifdef MOCE_NARROW_KERNELS
  if (std::strcmp(kind, "narrow_out") == 0) {
    const int64_t kp = (k + 7) / 8 * 8;
    std::vector<float> wp(m * kp, 0.f), b(m, 0.f);
    for (int64_t j = 0; j < m; ++j) std::memcpy(wp.data() + j * kp, wd + j * k, k * sizeof(float));
    if (bias.defined()) std::memcpy(b.data(), bias.contiguous().data_ptr<float>(), m * sizeof(float));
    at::parallel_for(0, r, rows_grain(k), [&](int64_t r0, int64_t r1) {
      narrow_out_avx2(x, ldx, k, wp.data(), kp, b.data(), o, ldo, m, r0, r1);
    });
  } else {
    const int64_t mp = (m + 15) / 16 * 16;
    std::vector<float> t(k * mp, 0.f), bp(mp, 0.f);
    for (int64_t c = 0; c < m; ++c)
      for (int64_t j = 0; j < k; ++j) t[j * mp + c] = wd[c * k + j];
    if (bias.defined()) std::memcpy(bp.data(), bias.contiguous().data_ptr<float>(), m * sizeof(float));
    at::parallel_for(0, r, rows_grain(m), [&](int64_t r0, int64_t r1) {
      narrow_in_avx512(x, ldx, k, t.data(), mp, bp.data(), o, ldo, m, r0, r1);
    });
  }
#endif
  return out;
}

}  // namespace moce_fast

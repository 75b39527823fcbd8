// The whole AdaptIR adapter of one task on a small map, on the CPU: forward (training or eval) and
// the training backward, as one call each (the "cpu" backend; see moce_fast/ops/adapter.py).
//
// At batch 1 on a small map (IPT 16x16: 256 pixels x 24 hidden channels) the adapter's h-space work
// is a few thousand values per stage, and a step made of ATen ops is bound by the number of ops it
// dispatches (5-15 us each from Python). Here the GEMMs on the C-wide rows (head, tail, their
// gradients) and the dense DFT products stay ATen matrix products, the transcendental passes on the
// spectrum stay ATen's vectorised kernels, and everything else (BatchNorm on the batch statistics,
// the depthwise 3x3 and its adjoint, attention pooling, the two channel MLPs, the gates and all
// their gradients) is plain loops over the (rows, h) map, reductions accumulated in double.
//
// The h-wide maps' rows are pixel-major, image by image within a pixel ((P, N, h), as "lnc" stores
// N images); "nhwc" with N images stores them one after the other, so its head output is reordered
// to pixel-major rows and the tail's input back (the C-wide rows stay in x's order). The loops over
// the maps run in parallel (at::parallel_for, over fixed chunks; see for_chunks).
//
// The global branch is |irfft2(m e^{ip})| with m = amp_w |S| + amp_b, p = pha_w angle(S) + pha_b,
// S = rfft2(y) (orthonormal), the self-conjugate bins' imaginary parts exactly +0. On small maps
// (given the tables of moce_fast.ops.adapter.dft_tables, fwd and inv (2 nb - s, P): nb bins of
// which the last s are self-conjugate, their imaginary parts not computed) as two dense products;
// else (empty tables) by ATen's rfft2/irfft2 over the map's two axes of the (H, W, N h) rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/StringUtil.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "adapter_plan.h"
#include "common.h"

namespace moce_fast {

namespace {
std::atomic<int64_t> g_chunk_values{8192};
}  // namespace

int64_t cpu_chunk_values() { return g_chunk_values.load(std::memory_order_relaxed); }

int64_t set_cpu_chunk_values(int64_t values) {
  TORCH_CHECK(values >= 1, "values: expected at least 1 value per chunk, got ", values);
  return g_chunk_values.exchange(values);
}

namespace {

// The parameters, in the order the ops take them (moce_fast.ops.adapter._param_list).
enum Param : int {
  HEAD_W, HEAD_B, BN_W, BN_B, CONV_A, CONV_B, CONV_BIAS, AMP_W, AMP_B, PHA_W, PHA_B, COMP_W, COMP_B,
  P1W, P1B, P2W, P2B, C1W, C1B, C2W, C2B, SI_W, SI_B, TAIL_W, NUM_PARAMS
};
const char* const kParamNames[NUM_PARAMS] = {
    "head_w", "head_b", "bn_weight", "bn_bias", "conv_a", "conv_b", "conv_bias", "amp_w", "amp_b", "pha_w", "pha_b",
    "comp_w", "comp_b", "proj1_w", "proj1_b", "proj2_w", "proj2_b", "ci1_w", "ci1_b", "ci2_w", "ci2_b", "si_w", "si_b",
    "tail_w"};

enum Layout : int64_t { NCHW = 0, LNC = 1, NHWC = 2 };

// A layout code the kernels take (the error names what came).
inline void check_layout_code(int64_t layout) {
  TORCH_CHECK(layout >= NCHW && layout <= NHWC, "layout: expected 0 (nchw), 1 (lnc) or 2 (nhwc), got ", layout);
}

struct Dims {
  int64_t hh, ww, npix, n, rows, c, hid, r, h2, q;
  bool dense;          // the DFT as the dense tables' products, else rfft2 / irfft2
  int64_t nb, s, k;    // bins (H (W/2 + 1)); dense: self-conjugate ones (the last s), table rows 2 nb - s
  int64_t wb, edge;    // FFT: W/2 + 1 columns, of which 1 .. edge stand for two bins of the full spectrum
  bool image_major;    // x's rows image by image ("nhwc", N > 1): the head's and tail's rows (N, P, .)
};

// x on the CPU, with the dimensions of `layout` (a valid layout code).
void check_x_layout(const at::Tensor& x, int64_t layout) {
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got one on ", x.device());
  check_layout_code(layout);
  TORCH_CHECK(x.dim() == (layout == LNC ? 3 : 4), "x: expected a ", (layout == LNC ? 3 : 4), "-D tensor, got ",
              x.dim(), "-D");
}

// Checks the sizes and the other arguments of n images of c channels in `layout` (x's dtype st;
// x itself, where given, holds them) and returns the sizes (the error names the argument, what was
// expected and what came).
Dims check_sizes(at::ScalarType st, int64_t layout, int64_t c, int64_t hh, int64_t ww, int64_t n,
                 at::TensorList params, const at::Tensor& fwd, const at::Tensor& inv, int64_t nb, int64_t s,
                 const at::Tensor* x = nullptr) {
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "x: expected float32 or float64, got ", st);
  TORCH_CHECK(hh > 0 && ww > 0 && n > 0, "hh, ww, n: expected positive sizes, got ", hh, ", ", ww, ", ", n);
  TORCH_CHECK(n == 1 || layout != NCHW, "n: more than one image only in the lnc and nhwc layouts, got n = ", n);
  Dims d{};
  d.hh = hh, d.ww = ww, d.npix = hh * ww, d.n = n, d.rows = hh * ww * n;
  d.image_major = layout == NHWC && n > 1;
  d.c = c;
  TORCH_CHECK(!x || x->numel() == d.rows * c, "x: expected ", d.rows, " pixel rows of ", c, " channels, got shape ",
              x->sizes());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == NUM_PARAMS, "params: expected ", int(NUM_PARAMS),
              " tensors, got ", params.size());
  for (int i = 0; i < NUM_PARAMS; ++i) {
    TORCH_CHECK(params[i].scalar_type() == st && params[i].device().is_cpu() && params[i].is_contiguous(),
                kParamNames[i], ": expected a contiguous ", st, " tensor on the CPU, got ",
                params[i].scalar_type(), " on ", params[i].device(), params[i].is_contiguous() ? "" : " (strided)");
  }
  d.hid = params[HEAD_B].numel();
  TORCH_CHECK(d.hid > 0, "head_b: expected at least one hidden channel");
  d.r = params[CONV_A].numel() / d.hid;
  d.h2 = params[P1B].numel();
  d.q = params[C1B].numel();
  const int64_t expect[NUM_PARAMS] = {d.hid * d.c, d.hid, d.hid, d.hid, d.hid * d.r, d.r * 9, d.hid, d.hid, d.hid,
                                      d.hid, d.hid, d.hid, 1, d.h2 * d.hid, d.h2, d.hid * d.h2, d.hid,
                                      d.q * d.hid, d.q, d.hid * d.q, d.hid, d.hid, 1, d.c * d.hid};
  for (int i = 0; i < NUM_PARAMS; ++i)
    TORCH_CHECK(params[i].numel() == expect[i], kParamNames[i], ": expected ", expect[i],
                " elements (hidden width ", d.hid, ", ", d.c, " channels), got shape ", params[i].sizes());
  d.wb = ww / 2 + 1, d.edge = ww - d.wb;
  d.dense = fwd.defined() && fwd.numel() > 0;
  d.nb = hh * d.wb;
  TORCH_CHECK(nb == d.nb, "nb: expected ", d.nb, " bins of a ", hh, "x", ww, " map, got ", nb);
  d.s = s, d.k = 2 * nb - s;
  if (!d.dense) {
    TORCH_CHECK(!inv.defined() || inv.numel() == 0, "fwd, inv: expected both tables, or both empty (FFT)");
    return d;
  }
  TORCH_CHECK(s >= 1 && s <= 4 && s <= nb, "s: expected 1..4 self-conjugate bins, got ", s);
  for (const auto* t : {&fwd, &inv})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == d.k && t->size(1) == d.npix && t->scalar_type() == st &&
                    t->is_contiguous() && t->device().is_cpu(),
                (t == &fwd ? "fwd" : "inv"), ": expected a contiguous (", d.k, ", ", d.npix, ") ", st,
                " CPU table, got ", t->sizes(), " ", t->scalar_type());
  return d;
}

// check_sizes for x, n images in `layout`.
Dims check_args(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, int64_t n, at::TensorList params,
                const at::Tensor& fwd, const at::Tensor& inv, int64_t nb, int64_t s) {
  check_x_layout(x, layout);
  return check_sizes(x.scalar_type(), layout, layout == NCHW ? x.size(1) : x.size(-1), hh, ww, n, params, fwd, inv,
                     nb, s, &x);
}

// The rows (P N, C) of x in its layout, a view where the strides allow one.
at::Tensor rows_of(const at::Tensor& x, int64_t layout, const Dims& d) {
  if (layout == NCHW) return x.reshape({d.c, d.npix}).t();
  return x.reshape({d.rows, d.c});
}

// fn(b, e) over [begin, end) in grains on torch's threads, for loops that call ATen ops (each
// product then runs on its own thread's MKL): below autograd on every thread, since that guard is
// thread-local and the entry points' own is only on the calling thread.
template <typename F>
void parallel_ops(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    fn(b, e);
  });
}

// An uninitialised buffer from the CPU buffer cache (csrc/cpu_cache.cpp; poisoned with NaN in the
// tests' debug mode): the kernels' outputs and the intermediates kept for the backward are the same
// sizes step after step, so their pages stay mapped.
at::Tensor new_buffer(at::IntArrayRef shape, const at::Tensor& like) {
  auto t = cached_empty(shape, like.options());
  maybe_poison(t);
  return t;
}

// The products on the C-wide rows (R, C) with the h-wide maps, chosen as the torch backend's paths
// chose them (moce_fast.ops.adapter._as_conv and _rows_t_product, measured there), and below their
// 4096 rows as measured for this kernel: rows @ w^T with a wide side as oneDNN's 1x1 convolution
// over the rows viewed as a channels-last (1, K, R, 1) map, from 4096 float32 rows where w (M, K) has
// M >= 128 or K >= 512, from 2048 where M or K >= 512 (IPT's 576 channels); and a weight gradient
// a^T b of two narrow maps (both under 384 columns) from 4096 rows as 8 row-block products in one
// bmm and their sum. Measured here (2-core AMD EPYC, median of 15): EDT 64x64 x 8 (32768 rows,
// 180 <-> 12) the tail 7.9 -> 3.0 ms, the input gradient 8.9 -> 2.9, the weight gradients 4.3 -> 3.2
// and 4.1 -> 3.2; IPT 48x48 x 8 (18432 rows, 576 <-> 24) the head and du 8.3-8.7 -> 4.6. Whole
// calls, MKL against the convolution, alternating blocks of 10 in one process: IPT 48x48 batch 1
// (2304 rows) training 6.5-7.2 -> 5.8 ms, eval 2.0-2.2 -> 1.9; IPT 16x16 x 8 (2048 rows) training
// 7.0 -> 6.5, eval 1.78 -> 1.70; but IPT 16x16 x 4 (1024 rows) training 3.3 -> 4.5 and EDT's 180
// channels at 2048-2116 rows 2.6 -> 2.9 (training), 0.94 -> 1.01 (eval): MKL there.
bool rows_as_conv(const at::Tensor& rows, int64_t m) {
  const int64_t r = rows.size(0), k = rows.size(1);
  if (rows.scalar_type() != at::kFloat || !rows.is_contiguous()) return false;
  return r >= 4096 ? (m >= 128 || k >= 512) : r >= 2048 && (m >= 512 || k >= 512);
}

// rows (R, K) @ w^T (w (M, K)) + bias (M, or undefined) as a new (R, M) tensor: where a narrow product
// applies (csrc/cpu_narrow.cpp: a side of at most 32, w of at most 4096 values, the CPU's ISA), its
// own loop into a buffer from the cache (EDT's head and tail); else, where rows_as_conv,
// oneDNN's convolution's output (channels-last, so (R, M) rows), else a buffer from the cache.
at::Tensor rows_times(const at::Tensor& rows, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t r = rows.size(0), k = rows.size(1), m = w.size(0);
  if (narrow_product_kind(rows, w) != nullptr) return narrow_rows_times(rows, w, bias, new_buffer({r, m}, rows));
  if (rows_as_conv(rows, m)) {
    auto y = at::conv2d(rows.view({1, r, 1, k}).permute({0, 3, 1, 2}), w.reshape({m, k, 1, 1}), bias);
    return y.permute({0, 2, 3, 1}).reshape({r, m});
  }
  auto out = new_buffer({r, m}, rows);
  // K < M (the tail, the input gradient) on fewer rows: MKL ran IPT 16x16's 256 x 24 -> 576 on one
  // thread (0.08-0.095 ms on 2 threads, 0.08 on 1), so each thread takes its block of rows (a product
  // inside the parallel region runs on its own thread). Measured, alternating blocks of 10 calls in
  // one process: IPT 16x16 batch 1 eval 0.415 -> 0.383 ms and 0.394 -> 0.359, training 1.12 -> 1.07;
  // 1024 rows (IPT 16x16 x 4, EDT 32x32) within noise.
  const int64_t nt = at::get_num_threads();
  if (k < m && nt > 1 && r >= 64 * nt) {
    parallel_ops(0, r, (r + nt - 1) / nt, [&](int64_t b, int64_t e) {
      auto o = out.narrow(0, b, e - b);
      const auto a = rows.narrow(0, b, e - b);
      if (bias.defined()) at::addmm_out(o, bias, a, w.t()); else at::mm_out(o, a, w.t());
    });
    return out;
  }
  return bias.defined() ? at::addmm_out(out, bias, rows, w.t()) : at::mm_out(out, rows, w.t());
}

// o (R, M) = rows (R, K) @ w^T + bias (M, or undefined), w (M, K), into o in place: one task's image
// blocks of a batch of several tasks (ImageBlocks), where rows and o are strided views. The narrow
// product where it applies and o's rows are contiguous values ("lnc" and "nhwc"), else MKL.
void rows_times_into(at::Tensor o, const at::Tensor& rows, const at::Tensor& w, const at::Tensor& bias) {
  if (narrow_product_kind(rows, w) != nullptr && unit_rows(o)) {
    narrow_rows_times(rows, w, bias, o);
  } else if (bias.defined()) {
    at::addmm_out(o, bias, rows, w.t());
  } else {
    at::mm_out(o, rows, w.t());
  }
}

// The backward of rows_times's convolution (where rows_as_conv(rows, M): rows (R, K) @ w^T + bias, w
// (M, K)) for dy (R, M), contiguous: {drows (R, K), or undefined unless need_drows; dw (M, K)} from one
// oneDNN convolution_backward, which reads dy and rows in its own blocked order for both products (the
// bias's gradient comes from the kernel's own loops). Where the narrow products do not apply (see
// backward_impl). Measured against drows as rows_times(dy, w^T) and dw as
// the MKL product (2-core AMD EPYC, medians of 7 blocks, three rounds): IPT's 576 <-> 24 at 2304 rows
// the tail's (du, dtw) 0.99 -> 0.82-0.83 ms, the head's (dx, dwh, dbh) 0.97-1.03 -> 0.87-0.95; at 2048
// rows 0.89-1.03 -> 0.74-1.01 and 0.85-1.10 -> 0.78-0.86; EDT's tail (12 -> 180) at 4096 rows
// 0.44-0.48 -> 0.38 (products alone, hot). Whole training steps, alternating blocks of 10 in one
// process, medians (minima) of 25: IPT 48x48 batch 1 6.49-7.02 (5.89-5.91) -> 6.62-6.77 (5.65-5.80)
// ms, IPT 16x16 x 8 8.87 (7.39) -> 8.79 (6.26), IPT 48x48 x 8 54.6 (52.2) -> 54.1 (50.8): a gain
// within this VM's noise. Not where the forward's product ran on MKL: at 256-1024 rows it lost (IPT
// 16x16's head 0.15-0.19 -> 0.21-0.30 ms), and EDT's head at 4096 rows was even.
std::vector<at::Tensor> rows_times_backward(const at::Tensor& dy, const at::Tensor& rows, const at::Tensor& w,
                                            bool need_drows) {
  const int64_t r = rows.size(0), k = rows.size(1), m = w.size(0);
  auto as_map = [r](const at::Tensor& t) { return t.view({1, r, 1, t.size(1)}).permute({0, 3, 1, 2}); };
  auto g = at::convolution_backward(as_map(dy), as_map(rows), w.reshape({m, k, 1, 1}), at::OptionalIntArrayRef(),
                                    {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1, {need_drows, true, false});
  at::Tensor drows;
  if (need_drows) drows = std::get<0>(g).permute({0, 2, 3, 1}).reshape({r, k});
  return {drows, std::get<1>(g).reshape({m, k})};
}

// a^T b (m, k) over the R rows of a (R, m) and b (R, k), both narrow (see rows_as_conv).
at::Tensor narrow_rows_t_product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t r = a.size(0), c = 8;
  if (a.scalar_type() == at::kFloat && r >= 4096 && r % c == 0 && a.size(1) < 384 && b.size(1) < 384)
    return at::bmm(a.reshape({c, r / c, a.size(1)}).transpose(1, 2), b.reshape({c, r / c, b.size(1)})).sum(0);
  return at::mm(a.t(), b);
}

// acc (p, q) += a^T b over the rows of a (R, p) and b (R, q): the narrow loop where it takes them (one
// image's rows of a batch of several tasks: rows of contiguous values any distance apart), else MKL.
void add_t_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (narrow_t_takes(a, b))
    acc.add_(narrow_t_product(a, b));
  else
    acc.addmm_(a.t(), b);
}

// An h-wide map's rows, given as `outer` groups of `inner` rows, reordered as `inner` groups of
// `outer`: "nhwc" stores N images one after the other, so its head output goes from image-major rows
// to the kernel's pixel-major ones (swap_rows(t, N, P)), and the tail's input and dy back
// (swap_rows(t, P, N)); the head's and tail's C-wide rows stay in x's order.
at::Tensor swap_rows(const at::Tensor& t, int64_t outer, int64_t inner) {
  const int64_t h = t.size(1);
  auto out = new_buffer({inner, outer, h}, t);
  out.copy_(t.view({outer, inner, h}).transpose(0, 1));
  return out.view({outer * inner, h});
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// b + sum_c v[c] w[c] over h values (a per-row projection to one number), accumulated in double.
template <typename T>
inline T affine_dot(const T* v, const T* w, T b, int64_t h) {
  double acc = b;
  for (int64_t c = 0; c < h; ++c) acc += double(v[c]) * w[c];
  return T(acc);
}

template <typename T>
inline T gelu(T a) {
  return T(0.5) * a * (T(1) + std::erf(a * T(M_SQRT1_2)));
}

template <typename T>
inline T gelu_grad(T a) {
  const T cdf = T(0.5) * (T(1) + std::erf(a * T(M_SQRT1_2)));
  const T pdf = std::exp(T(-0.5) * a * a) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
  return cdf + a * pdf;
}

// A per-channel vector repeated for the N images of a row of N h values (no modulo per value).
template <typename T>
std::vector<T> per_value(const T* v, int64_t hid, int64_t n) {
  std::vector<T> out(n * hid);
  for (int64_t k = 0; k < n * hid; ++k) out[k] = v[k % hid];
  return out;
}

// The loops over the (rows, h) map run in parallel over fixed chunks of about cpu_chunk_values()
// values (8192; one chunk, run inline, below that: IPT 16x16 at batch 1 is 256 rows x 24). The chunks
// do not depend on the number of threads, and a reduction keeps one partial sum per chunk (in double),
// added in chunk order afterwards: the result is the same on any number of threads.

// How many of [0, n) items of `per_item` values each make one chunk.
inline int64_t chunk_items(int64_t per_item) {
  return std::max<int64_t>(1, cpu_chunk_values() / std::max<int64_t>(per_item, 1));
}

inline int64_t num_chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// fn(k, begin, end) for chunk k = [begin, end) of [0, n) in chunks of `chunk` items, the chunks in
// parallel when there are several.
template <typename F>
void for_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t nc = num_chunks(n, chunk);
  if (nc <= 1) {
    if (n > 0) fn(int64_t(0), int64_t(0), n);
    return;
  }
  at::parallel_for(0, nc, 1, [&](int64_t a, int64_t b) {
    for (int64_t k = a; k < b; ++k) fn(k, k * chunk, std::min(n, (k + 1) * chunk));
  });
}

// Per-chunk partial sums of `width` values (zeroed), and their total in chunk order.
struct Partials {
  int64_t width;
  std::vector<double> v;
  Partials(int64_t chunks, int64_t width) : width(width), v(chunks * width, 0.0) {}
  double* operator[](int64_t k) { return v.data() + k * width; }
  std::vector<double> total() const {
    std::vector<double> out(width, 0.0);
    for (size_t k = 0; k < v.size(); k += width)
      for (int64_t j = 0; j < width; ++j) out[j] += v[k + j];
    return out;
  }
};

// Whether rfft2 bin (row i, column jb) of an (hh, ww) map is self-conjugate (real).
inline bool self_conjugate(const Dims& d, int64_t b) {
  const int64_t i = b / d.wb, jb = b % d.wb;
  return (i == 0 || (d.hh % 2 == 0 && i == d.hh / 2)) && (jb == 0 || (d.ww % 2 == 0 && jb == d.ww / 2));
}

// dst (cols, rows) = src (rows, cols)^T, both contiguous, in 16 x 16 tiles, chunks of row tiles in
// parallel. The FFTs read and write the h-wide maps channel-major and the loops pixel-major: ATen's
// copy_ of such a transpose ran on one thread at 50-57 us for IPT 48x48's 2304 x 24 values, four
// per training step.
template <typename T>
void transpose_into(const T* __restrict__ src, int64_t rows, int64_t cols, T* __restrict__ dst) {
  constexpr int64_t kTile = 16;
  for_chunks((rows + kTile - 1) / kTile, chunk_items(kTile * cols), [&](int64_t, int64_t t0, int64_t t1) {
    const int64_t r_end = std::min(rows, t1 * kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t r0 = t0 * kTile; r0 < r_end; r0 += kTile) {
        const int64_t r1 = std::min(r_end, r0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
      }
    }
  });
}

// rfft2 (orthonormal) of the pixel-major map y (H W, N h) as a channel-major spectrum: (N h, H, W/2 + 1)
// complex, returned as its real (N h, nb, 2) view, so bin b of value j is at 2 (j nb + b). torch's
// rfft2 over the pixel axes of the (H, W, N h) view runs channel-major inside too and gave a permuted
// view, which the kernel copied to bin-major order; the transposed input costs one pass over the
// (small) h-wide map. Measured (2-core AMD EPYC, medians of 200): IPT 48x48 x 24 values 232 -> 91 us,
// EDT 64x64 x 12 108 -> 58 us.
template <typename T>
at::Tensor rfft2_channel_major(const at::Tensor& y, const Dims& d) {
  const int64_t nh = d.n * d.hid;
  auto yt = new_buffer({nh, d.npix}, y);
  if (y.is_contiguous())
    transpose_into(y.data_ptr<T>(), d.npix, nh, yt.data_ptr<T>());
  else
    yt.copy_(y.view({d.npix, nh}).t());
  return at::view_as_real(at::fft_rfft2(yt.view({nh, d.hh, d.ww}), c10::nullopt, {1, 2}, "ortho")).contiguous();
}

// irfft2's (H, W, N h) output g as the pixel-major rows (R, h): ATen's irfft2 over the two leading axes
// gives it channel-major ((N h, H, W) in memory), whose transpose is transpose_into's; any other
// strides take a copy.
template <typename T>
at::Tensor pixel_major(const at::Tensor& g, const Dims& d) {
  if (!g.permute({2, 0, 1}).is_contiguous()) return g.reshape({d.rows, d.hid}).contiguous();
  auto out = new_buffer({d.rows, d.hid}, g);
  transpose_into(g.data_ptr<T>(), d.n * d.hid, d.npix, out.data_ptr<T>());
  return out;
}

// The spectrum's real and imaginary parts (2, nb, N h) (the self-conjugate bins' imaginary parts
// +0), magnitude, phase and cos/sin of the mapped phase, each (nb, N h). Dense bins are in the
// tables' order, FFT bins row-major (H, W/2 + 1). The transcendental passes are ATen's vectorised
// kernels (a scalar libm loop over the thousands of bins is several times slower).
struct Spectrum {
  at::Tensor reim, mag, pha, cosp, sinp;
};

template <typename T>
Spectrum spectrum_forward(const at::Tensor& y, const Dims& d, const at::Tensor& fwd, const T* pha_w,
                          const T* pha_b) {
  const int64_t nh = d.n * d.hid, nb = d.nb;
  Spectrum sp;
  sp.reim = at::empty({2, nb, nh}, y.options());
  auto re = sp.reim[0], im = sp.reim[1];
  if (d.dense) {
    auto spec = at::mm(fwd, y.view({d.npix, nh}));  // (k, N h): Re of the nb bins, Im of the first nb - s
    re.copy_(spec.narrow(0, 0, nb));
    im.narrow(0, 0, nb - d.s).copy_(spec.narrow(0, nb, nb - d.s));
    im.narrow(0, nb - d.s, d.s).zero_();  // the self-conjugate bins: +0, so their phase is exact
  }
  at::Tensor spec_c;  // FFT: (N h, nb, 2)
  if (!d.dense) spec_c = rfft2_channel_major<T>(y, d);
  sp.mag = at::empty({nb, nh}, y.options());
  sp.pha = at::empty({nb, nh}, y.options());
  sp.cosp = at::empty({nb, nh}, y.options());
  sp.sinp = at::empty({nb, nh}, y.options());
  const auto pw = per_value(pha_w, d.hid, d.n), pb = per_value(pha_b, d.hid, d.n);
  // per chunk of bins: (FFT) the parts split from the interleaved spectrum, then ATen's vectorised
  // passes on the chunk's slices (one thread each inside the parallel loop)
  for_chunks(nb, chunk_items(nh), [&](int64_t, int64_t b0, int64_t b1) {
    if (!d.dense) {
      const T* src = spec_c.data_ptr<T>();
      T* rp = re.data_ptr<T>();
      T* ip = im.data_ptr<T>();
      for (int64_t b = b0; b < b1; ++b) {
        const bool real = self_conjugate(d, b);
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t e = b * nh + j, f = 2 * (j * nb + b);
          rp[e] = src[f];
          ip[e] = real ? T(0) : src[f + 1];
        }
      }
    }
    const int64_t len = b1 - b0;
    const auto rs = re.narrow(0, b0, len), is = im.narrow(0, b0, len);
    auto ph = sp.pha.narrow(0, b0, len), p = sp.sinp.narrow(0, b0, len), cs = sp.cosp.narrow(0, b0, len);
    auto mg = sp.mag.narrow(0, b0, len);
    at::hypot_out(mg, rs, is);
    at::atan2_out(ph, is, rs);
    const T* php = ph.data_ptr<T>();
    T* pp = p.data_ptr<T>();
    for (int64_t b = 0; b < len; ++b)
      for (int64_t j = 0; j < nh; ++j) pp[b * nh + j] = pb[j] + php[b * nh + j] * pw[j];
    at::cos_out(cs, p);
    p.sin_();
  });
  return sp;
}

// gl (R, h) = irfft2 of m e^{ip}, m = amp_b + amp_w |S|.
template <typename T>
at::Tensor spectrum_inverse(const Spectrum& sp, const Dims& d, const at::Tensor& inv, const T* amp_w, const T* amp_b,
                            const at::Tensor& like) {
  const int64_t nh = d.n * d.hid, nb = d.nb;
  const T* mg = sp.mag.data_ptr<T>();
  const T* cs = sp.cosp.data_ptr<T>();
  const T* sn = sp.sinp.data_ptr<T>();
  const auto aw = per_value(amp_w, d.hid, d.n), ab = per_value(amp_b, d.hid, d.n);
  if (d.dense) {  // the real and imaginary parts that the inverse table reads
    auto z = new_buffer({d.k, nh}, like);
    T* zp = z.data_ptr<T>();
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t e = b * nh + j;
        const T m = ab[j] + mg[e] * aw[j];
        zp[e] = m * cs[e];
        if (b < nb - d.s) zp[(nb + b) * nh + j] = m * sn[e];
      }
    return at::mm(inv.t(), z);
  }
  auto z = new_buffer({d.hh, d.wb, nh, 2}, like);
  T* zp = z.data_ptr<T>();
  for_chunks(nb, chunk_items(nh), [&](int64_t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t j = 0; j < nh; ++j) {
        const int64_t e = b * nh + j;
        const T m = ab[j] + mg[e] * aw[j];
        zp[2 * e] = m * cs[e];
        zp[2 * e + 1] = m * sn[e];
      }
  });
  return pixel_major<T>(at::fft_irfft2(at::view_as_complex(z), at::IntArrayRef({d.hh, d.ww}), {0, 1}, "ortho"), d);
}

// The 3x3 taps as runs of contiguous values: tap t = (di + 1) * 3 + (dj + 1) reads, for output map
// row i (rows i0 <= i < i1, those with row i + di inside), the columns j0 <= j < j1 whose column
// j + dj is inside. Rows hold N images of h channels per pixel (px values), so for each such i the
// outputs from pixel (i, j0) on and the inputs from pixel (i + di, j0 + dj) on are one run of
// (j1 - j0) px values each: the loops over them vectorise, with no bounds test per pixel.
struct TapRuns {
  int64_t di, dj, i0, i1, j0, len, shift;  // shift: the input's offset from the output, in values
};

inline TapRuns tap_runs(const Dims& d, int t, int64_t px) {
  TapRuns r{};
  r.di = t / 3 - 1, r.dj = t % 3 - 1;
  r.i0 = std::max<int64_t>(0, -r.di), r.i1 = std::min(d.hh, d.hh - r.di);
  r.j0 = std::max<int64_t>(0, -r.dj);
  r.len = std::max<int64_t>(0, std::min(d.ww, d.ww - r.dj) - r.j0) * px;
  r.shift = (r.di * d.ww + r.dj) * px;
  return r;
}

// Each tap's h weights (k9, tap-major (9, h)) repeated over a run of ww pixels of N images: (9, line)
// values, line = ww N h.
template <typename T>
std::vector<T> tap_rows(const T* k9, int64_t hid, int64_t line) {
  std::vector<T> rows(9 * line);
  for (int t = 0; t < 9; ++t)
    for (int64_t k = 0; k < line; ++k) rows[t * line + k] = k9[t * hid + k % hid];
  return rows;
}

// One task's images of a batch of several tasks, with the batch left in its layout: the C-wide
// products run image by image on the batch's (P, C) blocks ("lnc" rows N C values apart, "nchw"
// transposed: BLAS takes those strides), reading and writing the kernel's pixel-major h-wide rows
// (P, n_k, h) directly, so no image is gathered or scattered. The kernel runs such a task as "lnc".
struct ImageBlocks {
  int64_t layout, npix, c, n;  // the batch's layout; the task's n images, idx[j] the batch index of its j-th
  const int64_t* idx;
  at::Tensor out;              // the batch's output (forward) or input gradient (backward), or undefined

  // image j's (P, C) block of t, a tensor in the batch's layout (a copy where t's strides need one:
  // read only)
  at::Tensor of(const at::Tensor& t, int64_t j) const {
    const int64_t i = idx[j];
    if (layout == LNC) return t.select(1, i);
    if (layout == NHWC) return t[i].reshape({npix, c});
    return t[i].reshape({c, npix}).t();
  }
  // image j's (P, C) block of `out` (contiguous: a view, written in place)
  at::Tensor out_of(int64_t j) const {
    const int64_t i = idx[j];
    if (layout == LNC) return out.select(1, i);
    if (layout == NHWC) return out[i].view({npix, c});
    return out[i].view({c, npix}).t();
  }
  // image j's rows (P, h) of a pixel-major h-wide map (P n_k, h)
  at::Tensor rows(const at::Tensor& m, int64_t j) const { return m.view({npix, n, m.size(1)}).select(1, j); }
  // fn(j) for each image j (the products that write image j's own rows), in parallel over the
  // images where there are several, each image's product on its thread's MKL. Measured, IPT 16x16
  // two tasks x 4 images (256 rows each, which MKL ran on one thread), alternating blocks in one
  // process: training 10.8 -> 9.0 ms, eval 6.2 -> 5.1. (The weight gradients' sums over the images
  // stay sequential: per-image partial products in parallel, added in order, measured no gain.)
  template <typename F>
  void each(const F& fn) const {
    if (n == 1) {
      fn(0);
      return;
    }
    parallel_ops(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) fn(j);
    });
  }
};

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, int64_t layout, const Dims& d, at::TensorList prm,
                                     const at::Tensor& fwd, const at::Tensor& inv, bool training, double eps,
                                     const ImageBlocks* blocks = nullptr) {
  auto P = [&](Param i) { return prm[i].data_ptr<T>(); };
  const int64_t R = d.rows, H = d.hid, N = d.n, NP = d.npix, h2 = d.h2, q = d.q;
  // head: (R, h); in training normalised in place into xhat, then y = bn_w xhat + bn_b
  const auto wh = prm[HEAD_W].view({H, d.c});
  at::Tensor rows, xh;
  if (blocks) {  // (x is the whole batch)
    rows = x;
    xh = new_buffer({R, H}, x);
    blocks->each([&](int64_t j) {
      rows_times_into(blocks->rows(xh, j), blocks->of(x, j), wh, prm[HEAD_B].view({H}));
    });
  } else {
    rows = rows_of(x, layout, d);
    xh = rows_times(rows, wh, prm[HEAD_B].view({H}));
    if (d.image_major) xh = swap_rows(xh, N, NP);
  }
  at::Tensor y = xh, mean_t, var_t, istd_t;
  if (training) {
    y = new_buffer({R, H}, x);
    mean_t = new_buffer({H}, x), var_t = new_buffer({H}, x), istd_t = new_buffer({H}, x);
    T* xp = xh.data_ptr<T>();
    const int64_t chunk = chunk_items(H), nc = num_chunks(R, chunk);
    Partials pmu(nc, H), psq(nc, H);
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double* acc = pmu[k];
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < H; ++c) acc[c] += xp[r * H + c];
    });
    std::vector<double> mu = pmu.total();
    for (int64_t c = 0; c < H; ++c) mu[c] /= double(R);
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double* acc = psq[k];
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < H; ++c) {
          const double v = xp[r * H + c] - mu[c];
          acc[c] += v * v;
        }
    });
    const std::vector<double> sq = psq.total();
    T* mp = mean_t.data_ptr<T>();
    T* vp = var_t.data_ptr<T>();
    T* ip = istd_t.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) {
      mp[c] = T(mu[c]);
      vp[c] = T(sq[c] / double(std::max<int64_t>(R - 1, 1)));  // unbiased, for the running variance
      ip[c] = T(1.0 / std::sqrt(sq[c] / double(R) + eps));
    }
    const T *bw = P(BN_W), *bb = P(BN_B);
    T* yp = y.data_ptr<T>();
    for_chunks(R, chunk, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < H; ++c) {
          const T v = (xp[r * H + c] - mp[c]) * ip[c];
          xp[r * H + c] = v;
          yp[r * H + c] = v * bw[c] + bb[c];
        }
    });
  }
  const T* yp = y.data_ptr<T>();
  // global branch: gl (R, h) before |.|
  const Spectrum sp = spectrum_forward<T>(y, d, fwd, P(PHA_W), P(PHA_B));
  const at::Tensor gl = spectrum_inverse<T>(sp, d, inv, P(AMP_W), P(AMP_B), x);
  const T* glp = gl.data_ptr<T>();
  // local branch: the depthwise 3x3 of kernel A @ B, k9 kept tap-major (9, h)
  auto k9 = new_buffer({9, H}, x);
  T* k9p = k9.data_ptr<T>();
  {
    const T *a = P(CONV_A), *b = P(CONV_B);
    for (int t = 0; t < 9; ++t)
      for (int64_t c = 0; c < H; ++c) {
        double acc = 0;
        for (int64_t i = 0; i < d.r; ++i) acc += double(a[c * d.r + i]) * b[i * 9 + t];
        k9p[t * H + c] = T(acc);
      }
  }
  auto loc = new_buffer({R, H}, x);
  T* lp = loc.data_ptr<T>();
  {
    const T* bias = P(CONV_BIAS);
    const int64_t px = N * H, line = d.ww * px;
    const auto krows = tap_rows(k9p, H, line);
    // in chunks of map rows (each output row is written by its own chunk only)
    for_chunks(d.hh, chunk_items(line), [&](int64_t, int64_t i0, int64_t i1) {
      for (int64_t r = i0 * d.ww * N; r < i1 * d.ww * N; ++r)
        for (int64_t c = 0; c < H; ++c) lp[r * H + c] = bias[c];
      for (int t = 0; t < 9; ++t) {
        const TapRuns tr = tap_runs(d, t, px);
        const T* __restrict__ kr = krows.data() + t * line + tr.j0 * px;
        for (int64_t i = std::max(tr.i0, i0); i < std::min(tr.i1, i1); ++i) {
          T* __restrict__ o = lp + (i * d.ww + tr.j0) * px;
          const T* __restrict__ in = yp + (i * d.ww + tr.j0) * px + tr.shift;
          for (int64_t k = 0; k < tr.len; ++k) o[k] += kr[k] * in[k];
        }
      }
    });
  }
  // attention pooling per image, the mean of |gl|: v = [pooled, gmean] (N, 2h)
  auto score = new_buffer({NP, N}, x);
  auto v = new_buffer({N, 2 * H}, x);
  T* sc = score.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  {
    const T *cw = P(COMP_W), cb = *P(COMP_B);
    const int64_t chunk = chunk_items(H), nc = num_chunks(R, chunk);
    for_chunks(R, chunk, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) sc[r] = affine_dot(yp + r * H, cw, cb, H);
    });
    for (int64_t m = 0; m < N; ++m) {  // the softmax over each image's pixels
      T mx = sc[m];
      for (int64_t p = 1; p < NP; ++p) mx = std::max(mx, sc[p * N + m]);
      double sum = 0;
      for (int64_t p = 0; p < NP; ++p) sum += (sc[p * N + m] = std::exp(sc[p * N + m] - mx));
      const T inv_sum = T(1.0 / sum);
      for (int64_t p = 0; p < NP; ++p) sc[p * N + m] *= inv_sum;
    }
    Partials part(nc, N * 2 * H);  // per image: [sum_p score y, sum_p |gl|]
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double* acc = part[k];
      for (int64_t r = r0; r < r1; ++r) {
        double* am = acc + (r % N) * 2 * H;
        for (int64_t c = 0; c < H; ++c) {
          am[c] += double(sc[r]) * yp[r * H + c];
          am[H + c] += std::abs(glp[r * H + c]);
        }
      }
    });
    const std::vector<double> sums = part.total();
    for (int64_t m = 0; m < N; ++m)
      for (int64_t c = 0; c < H; ++c) {
        vp[m * 2 * H + c] = T(sums[m * 2 * H + c]);
        vp[m * 2 * H + H + c] = T(sums[m * 2 * H + H + c] / double(NP));
      }
  }
  // the two channel MLPs: a1 = [proj.0 pooled, ci.1 gmean] (N, h2 + q); cc = [c, sigmoid(cg)] (N, 2h)
  auto a1 = new_buffer({N, h2 + q}, x);
  auto cc = new_buffer({N, 2 * H}, x);
  T* a1p = a1.data_ptr<T>();
  T* ccp = cc.data_ptr<T>();
  {
    const T *p1w = P(P1W), *p1b = P(P1B), *c1w = P(C1W), *c1b = P(C1B);
    const T *p2w = P(P2W), *p2b = P(P2B), *c2w = P(C2W), *c2b = P(C2B);
    std::vector<T> hdn(h2 + q);
    for (int64_t m = 0; m < N; ++m) {
      const T* vm = vp + m * 2 * H;
      for (int64_t o = 0; o < h2 + q; ++o) {
        const bool proj = o < h2;
        const T* w = proj ? p1w + o * H : c1w + (o - h2) * H;
        const T* in = proj ? vm : vm + H;
        double acc = proj ? p1b[o] : c1b[o - h2];
        for (int64_t c = 0; c < H; ++c) acc += double(w[c]) * in[c];
        a1p[m * (h2 + q) + o] = T(acc);
        hdn[o] = gelu(T(acc));
      }
      for (int64_t c = 0; c < H; ++c) {
        double pc = p2b[c], gc = c2b[c];
        for (int64_t o = 0; o < h2; ++o) pc += double(p2w[c * h2 + o]) * hdn[o];
        for (int64_t o = 0; o < q; ++o) gc += double(c2w[c * q + o]) * hdn[h2 + o];
        ccp[m * 2 * H + c] = T(pc);
        ccp[m * 2 * H + H + c] = sigmoid(T(gc));
      }
    }
  }
  // spatial gate and the mix: u = c (cg loc + sg |gl|)
  auto sg = new_buffer({R}, x);
  auto u = new_buffer({R, H}, x);
  T* sgp = sg.data_ptr<T>();
  T* up = u.data_ptr<T>();
  {
    const T *sw = P(SI_W), sb = *P(SI_B);
    for_chunks(R, chunk_items(H), [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T g = sigmoid(affine_dot(lp + r * H, sw, sb, H));
        sgp[r] = g;
        const T* cm = ccp + (r % N) * 2 * H;
        for (int64_t c = 0; c < H; ++c)
          up[r * H + c] = cm[c] * (cm[H + c] * lp[r * H + c] + g * std::abs(glp[r * H + c]));
      }
    });
  }
  // tail, written in the host's layout
  const auto tw = prm[TAIL_W].view({d.c, H});
  at::Tensor out;
  if (blocks) {  // into the batch's output
    out = blocks->out;
    blocks->each([&](int64_t j) {
      rows_times_into(blocks->out_of(j), blocks->rows(u, j), tw, at::Tensor());
    });
  } else if (layout == NCHW) {
    out = new_buffer({1, d.c, d.hh, d.ww}, x);
    auto o = out.view({d.c, NP});
    at::mm_out(o, tw, u.t());
  } else {
    if (d.image_major) u = swap_rows(u, NP, N);  // (kept so for the tail's weight gradient)
    const auto shape = layout == LNC ? std::vector<int64_t>{NP, N, d.c} : std::vector<int64_t>{N, d.hh, d.ww, d.c};
    out = rows_times(u, tw, {}).view(shape);
  }
  if (!training) return {out};
  return {out,     mean_t,  var_t, rows, xh,  istd_t, y, sp.reim, sp.mag, sp.pha,
          sp.cosp, sp.sinp, gl,    k9,   loc, score,  v, a1,      cc,     sg,     u};
}

enum Saved : int {
  S_ROWS, S_XHAT, S_ISTD, S_Y, S_REIM, S_MAG, S_PHA, S_COS, S_SIN, S_GL, S_K9, S_LOC, S_SCORE, S_V, S_A1, S_CC, S_SG,
  S_U, NUM_SAVED
};

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& dout, int64_t layout, const Dims& d, at::TensorList prm,
                                      at::TensorList sv, const at::Tensor& fwd, const at::Tensor& inv, bool need_dx,
                                      const ImageBlocks* blocks = nullptr) {
  auto P = [&](Param i) { return prm[i].data_ptr<T>(); };
  auto S = [&](Saved i) { return sv[i].data_ptr<T>(); };
  const int64_t R = d.rows, H = d.hid, N = d.n, NP = d.npix, h2 = d.h2, q = d.q, nh = N * H;
  const auto& like = sv[S_XHAT];
  const auto tw = prm[TAIL_W].view({d.c, H});
  // tail
  at::Tensor du, dtw;
  if (blocks) {  // dout: the whole batch's
    du = new_buffer({R, H}, like);
    blocks->each([&](int64_t j) {
      rows_times_into(blocks->rows(du, j), blocks->of(dout, j), tw.t(), at::Tensor());
    });
    dtw = at::zeros({d.c, H}, like.options());
    for (int64_t j = 0; j < N; ++j) add_t_product(dtw, blocks->of(dout, j), blocks->rows(sv[S_U], j));
  } else if (layout == NCHW) {
    const auto g = dout.reshape({d.c, NP});
    du = at::mm(g.t(), tw);
    dtw = at::mm(g, sv[S_U]);
  } else {
    const auto g = dout.reshape({R, d.c});
    // (u kept in the tail's row order)
    if (narrow_t_takes(g, sv[S_U])) {  // the extension's loops (du: its narrow-output one, which AVX-512 has)
      du = rows_times(g, tw.t(), {});
      dtw = narrow_t_product(g, sv[S_U]);
    } else if (rows_as_conv(sv[S_U], d.c) && g.is_contiguous()) {  // the forward's convolution's backward
      auto gr = rows_times_backward(g, sv[S_U], tw, true);
      du = gr[0], dtw = gr[1];
    } else {
      du = rows_times(g, tw.t(), {});
      dtw = d.c < 384 ? narrow_rows_t_product(sv[S_U], g).t().contiguous() : at::mm(g.t(), sv[S_U]);
    }
    if (d.image_major) du = swap_rows(du, N, NP);
  }
  const T* dup = du.data_ptr<T>();
  const T *lp = S(S_LOC), *glp = S(S_GL), *sgp = S(S_SG), *ccp = S(S_CC), *yp = S(S_Y);
  // the mix and the spatial gate
  auto dloc = new_buffer({R, H}, like);
  T* dlp = dloc.data_ptr<T>();
  // per chunk of rows: [dul (N h), dc (N h), dsiw (h), dsib], then their totals
  std::vector<double> mix_sums;
  {
    const T* sw = P(SI_W);
    const int64_t chunk = chunk_items(H);
    Partials part(num_chunks(R, chunk), 2 * N * H + H + 1);
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double *dul = part[k], *dc = dul + N * H, *dsiw = dc + N * H, *dsib = dsiw + H;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t m = r % N;
        const T* cm = ccp + m * 2 * H;
        const T g = sgp[r];
        double dsz = 0;
        for (int64_t c = 0; c < H; ++c) {
          const int64_t e = r * H + c;
          const double dug = double(dup[e]) * std::abs(glp[e]);
          dul[m * H + c] += double(dup[e]) * lp[e];
          dc[m * H + c] += dug * g;
          dsz += dug * cm[c];
        }
        dsz *= double(g) * (1.0 - g);
        for (int64_t c = 0; c < H; ++c) {
          const int64_t e = r * H + c;
          dlp[e] = T(double(dup[e]) * cm[c] * cm[H + c] + dsz * sw[c]);
          dsiw[c] += dsz * lp[e];
        }
        *dsib += dsz;
      }
    });
    mix_sums = part.total();
  }
  const double *dul = mix_sums.data(), *dc = dul + N * H, *dsiw = dc + N * H;
  const double dsib = dsiw[H];
  // gradients of c and of the channel gate before its sigmoid; the MLPs' backward
  auto dpw1 = new_buffer({h2, H}, like), dpb1 = new_buffer({h2}, like), dpw2 = new_buffer({H, h2}, like),
       dpb2 = new_buffer({H}, like), dcw1 = new_buffer({q, H}, like), dcb1 = new_buffer({q}, like),
       dcw2 = new_buffer({H, q}, like), dcb2 = new_buffer({H}, like);
  std::vector<double> dv(N * 2 * H, 0.0);  // gradients of [pooled, gmean]
  {
    const T *p1w = P(P1W), *c1w = P(C1W), *p2w = P(P2W), *c2w = P(C2W);
    const T *a1p = S(S_A1), *vp = S(S_V);
    std::vector<double> gw1((h2 + q) * H, 0.0), gb1(h2 + q, 0.0), gw2p(H * h2, 0.0), gw2c(H * q, 0.0),
        gb2(2 * H, 0.0), dcc(2 * H), da1(h2 + q);
    std::vector<T> hdn(h2 + q);
    for (int64_t m = 0; m < N; ++m) {
      const T* cm = ccp + m * 2 * H;
      for (int64_t c = 0; c < H; ++c) {
        const double cg = cm[H + c];
        dcc[c] = dc[m * H + c] + cg * dul[m * H + c];
        dcc[H + c] = double(cm[c]) * dul[m * H + c] * cg * (1.0 - cg);
        gb2[c] += dcc[c];
        gb2[H + c] += dcc[H + c];
      }
      for (int64_t o = 0; o < h2 + q; ++o) {
        const T a = a1p[m * (h2 + q) + o];
        hdn[o] = gelu(a);
        double dh = 0;
        if (o < h2)
          for (int64_t c = 0; c < H; ++c) dh += dcc[c] * p2w[c * h2 + o];
        else
          for (int64_t c = 0; c < H; ++c) dh += dcc[H + c] * c2w[c * q + o - h2];
        da1[o] = dh * gelu_grad(a);
        gb1[o] += da1[o];
      }
      for (int64_t c = 0; c < H; ++c) {
        for (int64_t o = 0; o < h2; ++o) gw2p[c * h2 + o] += dcc[c] * hdn[o];
        for (int64_t o = 0; o < q; ++o) gw2c[c * q + o] += dcc[H + c] * hdn[h2 + o];
      }
      const T* vm = vp + m * 2 * H;
      for (int64_t o = 0; o < h2 + q; ++o) {
        const bool proj = o < h2;
        const T* w = proj ? p1w + o * H : c1w + (o - h2) * H;
        double* dvm = dv.data() + m * 2 * H + (proj ? 0 : H);
        const T* in = proj ? vm : vm + H;
        for (int64_t c = 0; c < H; ++c) {
          dvm[c] += da1[o] * w[c];
          gw1[o * H + c] += da1[o] * in[c];
        }
      }
    }
    T *w1p = dpw1.data_ptr<T>(), *w1c = dcw1.data_ptr<T>(), *b1p = dpb1.data_ptr<T>(), *b1c = dcb1.data_ptr<T>();
    for (int64_t o = 0; o < h2 + q; ++o) {
      for (int64_t c = 0; c < H; ++c) (o < h2 ? w1p + o * H : w1c + (o - h2) * H)[c] = T(gw1[o * H + c]);
      (o < h2 ? b1p[o] : b1c[o - h2]) = T(gb1[o]);
    }
    T *w2p = dpw2.data_ptr<T>(), *w2c = dcw2.data_ptr<T>(), *b2p = dpb2.data_ptr<T>(), *b2c = dcb2.data_ptr<T>();
    for (int64_t i = 0; i < H * h2; ++i) w2p[i] = T(gw2p[i]);
    for (int64_t i = 0; i < H * q; ++i) w2c[i] = T(gw2c[i]);
    for (int64_t c = 0; c < H; ++c) b2p[c] = T(gb2[c]), b2c[c] = T(gb2[H + c]);
  }
  // global branch: d|gl| from the mix and the mean, through |.|, then the spectrum's adjoint
  auto dgl = new_buffer({R, H}, like);
  {
    T* g = dgl.data_ptr<T>();
    for_chunks(R, chunk_items(H), [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t m = r % N;
        const T* cm = ccp + m * 2 * H;
        for (int64_t c = 0; c < H; ++c) {
          const int64_t e = r * H + c;
          const T sgn = T((glp[e] > 0) - (glp[e] < 0));
          g[e] = T(double(dup[e]) * sgp[r] * cm[c] + dv[m * 2 * H + H + c] / double(NP)) * sgn;
        }
      }
    });
  }
  // gradients of Re P and Im P: dense, the inverse table's transpose; FFT, rfft2 of dgl with the
  // columns that stand for two bins doubled (irfft2's adjoint, as torch's)
  at::Tensor dz, dzc;
  if (d.dense) {
    dz = at::mm(inv, dgl.view({NP, nh}));  // (k, N h)
  } else {
    dzc = rfft2_channel_major<T>(dgl, d);  // (N h, nb, 2)
  }
  auto ds = d.dense ? new_buffer({d.k, nh}, like) : new_buffer({d.hh, d.wb, nh, 2}, like);
  auto damw = new_buffer({H}, like), damb = new_buffer({H}, like), dphw = new_buffer({H}, like),
       dphb = new_buffer({H}, like);
  {
    const T *mg = S(S_MAG), *ph = S(S_PHA), *cs = S(S_COS), *sn = S(S_SIN);
    const T *rep = S(S_REIM), *imp = rep + d.nb * nh;
    const T* dzp = d.dense ? dz.data_ptr<T>() : dzc.data_ptr<T>();
    const T *amw = P(AMP_W), *amb = P(AMP_B), *phw = P(PHA_W);
    T* dsp = ds.data_ptr<T>();
    const auto aw = per_value(amw, H, N), ab = per_value(amb, H, N), pw = per_value(phw, H, N);
    // per chunk of bins, per value of a row: the sums for amp_w, amp_b, pha_w, pha_b
    const int64_t chunk = chunk_items(nh);
    Partials part(num_chunks(d.nb, chunk), 4 * nh);
    for_chunks(d.nb, chunk, [&](int64_t kc, int64_t b0, int64_t b1) {
      double *g_aw = part[kc], *g_ab = g_aw + nh, *g_pw = g_ab + nh, *g_pb = g_pw + nh;
      for (int64_t b = b0; b < b1; ++b) {
        const bool has_im = !d.dense || b < d.nb - d.s;
        const int64_t col = b % d.wb;
        const bool doubled = !d.dense && col >= 1 && col <= d.edge;
        const T twice = doubled ? T(2) : T(1), half = doubled ? T(0.5) : T(1);
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t c = j, e = b * nh + j;  // (c: the value's place in the per_value rows)
          T dre, dim;
          if (d.dense) {
            dre = dzp[e], dim = has_im ? dzp[(d.nb + b) * nh + j] : T(0);
          } else {
            const int64_t f = 2 * (j * d.nb + b);
            dre = dzp[f] * twice, dim = dzp[f + 1] * twice;
          }
          const T mag = mg[e];
          T inv_mag = T(1) / mag;
          if (std::isinf(inv_mag)) inv_mag = T(0);  // S = 0: no gradient, as torch's abs and angle
          const T ure = rep[e] * inv_mag, uim = imp[e] * inv_mag;
          const T m = ab[c] + mag * aw[c];
          const T dm = dre * cs[e] + dim * sn[e];
          const T dpp = (dim * cs[e] - dre * sn[e]) * m;
          g_ab[c] += dm;
          g_aw[c] += double(dm) * mag;
          g_pb[c] += dpp;
          g_pw[c] += double(dpp) * ph[e];
          const T a = dm * aw[c], bb = dpp * inv_mag * pw[c];  // dS = (a + i bb) S / |S|
          if (d.dense) {
            dsp[e] = a * ure - bb * uim;
            if (has_im) dsp[(d.nb + b) * nh + j] = a * uim + bb * ure;
          } else {  // (halved where rfft2's adjoint counts the column twice)
            dsp[2 * e] = (a * ure - bb * uim) * half;
            dsp[2 * e + 1] = (a * uim + bb * ure) * half;
          }
        }
      }
    });
    const std::vector<double> sums = part.total();
    const double *g_aw = sums.data(), *g_ab = g_aw + nh, *g_pw = g_ab + nh, *g_pb = g_pw + nh;
    T *paw = damw.data_ptr<T>(), *pab = damb.data_ptr<T>(), *ppw = dphw.data_ptr<T>(), *ppb = dphb.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) {
      double sw = 0, sb = 0, tw = 0, tb = 0;
      for (int64_t m = 0; m < N; ++m) sw += g_aw[m * H + c], sb += g_ab[m * H + c], tw += g_pw[m * H + c],
                                      tb += g_pb[m * H + c];
      paw[c] = T(sw), pab[c] = T(sb), ppw[c] = T(tw), ppb[c] = T(tb);
    }
  }
  at::Tensor dy = d.dense ? at::mm(fwd.t(), ds).view({R, H})
                    : pixel_major<T>(at::fft_irfft2(at::view_as_complex(ds), at::IntArrayRef({d.hh, d.ww}), {0, 1}, "ortho"), d);
  T* dyp = dy.data_ptr<T>();
  // local branch: the 3x3's adjoint (each tap's product sent back to the pixel it read)
  auto dk9 = new_buffer({H, 9}, like);
  auto dcbias = new_buffer({H}, like);
  {
    const T* k9p = S(S_K9);
    const int64_t px = N * H, line = d.ww * px;
    const auto krows = tap_rows(k9p, H, line);
    // in chunks of the map rows of dy: per tap, dy at the input pixels += k dloc at the outputs that
    // read them (the output rows i whose input row i + di is in the chunk); the kernel's gradient sums
    // y dloc over those pairs (per value over the chunk's rows in T, then per channel in double), the
    // bias's dloc over the chunk's rows. Per chunk: [kernel (9, h), bias (h)].
    const int64_t chunk = chunk_items(line);
    Partials part(num_chunks(d.hh, chunk), 10 * H);
    for_chunks(d.hh, chunk, [&](int64_t kc, int64_t a0, int64_t a1) {
      double *gk = part[kc], *gb = gk + 9 * H;
      for (int64_t r = a0 * d.ww * N; r < a1 * d.ww * N; ++r)
        for (int64_t c = 0; c < H; ++c) gb[c] += dlp[r * H + c];
      std::vector<T> sums(line);
      for (int t = 0; t < 9; ++t) {
        const TapRuns tr = tap_runs(d, t, px);
        const int64_t lo = std::max(tr.i0, a0 - tr.di), hi = std::min(tr.i1, a1 - tr.di);
        if (lo >= hi) continue;
        std::fill(sums.begin(), sums.end(), T(0));
        const T* __restrict__ kr = krows.data() + t * line + tr.j0 * px;
        T* __restrict__ acc = sums.data();
        for (int64_t i = lo; i < hi; ++i) {
          const T* __restrict__ g = dlp + (i * d.ww + tr.j0) * px;
          T* __restrict__ o = dyp + (i * d.ww + tr.j0) * px + tr.shift;
          const T* __restrict__ in = yp + (i * d.ww + tr.j0) * px + tr.shift;
          for (int64_t k = 0; k < tr.len; ++k) {
            o[k] += kr[k] * g[k];
            acc[k] += in[k] * g[k];
          }
        }
        for (int64_t k = 0; k < tr.len; k += H)  // (runs of whole pixels: len is a multiple of h)
          for (int64_t c = 0; c < H; ++c) gk[t * H + c] += acc[k + c];
      }
    });
    const std::vector<double> totals = part.total();
    const double *gk = totals.data(), *gb = gk + 9 * H;
    T* k = dk9.data_ptr<T>();
    T* bp = dcbias.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) {
      for (int t = 0; t < 9; ++t) k[c * 9 + t] = T(gk[t * H + c]);
      bp[c] = T(gb[c]);
    }
  }
  // attention pooling: pooled = sum_p score y, score = softmax_p(y comp_w + comp_b)
  auto dcw = new_buffer({H}, like), dcb = new_buffer({1}, like);
  {
    const T *sc = S(S_SCORE), *cw = P(COMP_W);
    std::vector<double> dsc(R);
    const int64_t chunk = chunk_items(H);
    for_chunks(R, chunk, [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const double* dp = dv.data() + (r % N) * 2 * H;
        double acc = 0;
        for (int64_t c = 0; c < H; ++c) acc += double(yp[r * H + c]) * dp[c];
        dsc[r] = acc;
      }
    });
    for (int64_t m = 0; m < N; ++m) {  // the softmax's adjoint over each image's pixels
      double dot = 0;
      for (int64_t p = 0; p < NP; ++p) dot += double(sc[p * N + m]) * dsc[p * N + m];
      for (int64_t p = 0; p < NP; ++p) dsc[p * N + m] = sc[p * N + m] * (dsc[p * N + m] - dot);
    }
    Partials part(num_chunks(R, chunk), H + 1);  // per chunk: [comp_w (h), comp_b]
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double *gcw = part[k], *gcb = gcw + H;
      for (int64_t r = r0; r < r1; ++r) {
        const double* dp = dv.data() + (r % N) * 2 * H;
        const double dzr = dsc[r];
        *gcb += dzr;
        for (int64_t c = 0; c < H; ++c) {
          gcw[c] += dzr * yp[r * H + c];
          dyp[r * H + c] = T(dyp[r * H + c] + double(sc[r]) * dp[c] + dzr * cw[c]);
        }
      }
    });
    const std::vector<double> sums = part.total();
    T* g = dcw.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) g[c] = T(sums[c]);
    *dcb.data_ptr<T>() = T(sums[H]);
  }
  // BatchNorm on the batch statistics: dy0 = istd w (dy - mean dy - xhat mean(dy xhat))
  auto dbnw = new_buffer({H}, like), dbnb = new_buffer({H}, like), dbh = new_buffer({H}, like);
  {
    const T *xh = S(S_XHAT), *istd = S(S_ISTD), *bw = P(BN_W);
    const int64_t chunk = chunk_items(H);
    Partials part(num_chunks(R, chunk), 2 * H);  // per chunk: [bias (h), weight (h)]
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double *gb = part[k], *gw = gb + H;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < H; ++c) {
          gb[c] += dyp[r * H + c];
          gw[c] += double(dyp[r * H + c]) * xh[r * H + c];
        }
    });
    const std::vector<double> sums = part.total();
    const double *gb = sums.data(), *gw = gb + H;
    std::vector<T> mb(H), mw(H), sc(H);
    T *pw = dbnw.data_ptr<T>(), *pb = dbnb.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) {
      pw[c] = T(gw[c]), pb[c] = T(gb[c]);
      mb[c] = T(gb[c] / double(R)), mw[c] = T(gw[c] / double(R)), sc[c] = bw[c] * istd[c];
    }
    Partials head_bias(num_chunks(R, chunk), H);  // per chunk: the head bias's gradient, sum of dy0
    for_chunks(R, chunk, [&](int64_t k, int64_t r0, int64_t r1) {
      double* gh = head_bias[k];
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < H; ++c) {
          const int64_t e = r * H + c;
          dyp[e] = (dyp[e] - mb[c] - xh[e] * mw[c]) * sc[c];
          gh[c] += dyp[e];
        }
    });
    const std::vector<double> hb = head_bias.total();
    T* pd = dbh.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) pd[c] = T(hb[c]);
  }
  // head, on x's rows (dy reordered to them)
  if (d.image_major) dy = swap_rows(dy, NP, N);
  const auto wh = prm[HEAD_W].view({H, d.c});
  at::Tensor dwh, dx = at::empty({0}, like.options());
  if (blocks) {  // sv[S_ROWS]: the whole batch's x
    auto acc = at::zeros({d.c, H}, like.options());
    for (int64_t j = 0; j < N; ++j) add_t_product(acc, blocks->of(sv[S_ROWS], j), blocks->rows(dy, j));
    dwh = acc.t().contiguous();
    if (need_dx) {
      dx = blocks->out;
      blocks->each([&](int64_t j) {
        rows_times_into(blocks->out_of(j), blocks->rows(dy, j), wh.t(), at::Tensor());
      });
    }
  } else if (layout != NCHW && narrow_t_takes(dy, sv[S_ROWS])) {  // the extension's loops
    dwh = narrow_t_product(dy, sv[S_ROWS]);
    if (need_dx) dx = rows_times(dy, wh.t(), {}).view(dout.sizes());
  } else if (layout != NCHW && rows_as_conv(sv[S_ROWS], H)) {
    // the forward's convolution's backward: dx and dwh in one call (dy is contiguous)
    auto gr = rows_times_backward(dy, sv[S_ROWS], wh, need_dx);
    if (need_dx) dx = gr[0].view(dout.sizes());
    dwh = gr[1];
  } else {
    // wide and long (IPT's 576 channels, 1024+ rows) as (rows^T dy)^T: MKL ran dy^T rows 1.3-1.5x
    // slower there on this project's 2-core CPU (and faster on EDT's 180 channels)
    dwh = d.c >= 384 && R >= 1024 ? at::mm(sv[S_ROWS].t(), dy).t().contiguous()
                                  : narrow_rows_t_product(dy, sv[S_ROWS]);
    if (need_dx && layout == NCHW) {
      dx = new_buffer(dout.sizes(), like);
      auto o = dx.view({d.c, NP});
      at::mm_out(o, wh.t(), dy.t());
    } else if (need_dx) {
      dx = rows_times(dy, wh.t(), {}).view(dout.sizes());
    }
  }
  // conv_a, conv_b from the kernel's gradient (k9 = A @ B)
  const auto ca = prm[CONV_A].view({H, d.r}), cb = prm[CONV_B].view({d.r, 9});
  auto dca = at::mm(dk9, cb.t()), dcbw = at::mm(ca.t(), dk9);
  // spatial gate's weight and bias
  auto dsw = new_buffer({H}, like), dsb = new_buffer({1}, like);
  {
    T* g = dsw.data_ptr<T>();
    for (int64_t c = 0; c < H; ++c) g[c] = T(dsiw[c]);
    *dsb.data_ptr<T>() = T(dsib);
  }
  std::vector<at::Tensor> grads = {dx,   dwh,  dbh,  dbnw, dbnb, dca,  dcbw, dcbias, damw, damb, dphw, dphb, dcw,
                                   dcb,  dpw1, dpb1, dpw2, dpb2, dcw1, dcb1, dcw2, dcb2, dsw,    dsb,  dtw};
  for (int i = 0; i < NUM_PARAMS; ++i)  // in each parameter's own shape
    if (grads[1 + i].sizes() != prm[i].sizes()) grads[1 + i] = grads[1 + i].view(prm[i].sizes());
  return grads;
}

std::vector<at::Tensor> adaptir_rows_cpu(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, int64_t n,
                                         at::TensorList params, const at::Tensor& fwd, const at::Tensor& inv,
                                         int64_t nb, int64_t s, bool training, double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // (the caller's autograd.Function records the graph)
  const Dims d = check_args(x, layout, hh, ww, n, params, fwd, inv, nb, s);
  TORCH_CHECK(!training || d.rows > 1, "x: BatchNorm in training needs more than one value per channel, got ",
              d.rows, " row");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptir_rows_cpu", [&] {
    return forward_impl<scalar_t>(x, layout, d, params, fwd, inv, training, eps);
  });
}

std::vector<at::Tensor> adaptir_rows_backward_cpu(const at::Tensor& dout, const at::Tensor& x, int64_t layout,
                                                  int64_t hh, int64_t ww, int64_t n, at::TensorList params,
                                                  at::TensorList saved, const at::Tensor& fwd, const at::Tensor& inv,
                                                  int64_t nb, int64_t s, bool need_dx) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // (the caller's autograd.Function records the graph)
  const Dims d = check_args(x, layout, hh, ww, n, params, fwd, inv, nb, s);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.device().is_cpu(),
              "dout: expected the output's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == NUM_SAVED, "saved: expected the ", int(NUM_SAVED),
              " tensors the forward kept, got ", saved.size());
  for (const auto& t : saved)
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && (t.is_contiguous() || &t == &saved[S_ROWS]),
                "saved: expected contiguous ", x.scalar_type(), " tensors from the forward");
  TORCH_CHECK(saved[S_XHAT].numel() == d.rows * d.hid && saved[S_REIM].numel() == 2 * d.nb * d.n * d.hid,
              "saved: the tensors do not match these sizes (x ", x.sizes(), ", hidden width ", d.hid, ")");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptir_rows_backward_cpu", [&] {
    auto out = backward_impl<scalar_t>(dout, layout, d, params, saved, fwd, inv, need_dx);
    if (need_dx) out[0] = out[0].view(x.sizes());
    return out;
  });
}

// ---------------------------------------------------------------- several tasks in one batch
//
// The adapters of T tasks on one batch, task[i] the task of image i: each task's images run through
// its adapter as above (training: BatchNorm on that task's images only), as n_k images in "lnc" order
// whose C-wide products read and write the batch in place, image by image (ImageBlocks: no image is
// gathered into a task's own buffer, nor its output scattered back: those copies of the C-wide rows
// cost ~0.6 ms per 48x48 image of 576 channels in the two-task step, DRAM-bound); a task with no image
// is skipped. params: T x 24 tensors, task k's from k * 24. One call per direction for all tasks (no
// loop over tasks in Python). The saved S_ROWS of each task is x itself.

struct TaskGroups {
  int64_t t, n, c, npix;
  std::vector<at::Tensor> images;  // per task: int64 indices of its images (possibly none)
};

TaskGroups task_groups(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, at::TensorList params,
                       const at::Tensor& task) {
  check_x_layout(x, layout);
  TORCH_CHECK(hh > 0 && ww > 0, "hh, ww: expected positive sizes, got ", hh, ", ", ww);
  TORCH_CHECK(!params.empty() && params.size() % NUM_PARAMS == 0, "params: expected ", int(NUM_PARAMS),
              " tensors per task, got ", params.size());
  TaskGroups g{};
  g.t = static_cast<int64_t>(params.size()) / NUM_PARAMS;
  g.npix = hh * ww;
  g.n = x.size(layout == LNC ? 1 : 0);
  g.c = layout == NCHW ? x.size(1) : x.size(-1);
  TORCH_CHECK(x.numel() == g.n * g.npix * g.c, "x: expected ", g.n, " images of ", hh, "x", ww, " pixels and ", g.c,
              " channels, got shape ", x.sizes());
  TORCH_CHECK(task.device().is_cpu() && task.scalar_type() == at::kLong && task.dim() == 1 && task.numel() == g.n,
              "task: expected a CPU int64 tensor of ", g.n, " task indices (one per image), got ", task.sizes(), " ",
              task.scalar_type(), " on ", task.device());
  const auto tc = task.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> lists(g.t);
  for (int64_t i = 0; i < g.n; ++i) {
    TORCH_CHECK(tp[i] >= 0 && tp[i] < g.t, "task: image ", i, " has task ", tp[i], ", expected 0..", g.t - 1,
                " (", g.t, " tasks' parameters)");
    lists[tp[i]].push_back(i);
  }
  for (const auto& l : lists)
    g.images.push_back(at::tensor(l, at::TensorOptions().dtype(at::kLong)));
  return g;
}

std::vector<at::Tensor> adaptir_rows_tasks_cpu(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww,
                                               at::TensorList params, const at::Tensor& task, const at::Tensor& fwd,
                                               const at::Tensor& inv, int64_t nb, int64_t s, bool training,
                                               double eps) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // (the caller's autograd.Function records the graph)
  const TaskGroups g = task_groups(x, layout, hh, ww, params, task);
  auto out = new_buffer(x.sizes(), x);
  const int64_t hid = params[HEAD_B].numel();
  auto mean = at::zeros({g.t, hid}, x.options()), var = at::zeros({g.t, hid}, x.options());
  auto count = at::zeros({g.t}, x.options());
  std::vector<at::Tensor> res = {out, mean, var, count};
  for (int64_t k = 0; k < g.t; ++k) {
    const auto& idx = g.images[k];
    const int64_t nk = idx.numel();
    if (nk == 0) continue;
    const auto prm = params.slice(k * NUM_PARAMS, NUM_PARAMS);
    const Dims d = check_sizes(x.scalar_type(), LNC, g.c, hh, ww, nk, prm, fwd, inv, nb, s);
    TORCH_CHECK(d.hid == hid, "params: task ", k, " has ", d.hid, " hidden channels, task 0 has ", hid);
    TORCH_CHECK(!training || d.rows > 1, "x: BatchNorm in training needs more than one value per channel; task ", k,
                " has ", d.rows, " row");
    const ImageBlocks blocks{layout, g.npix, g.c, nk, idx.data_ptr<int64_t>(), out};
    auto r = AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptir_rows_tasks_cpu", [&] {
      return forward_impl<scalar_t>(x, LNC, d, prm, fwd, inv, training, eps, &blocks);
    });
    if (!training) continue;
    mean[k].copy_(r[1]), var[k].copy_(r[2]), count[k].fill_(double(d.rows));
    res.insert(res.end(), r.begin() + 3, r.end());
  }
  return res;
}

std::vector<at::Tensor> adaptir_rows_tasks_backward_cpu(const at::Tensor& dout, const at::Tensor& x, int64_t layout,
                                                        int64_t hh, int64_t ww, at::TensorList params,
                                                        const at::Tensor& task, at::TensorList saved,
                                                        const at::Tensor& fwd, const at::Tensor& inv, int64_t nb,
                                                        int64_t s, bool need_dx) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // (the caller's autograd.Function records the graph)
  const TaskGroups g = task_groups(x, layout, hh, ww, params, task);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.device().is_cpu(),
              "dout: expected the output's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
              dout.sizes(), " ", dout.scalar_type());
  int64_t present = 0;
  for (const auto& idx : g.images) present += idx.numel() > 0;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == present * NUM_SAVED, "saved: expected the ", int(NUM_SAVED),
              " tensors the forward kept for each of the ", present, " tasks present, got ", saved.size());
  at::Tensor dx = need_dx ? new_buffer(x.sizes(), x) : at::empty({0}, x.options());
  std::vector<at::Tensor> res = {dx};
  int64_t done = 0;
  for (int64_t k = 0; k < g.t; ++k) {
    const auto& idx = g.images[k];
    const int64_t nk = idx.numel();
    const auto prm = params.slice(k * NUM_PARAMS, NUM_PARAMS);
    if (nk == 0) {  // no image of this task: zero gradients, as for any parameter the batch did not reach
      for (const auto& q : prm) res.push_back(at::zeros_like(q));
      continue;
    }
    const auto sv = saved.slice(done * NUM_SAVED, NUM_SAVED);
    ++done;
    const Dims d = check_sizes(x.scalar_type(), LNC, g.c, hh, ww, nk, prm, fwd, inv, nb, s);
    TORCH_CHECK(sv[S_ROWS].sizes() == x.sizes() && sv[S_XHAT].numel() == d.rows * d.hid, "saved: the tensors of task ",
                k, " do not match x and its ", nk, " images");
    const ImageBlocks blocks{layout, g.npix, g.c, nk, idx.data_ptr<int64_t>(), dx};
    auto r = AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptir_rows_tasks_backward_cpu", [&] {
      return backward_impl<scalar_t>(dout, LNC, d, prm, sv, fwd, inv, need_dx, &blocks);
    });
    res.insert(res.end(), r.begin() + 1, r.end());
  }
  return res;
}

}  // namespace

void cpu_batch_norm_update(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                           const at::Tensor& mean, const at::Tensor& var, c10::optional<double> momentum) {
  const int64_t h = mean.numel();
  for (const at::Tensor* t : std::array<const at::Tensor*, 4>{&running_mean, &running_var, &mean, &var})
    TORCH_CHECK(t->device().is_cpu() && t->numel() == h && t->is_floating_point(),
                (t == &running_mean ? "running_mean" : t == &running_var ? "running_var" : t == &mean ? "mean" : "var"),
                ": expected a CPU floating-point tensor of ", h, " values (the batch mean's), got ", t->sizes(), " ",
                t->scalar_type(), " on ", t->device());
  TORCH_CHECK(num_batches_tracked.device().is_cpu() && num_batches_tracked.numel() == 1 &&
                  num_batches_tracked.scalar_type() == at::kLong,
              "num_batches_tracked: expected a CPU int64 tensor of one value, got ", num_batches_tracked.sizes(), " ",
              num_batches_tracked.scalar_type());
  at::NoGradGuard no_grad;
  num_batches_tracked.add_(1);
  const double m = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>());
  running_mean.lerp_(mean.view(running_mean.sizes()).to(running_mean.scalar_type()), m);
  running_var.lerp_(var.view(running_var.sizes()).to(running_var.scalar_type()), m);
}

namespace {

// The buffer cache as torch's CPU allocator while a scope is open (as
// moce_fast.ops._cuda.cpu_cache_installed): the buffers ATen makes inside the kernel's calls (the
// wide products' outputs through oneDNN's convolution, the FFTs') come from it too, their pages
// mapped already whatever glibc's mmap threshold is.
struct CacheScope {
  CacheScope() { install_cpu_cache(); }
  ~CacheScope() { uninstall_cpu_cache(); }
  CacheScope(const CacheScope&) = delete;
  CacheScope& operator=(const CacheScope&) = delete;
};

// A dtype as torch's Python names it ("torch.float16"), for the kernel's reasons.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

}  // namespace

std::string kernel_map_reason(const at::Tensor& x, int64_t layout, at::ScalarType dtype, int64_t c, int64_t& n,
                              int64_t& hh, int64_t& ww, bool batch_in_place) {
  check_layout_code(layout);
  static const char* const names[] = {"nchw", "lnc", "nhwc"};
  if (!x.defined()) return "x is undefined";
  if (!x.device().is_cpu()) return c10::str("x is on ", x.device(), ", the kernel runs on the CPU");
  if (x.scalar_type() != dtype)
    return c10::str("x is ", dtype_name(x.scalar_type()), ", the kernel's parameters ", dtype_name(dtype));
  const int64_t dims = layout == LNC ? 3 : 4;
  if (x.dim() != dims)
    return c10::str("x has ", x.dim(), " dimensions, layout '", names[layout], "' has ", dims);
  if (x.numel() == 0) return "x is empty";
  const int64_t xc = layout == NCHW ? x.size(1) : x.size(-1);
  if (xc != c) return c10::str("x has ", xc, " channels, the adapter ", c);
  if (layout == LNC) {  // (L, N, C), L = H W with H = W
    const int64_t l = x.size(0);
    n = x.size(1);
    hh = ww = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(l))));
    if (hh * ww != l) return c10::str("x's L = ", l, " is not a square");
  } else if (layout == NHWC) {
    n = x.size(0), hh = x.size(1), ww = x.size(2);
  } else {
    n = x.size(0), hh = x.size(2), ww = x.size(3);
  }
  const bool one_map = layout == NHWC || (layout == LNC && x.stride(0) == n * x.stride(1));
  if (n > 1 && !batch_in_place && !one_map)
    return c10::str(n, " images in layout '", names[layout],
                    "' (several images only in 'nhwc', or in 'lnc' with mergeable L and N axes)");
  return {};
}

std::string input_reason(const at::Tensor& x, int64_t layout, int64_t c, int64_t& n, int64_t& hh, int64_t& ww,
                         bool batch_in_place) {
  if (x.defined() && x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble)
    return c10::str("x is ", dtype_name(x.scalar_type()), ", the kernel runs float32 and float64");
  return kernel_map_reason(x, layout, x.defined() ? x.scalar_type() : at::kFloat, c, n, hh, ww, batch_in_place);
}

int params_check(const at::Tensor& x, at::TensorList params, bool training) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& q = params[i];
    if (q.scalar_type() != x.scalar_type() || q.device() != x.device() || !q.is_contiguous())
      return static_cast<int>(i);
  }
  if (!training && at::GradMode::is_enabled()) {
    bool records = x.requires_grad();
    for (const auto& q : params) records = records || q.requires_grad();
    if (records) return kParamsRecord;
  }
  return kParamsTaken;
}

int64_t row_limit(at::ScalarType dtype, int64_t c, int64_t hid, int64_t wide, int64_t narrow) {
  return narrow_kind(dtype, c, hid) && narrow_kind(dtype, hid, c) ? narrow : wide;
}

AdapterEvalPlan::AdapterEvalPlan(std::vector<at::Tensor> raw, std::vector<at::Tensor> params, int64_t layout,
                                 double eps, at::Tensor fwd, at::Tensor inv, int64_t hh, int64_t ww, int64_t s,
                                 int64_t dense_max_pixels)
    : params_(std::move(params)), layout_(layout), eps_(eps), fwd_(std::move(fwd)), inv_(std::move(inv)), hh_(hh),
      ww_(ww), s_(s), dense_max_pixels_(dense_max_pixels), inference_(c10::InferenceMode::is_enabled()) {
  check_layout_code(layout);
  TORCH_CHECK(static_cast<int64_t>(params_.size()) == NUM_PARAMS, "params: expected ", int(NUM_PARAMS),
              " tensors, got ", params_.size());
  TORCH_CHECK(dense_max_pixels >= 0, "dense_max_pixels: expected a pixel limit >= 0, got ", dense_max_pixels);
  dtype_ = params_[HEAD_W].scalar_type();
  hid_ = params_[HEAD_B].numel();
  TORCH_CHECK(hid_ > 0, "head_b: expected at least one hidden channel");
  c_ = params_[TAIL_W].numel() / hid_;
  // the checks of every call's parameters, once (the tables of a hh x ww map, or none)
  check_sizes(dtype_, layout, c_, hh, ww, 1, params_, fwd_, inv_, hh * (ww / 2 + 1), s);
  TORCH_CHECK(fwd_.numel() > 0 || hh * ww > dense_max_pixels,
              "fwd, inv: expected the DFT tables of a map of at most ", dense_max_pixels, " pixels, got none for ", hh,
              "x", ww);
  kept_.reserve(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    const auto& t = raw[i];
    TORCH_CHECK(t.defined() && t.has_storage() && !t.is_inference(), "raw: tensor ", i,
                " has no storage or version counter (an inference tensor): nothing can be kept for it");
    kept_.push_back({t, t.storage(), t.const_data_ptr(), t.sizes().vec(), t.scalar_type(), t._version()});
  }
}

bool AdapterEvalPlan::holds(const std::vector<at::Tensor>& raw, int64_t layout, double eps) const {
  if (layout != layout_ || eps != eps_ || raw.size() != kept_.size()) return false;
  for (size_t i = 0; i < raw.size(); ++i) {
    const at::Tensor& t = raw[i];
    const Kept& k = kept_[i];
    if (!t.defined() || t.unsafeGetTensorImpl() != k.tensor.unsafeGetTensorImpl() || !t.has_storage() ||
        t.storage().unsafeGetStorageImpl() != k.storage.unsafeGetStorageImpl() || t.const_data_ptr() != k.data ||
        t.scalar_type() != k.dtype || t.sizes() != at::IntArrayRef(k.sizes) || t.is_inference() ||
        t._version() != k.version)
      return false;
  }
  return true;
}

at::Tensor AdapterEvalPlan::run(const at::Tensor& x, const std::vector<at::Tensor>& raw, int64_t layout,
                                double eps, int64_t wide, int64_t narrow) const {
  if (!holds(raw, layout, eps) || c10::InferenceMode::is_enabled() != inference_) return {};
  if (at::GradMode::is_enabled()) {  // (the eval kernel records no autograd graph)
    if (x.requires_grad()) return {};
    for (const auto& t : raw)
      if (t.requires_grad()) return {};
  }
  int64_t n, hh, ww;
  if (!kernel_map(x, layout_, dtype_, c_, n, hh, ww) || n * hh * ww > row_limit(dtype_, c_, hid_, wide, narrow))
    return {};
  const bool dense = fwd_.numel() > 0;
  if (dense ? (hh != hh_ || ww != ww_) : hh * ww <= dense_max_pixels_) return {};
  const Dims d = check_sizes(dtype_, layout_, c_, hh, ww, n, params_, fwd_, inv_, hh * (ww / 2 + 1),
                             dense ? s_ : 0, &x);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  CacheScope cache;
  return AT_DISPATCH_FLOATING_TYPES(dtype_, "adapter_eval_plan", [&] {
    return forward_impl<scalar_t>(x, layout_, d, params_, fwd_, inv_, false, eps_)[0];
  });
}

// ------------------------------------------------------ the training call as a C++ autograd node
//
// The Python autograd.Function that used to record the kernel's training call cost ~65 us of apply
// and ~0.1 ms of backward dispatch per step at batch 1 on this project's 2-core CPU, a fifth of an
// IPT 16x16 step in a host's conditions; this node records the same saves and calls.

namespace {

struct TrainArgs {
  int64_t layout, hh, ww, n, nb, s;
  double eps;
  at::Tensor fwd, inv;
  at::Tensor task;  // several tasks' adapters on one batch: each image's task (N,); undefined: one task
};

// One task's adapter (adaptir_rows_cpu), or several tasks' on one batch (adaptir_rows_tasks_cpu,
// 24 parameters per task), in training.
struct AdapterCpuTrain : public torch::autograd::Function<AdapterCpuTrain> {
  // inputs: x, the parameters, the arguments (not a tensor: no gradient)
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                at::TensorList params, const TrainArgs& a) {
    const bool tasks = a.task.defined();
    std::vector<at::Tensor> res;
    {
      CacheScope cache;
      res = tasks ? adaptir_rows_tasks_cpu(x, a.layout, a.hh, a.ww, params, a.task, a.fwd, a.inv, a.nb, a.s, true,
                                           a.eps)
                  : adaptir_rows_cpu(x, a.layout, a.hh, a.ww, a.n, params, a.fwd, a.inv, a.nb, a.s, true, a.eps);
    }
    const size_t outputs = tasks ? 4 : 3;  // the output; mean, variance (and each task's row count)
    torch::autograd::variable_list keep{x};
    keep.insert(keep.end(), params.begin(), params.end());
    if (tasks) keep.push_back(a.task);
    ctx->save_for_backward(keep);  // (an in-place change of one before the backward is an error)
    ctx->saved_data["inter"] = std::vector<at::Tensor>(res.begin() + outputs, res.end());  // freed with the graph
    if (a.fwd.defined() && a.fwd.numel() > 0) ctx->saved_data["tables"] = std::vector<at::Tensor>{a.fwd, a.inv};
    ctx->saved_data["dims"] = std::vector<int64_t>{a.layout, a.hh, a.ww, a.n, a.nb, a.s, int64_t(tasks)};
    res.resize(outputs);
    ctx->mark_non_differentiable(torch::autograd::variable_list(res.begin() + 1, res.end()));
    ctx->set_materialize_grads(false);
    return res;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dims = ctx->saved_data["dims"].toIntVector();
    const bool tasks = dims[6] != 0;
    const std::vector<at::Tensor> params(saved.begin() + 1, saved.end() - (tasks ? 1 : 0));
    torch::autograd::variable_list res(2 + params.size());  // x, the parameters, the arguments
    const at::Tensor& dout = grads[0];
    if (!dout.defined()) return res;
    const auto inter = ctx->saved_data["inter"].toTensorVector();
    const bool need_dx = ctx->needs_input_grad(0);
    at::Tensor fwd, inv;  // (none: rfft2 / irfft2)
    if (ctx->saved_data.count("tables")) {
      const auto tables = ctx->saved_data["tables"].toTensorVector();
      fwd = tables[0], inv = tables[1];
    }
    std::vector<at::Tensor> g;
    {
      at::NoGradGuard no_grad;
      CacheScope cache;  // (its allocations too: see moce_fast.ops._cuda.cpu_cache_installed)
      // (dout as it comes: the several tasks' kernel reads each image's block in place, whatever its strides)
      g = tasks ? adaptir_rows_tasks_backward_cpu(dout, saved[0], dims[0], dims[1], dims[2], params, saved.back(),
                                                  inter, fwd, inv, dims[4], dims[5], need_dx)
                : adaptir_rows_backward_cpu(dout, saved[0], dims[0], dims[1], dims[2], dims[3], params, inter, fwd,
                                            inv, dims[4], dims[5], need_dx);
    }
    if (need_dx) res[0] = g[0];
    for (size_t i = 0; i < params.size(); ++i) res[1 + i] = g[1 + i];
    if (!at::GradMode::is_enabled()) return res;
    // a backward that records (create_graph, even where dout does not require grad: the gradients still
    // depend on x and the parameters): the gradients themselves are right, but differentiating
    // them again raises (as Python's @once_differentiable does), rather than giving zeros; the words are
    // moce_fast.ops.adapter.HIGHER_ORDER_ERROR's
    for (auto& t : res)
      if (t.defined()) {
        t = t.detach();
        t.set_requires_grad(true);
      }
    torch::autograd::DelayedError err(
        "the AdaptIR adapter's backward is once differentiable on every moce_fast backend (torch, cpu, triton), "
        "so its gradients cannot be differentiated again; for higher-order gradients compute the adapter with "
        "the reference math, AdaptIRAdapter.forward_nchw (moce_fast.reference.AdaptIR's plain torch ops, on "
        "(N, C, H, W) maps)",
        static_cast<int64_t>(res.size()));
    return err.apply(std::move(res));
  }
};

}  // namespace

std::vector<at::Tensor> rows_train(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, int64_t n,
                                   const std::vector<at::Tensor>& params, const at::Tensor& fwd,
                                   const at::Tensor& inv, int64_t nb, int64_t s, double eps, const at::Tensor& task) {
  return AdapterCpuTrain::apply(x, at::TensorList(params), TrainArgs{layout, hh, ww, n, nb, s, eps, fwd, inv, task});
}

at::Tensor train_call(const at::Tensor& x, const std::vector<at::Tensor>& raw, at::Tensor& num_batches_tracked,
                      int64_t layout, double eps, c10::optional<double> momentum, int64_t max_rows,
                      int64_t max_rows_narrow, int64_t dense_max_pixels) {
  TORCH_CHECK(raw.size() == NUM_PARAMS + 2, "raw: expected the adapter's ", NUM_PARAMS + 2, " stored tensors, got ",
              raw.size());
  check_layout_code(layout);
  if (c10::InferenceMode::is_enabled() || !x.defined()) return {};
  // raw: head w, b, BN w, b, running mean, var, then the 20 of the mix and the tail (AdapterParams' order)
  std::vector<at::Tensor> params(raw.begin(), raw.begin() + 4);
  params.insert(params.end(), raw.begin() + 6, raw.end());
  const int64_t hid = params[HEAD_B].numel();
  if (hid <= 0) return {};
  int64_t n, hh, ww;
  const int64_t c = params[TAIL_W].numel() / hid;
  if (!input_reason(x, layout, c, n, hh, ww).empty()) return {};
  const int64_t rows = n * hh * ww;
  if (rows < 2 || rows > row_limit(x.scalar_type(), c, hid, max_rows, max_rows_narrow) || hh * ww <= dense_max_pixels)
    return {};
  if (params_check(x, params, true) != kParamsTaken) return {};
  auto res = rows_train(x, layout, hh, ww, n, params, at::Tensor(), at::Tensor(), hh * (ww / 2 + 1), 0, eps, {});
  at::Tensor running_mean = raw[4], running_var = raw[5];
  cpu_batch_norm_update(running_mean, running_var, num_batches_tracked, res[1], res[2], momentum);
  return res[0];
}

TORCH_LIBRARY_IMPL(moce_fast, CPU, m) {
  m.impl("adaptir_rows", &adaptir_rows_cpu);
  m.impl("adaptir_rows_backward", &adaptir_rows_backward_cpu);
  m.impl("adaptir_rows_tasks", &adaptir_rows_tasks_cpu);
  m.impl("adaptir_rows_tasks_backward", &adaptir_rows_tasks_backward_cpu);
}

}  // namespace moce_fast

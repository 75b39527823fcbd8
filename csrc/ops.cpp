// Schemas of the moce_fast ops and their CPU implementations.
//
// The CPU implementations are plain loops (accumulating in float, or double for double). They
// define the semantics the CUDA kernels share and let the ops be tested, opcheck-ed and
// gradchecked on a machine without a GPU; on CPU the torch backend is usually the faster choice.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace moce_fast {

namespace {
bool g_poison = false;
}
bool poison_outputs() { return g_poison; }
void set_poison_outputs(bool on) { g_poison = on; }

// ---------------------------------------------------------------------------------------------
// Channel LayerNorm on (N, C, H, W): every pixel normalised over its C channels.

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                               const c10::optional<at::Tensor>& bias, double eps) {
  const bool has_bias = check_layer_norm_args(x, weight, bias);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty_like(x);
  auto mean = at::empty({n, x.size(2), x.size(3)}, x.options().dtype(acc_dtype));
  auto rstd = at::empty_like(mean);
  maybe_poison(y);
  maybe_poison(mean);
  maybe_poison(rstd);
  auto w = weight.contiguous();
  auto b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, n * hw, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t pix = begin; pix < end; ++pix) {
        const int64_t base = (pix / hw) * c * hw + pix % hw;
        acc_t mu = 0;
        for (int64_t ch = 0; ch < c; ++ch) mu += static_cast<acc_t>(xp[base + ch * hw]);
        mu /= c;
        acc_t var = 0;
        for (int64_t ch = 0; ch < c; ++ch) {
          const acc_t d = static_cast<acc_t>(xp[base + ch * hw]) - mu;
          var += d * d;
        }
        const acc_t rs = acc_t(1) / std::sqrt(var / c + static_cast<acc_t>(eps));
        mp[pix] = mu;
        rp[pix] = rs;
        for (int64_t ch = 0; ch < c; ++ch) {
          const acc_t v = static_cast<acc_t>(xp[base + ch * hw]);
          yp[base + ch * hw] = static_cast<scalar_t>(
              has_bias ? (v - mu) * rs * static_cast<acc_t>(wp[ch]) + static_cast<acc_t>(bp[ch])
                       : v * rs * static_cast<acc_t>(wp[ch]));
        }
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd,
                                                                        const at::Tensor& weight, bool has_bias) {
  check_layer_norm_args(x, weight, c10::nullopt);
  check_like(dy, x, "dy");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto dx = at::empty_like(x);
  maybe_poison(dx);
  auto acc_dtype = mean.scalar_type();
  auto dw_acc = at::zeros({c}, x.options().dtype(acc_dtype));
  auto db_acc = at::zeros({c}, x.options().dtype(acc_dtype));
  auto w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    acc_t* dwp = dw_acc.data_ptr<acc_t>();
    acc_t* dbp = db_acc.data_ptr<acc_t>();
    // Serial over pixels for the weight sums: deterministic and simple (this is the CPU path).
    for (int64_t pix = 0; pix < n * hw; ++pix) {
      const int64_t base = (pix / hw) * c * hw + pix % hw;
      const acc_t mu = mp[pix], rs = rp[pix];
      acc_t mean_g = 0, mean_gx = 0;
      for (int64_t ch = 0; ch < c; ++ch) {
        const acc_t g = static_cast<acc_t>(gp[base + ch * hw]) * static_cast<acc_t>(wp[ch]);
        const acc_t xv = static_cast<acc_t>(xp[base + ch * hw]);
        mean_g += g;
        mean_gx += g * (has_bias ? (xv - mu) * rs : xv);
      }
      mean_g /= c;
      mean_gx /= c;
      for (int64_t ch = 0; ch < c; ++ch) {
        const acc_t dyv = static_cast<acc_t>(gp[base + ch * hw]);
        const acc_t g = dyv * static_cast<acc_t>(wp[ch]);
        const acc_t xv = static_cast<acc_t>(xp[base + ch * hw]);
        const acc_t xhat = (xv - mu) * rs;
        acc_t d;
        if (has_bias) {
          d = rs * (g - mean_g - xhat * mean_gx);
          dwp[ch] += dyv * xhat;
          dbp[ch] += dyv;
        } else {
          // y = x * rs * w with rs = 1/sqrt(var + eps): d/dx_j = rs * g_j - rs^3 (x_j - mu) mean(g x)
          d = rs * g - rs * rs * rs * (xv - mu) * mean_gx;
          dwp[ch] += dyv * xv * rs;
        }
        dxp[base + ch * hw] = static_cast<scalar_t>(d);
      }
    }
  });
  return {dx, dw_acc.to(weight.scalar_type()), db_acc.to(weight.scalar_type())};  // db: zeros without bias
}

// ---------------------------------------------------------------------------------------------
// Grouped depthwise convolution: y[s] = bias + dwconv_KxK(x[index[s]]) for the sorted positions s
// of one expert, offsets[expert] <= s < offsets[expert + 1]. Zero padding, 'same' output size.
// Rows of y outside the expert's range are left unspecified (the caller reads only its rows).

template <typename scalar_t, typename acc_t>
void dwconv_rows_cpu(const scalar_t* in, const scalar_t* w, const scalar_t* bias, scalar_t* out, int64_t h,
                     int64_t wd, int64_t k) {
  const int64_t r = k / 2;
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t xq = 0; xq < wd; ++xq) {
      acc_t acc = bias ? static_cast<acc_t>(*bias) : acc_t(0);
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t iy = y + ky - r;
        if (iy < 0 || iy >= h) continue;
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t ix = xq + kx - r;
          if (ix < 0 || ix >= wd) continue;
          acc += static_cast<acc_t>(w[ky * k + kx]) * static_cast<acc_t>(in[iy * wd + ix]);
        }
      }
      out[y * wd + xq] = static_cast<scalar_t>(acc);
    }
  }
}

at::Tensor grouped_dwconv_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets,
                              int64_t expert, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_grouped_args(x, index, offsets, expert, weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t c = x.size(1), h = x.size(2), wd = x.size(3), k = weight.size(2);
  auto y = at::empty({index.size(0), c, h, wd}, x.options());
  maybe_poison(y);
  const int64_t lo = offsets[expert].item<int64_t>(), hi = offsets[expert + 1].item<int64_t>();
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= index.size(0), "offsets: expert range [", lo, ", ", hi,
              ") does not fit index of length ", index.size(0));
  auto w = weight.contiguous();
  auto b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t s = lo; s < hi; ++s)
    TORCH_CHECK(ip[s] >= 0 && ip[s] < x.size(0), "index: entry ", s, " = ", ip[s], " is not an image of x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_dwconv_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, (hi - lo) * c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t s = lo + job / c, ch = job % c;
        dwconv_rows_cpu<scalar_t, acc_t>(xp + (ip[s] * c + ch) * h * wd, wp + ch * k * k, bp ? bp + ch : nullptr,
                                         yp + (s * c + ch) * h * wd, h, wd, k);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets, int64_t expert,
    const at::Tensor& weight, bool bias_grad) {
  check_grouped_args(x, index, offsets, expert, weight);
  check_grouped_grad(dy, x, index);
  const int64_t c = x.size(1), h = x.size(2), wd = x.size(3), k = weight.size(2), r = k / 2;
  const int64_t lo = offsets[expert].item<int64_t>(), hi = offsets[expert + 1].item<int64_t>();
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= index.size(0), "offsets: expert range does not fit index");
  auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dx = at::zeros_like(x);  // images outside the expert's range get no gradient
  auto dw_acc = at::zeros({c, k * k}, x.options().dtype(acc_dtype));
  auto db_acc = at::zeros({c}, x.options().dtype(acc_dtype));
  // Correlation with the flipped kernel is the transpose of the 'same' convolution.
  auto w_flip = weight.flip({2, 3}).contiguous();
  const int64_t* ip = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_dwconv_backward_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const scalar_t* wfp = w_flip.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    acc_t* dwp = dw_acc.data_ptr<acc_t>();
    acc_t* dbp = db_acc.data_ptr<acc_t>();
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        for (int64_t s = lo; s < hi; ++s) {
          const scalar_t* g = gp + (s * c + ch) * h * wd;
          const scalar_t* in = xp + (ip[s] * c + ch) * h * wd;
          dwconv_rows_cpu<scalar_t, acc_t>(g, wfp + ch * k * k, nullptr, dxp + (ip[s] * c + ch) * h * wd, h, wd, k);
          for (int64_t ky = 0; ky < k; ++ky)
            for (int64_t kx = 0; kx < k; ++kx) {
              acc_t acc = 0;
              for (int64_t yy = 0; yy < h; ++yy) {
                const int64_t iy = yy + ky - r;
                if (iy < 0 || iy >= h) continue;
                for (int64_t xx = 0; xx < wd; ++xx) {
                  const int64_t ix = xx + kx - r;
                  if (ix < 0 || ix >= wd) continue;
                  acc += static_cast<acc_t>(g[yy * wd + xx]) * static_cast<acc_t>(in[iy * wd + ix]);
                }
              }
              dwp[ch * k * k + ky * k + kx] += acc;
            }
          if (bias_grad) {
            acc_t acc = 0;
            for (int64_t i = 0; i < h * wd; ++i) acc += static_cast<acc_t>(g[i]);
            dbp[ch] += acc;
          }
        }
      }
    });
  });
  return {dx, dw_acc.view({c, 1, k, k}).to(weight.scalar_type()), db_acc.to(weight.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Routing plan: softmax over E logits per image, top-k (ties to the lower expert), and the
// (image, slot) pairs sorted by expert (stable), with per-expert counts and offsets.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_cpu(
    const at::Tensor& logits, int64_t k) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D (B, E) tensor, got ", logits.dim(), "-D");
  TORCH_CHECK(logits.is_floating_point(), "logits: expected a floating dtype, got ", logits.scalar_type());
  const int64_t b = logits.size(0), e = logits.size(1);
  TORCH_CHECK(e >= 1 && e <= 64, "logits: expected 1 <= E <= 64 experts, got ", e);
  TORCH_CHECK(k >= 1 && k <= e, "k: expected 1 <= k <= E = ", e, ", got ", k);
  auto lg = logits.contiguous().to(at::kDouble);
  auto opts_l = logits.options().dtype(at::kLong);
  auto indices = at::empty({b, k}, opts_l), order = at::empty({b * k}, opts_l), image = at::empty({b * k}, opts_l);
  auto counts = at::zeros({e}, opts_l), offsets = at::empty({e + 1}, opts_l);
  auto gates_d = at::empty({b, k}, lg.options()), gate_sorted_d = at::empty({b * k}, lg.options());
  const double* lp = lg.data_ptr<double>();
  int64_t* idx = indices.data_ptr<int64_t>();
  double* gp = gates_d.data_ptr<double>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  std::vector<double> prob(e);
  std::vector<char> taken(e);
  for (int64_t i = 0; i < b; ++i) {
    double mx = lp[i * e];
    for (int64_t j = 1; j < e; ++j) mx = std::max(mx, lp[i * e + j]);
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) sum += (prob[j] = std::exp(lp[i * e + j] - mx));
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t t = 0; t < k; ++t) {
      int64_t best = -1;
      for (int64_t j = 0; j < e; ++j)
        if (!taken[j] && (best < 0 || prob[j] > prob[best])) best = j;
      taken[best] = 1;
      idx[i * k + t] = best;
      gp[i * k + t] = prob[best] / sum;
      ++cnt[best];
    }
  }
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t j = 0; j < e; ++j) off[j + 1] = off[j] + cnt[j];
  std::vector<int64_t> next(off, off + e);
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* imp = image.data_ptr<int64_t>();
  double* gsp = gate_sorted_d.data_ptr<double>();
  for (int64_t p = 0; p < b * k; ++p) {
    const int64_t pos = next[idx[p]]++;
    op[pos] = p;
    imp[pos] = p / k;
    gsp[pos] = gp[p];
  }
  return {indices, gates_d.to(logits.scalar_type()), order, image, gate_sorted_d.to(logits.scalar_type()), counts,
          offsets};
}

}  // namespace moce_fast

TORCH_LIBRARY(moce_fast, m) {
  m.def("channel_layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "channel_layer_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("grouped_dwconv(Tensor x, Tensor index, Tensor offsets, int expert, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "grouped_dwconv_backward(Tensor dy, Tensor x, Tensor index, Tensor offsets, int expert, Tensor weight,"
      " bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("routing_plan(Tensor logits, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The whole AdaptIR adapter of one task on a small map (CPU only: csrc/adapter_cpu.cpp).
  m.def(
      "adaptir_rows(Tensor x, int layout, int hh, int ww, int n, Tensor[] params, Tensor fwd, Tensor inv, int nb,"
      " int s, bool training, float eps) -> Tensor[]");
  m.def(
      "adaptir_rows_backward(Tensor dout, Tensor x, int layout, int hh, int ww, int n, Tensor[] params,"
      " Tensor[] saved, Tensor fwd, Tensor inv, int nb, int s, bool need_dx) -> Tensor[]");
  // The same for several tasks in one batch (task[i]: the task of image i; params: 24 per task).
  m.def(
      "adaptir_rows_tasks(Tensor x, int layout, int hh, int ww, Tensor[] params, Tensor task, Tensor fwd,"
      " Tensor inv, int nb, int s, bool training, float eps) -> Tensor[]");
  m.def(
      "adaptir_rows_tasks_backward(Tensor dout, Tensor x, int layout, int hh, int ww, Tensor[] params,"
      " Tensor task, Tensor[] saved, Tensor fwd, Tensor inv, int nb, int s, bool need_dx) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(moce_fast, CPU, m) {
  m.impl("channel_layer_norm", &moce_fast::layer_norm_cpu);
  m.impl("channel_layer_norm_backward", &moce_fast::layer_norm_backward_cpu);
  m.impl("grouped_dwconv", &moce_fast::grouped_dwconv_cpu);
  m.impl("grouped_dwconv_backward", &moce_fast::grouped_dwconv_backward_cpu);
  m.impl("routing_plan", &moce_fast::routing_plan_cpu);
}

// Channel LayerNorm on NCHW without permutes.
//
// One thread per pixel walks the C channels of its pixel: consecutive threads read consecutive
// pixels of one channel plane, so every load and store is coalesced, and no transpose is needed.
// Forward: one pass for the statistics (Welford), one for the output. Backward: dx in the same
// per-pixel pattern; dweight/dbias per block, reduced over the block's warps in a fixed order
// (deterministic), then over blocks by a sum.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"

namespace moce_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename acc_t>
__global__ void ln_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  const scalar_t* __restrict__ b, scalar_t* __restrict__ y, acc_t* __restrict__ mean,
                                  acc_t* __restrict__ rstd, int64_t npix, int64_t c, int64_t hw, acc_t eps) {
  const int64_t pix = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (pix >= npix) return;
  const int64_t base = (pix / hw) * c * hw + pix % hw;
  acc_t mu = 0, m2 = 0;
  for (int64_t ch = 0; ch < c; ++ch) {  // Welford: one read for both moments
    const acc_t v = static_cast<acc_t>(x[base + ch * hw]);
    const acc_t d = v - mu;
    mu += d / static_cast<acc_t>(ch + 1);
    m2 += d * (v - mu);
  }
  const acc_t rs = acc_t(1) / sqrt(m2 / static_cast<acc_t>(c) + eps);
  mean[pix] = mu;
  rstd[pix] = rs;
  for (int64_t ch = 0; ch < c; ++ch) {
    const acc_t v = static_cast<acc_t>(x[base + ch * hw]);
    const acc_t wv = static_cast<acc_t>(w[ch]);
    y[base + ch * hw] = static_cast<scalar_t>(b ? (v - mu) * rs * wv + static_cast<acc_t>(b[ch]) : v * rs * wv);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// dx per pixel; per-block partial sums of dweight and dbias in partial[block][2][c].
template <typename scalar_t, typename acc_t>
__global__ void ln_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                   const scalar_t* __restrict__ w, bool has_bias, scalar_t* __restrict__ dx,
                                   acc_t* __restrict__ partial, int64_t npix, int64_t c, int64_t hw) {
  __shared__ acc_t warp_acc[kWarps][2];
  const int64_t pix = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const bool active = pix < npix;
  const int64_t base = active ? (pix / hw) * c * hw + pix % hw : 0;
  const acc_t mu = active ? mean[pix] : acc_t(0);
  const acc_t rs = active ? rstd[pix] : acc_t(0);
  acc_t mean_g = 0, mean_gx = 0;
  if (active) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const acc_t g = static_cast<acc_t>(dy[base + ch * hw]) * static_cast<acc_t>(w[ch]);
      const acc_t xv = static_cast<acc_t>(x[base + ch * hw]);
      mean_g += g;
      mean_gx += g * (has_bias ? (xv - mu) * rs : xv);
    }
    mean_g /= static_cast<acc_t>(c);
    mean_gx /= static_cast<acc_t>(c);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t* out = partial + static_cast<int64_t>(blockIdx.x) * 2 * c;
  for (int64_t ch = 0; ch < c; ++ch) {
    acc_t dw_term = 0, db_term = 0;
    if (active) {
      const acc_t dyv = static_cast<acc_t>(dy[base + ch * hw]);
      const acc_t g = dyv * static_cast<acc_t>(w[ch]);
      const acc_t xv = static_cast<acc_t>(x[base + ch * hw]);
      const acc_t xhat = (xv - mu) * rs;
      acc_t d;
      if (has_bias) {
        d = rs * (g - mean_g - xhat * mean_gx);
        dw_term = dyv * xhat;
        db_term = dyv;
      } else {
        d = rs * g - rs * rs * rs * (xv - mu) * mean_gx;
        dw_term = dyv * xv * rs;
      }
      dx[base + ch * hw] = static_cast<scalar_t>(d);
    }
    dw_term = warp_sum(dw_term);
    db_term = warp_sum(db_term);
    if (lane == 0) {
      warp_acc[warp][0] = dw_term;
      warp_acc[warp][1] = db_term;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t sw = 0, sb = 0;
      for (int i = 0; i < kWarps; ++i) {  // fixed order: deterministic
        sw += warp_acc[i][0];
        sb += warp_acc[i][1];
      }
      out[ch] = sw;
      out[c + ch] = sb;
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                const c10::optional<at::Tensor>& bias, double eps) {
  const bool has_bias = check_layer_norm_args(x, weight, bias);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), npix = n * hw;
  c10::cuda::CUDAGuard guard(x.device());
  auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto y = at::empty_like(x);
  auto mean = at::empty({n, x.size(2), x.size(3)}, x.options().dtype(acc_dtype));
  auto rstd = at::empty_like(mean);
  maybe_poison(y);
  maybe_poison(mean);
  maybe_poison(rstd);
  if (npix == 0) return {y, mean, rstd};
  auto w = weight.contiguous();
  auto b = has_bias ? bias->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (npix + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    ln_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), npix, c, hw,
        static_cast<acc_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                                         const at::Tensor& mean,
                                                                         const at::Tensor& rstd,
                                                                         const at::Tensor& weight, bool has_bias) {
  check_layer_norm_args(x, weight, c10::nullopt);
  check_like(dy, x, "dy");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3), npix = n * hw;
  auto dx = at::empty_like(x);
  maybe_poison(dx);
  const int64_t blocks = std::max<int64_t>((npix + kThreads - 1) / kThreads, 1);
  auto partial = at::zeros({blocks, 2, c}, x.options().dtype(mean.scalar_type()));
  auto w = weight.contiguous();
  if (npix > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward_cuda", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      ln_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
          w.data_ptr<scalar_t>(), has_bias, dx.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), npix, c, hw);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sums = partial.sum(0);  // (2, c)
  return {dx, sums[0].to(weight.scalar_type()), sums[1].to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(moce_fast, CUDA, m) {
  m.impl("channel_layer_norm", &layer_norm_cuda);
  m.impl("channel_layer_norm_backward", &layer_norm_backward_cuda);
}

}  // namespace moce_fast

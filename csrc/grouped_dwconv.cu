// Grouped depthwise convolution over the images routed to one expert.
//
// y[s] = bias + dwconv_KxK(x[index[s]]) for the sorted positions s of expert e, i.e.
// offsets[e] <= s < offsets[e + 1], read on the device: the grid is sized for every position and
// the blocks of positions outside the expert's range exit at once (no host sync, graph-safe; an
// expert with no image costs an empty launch). Zero padding, 'same' output. Each block stages a
// 32 x 16 output tile plus its halo in shared memory; each thread computes two outputs.
// Backward: dx by the same kernel with the flipped kernel, reading dy by position and writing
// dx[index[s]]; dweight and dbias from per-block partial sums (fixed-order, deterministic).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"

namespace moce_fast {
namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 16;
constexpr int kThreadsY = 8;  // block (32, 8): each thread computes kTileH / kThreadsY = 2 rows
constexpr int kRowsPerThread = kTileH / kThreadsY;
constexpr int kWgradTileBlocks = 16;  // blocks per (position, channel) in the weight gradient

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileW* kThreadsY)
    dwconv_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ in_index,
                  const int64_t* __restrict__ offsets, int64_t expert, const scalar_t* __restrict__ w,
                  const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const int64_t* __restrict__ out_index,
                  int64_t c, int64_t h, int64_t wd, int tiles_w) {
  constexpr int R = K / 2;
  constexpr int SH = kTileH + K - 1, SW = kTileW + K - 1;
  __shared__ acc_t tile[SH][SW];
  const int64_t s = blockIdx.z;
  if (s < offsets[expert] || s >= offsets[expert + 1]) return;  // uniform per block
  const int64_t ch = blockIdx.y;
  const int ty0 = (blockIdx.x / tiles_w) * kTileH, tx0 = (blockIdx.x % tiles_w) * kTileW;
  const int64_t in_row = in_index ? in_index[s] : s;
  const int64_t out_row = out_index ? out_index[s] : s;
  const scalar_t* in = x + (in_row * c + ch) * h * wd;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  for (int i = tid; i < SH * SW; i += kTileW * kThreadsY) {
    const int r = i / SW, q = i % SW;
    const int64_t gy = ty0 + r - R, gx = tx0 + q - R;
    tile[r][q] = (gy >= 0 && gy < h && gx >= 0 && gx < wd) ? static_cast<acc_t>(in[gy * wd + gx]) : acc_t(0);
  }
  acc_t wr[K * K];
#pragma unroll
  for (int i = 0; i < K * K; ++i) wr[i] = static_cast<acc_t>(w[ch * K * K + i]);
  const acc_t b = bias ? static_cast<acc_t>(bias[ch]) : acc_t(0);
  __syncthreads();
  scalar_t* out = y + (out_row * c + ch) * h * wd;
#pragma unroll
  for (int rr = 0; rr < kRowsPerThread; ++rr) {
    const int ly = threadIdx.y + rr * kThreadsY;
    const int64_t oy = ty0 + ly, ox = tx0 + threadIdx.x;
    if (oy < h && ox < wd) {
      acc_t acc = b;
#pragma unroll
      for (int ky = 0; ky < K; ++ky)
#pragma unroll
        for (int kx = 0; kx < K; ++kx) acc += wr[ky * K + kx] * tile[ly + ky][threadIdx.x + kx];
      out[oy * wd + ox] = static_cast<scalar_t>(acc);
    }
  }
}

// partial[s][blockIdx.x][ch][0 .. K*K-1] = sum over this block's tiles of dy * shifted x,
// partial[...][K*K] = sum of dy. Blocks of positions outside the range write zeros.
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileW* kThreadsY)
    dwconv_wgrad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                        const int64_t* __restrict__ index, const int64_t* __restrict__ offsets, int64_t expert,
                        acc_t* __restrict__ partial, int64_t c, int64_t h, int64_t wd, int tiles_w, int n_tiles) {
  constexpr int R = K / 2;
  constexpr int SH = kTileH + K - 1, SW = kTileW + K - 1;
  __shared__ acc_t xt[SH][SW];
  __shared__ acc_t gt[kTileH][kTileW];
  const int64_t s = blockIdx.z, ch = blockIdx.y;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  acc_t* out = partial + ((s * gridDim.x + blockIdx.x) * c + ch) * (K * K + 1);
  if (s < offsets[expert] || s >= offsets[expert + 1]) {
    for (int i = tid; i < K * K + 1; i += kTileW * kThreadsY) out[i] = acc_t(0);
    return;
  }
  const scalar_t* in = x + (index[s] * c + ch) * h * wd;
  const scalar_t* g = dy + (s * c + ch) * h * wd;
  acc_t acc = 0;  // thread tid < K*K owns tap tid; thread K*K owns the bias sum
  for (int t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    const int ty0 = (t / tiles_w) * kTileH, tx0 = (t % tiles_w) * kTileW;
    __syncthreads();  // the previous tile is no longer read
    for (int i = tid; i < SH * SW; i += kTileW * kThreadsY) {
      const int r = i / SW, q = i % SW;
      const int64_t gy = ty0 + r - R, gx = tx0 + q - R;
      xt[r][q] = (gy >= 0 && gy < h && gx >= 0 && gx < wd) ? static_cast<acc_t>(in[gy * wd + gx]) : acc_t(0);
    }
    for (int i = tid; i < kTileH * kTileW; i += kTileW * kThreadsY) {
      const int r = i / kTileW, q = i % kTileW;
      const int64_t gy = ty0 + r, gx = tx0 + q;
      gt[r][q] = (gy < h && gx < wd) ? static_cast<acc_t>(g[gy * wd + gx]) : acc_t(0);
    }
    __syncthreads();
    if (tid < K * K) {
      const int ky = tid / K, kx = tid % K;
      for (int r = 0; r < kTileH; ++r)
        for (int q = 0; q < kTileW; ++q) acc += gt[r][q] * xt[r + ky][q + kx];
    } else if (tid == K * K) {
      for (int r = 0; r < kTileH; ++r)
        for (int q = 0; q < kTileW; ++q) acc += gt[r][q];
    }
  }
  if (tid <= K * K) out[tid] = acc;
}

void check_grouped_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets, int64_t expert,
                        const at::Tensor& weight) {
  check_grouped_args(x, index, offsets, expert, weight);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor");
  TORCH_CHECK(index.size(0) <= 65535 && x.size(1) <= 65535, "grouped_dwconv: at most 65535 positions and channels");
}

#define MOCE_DISPATCH_K(k, ...)                                      \
  switch (k) {                                                       \
    case 3: {                                                        \
      constexpr int K = 3;                                           \
      __VA_ARGS__();                                                 \
      break;                                                         \
    }                                                                \
    case 5: {                                                        \
      constexpr int K = 5;                                           \
      __VA_ARGS__();                                                 \
      break;                                                         \
    }                                                                \
    default: {                                                       \
      constexpr int K = 7;                                           \
      __VA_ARGS__();                                                 \
    }                                                                \
  }

at::Tensor grouped_dwconv_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets,
                               int64_t expert, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_grouped_cuda(x, index, offsets, expert, weight);
  const bool has_bias = bias.has_value() && bias->defined();
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t p = index.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), k = weight.size(2);
  auto y = at::empty({p, c, h, wd}, x.options());
  maybe_poison(y);
  if (p == 0 || c == 0 || h == 0 || wd == 0) return y;
  auto w = weight.contiguous();
  auto b = has_bias ? bias->contiguous() : at::Tensor();
  const int tiles_w = static_cast<int>((wd + kTileW - 1) / kTileW);
  const int tiles_h = static_cast<int>((h + kTileH - 1) / kTileH);
  const dim3 grid(tiles_w * tiles_h, static_cast<unsigned>(c), static_cast<unsigned>(p));
  const dim3 block(kTileW, kThreadsY);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_dwconv_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    MOCE_DISPATCH_K(k, [&] {
      dwconv_kernel<scalar_t, acc_t, K><<<grid, block, 0, stream>>>(
          x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), expert,
          w.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), nullptr, c,
          h, wd, tiles_w);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets, int64_t expert,
    const at::Tensor& weight, bool bias_grad) {
  check_grouped_cuda(x, index, offsets, expert, weight);
  check_grouped_grad(dy, x, index);
  const int64_t p = index.size(0), c = x.size(1), h = x.size(2), wd = x.size(3), k = weight.size(2);
  c10::cuda::CUDAGuard guard(x.device());
  auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dx = at::zeros_like(x);  // images outside the expert's range get no gradient
  const int tiles_w = static_cast<int>((wd + kTileW - 1) / kTileW);
  const int tiles_h = static_cast<int>((h + kTileH - 1) / kTileH);
  const int n_tiles = tiles_w * tiles_h;
  const int wblocks = std::max(1, std::min(n_tiles, kWgradTileBlocks));
  auto partial = at::empty({std::max<int64_t>(p, 1), wblocks, c, k * k + 1}, x.options().dtype(acc_dtype));
  if (p == 0 || c == 0 || h == 0 || wd == 0) {
    partial.zero_();
  } else {
    auto w_flip = weight.flip({2, 3}).contiguous();
    const dim3 block(kTileW, kThreadsY);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_dwconv_backward_cuda", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      MOCE_DISPATCH_K(k, [&] {
        dwconv_kernel<scalar_t, acc_t, K><<<dim3(n_tiles, c, p), block, 0, stream>>>(
            dy.data_ptr<scalar_t>(), nullptr, offsets.data_ptr<int64_t>(), expert, w_flip.data_ptr<scalar_t>(),
            nullptr, dx.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), c, h, wd, tiles_w);
        dwconv_wgrad_kernel<scalar_t, acc_t, K><<<dim3(wblocks, c, p), block, 0, stream>>>(
            dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
            expert, partial.data_ptr<acc_t>(), c, h, wd, tiles_w, n_tiles);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto sums = partial.sum(at::IntArrayRef{0, 1});  // (c, k*k + 1)
  auto dw = sums.narrow(1, 0, k * k).reshape({c, 1, k, k}).to(weight.scalar_type());
  auto db = bias_grad ? sums.select(1, k * k).to(weight.scalar_type()) : at::zeros({c}, weight.options());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(moce_fast, CUDA, m) {
  m.impl("grouped_dwconv", &grouped_dwconv_cuda);
  m.impl("grouped_dwconv_backward", &grouped_dwconv_backward_cuda);
}

}  // namespace moce_fast

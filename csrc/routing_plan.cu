// The routing plan in one launch: per image, softmax over the E logits and top-k (ties to the
// lower expert); then the (image, slot) pairs sorted by expert, stable, with per-expert counts
// and offsets. One block: B*k pairs are few (a batch of images), and one block needs no grid-wide
// synchronisation. Same outputs and format as moce_fast.routing.make_plan; no host sync.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"

namespace moce_fast {
namespace {

constexpr int kMaxExperts = 64;
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    routing_plan_kernel(const scalar_t* __restrict__ logits, int64_t b, int e, int k, int64_t* __restrict__ indices,
                        scalar_t* __restrict__ gates, int64_t* __restrict__ order, int64_t* __restrict__ image,
                        scalar_t* __restrict__ gate_sorted, int64_t* __restrict__ counts,
                        int64_t* __restrict__ offsets) {
  __shared__ int count_s[kMaxExperts];
  __shared__ int64_t base_s[kMaxExperts];
  __shared__ int warp_total[kThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int i = tid; i < e; i += kThreads) count_s[i] = 0;
  __syncthreads();
  for (int64_t img = tid; img < b; img += kThreads) {
    const scalar_t* row = logits + img * e;
    float mx = static_cast<float>(row[0]);
    for (int j = 1; j < e; ++j) mx = fmaxf(mx, static_cast<float>(row[j]));
    float sum = 0.f;
    for (int j = 0; j < e; ++j) sum += __expf(static_cast<float>(row[j]) - mx);
    uint64_t taken = 0;
    for (int t = 0; t < k; ++t) {
      int best = -1;
      float best_v = 0.f;
      for (int j = 0; j < e; ++j) {
        if ((taken >> j) & 1ull) continue;
        const float v = static_cast<float>(row[j]);  // softmax is monotone: rank by logit
        if (best < 0 || v > best_v) {
          best = j;
          best_v = v;
        }
      }
      taken |= 1ull << best;
      indices[img * k + t] = best;
      gates[img * k + t] = static_cast<scalar_t>(__expf(best_v - mx) / sum);
      atomicAdd(&count_s[best], 1);
    }
  }
  __syncthreads();  // also makes this block's global writes above visible to all its threads
  if (tid == 0) {
    int64_t off = 0;
    for (int j = 0; j < e; ++j) {
      offsets[j] = off;
      counts[j] = count_s[j];
      base_s[j] = off;
      off += count_s[j];
    }
    offsets[e] = off;
  }
  __syncthreads();
  const int64_t pairs = b * k;
  for (int64_t start = 0; start < pairs; start += kThreads) {
    const int64_t p = start + tid;
    const int64_t ex = p < pairs ? indices[p] : -1;
    for (int j = 0; j < e; ++j) {
      const bool flag = ex == j;
      const unsigned mask = __ballot_sync(0xffffffffu, flag);
      if (lane == 0) warp_total[warp] = __popc(mask);
      __syncthreads();
      int before = 0;
      for (int w = 0; w < warp; ++w) before += warp_total[w];
      if (flag) {
        const int64_t pos = base_s[j] + before + __popc(mask & ((1u << lane) - 1u));
        order[pos] = p;
        image[pos] = p / k;
        gate_sorted[pos] = gates[p];
      }
      __syncthreads();
      if (tid == 0) {
        int total = 0;
        for (int w = 0; w < kThreads / 32; ++w) total += warp_total[w];
        base_s[j] += total;
      }
      __syncthreads();
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routing_plan_cuda(
    const at::Tensor& logits_in, int64_t k) {
  TORCH_CHECK(logits_in.dim() == 2, "logits: expected a 2-D (B, E) tensor, got ", logits_in.dim(), "-D");
  TORCH_CHECK(logits_in.is_floating_point(), "logits: expected a floating dtype, got ", logits_in.scalar_type());
  const int64_t b = logits_in.size(0), e = logits_in.size(1);
  TORCH_CHECK(e >= 1 && e <= kMaxExperts, "logits: expected 1 <= E <= ", kMaxExperts, " experts, got ", e);
  TORCH_CHECK(k >= 1 && k <= e, "k: expected 1 <= k <= E = ", e, ", got ", k);
  c10::cuda::CUDAGuard guard(logits_in.device());
  auto logits = logits_in.contiguous();
  auto ol = logits.options().dtype(at::kLong);
  auto indices = at::empty({b, k}, ol), order = at::empty({b * k}, ol), image = at::empty({b * k}, ol);
  auto counts = at::empty({e}, ol), offsets = at::empty({e + 1}, ol);
  auto gates = at::empty({b, k}, logits.options()), gate_sorted = at::empty({b * k}, logits.options());
  maybe_poison(gates);
  maybe_poison(gate_sorted);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "routing_plan_cuda", [&] {
    routing_plan_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), b, static_cast<int>(e), static_cast<int>(k), indices.data_ptr<int64_t>(),
        gates.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), image.data_ptr<int64_t>(),
        gate_sorted.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, gates, order, image, gate_sorted, counts, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moce_fast, CUDA, m) { m.impl("routing_plan", &routing_plan_cuda); }

}  // namespace moce_fast

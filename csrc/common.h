// Shared helpers of the moce_fast CUDA C++ extension.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define MOCE_HD __host__ __device__ __forceinline__
#else
#define MOCE_HD inline
#endif

namespace moce_fast {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Debug switch (tests): fill every output with NaN before the kernels run, so an element a
// kernel forgets to write shows up. Set from Python with moce_fast._C.set_poison_outputs(True).
bool poison_outputs();
void set_poison_outputs(bool on);

// A cache of large CPU buffers (csrc/cpu_cache.cpp): cached_empty gives an uninitialised CPU
// tensor whose storage of 1 MiB or more is taken from, and given back to, a cache of idle blocks of
// the same size (their pages stay mapped: no page fault per 4 KiB on each step's fresh buffer).
struct CpuCacheInfo {
  size_t idle_bytes, limit_bytes;
  int64_t hits, misses;
  size_t idle_blocks;
};
at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options);
void set_cpu_cache_limit(int64_t bytes);
void empty_cpu_cache();
CpuCacheInfo cpu_cache_info();
// Makes the cache torch's CPU allocator (every CPU tensor torch allocates then takes its blocks of
// 1 MiB or more from it) until the matching uninstall; nested installs count.
void install_cpu_cache();
void uninstall_cpu_cache();
int64_t cpu_cache_install_depth();

// The values per chunk of the CPU adapter kernel's parallel loops (csrc/adapter_cpu.cpp; 8192);
// tests set a few to run many uneven chunks on small maps. Returns the previous value.
int64_t cpu_chunk_values();
int64_t set_cpu_chunk_values(int64_t values);

// The CPU products with a narrow side (csrc/cpu_narrow.cpp): out (R, M) = rows (R, K) @ w^T + bias
// for float32 rows of contiguous values (any row stride) where M <= kNarrowWidth < K ("narrow_out",
// needs AVX2 + FMA) or K <= kNarrowWidth < M ("narrow_in", needs AVX-512F). narrow_product_kind says which applies on this CPU (nullptr: none), and
// narrow_kind the same for any rows of that dtype and width K times a w of M outputs;
// narrow_rows_times writes out ((R, M), rows of contiguous values) and returns it. cpu_isa: the ISA
// they use, "avx512", "avx2" or "none", at most the cap set_cpu_isa_cap sets (tests; returns the
// previous cap).
// Whether t (R, K) is rows of K contiguous values, any (non-overlapping) distance apart: what the
// narrow products read and write.
inline bool unit_rows(const at::Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= t.size(1); }
constexpr int64_t kNarrowWidth = 32;
const char* narrow_kind(at::ScalarType dtype, int64_t k, int64_t m);
const char* narrow_product_kind(const at::Tensor& rows, const at::Tensor& w);
at::Tensor narrow_rows_times(const at::Tensor& rows, const at::Tensor& w, const at::Tensor& bias, at::Tensor out);
// The weight gradients' products a^T b (p, q) over the R rows of float32 a (R, p) and b (R, q), both rows of
// contiguous values, one of p and q at most kNarrowWidth and the other wider, with AVX-512F:
// narrow_t_takes says whether narrow_t_product takes them; it returns a new (p, q) tensor.
bool narrow_t_takes(const at::Tensor& a, const at::Tensor& b);
at::Tensor narrow_t_product(const at::Tensor& a, const at::Tensor& b);
std::string cpu_isa();
std::string set_cpu_isa_cap(const std::string& name);

// BatchNorm's running-statistics update after a training step of the CPU adapter kernel, as
// nn.BatchNorm2d makes it: num_batches_tracked + 1, then each running statistic moved toward the
// batch's by the momentum, or by 1 / num_batches_tracked where momentum is None (a cumulative
// average); outside autograd (csrc/adapter_cpu.cpp).
void cpu_batch_norm_update(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                           const at::Tensor& mean, const at::Tensor& var, c10::optional<double> momentum);

inline void maybe_poison(at::Tensor& t) {
  if (poison_outputs() && t.is_floating_point() && t.numel() > 0) t.fill_(NAN);
}

inline void check_float_nchw(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              name, ": expected float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, ": expected a contiguous (NCHW) tensor");
}

// Depthwise kernel sizes the grouped convolution is compiled for.
inline bool supported_kernel_size(int64_t k) { return k == 3 || k == 5 || k == 7; }

// Argument checks shared by the CPU and CUDA implementations (the CUDA side adds its own limits).
inline bool check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias) {
  check_float_nchw(x, "x");
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c && weight.scalar_type() == x.scalar_type() &&
                  weight.device() == x.device(),
              "weight: expected shape (", c, "), dtype ", x.scalar_type(), " and x's device, got ", weight.sizes(),
              " ", weight.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bias: expected shape (", c, "), dtype ", x.scalar_type(), " and x's device");
  return has_bias;
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                  t.is_contiguous(),
              name, ": expected a contiguous tensor of x's shape, dtype and device");
}

inline void check_grouped_args(const at::Tensor& x, const at::Tensor& index, const at::Tensor& offsets,
                               int64_t expert, const at::Tensor& weight) {
  check_float_nchw(x, "x");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              "index: expected a contiguous 1-D int64 tensor, got ", index.dim(), "-D ", index.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 2,
              "offsets: expected a 1-D int64 tensor of E+1 >= 2 entries");
  TORCH_CHECK(expert >= 0 && expert < offsets.numel() - 1, "expert: expected 0 <= expert < ", offsets.numel() - 1,
              ", got ", expert);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && supported_kernel_size(weight.size(2)),
              "weight: expected shape (", x.size(1), ", 1, k, k) with k in {3, 5, 7}, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(index.device() == x.device() && offsets.device() == x.device() && weight.device() == x.device(),
              "x, index, offsets and weight must be on one device");
}

inline void check_grouped_grad(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index) {
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == index.size(0) && dy.size(1) == x.size(1) && dy.size(2) == x.size(2) &&
                  dy.size(3) == x.size(3) && dy.scalar_type() == x.scalar_type() && dy.device() == x.device() &&
                  dy.is_contiguous(),
              "dy: expected a contiguous (", index.size(0), ", ", x.size(1), ", ", x.size(2), ", ", x.size(3),
              ") tensor of x's dtype and device");
}

}  // namespace moce_fast

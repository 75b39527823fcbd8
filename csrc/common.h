// Shared helpers of the moce_fast CUDA C++ extension.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

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

}  // namespace moce_fast

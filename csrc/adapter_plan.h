// An eval call of one AdaptIR adapter on the CPU kernel, kept between calls (csrc/adapter_cpu.cpp;
// built and run by moce_fast/nn/adapter.py).
//
// At batch 1 on a small map the kernel itself takes about 0.3 ms, and the Python around it (the
// backend choice, the checks of x and of 24 parameters, the folded parameters' key of 26 data
// pointers and versions) about 0.15 ms more in a host model's conditions, where the interpreter's
// data is not in the caches. A plan holds what that Python works out once: the parameters with the
// eval BatchNorm folded into the head and the DFT tables. run() checks in C++ that the plan still
// holds for this call (the adapter's tensors are the ones it was made from, unchanged; x is what
// the kernel takes, within the row limits the caller passes) and runs the kernel, or declines, and
// the caller takes its full path.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <cstdint>
#include <vector>

namespace moce_fast {

// The most rows of one eval call of an adapter of c channels and hid hidden ones on the CPU kernel:
// `narrow` where both the head's and the tail's products run on the narrow products
// (narrow_kind: C -> hid and hid -> C, on this CPU at its ISA cap), else `wide` (the caller's
// limits: moce_fast.ops.adapter.CPU_KERNEL_MAX_ROWS_EVAL_NARROW and CPU_KERNEL_MAX_ROWS_EVAL).
int64_t eval_row_limit(at::ScalarType dtype, int64_t c, int64_t hid, int64_t wide, int64_t narrow);

// (hidden as pybind11's own types are: the class is bound to Python in this module, build_info.cpp)
class __attribute__((visibility("hidden"))) AdapterEvalPlan {
 public:
  // raw: the adapter's tensors as stored (what `params` was computed from), each kept with its
  // storage, data pointer, sizes, dtype and version; params: the 24 tensors of the kernel (BatchNorm
  // folded into the head); fwd / inv: the DFT tables of a hh x ww map and s their self-conjugate
  // bins, or both empty and s = 0 (rfft2 / irfft2, on any map of more than dense_max_pixels);
  // layout and eps: the adapter's.
  AdapterEvalPlan(std::vector<at::Tensor> raw, std::vector<at::Tensor> params, int64_t layout, double eps,
                  at::Tensor fwd, at::Tensor inv, int64_t hh, int64_t ww, int64_t s, int64_t dense_max_pixels);

  // The adapter's eval output on x, or an undefined tensor where the plan does not hold: a tensor of
  // `raw` is another one, on other memory, of other sizes or dtype, or updated in place since; the
  // layout or eps changed; autograd would record (grad mode on and x or a tensor requires grad);
  // inference mode differs from the plan's; x is not a CPU tensor of the plan's dtype and channels
  // in its layout, with a map the tables serve and at most eval_row_limit(.., wide, narrow) rows.
  at::Tensor run(const at::Tensor& x, const std::vector<at::Tensor>& raw, int64_t layout, double eps, int64_t wide,
                 int64_t narrow) const;

  // Whether run() would check `raw`, layout and eps as unchanged (tests and the caller's rebuild).
  bool holds(const std::vector<at::Tensor>& raw, int64_t layout, double eps) const;

 private:
  struct Kept {
    at::Tensor tensor;     // the same tensor object ...
    c10::Storage storage;  // ... on the same memory (held: its address is not reused while kept)
    const void* data;
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
    int64_t version;
  };
  std::vector<Kept> kept_;
  std::vector<at::Tensor> params_;
  int64_t layout_;
  double eps_;
  at::Tensor fwd_, inv_;
  int64_t hh_, ww_, s_, dense_max_pixels_, c_, hid_;
  at::ScalarType dtype_;
  bool inference_;
};

}  // namespace moce_fast

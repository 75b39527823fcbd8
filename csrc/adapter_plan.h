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
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moce_fast {

// Why the CPU kernel does not take x as n images of hh x ww pixels in `layout` (0 nchw, 1 lnc, 2
// nhwc), or an empty string with n, hh, ww set. It takes a non-empty CPU tensor of `dtype` with c
// channels in the layout's dimensions; in "lnc" a square L = H W; several images only in "nhwc", or
// in "lnc" where the L and N axes merge into one, unless `batch_in_place` (the several-tasks kernel,
// which reads each image's block of the batch in place in any layout). The one statement of the rule:
// the eval plan and train_call decline by it (the caller then takes its full path, whose checks give
// the errors), and the full path's Python asks it through input_reason (moce_fast._C.cpu_map_reason).
std::string kernel_map_reason(const at::Tensor& x, int64_t layout, at::ScalarType dtype, int64_t c, int64_t& n,
                              int64_t& hh, int64_t& ww, bool batch_in_place = false);

inline bool kernel_map(const at::Tensor& x, int64_t layout, at::ScalarType dtype, int64_t c, int64_t& n, int64_t& hh,
                       int64_t& ww) {
  return kernel_map_reason(x, layout, dtype, c, n, hh, ww).empty();
}

// kernel_map_reason in x's own dtype, which must be float32 or float64.
std::string input_reason(const at::Tensor& x, int64_t layout, int64_t c, int64_t& n, int64_t& hh, int64_t& ww,
                         bool batch_in_place = false);

// Whether the CPU kernel takes these 24 parameters for x: kParamsTaken; the index of the first that
// is not contiguous, in x's dtype, on x's device; or kParamsRecord in eval where autograd would record
// (grad mode on and x or a parameter requires grad: the eval kernel has no backward). The one
// statement of the rule: moce_fast._C.cpu_params_reason (its message) and train_call check by it.
constexpr int kParamsTaken = -1, kParamsRecord = -2;
int params_check(const at::Tensor& x, at::TensorList params, bool training);

// The training adapter of one task on x by the CPU kernel (x: n images of hh x ww pixels in
// `layout`; params: the kernel's 24 tensors, in any shapes of the right sizes; fwd / inv / nb / s:
// the DFT tables, or empty tables for rfft2 / irfft2), recorded for autograd as one C++ node
// (AdapterCpuTrain, its backward one call of the kernel's backward, once differentiable):
// {the output in x's layout, the batch mean and unbiased variance (h,) of the head output (not
// differentiable)}. With `task` (N,) int64, each image's task: several tasks' adapters on one batch
// (params: 24 per task in turn; their gradients zeros for a task with no image), the statistics
// per task (T, h), and a fourth output, each task's number of rows (T,).
std::vector<at::Tensor> rows_train(const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, int64_t n,
                                   const std::vector<at::Tensor>& params, const at::Tensor& fwd,
                                   const at::Tensor& inv, int64_t nb, int64_t s, double eps, const at::Tensor& task);

// A training call of one adapter straight from its stored tensors: raw, the 26 of
// moce_fast.nn.adapter._raw_tensors (parameters and BatchNorm's running statistics, as stored);
// BatchNorm's num_batches_tracked, eps and momentum (none: the cumulative average). Where the kernel
// takes x (input_reason in `layout`: x's dtype float32 or float64; 2 to row_limit(.., max_rows,
// max_rows_narrow) rows, a map of more than dense_max_pixels: those have no tables here) and the parameters (params_check), outside
// inference mode: rows_train on the rfft2 path, then the running statistics updated as
// cpu_batch_norm_update does, and the output. Else an undefined tensor, nothing changed: the caller
// takes its full path. The full path's Python around the same kernel took 0.35-0.7 ms of a 1.1-2.5
// ms IPT 16x16 batch-1 step (moce_fast/nn/adapter.py, direct_train).
at::Tensor train_call(const at::Tensor& x, const std::vector<at::Tensor>& raw, at::Tensor& num_batches_tracked,
                      int64_t layout, double eps, c10::optional<double> momentum, int64_t max_rows,
                      int64_t max_rows_narrow, int64_t dense_max_pixels);

// The most rows of one call of an adapter of c channels and hid hidden ones on the CPU kernel:
// `narrow` where both the head's and the tail's products run on the narrow products
// (narrow_kind: C -> hid and hid -> C, on this CPU at its ISA cap), else `wide` (the caller's
// limits: moce_fast.ops.adapter.CPU_KERNEL_MAX_ROWS_EVAL_NARROW and CPU_KERNEL_MAX_ROWS_EVAL in eval,
// CPU_KERNEL_MAX_ROWS_TRAINING_NARROW and CPU_KERNEL_MAX_ROWS_TRAINING in training).
int64_t row_limit(at::ScalarType dtype, int64_t c, int64_t hid, int64_t wide, int64_t narrow);

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
  // in its layout, with a map the tables serve and at most row_limit(.., wide, narrow) rows.
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

// moce_fast._C: the CUDA C++ extension. This file reports how the extension was built, so a user
// (and the tests) can see which toolkit and GPU architectures the installed binary targets.
// The ops themselves are declared in ops.cpp (schemas, CPU) and the .cu files (CUDA).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

#include "adapter_plan.h"
#include "common.h"

#define MOCE_FAST_STR_(x) #x
#define MOCE_FAST_STR(x) MOCE_FAST_STR_(x)

#ifndef MOCE_FAST_ARCHS
#define MOCE_FAST_ARCHS unknown
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime_version"] = CUDART_VERSION;
  info["archs"] = std::string(MOCE_FAST_STR(MOCE_FAST_ARCHS));  // e.g. "sm80_sm90"
#ifdef _OPENMP
  info["openmp"] = true;  // the CPU kernels' at::parallel_for loops run on torch's threads
#else
  info["openmp"] = false;
#endif
  info["cpu_isa"] = moce_fast::cpu_isa();  // the CPU adapter kernel's narrow products (csrc/cpu_narrow.cpp)
  return info;
}

// How many threads an at::parallel_for over one item per intra-op thread ran on, as this extension
// compiled it (1 without OpenMP, whatever torch.get_num_threads() says).
int64_t cpu_parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> ran(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) ran[i] = at::get_thread_num();
  });
  std::sort(ran.begin(), ran.end());
  return std::unique(ran.begin(), ran.end()) - ran.begin();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moce_fast CUDA C++ extension";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA runtime version, GPU archs, and whether with OpenMP.");
  m.def("cpu_parallel_threads", &cpu_parallel_threads,
        "How many threads an at::parallel_for of this extension runs on (torch.get_num_threads() items).");
  m.def("set_poison_outputs", &moce_fast::set_poison_outputs,
        "Debug: fill op outputs with NaN before the kernels run (tests use it to catch unwritten elements).");
  m.def("poison_outputs", &moce_fast::poison_outputs, "Whether outputs are poisoned with NaN before launch.");
  m.def("set_cpu_chunk_values", &moce_fast::set_cpu_chunk_values, pybind11::arg("values"),
        "Tests: the values per chunk of the CPU adapter kernel's parallel loops (default 8192); returns the "
        "previous value.");
  m.def("cpu_isa", &moce_fast::cpu_isa,
        "The ISA of the CPU adapter kernel's narrow products (\"avx512\", \"avx2\" or \"none\": ATen's products).");
  m.def("set_cpu_isa_cap", &moce_fast::set_cpu_isa_cap, pybind11::arg("isa"),
        "Tests: use at most this ISA (\"avx512\", \"avx2\" or \"none\") for the narrow products; returns the "
        "previous cap.");
  m.def(
      "cpu_narrow_kind",
      [](const at::ScalarType dtype, int64_t k, int64_t m) -> pybind11::object {
        const char* kind = moce_fast::narrow_kind(dtype, k, m);
        if (kind == nullptr) return pybind11::none();
        return pybind11::str(kind);
      },
      pybind11::arg("dtype"), pybind11::arg("k"), pybind11::arg("m"),
      "Which narrow CPU product (\"narrow_out\" or \"narrow_in\") rows of this dtype and K contiguous values "
      "times a w (M, K) take on this CPU at its ISA cap, or None (ATen's products).");
  m.def("cpu_batch_norm_update", &moce_fast::cpu_batch_norm_update, pybind11::arg("running_mean"),
        pybind11::arg("running_var"), pybind11::arg("num_batches_tracked"), pybind11::arg("mean"), pybind11::arg("var"),
        pybind11::arg("momentum"),
        "BatchNorm's running-statistics update after a training step (as nn.BatchNorm2d; momentum None: the "
        "cumulative average), in place, outside autograd.");
  m.def(
      "cpu_params_reason",
      [](const at::Tensor& x, const std::vector<at::Tensor>& params, bool training) -> pybind11::object {
        const int k = moce_fast::params_check(x, params, training);
        if (k == moce_fast::kParamsTaken) return pybind11::none();
        if (k == moce_fast::kParamsRecord)
          return pybind11::str("eval with autograd recording (the eval kernel has no backward)");
        const auto& q = params[k];
        return pybind11::str("a parameter is {} on {}, not contiguous {} on x's device")
            .format(pybind11::cast(q.scalar_type()), pybind11::cast(q.device()), pybind11::cast(x.scalar_type()));
      },
      pybind11::arg("x"), pybind11::arg("params"), pybind11::arg("training"),
      "Why the CPU adapter kernel does not take these parameters for x (each contiguous, in x's dtype, on its "
      "device; in eval, no autograd graph to record), or None.");
  m.def(
      "cpu_map_reason",
      [](const at::Tensor& x, int64_t layout, int64_t c, bool batch_in_place) -> pybind11::object {
        int64_t n = 0, hh = 0, ww = 0;
        const std::string why = moce_fast::input_reason(x, layout, c, n, hh, ww, batch_in_place);
        if (why.empty()) return pybind11::none();
        return pybind11::str(why);
      },
      pybind11::arg("x"), pybind11::arg("layout"), pybind11::arg("c"), pybind11::arg("batch_in_place") = false,
      "Why the CPU adapter kernel does not take x as a map in layout (0 nchw, 1 lnc, 2 nhwc) of an adapter with "
      "c channels (float32 or float64, non-empty, on the CPU; in 'lnc' a square L; several images only in "
      "'nhwc' or in 'lnc' with mergeable L and N axes, unless batch_in_place), or None: the rule the eval plan "
      "and cpu_train_call decline by.");
  m.def(
      "cpu_rows_train",
      [](const at::Tensor& x, int64_t layout, int64_t hh, int64_t ww, int64_t n, const std::vector<at::Tensor>& params,
         const at::Tensor& fwd, const at::Tensor& inv, int64_t nb, int64_t s, double eps,
         const c10::optional<at::Tensor>& task) {
        std::vector<at::Tensor> res;
        {
          pybind11::gil_scoped_release no_gil;
          res = moce_fast::rows_train(x, layout, hh, ww, n, params, fwd, inv, nb, s, eps, task.value_or(at::Tensor()));
        }
        pybind11::tuple out(res.size());
        for (size_t i = 0; i < res.size(); ++i) out[i] = pybind11::cast(res[i]);
        return out;
      },
      pybind11::arg("x"), pybind11::arg("layout"), pybind11::arg("hh"), pybind11::arg("ww"), pybind11::arg("n"),
      pybind11::arg("params"), pybind11::arg("fwd"), pybind11::arg("inv"), pybind11::arg("nb"), pybind11::arg("s"),
      pybind11::arg("eps"), pybind11::arg("task") = pybind11::none(),
      "The training adapter of one task on x by the CPU kernel, recorded for autograd as one C++ node: (out, "
      "batch mean, unbiased batch variance); with task (each image's), several tasks' adapters (24 parameters "
      "each) on one batch: (out, mean (T, h), variance (T, h), rows (T,)).");
  m.def(
      "cpu_train_call",
      [](const at::Tensor& x, const std::vector<at::Tensor>& raw, at::Tensor& num_batches_tracked, int64_t layout,
         double eps, c10::optional<double> momentum, int64_t max_rows, int64_t max_rows_narrow,
         int64_t dense_max_pixels) -> pybind11::object {
        at::Tensor out;
        {
          pybind11::gil_scoped_release no_gil;
          out = moce_fast::train_call(x, raw, num_batches_tracked, layout, eps, momentum, max_rows, max_rows_narrow,
                                      dense_max_pixels);
        }
        if (!out.defined()) return pybind11::none();
        return pybind11::cast(out);
      },
      pybind11::arg("x"), pybind11::arg("raw"), pybind11::arg("num_batches_tracked"), pybind11::arg("layout"),
      pybind11::arg("eps"), pybind11::arg("momentum"), pybind11::arg("max_rows"), pybind11::arg("max_rows_narrow"),
      pybind11::arg("dense_max_pixels"),
      "One adapter's training call on the CPU kernel straight from its 26 stored tensors (running statistics "
      "updated), or None where the kernel does not take it (nothing changed).");
  m.def("cpu_row_limit", &moce_fast::row_limit, pybind11::arg("dtype"), pybind11::arg("c"),
        pybind11::arg("hid"), pybind11::arg("wide"), pybind11::arg("narrow"),
        "The most rows of a call (eval or training) of the CPU adapter kernel: narrow where its head (C -> hid) "
        "and tail (hid -> C) both run on the narrow products, else wide.");
  m.def(
      "cpu_narrow_rows_times",
      [](const at::Tensor& rows, const at::Tensor& w, const c10::optional<at::Tensor>& bias) -> pybind11::object {
        if (moce_fast::narrow_product_kind(rows, w) == nullptr) return pybind11::none();
        auto out = at::empty({rows.size(0), w.size(0)}, rows.options());
        moce_fast::maybe_poison(out);
        return pybind11::cast(moce_fast::narrow_rows_times(rows, w, bias.value_or(at::Tensor()), out));
      },
      pybind11::arg("rows"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none(),
      "Tests: rows (R, K) @ w^T + bias by the narrow CPU product, or None where none applies (see cpu_isa).");
  m.def(
      "cpu_narrow_t_product",
      [](const at::Tensor& a, const at::Tensor& b) -> pybind11::object {
        if (!moce_fast::narrow_t_takes(a, b)) return pybind11::none();
        return pybind11::cast(moce_fast::narrow_t_product(a, b));
      },
      pybind11::arg("a"), pybind11::arg("b"),
      "Tests: a^T b over the rows of a (R, p) and b (R, q) by the narrow CPU weight-gradient product, or None "
      "where it does not apply (see cpu_isa).");
  pybind11::class_<moce_fast::AdapterEvalPlan, std::shared_ptr<moce_fast::AdapterEvalPlan>>(
      m, "AdapterEvalPlan",
      "One adapter's eval call on the CPU kernel, kept between calls (csrc/adapter_plan.h): the folded "
      "parameters and the DFT tables, with the stored tensors they came from.")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, double, at::Tensor, at::Tensor,
                          int64_t, int64_t, int64_t, int64_t>(),
           pybind11::arg("raw"), pybind11::arg("params"), pybind11::arg("layout"), pybind11::arg("eps"),
           pybind11::arg("fwd"), pybind11::arg("inv"), pybind11::arg("hh"), pybind11::arg("ww"), pybind11::arg("s"),
           pybind11::arg("dense_max_pixels"))
      .def(
          "run",
          [](const moce_fast::AdapterEvalPlan& plan, const at::Tensor& x, const std::vector<at::Tensor>& raw,
             int64_t layout, double eps, int64_t wide, int64_t narrow) -> pybind11::object {
            at::Tensor out;
            {
              pybind11::gil_scoped_release no_gil;
              out = plan.run(x, raw, layout, eps, wide, narrow);
            }
            if (!out.defined()) return pybind11::none();
            return pybind11::cast(out);
          },
          pybind11::arg("x"), pybind11::arg("raw"), pybind11::arg("layout"), pybind11::arg("eps"),
          pybind11::arg("wide"), pybind11::arg("narrow"),
          "The adapter's eval output on x, or None where the plan does not hold for this call (at most "
          "cpu_row_limit(.., wide, narrow) rows).")
      .def("holds", &moce_fast::AdapterEvalPlan::holds, pybind11::arg("raw"), pybind11::arg("layout"),
           pybind11::arg("eps"), "Whether raw, layout and eps are those the plan was made from, unchanged.");
  m.def("set_cpu_cache_limit", &moce_fast::set_cpu_cache_limit, pybind11::arg("limit_bytes"),
        "The most bytes of idle blocks the CPU buffer cache keeps (0: off, idle blocks freed at once).");
  m.def("empty_cpu_cache", &moce_fast::empty_cpu_cache, "Frees every idle block of the CPU buffer cache.");
  m.def("install_cpu_cache", &moce_fast::install_cpu_cache,
        "Makes the CPU buffer cache torch's CPU allocator until the matching uninstall_cpu_cache (nested).");
  m.def("uninstall_cpu_cache", &moce_fast::uninstall_cpu_cache, "Undoes one install_cpu_cache.");
  m.def("cpu_cache_install_depth", &moce_fast::cpu_cache_install_depth, "How many installs are in force.");
  m.def(
      "cpu_cache_info",
      [] {
        const auto i = moce_fast::cpu_cache_info();
        pybind11::dict d;
        d["idle_bytes"] = i.idle_bytes;
        d["idle_blocks"] = i.idle_blocks;
        d["limit_bytes"] = i.limit_bytes;
        d["hits"] = i.hits;
        d["misses"] = i.misses;
        return d;
      },
      "The CPU buffer cache: idle bytes and blocks, its limit, and allocations served from it (hits) or not.");
}

// moce_fast._C: the CUDA C++ extension. This file reports how the extension was built, so a user
// (and the tests) can see which toolkit and GPU architectures the installed binary targets.
// The ops themselves are declared in ops.cpp (schemas, CPU) and the .cu files (CUDA).
#include <torch/extension.h>

#include <cuda_runtime_api.h>

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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moce_fast CUDA C++ extension";
  m.def("build_info", &build_info, "How this extension was built: CUDA runtime version and GPU archs.");
  m.def("set_poison_outputs", &moce_fast::set_poison_outputs,
        "Debug: fill op outputs with NaN before the kernels run (tests use it to catch unwritten elements).");
  m.def("poison_outputs", &moce_fast::poison_outputs, "Whether outputs are poisoned with NaN before launch.");
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

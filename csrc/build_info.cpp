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
}

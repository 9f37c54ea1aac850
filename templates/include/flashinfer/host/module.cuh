// What a module tells Python about itself through the exports every module has (templates/module_exports.jinja;
// flashinfer/jit/abi.py reads them): named compile-time constants and the texts of its own error codes.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace flashinfer {

struct ModuleConstant {
  const char* name;
  int64_t value;
};
struct ModuleError {
  int code;
  const char* message;
};

template <int N>
static int copy_module_constants(const ModuleConstant (&table)[N], const char** names, int64_t* values, int capacity) {
  if (capacity < N) return -1;
  for (int i = 0; i < N; ++i) {
    names[i] = table[i].name;
    values[i] = table[i].value;
  }
  return N;
}

template <int N>
static const char* module_error_string(const ModuleError (&table)[N], int error) {
  for (int i = 0; i < N; ++i) {
    if (table[i].code == error) return table[i].message;
  }
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace flashinfer

// Host stand-ins for the device built-ins of templates/include/flashinfer/ops/rope.cuh (tests only). Its threads
// never exchange values (no barrier, no shuffle), so an emulated launch runs them one after another.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdlib>

#define __launch_bounds__(...)
#define __grid_constant__
#define __CUDA_ARCH__ 900

namespace emu {
static uint3 tid, bid;  // of the thread being run
static int sms = 132;   // the SM count launch_rope sizes its grid for
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl, Args&&... args);
}  // namespace emu
#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)

inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline void __threadfence_system() {}
inline void sincospif(float x, float* s, float* c) {
  *s = static_cast<float>(std::sin(M_PI * static_cast<double>(x)));
  *c = static_cast<float>(std::cos(M_PI * static_cast<double>(x)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T, int) {  // in common.cuh's reductions, which rope.cuh does not call
  abort();
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

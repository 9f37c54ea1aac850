// Gated activations: out[r, j] = act(input[r, j]) * input[r, d + j] for rows r and j < d, in fp32.
//
// Purely elementwise and memory-bound: CTA (row, column block) of kActThreads threads, each moving up to
// kActUnroll chunks of N elements (N = 8: 16-byte vectors; N = 1 when d or the rows are not 16-byte aligned),
// all loads issued before the first store. The chunks per thread are picked at launch from the size: the fewest
// that still put every CTA on the GPU at once (small batches: all loads in the first round trip, the most
// threads), the most once the work exceeds that.
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"

namespace flashinfer {

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

template <Activation ACT>
FI_DEVICE float activate(float x) {
  if constexpr (ACT == Activation::kSilu) {
    // The division as a reciprocal and a multiply (__fdividef: 2 ulp in fp32, below the 16-bit output's rounding)
    // rather than IEEE division's Newton steps: measured on an H200 (benchmarks/probe_ops.py, bf16, d 14336, L2
    // flushed) the fastest on every size, e.g. 256 tokens 10.46 us against 11.97, 1 token 5.25 against 5.58.
    // Edges: x very negative -> exp overflows to inf (or the denominator passes 2^126, where __fdividef gives 0)
    // -> x * 0 = -0, where the true value is below 1e-36; x = +inf -> inf / 1 = inf; x = -inf -> -inf * 0 = NaN,
    // as IEEE's -inf / inf; NaN propagates.
    return __fdividef(x, 1.f + __expf(-x));
  } else if constexpr (ACT == Activation::kGelu) {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  } else {
    const float inner = 0.79788456080286536f * fmaf(0.044715f * x, x * x, x);  // sqrt(2/pi) (x + 0.044715 x^3)
    return 0.5f * x * (1.f + tanhf(inner));
  }
}

struct ActParams {
  const void* input;  // [rows, 2d], row stride in_stride
  void* out;          // [rows, d], row stride out_stride
  int64_t in_stride, out_stride;
  int rows, d, chunks_per_thread;
};

// 512 threads a CTA (a row's 14336 columns in 4 CTAs): measured on an H200 (benchmarks/probe_ops.py, bf16, d 14336,
// L2 flushed, 5f02dbd), 128 / 512 threads: 256 tokens 9.73 / 9.60 us, 4096 tokens 84.48 / 82.29, 32768 tokens
// 667.5 / 643.1 (FlashInfer 651.0 in the same week's bench_ops); 256 threads in between. In the same trial and
// not kept: the grid's x over a row's column blocks (4096 tokens 82.06, but 256 tokens 10.40) and cache hints
// on the loads and stores (ld.global.nc, L1::no_allocate, an L2 evict-first policy, st.global.cs: 0.3-5% slower
// at 4096+ tokens, no gain below).
constexpr int kActThreads = 512;
constexpr int kActUnroll = 4;

template <typename T, Activation ACT, int N>
__global__ void __launch_bounds__(kActThreads) act_and_mul_kernel(const __grid_constant__ ActParams p) {
  grid_dependency_wait();
  const int row = blockIdx.x;
  const int chunks = p.d / N;
  const int first = blockIdx.y * kActThreads * p.chunks_per_thread + threadIdx.x;
  const T* gate = static_cast<const T*>(p.input) + row * p.in_stride;
  const T* up = gate + p.d;
  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  Chunk<T, N> g[kActUnroll], u[kActUnroll];
#pragma unroll
  for (int i = 0; i < kActUnroll; ++i) {
    const int c = first + i * kActThreads;
    if (i < p.chunks_per_thread && c < chunks) {
      g[i].load(gate + c * N);
      u[i].load(up + c * N);
    }
  }
#pragma unroll
  for (int i = 0; i < kActUnroll; ++i) {
    const int c = first + i * kActThreads;
    if (i < p.chunks_per_thread && c < chunks) {
      float gf[N], uf[N];
      g[i].to_floats(gf);
      u[i].to_floats(uf);
#pragma unroll
      for (int e = 0; e < N; ++e) gf[e] = activate<ACT>(gf[e]) * uf[e];
      store_floats<T, N>(out + c * N, gf);
    }
  }
  grid_dependency_launch_dependents();
}

// Chunks a thread: the fewest that let every CTA be resident at once (latency-bound batches issue all their
// loads in the first round trip, with the most threads), kActUnroll once the work exceeds one GPU-full.
// Residency counts the CTAs an SM really holds of the kernel (register bound). Measured on an H200 (bf16, d 14336,
// 1 to 32768 tokens, L2 flushed), this rule with silu's fast division was the fastest on every size; counting 2048
// threads an SM, or the earlier rule (1 chunk a thread up to two GPU-fulls of 2048 threads an SM, 2 up to four),
// each timed with the IEEE division, lost (256 tokens: earlier rule 10.53 us, this rule 11.97 with the IEEE
// division and 10.46 with the fast one).
template <typename T, Activation ACT>
static cudaError_t launch_act_and_mul(ActParams p, int device, bool pdl, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  const bool vec = p.d % 8 == 0 && p.in_stride % 8 == 0 && p.out_stride % 8 == 0 &&
                   ((reinterpret_cast<uintptr_t>(p.input) | reinterpret_cast<uintptr_t>(p.out)) & 15) == 0;
  const int n = vec ? 8 : 1;
  const int chunks = p.d / n;
  const int64_t total = int64_t(p.rows) * chunks;
  int ctas_per_sm = 0;
  const cudaError_t err = vec ? kernel_occupancy<act_and_mul_kernel<T, ACT, 8>>(kActThreads, 0, device, &ctas_per_sm)
                              : kernel_occupancy<act_and_mul_kernel<T, ACT, 1>>(kActThreads, 0, device, &ctas_per_sm);
  if (err != cudaSuccess) return err;
  const int64_t full = int64_t(sm_count(device)) * ctas_per_sm * kActThreads;
  p.chunks_per_thread = total <= full ? 1 : total <= 2 * full ? 2 : kActUnroll;
  const int col_blocks = ceil_div(chunks, kActThreads * p.chunks_per_thread);
  if (col_blocks > 65535) return cudaErrorInvalidValue;
  const dim3 grid(p.rows, col_blocks);
  if (vec) return launch_kernel(act_and_mul_kernel<T, ACT, 8>, grid, dim3(kActThreads), 0, stream, pdl, p);
  return launch_kernel(act_and_mul_kernel<T, ACT, 1>, grid, dim3(kActThreads), 0, stream, pdl, p);
}

}  // namespace flashinfer

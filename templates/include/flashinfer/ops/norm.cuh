// RMSNorm of rows, optionally fused with the residual add that precedes it:
//   x   = input                       (rmsnorm)
//   x   = input + residual; residual = x      (fused add; residual written back in place)
//   out = x * rsqrt(mean(x^2) + eps) * (weight_bias + weight)      (weight_bias 1: Gemma's weight + 1)
// in fp32; the norm of the fused add uses the fp32 sum, not the residual rounded to 16 bits.
//
// A row stays in registers from load to store: each thread holds VPT chunks of N elements (N = 8: 16-byte
// vectors; N = 1: any size or alignment). Short rows (QK-norm over head_dim) take one warp each, several per
// CTA; long rows one CTA, whose threads are sized at run time by the hidden size and the batch (launch_rmsnorm
// below: one chunk a thread while the whole grid fits on the GPU at once, more once it is bandwidth-bound).
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"

namespace flashinfer {

// Rows are 2-D or 3-D tensors flattened: row r sits at (r / inner) * stride0 + (r % inner) * stride1 elements.
struct NormRows {
  int64_t stride0, stride1;
};

struct NormParams {
  const void* input;
  void* out;       // may be input itself (in place)
  void* residual;  // fused add only
  const void* weight;
  NormRows in, o, res;
  int rows, inner, hidden;
  float eps, weight_bias;
};

constexpr int kNormWarpRowsPerCta = 8;       // warp-per-row kernel: 8 rows (256 threads) per CTA
constexpr int kNormMaxThreads = 512;         // CTA-per-row kernel over 16-byte chunks, several a thread
constexpr int kNormMaxScalarThreads = 1024;  // CTA-per-row kernel over single elements, or one 16-byte chunk a thread
constexpr int kNormVpt = 8;                  // the most 16-byte chunks a thread

// Launch shapes (launch_rmsnorm below), measured on an H200 (benchmarks/probe_ops.py: bf16, hidden 4096 and
// 8192, 1 to 32768 tokens, L2 flushed): one 16-byte chunk a thread while the whole grid is resident at once, 2
// while that fits, else 4 (8 above 16384 elements), a CTA a row, was the fastest or within noise on every case.
// The earlier rule (2 chunks a thread below one row per SM, else 4) was 1-2% slower on small batches; resident
// counted at 50% or 800% of the real occupancy, 2 chunks a thread in the bandwidth-bound shape, 2 or 4 rows a CTA
// and rows streamed through resident CTAs (weight loaded once, next row prefetched: 4-9% slower from 4096 tokens)
// all lost. A later trial (5f02dbd, same probe) found nothing better either, every variant within 1% of these
// shapes on the geometric mean: the weight loaded after the reduction (as FlashInfer does; 0.996 of the time up
// to 256 tokens, 1.008 from 4096), 2 rows a thread sharing one weight load (1.011 / 0.999), and cache hints on
// the row loads and stores (ld.global.nc, L1::no_allocate, an L2 evict-first policy, st.global.cs: 1.00 / 1.01-1.03).

// FAST_2D: a 2-D input (inner 1) skips the division ahead of the first load (the fused add's kernel of 8 chunks
// a thread has no register to spare for the branch).
template <bool FAST_2D = true>
FI_DEVICE int64_t norm_row_offset(const NormRows& s, int row, int inner) {
  if (FAST_2D && inner == 1) return int64_t(row) * s.stride0;
  return int64_t(row / inner) * s.stride0 + int64_t(row % inner) * s.stride1;
}

// Threads a CTA of the kernel may have: 8 warps of the warp-per-row form; up to 1024 for one chunk (or element)
// a thread, 512 for several 16-byte chunks a thread (register budget).
__host__ __device__ constexpr int norm_cta_threads(int n, int vpt, bool warp_per_row) {
  return warp_per_row ? 32 * kNormWarpRowsPerCta : (n == 1 || vpt == 1) ? kNormMaxScalarThreads : kNormMaxThreads;
}

// CTA-per-row form: blockDim.x threads (a multiple of 32) a row, blockDim.y rows a CTA; warp-per-row form: 32
// threads a row, kNormWarpRowsPerCta rows a CTA.
template <typename T, int N, int VPT, bool FUSED_ADD, bool WARP_PER_ROW>
__global__ void __launch_bounds__(norm_cta_threads(N, VPT, WARP_PER_ROW))
    rmsnorm_kernel(const __grid_constant__ NormParams p) {
  grid_dependency_wait();
  const int nthreads = WARP_PER_ROW ? 32 : blockDim.x;
  const int t = WARP_PER_ROW ? threadIdx.x % 32 : threadIdx.x;
  // Several rows a CTA only up to 4 chunks a thread (8 leave no register for it). The launcher gives one row a CTA
  // (several lost on an H200); the code for more stays so that the kernels keep the machine code that was measured.
  constexpr bool kMultiRow = !WARP_PER_ROW && VPT <= 4;
  int row = WARP_PER_ROW ? blockIdx.x * kNormWarpRowsPerCta + threadIdx.x / 32
            : kMultiRow  ? blockIdx.x * blockDim.y + threadIdx.y
                         : blockIdx.x;
  if (WARP_PER_ROW && row >= p.rows) return;  // whole warps: this kernel has no CTA-wide barrier then
  // A CTA of several rows may have rows past the end: their threads read the last row again (they must meet the
  // barrier of the reduction) and store nothing.
  const bool live = !kMultiRow || row < p.rows;
  if (!live) row = p.rows - 1;
  const int chunks = p.hidden / N;
  constexpr bool kFast2d = !(FUSED_ADD && N == 8 && VPT == kNormVpt);
  const T* in = static_cast<const T*>(p.input) + norm_row_offset<kFast2d>(p.in, row, p.inner);
  T* res = FUSED_ADD ? static_cast<T*>(p.residual) + norm_row_offset<kFast2d>(p.res, row, p.inner) : nullptr;
  const T* w = static_cast<const T*>(p.weight);

  // Every load of the row first (input, residual, weight), then the math: one memory round trip per row.
  Chunk<T, N> xc[VPT], rc[VPT], wc[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int c = v * nthreads + t;
    if (c < chunks) {
      xc[v].load(in + c * N);
      if constexpr (FUSED_ADD) rc[v].load(res + c * N);
      wc[v].load(w + c * N);
    }
  }
  // x of chunk v in fp32 (the fused add recomputes input + residual exactly as it first did).
  const auto row_values = [&](int v, float (&x)[N]) {
    xc[v].to_floats(x);
    if constexpr (FUSED_ADD) {
      float r[N];
      rc[v].to_floats(r);
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] += r[i];
    }
  };
  float sum_sq = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int c = v * nthreads + t;
    if (c < chunks) {
      float x[N];
      row_values(v, x);
      if (FUSED_ADD && live) store_floats<T, N>(res + c * N, x);
#pragma unroll
      for (int i = 0; i < N; ++i) sum_sq = fmaf(x[i], x[i], sum_sq);
    }
  }
  sum_sq = group_sum<32>(sum_sq);
  if constexpr (!WARP_PER_ROW) {
    // The row's warps' sums. One chunk a thread (up to 32 warps, latency-bound): one shared load a lane and 5
    // shuffles rather than a serial loop; several (at most 16 warps): the loop, which needs no extra registers.
    __shared__ float warp_sums[kNormMaxScalarThreads / 32];
    const int row_warps = nthreads / 32, lane = t % 32;
    float* sums = warp_sums + (kMultiRow ? threadIdx.y * row_warps : 0);
    if (lane == 0) sums[t / 32] = sum_sq;
    __syncthreads();
    if constexpr (VPT == 1) {
      sum_sq = group_sum<32>(lane < row_warps ? sums[lane] : 0.f);
    } else {
      sum_sq = 0.f;
      for (int i = 0; i < row_warps; ++i) sum_sq += sums[i];
    }
  }
  const float rrms = rsqrtf(sum_sq / float(p.hidden) + p.eps);

  T* out = static_cast<T*>(p.out) + norm_row_offset<kFast2d>(p.o, row, p.inner);
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int c = v * nthreads + t;
    if (live && c < chunks) {
      float x[N], wf[N];
      row_values(v, x);
      wc[v].to_floats(wf);
#pragma unroll
      for (int i = 0; i < N; ++i) x[i] = x[i] * rrms * (p.weight_bias + wf[i]);
      store_floats<T, N>(out + c * N, x);
    }
  }
  grid_dependency_launch_dependents();
}

// Kernel shapes: a warp per row up to 32 * 4 chunks, else a CTA per row. While the whole grid fits on the GPU at
// once (latency-bound batches: every load in flight in the first round trip), one 16-byte chunk a thread up to 8192
// elements, else 2; beyond that (bandwidth-bound) 4 chunks a thread, 8 above 16384 elements. Rows that are not 16-byte
// aligned go element by element (kNormScalarVpt a thread).
constexpr int kNormScalarVpt = 8;
constexpr int kNormMaxHiddenVec = kNormMaxThreads * kNormVpt * 8;             // 32768
constexpr int kNormMaxHiddenScalar = kNormMaxScalarThreads * kNormScalarVpt;  // 8192
constexpr int kNormErrHiddenTooLarge = 1001;  // a module error code (the template gives its text)

template <typename T, bool FUSED_ADD>
static cudaError_t launch_rmsnorm(const NormParams& p, int device, bool pdl, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  const auto rows_aligned = [&](const NormRows& s) {
    return (p.rows <= p.inner || s.stride0 % 8 == 0) && (p.inner <= 1 || s.stride1 % 8 == 0);
  };
  const bool vec = p.hidden % 8 == 0 && aligned(p.input) && aligned(p.out) && aligned(p.weight) && rows_aligned(p.in) &&
                   rows_aligned(p.o) && (!FUSED_ADD || (aligned(p.residual) && rows_aligned(p.res)));
  const int n = vec ? 8 : 1;
  const int chunks = p.hidden / n;
  const dim3 warp_grid((p.rows + kNormWarpRowsPerCta - 1) / kNormWarpRowsPerCta), warp_block(32 * kNormWarpRowsPerCta);
  const auto row_threads = [&](int vpt) { return (ceil_div(chunks, vpt) + 31) / 32 * 32; };
  if (vec) {
    if (chunks <= 32)
      return launch_kernel(rmsnorm_kernel<T, 8, 1, FUSED_ADD, true>, warp_grid, warp_block, 0, stream, pdl, p);
    if (chunks <= 128)
      return launch_kernel(rmsnorm_kernel<T, 8, 4, FUSED_ADD, true>, warp_grid, warp_block, 0, stream, pdl, p);
    if (chunks > kNormMaxThreads * kNormVpt) return static_cast<cudaError_t>(kNormErrHiddenTooLarge);
    // Threads the GPU holds at once of a kernel: its CTAs an SM at the largest CTA (register bound).
    const auto resident = [&](auto kernel_occupancy_at, int cta_threads) -> int64_t {
      int ctas = 0;
      if (kernel_occupancy_at(cta_threads, &ctas) != cudaSuccess) ctas = 1;
      return int64_t(sm_count(device)) * ctas * cta_threads;
    };
    const auto one_chunk = [&](int threads, int* ctas) {
      return kernel_occupancy<rmsnorm_kernel<T, 8, 1, FUSED_ADD, false>>(threads, 0, device, ctas);
    };
    const auto two_chunks = [&](int threads, int* ctas) {
      return kernel_occupancy<rmsnorm_kernel<T, 8, 2, FUSED_ADD, false>>(threads, 0, device, ctas);
    };
    int vpt;
    if (chunks <= kNormMaxScalarThreads &&
        int64_t(p.rows) * row_threads(1) <= resident(one_chunk, kNormMaxScalarThreads)) {
      vpt = 1;
    } else if (chunks <= kNormMaxThreads * 2 &&
               int64_t(p.rows) * row_threads(2) <= resident(two_chunks, kNormMaxThreads)) {
      vpt = 2;
    } else {
      vpt = chunks <= kNormMaxThreads * 4 ? 4 : 8;
    }
    const int threads = row_threads(vpt);
    if (vpt == 1)
      return launch_kernel(rmsnorm_kernel<T, 8, 1, FUSED_ADD, false>, dim3(p.rows), dim3(threads), 0, stream, pdl, p);
    if (vpt == 2)
      return launch_kernel(rmsnorm_kernel<T, 8, 2, FUSED_ADD, false>, dim3(p.rows), dim3(threads), 0, stream, pdl, p);
    if (vpt == 4)
      return launch_kernel(rmsnorm_kernel<T, 8, 4, FUSED_ADD, false>, dim3(p.rows), dim3(threads), 0, stream, pdl, p);
    return launch_kernel(rmsnorm_kernel<T, 8, kNormVpt, FUSED_ADD, false>, dim3(p.rows), dim3(threads), 0, stream, pdl,
                         p);
  }
  if (chunks <= 32 * kNormScalarVpt) {
    return launch_kernel(rmsnorm_kernel<T, 1, kNormScalarVpt, FUSED_ADD, true>, warp_grid, warp_block, 0, stream, pdl,
                         p);
  }
  if (chunks > kNormMaxHiddenScalar) return static_cast<cudaError_t>(kNormErrHiddenTooLarge);
  return launch_kernel(rmsnorm_kernel<T, 1, kNormScalarVpt, FUSED_ADD, false>, dim3(p.rows),
                       dim3(row_threads(kNormScalarVpt)), 0, stream, pdl, p);
}

}  // namespace flashinfer

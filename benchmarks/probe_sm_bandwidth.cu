// Development aid (issue 12): how many bytes per second one SM can draw from HBM for a paged NHD KV stream (pages
// of 16 tokens, 8 KV heads, head_dim 128, bf16, pages in random order), on n SMs (one CTA each), with the decode
// kernels' load patterns and no attention math:
//   cpasync: 4 groups of 128 threads, each a 3-stage ring of 16 KB (32 tokens of one head's K and V), 16-byte cp.async
//            with a page lookup per copy (the cp.async decode kernel's loads, 4 CTAs an SM);
//   tma:     one producer thread, 4 consumer warps; rings of 32 KB stages (one head, 2 KB boxes) or 64 KB stages (8
//            heads, 16 KB boxes), as the TMA decode kernel (attention/batch_decode_tma.cuh) copies them.
// Consumers read every 16-byte chunk of a stage once. Prints GB/s in total and per SM. Results: benchmarks/RESULTS.md
// (2026-12-01 from 23:30 UTC). Build and run on the GPU machine (or build here and carry the binary):
//   nvcc -O3 -std=c++17 -arch=sm_90a -Itemplates/include benchmarks/probe_sm_bandwidth.cu -o /tmp/probe_sm_bw
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include "flashinfer/common.cuh"
#include "flashinfer/host/tma.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/mbarrier.cuh"
#include "flashinfer/ptx/tma.cuh"

using namespace flashinfer;
using namespace flashinfer::sm90;

constexpr int PAGE_ELEMS = 2 * 16 * 8 * 128;  // K and V of a page

struct Params {
  const __nv_bfloat16* cache;
  const int* table;
  int tiles;  // per CTA
  unsigned* sink;
};

__global__ void __launch_bounds__(512, 1) cpasync_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const int g = threadIdx.x / 128, t = threadIdx.x % 128;
  uint4* ring = reinterpret_cast<uint4*>(smem) + g * 3 * 1024;  // 3 stages x 16 KB
  const int head = (blockIdx.x * 4 + g) % 8;
  const int* table = p.table + (blockIdx.x * 4 + g) * p.tiles * 2;
  auto load = [&](int tile) {
    uint4* st = ring + (tile % 3) * 1024;
#pragma unroll
    for (int it = 0; it < 4; ++it) {  // 512 chunks of K (32 tokens x 16 chunks), the same of V
      const int idx = t + it * 128;
      const int tok = idx / 16, c = idx % 16;
      const int page = table[tile * 2 + tok / 16];
      const __nv_bfloat16* row = p.cache + int64_t(page) * PAGE_ELEMS + (tok % 16) * 1024 + head * 128 + c * 8;
      cp_async_16(st + idx, row, true);
      cp_async_16(st + 512 + idx, row + 16 * 1024, true);
    }
  };
  load(0);
  cp_async_commit();
  load(1);
  cp_async_commit();
  uint32_t acc = 0;
  for (int tile = 0; tile < p.tiles; ++tile) {
    cp_async_wait<1>();
    asm volatile("bar.sync %0, 128;\n" ::"r"(g + 1));
    if (tile + 2 < p.tiles) load(tile + 2);
    cp_async_commit();
    const uint4* st = ring + (tile % 3) * 1024;
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const uint4 x = st[t + it * 128];
      acc ^= x.x ^ x.w;
    }
  }
  if (acc == 0x12345678u) *p.sink = acc;
}

template <bool ALL_HEADS>
__global__ void __launch_bounds__(160, 1)
    tma_kernel(const __grid_constant__ Params p, const __grid_constant__ CUtensorMap kmap,
               const __grid_constant__ CUtensorMap vmap, int stages) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  constexpr int STAGE = 32768 * (ALL_HEADS ? 2 : 1);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + stages * STAGE);  // full[s], empty[s]
  const int head = blockIdx.x % 8;
  const int pages_per_tile = ALL_HEADS ? 1 : 4;
  const int* table = p.table + blockIdx.x * p.tiles * pages_per_tile;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbarrier_init(smem_addr(&bars[s]), 1);
      mbarrier_init(smem_addr(&bars[stages + s]), 4);
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x >= 128) {
    if (threadIdx.x == 128) {
      for (int tile = 0; tile < p.tiles; ++tile) {
        const int s = tile % stages;
        if (tile >= stages) mbarrier_wait(smem_addr(&bars[stages + s]), ((tile / stages) - 1) & 1);
        const uint32_t full = smem_addr(&bars[s]);
        mbarrier_arrive_expect_tx(full, STAGE);
        const uint32_t dst = smem_addr(smem + s * STAGE);
        for (int j = 0; j < pages_per_tile; ++j) {
          const int page = table[tile * pages_per_tile + j];
          const int h = ALL_HEADS ? 0 : head;
          const uint32_t box = ALL_HEADS ? 16384 : 2048;  // bytes of one 64-column box
          const uint32_t k0 = dst + j * 4 * box;
          tma_load_4d(k0, &kmap, 0, h, 0, page, full);
          tma_load_4d(k0 + box, &kmap, 64, h, 0, page, full);
          tma_load_4d(k0 + 2 * box, &vmap, 0, h, 0, page, full);
          tma_load_4d(k0 + 3 * box, &vmap, 64, h, 0, page, full);
        }
      }
    }
    return;
  }
  uint32_t acc = 0;
  const uint4* base = reinterpret_cast<const uint4*>(smem);
  for (int tile = 0; tile < p.tiles; ++tile) {
    const int s = tile % stages;
    mbarrier_wait(smem_addr(&bars[s]), (tile / stages) & 1);
    const uint4* st = base + s * (STAGE / 16);
#pragma unroll 4
    for (int it = 0; it < STAGE / 16 / 128; ++it) {
      const uint4 x = st[threadIdx.x + it * 128];
      acc ^= x.x ^ x.w;
    }
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(smem_addr(&bars[stages + s]));
  }
  if (acc == 0x12345678u) *p.sink = acc;
}

#define CK(x)                                                          \
  do {                                                                 \
    cudaError_t e = (x);                                               \
    if (e != cudaSuccess) {                                            \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      exit(1);                                                         \
    }                                                                  \
  } while (0)

int main() {
  const int64_t P = 65536;  // pages: 4 GB
  __nv_bfloat16* cache;
  CK(cudaMalloc(&cache, P * PAGE_ELEMS * 2));
  CK(cudaMemset(cache, 1, P * PAGE_ELEMS * 2));
  const int TILES_PAGES = 1 << 22;
  std::vector<int> table(TILES_PAGES);
  std::mt19937 rng(1);
  for (auto& x : table) x = rng() % P;
  int* dtable;
  CK(cudaMalloc(&dtable, TILES_PAGES * 4));
  CK(cudaMemcpy(dtable, table.data(), TILES_PAGES * 4, cudaMemcpyHostToDevice));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  CUtensorMap kmap, vmap, kmap8, vmap8;
  const uint64_t dims[4] = {128, 8, 16, uint64_t(P)};
  const int64_t strides[3] = {128, 1024, PAGE_ELEMS};
  const uint32_t box1[4] = {64, 1, 16, 1}, box8[4] = {64, 8, 16, 1};
  CK(encode_tile_map_16bit<4>(&kmap, cache, true, dims, strides, box1));
  CK(encode_tile_map_16bit<4>(&vmap, cache + 16384, true, dims, strides, box1));
  CK(encode_tile_map_16bit<4>(&kmap8, cache, true, dims, strides, box8));
  CK(encode_tile_map_16bit<4>(&vmap8, cache + 16384, true, dims, strides, box8));
  CK(cudaFuncSetAttribute(cpasync_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 3 * 4 * 16384));
  CK(cudaFuncSetAttribute(tma_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  CK(cudaFuncSetAttribute(tma_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int ns[] = {16, 32, 48, 66, 100, 132};
  const int64_t per_cta_bytes = 16 << 20;  // 16 MB per CTA
  for (int mode = 0; mode < 6; ++mode) {
    const char* names[] = {"cpasync 4x3x16K", "tma 1head 4st", "tma 1head 6st",
                           "tma 8head 2st",   "tma 8head 3st", "tma 1head 3st"};
    printf("%-18s", names[mode]);
    for (int n : ns) {
      Params p{cache, dtable, 0, sink};
      float best = 1e9;
      for (int rep = 0; rep < 3; ++rep) {
        cudaEventRecord(a);
        if (mode == 0) {
          p.tiles = per_cta_bytes / 4 / 16384;
          cpasync_kernel<<<n, 512, 3 * 4 * 16384>>>(p);
        } else if (mode == 1 || mode == 2 || mode == 5) {
          const int st = mode == 1 ? 4 : mode == 2 ? 6 : 3;
          p.tiles = per_cta_bytes / 32768;
          tma_kernel<false><<<n, 160, st * 32768 + 1024 + 256>>>(p, kmap, vmap, st);
        } else {
          const int st = mode == 3 ? 2 : 3;
          p.tiles = per_cta_bytes / 65536;
          tma_kernel<true><<<n, 160, st * 65536 + 1024 + 256>>>(p, kmap8, vmap8, st);
        }
        cudaEventRecord(b);
        CK(cudaEventSynchronize(b));
        CK(cudaGetLastError());
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        best = std::min(best, ms);
      }
      const double gbs = double(per_cta_bytes) * n / (best * 1e-3) / 1e9;
      printf("  n=%3d %6.0f GB/s (%5.1f/SM)", n, gbs, gbs / n);
    }
    printf("\n");
  }
  return 0;
}

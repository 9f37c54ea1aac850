// Paged KV cache: page-table lookups and appending new tokens.
//
// A request's token t lives in page kv_indices[kv_indptr[r] + t / page_size], slot t % page_size. The cache
// is addressed with element strides, so one kernel serves both layouts and both cache forms:
//   NHD: element (page, slot, head, d) at page * stride_page + slot * stride_n + head * stride_h + d
//   HND: the same with stride_n < stride_h swapped.
// The single-tensor form [num_pages, 2, ...] is two base pointers (k, v = k + one dim-1 stride) with the
// same strides as the tuple form.
#pragma once
#include "common.cuh"

namespace flashinfer {

// Division by a run-time divisor d in [1, 2^31) of numerators below 2^31, without a divide instruction:
// q = (umulhi(n, m) + n) >> l with l = ceil(log2 d), m = 2^32 (2^l - d) / d + 1.
struct FastDivmod {
  int d;
  uint32_t m;
  int l;

  FastDivmod() = default;
  __host__ explicit FastDivmod(int divisor) : d(divisor) {
    l = 0;
    while ((1ll << l) < divisor) ++l;
    m = static_cast<uint32_t>(((1ull << 32) * ((1ull << l) - divisor)) / divisor + 1);
  }
  FI_DEVICE int div(int n) const { return static_cast<int>((__umulhi(static_cast<uint32_t>(n), m) + n) >> l); }
  FI_DEVICE void divmod(int n, int& q, int& r) const {
    q = div(n);
    r = n - q * d;
  }
};

// Whether `page` names a page of a cache of `num_pages` pages. Every kernel that reads or writes through a
// page table checks each page id with it before forming an address: an id outside [0, num_pages) (negative,
// past the cache, or an int64 id narrowed to -1 by the host) is never dereferenced; its keys read as zeros.
__host__ __device__ __forceinline__ bool page_in_cache(int page, int num_pages) {
  return static_cast<unsigned>(page) < static_cast<unsigned>(num_pages);
}

struct PagedKV {
  const void*
      k;  // element (page, slot, head, d) of K at k + page * stride_page + slot * stride_n + head * stride_h + d
  const void* v;  // same strides as k
  int64_t stride_page, stride_n, stride_h;
  const int* indices;  // page ids, CSR over requests
  int num_pages;       // pages outside [0, num_pages) are never read (their keys count as zeros)
  FastDivmod page_size;
};

struct AppendParams {
  const void* key;  // [nnz, num_heads, HEAD_DIM], row (token) stride key_stride_n, head stride key_stride_h
  const void* value;
  int64_t key_stride_n, key_stride_h, value_stride_n, value_stride_h;
  const int* batch_indices;  // [nnz]
  const int* positions;      // [nnz]
  const int* kv_indptr;      // [batch + 1]
  void* k_cache;             // written through PagedKV's strides
  void* v_cache;
  int64_t stride_page, stride_n, stride_h;
  const int* indices;
  int num_pages, batch_size, nnz, num_heads;
  FastDivmod page_size;
};

// One thread per 16-byte vector: token i, head h, vector c. Entries whose request, position or page fall
// outside the page table are skipped (never an out-of-bounds write).
template <int HEAD_DIM, typename DType>
__global__ void __launch_bounds__(256) append_paged_kv_kernel(const __grid_constant__ AppendParams p) {
  constexpr int VECS = HEAD_DIM / 8;
  const int64_t total = int64_t(p.nnz) * p.num_heads * VECS;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % VECS);
    const int64_t th = idx / VECS;
    const int h = static_cast<int>(th % p.num_heads);
    const int i = static_cast<int>(th / p.num_heads);
    const int r = __ldg(p.batch_indices + i);
    const int pos = __ldg(p.positions + i);
    if (r < 0 || r >= p.batch_size || pos < 0) continue;
    int page_in_req, slot;
    p.page_size.divmod(pos, page_in_req, slot);
    const int first = __ldg(p.kv_indptr + r), last = __ldg(p.kv_indptr + r + 1);
    if (page_in_req >= last - first) continue;
    const int page = __ldg(p.indices + first + page_in_req);
    if (!page_in_cache(page, p.num_pages)) continue;
    const int64_t dst = int64_t(page) * p.stride_page + int64_t(slot) * p.stride_n + int64_t(h) * p.stride_h + c * 8;
    const uint4 kv = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.key) + i * p.key_stride_n +
                                                     h * p.key_stride_h + c * 8);
    const uint4 vv = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.value) + i * p.value_stride_n +
                                                     h * p.value_stride_h + c * 8);
    *reinterpret_cast<uint4*>(static_cast<DType*>(p.k_cache) + dst) = kv;
    *reinterpret_cast<uint4*>(static_cast<DType*>(p.v_cache) + dst) = vv;
  }
}

template <int HEAD_DIM, typename DType>
cudaError_t launch_append_paged_kv(const AppendParams& p, int device, cudaStream_t stream) {
  if (p.nnz == 0 || p.num_heads == 0) return cudaSuccess;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  const int64_t total = int64_t(p.nnz) * p.num_heads * (HEAD_DIM / 8);
  const int64_t blocks = (total + 255) / 256;
  append_paged_kv_kernel<HEAD_DIM, DType><<<static_cast<int>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashinfer

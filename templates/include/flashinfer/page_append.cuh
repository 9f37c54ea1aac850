// Appending new tokens' keys and values to a paged KV cache (paged.cuh describes the cache).
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"

namespace flashinfer {

struct AppendParams {
  const void* key;  // [nnz, num_heads, HEAD_DIM], row (token) stride key_stride_n, head stride key_stride_h
  const void* value;
  int64_t key_stride_n, key_stride_h, value_stride_n, value_stride_h;
  const int* batch_indices;  // [nnz]
  const int* positions;      // [nnz]
  const int* kv_indptr;      // [batch + 1]
  PagedKV cache;             // written
  int batch_size, nnz, num_heads;
};

// Elements of one 16-byte vector: 8 of a 16-bit cache, 16 of an fp8 one (whose rows arrive already quantised).
template <typename DType>
constexpr int append_vec_elems() {
  return 16 / int(sizeof(DType));
}

// One thread per 16-byte vector: token i, head h, vector c. Entries whose request, position or page fall
// outside the page table are skipped (never an out-of-bounds write).
template <int HEAD_DIM, typename DType>
__global__ void __launch_bounds__(256) append_paged_kv_kernel(const __grid_constant__ AppendParams p) {
  constexpr int ELEMS = append_vec_elems<DType>();
  constexpr int VECS = HEAD_DIM / ELEMS;
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
    int page_in_req, slot, page;
    split_token(pos, p.cache.page_size, page_in_req, slot);
    const int first = __ldg(p.kv_indptr + r), last = __ldg(p.kv_indptr + r + 1);
    if (page_in_req >= last - first) continue;
    if (!p.cache.page_id(p.cache.indices + first, page_in_req, page)) continue;
    const int64_t dst = p.cache.offset(page, slot, h) + c * ELEMS;
    const uint4 kv = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.key) + i * p.key_stride_n +
                                                     h * p.key_stride_h + c * ELEMS);
    const uint4 vv = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.value) + i * p.value_stride_n +
                                                     h * p.value_stride_h + c * ELEMS);
    *reinterpret_cast<uint4*>(static_cast<DType*>(p.cache.k) + dst) = kv;
    *reinterpret_cast<uint4*>(static_cast<DType*>(p.cache.v) + dst) = vv;
  }
}

template <int HEAD_DIM, typename DType>
cudaError_t launch_append_paged_kv(const AppendParams& p, int device, cudaStream_t stream) {
  if (p.nnz == 0 || p.num_heads == 0) return cudaSuccess;
  return with_device(device, [&]() -> cudaError_t {
    const int64_t total = int64_t(p.nnz) * p.num_heads * (HEAD_DIM / append_vec_elems<DType>());
    const int64_t blocks = (total + 255) / 256;
    append_paged_kv_kernel<HEAD_DIM, DType><<<static_cast<int>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace flashinfer

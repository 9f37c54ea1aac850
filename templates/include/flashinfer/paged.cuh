// Paged KV cache addressing: one description of the cache (PagedKV) and one page-table lookup, shared by the
// kernels that read the cache (batch decode, batch prefill) and the one that writes it (page append).
//
// A request's token t lives in page kv_indices[kv_indptr[r] + t / page_size], slot t % page_size. The cache
// is addressed with element strides, so one kernel serves both layouts and both cache forms:
//   NHD: element (page, slot, head, d) at page * stride_page + slot * stride_n + head * stride_h + d
//   HND: the same with stride_n < stride_h swapped.
// The single-tensor form [num_pages, 2, ...] is two base pointers (k, v = k + one dim-1 stride) with the
// same strides as the tuple form.
#pragma once
#include "flashinfer/common.cuh"

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

// Token `token` of a request -> (page_in_request, slot): by a precomputed FastDivmod, or by a plain int page
// size (kernels whose launch ABI passes only the int; the lookup runs once per row, ahead of its use).
FI_DEVICE void split_token(int token, const FastDivmod& page_size, int& page_in_request, int& slot) {
  page_size.divmod(token, page_in_request, slot);
}
FI_DEVICE void split_token(int token, int page_size, int& page_in_request, int& slot) {
  page_in_request = token / page_size;
  slot = token - page_in_request * page_size;
}

// Number of tokens of a request with num_request_pages >= 1 pages, the last of them holding last_page_len.
__host__ __device__ inline int paged_kv_len(int num_request_pages, int page_size, int last_page_len) {
  return num_request_pages > 0 ? (num_request_pages - 1) * page_size + last_page_len : 0;
}

struct PagedKV {
  void* k;  // element (page, slot, head, d) of K at k + page * stride_page + slot * stride_n + head * stride_h + d
  void* v;  // same strides as k
  int64_t stride_page, stride_n, stride_h;
  const int* indices;  // page ids, CSR over requests
  int num_pages;       // pages outside [0, num_pages) are never read nor written (keys there count as zeros)
  FastDivmod page_size;

  // The page id at pages[page_in_request] (pages: a request's page ids); false when it lies outside
  // [0, num_pages).
  FI_DEVICE bool page_id(const int* pages, int page_in_request, int& page) const {
    page = __ldg(pages + page_in_request);
    return page_in_cache(page, num_pages);
  }

  // Page id and slot of token `token` of the request whose page ids start at `pages`; false when its page id
  // lies outside [0, num_pages).
  FI_DEVICE bool locate(const int* pages, int token, int& page, int& slot) const {
    int page_in_request;
    split_token(token, page_size, page_in_request, slot);
    return page_id(pages, page_in_request, page);
  }

  // Element offset of (page, slot, head) from k or v.
  FI_DEVICE int64_t offset(int page, int slot, int head) const {
    return int64_t(page) * stride_page + int64_t(slot) * stride_n + int64_t(head) * stride_h;
  }
};

}  // namespace flashinfer

// Shared-memory addressing (cvta): the 32-bit shared-window address of a generic pointer into shared memory,
// what cp.async, ldmatrix and the wgmma descriptors take (cheaper than generic pointers in unrolled loops).
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

FI_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

}  // namespace flashinfer

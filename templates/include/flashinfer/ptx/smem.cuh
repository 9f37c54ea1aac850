// Shared-memory addressing (cvta): the 32-bit shared-window address of a generic pointer into shared memory,
// what cp.async, ldmatrix and the wgmma descriptors take (cheaper than generic pointers in unrolled loops).
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

FI_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// One 32-bit load from a shared-window address (volatile: stays after the barrier that publishes the data, as
// the ldmatrix loads do).
FI_DEVICE uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

}  // namespace flashinfer

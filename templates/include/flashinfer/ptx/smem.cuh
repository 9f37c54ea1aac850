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

// 16-byte load / store at a shared-window address (volatile: each stays where it is written relative to the other
// volatile accesses and barriers around it, so that a producer can batch its loads ahead of its stores).
FI_DEVICE uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
FI_DEVICE void st_shared_v4(uint32_t addr, const uint4& v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

}  // namespace flashinfer

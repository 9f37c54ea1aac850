// cp.async (sm_80+): 16-byte global->shared copies that bypass registers, grouped into pipeline stages.
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/ptx/smem.cuh"

namespace flashinfer {

// Copies 16 bytes to the shared-memory address saddr, or writes 16 zero bytes when !pred (so out-of-range rows
// hold finite data).
FI_DEVICE void cp_async_16(uint32_t saddr, const void* gmem_ptr, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem_ptr), "r"(src_size) : "memory");
}
FI_DEVICE void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool pred) {
  cp_async_16(smem_addr(smem_ptr), gmem_ptr, pred);
}

FI_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
FI_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace flashinfer

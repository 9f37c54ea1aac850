// cp.async (sm_80+): 16-byte global->shared copies that bypass registers, grouped into pipeline stages.
#pragma once
#include "common.cuh"

namespace flashinfer {

// Copies 16 bytes, or writes 16 zero bytes when !pred (so out-of-range rows hold finite data).
FI_DEVICE void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool pred) {
  const uint32_t saddr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_ptr));
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem_ptr), "r"(src_size) : "memory");
}

FI_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
FI_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Commit-group schedule of the prefill kernels' double-buffered K/V: the prologue commits K(0), V(0), K(1)
// (after whatever the caller has issued, e.g. Q); iteration n then commits V(n+1) and K(n+2). Groups stay
// in that order even when a tile does not exist (empty groups), so the wait counts never change.
// load_kv(tile, is_v) issues one tile's copies.
template <typename LoadKV>
FI_DEVICE void kv_pipeline_prologue(int num_tiles, LoadKV&& load_kv) {
  if (num_tiles > 0) load_kv(0, false);
  cp_async_commit();
  if (num_tiles > 0) load_kv(0, true);
  cp_async_commit();
  if (num_tiles > 1) load_kv(1, false);
  cp_async_commit();
}

// Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start while its
// predecessor drains; it must wait here before reading what the predecessor wrote.
FI_DEVICE void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

FI_DEVICE void grid_dependency_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace flashinfer

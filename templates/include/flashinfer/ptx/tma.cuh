// Tensor memory accelerator (TMA, sm_90): bulk tensor copies global -> shared described by a CUtensorMap (built
// on the host: host/tma.cuh), completing on an mbarrier (ptx/mbarrier.cuh) by transaction bytes.
//
// A copy writes its box in the tensor map's shared-memory layout; with CU_TENSOR_MAP_SWIZZLE_128B and a box
// 64 16-bit elements (128 bytes) wide, that is exactly the wgmma tile layout of wgmma.cuh (rows of 128 bytes,
// 16-byte chunk c of row r at c ^ (r & 7), destination 1024-byte aligned). Box elements outside the tensor
// are written as zeros and still count as transaction bytes, so a box that runs past the end of the keys
// completes with the same byte count as a full one.
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {
namespace sm90 {

// Copies the box at coordinates (c0, c1, c2) (innermost first, in elements) of the 3-D tensor `tensor_map` (the
// generic address of a __grid_constant__ CUtensorMap parameter) to shared address dst, and adds its bytes to
// mbarrier bar's completed transactions. Issued by one thread.
FI_DEVICE void tma_load_3d(uint32_t dst, const void* tensor_map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// The same for a 4-D tensor (coordinates c0..c3, innermost first).
FI_DEVICE void tma_load_4d(uint32_t dst, const void* tensor_map, int c0, int c1, int c2, int c3, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Pulls a tensor map into the TMA unit's descriptor cache ahead of its first use.
FI_DEVICE void tma_prefetch_map(const void* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map)) : "memory");
}

}  // namespace sm90
}  // namespace flashinfer

// Host side of TMA: encoding a CUtensorMap. The driver's cuTensorMapEncodeTiled is reached through the runtime's
// driver entry point (no libcuda link; the module keeps linking the runtime only). The map travels to the kernel
// as a __grid_constant__ parameter (ptx/tma.cuh reads it there).
//
// Host-side helpers are `static` (see host/launch.cuh: function-local caches must belong to this module alone).
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flashinfer {

// The driver's cuTensorMapEncodeTiled (the CUDA 12.0 ABI of it), looked up once; nullptr if the driver lacks it.
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static bool looked_up = false;
  if (!looked_up) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess) {
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }
    looked_up = true;
  }
  return fn;
}

// The tensor map of a 3-D tensor of 16-bit elements (bf16 when `bf16`, else fp16): dims[0] contiguous elements,
// dims[1] rows `stride1` elements apart, dims[2] planes `stride2` elements apart; boxes of box[0] x box[1] x
// box[2] elements, 128-byte swizzled in shared memory (box[0] * 2 must be 128), out-of-range elements read as
// zero. TMA needs the base and both strides in bytes to be multiples of 16 (the caller checks them first and
// says so; cudaErrorInvalidValue here otherwise).
static cudaError_t encode_tile_map_3d_16bit(CUtensorMap* map, const void* base, bool bf16, const uint64_t (&dims)[3],
                                            int64_t stride1, int64_t stride2, const uint32_t (&box)[3]) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || stride1 <= 0 || stride2 <= 0 || (stride1 * 2) % 16 != 0 ||
      (stride2 * 2) % 16 != 0 || box[0] * 2 != 128)
    return cudaErrorInvalidValue;
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t gdim[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t gstride[2] = {cuuint64_t(stride1) * 2, cuuint64_t(stride2) * 2};  // bytes, dims 1 and 2
  const cuuint32_t bdim[3] = {box[0], box[1], box[2]};
  const cuuint32_t estride[3] = {1, 1, 1};
  const CUresult r =
      encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<void*>(base),
             gdim, gstride, bdim, estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace flashinfer

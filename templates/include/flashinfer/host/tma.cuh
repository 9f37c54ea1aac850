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

// The tensor map of a 3-D tensor of `elem_bytes`-byte elements of type `dtype`: dims[0] contiguous elements, dims[1]
// rows `stride1` elements apart, dims[2] planes `stride2` elements apart; boxes of box[0] x box[1] x box[2] elements,
// out-of-range elements read as zero. With CU_TENSOR_MAP_SWIZZLE_128B a box row must be 128 bytes (box[0] *
// elem_bytes == 128: the wgmma tile layout); unswizzled, a multiple of 16 bytes up to 256 elements (rows land one
// after the other). TMA needs the base and both strides in bytes to be multiples of 16 (the caller checks them first
// and says so; cudaErrorInvalidValue here otherwise).
static cudaError_t encode_tile_map_3d(CUtensorMap* map, const void* base, CUtensorMapDataType dtype, int elem_bytes,
                                      const uint64_t (&dims)[3], int64_t stride1, int64_t stride2,
                                      const uint32_t (&box)[3], CUtensorMapSwizzle swizzle) {
  const uint32_t row_bytes = box[0] * uint32_t(elem_bytes);
  const bool row_ok = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? row_bytes == 128 : row_bytes % 16 == 0 && box[0] <= 256;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || stride1 <= 0 || stride2 <= 0 || (stride1 * elem_bytes) % 16 != 0 ||
      (stride2 * elem_bytes) % 16 != 0 || !row_ok)
    return cudaErrorInvalidValue;
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t gdim[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t gstride[2] = {cuuint64_t(stride1) * elem_bytes, cuuint64_t(stride2) * elem_bytes};  // bytes
  const cuuint32_t bdim[3] = {box[0], box[1], box[2]};
  const cuuint32_t estride[3] = {1, 1, 1};
  const CUresult r =
      encode(map, dtype, 3, const_cast<void*>(base), gdim, gstride, bdim, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
             swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// A 3-D tensor of 16-bit elements (bf16 when `bf16`, else fp16) as encode_tile_map_3d describes, boxes 64 elements
// (128 bytes) wide, 128-byte swizzled in shared memory: the wgmma tile layout.
static cudaError_t encode_tile_map_3d_16bit(CUtensorMap* map, const void* base, bool bf16, const uint64_t (&dims)[3],
                                            int64_t stride1, int64_t stride2, const uint32_t (&box)[3]) {
  return encode_tile_map_3d(map, base, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            dims, stride1, stride2, box, CU_TENSOR_MAP_SWIZZLE_128B);
}

// A 3-D tensor of bytes (fp8 elements, which TMA only copies) as encode_tile_map_3d describes, boxes unswizzled:
// rows of box[0] bytes one after the other in shared memory.
static cudaError_t encode_tile_map_3d_8bit(CUtensorMap* map, const void* base, const uint64_t (&dims)[3],
                                           int64_t stride1, int64_t stride2, const uint32_t (&box)[3]) {
  return encode_tile_map_3d(map, base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, dims, stride1, stride2, box,
                            CU_TENSOR_MAP_SWIZZLE_NONE);
}

}  // namespace flashinfer

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

// The tensor map of an N-D tensor (N = 3 or 4) of `elem_bytes`-byte elements of type `dtype`: dims[0] contiguous
// elements, dimension i >= 1 strides[i - 1] elements apart; boxes of box[0] x ... x box[N - 1] elements,
// out-of-range elements (a coordinate outside [0, dims[i]), negative included) read as zero while still counting
// toward the box's transaction bytes. With CU_TENSOR_MAP_SWIZZLE_128B a box row must be 128 bytes (box[0] *
// elem_bytes == 128: the wgmma tile layout); unswizzled, a multiple of 16 bytes up to 256 elements (rows land one
// after the other). TMA needs the base and every stride in bytes to be multiples of 16 (callers check them first
// and say so; cudaErrorInvalidValue here otherwise).
template <int N>
static cudaError_t encode_tile_map(CUtensorMap* map, const void* base, CUtensorMapDataType dtype, int elem_bytes,
                                   const uint64_t (&dims)[N], const int64_t (&strides)[N - 1], const uint32_t (&box)[N],
                                   CUtensorMapSwizzle swizzle) {
  static_assert(N >= 2 && N <= 5, "cuTensorMapEncodeTiled takes ranks 1 to 5");
  const uint32_t row_bytes = box[0] * uint32_t(elem_bytes);
  const bool row_ok = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? row_bytes == 128 : row_bytes % 16 == 0 && box[0] <= 256;
  bool ok = reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_ok;
  for (int i = 0; i < N - 1; ++i) ok = ok && strides[i] > 0 && (strides[i] * elem_bytes) % 16 == 0;
  if (!ok) return cudaErrorInvalidValue;
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint64_t gdim[N], gstride[N - 1];
  cuuint32_t bdim[N], estride[N];
  for (int i = 0; i < N; ++i) {
    gdim[i] = dims[i];
    bdim[i] = box[i];
    estride[i] = 1;
    if (i < N - 1) gstride[i] = cuuint64_t(strides[i]) * elem_bytes;  // bytes
  }
  const CUresult r =
      encode(map, dtype, N, const_cast<void*>(base), gdim, gstride, bdim, estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
             swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// An N-D tensor of 16-bit elements (bf16 when `bf16`, else fp16) as encode_tile_map describes, boxes 64 elements
// (128 bytes) wide, 128-byte swizzled in shared memory: the wgmma tile layout.
template <int N>
static cudaError_t encode_tile_map_16bit(CUtensorMap* map, const void* base, bool bf16, const uint64_t (&dims)[N],
                                         const int64_t (&strides)[N - 1], const uint32_t (&box)[N]) {
  return encode_tile_map<N>(map, base, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B);
}

// An N-D tensor of bytes (fp8 elements, which TMA only copies) as encode_tile_map describes, boxes unswizzled: rows
// of box[0] bytes one after the other in shared memory.
template <int N>
static cudaError_t encode_tile_map_8bit(CUtensorMap* map, const void* base, const uint64_t (&dims)[N],
                                        const int64_t (&strides)[N - 1], const uint32_t (&box)[N]) {
  return encode_tile_map<N>(map, base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, dims, strides, box,
                            CU_TENSOR_MAP_SWIZZLE_NONE);
}

}  // namespace flashinfer

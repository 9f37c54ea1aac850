// Emulated ptx/cp_async.cuh for tests/sampling_emulator (see emu.h): the copies happen at once, and a source
// outside the input tensor fails the launch (see emu::global_readable).
#pragma once
#include "emu.h"
#include "flashinfer/common.cuh"

namespace flashinfer {

FI_DEVICE void cp_async_16(void* smem_ptr, const void* gmem_ptr, bool pred) {
  if (pred && ::emu::global_readable(gmem_ptr, 16)) {
    std::memcpy(smem_ptr, gmem_ptr, 16);
  } else {
    std::memset(smem_ptr, 0, 16);
  }
}
FI_DEVICE void cp_async_commit() {}
template <int N>
FI_DEVICE void cp_async_wait() {}

}  // namespace flashinfer

// Warp specialisation on Hopper (sm_90a): moving registers between warpgroups (setmaxnreg) and barriers among a
// subset of the block's warps (named barriers).
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {
namespace sm90 {

// Every thread of the executing warpgroup gives up registers down to N per thread (a producer that only issues
// copies), or takes up to N (the MMA warpgroups), out of the pool the block was launched with. N is a multiple
// of 8 in [24, 256]; all warps of the warpgroup execute the same instruction.
template <int N>
FI_DEVICE void setmaxnreg_dec() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
FI_DEVICE void setmaxnreg_inc() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg takes a multiple of 8 in [24, 256]");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Waits until `threads` threads (a multiple of 32: whole warps) have reached named barrier `id` (1..15; 0 is
// __syncthreads'). Orders their shared-memory accesses like __syncthreads does for the whole block.
FI_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives at named barrier `id` without waiting: the producer side of a barrier that other warps bar.sync on (with
// `threads` counting both the arriving and the waiting threads).
FI_DEVICE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sm90
}  // namespace flashinfer

// Shared-memory mbarriers (sm_90): the completion objects of a producer/consumer pipeline in shared memory.
//
// An mbarrier counts arrivals (and, for TMA, transaction bytes) towards the completion of its current phase;
// when `count` threads have arrived and every expected byte has landed, the phase completes and the next one
// begins. Phases alternate parity 0, 1, 0, ... A waiter names the parity of the phase it waits for:
// try_wait.parity(p) returns once the phase of parity p has completed, i.e. as soon as the barrier's current
// phase has parity != p. A freshly initialised barrier is in phase 0 (incomplete), so waiting for parity 1
// returns at once: that is how a producer's first pass over an empty ring goes through without any consumer
// having released a slot yet (see attention/prefill_sm90_ws.cuh for the schedule of who waits on what).
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/ptx/smem.cuh"

namespace flashinfer {
namespace sm90 {

// By one thread, before any other thread touches the barrier (then mbarrier_init_fence and a block barrier).
FI_DEVICE void mbarrier_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads and to the async proxy (TMA's complete_tx).
FI_DEVICE void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// One arrival (release semantics: this thread's earlier writes are visible to whoever waits on the phase).
FI_DEVICE void mbarrier_arrive(uint32_t bar) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
      : "memory");
}

// One arrival that also tells the phase to expect `bytes` more transaction bytes (the TMA copies that will
// complete_tx on this barrier); the phase completes when they have all landed.
FI_DEVICE void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}

// An arrival, made once every cp.async this thread has issued so far has landed, without waiting for them here
// (.noinc: the barrier's expected count includes these arrivals). The copies are generic-proxy writes: a reader
// through the async proxy (wgmma) fences after its wait (fence_async_shared).
FI_DEVICE void cp_async_mbarrier_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Whether the phase of parity `parity` has completed (one bounded hardware wait; acquire semantics).
FI_DEVICE bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// The same test, but the thread may be suspended for up to `suspend_ns` (a hint) until the phase completes, instead
// of returning after the hardware's own short wait: a waiter then stops issuing instructions. Only for a warp whose
// active threads all wait here: a suspended path of a diverged warp could hold back the warp's other path.
FI_DEVICE bool mbarrier_try_wait_suspend(uint32_t bar, uint32_t parity, uint32_t suspend_ns) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2, %3;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity), "r"(suspend_ns)
      : "memory");
  return done != 0;
}

// Blocks until the phase of parity `parity` has completed.
FI_DEVICE void mbarrier_wait(uint32_t bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// The same wait, but a pipeline that never completes the phase (a deadlock: a lost arrival, a wrong parity, a TMA
// byte count that never adds up) traps after timeout_ns of global time instead of hanging the GPU: the launch
// then fails with cudaErrorLaunchFailure. The clock is only read on the retry path. With FI_MBARRIER_DEBUG defined,
// the trapping thread first prints the barrier's shared address, the parity and `tag` (the caller's own code).
// suspend_ns > 0: the retries suspend the thread up to that long (mbarrier_try_wait_suspend: converged warps only).
FI_DEVICE void mbarrier_wait_bounded(uint32_t bar, uint32_t parity, uint64_t timeout_ns, int tag,
                                     uint32_t suspend_ns = 0) {
  if (mbarrier_try_wait(bar, parity)) return;
  uint64_t start;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(start));
  while (suspend_ns > 0 ? !mbarrier_try_wait_suspend(bar, parity, suspend_ns) : !mbarrier_try_wait(bar, parity)) {
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
    if (now - start > timeout_ns) {
#ifdef FI_MBARRIER_DEBUG
      printf("mbarrier wait timed out: block %d thread %d barrier 0x%x parity %u tag %d\n", int(blockIdx.x),
             int(threadIdx.x), bar, parity, tag);
#endif
      __trap();
    }
  }
}

}  // namespace sm90
}  // namespace flashinfer

// Programmatic dependent launch (griddepcontrol, sm_90): the device side. A kernel launched with the PDL
// attribute (host/launch.cuh: launch_kernel with pdl) may start while its predecessor in the stream drains;
// it must wait before reading what the predecessor wrote, and may let its own dependents start early.
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

// Blocks until the preceding grid has completed and its memory is visible (a no-op before sm_90, and when
// the kernel was launched without PDL).
FI_DEVICE void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream (if launched with PDL) be scheduled now; it still waits for this grid's
// completion in its own grid_dependency_wait().
FI_DEVICE void grid_dependency_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The start of a kernel in a chain of PDL launches: wait for the predecessor's writes, then let the successor
// be scheduled (it waits in turn for this grid's completion before reading anything).
FI_DEVICE void grid_dependency_chain() {
  grid_dependency_wait();
  grid_dependency_launch_dependents();
}

}  // namespace flashinfer

// Host side of a launch: the device guard, the SM count, the once-per-device kernel setup (shared-memory
// opt-in and occupancy) and the launch itself (with programmatic dependent launch where asked).
//
// Host-side helpers are `static`: their function-local caches must belong to this module alone. (As inline
// functions, or non-static templates, they would become GNU "unique" symbols, shared by every module loaded
// into the process, and a module would skip the shared-memory opt-in of its own kernel.)
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace flashinfer {

// Cached per device: asking the driver on every call would cost more than the launch itself.
static int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 1;
    cache[device] = n;
  }
  return cache[device];
}

// Switches to `device` for its lifetime (launches go to the tensors' device, not the current one).
struct DeviceGuard {
  int previous = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&previous);
    if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (previous >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != previous) cudaSetDevice(previous);
  }
};

// Runs fn under a DeviceGuard for `device`.
template <typename F>
static cudaError_t with_device(int device, F&& fn) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  return fn();
}

// Opts KERNEL in to `smem_bytes` of dynamic shared memory (required above 48 KB) and returns in *occupancy (if
// not null) its resident CTAs per SM at `threads` threads per CTA. Done once per device and cached: asking the
// driver on every call would cost more than the launch itself. One cache per kernel (the template argument).
template <auto KERNEL>
static cudaError_t kernel_occupancy(int threads, int smem_bytes, int device, int* occupancy) {
  static int cache[64] = {0};
  int& occ = cache[device >= 0 && device < 64 ? device : 0];
  if (occ == 0) {
    cudaError_t err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, KERNEL, threads, smem_bytes);
    if (err != cudaSuccess) return err;
    occ = n > 0 ? n : 1;
  }
  if (occupancy != nullptr) *occupancy = occ;
  return cudaSuccess;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx, as a programmatic
// dependent launch when `pdl` (sm_90+: the kernel may be scheduled while its predecessor on the stream drains,
// so it must call grid_dependency_wait() (ptx/griddepcontrol.cuh) before reading memory the predecessor writes).
template <typename... Params, typename... Args>
static cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                 bool pdl, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace flashinfer

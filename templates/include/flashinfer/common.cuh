// Shared device utilities: 16-byte vectors of 16-bit floats, fast exp2/log2, warp reductions.
// Framework-agnostic: raw pointers only, no torch headers (they cost a minute of compile time).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define FI_DEVICE __device__ __forceinline__
#define FI_EXPORT __attribute__((visibility("default")))

namespace flashinfer {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// ex2.approx has ~2 ulp error and maps -inf to +0, which is what the online softmax wants.
FI_DEVICE float ptx_exp2(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

FI_DEVICE float ptx_log2(float x) {
  float y;
  asm volatile("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Eight 16-bit values packed in 16 bytes <-> eight floats.
FI_DEVICE void unpack8(const uint4& raw, float (&out)[8], __nv_bfloat16 /*tag*/) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 -> f32 is a 16-bit shift: cheaper than the conversion intrinsics.
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

FI_DEVICE void unpack8(const uint4& raw, float (&out)[8], __half /*tag*/) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
    float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
FI_DEVICE T from_float(float x);
template <>
FI_DEVICE __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FI_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
FI_DEVICE float to_float(T x);
template <>
FI_DEVICE float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
FI_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
FI_DEVICE uint4 pack8(const float (&in)[8]) {
  uint4 raw;
  T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = from_float<T>(in[i]);
  return raw;
}

// N consecutive 16-bit floats moved with one memory access and unpacked to floats when used: N = 8 is a
// 16-byte vector (the fast path; the address must be 16-byte aligned), N = 1 a single element (rows of any
// size or alignment). Keeping the packed form in registers costs a quarter of the registers of floats.
template <typename T, int N>
struct Chunk;

template <typename T>
struct Chunk<T, 8> {
  uint4 raw;
  FI_DEVICE void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  FI_DEVICE void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
  FI_DEVICE void to_floats(float (&f)[8]) const { unpack8(raw, f, T{}); }
  FI_DEVICE void from_floats(const float (&f)[8]) { raw = pack8<T>(f); }
};

template <typename T>
struct Chunk<T, 1> {
  T raw;
  FI_DEVICE void load(const T* p) { raw = *p; }
  FI_DEVICE void store(T* p) const { *p = raw; }
  FI_DEVICE void to_floats(float (&f)[1]) const { f[0] = to_float<T>(raw); }
  FI_DEVICE void from_floats(const float (&f)[1]) { raw = from_float<T>(f[0]); }
};

template <typename T, int N>
FI_DEVICE void load_floats(const T* p, float (&out)[N]) {
  Chunk<T, N> c;
  c.load(p);
  c.to_floats(out);
}

template <typename T, int N>
FI_DEVICE void store_floats(T* p, const float (&in)[N]) {
  Chunk<T, N> c;
  c.from_floats(in);
  c.store(p);
}

// Sum over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
template <int WIDTH>
FI_DEVICE float group_sum(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Reduces GT per-head partial sums across groups of WIDTH lanes at once: each exchange step hands half
// of the remaining heads to the partner lane, so GT heads cost GT - 1 + log2(WIDTH / GT) shuffles
// instead of GT * log2(WIDTH). Returns the full sum of head (lane % WIDTH) / (WIDTH / GT); the
// WIDTH / GT lanes that share a head hold the same value.
template <int GT, int WIDTH>
FI_DEVICE float transpose_group_sum(float (&part)[GT], int lane) {
  static_assert(GT >= 1 && GT <= WIDTH && (GT & (GT - 1)) == 0 && (WIDTH & (WIDTH - 1)) == 0, "powers of two");
#pragma unroll
  for (int n = GT, offset = WIDTH / 2; n > 1; n /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float keep = upper ? part[i + n / 2] : part[i];
      const float send = upper ? part[i] : part[i + n / 2];
      part[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
  return group_sum<WIDTH / GT>(part[0]);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Host-side helpers are `static`: their function-local caches must belong to this module alone. (As
// inline functions they would become GNU "unique" symbols, shared by every module loaded into the
// process, and a module would skip the shared-memory opt-in of its own kernel.)

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

// Launches kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when `pdl` (sm_90+:
// the kernel may start while its predecessor on the stream drains, so it must call grid_dependency_wait() before
// reading memory the predecessor writes).
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
  return cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
}

// What a module tells Python about itself (flashinfer/jit/abi.py reads these through the common exports that
// templates/module_exports.jinja renders): named compile-time constants and the texts of its own error codes.
struct ModuleConstant {
  const char* name;
  int64_t value;
};
struct ModuleError {
  int code;
  const char* message;
};

template <int N>
static int copy_module_constants(const ModuleConstant (&table)[N], const char** names, int64_t* values, int capacity) {
  if (capacity < N) return -1;
  for (int i = 0; i < N; ++i) {
    names[i] = table[i].name;
    values[i] = table[i].value;
  }
  return N;
}

template <int N>
static const char* module_error_string(const ModuleError (&table)[N], int error) {
  for (int i = 0; i < N; ++i) {
    if (table[i].code == error) return table[i].message;
  }
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace flashinfer

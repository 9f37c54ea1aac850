// What every kernel header uses: the FI_ macros, float constants, conversions between floats and 16-bit
// vector types (16-byte chunks of eight, registers of two), the fp8 (e4m3/e5m2) KV conversions, warp reductions.
// Framework-agnostic: raw pointers only, no torch headers (they cost a minute of compile time).
// Layout of include/flashinfer/: ptx/ (one PTX instruction family per header), attention/ (the attention
// primitives and kernels), paged.cuh (page-table addressing), host/ (launch helpers, module exports, schedulers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#define FI_DEVICE __device__ __forceinline__
#define FI_EXPORT __attribute__((visibility("default")))

namespace flashinfer {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

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

// ---- fp8 KV caches: __nv_fp8_e4m3 / __nv_fp8_e5m2 serve as type tags (a stored element is one byte).

template <typename T>
struct is_fp8 {
  static constexpr bool value = false;
};
template <>
struct is_fp8<__nv_fp8_e4m3> {
  static constexpr bool value = true;
};
template <>
struct is_fp8<__nv_fp8_e5m2> {
  static constexpr bool value = true;
};

// Four fp8 values in one 32-bit word (element 0 in the low byte) -> two f16x2 registers holding elements (0, 1)
// and (2, 3), element 0 / 2 in the low halves. Exact: every e4m3 and e5m2 value is a float16. sm_89+ converts a
// pair per instruction (cvt.rn.f16x2.e4m3x2 / .e5m2x2); older targets take cuda_fp8.h's emulation.
FI_DEVICE void fp8x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi, __nv_fp8_e4m3 /*tag*/) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#else
  const __half2_raw a = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  const __half2_raw b = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
  lo = a.x | (uint32_t(a.y) << 16);
  hi = b.x | (uint32_t(b.y) << 16);
#endif
}

// e5m2 without a conversion instruction: an e5m2 byte is the high byte of the float16 of the same value (same sign,
// exponent field and bias; two of float16's ten mantissa bits), NaN and infinity included. One byte permute per
// register (the fa3_ws producer's e5m2 widening; every target below sm_89).
FI_DEVICE void e5m2x4_to_half2x2_permute(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404);  // bytes 0, 1 -> bits 8..15, 24..31
  hi = __byte_perm(w, 0u, 0x3424);  // bytes 2, 3
}

FI_DEVICE void fp8x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi, __nv_fp8_e5m2 /*tag*/) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e5m2x2 %0, l;\ncvt.rn.f16x2.e5m2x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#else
  e5m2x4_to_half2x2_permute(w, lo, hi);
#endif
}

// Eight fp8 values packed in 8 bytes -> eight floats (through exact float16s).
template <typename T>
FI_DEVICE void unpack8(const uint2& raw, float (&out)[8], T tag) {
  static_assert(is_fp8<T>::value, "8-byte vectors hold fp8 elements");
  const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint32_t h[2];
    fp8x4_to_half2x2(w[i], h[0], h[1], tag);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h[j]));
      out[4 * i + 2 * j] = f.x;
      out[4 * i + 2 * j + 1] = f.y;
    }
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

// Two floats -> one register of two 16-bit values (x in the low half): the operand form of mma/wgmma.
template <typename T>
FI_DEVICE uint32_t pack2(float x, float y);

template <>
FI_DEVICE uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
FI_DEVICE uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Two floats -> float16x2 (x in the low half), clamped to +-65504 rather than overflowing to infinity: how the fp8
// kernels, which compute in float16, take a q element beyond float16's range (one that large saturates any
// softmax anyway).
FI_DEVICE uint32_t pack2_half_clamped(float x, float y) {
  return pack2<__half>(fminf(fmaxf(x, -65504.f), 65504.f), fminf(fmaxf(y, -65504.f), 65504.f));
}

FI_DEVICE float2 unpack2_half(uint32_t r) { return __half22float2(*reinterpret_cast<__half2*>(&r)); }

// One f16x2 register holding two values exactly representable in bfloat16 (they came from fp8) -> bf16x2.
FI_DEVICE uint32_t half2_to_bf16x2_exact(uint32_t h) {
  const float2 f = unpack2_half(h);
  return pack2<__nv_bfloat16>(f.x, f.y);
}

// Eight fp8 values (8 bytes, element 0 in the low byte) -> one 16-byte chunk of eight T (__half or
// __nv_bfloat16): how the prefill kernels widen an fp8 K/V tile into their 16-bit shared-memory layout. Exact
// for both targets: every e4m3 and e5m2 value is a float16 and a bfloat16.
template <typename T, typename F8>
FI_DEVICE uint4 fp8x8_to_chunk(const uint2& raw) {
  static_assert(is_fp8<F8>::value, "F8: __nv_fp8_e4m3 or __nv_fp8_e5m2");
  uint4 out;
  fp8x4_to_half2x2(raw.x, out.x, out.y, F8{});
  fp8x4_to_half2x2(raw.y, out.z, out.w, F8{});
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    out.x = half2_to_bf16x2_exact(out.x);
    out.y = half2_to_bf16x2_exact(out.y);
    out.z = half2_to_bf16x2_exact(out.z);
    out.w = half2_to_bf16x2_exact(out.w);
  } else {
    static_assert(std::is_same<T, __half>::value, "T: __half or __nv_bfloat16");
  }
  return out;
}

// The 16-bit type a kernel computes with for a KV cache of type TKV next to queries of type TQ: TKV itself,
// or for an fp8 cache q's type (the tile is widened to it, exactly, before the tensor cores read it).
template <typename TQ, typename TKV>
using kv_compute_t = typename std::conditional<is_fp8<TKV>::value, TQ, TKV>::type;

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

// Sum over the four lanes of a quad (lane ^ 1, then lane ^ 2): the lanes that share one row of an mma.sync or
// wgmma accumulator fragment.
FI_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// Sum over the eight lanes of one column pair of an mma.sync accumulator fragment (lane ^ 4, ^ 8, ^ 16: the lanes
// that share lane % 4).
FI_DEVICE float column_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 16);
  return x;
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace flashinfer

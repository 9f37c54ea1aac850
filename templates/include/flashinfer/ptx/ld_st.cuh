// Global loads and stores of 16-byte vectors with cache hints, for data a kernel streams through once (the
// per-token ops' inputs, read once, and outputs, written once). One helper per hinted access; the ops headers
// call them through load_streamed / store_floats_streamed.
//
// Which hint is a development knob (issue 14; benchmarks/probe_ops.py times each against the plain access):
//   FI_OPS_LOAD_HINT   0: plain ld.global (cached in L1 and L2)
//                      1: ld.global.nc.L1::no_allocate (read-only path, no L1 line for data never re-read)
//                      2: 1, with an L2 evict_first policy (createpolicy + .L2::cache_hint)
//                      3: ld.global with the L2 evict_first policy only (L1 as plain)
//                      4: ld.global.nc (read-only path, L1 allocated: what a const __restrict__ load compiles to)
//   FI_OPS_STORE_HINT  0: plain st.global
//                      1: st.global.cs (evict-first in L2)
//                      2: st.global.L1::no_allocate with the L2 evict_first policy
//   FI_OPS_HINT_MIN_L2_PCT: the L2 priorities (load modes 2, 3; store modes) apply only to launches whose op
//                      moves more bytes than this percentage of the L2 (streaming_hints below; 0: every
//                      launch); below that the data fit in the L2, where evict-first would only make the next
//                      kernel (the GEMM reading this output) miss. The L1 forms (nc, no_allocate) are local to
//                      the kernel and always apply. No branch: the L2 policy is a value (evict_first or
//                      evict_normal), st.global.cs a predicated twin of the plain store.
// (The 256-bit forms with .L2::evict_first are sm_100+; sm_90 takes the L2 priority through a cache policy.)
//
// Safety of the read-only path (.nc): the ops that use it read each element of a tensor they also write (in-place
// norm, fused add's residual) before writing it, from the same thread, and never read it again.
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"

#ifndef FI_OPS_LOAD_HINT
#define FI_OPS_LOAD_HINT 0
#endif
#ifndef FI_OPS_STORE_HINT
#define FI_OPS_STORE_HINT 0
#endif
#ifndef FI_OPS_HINT_MIN_L2_PCT
#define FI_OPS_HINT_MIN_L2_PCT 100
#endif

namespace flashinfer {

// The L2 access policy of a streamed access: evict-first when `stream`, else normal.
FI_DEVICE uint64_t l2_stream_policy(bool stream) {
  uint64_t first, normal;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(first));
  asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(normal));
  return stream ? first : normal;
}

// 16 bytes this kernel reads once (`ptr` 16-byte aligned), with the FI_OPS_LOAD_HINT hint (its L2 priority only
// when `stream`).
FI_DEVICE uint4 ld_global_stream(const void* ptr, bool stream) {
  uint4 v;
  if (FI_OPS_LOAD_HINT == 0) {
    v = *static_cast<const uint4*>(ptr);
  } else if (FI_OPS_LOAD_HINT == 1) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
  } else if (FI_OPS_LOAD_HINT == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr), "l"(l2_stream_policy(stream)));
  } else if (FI_OPS_LOAD_HINT == 3) {
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr), "l"(l2_stream_policy(stream)));
  } else {
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
  }
  return v;
}

// 16 bytes this kernel writes once (`ptr` 16-byte aligned), with the FI_OPS_STORE_HINT hint when `stream`.
FI_DEVICE void st_global_stream(void* ptr, const uint4& v, bool stream) {
  if (FI_OPS_STORE_HINT == 0 || (FI_OPS_STORE_HINT == 1 && !stream)) {
    *static_cast<uint4*>(ptr) = v;
  } else if (FI_OPS_STORE_HINT == 1) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
  } else {
    asm volatile("st.global.L1::no_allocate.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;" ::"l"(ptr), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w), "l"(l2_stream_policy(stream))
                 : "memory");
  }
}

// Chunk forms: 16-byte chunks take the hinted access; single elements (unaligned rows) the plain one.
template <typename T>
FI_DEVICE void load_streamed(Chunk<T, 8>& c, const T* p, bool stream) {
  c.raw = ld_global_stream(p, stream);
}
template <typename T>
FI_DEVICE void load_streamed(Chunk<T, 1>& c, const T* p, bool /*stream*/) {
  c.load(p);
}

template <typename T, int N>
FI_DEVICE void store_floats_streamed(T* p, const float (&in)[N], bool stream) {
  Chunk<T, N> c;
  c.from_floats(in);
  if constexpr (N == 8) {
    st_global_stream(p, c.raw, stream);
  } else {
    c.store(p);
  }
}

// Host: whether a launch moving `bytes` takes the hints (above FI_OPS_HINT_MIN_L2_PCT percent of the L2).
static bool streaming_hints(int64_t bytes, int device) {
  if (FI_OPS_LOAD_HINT == 0 && FI_OPS_STORE_HINT == 0) return false;
  return bytes * 100 > l2_cache_bytes(device) * int64_t(FI_OPS_HINT_MIN_L2_PCT);
}

}  // namespace flashinfer

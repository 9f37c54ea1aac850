// A CPU emulator for the sampling kernels' device code (tests only): every CUDA thread of a cluster of CTAs is a
// fiber (ucontext) scheduled cooperatively in a random order that changes at every barrier, so that code between
// two synchronization points runs in an arbitrary interleaving of threads. Block, warp and cluster barriers, warp
// shuffles and ballots, shared-memory atomics, distributed shared memory (cluster_map) and cp.async are emulated;
// a barrier that not every live thread reaches is reported as a deadlock.
//
// It runs the unmodified device functions of templates/include/flashinfer/ops/sampling.cuh: tests/_sampling_emu.py
// copies the header next to the headers it includes (common.cuh and host/launch.cuh as they are, ptx/math.cuh with
// its PTX replaced, emulated ptx/cp_async.cuh and ptx/griddepcontrol.cuh) and compiles driver.cpp with the host
// compiler.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // (uninitialized: only the pages a thread touches are committed)
  bool done = false;
  bool waiting = false;
  uint3 tidx, bidx;
  unsigned rank;  // CTA rank in the cluster
  int warp, lane;
  const char* wait_what = "";
};

struct Cta {
  uint8_t* smem = nullptr;
  Barrier block;
  Barrier warps[32];
  uint64_t exchange[32][32];  // per warp, per lane: shuffle/ballot values
};

struct State {
  std::vector<Fiber*> fibers;
  std::vector<Cta> ctas;
  Barrier cluster;
  unsigned cluster_size = 1;
  unsigned threads = 0;
  ucontext_t main;
  Fiber* cur = nullptr;
  uint64_t events = 0;
  std::mt19937 rng{12345};
  const char* error = nullptr;
  // The bytes of global memory the device code may read: the input tensor's, from its first element to its last
  // (what an exact allocation of it would hold; set by the driver for each launch).
  const uint8_t* readable_lo = nullptr;
  const uint8_t* readable_hi = nullptr;
};

inline State& st() {
  static State s;
  return s;
}

inline void yield() { swapcontext(&st().cur->ctx, &st().main); }

inline void arrive_wait(Barrier& b, const char* what) {
  State& s = st();
  const uint64_t g = b.gen;
  ++s.events;
  if (++b.arrived >= b.expected) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  s.cur->waiting = true;
  s.cur->wait_what = what;
  while (b.gen == g) yield();
  s.cur->waiting = false;
}

inline Fiber& me() { return *st().cur; }
inline Cta& my_cta() { return st().ctas[me().rank]; }

inline void warp_barrier() {
  Barrier& b = my_cta().warps[me().warp];
  if (b.expected != 32) {
    st().error = "a warp collective with exited lanes";
  }
  arrive_wait(b, "warp");
}

template <typename T>
inline uint64_t bits(T v) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Exchanges one value per lane; returns lane src's.
template <typename T>
inline T exchange(T v, int src) {
  Cta& c = my_cta();
  c.exchange[me().warp][me().lane] = bits(v);
  warp_barrier();
  const T r = from_bits<T>(c.exchange[me().warp][src & 31]);
  warp_barrier();
  return r;
}

// Whether device code may read [p, p + n) from global memory; else the launch fails, as under compute-sanitizer
// memcheck (stricter: a byte of the tensor's allocation outside the tensor itself is out of bounds too).
inline bool global_readable(const void* p, size_t n) {
  State& s = st();
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (s.readable_lo != nullptr && b >= s.readable_lo && b + n <= s.readable_hi) return true;
  static char msg[200];
  std::snprintf(msg, sizeof(msg), "out-of-bounds global read of %zu bytes at byte %lld of a %lld-byte tensor", n,
                static_cast<long long>(b - s.readable_lo), static_cast<long long>(s.readable_hi - s.readable_lo));
  if (s.error == nullptr) s.error = msg;
  return false;
}

inline float exp2_ftz(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// rcp.approx.ftz: 1/x off by up to one unit in the last place, as the hardware's approximation may be (a fixed
// function of x's bits), so that code refining it is tested against an inexact seed.
inline float rcp_approx(float x) {
  const float y = 1.f / x;
  if (std::fpclassify(y) == FP_SUBNORMAL) return std::copysign(0.f, y);
  if (!std::isfinite(y) || y == 0.f) return y;
  const unsigned h = (static_cast<uint32_t>(bits(x)) * 2654435761u) >> 30;  // 0..3
  return h == 1 ? std::nextafter(y, 0.f) : h == 2 ? std::nextafter(y, 2.f * y) : y;
}

using Body = void (*)(void*);
struct Launch {
  Body body;
  void* arg;
};

inline void fiber_entry(unsigned lo, unsigned hi) {
  const uintptr_t ptr = (static_cast<uintptr_t>(hi) << 32) | lo;
  Launch* l = reinterpret_cast<Launch*>(ptr);
  l->body(l->arg);
  State& s = st();
  Fiber& f = *s.cur;
  f.done = true;
  ++s.events;
  Cta& c = s.ctas[f.rank];
  auto leave = [](Barrier& b) {
    --b.expected;
    if (b.arrived > 0 && b.arrived >= b.expected) {
      b.arrived = 0;
      ++b.gen;
    }
  };
  leave(c.block);
  leave(c.warps[f.warp]);
  leave(s.cluster);
  swapcontext(&f.ctx, &s.main);
}

// Runs body(arg) on every thread of one cluster of `csize` CTAs of `threads` threads (block indices
// first_block + rank), each CTA with `smem_bytes` of zeroed shared memory. Returns an error text or nullptr.
inline const char* run_cluster(Body body, void* arg, unsigned csize, unsigned threads, unsigned first_block,
                               size_t smem_bytes, uint32_t seed) {
  State& s = st();
  s.fibers.clear();
  s.ctas.assign(csize, Cta());
  s.cluster = Barrier();
  s.cluster.expected = static_cast<int>(csize * threads);
  s.cluster_size = csize;
  s.threads = threads;
  s.error = nullptr;
  s.rng.seed(seed);
  std::vector<std::vector<uint8_t>> smem(csize);
  for (unsigned r = 0; r < csize; ++r) {
    smem[r].assign(smem_bytes + 16, 0);
    s.ctas[r].smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem[r].data()) + 15) & ~uintptr_t(15));
    s.ctas[r].block.expected = static_cast<int>(threads);
    for (unsigned w = 0; w < threads / 32; ++w) s.ctas[r].warps[w].expected = 32;
  }
  Launch launch{body, arg};
  const uintptr_t lp = reinterpret_cast<uintptr_t>(&launch);
  std::vector<Fiber> fibers(csize * threads);
  for (unsigned r = 0; r < csize; ++r) {
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[r * threads + t];
      constexpr size_t kStack = 64 * 1024;
      f.stack.reset(new char[kStack]);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &s.main;
      f.tidx = make_uint3(t, 0, 0);
      f.bidx = make_uint3(first_block + r, 0, 0);
      f.rank = r;
      f.warp = static_cast<int>(t / 32);
      f.lane = static_cast<int>(t % 32);
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(lp),
                  static_cast<unsigned>(lp >> 32));
      s.fibers.push_back(&f);
    }
  }
  std::vector<Fiber*> order = s.fibers;
  while (true) {
    bool any = false;
    const uint64_t before = s.events;
    std::shuffle(order.begin(), order.end(), s.rng);
    for (Fiber* f : order) {
      if (f->done) continue;
      any = true;
      s.cur = f;
      swapcontext(&s.main, &f->ctx);
      s.cur = nullptr;
      if (s.error) return s.error;
    }
    if (!any) break;
    if (s.events == before) {
      static char msg[256];
      int n = 0;
      for (Fiber* f : s.fibers)
        if (!f->done) ++n;
      const Fiber* f0 = nullptr;
      for (Fiber* f : s.fibers)
        if (!f->done) {
          f0 = f;
          break;
        }
      std::snprintf(msg, sizeof(msg), "deadlock: %d threads stuck, e.g. CTA %u thread %u waiting at a %s barrier", n,
                    f0->rank, f0->tidx.x, f0->wait_what);
      return msg;
    }
  }
  return nullptr;
}

struct DimProxy {
  unsigned x, y, z;
};

inline DimProxy thread_idx() { return {me().tidx.x, 0, 0}; }
inline DimProxy block_idx() { return {me().bidx.x, 0, 0}; }

}  // namespace emu

// ------------------------------------------------------------------ what CUDA device code sees

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())

inline void __syncthreads() { ::emu::arrive_wait(::emu::my_cta().block, "block"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  ::emu::warp_barrier();
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m) {
  (void)mask;
  return ::emu::exchange(v, ::emu::me().lane ^ m);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  (void)mask;
  return ::emu::exchange(v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
  (void)mask;
  const int lane = ::emu::me().lane;
  const T other = ::emu::exchange(v, lane >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane);
  return other;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  (void)mask;
  ::emu::Cta& c = ::emu::my_cta();
  const int w = ::emu::me().warp;
  c.exchange[w][::emu::me().lane] = pred ? 1 : 0;
  ::emu::warp_barrier();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (c.exchange[w][l] ? 1u : 0u) << l;
  ::emu::warp_barrier();
  return r;
}

// redux.sync: every lane gets the reduction over the warp (through the ballot's exchange slots and barriers).
template <typename T, typename Op>
inline T emu_redux(T v, Op op) {
  ::emu::Cta& c = ::emu::my_cta();
  const int w = ::emu::me().warp;
  c.exchange[w][::emu::me().lane] = static_cast<uint64_t>(static_cast<uint32_t>(v));
  ::emu::warp_barrier();
  T r = static_cast<T>(static_cast<uint32_t>(c.exchange[w][0]));
  for (int l = 1; l < 32; ++l) r = op(r, static_cast<T>(static_cast<uint32_t>(c.exchange[w][l])));
  ::emu::warp_barrier();
  return r;
}
inline int __reduce_add_sync(unsigned, int v) {
  return emu_redux(v, [](int a, int b) { return static_cast<int>(static_cast<unsigned>(a) + static_cast<unsigned>(b)); });
}
inline unsigned __reduce_min_sync(unsigned, unsigned v) {
  return emu_redux(v, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  return emu_redux(v, [](unsigned a, unsigned b) { return a > b ? a : b; });
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {y:x} (x bytes 0..3, y bytes 4..7).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __float_as_uint(float f) { return ::emu::from_bits<unsigned>(::emu::bits(f)); }
inline float __uint_as_float(unsigned u) { return ::emu::from_bits<float>(u); }
inline float __int_as_float(int u) { return ::emu::from_bits<float>(static_cast<unsigned>(u)); }
inline int __float_as_int(float f) { return static_cast<int>(::emu::bits(f)); }
inline unsigned __float2uint_rz(float f) {  // (CUDA: NaN and negatives -> 0, saturating above)
  if (!(f > 0.f)) return 0u;
  return f >= 4294967296.f ? 0xFFFFFFFFu : static_cast<unsigned>(f);
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old > v ? old : v;
  return old;
}
// (a read outside the tensor fails the launch and reads zeros: see global_readable)
template <typename T>
inline T __ldg(const T* p) {
  return ::emu::global_readable(p, sizeof(T)) ? *p : T();
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// sampling.cuh takes its cluster branches (sm_90) under __CUDA_ARCH__; the CUDA headers above are in.
#define __CUDA_ARCH__ 900

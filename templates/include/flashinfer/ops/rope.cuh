// Rotary position embedding of q [nnz, Hq, D] and k [nnz, Hk, D], in place or into separate outputs.
//
// The first rotary_dim elements of every head rotate in pairs: NeoX halves (element e with e + rotary_dim/2,
// frequency e) or GPT-J interleaved pairs (2f with 2f + 1, frequency f); the rest of the head passes through.
// A token's position comes from pos_ids, or from a ragged batch (indptr/offsets: token indptr[b] + i of
// request b sits at offsets[b] + i; tokens outside every request pass through unrotated). Its cos/sin come
// from a float32 cos/sin cache [rows, rotary_dim] (cos first half, sin second) or from the frequency table
// of attention/pos_enc.cuh (rope_cos_sin: the same angle function as the attention kernels' on-the-fly RoPE).
//
// Work item: (token, head group, lane). A lane owns a fixed set of frequencies (8 for a NeoX 16-byte chunk
// and its partner chunk, 4 for an interleaved chunk, 1 element pair in the scalar form), computes their
// cos/sin once, and applies them to every head of its group (q heads then k heads); pass-through lanes copy
// the rest of the head when the output is not the input. The launcher sizes the head groups so the grid
// fills the GPU: many heads per thread for large batches, one for a single token (then a CTA per head group
// on as many SMs). Grid: x over (token, lane), y over head groups. One kernel body, compiled as several forms
// (RopeForm below): the generic one reads every option at run time; the specialised ones fix them at compile
// time, so a small batch runs straight-line code without the branches and loop of the general case.
#pragma once
#include "flashinfer/attention/pos_enc.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"

namespace flashinfer {

struct RopeParams {
  const void* q;
  const void* k;
  void* q_out;  // may be q (in place)
  void* k_out;
  int64_t q_stride_n, q_stride_h, k_stride_n, k_stride_h;
  int64_t q_out_stride_n, q_out_stride_h, k_out_stride_n, k_out_stride_h;
  const void* pos_ids;  // [nnz] int32/int64, or null: ragged form
  const void* indptr;   // [batch + 1]
  const void* offsets;  // [batch], pos_ids' index type
  int pos_int64, indptr_int64;
  const float* cos_sin_cache;  // [cache_rows, rotary_dim], row stride cache_stride (kCache)
  int64_t cache_rows, cache_stride;
  // Mapped host memory {flag, position, cache rows}: a position outside the cache is recorded here (and the
  // token's rotated elements become NaN; nothing outside the cache is read).
  int64_t* position_error;
  int nnz, num_q_heads, num_k_heads, head_dim, rotary_dim, batch_size;
  int interleave, copy_rest;
  // Launch shape (set by launch_rope); cache_vec4: cos/sin cache rows read as float4 (16-byte aligned rows);
  // x / lanes = __umulhi(2x, lanes_magic) >> lanes_shift for every x < 2^31 (rope_lanes_divisor).
  int cache_vec4;
  int lanes, rot_lanes, heads_per_thread;
  unsigned lanes_magic, lanes_shift;
};

constexpr int kRopeThreads = 128;
constexpr int kRopeMaxRotaryDim = 256;  // RopeTable's frequencies
constexpr int kRopeErrBadShape = 1101;  // module error codes (the template gives their text)
constexpr int kRopeErrNoRecord = 1102;

FI_DEVICE int64_t rope_load_index(const void* p, int i, bool is_int64) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int*>(p)[i];
}

// Position of token in a ragged batch (token indptr[b] + i of request b sits at offsets[b] + i), or false when
// no request covers it.
FI_DEVICE bool rope_ragged_position(const RopeParams& p, int token, int64_t& pos) {
  // Last request b with indptr[b] <= token (requests may be empty), by binary search.
  int lo = 0, hi = p.batch_size;  // answer in [lo, hi)
  if (p.batch_size == 0 || rope_load_index(p.indptr, 0, p.indptr_int64) > token) return false;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (rope_load_index(p.indptr, mid, p.indptr_int64) <= token)
      lo = mid;
    else
      hi = mid;
  }
  const int64_t start = rope_load_index(p.indptr, lo, p.indptr_int64);
  if (token >= rope_load_index(p.indptr, lo + 1, p.indptr_int64)) return false;
  pos = rope_load_index(p.offsets, lo, p.pos_int64) + (token - start);
  return true;
}

// Launch shape (launch_rope below), measured on an H200 (benchmarks/probe_ops.py: bf16, apply_rope_with_cos_sin_cache
// in place, 1 to 32768 tokens, L2 flushed): 4 heads a thread in flight, the heads spread over 2048 threads an SM,
// at least one head a thread, was the fastest or within noise on most sizes. 8 heads in flight was 13-34% slower;
// spreading over 640, 1024 or 4096 threads an SM, at least 2 or 4 heads a thread, and the fewest heads a thread
// that put the grid on the GPU in one wave by real occupancy (within noise) all lost or gained nothing.
constexpr int kRopeUnroll = 4;
constexpr int kRopeResidentThreads = 2048;  // threads an SM, counted when spreading the heads over threads

// Kernel forms (issue 14). FI_ROPE_FORMS 0: the generic form for every call (each flag read from RopeParams at
// run time, a loop over a thread's heads). 1: a form fixed at compile time (interleave, in place, copy_rest,
// ragged, float4 cache rows, 32-bit offsets, one head a thread) whenever a thread holds one head on the vector
// path: the small batches, whose time is one warp's critical path (position -> cos/sin row -> rotate -> store),
// so every instruction and every branch around unused code on it costs (the code itself comes from memory
// after an L2 flush); the generic form otherwise. 2: the several-heads forms specialised too. SASS (bf16,
// cos/sin cache, NeoX, in place, sm_90): the generic form 1,312 instructions (96 registers), the one-head form
// 176 (40 registers); before the forms a 1-token call executed 466 instructions a warp against FlashInfer's 171.
// Measured on an H200 (benchmarks/probe_ops.py, bf16, q 32 / k 8 heads of 128, NeoX, in place, L2 flushed,
// f994251), forms 0 / 1 / 2 against FlashInfer: 1 token 5.39 / 4.83 / 4.75 us (FlashInfer 4.74), 16 tokens 5.50 /
// 4.90 / 4.93 (4.99), 256 tokens 6.64 / 6.00 / 5.97 (6.03), 4096 tokens 25.44 / 25.46 / 24.22 (26.46), 32768
// tokens 188.3 / 188.3 / 185.5 (191.9). One head a thread at every size (FlashInfer's grid for large batches)
// lost from 4096 tokens (24.48, 213.2). 2 is the build; 0 and 1 stay for the tests of the generic form.
#ifndef FI_ROPE_FORMS
#define FI_ROPE_FORMS 2
#endif

// A flag of a kernel form: 0 or 1 when fixed at compile time, kRopeAny when read from RopeParams.
constexpr int kRopeAny = -1;

// IN_PLACE: outputs are the inputs (same strides). INDEX32: every element offset of q, k, their outputs and the
// cos/sin cache fits in an int (launch_rope checks). ONE_HEAD: heads_per_thread == 1, no loop over heads.
template <int INTERLEAVE, int COPY_REST, int RAGGED, int CACHE_VEC4, bool IN_PLACE, bool INDEX32, bool ONE_HEAD>
struct RopeForm {
  static constexpr int kCopyRest = COPY_REST;
  static constexpr bool kInPlace = IN_PLACE, kIndex32 = INDEX32, kOneHead = ONE_HEAD;
  static FI_DEVICE bool interleave(const RopeParams& p) {
    return INTERLEAVE == kRopeAny ? p.interleave != 0 : INTERLEAVE;
  }
  static FI_DEVICE bool copy_rest(const RopeParams& p) { return COPY_REST == kRopeAny ? p.copy_rest != 0 : COPY_REST; }
  static FI_DEVICE bool ragged(const RopeParams& p) { return RAGGED == kRopeAny ? p.pos_ids == nullptr : RAGGED; }
  static FI_DEVICE bool cache_vec4(const RopeParams& p) {
    return CACHE_VEC4 == kRopeAny ? p.cache_vec4 != 0 : CACHE_VEC4;
  }
};
using RopeGenericForm = RopeForm<kRopeAny, kRopeAny, kRopeAny, kRopeAny, false, false, false>;

// Thread (token, lane) of head group blockIdx.y: x = blockIdx.x * kRopeThreads + threadIdx.x runs over tokens,
// lanes fastest (token = x / lanes by a multiply-high, no branch). The critical path of a small batch is
// position -> cos/sin row -> rotate -> store: the position is loaded first, the heads' loads go out while it is
// in flight, the cos/sin row follows the position at once, and the record of an out-of-cache position is written
// last. TABLE: RopeTable (cos/sin computed from the position) or NoRopeTable (read from p.cos_sin_cache). FORM:
// a RopeForm. 5 CTAs an SM: up to 102 registers a thread, what the vector forms' 4 heads in flight need without
// spilling.
template <typename T, int N, typename TABLE, typename FORM>
__global__ void __launch_bounds__(kRopeThreads, 5)
    rope_kernel(const __grid_constant__ RopeParams p, const __grid_constant__ TABLE table) {
  constexpr bool kCache = std::is_same_v<TABLE, NoRopeTable>;
  constexpr int kMaxFreqs = N == 8 ? 8 : 1;  // per lane: a NeoX chunk pair has 8, an interleaved chunk 4
  using Index = std::conditional_t<FORM::kIndex32, int, int64_t>;  // element offsets
  const int x = blockIdx.x * kRopeThreads + threadIdx.x;
  const int token = static_cast<int>(__umulhi(2u * static_cast<unsigned>(x), p.lanes_magic) >> p.lanes_shift);
  if (token >= p.nnz) return;
  const int lane = x - token * p.lanes;
  const bool rotate = FORM::kCopyRest == 0 || lane < p.rot_lanes;  // without copy_rest every lane rotates
  if (!rotate && !FORM::copy_rest(p)) return;  // in place: pass-through elements are already where they belong

  int64_t pos = 0;
  bool covered = true;
  if (rotate) {
    if (!FORM::ragged(p)) {
      pos = rope_load_index(p.pos_ids, token, p.pos_int64);
    } else {
      covered = rope_ragged_position(p, token, pos);
    }
  }

  const bool interleave = FORM::interleave(p);
  const int half = p.rotary_dim / 2;
  // This lane's elements: a rotary lane rotates frequencies [freq0, freq0 + nf) of the elements at a0 (N of
  // them) against those at b0 (NeoX, scalar interleave) or within its own chunk (vector interleave); a pass
  // lane copies one chunk past rotary_dim.
  int a0, b0, freq0 = 0, nf = 0;
  if (!rotate) {
    a0 = b0 = p.rotary_dim + (lane - p.rot_lanes) * N;
  } else if (N == 1) {
    a0 = interleave ? 2 * lane : lane, b0 = interleave ? 2 * lane + 1 : half + lane, freq0 = lane, nf = 1;
  } else if (interleave) {
    a0 = b0 = lane * 8, freq0 = lane * 4, nf = 4;
  } else {
    a0 = lane * 8, b0 = half + lane * 8, freq0 = lane * 8, nf = 8;
  }

  const int num_heads = p.num_q_heads + p.num_k_heads;
  const int h_begin = FORM::kOneHead ? blockIdx.y : blockIdx.y * p.heads_per_thread;
  const int h_end = FORM::kOneHead ? h_begin + 1 : min(num_heads, h_begin + p.heads_per_thread);
  const bool paired = rotate && !(N == 8 && interleave);  // a and b are separate loads
  // Element a0 of head h (q heads, then k heads) of this token in q / k or in their outputs. INDEX32: the
  // tensor and its strides are picked first and one int offset computed; otherwise from the token's 64-bit bases
  // (loop invariants of a thread's heads).
  const auto head_at = [&](auto* q, auto* k, int64_t q_sn, int64_t q_sh, int64_t k_sn, int64_t k_sh, int h) {
    const bool is_q = h < p.num_q_heads;
    const int sn = static_cast<int>(is_q ? q_sn : k_sn), sh = static_cast<int>(is_q ? q_sh : k_sh);
    return (is_q ? q : k) + (token * sn + (is_q ? h : h - p.num_q_heads) * sh + a0);
  };
  const T* q_in = static_cast<const T*>(p.q) + token * p.q_stride_n + a0;
  const T* k_in = static_cast<const T*>(p.k) + token * p.k_stride_n + a0 - int64_t(p.num_q_heads) * p.k_stride_h;
  T* q_out = static_cast<T*>(p.q_out) + token * p.q_out_stride_n + a0;
  T* k_out = static_cast<T*>(p.k_out) + token * p.k_out_stride_n + a0 - int64_t(p.num_q_heads) * p.k_out_stride_h;
  const auto head_in = [&](int h) {
    if constexpr (FORM::kIndex32) {
      return head_at(static_cast<const T*>(p.q), static_cast<const T*>(p.k), p.q_stride_n, p.q_stride_h, p.k_stride_n,
                     p.k_stride_h, h);
    }
    return h < p.num_q_heads ? q_in + h * p.q_stride_h : k_in + h * p.k_stride_h;
  };
  const auto head_out = [&](int h) {
    if constexpr (FORM::kInPlace) return const_cast<T*>(head_in(h));
    if constexpr (FORM::kIndex32) {
      return head_at(static_cast<T*>(p.q_out), static_cast<T*>(p.k_out), p.q_out_stride_n, p.q_out_stride_h,
                     p.k_out_stride_n, p.k_out_stride_h, h);
    }
    return h < p.num_q_heads ? q_out + h * p.q_out_stride_h : k_out + h * p.k_out_stride_h;
  };
  constexpr int kSlots = FORM::kOneHead ? 1 : kRopeUnroll;
  Chunk<T, N> a[kSlots], b[kSlots];
#pragma unroll
  for (int u = 0; u < kSlots; ++u) {
    const int h = h_begin + u;
    if (FORM::kOneHead || h < h_end) {
      const T* in = head_in(h);
      a[u].load(in);
      if (paired) b[u].load(in + (b0 - a0));
    }
  }

  // cos/sin of this lane's frequencies; NaN for a position outside the cache.
  float cs[kMaxFreqs], sn[kMaxFreqs];
  const bool in_cache = !kCache || static_cast<uint64_t>(pos) < static_cast<uint64_t>(p.cache_rows);
  if (rotate) {
#pragma unroll
    for (int f = 0; f < kMaxFreqs; ++f) {
      if (f >= nf) break;
      const int freq = freq0 + f;
      if (!covered) {
        cs[f] = 1.f, sn[f] = 0.f;
      } else if constexpr (kCache) {
        if (in_cache) {
          const Index cos_at = static_cast<Index>(pos) * static_cast<Index>(p.cache_stride) + freq;
          const float* row = p.cos_sin_cache + (cos_at - freq);
          if constexpr (N == 8) {
            if (FORM::cache_vec4(p)) {  // nf is 4 or 8, and freq0 and half are multiples of 4: four a load
              if (f % 4 == 0) {
                const float4 c = *reinterpret_cast<const float4*>(p.cos_sin_cache + cos_at);
                const float4 s = *reinterpret_cast<const float4*>(p.cos_sin_cache + (cos_at + half));
                cs[f] = c.x, cs[f + 1] = c.y, cs[f + 2] = c.z, cs[f + 3] = c.w;
                sn[f] = s.x, sn[f + 1] = s.y, sn[f + 2] = s.z, sn[f + 3] = s.w;
              }
              continue;
            }
          }
          cs[f] = row[freq], sn[f] = row[half + freq];
        } else {
          cs[f] = sn[f] = __int_as_float(0x7fffffff);  // NaN; the caller learns why from position_error
        }
      } else {
        rope_cos_sin(float(pos), table.hi[freq], table.lo[freq], cs[f], sn[f]);
      }
    }
  }

  // Head h from slot u: rotated (or passed through) and stored. Once the slot's values are in floats it is
  // refilled with head h + kRopeUnroll, so a thread of many heads keeps kRopeUnroll heads in flight while it
  // stores (no extra registers).
  const auto finish = [&](int u, int h) {
    T* y = head_out(h);
    const int next = h + kRopeUnroll;
    const auto refill = [&] {
      if (!FORM::kOneHead && next < h_end) {
        const T* in = head_in(next);
        a[u].load(in);
        if (paired) b[u].load(in + (b0 - a0));
      }
    };
    if (!rotate) {
      const Chunk<T, N> pass = a[u];
      refill();
      pass.store(y);
      return;
    }
    float av[N], bv[N];
    a[u].to_floats(av);
    if (paired) b[u].to_floats(bv);
    refill();
    if (paired) {
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const int f = N == 8 ? e : 0;
        const float ra = av[e] * cs[f] - bv[e] * sn[f];
        bv[e] = bv[e] * cs[f] + av[e] * sn[f];
        av[e] = ra;
      }
      store_floats<T, N>(y, av);
      store_floats<T, N>(y + (b0 - a0), bv);
    } else if constexpr (N == 8) {
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const float x0 = av[2 * f], x1 = av[2 * f + 1];
        av[2 * f] = x0 * cs[f] - x1 * sn[f];
        av[2 * f + 1] = x1 * cs[f] + x0 * sn[f];
      }
      store_floats<T, N>(y, av);
    }
  };
  if constexpr (FORM::kOneHead) {
    finish(0, h_begin);
  } else {
    for (int h0 = h_begin; h0 < h_end; h0 += kRopeUnroll) {
#pragma unroll
      for (int u = 0; u < kRopeUnroll; ++u) {
        if (h0 + u >= h_end) break;
        finish(u, h0 + u);
      }
    }
  }

  if (kCache && rotate && !in_cache && blockIdx.y == 0 && lane == 0) {
    // One naturally aligned 8-byte store per field: a record racing with another bad token's stays readable (the
    // flag goes last, after a system-scope fence).
    volatile int64_t* e = p.position_error;
    e[1] = pos;
    e[2] = p.cache_rows;
    __threadfence_system();
    e[0] = 1;
  }
}

// Picks the vector or scalar path, the launch shape and the kernel form (FI_ROPE_FORMS above). The device's SM count
// sizes the head groups: the work items of all heads are spread over about one full GPU of threads
// (kRopeResidentThreads per SM), at least one head per thread, and beyond kRopeUnroll heads a thread a multiple of
// kRopeUnroll.
template <typename T, typename TABLE>
static cudaError_t launch_rope(RopeParams p, const TABLE& table, int device, cudaStream_t stream) {
  constexpr bool kCache = std::is_same_v<TABLE, NoRopeTable>;
  if (p.nnz == 0) return cudaSuccess;
  const int num_heads = p.num_q_heads + p.num_k_heads;
  if (num_heads == 0) return cudaSuccess;
  const bool in_place = p.q_out == p.q && p.k_out == p.k;
  if (in_place && (p.q_out_stride_n != p.q_stride_n || p.q_out_stride_h != p.q_stride_h ||
                   p.k_out_stride_n != p.k_stride_n || p.k_out_stride_h != p.k_stride_h)) {
    return static_cast<cudaError_t>(kRopeErrBadShape);
  }
  p.copy_rest = !in_place && p.rotary_dim < p.head_dim;
  const auto aligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
  const auto mult8 = [&](int64_t s, int count) { return count <= 1 || s % 8 == 0; };
  const bool vec = p.head_dim % 8 == 0 && p.rotary_dim % (p.interleave ? 8 : 16) == 0 && aligned(p.q) && aligned(p.k) &&
                   aligned(p.q_out) && aligned(p.k_out) && mult8(p.q_stride_n, p.nnz) && mult8(p.k_stride_n, p.nnz) &&
                   mult8(p.q_out_stride_n, p.nnz) && mult8(p.k_out_stride_n, p.nnz) &&
                   mult8(p.q_stride_h, p.num_q_heads) && mult8(p.k_stride_h, p.num_k_heads) &&
                   mult8(p.q_out_stride_h, p.num_q_heads) && mult8(p.k_out_stride_h, p.num_k_heads);
  const int n = vec ? 8 : 1;
  p.cache_vec4 = kCache && p.cache_stride % 4 == 0 && aligned(p.cos_sin_cache);
  p.rot_lanes = vec ? p.rotary_dim / (p.interleave ? 8 : 16) : p.rotary_dim / 2;
  p.lanes = p.rot_lanes + (p.copy_rest ? (p.head_dim - p.rotary_dim) / n : 0);
  if (p.lanes == 0) return cudaSuccess;  // rotary_dim 0 in place: nothing to do
  // x / lanes as __umulhi(2x, magic) >> l, l = ceil(log2(lanes)), magic = ceil(2^(31 + l) / lanes) < 2^32: its
  // error e = magic * lanes - 2^(31 + l) is below lanes <= 2^l, so for x < 2^31 the product overshoots x / lanes by
  // x * e / (lanes * 2^(31 + l)) < 1 / lanes, too little to reach the next integer.
  int lanes_log2_up = 0;
  while ((int64_t(1) << lanes_log2_up) < p.lanes) ++lanes_log2_up;
  p.lanes_shift = static_cast<unsigned>(lanes_log2_up);
  p.lanes_magic = static_cast<unsigned>(((uint64_t(1) << (31 + lanes_log2_up)) + p.lanes - 1) / p.lanes);
  const int64_t work = int64_t(p.nnz) * p.lanes * num_heads;
  const int64_t full = int64_t(sm_count(device)) * kRopeResidentThreads;
  int64_t hpt = (work + full - 1) / full;
  if (hpt > num_heads) hpt = num_heads;  // work > 0: at least one head a thread
  // Whole batches of kRopeUnroll heads: a thread's last batch of one head (5 heads a thread: 40 heads over
  // 4096 tokens) would keep a fifth of the bytes in flight while it runs. Rounding down adds threads instead.
  if (hpt > kRopeUnroll) hpt = hpt / kRopeUnroll * kRopeUnroll;
  const int groups = static_cast<int>((num_heads + hpt - 1) / hpt);
  p.heads_per_thread = (num_heads + groups - 1) / groups;
  if (p.heads_per_thread > kRopeUnroll) p.heads_per_thread = ceil_div(p.heads_per_thread, kRopeUnroll) * kRopeUnroll;
  const int groups_needed = ceil_div(num_heads, p.heads_per_thread);
  const int64_t threads = int64_t(p.nnz) * p.lanes;
  // (blockIdx.x * kRopeThreads + threadIdx.x must not overflow int in the last CTA)
  if (threads + kRopeThreads >= (int64_t(1) << 31) || groups_needed > 65535) {
    return static_cast<cudaError_t>(kRopeErrBadShape);
  }
  const dim3 grid(static_cast<unsigned>((threads + kRopeThreads - 1) / kRopeThreads), groups_needed);
  const auto launch = [&](auto form) {
    using Form = decltype(form);
    if (vec) return launch_kernel(rope_kernel<T, 8, TABLE, Form>, grid, dim3(kRopeThreads), 0, stream, false, p, table);
    return launch_kernel(rope_kernel<T, 1, TABLE, Form>, grid, dim3(kRopeThreads), 0, stream, false, p, table);
  };
  if constexpr (FI_ROPE_FORMS == 0) {
    return launch(RopeGenericForm{});
  } else {
    // The specialised forms index with ints: every element offset (strides are never negative) must fit.
    const auto fits32 = [&](int64_t stride_n, int64_t stride_h, int heads) {
      return stride_n >= 0 && stride_h >= 0 &&
             int64_t(p.nnz - 1) * stride_n + int64_t(max(heads - 1, 0)) * stride_h + p.head_dim < (int64_t(1) << 31);
    };
    const bool index32 = fits32(p.q_stride_n, p.q_stride_h, p.num_q_heads) &&
                         fits32(p.k_stride_n, p.k_stride_h, p.num_k_heads) &&
                         fits32(p.q_out_stride_n, p.q_out_stride_h, p.num_q_heads) &&
                         fits32(p.k_out_stride_n, p.k_out_stride_h, p.num_k_heads) &&
                         (!kCache || (p.cache_stride >= 0 && p.cache_rows * p.cache_stride < (int64_t(1) << 31)));
    const bool one_head = p.heads_per_thread == 1;
    if (!vec || !index32 || (FI_ROPE_FORMS == 1 && !one_head) || (kCache && !p.cache_vec4)) {
      return launch(RopeGenericForm{});
    }
    // The specialised vector forms: each run-time flag picks its compile-time instance (in place never copies the
    // rest; the cos/sin cache launcher has no ragged form).
    const auto flag = [](bool b, auto&& f) { return b ? f(std::true_type{}) : f(std::false_type{}); };
    return flag(p.interleave != 0, [&](auto interleave) {
      return flag(in_place, [&](auto in_place_c) {
        return flag(p.copy_rest != 0, [&](auto copy_rest) {
          return flag(!kCache && p.pos_ids == nullptr, [&](auto ragged) {
            return flag(one_head, [&](auto one) {
              constexpr bool kInPlace = decltype(in_place_c)::value;
              constexpr bool kCopyRest = !kInPlace && decltype(copy_rest)::value;
              constexpr bool kRagged = !kCache && decltype(ragged)::value;
              constexpr bool kOne = FI_ROPE_FORMS == 1 || decltype(one)::value;
              using Form = RopeForm<decltype(interleave)::value, kCopyRest, kRagged, kCache, kInPlace, true, kOne>;
              return launch_kernel(rope_kernel<T, 8, TABLE, Form>, grid, dim3(kRopeThreads), 0, stream, false, p,
                                   table);
            });
          });
        });
      });
    });
  }
}

}  // namespace flashinfer

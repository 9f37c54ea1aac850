// Sampling from vocabulary distributions without sorting them (flashinfer.sampling).
//
// Rows and clusters. One row (a request's probabilities or logits over the vocabulary) belongs to a cluster of C
// CTAs (C = 1, 2, 4, 8 or 16, chosen per launch by the batch size and the vocabulary). CTA r owns a contiguous
// slice of the row's 16-byte vectors; when the slice fits (kCacheVecs) it copies the slice into shared memory
// once with cp.async, so that every later pass over the row reads shared memory and the row leaves HBM once.
// The CTAs of a cluster combine their partial results through distributed shared memory between cluster
// barriers. Rows need not be 16-byte aligned: a row is read as the 16-byte vectors that cover it, the two at its
// ends element by element (no byte outside the row is read: the tensor may end, or begin, inside such a vector),
// and elements outside the row are neutral (probability 0, logit -inf) and never written.
//
// Keys and weights. An element maps to an ordered 32-bit key, 0 for an element that carries no mass (NaN, a
// probability <= 0 or infinite, a logit of -inf), and to a weight (the probability, or exp(logit - max logit)).
// Masses are sums of fixed-point weights, the row's largest weight scaled into [2^39, 2^40) (kWeightBits):
// integer sums are exact in any order, so every threshold and every sample is a function of the row, the
// parameters and the random draw only, never of the cluster size, the launch or the order in which threads run.
// (A weight below 2^-40 of the row's largest carries no mass.)
//
// Filters are thresholds on the key; the kept set is {key >= tau}, ties at the threshold all kept:
//   top-k   tau = the k-th largest key;
//   top-p   tau = the largest t with mass(key >= t) >= ceil(top_p * mass(row)): the shortest head of the
//           distribution in descending order that holds top_p of its mass;
//   min-p   tau = key(min_p * largest probability).
// top-k then top-p ("top_k_first") is top-p with the target taken from the mass of the top-k set; "joint" keeps
// the intersection of both sets of the unfiltered distribution.
//
// Finding tau without sorting the row: radix rounds over the keys of a shrinking range [lo, hi]. A round
// histograms the counts and masses of the range into kBins bins (bin 0 = the highest keys; the first round uses
// bins of 1/128 octave below the row's maximum, later rounds bins that tile the range), merges the histograms of
// the cluster in place (CTA r owns bins [r, r + 1) * kBins / C), and finds the bin where the cumulative count or
// mass from the top reaches the target. Once that bin holds at most kGatherCap elements they are gathered into
// rank 0, put in order there (a bitonic network over at most kGatherCap candidates), and tau read off exactly.
// (The last bin, which in the first round takes everything more than 16 octaves below the maximum, is summed in
// registers: no shared-memory address is updated by many elements.)
// Top-k with k <= kFilterMaxK on a row streamed from HBM (the sampler; the row transforms when the slices are not
// cached) skips the rounds and needs a single pass over the row (see topk_filter): every warp
// keeps the elements at or above a running threshold, its exact k-th largest so far, in a buffer in shared
// memory. The warps' thresholds bound the row's k-th largest from below; each CTA merges and orders its warps'
// survivors, and ranks of these lists published across the cluster give a bound close to the k-th largest, so
// that rank 0 gathers ~k to 2k candidates, a superset of the top-k set (see topk_collect). It orders and resolves
// them, applying top-p within them too, and samples from them directly when at most kSmallKept are kept. Large
// batches run one CTA per row (no cluster barrier at all) streaming the row from HBM once.
//
// The row transforms top_p_renorm / top_k_renorm / top_k_mask over cached slices run row_select_kernel (see "row ops:
// select" below: one histogram round with exact masses from 32-bit sums, three cluster barriers, every CTA resolving
// the threshold itself); row_op_kernel's radix rounds remain for softmax, uncached slices, and as the reference
// the new kernel is compared with (sampling._ROW_KERNEL = "radix", benchmarks/probe_sampling.py). top_k_mask and
// top_k_renorm with one k <= kFilterMaxK on large batches (FI_ROW_STREAM_TOPK_ROWS) take the single-pass route over
// streamed rows instead and write each row without reading it again (see row_op_cta): one HBM read and one write.
//
// Sampling is the inverse CDF in vocabulary order over the kept fixed-point weights, with one 64-bit Philox
// draw r per row: the sampled element is the first whose cumulative weight exceeds floor(total * r / 2^64). The
// row is summed in chunks of 32 consecutive vectors (one warp's step), the cluster's CTA totals locate the CTA,
// its chunk sums the chunk, and a warp scan the element.
#pragma once
#include <cooperative_groups.h>

#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"
#include "flashinfer/ptx/math.cuh"

namespace flashinfer {
namespace sampling {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 2048;            // histogram bins of one radix round
constexpr int kFirstShift = 16;        // first round: bins of 2^16 keys = 1/128 octave of a positive float
constexpr int kGatherCap = 1024;       // boundary candidates one CTA orders and resolves
constexpr int kSmallKept = kThreads;   // kept sets this small are sampled by rank 0 from its candidates
constexpr int kCacheVecs = 4096 + 64;  // largest slice kept in shared memory (16-byte vectors)
constexpr int kMinSliceVecs = 256;     // the planner never splits rows into smaller slices
constexpr int kMaxCluster = 16;
constexpr int kMaxChunks = 1088;  // 32-vector chunks of one slice (bounds the vocabulary, see kMaxVocab)
constexpr int kMaxVocab = 1 << 20;
constexpr int kWeightBits = 39;
constexpr int kWarpBuf = 384;     // top-k candidates a warp buffers (see topk_filter)
constexpr int kFilterMaxK = 128;  // top-k takes the single-pass route up to this k
constexpr int kQuantiles = 16;    // ranks of its candidates a CTA publishes (see topk_collect)
constexpr int kStreamUnroll = 8;  // 16-byte loads a lane has in flight when streaming a row
constexpr float kInf = __builtin_huge_valf();

// Filters of the sampling kernel (bit mask) and operations of the row-transform kernel: the values are exported
// to Python as module constants.
enum Filter : int { kTopK = 1, kTopP = 2, kMinP = 4 };
enum RowOp : int { kSoftmax = 0, kTopPRenorm = 1, kTopKRenorm = 2, kTopKMask = 3 };
constexpr int kErrSliceTooLarge = 1001;
constexpr unsigned long long kUnknown = ~0ull;  // a mass not computed

// ------------------------------------------------------------------------------------------ random numbers

// Philox4x32-10 (Salmon et al., SC'11): counter (offset, row, draw), key seed.
FI_DEVICE uint4 philox(uint64_t seed, uint64_t offset, uint32_t row, uint32_t draw) {
  uint4 c = make_uint4(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), row, draw);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int i = 0; i < 10; ++i) {
    const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
    const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

FI_DEVICE uint64_t random64(uint64_t seed, uint64_t offset, uint32_t row, uint32_t draw) {
  const uint4 r = philox(seed, offset, row, draw);
  return (static_cast<uint64_t>(r.x) << 32) | r.y;
}

// Uniform in (0, 1], as curand_uniform.
FI_DEVICE float uniform(uint32_t bits) { return (static_cast<float>(bits) + 1.0f) * 2.3283064365386963e-10f; }

// ------------------------------------------------------------------------------------------ elements

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  FI_DEVICE static void unpack(const uint4& r, float (&x)[4]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  FI_DEVICE static uint4 pack(const float (&x)[4]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
  // Element j (a run-time index, 0 <= j < kVec) of a vector, without unpacking the others.
  FI_DEVICE static float at(const uint4& r, int j) {
    return __uint_as_float(j < 2 ? (j == 0 ? r.x : r.y) : (j == 2 ? r.z : r.w));
  }
  FI_DEVICE static float from_float(float v) { return v; }
  FI_DEVICE static float to_float(float v) { return v; }
};

template <typename H>
struct Elem16 {
  static constexpr int kVec = 8;
  FI_DEVICE static void unpack(const uint4& r, float (&x)[8]) { unpack8(r, x, H()); }
  FI_DEVICE static uint4 pack(const float (&x)[8]) { return pack8<H>(x); }
  FI_DEVICE static float at(const uint4& r, int j) {
    const uint32_t w = j < 4 ? (j < 2 ? r.x : r.y) : (j < 6 ? r.z : r.w);
    const uint16_t b = static_cast<uint16_t>(j & 1 ? w >> 16 : w);
    H h;
    memcpy(&h, &b, 2);
    return flashinfer::to_float<H>(h);
  }
  FI_DEVICE static H from_float(float v) { return flashinfer::from_float<H>(v); }
  FI_DEVICE static float to_float(H v) { return flashinfer::to_float<H>(v); }
};
template <>
struct Elem<__half> : Elem16<__half> {};
template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16> {};

// Ordered keys: a > b as values <=> key(a) > key(b); 0 for elements without mass.
FI_DEVICE uint32_t prob_key(float p) { return (p > 0.f && p < kInf) ? __float_as_uint(p) : 0u; }

FI_DEVICE uint32_t logit_key(float x) {
  if (!(x > -kInf)) return 0u;  // NaN, -inf
  uint32_t b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0u;  // -0 and +0 are one value
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// logit_key without branches, equal to it for every input: +0.0f turns -0 into +0; a sign-extended shift makes the
// pattern that flips every bit of a negative value and only the sign bit of a positive one.
FI_DEVICE uint32_t logit_key_flat(float x) {
  const uint32_t b = __float_as_uint(__fadd_rn(x, 0.f));
  const uint32_t k = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  return x > -kInf ? k : 0u;  // (false for NaN)
}

FI_DEVICE float logit_from_key(uint32_t k) { return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

// A threshold key t > 0 as a logit v with logit_key(x) >= t exactly when x >= v, for every x: keys 1 .. 0x7FFFFF
// belong to no value (they would be negative NaNs), so below 0x800000 v is the lowest finite logit; NaN and -inf
// compare false as their key 0 does.
FI_DEVICE float logit_threshold(uint32_t t) { return t < 0x800000u ? -3.40282347e38f : logit_from_key(t); }

// floor(w * 2^(kWeightBits - ref_exp)) for 0 <= w < 2^(ref_exp + 1), exactly (integer arithmetic on the bits).
FI_DEVICE uint64_t fixed_weight(float w, int ref_exp) {
  const uint32_t b = __float_as_uint(w);
  const int e = static_cast<int>(b >> 23);
  const uint64_t mant = (b & 0x7FFFFFu) | (e ? 0x800000u : 0u);
  const int shift = (e ? e : 1) - 150 + kWeightBits - ref_exp;  // w = mant * 2^((e ? e : 1) - 150)
  if (shift >= 0) return mant << shift;
  return shift > -64 ? mant >> (-shift) : 0;
}

// Keys, weights and their fixed-point form for one row of probabilities or logits, given the row's largest key.
struct Weigher {
  bool logits;
  uint32_t max_key;
  float max_value;  // the largest probability or logit
  int ref_exp;      // floor(log2(largest weight)): weights are scaled by 2^(kWeightBits - ref_exp)
  bool inf_max;     // logits: the largest logit is +inf (the +inf entries share the mass)

  FI_DEVICE Weigher(bool is_logits, uint32_t max_key_) : logits(is_logits), max_key(max_key_) {
    if (logits) {
      max_value = max_key ? logit_from_key(max_key) : -kInf;
      ref_exp = 0;  // exp(x - max) <= 1
      inf_max = max_value == kInf;
    } else {
      max_value = __uint_as_float(max_key);
      const int e = static_cast<int>(max_key >> 23);
      ref_exp = e ? e - 127 : -127;
      inf_max = false;
    }
  }
  FI_DEVICE uint32_t key(float x) const { return logits ? logit_key(x) : prob_key(x); }
  FI_DEVICE float value(uint32_t k) const { return logits ? logit_from_key(k) : __uint_as_float(k); }
  FI_DEVICE float weight(float x) const {
    if (!logits) return (x > 0.f && x < kInf) ? x : 0.f;
    if (!(x > -kInf)) return 0.f;
    if (inf_max) return x == kInf ? 1.f : 0.f;
    // Explicit roundings: every pass computes bit-identical weights.
    return ptx_exp2(__fmul_rn(__fsub_rn(x, max_value), kLog2e));
  }
  FI_DEVICE uint64_t weight_fx(float x) const { return fixed_weight(weight(x), ref_exp); }
};

// ceil(fraction * total), clamped to [1, total] (a fraction <= 0 keeps the largest element, as top_p -> 0).
FI_DEVICE uint64_t mass_target(float fraction, uint64_t total) {
  const double t = ceil(static_cast<double>(fraction) * static_cast<double>(total));
  if (!(t >= 1.0)) return 1;
  return t >= static_cast<double>(total) ? total : static_cast<uint64_t>(t);
}

// ------------------------------------------------------------------------------------------ clusters, blocks

FI_DEVICE unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

FI_DEVICE unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}

// Barrier of every thread of the cluster; orders shared-memory accesses across its CTAs (release/acquire).
FI_DEVICE void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// A CTA may touch another's shared memory only once that CTA has started running: every kernel here arrives at
// the cluster barrier as it starts and waits on it before its first remote access,
// after its own row loads, so the wait costs nothing in practice (racecheck: "a block that might not have
// entered yet" without it).
FI_DEVICE void cluster_start_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)cooperative_groups::this_cluster().barrier_arrive();
#endif
}
FI_DEVICE void cluster_start_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().barrier_wait();
#endif
}

// The address of *p in the shared memory of CTA `rank` of the cluster.
template <typename T>
FI_DEVICE T* cluster_map(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

struct ClusterCtx {
  unsigned rank, size;
  int phase;  // exchanges so far (their slot buffers alternate, see Shared::xch)
};

template <typename T>
struct MaxOp {
  FI_DEVICE T operator()(T a, T b) const { return a > b ? a : b; }
};
template <typename T>
struct SumOp {
  FI_DEVICE T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
FI_DEVICE T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Warp-wide sum, minimum and maximum of 32-bit values: one redux.sync (sm_80+) instead of five dependent shuffles,
// where they sit on a serial path (warp_kth_largest).
FI_DEVICE int warp_sum(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xffffffffu, v);
#else
  return warp_reduce(v, SumOp<int>());
#endif
}
template <typename T>
struct MinOp {
  FI_DEVICE T operator()(T a, T b) const { return a < b ? a : b; }
};
FI_DEVICE uint32_t warp_min(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(0xffffffffu, v);
#else
  return warp_reduce(v, MinOp<uint32_t>());
#endif
}
FI_DEVICE uint32_t warp_max(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
  return warp_reduce(v, MaxOp<uint32_t>());
#endif
}

FI_DEVICE uint64_t warp_inclusive_scan(uint64_t v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const uint64_t y = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// ------------------------------------------------------------------------------------------ shared memory

struct Exchange {
  unsigned long long a[kMaxCluster], b[kMaxCluster], c[kMaxCluster], d[kMaxCluster];  // values per rank
  unsigned int quantile[kMaxCluster][kQuantiles];                                     // topk_collect
};

struct alignas(16) Shared {
  union Work {
    struct Hist {  // one radix round (see radix_round); a bin's mass is mass_hi << 32 | mass_lo
      unsigned int count[kBins];
      unsigned int mass_lo[kBins], mass_hi[kBins];
    } hist;
    struct TopK {
      unsigned long long local[kGatherCap];           // the CTA's candidates, merged from the warps' buffers
      unsigned long long warp_buf[kWarps][kWarpBuf];  // per warp (as cand.key)
    } topk;
    unsigned long long chunk[kMaxChunks];  // fixed-point mass of each 32-vector chunk, vocabulary order
  } u;
  struct Cand {  // rank 0: gathered candidates (outside the union: rank 0's own warps push while others do)
    unsigned long long key[kGatherCap];  // key << 32 | ~index: descending order = key desc, then index asc
    unsigned long long w[kSmallKept];
  } cand;
  // Cluster exchanges write into the other CTAs' slots before a cluster barrier and read their own after it.
  // Two slot buffers alternate: a CTA writes buffer i again only after the next exchange's barrier, which every
  // CTA reaches only after reading buffer i.
  Exchange xch[2];
  unsigned long long red[kWarps];
  unsigned long long seg_mass[kMaxCluster];
  unsigned int seg_count[kMaxCluster];
  unsigned int gather_count;  // rank 0: candidates pushed so far
  unsigned int gather_n;
  unsigned int filter_theta;  // topk_filter: the largest threshold a warp of the CTA has reached
  int found;
  unsigned long long found_a, found_b;
  unsigned int found_c;
};

// Block-wide reduction through kWarps words of shared scratch; ends synchronized.
template <typename T, typename Op>
FI_DEVICE T block_reduce_in(T v, Op op, unsigned long long* red) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "8-byte values at most");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  T* scratch = reinterpret_cast<T*>(red);
  if (lane == 0) scratch[warp * (sizeof(unsigned long long) / sizeof(T))] = v;
  __syncthreads();
  v = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, scratch[w * (sizeof(unsigned long long) / sizeof(T))]);
  __syncthreads();
  return v;
}

template <typename T, typename Op>
FI_DEVICE T block_reduce(T v, Op op, Shared& sh) {
  return block_reduce_in(v, op, sh.red);
}

// Exclusive prefix over the threads in thread order (kWarps words of shared scratch); *total = the block's sum.
FI_DEVICE uint64_t block_exclusive_scan_in(uint64_t v, unsigned long long* red, uint64_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint64_t incl = warp_inclusive_scan(v);
  if (lane == 31) red[warp] = incl;
  __syncthreads();
  uint64_t before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint64_t s = red[w];
    if (w < warp) before += s;
    all += s;
  }
  __syncthreads();
  *total = all;
  return before + incl - v;
}

FI_DEVICE uint64_t block_exclusive_scan(uint64_t v, Shared& sh, uint64_t* total) {
  return block_exclusive_scan_in(v, sh.red, total);
}

// Sorts a[0, n) descending; n a power of two. Callers synchronize before (the data) and this ends synchronized.
FI_DEVICE void bitonic_sort_desc(unsigned long long* a, int n) {
  for (int k = 2; k <= n; k *= 2) {
    for (int j = k / 2; j > 0; j /= 2) {
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int l = i ^ j;
        if (l > i) {
          const unsigned long long x = a[i], y = a[l];
          if ((i & k) == 0 ? x < y : x > y) {
            a[i] = y;
            a[l] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

struct Reduced {
  uint64_t sum_a, prefix_a, sum_b, max_c, max_d;
};

// Every CTA contributes block-uniform values a, b, c, d; every CTA gets the sums of a and b, the maxima of c and d
// over the cluster and the sum of a over the ranks before its own (combined in rank order).
FI_DEVICE Reduced cluster_reduce(Shared& sh, ClusterCtx& cx, uint64_t a, uint64_t b = 0, uint64_t c = 0,
                                 uint64_t d = 0) {
  Exchange* slot = &sh.xch[cx.phase & 1];
  if (threadIdx.x < cx.size) {
    Exchange* dst = cluster_map(slot, threadIdx.x);
    dst->a[cx.rank] = a;
    dst->b[cx.rank] = b;
    dst->c[cx.rank] = c;
    dst->d[cx.rank] = d;
  }
  cluster_sync();
  ++cx.phase;
  Reduced r = {0, 0, 0, 0, 0};
  for (unsigned i = 0; i < cx.size; ++i) {
    const uint64_t ai = slot->a[i], ci = slot->c[i], di = slot->d[i];
    r.sum_a += ai;
    if (i < cx.rank) r.prefix_a += ai;
    r.sum_b += slot->b[i];
    r.max_c = ci > r.max_c ? ci : r.max_c;
    r.max_d = di > r.max_d ? di : r.max_d;
  }
  return r;
}

// Rank 0's (a, b) (uniform over rank 0's threads) in every CTA.
FI_DEVICE uint2 broadcast_pair(Shared& sh, ClusterCtx& cx, uint64_t a, uint64_t b, uint64_t* out_b) {
  Exchange* slot = &sh.xch[cx.phase & 1];
  if (cx.rank == 0 && threadIdx.x < cx.size) {
    Exchange* dst = cluster_map(slot, threadIdx.x);
    dst->a[0] = a;
    dst->b[0] = b;
  }
  cluster_sync();
  ++cx.phase;
  *out_b = slot->b[0];
  const uint64_t ra = slot->a[0];
  return make_uint2(static_cast<uint32_t>(ra), static_cast<uint32_t>(ra >> 32));
}

// ------------------------------------------------------------------------------------------ rows

// A row of `vocab` elements as 16-byte vectors, and this CTA's slice of them. Warp w walks vectors
// [v0 + w * warp_len, ...) 32 at a time (lane l takes vector base + l), so that a step of a warp covers 32
// consecutive vectors: the chunk (w, step) is contiguous and chunk w * chunks_per_warp + step follows
// vocabulary order.
template <typename DType, bool kCached>
struct Row {
  using E = Elem<DType>;
  using T = DType;
  static constexpr int kVec = E::kVec;
  const uint4* gvec;  // the 16-byte vector holding element 0 (aligned down)
  uint4* cache;       // shared-memory copy of vectors [v0, v1) (kCached)
  int head;           // elements of vector 0 before element 0
  int vocab, num_vecs, v0, v1, warp_len;
  float neutral;  // what stands for elements outside the row: probability 0 / logit -inf

  FI_DEVICE Row(const void* row, int vocab_, const ClusterCtx& cx, uint4* cache_, float neutral_)
      : cache(cache_), vocab(vocab_), neutral(neutral_) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(row);
    gvec = reinterpret_cast<const uint4*>(a & ~static_cast<uintptr_t>(15));
    head = static_cast<int>((a & 15) / sizeof(DType));
    num_vecs = (head + vocab + kVec - 1) / kVec;
    const int per = (num_vecs + static_cast<int>(cx.size) - 1) / static_cast<int>(cx.size);
    v0 = min(static_cast<int>(cx.rank) * per, num_vecs);
    v1 = min(v0 + per, num_vecs);
    warp_len = ((v1 - v0 + kWarps - 1) / kWarps + 31) / 32 * 32;
  }

  FI_DEVICE int elem(int v, int j) const { return v * kVec + j - head; }
  FI_DEVICE int chunks_per_warp() const { return warp_len / 32; }
  FI_DEVICE bool edge(int v) const { return v == 0 || v == num_vecs - 1; }

  // Edge vector v read element by element from global memory, the elements outside the row neutral: its bytes
  // outside the row may lie outside the tensor (the last row's tail, the first row's head).
  FI_DEVICE uint4 edge_vec(int v) const {
    const DType* row = reinterpret_cast<const DType*>(gvec) + head;
    float x[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int e = elem(v, j);
      x[j] = e >= 0 && e < vocab ? E::to_float(__ldg(row + e)) : neutral;  // (values survive float and back)
    }
    return E::pack(x);
  }

  // The 16 bytes of vector v (one of the slice's), elements outside the row neutral.
  FI_DEVICE uint4 raw(int v) const {
    if constexpr (kCached) {
      return cache[v - v0];
    } else {
      return edge(v) ? edge_vec(v) : __ldg(gvec + v);
    }
  }
  // raw(v) for a vector known to be no edge vector.
  FI_DEVICE uint4 raw_inner(int v) const {
    if constexpr (kCached) {
      return cache[v - v0];
    } else {
      return __ldg(gvec + v);
    }
  }
  FI_DEVICE void load(int v, float (&x)[kVec]) const { E::unpack(raw(v), x); }

  FI_DEVICE void load_or_neutral(int v, bool in, float (&x)[kVec]) const {
    if (in) {
      load(v, x);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) x[j] = neutral;
    }
  }

  // Copies the slice into shared memory (the interior vectors with cp.async, the edge vectors as edge_vec reads
  // them, so that the elements outside the row are neutral there). Ends synchronized.
  FI_DEVICE void fill_cache() const {
    if constexpr (kCached) {
      const int lo = max(v0, 1), hi = min(v1, num_vecs - 1);
      for (int v = lo + static_cast<int>(threadIdx.x); v < hi; v += kThreads)
        cp_async_16(cache + (v - v0), gvec + v, true);
      cp_async_commit();
      if (threadIdx.x < 2) {
        const int v = threadIdx.x == 0 ? 0 : num_vecs - 1;
        if (v >= v0 && v < v1 && (threadIdx.x == 0 || v != 0)) cache[v - v0] = edge_vec(v);
      }
      cp_async_wait<0>();
      __syncthreads();
    }
  }

  // f(v, in, step) for every vector of the slice in warp-uniform steps (in: v is one of this warp's vectors).
  template <typename F>
  FI_DEVICE void for_each(F&& f) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int begin = v0 + warp * warp_len;
    const int end = min(v1, begin + warp_len);
    int step = 0;
#pragma unroll 2
    for (int base = begin; base < end; base += 32, ++step) {
      const int v = base + lane;
      f(v, v < end, step);
    }
  }

  // The vector of chunk `chunk` that lane `lane` takes, and whether it is one of the slice's.
  FI_DEVICE int chunk_vec(int chunk, int lane, bool* in) const {
    const int w = chunk / chunks_per_warp(), step = chunk % chunks_per_warp();
    const int begin = v0 + w * warp_len;
    const int v = begin + step * 32 + lane;
    *in = v < min(v1, begin + warp_len);
    return v;
  }
};

// An output row of `vocab` elements: 16-byte stores where its vectors line up with the input row's, else (and
// at the row's ends) one element at a time.
template <typename OutT>
struct OutRow {
  OutT* row;
  uint4* vec;
  int vocab;
  bool vectorized;

  template <typename InT>
  FI_DEVICE OutRow(void* ptr, int vocab_, int in_head, InT /*tag*/) : row(static_cast<OutT*>(ptr)), vocab(vocab_) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
    vec = reinterpret_cast<uint4*>(a & ~static_cast<uintptr_t>(15));
    vectorized = sizeof(OutT) == sizeof(InT) && static_cast<int>((a & 15) / sizeof(OutT)) == in_head;
  }

  template <typename R>
  FI_DEVICE void store(const R& in, int v, const float (&y)[R::kVec]) const {
    if constexpr (sizeof(OutT) == sizeof(typename R::T)) {
      if (vectorized && !in.edge(v)) {
        vec[v] = Elem<OutT>::pack(y);
        return;
      }
    }
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) {
      const int e = in.elem(v, j);
      if (e >= 0 && e < vocab) row[e] = Elem<OutT>::from_float(y[j]);
    }
  }
};

// ------------------------------------------------------------------------------------------ row statistics

struct KeyStats {
  uint32_t max_key;    // over the cluster; 0: no element carries mass
  uint32_t num_valid;  // elements with a nonzero key, over the cluster
};

template <typename R>
FI_DEVICE KeyStats key_stats(const R& row, Shared& sh, ClusterCtx& cx, bool logits) {
  uint32_t tmax = 0, count = 0;
  row.for_each([&](int v, bool in, int) {
    float x[R::kVec];
    row.load_or_neutral(v, in, x);
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) {
      const uint32_t k = logits ? logit_key(x[j]) : prob_key(x[j]);
      tmax = k > tmax ? k : tmax;
      count += k != 0;
    }
  });
  const uint32_t bmax = block_reduce(tmax, MaxOp<uint32_t>(), sh);
  const uint32_t bcount = block_reduce(count, SumOp<uint32_t>(), sh);
  const Reduced r = cluster_reduce(sh, cx, 0, bcount, bmax);
  return {static_cast<uint32_t>(r.max_c), static_cast<uint32_t>(r.sum_b)};
}

// Fixed-point mass of the elements with key >= tau, over the cluster.
template <typename R>
FI_DEVICE uint64_t kept_mass(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg, uint32_t tau) {
  uint64_t m = 0;
  row.for_each([&](int v, bool in, int) {
    if (!in) return;
    float x[R::kVec];
    row.load(v, x);
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) m += wg.key(x[j]) >= tau ? wg.weight_fx(x[j]) : 0;
  });
  return cluster_reduce(sh, cx, block_reduce(m, SumOp<uint64_t>(), sh)).sum_a;
}

// ------------------------------------------------------------------------------------------ candidates

struct Gathered {
  uint32_t n;  // rank 0: candidates pushed (sorted in cand.key[0, n) when n <= kGatherCap)
  uint64_t z;  // the cluster's fixed-point mass of all elements (when asked for)
};

FI_DEVICE uint32_t cand_key(unsigned long long c) { return static_cast<uint32_t>(c >> 32); }
FI_DEVICE int cand_index(unsigned long long c) { return static_cast<int>(~static_cast<uint32_t>(c)); }
FI_DEVICE unsigned long long make_cand(uint32_t key, int index) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<uint32_t>(~index);
}

// How many of the first n entries of a list (of at most kGatherCap) have key >= tau.
FI_DEVICE int count_at_least_in(const unsigned long long* list, int n, uint32_t tau, Shared& sh) {
  int c = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) c += cand_key(list[i]) >= tau;
  return block_reduce(c, SumOp<int>(), sh);
}

// Appends, warp-aggregated, the lanes' candidates c with `take` into rank 0's candidate buffer (past kGatherCap
// they are only counted).
FI_DEVICE void push_to_rank0(Shared& sh, bool take, unsigned long long c) {
  const int lane = threadIdx.x % 32;
  const unsigned mask = __ballot_sync(0xffffffffu, take);
  if (!mask) return;
  const int leader = __ffs(mask) - 1;
  unsigned base = 0;
  if (lane == leader) base = atomicAdd(cluster_map(&sh.gather_count, 0), static_cast<unsigned>(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (take) {
    const unsigned slot = base + __popc(mask & ((1u << lane) - 1u));
    if (slot < kGatherCap) cluster_map(sh.cand.key, 0)[slot] = c;
  }
}

// After the pushes: the cluster barrier that completes them (summing the CTAs' block-uniform z), then rank 0
// orders what it received. Rank 0's gather_count is 0 again afterwards.
FI_DEVICE Gathered finish_gather(Shared& sh, ClusterCtx& cx, uint64_t z) {
  Gathered g;
  g.z = cluster_reduce(sh, cx, z).sum_a;
  g.n = 0;
  if (cx.rank == 0) {
    if (threadIdx.x == 0) {
      sh.gather_n = sh.gather_count;
      sh.gather_count = 0;  // nobody pushes again before the next cluster barrier
    }
    __syncthreads();
    g.n = sh.gather_n;
    if (g.n <= kGatherCap) {
      int n2 = 32;
      while (n2 < static_cast<int>(g.n)) n2 *= 2;
      for (int i = static_cast<int>(g.n) + threadIdx.x; i < n2; i += kThreads) sh.cand.key[i] = 0;
      __syncthreads();
      bitonic_sort_desc(sh.cand.key, n2);
    }
  }
  return g;
}

// Gathers (key, index) of the row's elements with lo <= key <= hi into rank 0 and orders them there (see
// finish_gather); with want_mass, also the cluster's fixed-point mass of all elements. Rank 0's gather_count must be
// 0 and its candidate buffer unused from the last cluster barrier on.
template <typename R>
FI_DEVICE Gathered gather_candidates(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg, uint32_t lo,
                                     uint32_t hi, bool want_mass) {
  uint64_t z = 0;
  row.for_each([&](int v, bool in, int) {
    float x[R::kVec];
    row.load_or_neutral(v, in, x);
    uint32_t k[R::kVec];
    bool hit = false;
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) {
      k[j] = wg.key(x[j]);
      hit |= k[j] >= lo && k[j] <= hi;
      if (want_mass) z += wg.weight_fx(x[j]);
    }
    // A round leaves a narrow range (top-p 0.9 of softmax(randn * 2) over 128k: ~130 elements): most warp steps
    // hold none of it and skip the per-element ballots (a warp-uniform test: the pushes' ballots need every lane).
    if (!__ballot_sync(0xffffffffu, hit)) return;
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) push_to_rank0(sh, k[j] >= lo && k[j] <= hi, make_cand(k[j], row.elem(v, j)));
  });
  return finish_gather(sh, cx, want_mass ? block_reduce(z, SumOp<uint64_t>(), sh) : 0);
}

// ------------------------------------------------------------------------------------------ top-k in one pass

struct WarpFilter {
  uint32_t tmax = 0, count = 0;  // this thread's largest key and number of elements with mass
  uint32_t theta = 1;            // the warp's threshold: its exact k-th largest key at its last compaction
  int n = 0;                     // entries in the warp's buffer
  bool overflow = false;         // more entries at or above theta than the buffer holds (ties)
};

// The warp's exact k-th largest key among buf[0, n) (k <= n <= kWarpBuf): a bitwise binary search for the largest
// t with k entries >= t, over keys held in registers. The answer lies between the smallest and the largest entry,
// so the bits above their highest differing bit are known: ~27 steps instead of 32 for float keys of a few octaves,
// each a redux.sync (a warp runs this on its serial path ~3 times per 2,000 elements when the cached row op
// filters a slice; the sampler, once per ~250 elements of a stream early on, then rarely).
FI_DEVICE uint32_t warp_kth_largest(const unsigned long long* buf, int n, int k) {
  constexpr int kPer = kWarpBuf / 32;
  const int lane = threadIdx.x % 32;
  uint32_t keys[kPer];
  uint32_t kmin = 0xFFFFFFFFu, kmax = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int i = q * 32 + lane;
    keys[q] = i < n ? cand_key(buf[i]) : 0u;
    if (i < n) {
      kmin = keys[q] < kmin ? keys[q] : kmin;
      kmax = keys[q] > kmax ? keys[q] : kmax;
    }
  }
  kmin = warp_min(kmin);
  kmax = warp_max(kmax);
  if (kmin == kmax) return kmax;
  const int top = 31 - __clz(kmin ^ kmax);  // the highest bit where they differ
  uint32_t t = top == 31 ? 0u : kmax & ~((2u << top) - 1u);
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t c = t | (1u << bit);
    int cnt = 0;
#pragma unroll
    for (int q = 0; q < kPer; ++q) cnt += keys[q] >= c;
    if (warp_sum(cnt) >= k) t = c;
  }
  return t;
}

// Streams this CTA's slice (kStreamUnroll 16-byte loads per lane in flight) and keeps, per warp, the elements whose
// key is at least the warp's running threshold in its buffer sh.u.warp_buf[warp]. When the buffer might not take
// another batch the warp raises its threshold to the exact k-th largest key of the buffer and drops what is below
// (k <= kFilterMaxK). A warp's threshold never exceeds the row's k-th largest key (the warp has seen k elements at or
// above it), and every element of the warp at or above its final threshold is in its buffer.
// A batch (kStreamUnroll vectors a lane) is filtered lane by lane: each lane marks its elements at or above the
// threshold (compared as values: no key is computed for an element that is not taken), one warp scan of the lanes'
// counts gives every lane its slots, and each lane appends its own marked elements; no per-element warp vote. Only a
// batch whose takes do not fit the buffer even after a compaction (a warp's first batch, rows of many ties) walks its
// vectors with a vote per element, compacting between them. Measured on an H200 (probe_sampling.py, float32, top-k
// 50, batch 256 x 128256, top_k_mask_logits / top_k_top_p_sampling_from_logits, us): a vote per element in every
// batch 142.5 / 120.9; lane by lane with keys 134.3 / 120.9; values compared, no edge tests in inner batches, takes
// appended by their set bits 115.3 / 93.7; the CTA's largest threshold shared 110.8 / 88.9.
// on_load(v, in) runs for each vector right after its load is issued (the streamed row transforms store their
// output's neutral value there, so that the row's writes share the memory system with its reads).
struct NoOnLoad {
  FI_DEVICE void operator()(int, bool) const {}
};

// Development knob (benchmarks/probe_sampling.py "own_theta"): 0 keeps each warp on its own threshold (measured above:
// 115.2 / 91.9 us).
#ifndef FI_TOPK_SHARED_THETA
#define FI_TOPK_SHARED_THETA 1
#endif

template <typename R, typename OnLoad = NoOnLoad>
FI_DEVICE WarpFilter topk_filter(const R& row, Shared& sh, bool logits, int k, OnLoad&& on_load = OnLoad()) {
  constexpr int kVec = R::kVec;
  constexpr int kStep = 32 * kVec;  // what one vector step of a warp may append
  static_assert(kWarpBuf - kStep >= kFilterMaxK, "a compaction must leave room for k <= kFilterMaxK candidates");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long* buf = sh.u.topk.warp_buf[warp];
  WarpFilter f;
  const int begin = row.v0 + warp * row.warp_len;
  const int end = min(row.v1, begin + row.warp_len);
  if (threadIdx.x == 0) sh.filter_theta = f.theta;
  __syncthreads();
  float neutral[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) neutral[j] = row.neutral;
  const uint4 neutral_vec = R::E::pack(neutral);  // stands for vectors past the slice: never taken, no mass
  auto key_of = [logits](float x) { return logits ? logit_key_flat(x) : prob_key(x); };
  // Keys compared as values (one code path for both kinds: a kernel holding one filter for each spilled, ptxas of
  // CUDA 13.0): x has a key (!= 0) exactly when lo < x <= hi (a logit: x > -inf, NaN compares false; a probability:
  // finite and > 0), and key(x) >= theta exactly when theta_value <= x <= hi (logit_threshold; a probability's bits
  // are its key).
  const float lo = logits ? -kInf : 0.f, hi = logits ? kInf : 3.40282347e38f;  // (FLT_MAX)
  float theta_value = logits ? logit_threshold(f.theta) : __uint_as_float(f.theta);
  float tmax_value = lo;  // the largest value with a key (its key is f.tmax at the end)
  // Raises the threshold to the buffer's exact k-th largest key (f.n >= k), publishes it to the CTA's other warps
  // (any warp's k-th largest bounds the row's k-th largest from below, so every warp may filter with the largest
  // one: fewer takes later in the row), and drops the entries below it, in place and in order: a group's entries are
  // read before any of it is rewritten.
  auto compact = [&]() {
    __syncwarp();
    const uint32_t t = warp_kth_largest(buf, f.n, k);
    f.theta = t > f.theta ? t : f.theta;
    theta_value = logits ? logit_threshold(f.theta) : __uint_as_float(f.theta);
#if FI_TOPK_SHARED_THETA
    if (lane == 0) atomicMax(&sh.filter_theta, f.theta);
#endif
    int kept = 0;
    for (int q0 = 0; q0 < f.n; q0 += 32) {
      const int i = q0 + lane;
      const unsigned long long c = i < f.n ? buf[i] : 0ull;
      const bool keep = i < f.n && cand_key(c) >= f.theta;
      const unsigned mask = __ballot_sync(0xffffffffu, keep);
      __syncwarp();  // (the ballot orders no memory: the lanes' reads of the group before any lane's write)
      if (keep) buf[kept + __popc(mask & ((1u << lane) - 1u))] = c;
      kept += __popc(mask);
    }
    __syncwarp();
    f.n = kept;
    f.overflow = f.n > kWarpBuf - kStep;
  };
  constexpr int kBatch = 32 * kStreamUnroll;  // vectors a warp loads together
  for (int base = begin; base < end; base += kBatch) {
    uint4 raw[kStreamUnroll];
    if (base > 0 && base + kBatch <= end && base + kBatch < row.num_vecs) {  // (no edge vector, none past the slice)
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) raw[u] = row.raw_inner(base + 32 * u + lane);
    } else {
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int v = base + 32 * u + lane;
        raw[u] = v < end ? row.raw(v) : neutral_vec;
      }
    }
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) on_load(base + 32 * u + lane, base + 32 * u + lane < end);
#if FI_TOPK_SHARED_THETA
    {  // lane 0's read for the whole warp (the threshold must be warp-uniform), atomic as the other warps' writes
      uint32_t t = 0;
      if (lane == 0) t = atomicOr(&sh.filter_theta, 0u);
      t = __shfl_sync(0xffffffffu, t, 0);
      if (t > f.theta) {
        f.theta = t;
        theta_value = logits ? logit_threshold(f.theta) : __uint_as_float(f.theta);
      }
    }
#endif
    // This lane's elements at or above the threshold, one bit each (vector u: bits [u * kVec, (u + 1) * kVec)), and
    // (with stats) the row statistics.
    auto mark = [&](uint32_t (&marks)[kStreamUnroll], bool stats) {
      int mine = 0;
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        float x[kVec];
        R::E::unpack(raw[u], x);
        uint32_t take = 0, valid = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const bool ok = x[j] > lo && x[j] <= hi;
          take |= (x[j] >= theta_value && x[j] <= hi ? 1u : 0u) << j;
          if (stats) {
            valid |= (ok ? 1u : 0u) << j;
            tmax_value = fmaxf(tmax_value, ok ? x[j] : lo);
          }
        }
        if (stats) f.count += __popc(valid);
        marks[u] = take;
        mine += __popc(take);
      }
      return mine;
    };
    auto scan = [&](int mine, int* total) {  // the lanes' inclusive prefix sum of `mine`, and its total
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, mine, o);
        if (lane >= o) mine += y;
      }
      *total = __shfl_sync(0xffffffffu, mine, 31);
      return mine;
    };
    uint32_t marks[kStreamUnroll];
    int mine = mark(marks, true);
    if (f.overflow) continue;  // (an overflowed warp takes nothing more)
    int total;
    int upto = scan(mine, &total);
    if (total == 0) continue;
    if (f.n + total > kWarpBuf && f.n >= k) {
      compact();
      if (f.overflow) continue;
      mine = mark(marks, false);
      upto = scan(mine, &total);
    }
    if (f.n + total <= kWarpBuf) {
      int slot = f.n + upto - mine;
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        // (a loop over the set bits, elements read one at a time: unrolled per element, 16-bit rows spilled)
        for (uint32_t m = marks[u]; m; m &= m - 1) {
          const int j = __ffs(m) - 1;
          buf[slot++] = make_cand(key_of(R::E::at(raw[u], j)), row.elem(base + 32 * u + lane, j));
        }
      }
      f.n += total;
      continue;
    }
    // The batch's takes do not fit: vector by vector, a vote per element, compacting whenever the buffer might not
    // take the next vector.
#pragma unroll
    for (int u = 0; u < kStreamUnroll; ++u) {
      if (base + 32 * u >= end) break;  // (warp-uniform)
      if (f.n > kWarpBuf - kStep && !f.overflow) compact();
      float x[kVec];
      R::E::unpack(raw[u], x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t key = key_of(x[j]);
        const bool take = key >= f.theta && !f.overflow;
        const unsigned mask = __ballot_sync(0xffffffffu, take);
        if (take) buf[f.n + __popc(mask & ((1u << lane) - 1u))] = make_cand(key, row.elem(base + 32 * u + lane, j));
        f.n += __popc(mask);
      }
    }
  }
  __syncwarp();
  f.tmax = key_of(tmax_value);
  // The warp's final bound: the exact k-th largest of what it kept (a tight bound even for a warp that never had
  // to compact).
  if (!f.overflow && f.n > k) {
    const uint32_t t = warp_kth_largest(buf, f.n, k);
    f.theta = t > f.theta ? t : f.theta;
  }
  return f;
}

struct TopKStats {
  KeyStats st;
  uint32_t theta;  // a lower bound of the row's k-th largest key, close to it
  bool ok;         // every CTA kept all its elements at or above theta
  int n_local;     // the CTA's candidates (sorted in u.topk.local)
};

// The ranks of its sorted candidates a CTA publishes: a value t of CTA c that the published ranks show k
// elements (over the cluster) at or above is a lower bound of the row's k-th largest key.
__device__ constexpr int kQuantileRanks[kQuantiles] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256};

// After topk_filter: merges the warps' candidates at or above the CTA's largest warp threshold into u.topk.local
// (sorted descending), and combines over the cluster (one barrier) the row's statistics and a close bound of its
// k-th largest key: with one CTA the local list holds the whole top-k set, so its k-th entry; with more, the
// largest published quantile that the published ranks prove a bound.
FI_DEVICE TopKStats topk_collect(Shared& sh, ClusterCtx& cx, const WarpFilter& f, int k) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t bmax = block_reduce(f.tmax, MaxOp<uint32_t>(), sh);
  const uint32_t bcount = block_reduce(f.count, SumOp<uint32_t>(), sh);
  const uint32_t btheta = block_reduce(f.theta, MaxOp<uint32_t>(), sh);
  if (threadIdx.x == 0) sh.gather_n = 0;
  __syncthreads();
  const unsigned long long* buf = sh.u.topk.warp_buf[warp];
  for (int q0 = 0; q0 < f.n; q0 += 32) {
    const int i = q0 + lane;
    const unsigned long long c = i < f.n ? buf[i] : 0ull;
    const bool take = !f.overflow && i < f.n && cand_key(c) >= btheta;
    const unsigned mask = __ballot_sync(0xffffffffu, take);
    if (!mask) continue;
    const int leader = __ffs(mask) - 1;
    unsigned base = 0;
    if (lane == leader) base = atomicAdd(&sh.gather_n, static_cast<unsigned>(__popc(mask)));
    base = __shfl_sync(0xffffffffu, base, leader);
    const unsigned slot = base + __popc(mask & ((1u << lane) - 1u));
    if (take && slot < kGatherCap) sh.u.topk.local[slot] = c;
  }
  __syncthreads();
  const int n = static_cast<int>(sh.gather_n);
  const bool over = n > kGatherCap || block_reduce(lane == 0 && f.overflow ? 1 : 0, SumOp<int>(), sh) > 0;
  if (!over) {
    int n2 = 32;
    while (n2 < n) n2 *= 2;
    for (int i = n + threadIdx.x; i < n2; i += kThreads) sh.u.topk.local[i] = 0;
    __syncthreads();
    bitonic_sort_desc(sh.u.topk.local, n2);
  }
  // Publish (overflow, count, max) and the quantiles to every CTA.
  Exchange* slot = &sh.xch[cx.phase & 1];
  const int t = threadIdx.x;
  if (t < static_cast<int>(cx.size) * kQuantiles) {
    const int q = t % kQuantiles, r = kQuantileRanks[q];
    cluster_map(slot, t / kQuantiles)->quantile[cx.rank][q] = !over && r <= n ? cand_key(sh.u.topk.local[r - 1]) : 0u;
  }
  const Reduced red = cluster_reduce(sh, cx, over ? 1 : 0, bcount, bmax);  // (the barrier also covers the quantiles)
  TopKStats ts;
  ts.st = {static_cast<uint32_t>(red.max_c), static_cast<uint32_t>(red.sum_b)};
  ts.ok = red.sum_a == 0;
  ts.n_local = n;
  ts.theta = 0;
  if (!ts.ok) return ts;
  if (cx.size == 1) {
    ts.theta = k <= n ? cand_key(sh.u.topk.local[k - 1]) : 0u;
    return ts;
  }
  uint32_t best = 0;
  if (t < static_cast<int>(cx.size) * kQuantiles) {
    const uint32_t cand = slot->quantile[t / kQuantiles][t % kQuantiles];
    int guaranteed = 0;
    for (unsigned c = 0; c < cx.size; ++c) {
      int r = 0;
#pragma unroll
      for (int q = 0; q < kQuantiles; ++q) r = slot->quantile[c][q] >= cand ? kQuantileRanks[q] : r;
      guaranteed += r;
    }
    if (cand != 0 && guaranteed >= k) best = cand;
  }
  ts.theta = block_reduce(best, MaxOp<uint32_t>(), sh);
  return ts;
}

// Moves the CTAs' candidates at or above theta (a prefix of each sorted local list) to rank 0 and orders them there
// (with one CTA: copies them in order); with want_mass also the cluster's fixed-point mass of all elements (a pass
// over the slice).
template <typename R>
FI_DEVICE Gathered push_topk_candidates(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg,
                                        const TopKStats& ts, bool want_mass) {
  uint64_t z = 0;
  if (want_mass) {
    row.for_each([&](int v, bool in, int) {
      if (!in) return;
      float x[R::kVec];
      row.load(v, x);
#pragma unroll
      for (int j = 0; j < R::kVec; ++j) z += wg.weight_fx(x[j]);
    });
    z = block_reduce(z, SumOp<uint64_t>(), sh);
  }
  const unsigned long long* local = sh.u.topk.local;
  if (cx.size == 1) {
    const int n = count_at_least_in(local, ts.n_local, ts.theta, sh);
    for (int i = threadIdx.x; i < n; i += kThreads) sh.cand.key[i] = local[i];
    Gathered g;
    g.z = cluster_reduce(sh, cx, z).sum_a;
    g.n = static_cast<uint32_t>(n);
    return g;
  }
  for (int q0 = 0; q0 < ts.n_local; q0 += kThreads) {
    const int i = q0 + threadIdx.x;
    const unsigned long long c = i < ts.n_local ? local[i] : 0ull;
    push_to_rank0(sh, i < ts.n_local && cand_key(c) >= ts.theta, c);
  }
  return finish_gather(sh, cx, z);
}

constexpr int kCandPerThread = kGatherCap / kThreads;

// Rank 0, candidates sorted: how many of the first n have key >= tau.
FI_DEVICE int count_at_least(Shared& sh, int n, uint32_t tau) { return count_at_least_in(sh.cand.key, n, tau, sh); }

// Rank 0, candidates sorted, F_above = F(key > the first candidate's range): the largest candidate key t with
// F_above + F(candidates >= t) >= target (F = count or fixed-point mass), among the first n; *f_total = F of the
// n candidates, *f_kept = F_above + F(candidates >= t) (each when asked for).
FI_DEVICE uint32_t resolve_sorted(Shared& sh, const Weigher& wg, int n, bool by_mass, uint64_t f_above, uint64_t target,
                                  uint64_t* f_total, uint64_t* f_kept = nullptr) {
  uint64_t f[kCandPerThread], local = 0;
#pragma unroll
  for (int q = 0; q < kCandPerThread; ++q) {
    const int i = threadIdx.x * kCandPerThread + q;
    f[q] = i < n ? (by_mass ? wg.weight_fx(wg.value(cand_key(sh.cand.key[i]))) : 1) : 0;
    local += f[q];
  }
  uint64_t total;
  uint64_t acc = f_above + block_exclusive_scan(local, sh, &total);
  int failing = 0;
#pragma unroll
  for (int q = 0; q < kCandPerThread; ++q) {
    const int i = threadIdx.x * kCandPerThread + q;
    acc += f[q];
    failing += i < n && acc < target;
  }
  const int p = block_reduce(failing, SumOp<int>(), sh);
  if (f_total) *f_total = total;
  const uint32_t t = cand_key(sh.cand.key[p < n ? p : n - 1]);
  if (f_kept) {
    uint64_t kept = 0;
#pragma unroll
    for (int q = 0; q < kCandPerThread; ++q) {
      const int i = threadIdx.x * kCandPerThread + q;
      kept += i < n && cand_key(sh.cand.key[i]) >= t ? f[q] : 0;
    }
    *f_kept = f_above + block_reduce(kept, SumOp<uint64_t>(), sh);
  }
  return t;
}

// Rank 0, candidates sorted, the first n_kept are the kept set: the inverse CDF in vocabulary order over their
// weights (the same element the distributed sampler picks). Returns the element.
FI_DEVICE int sample_sorted(Shared& sh, const Weigher& wg, int n_kept, uint64_t r64) {
  const int t = threadIdx.x;
  uint64_t w = 0;
  int idx = 0;
  if (t < n_kept) {
    const unsigned long long c = sh.cand.key[t];
    idx = cand_index(c);
    w = wg.weight_fx(wg.value(cand_key(c)));
    sh.cand.w[t] = w;
  }
  if (t == 0) sh.found = -1;
  const uint64_t total = block_reduce(w, SumOp<uint64_t>(), sh);  // (synchronizes the writes above)
  const uint64_t target = __umul64hi(total, r64);
  if (t < n_kept && w > 0) {
    uint64_t before = 0;
    for (int j = 0; j < n_kept; ++j) before += cand_index(sh.cand.key[j]) < idx ? sh.cand.w[j] : 0;
    if (before <= target && target - before < w) sh.found = idx;
  }
  __syncthreads();
  const int found = sh.found;
  __syncthreads();
  return found;
}

// ------------------------------------------------------------------------------------------ threshold search

struct RoundResult {
  int bin;
  uint64_t f_before;  // F of the bins before `bin`
  uint64_t f_bin;     // F of `bin`
  uint32_t count;     // elements in `bin`
};

FI_DEVICE uint64_t bin_mass(const Shared::Work::Hist& h, int b) {
  return (static_cast<uint64_t>(h.mass_hi[b]) << 32) + h.mass_lo[b];
}

// Adds a fixed-point mass to a pair of 32-bit words (a bin's mass): two native 32-bit shared atomics (the low word's
// carry goes to the high word) instead of a 64-bit atomicAdd, which sm_90 compiles to a load + compare-and-swap retry
// loop (ATOMS.CAST.SPIN.64) that serializes every update of one address at a shared-memory round trip each. The sum is
// exact in any order: the high word counts every wrap of the low one.
FI_DEVICE void add_mass_words(unsigned int* lo, unsigned int* hi, uint64_t w) {
  const uint32_t l = static_cast<uint32_t>(w);
  const uint32_t old = atomicAdd(lo, l);
  const uint32_t h = static_cast<uint32_t>(w >> 32) + (old + l < l ? 1u : 0u);
  if (h) atomicAdd(hi, h);
}
FI_DEVICE void bin_add_mass(Shared::Work::Hist& h, int b, uint64_t w) {
  add_mass_words(&h.mass_lo[b], &h.mass_hi[b], w);
}

// One radix round over keys [lo, hi]: bins of 2^shift keys from hi down, the last bin also taking every key below
// its range. Returns the bin where F first reaches `need` (F = count or mass; need >= 1); *total = F([lo, hi]).
// `need_of_total(total)` gives need (the target may depend on the total, e.g. top_p * mass).
// The last bin is summed in registers and added once per warp: in the first round (bins of 1/128 octave over the 16
// octaves below the row's maximum) it takes every element further below, ~15% of a softmax(randn * 2) row and
// ~50% of its logits, and the shared-memory updates of one address serialize.
// Ends without a cluster barrier: the CTAs may still read the owners' bins (the union) until the caller's next
// cluster barrier, and no CTA may write its union before then.
template <typename R, typename NeedF>
FI_DEVICE RoundResult radix_round(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg, uint32_t lo, uint32_t hi,
                                  int shift, bool by_mass, NeedF&& need_of_total) {
  auto& h = sh.u.hist;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    h.count[b] = 0;
    h.mass_lo[b] = 0;
    h.mass_hi[b] = 0;
  }
  __syncthreads();
  uint32_t last_c = 0;
  uint64_t last_m = 0;
  row.for_each([&](int v, bool in, int) {
    if (!in) return;
    float x[R::kVec];
    row.load(v, x);
#pragma unroll
    for (int j = 0; j < R::kVec; ++j) {
      const uint32_t k = wg.key(x[j]);
      if (k >= lo && k <= hi) {
        const uint32_t b = (hi - k) >> shift;
        if (b < static_cast<uint32_t>(kBins - 1)) {
          atomicAdd(&h.count[b], 1u);
          if (by_mass) bin_add_mass(h, static_cast<int>(b), wg.weight_fx(x[j]));
        } else {
          ++last_c;
          if (by_mass) last_m += wg.weight_fx(x[j]);
        }
      }
    }
  });
  last_c = warp_reduce(last_c, SumOp<uint32_t>());
  if (by_mass) last_m = warp_reduce(last_m, SumOp<uint64_t>());
  if (threadIdx.x % 32 == 0) {
    if (last_c) atomicAdd(&h.count[kBins - 1], last_c);
    if (last_m) bin_add_mass(h, kBins - 1, last_m);
  }
  cluster_sync();
  // Merge the owned segment in place (only its owner reads these bins of any CTA) and publish its totals.
  const int seg = kBins / static_cast<int>(cx.size);
  const int s0 = static_cast<int>(cx.rank) * seg;
  uint32_t seg_c = 0;
  uint64_t seg_m = 0;
  for (int b = s0 + threadIdx.x; b < s0 + seg; b += kThreads) {
    uint32_t c = 0;
    uint64_t m = 0;
#pragma unroll 8  // (independent remote loads: several ranks' bins in flight, not one round trip per rank)
    for (unsigned r = 0; r < cx.size; ++r) {
      const auto* hr = cluster_map(&h, r);
      c += hr->count[b];
      if (by_mass) m += bin_mass(*hr, b);
    }
    h.count[b] = c;
    h.mass_lo[b] = static_cast<uint32_t>(m);
    h.mass_hi[b] = static_cast<uint32_t>(m >> 32);
    seg_c += c;
    seg_m += m;
  }
  seg_c = block_reduce(seg_c, SumOp<uint32_t>(), sh);
  seg_m = block_reduce(seg_m, SumOp<uint64_t>(), sh);
  {
    Exchange* slot = &sh.xch[cx.phase & 1];
    if (threadIdx.x < cx.size) {
      Exchange* dst = cluster_map(slot, threadIdx.x);
      dst->a[cx.rank] = seg_c;
      dst->b[cx.rank] = seg_m;
    }
    cluster_sync();
    ++cx.phase;
    if (threadIdx.x < cx.size) {
      sh.seg_count[threadIdx.x] = static_cast<uint32_t>(slot->a[threadIdx.x]);
      sh.seg_mass[threadIdx.x] = slot->b[threadIdx.x];
    }
    __syncthreads();
  }
  uint64_t total = 0;
  for (unsigned r = 0; r < cx.size; ++r) total += by_mass ? sh.seg_mass[r] : sh.seg_count[r];
  const uint64_t need = need_of_total(total);
  // The segment, then the bin.
  uint64_t acc = 0;
  int rs = static_cast<int>(cx.size) - 1;
  for (int r = 0; r < static_cast<int>(cx.size); ++r) {
    const uint64_t f = by_mass ? sh.seg_mass[r] : sh.seg_count[r];
    if (acc + f >= need) {
      rs = r;
      break;
    }
    if (r + 1 < static_cast<int>(cx.size)) acc += f;
  }
  const auto* ho = cluster_map(&h, rs);
  auto f_of = [&](int b) -> uint64_t { return by_mass ? bin_mass(*ho, b) : ho->count[b]; };
  const int per = seg >= kThreads ? seg / kThreads : 1;
  const int b0 = rs * seg + threadIdx.x * per;
  const bool mine = threadIdx.x * per < seg;
  uint64_t local = 0;
  if (mine) {
    for (int q = 0; q < per; ++q) local += f_of(b0 + q);
  }
  uint64_t seg_total;
  const uint64_t before = acc + block_exclusive_scan(local, sh, &seg_total);
  if (threadIdx.x == 0) {  // if nothing reaches `need` (it cannot): the segment's last bin
    sh.found = rs * seg + seg - 1;
    sh.found_b = f_of(rs * seg + seg - 1);
    sh.found_a = acc + seg_total - sh.found_b;
    sh.found_c = ho->count[rs * seg + seg - 1];
  }
  __syncthreads();
  if (mine && before < need && need <= before + local) {
    uint64_t run = before;
    for (int q = 0; q < per; ++q) {
      const uint64_t f = f_of(b0 + q);
      if (run + f >= need) {
        sh.found = b0 + q;
        sh.found_a = run;
        sh.found_b = f;
        sh.found_c = ho->count[b0 + q];
        break;
      }
      run += f;
    }
  }
  __syncthreads();
  return {sh.found, sh.found_a, sh.found_b, sh.found_c};
}

// The largest key t in [lo, hi] with f_above + F(key >= t) >= target (F over the valid elements; the caller
// guarantees F over [lo, hi] reaches it). With fraction >= 0 the target is instead mass_target(fraction, F([lo, hi]))
// (for top-p, whose target depends on the row's mass). *f_kept (when asked for) = F(key >= t), or kUnknown when
// no round ran (lo == hi from the start).
template <typename R>
FI_DEVICE uint32_t select_threshold(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg, bool by_mass,
                                    uint64_t target, float fraction, uint32_t lo, uint32_t hi,
                                    uint64_t* f_kept = nullptr) {
  uint64_t f_last = kUnknown;  // F of the last round's bin
  uint64_t f_above = 0;
  bool first = true;
  while (lo < hi) {
    int shift = 0;
    while (shift < 32 && (static_cast<uint64_t>(hi - lo) >> shift) >= static_cast<uint64_t>(kBins)) ++shift;
    if (first && shift > kFirstShift) shift = kFirstShift;  // fine bins below the maximum, the rest in the last
    const bool clamped = (static_cast<uint64_t>(hi - lo) >> shift) >= static_cast<uint64_t>(kBins);
    const bool relative = first && fraction >= 0.f;
    const RoundResult r = radix_round(row, sh, cx, wg, lo, hi, shift, by_mass, [&](uint64_t total) {
      if (relative) target = mass_target(fraction, total);
      return target - f_above;
    });
    first = false;
    const uint32_t off = static_cast<uint32_t>(r.bin) << shift;  // <= hi - lo
    const uint32_t new_hi = hi - off;
    uint32_t new_lo = lo;
    if (!(clamped && r.bin == kBins - 1)) {
      const uint32_t width = shift >= 32 ? 0xFFFFFFFFu : (1u << shift) - 1u;
      new_lo = new_hi - lo >= width ? new_hi - width : lo;
    }
    f_above += r.f_before;
    f_last = r.f_bin;
    lo = new_lo;
    hi = new_hi;
    if (lo < hi && r.count <= kGatherCap) {
      // (the gather's cluster barrier also ends the round: it writes no union)
      const Gathered g = gather_candidates(row, sh, cx, wg, lo, hi, false);
      uint64_t tau = 0, kept = 0;
      if (cx.rank == 0) tau = resolve_sorted(sh, wg, static_cast<int>(g.n), by_mass, f_above, target, nullptr, &kept);
      const uint32_t t = broadcast_pair(sh, cx, tau, kept, &kept).x;
      if (f_kept) *f_kept = kept;
      return t;
    }
    cluster_sync();  // the owners' bins are read: the unions are free again
  }
  if (f_kept) *f_kept = f_last == kUnknown ? kUnknown : f_above + f_last;  // (the last bin: the single key hi)
  return hi;
}

// ------------------------------------------------------------------------------------------ sampling in order

// Inverse CDF in vocabulary order over the fixed-point weights vec_w(v, in, w) gives (0 where !in): the element
// where the cumulative weight first exceeds floor(total * r64 / 2^64), passed to emit(element) by the one CTA
// that holds it. Returns false everywhere when the total is 0.
template <typename R, typename VecW, typename Emit>
FI_DEVICE bool sample_in_order(const R& row, Shared& sh, ClusterCtx& cx, uint64_t r64, VecW&& vec_w, Emit&& emit) {
  constexpr int kVec = R::kVec;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cpw = row.chunks_per_warp();
  const int nchunks = cpw * kWarps;
  for (int c = threadIdx.x; c < nchunks; c += kThreads) sh.u.chunk[c] = 0;
  __syncthreads();
  uint64_t warp_total = 0;
  row.for_each([&](int v, bool in, int step) {
    uint64_t w[kVec], s = 0;
    vec_w(v, in, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s += w[j];
    s = warp_reduce(s, SumOp<uint64_t>());
    if (lane == 0) sh.u.chunk[warp * cpw + step] = s;
    warp_total += s;
  });
  const uint64_t cta_total = block_reduce(lane == 0 ? warp_total : 0, SumOp<uint64_t>(), sh);
  const Reduced red = cluster_reduce(sh, cx, cta_total, 0);
  if (red.sum_a == 0) return false;
  const uint64_t target = __umul64hi(red.sum_a, r64);
  if (target < red.prefix_a || target - red.prefix_a >= cta_total) return true;
  const uint64_t t = target - red.prefix_a;
  if (warp == 0) {
    uint64_t acc = 0;
    for (int base = 0; base < nchunks; base += 32) {
      const int c = base + lane;
      const uint64_t s = c < nchunks ? sh.u.chunk[c] : 0;
      const uint64_t incl = warp_inclusive_scan(s);
      const unsigned hit = __ballot_sync(0xffffffffu, acc + incl > t);
      if (hit) {
        if (lane == __ffs(hit) - 1) {
          sh.found = c;
          sh.found_a = t - (acc + incl - s);
        }
        break;
      }
      acc += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  const int c = sh.found;
  const uint64_t rest = sh.found_a;
  if (warp == c / cpw) {
    bool in;
    const int v = row.chunk_vec(c, lane, &in);
    uint64_t w[kVec], s = 0;
    vec_w(v, in, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) s += w[j];
    const uint64_t incl = warp_inclusive_scan(s);
    const unsigned hit = __ballot_sync(0xffffffffu, incl > rest);
    if (hit && lane == __ffs(hit) - 1) {
      uint64_t acc = incl - s;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (acc + w[j] > rest) {
          emit(row.elem(v, j));
          break;
        }
        acc += w[j];
      }
    }
  }
  return true;
}

// ------------------------------------------------------------------------------------------ kernels

struct SampleParams {
  const void* input;  // [num_rows, row_stride] probabilities (float32) or logits
  int64_t row_stride;
  int num_rows, vocab, batch;
  bool logits;
  const void* indices;  // [batch] int32/int64: the input row of each output; null: output i reads row i
  bool indices_int64;
  void* samples;  // [batch] int32/int64
  bool samples_int64;
  bool* valid;  // [batch] or null
  int filters;  // Filter bits
  bool top_k_first;
  const int* top_k_arr;  // [batch] or null (then top_k_val)
  int top_k_val;
  const float* top_p_arr;
  float top_p_val;
  const float* min_p_arr;
  float min_p_val;
  const int64_t* seed_arr;  // [batch] or [1] (stride 0) or null (then seed_val)
  int seed_stride;
  uint64_t seed_val;
  const int64_t* offset_arr;
  int offset_stride;
  uint64_t offset_val;
};

// The kernels' bodies are device functions of (params, dynamic shared memory): the __global__ wrappers below only
// pass their shared memory, so that the bodies can also run elsewhere (tests/sampling_emulator).
template <typename DType, bool kCached>
FI_DEVICE void sample_cta(const SampleParams& p, uint8_t* smem_raw) {
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint4* cache = reinterpret_cast<uint4*>(smem_raw + sizeof(Shared));
  ClusterCtx cx = {cluster_rank(), cluster_size(), 0};
  cluster_start_arrive();
  const int out = static_cast<int>(blockIdx.x / cx.size);
  const bool lead = cx.rank == 0 && threadIdx.x == 0;
  auto emit = [&](int64_t token, bool ok) {
    if (p.samples_int64) {
      static_cast<int64_t*>(p.samples)[out] = token;
    } else {
      static_cast<int*>(p.samples)[out] = static_cast<int>(token);
    }
    if (p.valid) p.valid[out] = ok;
  };
  if (threadIdx.x == 0) sh.gather_count = 0;
  int64_t src = out;
  if (p.indices)
    src = p.indices_int64 ? static_cast<const int64_t*>(p.indices)[out] : static_cast<const int*>(p.indices)[out];
  if (src < 0 || src >= p.num_rows) {  // the same decision in every CTA of the cluster
    if (lead) emit(0, false);
    return;
  }
  const Row<DType, kCached> row(static_cast<const DType*>(p.input) + src * p.row_stride, p.vocab, cx, cache,
                                p.logits ? -kInf : 0.f);
  row.fill_cache();
  cluster_start_wait();
  // Out-of-range parameters clamp (a NaN disables its filter): top_p <= 0 keeps the largest element, min_p > 1
  // acts as 1.
  const int k = p.top_k_arr ? p.top_k_arr[out] : p.top_k_val;
  float top_p = p.top_p_arr ? p.top_p_arr[out] : p.top_p_val;
  top_p = top_p != top_p ? 1.f : fmaxf(top_p, 0.f);
  float min_p = p.min_p_arr ? p.min_p_arr[out] : p.min_p_val;
  min_p = min_p != min_p ? 0.f : fminf(min_p, 1.f);
  const bool want_k = (p.filters & kTopK) && k > 0;
  const bool use_p = (p.filters & kTopP) && top_p < 1.f;
  const bool use_min_p = (p.filters & kMinP) && !p.logits && min_p > 0.f;
  const uint64_t seed = p.seed_arr ? static_cast<uint64_t>(p.seed_arr[out * p.seed_stride]) : p.seed_val;
  const uint64_t offset = p.offset_arr ? static_cast<uint64_t>(p.offset_arr[out * p.offset_stride]) : p.offset_val;
  const uint64_t r64 = random64(seed, offset, static_cast<uint32_t>(out), 0);

  // Top-k with k <= kFilterMaxK: one pass keeps the candidates (and gives the row's statistics).
  const bool filtered = want_k && k <= kFilterMaxK;
  TopKStats ts;
  if (filtered) {
    ts = topk_collect(sh, cx, topk_filter(row, sh, p.logits, k), k);
  } else {
    ts.st = key_stats(row, sh, cx, p.logits);
  }
  const KeyStats st = ts.st;
  if (st.max_key == 0) {
    if (lead) emit(0, false);
    return;
  }
  const Weigher wg(p.logits, st.max_key);
  const bool use_k = want_k && static_cast<uint32_t>(k) < st.num_valid;

  uint32_t tau = 1;  // every element with mass
  if (use_k) {
    bool resolved = false;
    if (filtered && ts.ok) {
      const Gathered g = push_topk_candidates(row, sh, cx, wg, ts, use_p && !p.top_k_first);
      uint64_t res_a = 0, res_b = 0;  // a: 1 << 32 | tau when resolved; b: sampled element + 1
      if (cx.rank == 0 && g.n <= kGatherCap) {
        const int n = static_cast<int>(g.n);
        const uint32_t tau_k = cand_key(sh.cand.key[k - 1]);
        uint32_t t = tau_k;
        if (use_p) {
          const int n_k = count_at_least(sh, n, tau_k);
          uint64_t m_k;
          // The top-k set's mass first (target 1: just the scan), then its top-p head.
          resolve_sorted(sh, wg, n_k, true, 0, 1, &m_k);
          const uint64_t target = mass_target(top_p, p.top_k_first ? m_k : g.z);
          if (target <= m_k) t = resolve_sorted(sh, wg, n_k, true, 0, target, nullptr);
        }
        res_a = (1ull << 32) | t;
        const int n_kept = count_at_least(sh, n, t);
        if (n_kept <= kSmallKept) res_b = static_cast<uint64_t>(sample_sorted(sh, wg, n_kept, r64) + 1);
      }
      uint64_t token1;
      const uint2 res = broadcast_pair(sh, cx, res_a, res_b, &token1);
      if (res.y) {
        resolved = true;
        tau = res.x;
        if (token1) {
          if (lead) emit(static_cast<int64_t>(token1) - 1, true);
          return;
        }
      }
    }
    if (!resolved) {
      tau = select_threshold(row, sh, cx, wg, false, static_cast<uint64_t>(k), -1.f, 1u, st.max_key);
      if (use_p) {
        if (p.top_k_first) {
          const uint64_t m_k = kept_mass(row, sh, cx, wg, tau);
          tau = select_threshold(row, sh, cx, wg, true, mass_target(top_p, m_k), -1.f, tau, st.max_key);
        } else {
          const uint32_t tau_p = select_threshold(row, sh, cx, wg, true, 0, top_p, 1u, st.max_key);
          tau = tau_p > tau ? tau_p : tau;
        }
      }
    }
  } else if (use_p) {
    tau = select_threshold(row, sh, cx, wg, true, 0, top_p, 1u, st.max_key);
  } else if (use_min_p) {
    const uint32_t t = __float_as_uint(__fmul_rn(wg.max_value, min_p));
    tau = t > 1u ? t : 1u;
  }

  const bool any = sample_in_order(
      row, sh, cx, r64,
      [&](int v, bool in, uint64_t (&w)[Row<DType, kCached>::kVec]) {
        float x[Row<DType, kCached>::kVec];
        row.load_or_neutral(v, in, x);
#pragma unroll
        for (int j = 0; j < Row<DType, kCached>::kVec; ++j) w[j] = wg.key(x[j]) >= tau ? wg.weight_fx(x[j]) : 0;
      },
      [&](int e) { emit(e, true); });
  if (!any && lead) emit(0, false);
}

struct RowOpParams {
  const void* input;  // [rows, in_stride]
  int64_t in_stride;
  void* output;  // [rows, out_stride]: float32 for softmax, the input's type otherwise
  int64_t out_stride;
  int rows, vocab, op;
  const int* top_k_arr;
  int top_k_val;
  const float* top_p_arr;
  float top_p_val;
  const float* temperature_arr;
  float temperature_val;
};

// softmax(x / temperature) of one row: online (max, sum) per thread, combined over the block and the cluster in
// a fixed order, then a writing pass.
template <typename R>
FI_DEVICE void softmax_row(const R& row, Shared& sh, ClusterCtx& cx, float temperature, float* out) {
  constexpr int kVec = R::kVec;
  auto scaled = [&](float x) { return temperature == 1.f ? x : __fdiv_rn(x, temperature); };
  auto add = [](float& m, float& s, float x) {
    if (x > m) {
      s = __fmaf_rn(s, ptx_exp2(__fmul_rn(__fsub_rn(m, x), kLog2e)), 1.f);
      m = x;
    } else if (x != -kInf) {
      s = __fadd_rn(s, ptx_exp2(__fmul_rn(__fsub_rn(x, m), kLog2e)));  // (a NaN makes the sum NaN, as in torch)
    }
  };
  auto combine = [](float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -kInf) {
      s = __fadd_rn(s, s2);
    } else {
      s = __fadd_rn(__fmul_rn(s, ptx_exp2(__fmul_rn(__fsub_rn(m, mn), kLog2e))),
                    __fmul_rn(s2, ptx_exp2(__fmul_rn(__fsub_rn(m2, mn), kLog2e))));
    }
    m = mn;
  };
  float m = -kInf, s = 0.f;
  row.for_each([&](int v, bool in, int) {
    if (!in) return;
    float x[kVec];
    row.load(v, x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) add(m, s, scaled(x[j]));
  });
  // Butterfly: both partners compute the same (commutative) combination, so every lane ends equal.
#pragma unroll
  for (int o = 16; o > 0; o /= 2) combine(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sh.red[warp] = (static_cast<unsigned long long>(__float_as_uint(m)) << 32) | __float_as_uint(s);
  __syncthreads();
  m = -kInf;
  s = 0.f;
  for (int w = 0; w < kWarps; ++w)
    combine(m, s, __uint_as_float(static_cast<uint32_t>(sh.red[w] >> 32)),
            __uint_as_float(static_cast<uint32_t>(sh.red[w])));
  __syncthreads();
  {
    Exchange* slot = &sh.xch[cx.phase & 1];
    if (threadIdx.x < cx.size) {
      Exchange* dst = cluster_map(slot, threadIdx.x);
      dst->a[cx.rank] = __float_as_uint(m);
      dst->b[cx.rank] = __float_as_uint(s);
    }
    cluster_sync();
    ++cx.phase;
    m = -kInf;
    s = 0.f;
    for (unsigned r = 0; r < cx.size; ++r)
      combine(m, s, __uint_as_float(static_cast<uint32_t>(slot->a[r])),
              __uint_as_float(static_cast<uint32_t>(slot->b[r])));
  }
  const OutRow<float> o(out, row.vocab, row.head, typename R::T());
  row.for_each([&](int v, bool in, int) {
    if (!in) return;
    float x[kVec], y[kVec];
    row.load(v, x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) y[j] = __fdiv_rn(ptx_exp2(__fmul_rn(__fsub_rn(scaled(x[j]), m), kLog2e)), s);
    o.store(row, v, y);
  });
}

// The k-th largest key of the row (0 < k < number of valid elements), after topk_filter (when `filtered`);
// *mass = the fixed-point mass at or above it, or kUnknown. When the mass is known (the candidates held the
// threshold), rank 0's sh.cand.key[0, *kept) are the row's elements at or above it (in every CTA: *kept = 0
// otherwise).
template <typename R>
FI_DEVICE uint32_t topk_threshold(const R& row, Shared& sh, ClusterCtx& cx, const Weigher& wg, const KeyStats& st,
                                  int k, bool filtered, const TopKStats& ts, uint64_t* mass, int* kept) {
  *mass = kUnknown;
  *kept = 0;
  if (filtered && ts.ok) {
    const Gathered g = push_topk_candidates(row, sh, cx, wg, ts, false);
    uint64_t res = 0, m = 0;
    if (cx.rank == 0 && g.n <= kGatherCap) {
      const uint32_t tau = cand_key(sh.cand.key[k - 1]);
      res = (1ull << 32) | tau;
      *kept = count_at_least(sh, static_cast<int>(g.n), tau);
      resolve_sorted(sh, wg, *kept, true, 0, 1, &m);
    }
    const uint2 r = broadcast_pair(sh, cx, res, m, &m);
    if (r.y) {
      *mass = m;
      return r.x;
    }
  }
  return select_threshold(row, sh, cx, wg, false, static_cast<uint64_t>(k), -1.f, 1u, st.max_key);
}

// Development probe of the streamed top-k transforms (wrong results; benchmarks/probe_sampling.py): 1 no neutral
// stores, 2 return after the filter's pass, 3 after topk_collect.
#ifndef FI_ROW_STREAM_PROBE
#define FI_ROW_STREAM_PROBE 0
#endif

template <typename DType, bool kCached>
FI_DEVICE void row_op_cta(const RowOpParams& p, uint8_t* smem_raw) {
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  uint4* cache = reinterpret_cast<uint4*>(smem_raw + sizeof(Shared));
  ClusterCtx cx = {cluster_rank(), cluster_size(), 0};
  cluster_start_arrive();
  const int r = static_cast<int>(blockIdx.x / cx.size);
  if (threadIdx.x == 0) sh.gather_count = 0;
  grid_dependency_wait();  // (programmatic dependent launch: the input may come from the previous kernel)
  const bool logits = p.op == kSoftmax || p.op == kTopKMask;
  const Row<DType, kCached> row(static_cast<const DType*>(p.input) + r * p.in_stride, p.vocab, cx, cache,
                                logits ? -kInf : 0.f);
  row.fill_cache();
  cluster_start_wait();
  if (p.op == kSoftmax) {
    const float t = p.temperature_arr ? p.temperature_arr[r] : p.temperature_val;
    softmax_row(row, sh, cx, t, static_cast<float*>(p.output) + r * p.out_stride);
    return;
  }
  const int k = p.op == kTopPRenorm ? 0 : (p.top_k_arr ? p.top_k_arr[r] : p.top_k_val);
  // The single-pass top-k route only where passes are expensive (a slice streamed from HBM). Over a cached slice a
  // pass is cheap and the route costs more than the radix rounds it saves: per warp (2,000 elements at batch 256,
  // vocabulary 128k, clusters of 8) a ballot-append chain per element, two to three 27-step kth-largest searches,
  // then per CTA a bitonic sort of its ~250-400 survivors (45 barrier-separated stages) and rank 0's sort of the
  // ~k-2k gathered; the rounds (top-k of softmax-like logits: one round of counts, its bin holds a few elements)
  // are three simple passes (max, histogram, gather), no per-element chain, and a sort of a few dozen in rank 0.
  const bool filtered = !kCached && k > 0 && k <= kFilterMaxK;
  const OutRow<DType> o(static_cast<DType*>(p.output) + r * p.out_stride, row.vocab, row.head, DType());
  // A streamed top-k transform writes its row without reading it again: the neutral value over the whole slice now
  // (the stores overlap the filter's loads), and once the threshold is known rank 0 overwrites the kept elements,
  // the candidates it holds (their values read again one by one). Every cluster barrier between the two orders the
  // CTAs' stores (release/acquire); where the candidates do not settle the threshold, the write pass below
  // overwrites the slice, each vector by the thread that filled it.
  TopKStats ts;
  if (filtered) {
    float y[Row<DType, kCached>::kVec];
#pragma unroll
    for (int j = 0; j < Row<DType, kCached>::kVec; ++j) y[j] = p.op == kTopKMask ? -kInf : 0.f;
    const WarpFilter f = topk_filter(row, sh, logits, k, [&](int v, bool in) {
#if FI_ROW_STREAM_PROBE != 1
      if (in) o.store(row, v, y);
#endif
    });
#if FI_ROW_STREAM_PROBE == 2
    return;
#endif
    ts = topk_collect(sh, cx, f, k);
#if FI_ROW_STREAM_PROBE == 3
    return;
#endif
  } else {
    ts.st = key_stats(row, sh, cx, logits);
  }
  const KeyStats st = ts.st;
  const Weigher wg(logits, st.max_key);
  uint32_t tau = p.op == kTopKMask ? 0u : 1u;  // 0 keeps every element (a copy), 1 every element with mass
  uint64_t z = kUnknown;                       // the kept mass, when the threshold search gives it
  if (p.op == kTopPRenorm) {
    float top_p = p.top_p_arr ? p.top_p_arr[r] : p.top_p_val;
    top_p = top_p != top_p ? 1.f : fmaxf(top_p, 0.f);
    if (st.max_key != 0 && top_p < 1.f) tau = select_threshold(row, sh, cx, wg, true, 0, top_p, 1u, st.max_key, &z);
  } else if (k > 0 && static_cast<uint32_t>(k) < st.num_valid) {
    int kept = 0;
    tau = topk_threshold(row, sh, cx, wg, st, k, filtered, ts, &z, &kept);
    if (filtered && z != kUnknown) {  // rank 0 holds the kept elements: the rest of the row is written already
      const float mass = ldexpf(static_cast<float>(z), wg.ref_exp - kWeightBits);
      const DType* in = static_cast<const DType*>(p.input) + r * p.in_stride;
      DType* out = static_cast<DType*>(p.output) + r * p.out_stride;
      for (int i = threadIdx.x; i < kept; i += kThreads) {
        const int e = cand_index(sh.cand.key[i]);
        const float x = Elem<DType>::to_float(in[e]);
        const float y = p.op == kTopKMask ? x : (mass > 0.f ? __fdiv_rn(wg.weight(x), mass) : 0.f);
        out[e] = Elem<DType>::from_float(y);
      }
      return;
    }
  }
  float mass = 0.f;
  if (p.op != kTopKMask) {
    if (z == kUnknown) z = kept_mass(row, sh, cx, wg, tau);
    mass = ldexpf(static_cast<float>(z), wg.ref_exp - kWeightBits);
  }
  row.for_each([&](int v, bool in, int) {
    if (!in) return;
    float x[Row<DType, kCached>::kVec], y[Row<DType, kCached>::kVec];
    row.load(v, x);
#pragma unroll
    for (int j = 0; j < Row<DType, kCached>::kVec; ++j) {
      const bool kept = wg.key(x[j]) >= tau;
      if (p.op == kTopKMask) {
        y[j] = kept ? x[j] : -kInf;
      } else {
        y[j] = kept && mass > 0.f ? __fdiv_rn(wg.weight(x[j]), mass) : 0.f;
      }
    }
    o.store(row, v, y);
  });
}

// ------------------------------------------------------------------------------------------ row ops: select

// top_p_renorm_probs, top_k_renorm_probs and top_k_mask_logits over cached slices with as few cluster barriers as
// the selection allows (three on the common path: the row's largest key, one histogram round, the candidates),
// every CTA resolving the threshold on its own instead of rank 0 sorting and broadcasting.
//
// Round 0 of the renorms histograms the keys of the 16 octaves below the row's largest key in bins of 2^16 keys aligned
// to the key bits (1/128 octave: every key of a bin has the same exponent and the same 7 leading mantissa bits), the
// rest in one last bin summed in registers. A bin's fixed-point mass is then exact from two 32-bit sums: its count and
// the sum of its keys' low 16 bits (mantissa = the bin's base mantissa + those bits, and within 16 octaves of the
// largest weight the fixed-point weight is the mantissa shifted left: no truncation). So the histogram costs two
// shared-memory reductions per element without returned values, and no per-element weight arithmetic.
// Each CTA summarizes its bins in 64 groups of 32 bins (+ the last bin); after one cluster barrier every CTA reads
// every CTA's group summaries, finds the group where the cumulative count or mass from the top reaches the target,
// then the bin within it from every CTA's 32 bins of that group (remote reads, no second barrier). The elements of
// that bin (usually 10^2..10^3 over the row) are copied into every CTA's candidate buffer, each CTA writing its own
// at offsets given by the per-CTA bin counts, and after the candidates' barrier each CTA narrows the range over them
// with local 2048-bin rounds (in the histogram's arrays, free by then) to the exact threshold. A bin of more than
// kSelCap elements takes another cluster round over its range (rows of many equal or nearly equal values; the last bin:
// exact per-element masses from then on). The threshold and the kept mass are the same integers the radix rounds
// (select_threshold) compute. The mask needs no masses and no maximum: its round 0 counts over 2048 bins of 2^21 keys
// that tile every key (two cluster barriers).

// Development knobs of row_select_kernel (benchmarks/probe_sampling.py builds settings as modules of their own and
// checks each bit for bit against the radix kernel). The defaults are the fast forms; 0 restores the previous one.
//   FI_SEL_FLAT_HISTOGRAM 1: the fast rounds' histogram without a branch per element (the last bin's fixed-point
//                         weights by float scaling, see Selector::last_weight).
//   FI_SEL_DIV            the renorms' x / mass: 2: Divider (the reciprocal once per row, three FMAs an element);
//                         1: __fdiv_rn of every element, then a select; 0: __fdiv_rn behind a branch per element.
//   FI_SEL_MAX_BITS 1:    the renorms' maximum as an integer maximum of the bits (the key pass only past an inf/NaN).
//   FI_SEL_MASK_CMP 1:    the mask's write pass compares values with the threshold's value, not keys with its key.
//   FI_SEL_MASK_KEY 1:    the mask's keys from logit_key_flat (no branches) instead of logit_key.
//   FI_SEL_MIN_CLUSTER    at least this many CTAs a row where the device allows (smaller slices);
//   FI_SEL_MIN_BLOCKS     the kernel's __launch_bounds__ occupancy (3 with 16 CTAs a row: three CTAs an SM).
// Measured on an H200 (probe_sampling.py --variants default,base, 05c85cf, float32, L2 flushed), the previous forms
// (every switch 0) -> the defaults, both bit-identical to the radix kernel: batch 256 x 128256 top_p_renorm 282.2 ->
// 223.2 us, top_k_renorm 225.6 -> 187.5, top_k_mask 208.6 -> 169.8; 256 x 256000 top_p_renorm 617.0 -> 485.2,
// top_k_mask 429.3 -> 343.7; batch 1 and 32 9-17% faster. The switches one at a time and 16 CTAs a row (three an SM)
// were not timed (the probe's full variant set did not fit the device call); the previous forms stay reachable for
// that comparison.
#ifndef FI_SEL_FLAT_HISTOGRAM
#define FI_SEL_FLAT_HISTOGRAM 1
#endif
#ifndef FI_SEL_DIV
#define FI_SEL_DIV 2
#endif
#ifndef FI_SEL_MAX_BITS
#define FI_SEL_MAX_BITS 1
#endif
#ifndef FI_SEL_MASK_CMP
#define FI_SEL_MASK_CMP 1
#endif
#ifndef FI_SEL_MASK_KEY
#define FI_SEL_MASK_KEY 1
#endif
#ifndef FI_SEL_MIN_CLUSTER
#define FI_SEL_MIN_CLUSTER 1
#endif
#ifndef FI_SEL_MIN_BLOCKS
#define FI_SEL_MIN_BLOCKS 2
#endif

// x / d rounded to nearest for many x and one d: the refined reciprocal once, then per x the quotient and one
// correction from its exact remainder (q = x r, e = fma(-d, q, x), q + e r): the same steps as the compiler's
// __fdiv_rn takes when neither operand nor the quotient is near the ends of the exponent range (its FCHK test),
// hence the same correctly rounded result there. Operands outside [2^-64, 2^64] for x, [2^-32, 2^32] for d (the
// quotient then within [2^-96, 2^96]: no remainder or product near underflow or overflow) take __fdiv_rn itself.
struct Divider {
  float d, r;
  bool fast_d;
  FI_DEVICE explicit Divider(float d_) : d(d_) {
    const float r0 = ptx_rcp(d);
    r = __fmaf_rn(r0, __fmaf_rn(-d, r0, 1.f), r0);
    fast_d = __float_as_uint(d) - 0x2F800000u <= 0x4F800000u - 0x2F800000u;  // 2^-32 <= d <= 2^32
  }
  FI_DEVICE bool fast(float x) const {
    return fast_d && __float_as_uint(x) - 0x1F800000u <= 0x5F800000u - 0x1F800000u;  // 2^-64 <= x <= 2^64
  }
  FI_DEVICE float fast_div(float x) const {
    const float q = __fmul_rn(x, r);
    return __fmaf_rn(r, __fmaf_rn(-d, q, x), q);
  }
};

constexpr int kSelBins = 2048;                        // bins of a cluster round; bin kSelBins - 1 collects the rest
constexpr int kSelGroupBins = 32;                     // bins per group summary
constexpr int kSelGroups = kSelBins / kSelGroupBins;  // + 1 for the last bin
constexpr int kSelCap = 2048;                         // candidates every CTA receives
constexpr int kSelLoads = 4;                          // remote loads (ranks) a thread has in flight together
constexpr int kSelDump = 32;                          // words past the bins (see SelShared)

struct alignas(16) SelShared {
  // The CTA's histogram of one cluster round (read by the whole cluster between the round's barrier and the next).
  // (+ kSelDump: FI_SEL_FLAT_HISTOGRAM's updates of elements outside the bins go to word kSelBins + lane, at the same
  // distance from count's word as from lo's, so that one address serves both)
  unsigned int count[kSelBins + kSelDump];
  unsigned int lo[kSelBins + kSelDump];      // fast bins: sum of the keys' low bits; exact bins: low word of the mass
  unsigned int hi[kSelBins];                 // exact bins: high word of the mass (the low word's carries included)
  unsigned long long gmass[kSelGroups + 1];  // the CTA's group summaries (read by the cluster)
  unsigned int gcount[kSelGroups + 1];
  unsigned long long tmass[kSelGroups + 1];  // the cluster's group sums
  unsigned int tcount[kSelGroups + 1];
  unsigned int bin_rank_count[kMaxCluster][kSelGroupBins];  // the chosen group's bins, per rank
  unsigned int last_rank_count[kMaxCluster];
  unsigned long long last_mass[kWarps];
  unsigned int last_count[kWarps];
  unsigned int cand[kSelCap];  // candidate keys of the whole cluster
  unsigned long long red[kWarps];
  unsigned int slice_max;   // this CTA's largest key (read by the cluster)
  unsigned int cand_slots;  // this CTA's candidates written so far
  int pick;
  unsigned int pick_key;
  unsigned long long pick_c, pick_m, pick_bc, pick_bm;
};

// A key range [lo, hi] cut into bins of 2^shift keys aligned to the key bits, bin 0 the highest.
struct SelRange {
  uint32_t lo, hi;
  int shift;
  bool exact;  // masses per element (fixed_weight); else from (count, sum of low bits): see SelShared
  FI_DEVICE uint32_t top() const { return hi >> shift; }
  FI_DEVICE uint32_t bin_base(uint32_t b) const { return (top() - b) << shift; }  // lowest key of bin b
};

// The smallest shift that puts [lo, hi] into fewer than `bins` aligned bins.
FI_DEVICE int sel_shift(uint32_t lo, uint32_t hi, int bins) {
  int s = 0;
  while (s < 32 && (hi >> s) - (lo >> s) >= static_cast<uint32_t>(bins)) ++s;
  return s;
}

// The fixed-point mass of `count` keys of the fast bin with lowest key `base` whose low bits sum to `low`.
FI_DEVICE uint64_t fast_bin_mass(uint32_t base, uint64_t count, uint64_t low, int ref_exp) {
  if (count == 0) return 0;  // (the bins past the window are empty in a fast round; their shift may be negative)
  const int e = static_cast<int>(base >> 23);
  const uint64_t mant = (base & 0x7FFFFFu) | (e ? 0x800000u : 0u);
  const int sh = (e ? e : 1) - 150 + kWeightBits - ref_exp;  // >= 0 inside the round-0 window
  return (count * mant + low) << sh;
}

// What a pick found: the chosen bin's key range and the count and mass above it and in it (over the cluster).
struct SelPick {
  uint32_t lo, hi;
  uint64_t c_above, m_above, c_bin, m_bin;
  bool last;  // the last bin (keys below the round's bins)
};

template <typename DType, bool kMask>
struct Selector {
  using R = Row<DType, true>;
  static constexpr bool kMass = !kMask;  // the renorms need masses (probabilities); the mask only counts
  SelShared& sh;
  const R& row;
  ClusterCtx& cx;
  int ref_exp;

  FI_DEVICE static uint32_t key(float x) { return kMask ? mask_key(x) : prob_key(x); }
  FI_DEVICE static uint32_t mask_key(float x) { return FI_SEL_MASK_KEY ? logit_key_flat(x) : logit_key(x); }
  // The key where only keys inside a round's range [lo, hi] matter: a probability's bits are its key whenever they
  // lie in [1, the row's largest key] (zero, negatives, NaN and inf fall outside every range), which saves the
  // validity tests in the passes that filter by range.
  FI_DEVICE static uint32_t range_key(float x) { return kMask ? mask_key(x) : __float_as_uint(x); }
  FI_DEVICE uint64_t weight_fx(uint32_t k) const { return fixed_weight(__uint_as_float(k), ref_exp); }

  FI_DEVICE void zero_hist() {
    for (int b = threadIdx.x; b < kSelBins; b += kThreads) {
      sh.count[b] = 0;
      sh.lo[b] = 0;
      sh.hi[b] = 0;
    }
  }

  // The last bin's scale for last_weight: 2^(kWeightBits - ref_exp) as two float factors (each a normal float for
  // every ref_exp of a positive finite largest probability, -127..127).
  FI_DEVICE static float2 last_scale(int ref_exp) {
    const int e = kWeightBits - ref_exp;  // -88..166
    const int e1 = e > 100 ? 64 : 0;
    return make_float2(__int_as_float((127 + e1) << 23), __int_as_float((127 + e - e1) << 23));
  }
  // weight_fx(k) for a key of a fast round's last bin, whose weight lies below 2^-15.9 of the largest one, so that
  // weight_fx(k) < 2^25: w * 2^(kWeightBits - ref_exp) is exact in float whenever it is at least 1 (scaling by powers
  // of two loses no bit of a normal result, and the first factor only scales up), and below 1 (a subnormal product
  // rounded, perhaps) it truncates to 0 as fixed_weight's shift does.
  FI_DEVICE static uint32_t last_weight(uint32_t k, float2 scale) {
    return __float2uint_rz(__fmul_rn(__fmul_rn(__uint_as_float(k), scale.x), scale.y));
  }

  // This CTA's histogram of the range and its group summaries (the bins zeroed before). Ends synchronized.
  FI_DEVICE void histogram(const SelRange& rg) {
    const uint32_t top = rg.top();
    const uint32_t low_mask = rg.shift >= 32 ? 0xFFFFFFFFu : (1u << rg.shift) - 1u;
    uint32_t lc = 0;
    uint64_t lm = 0;
    // A fast round (the usual, and the only one of most rows): every element takes the same instructions, its
    // updates predicated (a branch per element diverges in nearly every warp: the last bin holds a sizeable share of
    // a row). The last bin's weights sum in 32 bits per vector step (4 or 8 weights below 2^25) before widening.
    if (FI_SEL_FLAT_HISTOGRAM && !rg.exact) {
      const float2 scale = kMass ? last_scale(ref_exp) : make_float2(0.f, 0.f);
      const int lane = threadIdx.x % 32;
      row.for_each([&](int v, bool in, int) {
        float x[R::kVec];
        row.load_or_neutral(v, in, x);
        uint32_t step_lc = 0, step_lm = 0;
#pragma unroll
        for (int j = 0; j < R::kVec; ++j) {
          const uint32_t k = range_key(x[j]);
          const bool inside = k - rg.lo <= rg.hi - rg.lo;  // (lo <= k <= hi: the neutral elements' keys are below lo)
          const uint32_t b = top - (k >> rg.shift);
          // Every element updates: the others a word of this lane's own (a select, not a branch around the update).
          const bool fast_bin = inside && b < static_cast<uint32_t>(kSelBins - 1);
          const uint32_t slot = fast_bin ? b : static_cast<uint32_t>(kSelBins + lane);
          atomicAdd(&sh.count[slot], 1u);
          if (kMass) atomicAdd(&sh.lo[slot], k & low_mask);
          // (The mask's last bin is always empty: round 0's holds keys below 2^21, and logit_key gives none below
          // 2^23; a later round's bins cover its range, see sel_shift.)
          const bool last = !kMask && inside && b >= static_cast<uint32_t>(kSelBins - 1);
          step_lc += last ? 1u : 0u;
          if (kMass) step_lm += last ? last_weight(k, scale) : 0u;
        }
        lc += step_lc;
        if (kMass) lm += step_lm;
      });
    } else {
      row.for_each([&](int v, bool in, int) {
        if (!in) return;
        float x[R::kVec];
        row.load(v, x);
#pragma unroll
        for (int j = 0; j < R::kVec; ++j) {
          const uint32_t k = range_key(x[j]);
          if (k < rg.lo || k > rg.hi) continue;
          const uint32_t b = top - (k >> rg.shift);
          if (b < static_cast<uint32_t>(kSelBins - 1)) {
            atomicAdd(&sh.count[b], 1u);
            if (kMass) {
              if (rg.exact) {
                add_mass_words(&sh.lo[b], &sh.hi[b], weight_fx(k));
              } else {
                atomicAdd(&sh.lo[b], k & low_mask);
              }
            }
          } else {
            ++lc;
            if (kMass) lm += weight_fx(k);
          }
        }
      });
    }
    lc = warp_reduce(lc, SumOp<uint32_t>());
    if (kMass) lm = warp_reduce(lm, SumOp<uint64_t>());
    if (threadIdx.x % 32 == 0) {
      sh.last_count[threadIdx.x / 32] = lc;
      sh.last_mass[threadIdx.x / 32] = lm;
    }
    __syncthreads();
    // Group summaries: kSelBins / kThreads bins per thread, kSelGroupBins / (kSelBins / kThreads) threads a group.
    constexpr int kPer = kSelBins / kThreads;
    constexpr int kLanes = kSelGroupBins / kPer;
    uint32_t c = 0;
    uint64_t m = 0;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int b = threadIdx.x * kPer + q;
      c += sh.count[b];
      if (kMass) m += bin_mass(rg, static_cast<uint32_t>(b), sh.count[b], sh.lo[b], sh.hi[b]);
    }
#pragma unroll
    for (int o = 1; o < kLanes; o *= 2) {
      c += __shfl_xor_sync(0xffffffffu, c, o);
      if (kMass) m += __shfl_xor_sync(0xffffffffu, m, o);
    }
    if (threadIdx.x % kLanes == 0) {
      sh.gcount[threadIdx.x / kLanes] = c;
      sh.gmass[threadIdx.x / kLanes] = m;
    }
    if (threadIdx.x == 0) {
      uint32_t tc = 0;
      uint64_t tm = 0;
      for (int w = 0; w < kWarps; ++w) {
        tc += sh.last_count[w];
        tm += sh.last_mass[w];
      }
      sh.gcount[kSelGroups] = tc;
      sh.gmass[kSelGroups] = tm;
    }
    __syncthreads();
  }

  // The fixed-point mass of bin b from its (summed) words.
  FI_DEVICE uint64_t bin_mass(const SelRange& rg, uint32_t b, uint64_t count, uint64_t lo, uint64_t hi) const {
    if (rg.exact) return (hi << 32) + lo;
    return fast_bin_mass(rg.bin_base(b), count, lo, ref_exp);
  }

  // After the round's cluster barrier: every CTA sums the group summaries over the cluster (into tcount/tmass).
  FI_DEVICE void sum_groups() {
    for (int g = threadIdx.x; g <= kSelGroups; g += kThreads) {
      // kSelLoads ranks' summaries loaded before any is used: remote loads in flight together, not one round trip
      // per rank (a store between them could alias them for the compiler).
      uint32_t c = 0;
      uint64_t m = 0;
      for (int q0 = 0; q0 < static_cast<int>(cx.size); q0 += kSelLoads) {
        uint32_t cr[kSelLoads];
        uint64_t mr[kSelLoads];
#pragma unroll
        for (int q = 0; q < kSelLoads; ++q) {
          const SelShared* o = cluster_map(&sh, q0 + q < static_cast<int>(cx.size) ? q0 + q : 0);
          cr[q] = o->gcount[g];
          mr[q] = kMass ? o->gmass[g] : 0;
        }
#pragma unroll
        for (int q = 0; q < kSelLoads; ++q) {
          if (q0 + q < static_cast<int>(cx.size)) {
            c += cr[q];
            m += mr[q];
            if (g == kSelGroups) sh.last_rank_count[q0 + q] = cr[q];
          }
        }
      }
      sh.tcount[g] = c;
      sh.tmass[g] = m;
    }
    __syncthreads();
  }

  // Warp 0: the first of n entries f(i) (in order) where above + cumulative F reaches need (the last entry when none
  // does); its index and F before it, as both count and mass. Entries' (count, mass) from fc(i), fm(i).
  template <typename FC, typename FM>
  FI_DEVICE void warp_pick(int n, bool by_mass, uint64_t need, FC&& fc, FM&& fm) {
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    uint64_t acc_c = 0, acc_m = 0;
    for (int base = 0; base < n; base += 32) {
      const int i = base + lane;
      const uint64_t c = i < n ? fc(i) : 0, m = i < n ? fm(i) : 0;
      const uint64_t ic = warp_inclusive_scan(c), im = warp_inclusive_scan(m);
      const uint64_t f = by_mass ? acc_m + im : acc_c + ic;
      const unsigned hit = __ballot_sync(0xffffffffu, i < n && f >= need);
      const bool last = base + 32 >= n;
      if (hit || last) {
        const int src = hit ? __ffs(hit) - 1 : (n - 1 - base);
        if (lane == src) {
          sh.pick = i;
          sh.pick_c = acc_c + ic - c;
          sh.pick_m = acc_m + im - m;
          sh.pick_bc = c;
          sh.pick_bm = m;
        }
        break;
      }
      acc_c += __shfl_sync(0xffffffffu, ic, 31);
      acc_m += __shfl_sync(0xffffffffu, im, 31);
    }
  }

  // After sum_groups: the bin where the cumulative F (from the range's top, plus f_above) reaches need; reads the
  // chosen group's bins of every CTA (remote). Ends synchronized.
  FI_DEVICE SelPick pick_bin(const SelRange& rg, bool by_mass, uint64_t need) {
    warp_pick(
        kSelGroups + 1, by_mass, need, [&](int g) -> uint64_t { return sh.tcount[g]; },
        [&](int g) -> uint64_t { return sh.tmass[g]; });
    __syncthreads();
    const int g = sh.pick;
    SelPick pk;
    pk.c_above = sh.pick_c;
    pk.m_above = sh.pick_m;
    uint32_t b;
    if (g == kSelGroups) {  // the last bin
      b = kSelBins - 1;
      pk.c_bin = sh.pick_bc;
      pk.m_bin = sh.pick_bm;
      __syncthreads();
    } else {
      // Warp 0, lane j: bin g * 32 + j summed over the cluster (and each rank's count kept for the candidates).
      uint64_t c = 0, lo = 0, hi = 0;
      if (threadIdx.x < kSelGroupBins) {
        const int bj = g * kSelGroupBins + threadIdx.x;
        for (int q0 = 0; q0 < static_cast<int>(cx.size); q0 += kSelLoads) {  // (loaded together, as in sum_groups)
          uint32_t cr[kSelLoads], lr[kSelLoads], hr[kSelLoads];
#pragma unroll
          for (int q = 0; q < kSelLoads; ++q) {
            const SelShared* o = cluster_map(&sh, q0 + q < static_cast<int>(cx.size) ? q0 + q : 0);
            cr[q] = o->count[bj];
            lr[q] = kMass ? o->lo[bj] : 0u;
            hr[q] = kMass && rg.exact ? o->hi[bj] : 0u;
          }
#pragma unroll
          for (int q = 0; q < kSelLoads; ++q) {
            if (q0 + q < static_cast<int>(cx.size)) {
              sh.bin_rank_count[q0 + q][threadIdx.x] = cr[q];
              c += cr[q];
              lo += lr[q];
              hi += hr[q];
            }
          }
        }
      }
      const uint64_t m =
          kMass ? bin_mass(rg, static_cast<uint32_t>(g * kSelGroupBins) + threadIdx.x % 32, c, lo, hi) : 0;
      const uint64_t c_above = pk.c_above, m_above = pk.m_above;
      __syncthreads();  // (everyone has read the group's pick)
      const uint64_t need_in = need - (by_mass ? m_above : c_above);
      warp_pick(
          kSelGroupBins, by_mass, need_in, [&](int) -> uint64_t { return c; }, [&](int) -> uint64_t { return m; });
      __syncthreads();
      b = static_cast<uint32_t>(g * kSelGroupBins + sh.pick);
      pk.c_above = c_above + sh.pick_c;
      pk.m_above = m_above + sh.pick_m;
      pk.c_bin = sh.pick_bc;
      pk.m_bin = sh.pick_bm;
      if (threadIdx.x < cx.size) sh.last_rank_count[threadIdx.x] = sh.bin_rank_count[threadIdx.x][sh.pick];
      __syncthreads();
    }
    const uint32_t mask = rg.shift >= 32 ? 0xFFFFFFFFu : (1u << rg.shift) - 1u;
    pk.last = b == kSelBins - 1;
    if (pk.last) {
      pk.lo = rg.lo;
      pk.hi = rg.top() >= static_cast<uint32_t>(kSelBins - 1) ? (rg.bin_base(kSelBins - 1) | mask) : rg.lo;
    } else {
      const uint32_t base = rg.bin_base(b);
      pk.lo = base > rg.lo ? base : rg.lo;
      pk.hi = (base | mask) < rg.hi ? (base | mask) : rg.hi;
    }
    return pk;
  }

  // Copies this CTA's keys in [lo, hi] into every CTA's candidate buffer (this CTA's block of it starts after the
  // lower ranks' counts, sh.last_rank_count). The caller's cluster barrier completes the copies.
  FI_DEVICE void push_candidates(uint32_t lo, uint32_t hi) {
    uint32_t offset = 0;
    for (unsigned r = 0; r < cx.rank; ++r) offset += sh.last_rank_count[r];
    const int lane = threadIdx.x % 32;
    row.for_each([&](int v, bool in, int) {
      float x[R::kVec];
      row.load_or_neutral(v, in, x);
      uint32_t k[R::kVec];
      bool any = false;
#pragma unroll
      for (int j = 0; j < R::kVec; ++j) {
        k[j] = range_key(x[j]);
        any |= k[j] >= lo && k[j] <= hi;
      }
      if (!__ballot_sync(0xffffffffu, any)) return;  // (most steps hold none of the range)
#pragma unroll
      for (int j = 0; j < R::kVec; ++j) {
        const bool take = k[j] >= lo && k[j] <= hi;
        const unsigned mask = __ballot_sync(0xffffffffu, take);
        if (!mask) continue;
        const int leader = __ffs(mask) - 1;
        unsigned base = 0;
        if (lane == leader) base = atomicAdd(&sh.cand_slots, static_cast<unsigned>(__popc(mask)));
        base = __shfl_sync(0xffffffffu, base, leader);
        if (take) {
          const unsigned slot = offset + base + __popc(mask & ((1u << lane) - 1u));
          for (unsigned r = 0; r < cx.size; ++r) cluster_map(sh.cand, r)[slot] = k[j];
        }
      }
    });
  }

  // Narrows [lo, hi] over the n candidates (every key of the range is among them) to the single key where above + F
  // reaches need: local rounds over kSelBins bins. Returns the threshold; *c_kept, *m_kept: F at or above it.
  FI_DEVICE uint32_t resolve(int n, uint32_t lo, uint32_t hi, bool by_mass, uint64_t need, uint64_t c_above,
                             uint64_t m_above, uint64_t c_bin, uint64_t m_bin, uint64_t* c_kept, uint64_t* m_kept) {
    while (lo < hi) {
      if (c_bin == 1) {  // one candidate left in the range: its key (the usual case after a round or two)
        for (int i = threadIdx.x; i < n; i += kThreads) {
          const uint32_t k = sh.cand[i];
          if (k >= lo && k <= hi) sh.pick_key = k;
        }
        __syncthreads();
        lo = hi = sh.pick_key;
        __syncthreads();
        break;
      }
      // The histogram's arrays are free once the candidates' barrier has passed (nobody reads them remotely any
      // more): kSelBins bins, kPer per thread, usually one round before a single candidate is left.
      constexpr int kPer = kSelBins / kThreads;
      const int shift = sel_shift(lo, hi, kSelBins);
      const uint32_t top = hi >> shift;
      zero_hist();
      __syncthreads();
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const uint32_t k = sh.cand[i];
        if (k < lo || k > hi) continue;
        const uint32_t b = top - (k >> shift);
        atomicAdd(&sh.count[b], 1u);
        if (kMass) add_mass_words(&sh.lo[b], &sh.hi[b], weight_fx(k));
      }
      __syncthreads();
      uint64_t c[kPer], m[kPer], sc = 0, sm = 0;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int b = threadIdx.x * kPer + q;
        c[q] = sh.count[b];
        m[q] = kMass ? (static_cast<uint64_t>(sh.hi[b]) << 32) + sh.lo[b] : 0;
        sc += c[q];
        sm += m[q];
      }
      uint64_t tot;
      uint64_t bc = block_exclusive_scan_in(sc, sh.red, &tot);
      uint64_t bm = kMass ? block_exclusive_scan_in(sm, sh.red, &tot) : 0;
      if (threadIdx.x == kThreads - 1) sh.pick = kSelBins - 1;  // (cannot stay: the range reaches need)
      __syncthreads();
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const uint64_t f0 = by_mass ? m_above + bm : c_above + bc;
        const uint64_t f = by_mass ? m[q] : c[q];
        if (f0 < need && need <= f0 + f) {
          sh.pick = threadIdx.x * kPer + q;
          sh.pick_c = bc;
          sh.pick_m = bm;
          sh.pick_bc = c[q];
          sh.pick_bm = m[q];
        }
        bc += c[q];
        bm += m[q];
      }
      __syncthreads();
      const uint32_t b = static_cast<uint32_t>(sh.pick);
      c_above += sh.pick_c;
      m_above += sh.pick_m;
      c_bin = sh.pick_bc;
      m_bin = sh.pick_bm;
      __syncthreads();
      const uint32_t base = (top - b) << shift;
      const uint32_t mask = shift >= 32 ? 0xFFFFFFFFu : (1u << shift) - 1u;
      lo = base > lo ? base : lo;
      hi = (base | mask) < hi ? (base | mask) : hi;
    }
    *c_kept = c_above + c_bin;
    *m_kept = m_above + m_bin;
    return lo;
  }
};

template <typename DType, bool kMask>
FI_DEVICE void row_select_cta(const RowOpParams& p, uint8_t* smem_raw) {
  using R = Row<DType, true>;
  constexpr int kVec = R::kVec;
  SelShared& sh = *reinterpret_cast<SelShared*>(smem_raw);
  uint4* cache = reinterpret_cast<uint4*>(smem_raw + sizeof(SelShared));
  ClusterCtx cx = {cluster_rank(), cluster_size(), 0};
  const int r = static_cast<int>(blockIdx.x / cx.size);
  grid_dependency_wait();  // (programmatic dependent launch: the input may come from the previous kernel)
  const R row(static_cast<const DType*>(p.input) + r * p.in_stride, p.vocab, cx, cache, kMask ? -kInf : 0.f);
  const OutRow<DType> out(static_cast<DType*>(p.output) + r * p.out_stride, row.vocab, row.head, DType());
  int k = 0;
  float top_p = 1.f;
  if (p.op == kTopPRenorm) {
    top_p = p.top_p_arr ? p.top_p_arr[r] : p.top_p_val;
    top_p = top_p != top_p ? 1.f : fmaxf(top_p, 0.f);
  } else {
    k = p.top_k_arr ? p.top_k_arr[r] : p.top_k_val;
  }
  row.fill_cache();
  // Writes the row: kept = key >= tau (for the renorms, keys in [tau, top]: top = the row's largest key).
  auto write = [&](uint32_t tau, uint32_t top, float mass) {
#if FI_SEL_DIV == 2
    // Kept elements lie in [value(tau), value(top)]: when both ends are in Divider's range (the usual), no element
    // needs the per-element range test.
    const Divider div(mass);
    const bool all_fast = div.fast(__uint_as_float(tau)) && div.fast(__uint_as_float(top));
#endif
#if FI_SEL_MASK_CMP
    // The mask's kept set {key(x) >= tau} as a float comparison x >= t (logit_threshold); tau 0 keeps every element.
    const bool keep_all = tau == 0u;
    const float t = logit_threshold(tau);
#endif
    row.for_each([&](int v, bool in, int) {
      if (!in) return;
      float x[kVec], y[kVec];
      row.load(v, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
#if FI_SEL_MASK_CMP
        const bool kept = kMask ? keep_all || x[j] >= t : Selector<DType, kMask>::range_key(x[j]) - tau <= top - tau;
#else
        const bool kept = kMask ? Selector<DType, kMask>::key(x[j]) >= tau
                                : Selector<DType, kMask>::range_key(x[j]) - tau <= top - tau;
#endif
        if (kMask) {
          y[j] = kept ? x[j] : -kInf;
        } else {
#if FI_SEL_DIV == 2
          // (kept: x > 0 and finite) Every element's fast quotient, selected; one branch a vector for the rare rest.
          y[j] = kept && mass > 0.f ? div.fast_div(x[j]) : 0.f;
#elif FI_SEL_DIV == 1
          const float q = __fdiv_rn(x[j], mass);
          y[j] = kept && mass > 0.f ? q : 0.f;
#else
          y[j] = kept && mass > 0.f ? __fdiv_rn(x[j], mass) : 0.f;
#endif
        }
      }
#if FI_SEL_DIV == 2
      if (!all_fast && mass > 0.f) {  // (row-uniform) kept elements outside Divider's range take __fdiv_rn
        auto slow = [&](float xj) { return Selector<DType, kMask>::range_key(xj) - tau <= top - tau && !div.fast(xj); };
        bool any = false;
#pragma unroll
        for (int j = 0; j < kVec; ++j) any |= slow(x[j]);
        if (any) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (slow(x[j])) y[j] = __fdiv_rn(x[j], mass);
          }
        }
      }
#endif
      out.store(row, v, y);
    });
  };
  if (kMask && (k <= 0 || k >= p.vocab)) {  // no element is masked: a copy, the cluster never talks
    write(0u, 0u, 0.f);
    return;
  }
  Selector<DType, kMask> sel{sh, row, cx, 0};
  uint32_t max_key = 0xFFFFFFFFu;  // the mask counts over bins that tile every key: it needs no maximum
  if (kMask) {
    sel.zero_hist();
    if (threadIdx.x == 0) sh.cand_slots = 0;
    __syncthreads();
  } else {
    // The row's largest key (the renorms' fixed-point scale): each CTA publishes its slice's, one barrier, each
    // reads them all.
    auto exact_max = [&] {
      uint32_t mk = 0;
      row.for_each([&](int v, bool in, int) {
        if (!in) return;
        float x[kVec];
        row.load(v, x);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const uint32_t kk = sel.key(x[j]);
          mk = kk > mk ? kk : mk;
        }
      });
      return mk;
    };
#if FI_SEL_MAX_BITS
    // The largest key is the largest bit pattern as a signed integer (negative values and -0 are negative, zero is
    // 0) unless an infinity or NaN lies above it: then, for this thread only, the exact pass.
    int mb = 0;
    row.for_each([&](int v, bool in, int) {
      if (!in) return;
      float x[kVec];
      row.load(v, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) mb = max(mb, __float_as_int(x[j]));
    });
    uint32_t m = mb < 0x7F800000 ? static_cast<uint32_t>(mb) : exact_max();
#else
    uint32_t m = exact_max();
#endif
    m = warp_max(m);
    if (threadIdx.x % 32 == 0) sh.last_count[threadIdx.x / 32] = m;
    sel.zero_hist();
    if (threadIdx.x == 0) sh.cand_slots = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t b = 0;
      for (int w = 0; w < kWarps; ++w) b = sh.last_count[w] > b ? sh.last_count[w] : b;
      sh.slice_max = b;
    }
    cluster_sync();
    max_key = 0;
#pragma unroll
    for (int q = 0; q < kMaxCluster; ++q) {
      const uint32_t mq = q < static_cast<int>(cx.size) ? cluster_map(&sh, q)->slice_max : 0u;
      max_key = mq > max_key ? mq : max_key;
    }
    if (max_key == 0) {  // no element carries mass: the renorms write zeros
      cluster_sync();    // (the slice maxima are read)
      write(1u, 0u, 0.f);
      return;
    }
  }
  const Weigher wg(kMask, max_key);
  sel.ref_exp = wg.ref_exp;
  // Round 0. The renorms: the 16 octaves below the largest key in fast bins, the rest in the last bin. The mask: bins
  // of 2^21 keys over every key (1/4 octave of a logit's magnitude: the top-k bin holds a few hundred logits of a
  // 128k vocabulary), counts only.
  SelRange rg = {1u, max_key, kMask ? 21 : 16, false};
  sel.histogram(rg);
  cluster_sync();
  sel.sum_groups();
  uint64_t num_valid = 0, total_mass = 0;
  for (int g = 0; g <= kSelGroups; ++g) {
    num_valid += sh.tcount[g];
    total_mass += sh.tmass[g];
  }
  const bool by_mass = p.op == kTopPRenorm;
  bool filter;
  uint64_t need;
  if (by_mass) {
    filter = top_p < 1.f;
    need = mass_target(top_p, total_mass);
  } else {
    filter = k > 0 && static_cast<uint64_t>(k) < num_valid;
    need = static_cast<uint64_t>(k);
  }
  uint32_t tau = kMask ? 0u : 1u;
  uint64_t kept_mass_fx = total_mass;
  bool pending = true;  // remote reads since the last cluster barrier
  if (filter) {
    uint64_t c_above = 0, m_above = 0;
    while (true) {
      const SelPick pk = sel.pick_bin(rg, by_mass, need - (by_mass ? m_above : c_above));
      const uint64_t c_bin = pk.c_bin, m_bin = pk.m_bin;
      c_above += pk.c_above;
      m_above += pk.m_above;
      if (pk.lo == pk.hi) {
        tau = pk.lo;
        kept_mass_fx = m_above + m_bin;
        break;
      }
      if (c_bin <= static_cast<uint64_t>(kSelCap)) {
        sel.push_candidates(pk.lo, pk.hi);
        cluster_sync();
        pending = false;
        uint64_t ck, mk;
        tau =
            sel.resolve(static_cast<int>(c_bin), pk.lo, pk.hi, by_mass, need, c_above, m_above, c_bin, m_bin, &ck, &mk);
        kept_mass_fx = mk;
        break;
      }
      // Another cluster round over the chosen bin (rare: very many keys in one bin).
      // (a fast bin's keys share its exponent: its sub-bins are fast too; the last bin's need exact masses)
      rg = {pk.lo, pk.hi, sel_shift(pk.lo, pk.hi, kSelBins - 1), rg.exact || pk.last};
      cluster_sync();  // (every CTA has read the bins)
      sel.zero_hist();
      __syncthreads();
      sel.histogram(rg);
      cluster_sync();
      sel.sum_groups();
      pending = true;
    }
  }
  if (pending) cluster_sync();  // no CTA leaves while another may read its shared memory
  write(tau, max_key, kMask ? 0.f : ldexpf(static_cast<float>(kept_mass_fx), wg.ref_exp - kWeightBits));
}

template <typename DType, bool kMask>
__global__ void __launch_bounds__(kThreads, FI_SEL_MIN_BLOCKS)
    row_select_kernel(const __grid_constant__ RowOpParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  row_select_cta<DType, kMask>(p, smem_raw);
}

struct SpecParams {
  const float* draft_probs;   // [batch, n, vocab]
  const int* draft_ids;       // [batch, n]
  const float* target_probs;  // [batch, n + 1, vocab]
  int* output_ids;            // [batch, n + 1]
  int* accepted;              // [batch], added to
  int* emitted;               // [batch], added to
  int batch, n, vocab;
  const int64_t* seed_arr;
  int seed_stride;
  uint64_t seed_val;
  const int64_t* offset_arr;
  int offset_stride;
  uint64_t offset_val;
};

// Chain speculative sampling, one CTA per request (draws: i < n accept position i, n + i the independent
// acceptance test of position i, 2n the replacement token).
FI_DEVICE void chain_speculative_cta(const SpecParams& p, uint8_t* smem_raw) {
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  ClusterCtx cx = {cluster_rank(), cluster_size(), 0};
  cluster_start_arrive();
  const int b = static_cast<int>(blockIdx.x / cx.size);
  const int n = p.n, V = p.vocab;
  const uint64_t seed = p.seed_arr ? static_cast<uint64_t>(p.seed_arr[b * p.seed_stride]) : p.seed_val;
  const uint64_t offset = p.offset_arr ? static_cast<uint64_t>(p.offset_arr[b * p.offset_stride]) : p.offset_val;
  int* out = p.output_ids + static_cast<int64_t>(b) * (n + 1);
  auto accept = [&](int i, uint32_t draw) {
    const int d = p.draft_ids[static_cast<int64_t>(b) * n + i];
    if (d < 0 || d >= V) return false;
    const float q = p.draft_probs[(static_cast<int64_t>(b) * n + i) * V + d];
    const float t = p.target_probs[(static_cast<int64_t>(b) * (n + 1) + i) * V + d];
    return __fmul_rn(uniform(philox(seed, offset, static_cast<uint32_t>(b), draw).x), q) < t;
  };
  if (threadIdx.x == 0 && cx.rank == 0) {
    int pos = n;
    for (int i = 0; i < n; ++i) {
      if (!accept(i, static_cast<uint32_t>(i))) {
        pos = i;
        break;
      }
      out[i] = p.draft_ids[static_cast<int64_t>(b) * n + i];
    }
    int acc = pos;
    for (int i = pos; i < n; ++i) acc += accept(i, static_cast<uint32_t>(n + i));
    p.accepted[b] += acc;
    p.emitted[b] += pos;
    for (int i = pos + 1; i <= n; ++i) out[i] = -1;
    out[pos] = 0;  // replaced below unless both distributions are empty
    sh.found_c = static_cast<unsigned>(pos);
  }
  __syncthreads();
  cluster_start_wait();
  const int pos = static_cast<int>(sh.found_c);
  const float* target = p.target_probs + (static_cast<int64_t>(b) * (n + 1) + pos) * V;
  const float* draft = pos < n ? p.draft_probs + (static_cast<int64_t>(b) * n + pos) * V : nullptr;
  const Row<float, false> row(target, V, cx, nullptr, 0.f);
  const uint64_t r64 = random64(seed, offset, static_cast<uint32_t>(b), static_cast<uint32_t>(2 * n));
  // Residual max(target - draft, 0); when it has no mass (the distributions agree), the target itself.
  for (int residual = 1; residual >= 0; --residual) {
    const bool any = sample_in_order(
        row, sh, cx, r64,
        [&](int v, bool in, uint64_t (&w)[4]) {
          float x[4];
          row.load_or_neutral(v, in, x);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int e = row.elem(v, j);
            const float q = residual && draft && in && e >= 0 && e < V ? draft[e] : 0.f;
            const float d = __fsub_rn(x[j], q);
            w[j] = d > 0.f && d < kInf ? fixed_weight(fminf(d, 1.f), 0) : 0;
          }
        },
        [&](int e) { out[pos] = e; });
    if (any) break;
  }
}

template <typename DType, bool kCached>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(const __grid_constant__ SampleParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  sample_cta<DType, kCached>(p, smem_raw);
}

template <typename DType, bool kCached>
__global__ void __launch_bounds__(kThreads, 2) row_op_kernel(const __grid_constant__ RowOpParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  row_op_cta<DType, kCached>(p, smem_raw);
}

__global__ void __launch_bounds__(kThreads) chain_speculative_kernel(const __grid_constant__ SpecParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  chain_speculative_cta(p, smem_raw);
}

// ------------------------------------------------------------------------------------------ host side

struct RowPlan {
  int cluster;
  bool cached;
  size_t smem;
};

// Per kernel and device, once: the shared-memory opt-in and the largest cluster the device schedules (16 when the
// non-portable size is allowed, else 8; 1 before sm_90).
template <auto Kernel>
static cudaError_t kernel_setup(int device, size_t smem_max, int* max_cluster) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (cached[device] == 0) {
    const void* fn = reinterpret_cast<const void*>(Kernel);
    cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_max));
    if (err != cudaSuccess) return err;
    int major = 0;
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return err;
    int best = 1;
    if (major >= 9) {
      best = 8;
      if (cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(kMaxCluster);
        cfg.blockDim = dim3(kThreads);
        cfg.dynamicSmemBytes = smem_max;
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = kMaxCluster;
        attr.val.clusterDim.y = 1;
        attr.val.clusterDim.z = 1;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg) == cudaSuccess && clusters > 0) best = kMaxCluster;
      }
      cudaGetLastError();  // a refused query is not an error of this launch
    }
    cached[device] = best;
  }
  *max_cluster = cached[device];
  return cudaSuccess;
}

// Whether a slice of the plan's size fits the chunk table of sample_in_order.
static bool plan_fits_chunks(int vocab, int elem_bytes, const RowPlan& plan);

// Cluster size and caching for rows of `vocab` elements of `elem_bytes` that are read several times: as few CTAs
// per row as keep the slices in shared memory (kCacheVecs) and give every SM two CTAs (slices never below
// kMinSliceVecs); cached when the slices fit.
static RowPlan plan_rows(int rows, int vocab, int elem_bytes, int max_cluster, int sms) {
  const int vec = 16 / elem_bytes;
  const int max_vecs = (vocab + vec - 1) / vec + 1;  // + 1: a row that starts mid-vector spills into one more
  int c = 1;
  while (c < max_cluster && (max_vecs + c - 1) / c > kCacheVecs) c *= 2;
  while (c < max_cluster && static_cast<int64_t>(rows) * c < 2 * sms && max_vecs / (2 * c) >= kMinSliceVecs) c *= 2;
  const int slice = (max_vecs + c - 1) / c;
  RowPlan plan;
  plan.cluster = c;
  plan.cached = slice <= kCacheVecs;
  plan.smem = sizeof(Shared) + (plan.cached ? static_cast<size_t>(slice) * 16 : 0);
  return plan;
}

// For rows read once (the single-pass top-k route): no cache, and only as many CTAs per row as it takes to give
// every SM one (one CTA per row once the batch does: no cluster barriers), or the chunk table requires.
static RowPlan plan_stream(int rows, int vocab, int elem_bytes, int max_cluster, int sms) {
  const int vec = 16 / elem_bytes;
  const int max_vecs = (vocab + vec - 1) / vec + 1;
  RowPlan plan = {1, false, sizeof(Shared)};
  while (plan.cluster < max_cluster && static_cast<int64_t>(rows) * plan.cluster < sms &&
         max_vecs / (2 * plan.cluster) >= kMinSliceVecs)
    plan.cluster *= 2;
  while (plan.cluster < max_cluster && !plan_fits_chunks(vocab, elem_bytes, plan)) plan.cluster *= 2;
  return plan;
}

static bool plan_fits_chunks(int vocab, int elem_bytes, const RowPlan& plan) {
  const int vec = 16 / elem_bytes;
  const int slice = ((vocab + vec - 1) / vec + 1 + plan.cluster - 1) / plan.cluster;
  const int warp_len = ((slice + kWarps - 1) / kWarps + 31) / 32 * 32;
  return (warp_len / 32) * kWarps <= kMaxChunks;
}

template <auto Kernel, typename P>
static cudaError_t launch_rows(const P& p, int rows, int cluster, size_t smem, bool clusters, bool pdl,
                               cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows) * static_cast<unsigned>(cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  if (clusters) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = cluster;
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  void* args[] = {const_cast<P*>(&p)};
  return cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(Kernel), args);
}

// Launches row kernel K<DType, cached> over `rows` rows of `vocab` elements (read once: `stream`).
template <template <typename, bool> class KernelOf, typename DType, typename P>
static cudaError_t launch_row_kernel(const P& p, int rows, int vocab, bool stream_rows, bool pdl, int device,
                                     cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr auto kCachedKernel = KernelOf<DType, true>::value;
  constexpr auto kStreamKernel = KernelOf<DType, false>::value;
  const size_t cached_max = sizeof(Shared) + static_cast<size_t>(kCacheVecs) * 16;
  int max_cluster = 1, unused = 1;
  cudaError_t err = kernel_setup<kCachedKernel>(device, cached_max, &max_cluster);
  if (err != cudaSuccess) return err;
  err = kernel_setup<kStreamKernel>(device, sizeof(Shared), &unused);
  if (err != cudaSuccess) return err;
  const RowPlan plan = stream_rows ? plan_stream(rows, vocab, sizeof(DType), max_cluster, sm_count(device))
                                   : plan_rows(rows, vocab, sizeof(DType), max_cluster, sm_count(device));
  if (!plan_fits_chunks(vocab, sizeof(DType), plan)) return static_cast<cudaError_t>(kErrSliceTooLarge);
  const bool clusters = max_cluster > 1;
  return plan.cached ? launch_rows<kCachedKernel>(p, rows, plan.cluster, plan.smem, clusters, pdl, stream)
                     : launch_rows<kStreamKernel>(p, rows, plan.cluster, plan.smem, clusters, pdl, stream);
}

template <typename DType, bool kCached>
struct SampleKernelOf {
  static constexpr auto value = sample_kernel<DType, kCached>;
};
template <typename DType, bool kCached>
struct RowOpKernelOf {
  static constexpr auto value = row_op_kernel<DType, kCached>;
};

template <typename DType>
cudaError_t launch_sample(const SampleParams& p, int device, cudaStream_t stream) {
  return with_device(device, [&] {
    // With a top-k filter the row is (normally) read once: stream it.
    const bool stream_rows = (p.filters & kTopK) != 0;
    return launch_row_kernel<SampleKernelOf, DType>(p, p.batch, p.vocab, stream_rows, false, device, stream);
  });
}

// Top-k transforms with one k <= kFilterMaxK for every row, on at least this many rows, stream their rows
// (row_op_kernel uncached: each row read from HBM once and written once, no slice held in shared memory). Measured on
// an H200 (probe_sampling.py, float32, k 50, us streamed / cached, top_k_mask_logits): batch 256 x 128256 110.8 /
// ~168; 128 x 128256 78.3 / 94.7 (top_k_renorm 78.3 / 105.5); 128 x 256000 115.3 / 180.6; but 32 x 128256 87.6 /
// 40.3 and 1 x 128256 51.1 / 18.1 (the streamed row's latency: one CTA a row whatever the batch).
#ifndef FI_ROW_STREAM_TOPK_ROWS
#define FI_ROW_STREAM_TOPK_ROWS 128
#endif

// Routes of the row transforms (the launcher's `route`; sampling._ROW_KERNEL): the library's choice, the previous
// radix kernel (kept for comparison), or the streamed top-k route wherever it applies (tests, probes).
enum RowRoute : int { kRouteAuto = 0, kRouteRadix = 1, kRouteStream = 2 };

// The top-k/top-p row transforms through row_select_kernel when the row's slices fit shared memory, else (and for
// softmax, or on the radix route) through row_op_kernel; scalar top-k <= kFilterMaxK on many rows streamed.
template <typename DType>
cudaError_t launch_row_op(const RowOpParams& p, bool pdl, int route, int device, cudaStream_t stream) {
  return with_device(device, [&]() -> cudaError_t {
    const bool radix = route == kRouteRadix;
    const bool streams =
        (p.op == kTopKMask || p.op == kTopKRenorm) && !p.top_k_arr && p.top_k_val > 0 && p.top_k_val <= kFilterMaxK;
    if (streams && (route == kRouteStream || (route == kRouteAuto && p.rows >= FI_ROW_STREAM_TOPK_ROWS)))
      return launch_row_kernel<RowOpKernelOf, DType>(p, p.rows, p.vocab, true, pdl, device, stream);
    if (p.op != kSoftmax && !radix && p.rows > 0) {
      const size_t smem_max = sizeof(SelShared) + static_cast<size_t>(kCacheVecs) * 16;
      constexpr auto kMaskKernel = row_select_kernel<DType, true>;
      constexpr auto kRenormKernel = row_select_kernel<DType, false>;
      int max_cluster = 1, max_cluster_renorm = 1;
      cudaError_t err = kernel_setup<kMaskKernel>(device, smem_max, &max_cluster);
      if (err != cudaSuccess) return err;
      err = kernel_setup<kRenormKernel>(device, smem_max, &max_cluster_renorm);
      if (err != cudaSuccess) return err;
      max_cluster = max_cluster < max_cluster_renorm ? max_cluster : max_cluster_renorm;
      RowPlan plan = plan_rows(p.rows, p.vocab, sizeof(DType), max_cluster, sm_count(device));
      if (plan.cached) {
        while (plan.cluster < FI_SEL_MIN_CLUSTER && plan.cluster < max_cluster) plan.cluster *= 2;
        const int vec = 16 / static_cast<int>(sizeof(DType));
        const int slice = ((p.vocab + vec - 1) / vec + 1 + plan.cluster - 1) / plan.cluster;
        const size_t smem = sizeof(SelShared) + static_cast<size_t>(slice) * 16;
        return p.op == kTopKMask
                   ? launch_rows<kMaskKernel>(p, p.rows, plan.cluster, smem, max_cluster > 1, pdl, stream)
                   : launch_rows<kRenormKernel>(p, p.rows, plan.cluster, smem, max_cluster > 1, pdl, stream);
      }
    }
    return launch_row_kernel<RowOpKernelOf, DType>(p, p.rows, p.vocab, false, pdl, device, stream);
  });
}

inline cudaError_t launch_chain_speculative(const SpecParams& p, int device, cudaStream_t stream) {
  return with_device(device, [&]() -> cudaError_t {
    if (p.batch == 0) return cudaSuccess;
    int max_cluster = 1;
    cudaError_t err = kernel_setup<chain_speculative_kernel>(device, sizeof(Shared), &max_cluster);
    if (err != cudaSuccess) return err;
    const RowPlan plan = {1, false, sizeof(Shared)};
    if (!plan_fits_chunks(p.vocab, sizeof(float), plan)) return static_cast<cudaError_t>(kErrSliceTooLarge);
    return launch_rows<chain_speculative_kernel>(p, p.batch, 1, sizeof(Shared), max_cluster > 1, false, stream);
  });
}

}  // namespace sampling
}  // namespace flashinfer

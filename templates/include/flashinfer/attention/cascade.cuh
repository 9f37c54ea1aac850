// Merging attention states held in 16-bit tensors: the kernels behind flashinfer.cascade's merge_state,
// merge_state_in_place and merge_states, and the level merges of cascade attention.
//
// The state of one (sequence position, head) is an output row v (head_dim 16-bit values) and the base-2
// log-sum-exp s of its logits. States are weighed with the primitives of state.cuh (StateAccumulator, the one
// the split-KV merges of decode and prefill use): an empty state (s = -inf) contributes nothing, so merging
// with one gives the other side exactly, and merging only empty states gives v = 0, s = -inf.
//
// One thread per 16-byte chunk (8 values) of a row; a block holds whole rows, so an in-place merge can make
// every thread of a row read its s before the row's first thread overwrites it.
#pragma once
#include <type_traits>

#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"  // FastDivmod

// Launch-shape knobs of the pair merge (merge_state, merge_state_in_place), for benchmarks/probe_merge.py; the
// defaults are the shipped kernel.
//   FI_MERGE_PAIR_THREADS    threads per block (whole rows of head_dim / 8 threads; 256 to 1024)
//   FI_MERGE_PAIR_ROWS       rows per thread, all their loads issued before any is weighed
//   FI_MERGE_PAIR_OCCUPANCY  resident threads per SM __launch_bounds__ asks for (2048: 32 registers)
//   FI_MERGE_PAIR_WAVES      0: one block per span of rows, the grid covers them all; k > 0: at most k resident
//                            waves of blocks, each looping over spans (a persistent grid)
//   FI_MERGE_PAIR_STREAMING  1: v loads and stores with the evict-first (.cs) cache hint
//   FI_MERGE_PAIR_INDEX32    1: 32-bit element offsets when every tensor's offsets fit (cheaper address math)
//   FI_MERGE_PAIR_FLAT       1: rows by their flat index when every tensor's rows are evenly spaced (no division)
//   FI_MERGE_PAIR_SEED       1: the accumulator starts from state a (0: from empty, a added: a rescale of zeros)
#ifndef FI_MERGE_PAIR_THREADS
#define FI_MERGE_PAIR_THREADS 256
#endif
#ifndef FI_MERGE_PAIR_ROWS
#define FI_MERGE_PAIR_ROWS 1
#endif
#ifndef FI_MERGE_PAIR_OCCUPANCY
#define FI_MERGE_PAIR_OCCUPANCY 2048
#endif
#ifndef FI_MERGE_PAIR_WAVES
#define FI_MERGE_PAIR_WAVES 0
#endif
#ifndef FI_MERGE_PAIR_STREAMING
#define FI_MERGE_PAIR_STREAMING 0
#endif
#ifndef FI_MERGE_PAIR_INDEX32
#define FI_MERGE_PAIR_INDEX32 1
#endif
#ifndef FI_MERGE_PAIR_FLAT
#define FI_MERGE_PAIR_FLAT 1
#endif
#ifndef FI_MERGE_PAIR_SEED
#define FI_MERGE_PAIR_SEED 1
#endif

namespace flashinfer {

constexpr int kMergeRowThreads = 256;  // merge_states: threads per block, rounded down to whole rows
constexpr int kMergeStateBatch = 8;    // merge_states: states whose loads are issued before any is weighed

// A [seq, (num_states,) heads, head_dim] 16-bit tensor and its [seq, (num_states,) heads] float32 lse, by
// element strides (the state strides only matter to merge_states).
struct StateRows {
  const void* v;
  const float* s;
  int64_t v_stride_n, v_stride_h, v_stride_state;
  int64_t s_stride_n, s_stride_h, s_stride_state;
};

struct MergeParams {
  StateRows a, b;  // merge_states reads a only (num_states states); the pair merge reads a and b
  void* v_out;     // [seq, heads, head_dim]; may alias a.v (in place)
  float* s_out;    // [seq, heads] or nullptr; may alias a.s
  int64_t o_stride_n, o_stride_h, so_stride_n, so_stride_h;
  const uint8_t* mask;  // pair merge in place: positions n with mask[n] == 0 are left untouched; or nullptr
  int num_states;
  int rows;            // seq * heads (< 2^31)
  FastDivmod heads;    // row -> (position, head)
  int chunks_per_row;  // head_dim / 8
  int rows_per_block;
  bool row_in_warp;  // pair merge: each row's threads lie in one warp (chunks_per_row divides 32)
};

// The lse of a merged state: log2(1) = 0 spelled out, so that a single non-empty state keeps its lse exactly
// (lg2.approx only bounds the error).
FI_DEVICE float merged_lse(float m, float d) { return d == 1.f ? m : (d > 0.f ? m + ptx_log2(d) : kNegInf); }

// Writes the accumulated state of one chunk (the lse from the row's first thread only).
template <typename DType>
FI_DEVICE void store_state(const MergeParams& p, const StateAccumulator<8>& acc, int n, int h, int chunk) {
  const float inv_d = inverse_or_zero(acc.d);
  float o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = acc.o[i] * inv_d;
  *reinterpret_cast<uint4*>(static_cast<DType*>(p.v_out) + n * p.o_stride_n + h * p.o_stride_h + chunk * 8) =
      pack8<DType>(o);
  if (p.s_out != nullptr && chunk == 0) p.s_out[n * p.so_stride_n + h * p.so_stride_h] = merged_lse(acc.m, acc.d);
}

// ------------------------------------------------------------------------------------ pair merge

constexpr int kPairThreads = FI_MERGE_PAIR_THREADS;
constexpr int kPairRowsPerThread = FI_MERGE_PAIR_ROWS;
constexpr int kPairMinBlocks = FI_MERGE_PAIR_OCCUPANCY / FI_MERGE_PAIR_THREADS;
static_assert(kPairThreads >= kMergeRowThreads && kPairThreads <= 1024 && kPairThreads % 32 == 0,
              "a block must hold a row of the widest head_dim (2048: 256 threads)");
static_assert(kPairRowsPerThread >= 1 && kPairMinBlocks >= 1, "at least one row a thread, one block an SM");

// One 16-byte chunk of v, read or written once: with FI_MERGE_PAIR_STREAMING, marked evict-first (ld/st.cs,
// coherent, so also right for the in-place output).
FI_DEVICE uint4 load_chunk(const void* ptr) {
  const uint4* q = static_cast<const uint4*>(ptr);
#if FI_MERGE_PAIR_STREAMING
  return __ldcs(q);
#else
  return *q;
#endif
}
FI_DEVICE void store_chunk(void* ptr, uint4 v) {
  uint4* q = static_cast<uint4*>(ptr);
#if FI_MERGE_PAIR_STREAMING
  __stcs(q, v);
#else
  *q = v;
#endif
}

// How the pair merge finds a row's elements: by (position, head) with 64-bit or 32-bit offsets, or, when every
// tensor's rows are evenly spaced (stride_n = num_heads * stride_h, as in a contiguous tensor), by the flat row
// index alone (no division; the host then passes each tensor's row spacing as its stride_h).
enum PairAddressing : int { kPairAddr64 = 0, kPairAddr32 = 1, kPairAddrFlat = 2 };

template <int ADDR>
using PairIndex = std::conditional_t<ADDR == kPairAddr64, int64_t, int>;

// Element offset of row `row` = (n, h) in a tensor of strides (stride_n, stride_h).
template <int ADDR>
FI_DEVICE PairIndex<ADDR> pair_offset(int row, int n, int h, int64_t stride_n, int64_t stride_h) {
  using Index = PairIndex<ADDR>;
  if constexpr (ADDR == kPairAddrFlat) {
    return Index(row) * Index(stride_h);
  } else {
    return Index(n) * Index(stride_n) + Index(h) * Index(stride_h);
  }
}

// One block step of the pair merge: kPairRowsPerThread groups of blockDim.y rows from row `first` on, one 16-byte
// chunk of each per thread, every load issued before any row is merged.
template <typename DType, bool LSE_IN_PLACE, int ADDR>
FI_DEVICE void merge_pair_span(const MergeParams& p, unsigned first) {
  constexpr int R = kPairRowsPerThread;
  const int chunk8 = threadIdx.x * 8;
  bool live[R];  // row in range and not masked off
  int row[R], n[R], h[R];
  float sa[R], sb[R];
  uint4 va[R], vb[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const unsigned r = first + u * blockDim.y + threadIdx.y;  // unsigned: no wrap below 2^32
    live[u] = r < unsigned(p.rows);
    row[u] = int(r);
    n[u] = h[u] = 0;
    if (live[u]) {
      if constexpr (ADDR == kPairAddrFlat) {
        if (p.mask != nullptr) n[u] = p.heads.div(row[u]);
      } else {
        p.heads.divmod(row[u], n[u], h[u]);
      }
      live[u] = p.mask == nullptr || p.mask[n[u]] != 0;
    }
    if (!live[u]) continue;
    sa[u] = p.a.s[pair_offset<ADDR>(row[u], n[u], h[u], p.a.s_stride_n, p.a.s_stride_h)];
    sb[u] = p.b.s[pair_offset<ADDR>(row[u], n[u], h[u], p.b.s_stride_n, p.b.s_stride_h)];
    va[u] = load_chunk(static_cast<const DType*>(p.a.v) +
                       (pair_offset<ADDR>(row[u], n[u], h[u], p.a.v_stride_n, p.a.v_stride_h) + chunk8));
    vb[u] = load_chunk(static_cast<const DType*>(p.b.v) +
                       (pair_offset<ADDR>(row[u], n[u], h[u], p.b.v_stride_n, p.b.v_stride_h) + chunk8));
  }
  if constexpr (LSE_IN_PLACE) {
    if (p.row_in_warp) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (!live[u]) continue;
    float fa[8], fb[8];
    unpack8(va[u], fa, DType{});
    unpack8(vb[u], fb, DType{});
#if FI_MERGE_PAIR_SEED
    StateAccumulator<8> acc(sa[u], fa);
#else
    StateAccumulator<8> acc;
    acc.add(sa[u], fa);
#endif
    acc.add(sb[u], fb);
    const float inv_d = inverse_or_zero(acc.d);
    float o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = acc.o[i] * inv_d;
    store_chunk(
        static_cast<DType*>(p.v_out) + (pair_offset<ADDR>(row[u], n[u], h[u], p.o_stride_n, p.o_stride_h) + chunk8),
        pack8<DType>(o));
    if (p.s_out != nullptr && chunk8 == 0)
      p.s_out[pair_offset<ADDR>(row[u], n[u], h[u], p.so_stride_n, p.so_stride_h)] = merged_lse(acc.m, acc.d);
  }
}

// Two states per row (a, b) -> out; out may be a itself. A block is blockDim.y rows of blockDim.x =
// chunks_per_row threads; its span, kPairRowsPerThread such groups. Memory-bound (2 x 16 bytes in and 16 out per
// thread and row): by default the grid covers the rows with small blocks at full occupancy, one span each, rather
// than looping over them (FI_MERGE_PAIR_WAVES). LSE_IN_PLACE: s_out aliases an input's s, read by every thread
// of a row but written by its first, so the block (or the warp, where rows lie within warps) waits for every
// read before any write.
template <typename DType, bool LSE_IN_PLACE, int ADDR>
__global__ void __launch_bounds__(kPairThreads, kPairMinBlocks)
    merge_state_pair_kernel(const __grid_constant__ MergeParams p) {
  const unsigned span = kPairRowsPerThread * blockDim.y;
#if FI_MERGE_PAIR_WAVES > 0
  // first + the grid's step stays below 2^32 for any rows < 2^31
  for (unsigned first = blockIdx.x * span; first < unsigned(p.rows); first += gridDim.x * span)
    merge_pair_span<DType, LSE_IN_PLACE, ADDR>(p, first);
#else
  merge_pair_span<DType, LSE_IN_PLACE, ADDR>(p, blockIdx.x * span);
#endif
}

// The addressing the pair merge's tensors allow (PairAddressing); for kPairAddrFlat, each tensor's row spacing is
// written into its stride_h.
inline int pair_addressing(MergeParams& p, int seq_len, int num_heads, int head_dim) {
  const int64_t limit = (int64_t(1) << 31) - 1;
  int64_t* v_strides[3][2] = {
      {&p.a.v_stride_n, &p.a.v_stride_h}, {&p.b.v_stride_n, &p.b.v_stride_h}, {&p.o_stride_n, &p.o_stride_h}};
  int64_t* s_strides[3][2] = {
      {&p.a.s_stride_n, &p.a.s_stride_h}, {&p.b.s_stride_n, &p.b.s_stride_h}, {&p.so_stride_n, &p.so_stride_h}};
  const int num_s = p.s_out != nullptr ? 3 : 2;
  // Every offset n * stride_n + h * stride_h + e (n < seq_len, h < num_heads, e < width) within an int? (torch's
  // strides are non-negative)
  auto fits = [&](const int64_t* sn, const int64_t* sh, int64_t width) {
    return *sn >= 0 && *sh >= 0 && *sn <= limit && *sh <= limit &&
           (seq_len - 1) * *sn + (num_heads - 1) * *sh + width <= limit;
  };
  // The spacing of consecutive flat rows, or -1 when rows are not evenly spaced.
  auto row_spacing = [&](const int64_t* sn, const int64_t* sh) -> int64_t {
    if (num_heads == 1) return *sn;
    if (seq_len == 1 || *sn == num_heads * *sh) return *sh;
    return -1;
  };
  bool fit32 = true, flat = FI_MERGE_PAIR_FLAT != 0;
  for (auto& t : v_strides) {
    fit32 = fit32 && fits(t[0], t[1], head_dim);
    flat = flat && row_spacing(t[0], t[1]) >= 0;
  }
  for (int i = 0; i < num_s; ++i) {
    fit32 = fit32 && fits(s_strides[i][0], s_strides[i][1], 1);
    flat = flat && row_spacing(s_strides[i][0], s_strides[i][1]) >= 0;
  }
  if (!fit32 || !FI_MERGE_PAIR_INDEX32) return kPairAddr64;
  if (!flat) return kPairAddr32;
  for (auto& t : v_strides) *t[1] = row_spacing(t[0], t[1]);
  for (int i = 0; i < num_s; ++i) *s_strides[i][1] = row_spacing(s_strides[i][0], s_strides[i][1]);
  return kPairAddrFlat;
}

template <typename DType, bool LSE_IN_PLACE, int ADDR>
cudaError_t launch_pair_kernel(const MergeParams& p, int device, cudaStream_t stream) {
  const dim3 block(p.chunks_per_row, p.rows_per_block);
  int blocks = ceil_div(p.rows, kPairRowsPerThread * p.rows_per_block);
  if (FI_MERGE_PAIR_WAVES > 0) {
    const int resident = sm_count(device) * (FI_MERGE_PAIR_OCCUPANCY / (p.chunks_per_row * p.rows_per_block));
    if (blocks > FI_MERGE_PAIR_WAVES * resident) blocks = FI_MERGE_PAIR_WAVES * resident;
  }
  merge_state_pair_kernel<DType, LSE_IN_PLACE, ADDR><<<blocks, block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename DType, bool LSE_IN_PLACE>
cudaError_t launch_pair(MergeParams& p, int seq_len, int num_heads, int head_dim, int device, cudaStream_t stream) {
  switch (pair_addressing(p, seq_len, num_heads, head_dim)) {
    case kPairAddrFlat:
      return launch_pair_kernel<DType, LSE_IN_PLACE, kPairAddrFlat>(p, device, stream);
    case kPairAddr32:
      return launch_pair_kernel<DType, LSE_IN_PLACE, kPairAddr32>(p, device, stream);
    default:
      return launch_pair_kernel<DType, LSE_IN_PLACE, kPairAddr64>(p, device, stream);
  }
}

// ------------------------------------------------------------------------------------ merge_states

// num_states states per row (state i of row (n, h) at a + n * stride_n + i * stride_state + h * stride_h) -> out.
template <typename DType>
__global__ void __launch_bounds__(kMergeRowThreads) merge_states_kernel(const __grid_constant__ MergeParams p) {
  const int local_row = threadIdx.x / p.chunks_per_row;
  const int chunk = threadIdx.x - local_row * p.chunks_per_row;
  for (int row0 = blockIdx.x * p.rows_per_block; row0 < p.rows; row0 += gridDim.x * p.rows_per_block) {
    const int row = row0 + local_row;
    if (row >= p.rows) continue;
    int n, h;
    p.heads.divmod(row, n, h);
    const float* s_row = p.a.s + int64_t(n) * p.a.s_stride_n + int64_t(h) * p.a.s_stride_h;
    const int64_t v_row = int64_t(n) * p.a.v_stride_n + int64_t(h) * p.a.v_stride_h + chunk * 8;
    StateAccumulator<8> acc;
    for (int first = 0; first < p.num_states; first += kMergeStateBatch) {
      // All loads of the batch first, so that they are in flight together.
      float lse[kMergeStateBatch];
      uint4 raw[kMergeStateBatch];
#pragma unroll
      for (int u = 0; u < kMergeStateBatch; ++u) {
        const int i = first + u;
        lse[u] = kNegInf;
        raw[u] = make_uint4(0, 0, 0, 0);
        if (i < p.num_states) {
          lse[u] = s_row[i * p.a.s_stride_state];
          raw[u] = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.a.v) + v_row + i * p.a.v_stride_state);
        }
      }
#pragma unroll
      for (int u = 0; u < kMergeStateBatch; ++u) {
        float vals[8];
        unpack8(raw[u], vals, DType{});
        acc.add(lse[u], vals);
      }
    }
    store_state<DType>(p, acc, n, h, chunk);
  }
}

// ------------------------------------------------------------------------------------ launch

// Fills in the launch geometry and launches on `stream` of `device`. PAIR: merge_state_pair_kernel, else
// merge_states_kernel. head_dim a multiple of 8, at most 8 * kMergeRowThreads.
template <typename DType, bool PAIR>
cudaError_t launch_merge(MergeParams p, int seq_len, int num_heads, int head_dim, int device, cudaStream_t stream) {
  return with_device(device, [&]() -> cudaError_t {
    if (head_dim <= 0 || head_dim % 8 != 0 || head_dim > 8 * kMergeRowThreads || num_heads <= 0 || seq_len < 0)
      return cudaErrorInvalidValue;
    if (int64_t(seq_len) * num_heads >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
    p.rows = seq_len * num_heads;
    if (p.rows == 0) return cudaSuccess;
    p.heads = FastDivmod(num_heads);
    p.chunks_per_row = head_dim / 8;
    if constexpr (PAIR) {
      p.rows_per_block = kPairThreads / p.chunks_per_row;
      p.row_in_warp = 32 % p.chunks_per_row == 0;
      const bool lse_in_place = p.s_out != nullptr && (p.s_out == p.a.s || p.s_out == p.b.s);
      return lse_in_place ? launch_pair<DType, true>(p, seq_len, num_heads, head_dim, device, stream)
                          : launch_pair<DType, false>(p, seq_len, num_heads, head_dim, device, stream);
    }
    p.rows_per_block = kMergeRowThreads / p.chunks_per_row;
    const int threads = p.rows_per_block * p.chunks_per_row;
    // A grid of whole resident waves (the blocks loop over the rows): 2048 threads per SM.
    const int blocks_needed = ceil_div(p.rows, p.rows_per_block);
    const int resident = sm_count(device) * (2048 / threads);
    const int blocks = blocks_needed < resident ? blocks_needed : resident;
    merge_states_kernel<DType><<<blocks, threads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace flashinfer

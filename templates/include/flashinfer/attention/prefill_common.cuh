// What the two prefill kernels (fa2: prefill.cuh, mma.sync; fa3: prefill_sm90.cuh, wgmma) share, apart from
// their tile shapes and shared-memory layouts (each passes its own `smem_at(row, chunk)`):
//   packed query rows   with GQA the `group` query heads of a KV head are packed as rows: packed row pr is
//                       token pr / group, head first_head + pr % group
//   load_q_tile         the query tile's cp.async copies
//   kv_pipeline_prologue the commit-group schedule of the double-buffered K/V tiles
//   stage_o_row, store_o_tile, packed_row_index, and inverse_or_zero and row_lse (state.cuh): the epilogue
//   store_partial_row, prefill_merge_kernel: the states of a KV split and their merge
//   paged_row_ahead, paged_rows_prologue, paged_row_offset: K/V rows through the page table
// The mask predicate they share is in mask.cuh, the online softmax in state.cuh.
#pragma once
#include "flashinfer/attention/mask.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"

#include <type_traits>

namespace flashinfer {

// Parameters of both prefill kernels (single request: fa2 and fa3; batch: fa2). The shared pieces below read
// them from the kernel's __grid_constant__ parameter space where used, rather than holding them in registers.
struct PrefillParams {
  const void* q;  // token n (of the request), head h at q + n * q_stride_n + h * q_stride_h (elements)
  const void*
      k;  // key t: k + off(t) + h * k_stride_h, off(t) = t * k_stride_n or page * k_stride_page + slot * k_stride_n
  const void* v;
  void* o;             // token n, head h at o + n * o_stride_n + h * o_stride_h
  float* lse;          // [tokens, num_qo_heads] or nullptr
  float* partial_o;    // [rows, num_qo_heads, HEAD_DIM] partial states of split KV
  float* partial_lse;  // [rows, num_qo_heads]
  const uint8_t*
      mask;  // custom mask bits, little bit order; request r's bit (i, j) at 8 * mask_indptr[r] + i * kv_len + j
  const int* mask_indptr;
  int64_t q_stride_n, q_stride_h, k_stride_n, k_stride_h, v_stride_n, v_stride_h, o_stride_n, o_stride_h;
  int64_t k_stride_page, v_stride_page;
  int num_qo_heads, num_kv_heads, group_size;
  // Single request.
  int qo_len, kv_len, num_qtiles, num_chunks, chunk_size;
  // Batch: per-request arrays and the plan's schedule (device memory).
  const int* qo_indptr;
  const int* kv_indptr;  // ragged: token offsets; paged: page offsets into kv_indices
  const int* kv_indices;
  const int* kv_last_page_len;
  int page_size;
  int num_pages;    // PAGED: the cache's page count; rows of pages outside [0, num_pages) read as zeros
  const int* work;  // [5][work_capacity]: request, q tile, kv begin, kv end, partial row (-1: write o)
  const int* num_work;
  int work_capacity;
  // fp8 KV kernels: multiplies the output with the softmax normalisation (v_scale dequantises an fp8 V; 16-bit
  // kernels leave it to the caller). Here, in the padding after work_capacity, so that the 16-bit kernels'
  // parameter layout, hence their machine code, stays as it was.
  float v_scale = 1.f;
  const int* merge;  // [4][merge_capacity]: token, first partial row, chunks, row stride between chunks
  const int* num_merge;
  int merge_capacity;
  int window_left;
  float logits_soft_cap, sm_scale, rope_scale, rope_theta;
};

// Element index of packed row pr's (token, head) in a [tokens, num_qo_heads] array (an lse, a partial
// state's row) whose request starts at token `first_token`.
FI_DEVICE int64_t packed_row_index(const PrefillParams& p, int first_token, int pr, int group, int first_head) {
  return (int64_t(first_token) + pr / group) * p.num_qo_heads + first_head + pr % group;
}

// Issues (by THREADS threads, this one `tid`) and commits as one group the cp.async copies of a tile of ROWS
// packed query rows from pr0 on, CH 16-byte chunks each, of KV head kv_head's query heads: packed row pr is
// token first_token + pr / group, head kv_head * group + pr % group of p.q. Chunk c of tile row `row` goes to
// smem_at(row, c); rows from rows_here on are zero-filled.
template <int ROWS, int CH, int THREADS, typename T, typename SmemAt>
FI_DEVICE void load_q_tile(const PrefillParams& p, int first_token, int kv_head, int group, int pr0, int rows_here,
                           int tid, SmemAt&& smem_at) {
  static_assert(ROWS * CH % THREADS == 0, "the tile must split evenly over the threads");
  const T* q =
      static_cast<const T*>(p.q) + int64_t(first_token) * p.q_stride_n + int64_t(kv_head) * group * p.q_stride_h;
#pragma unroll
  for (int i = 0; i < ROWS * CH / THREADS; ++i) {
    const int idx = tid + i * THREADS, row = idx / CH, c = idx % CH;
    const bool valid = row < rows_here;
    const int pr = pr0 + (valid ? row : 0);
    const int token = pr / group, hh = pr % group;
    cp_async_16(smem_at(row, c), q + int64_t(token) * p.q_stride_n + int64_t(hh) * p.q_stride_h + c * 8, valid);
  }
  cp_async_commit();
}

// Commit-group schedule of the prefill kernels' double-buffered K/V: the prologue commits K(0), V(0), K(1)
// (after whatever the caller has issued, e.g. Q); iteration n then commits V(n+1) and K(n+2). Groups stay
// in that order even when a tile does not exist (empty groups), so the wait counts never change.
// load_kv(tile, is_v) issues one tile's copies.
template <typename LoadKV>
FI_DEVICE void kv_pipeline_prologue(int num_tiles, LoadKV&& load_kv) {
  if (num_tiles > 0) load_kv(0, false);
  cp_async_commit();
  if (num_tiles > 0) load_kv(0, true);
  cp_async_commit();
  if (num_tiles > 1) load_kv(1, false);
  cp_async_commit();
}

// Scales one accumulator row by inv (inverse_or_zero of its quad-summed denominator) and stores it as DTypeO
// pairs into the staging tile row `row`: the row's NT n8 blocks, this lane holding columns 2 (lane % 4) and
// + 1 of block j at acc[4 j] and acc[4 j + 1] (the C fragment layout of mma.sync and wgmma, 4 floats per
// block); block j's 16 bytes at chunk_at(row, j).
template <int NT, typename DTypeO, typename ChunkAt>
FI_DEVICE void stage_o_row(float inv, int row, int lane, const float* acc, ChunkAt&& chunk_at) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(chunk_at(row, j)) + lane % 4;
    *dst = pack2<DTypeO>(acc[4 * j] * inv, acc[4 * j + 1] * inv);
  }
}

// Copies staged output rows [first_row, first_row + ROWS) of a tile (16-byte chunk c of row `row`: the uint4
// staged(row, c)) to p.o, by THREADS threads (this one `thread`); packed row pr0 + row goes to token
// first_token + pr / group, head first_head + pr % group. Rows from rows_here on are not written.
template <int ROWS, int CH, int THREADS, typename T, typename Staged>
FI_DEVICE void store_o_tile(const PrefillParams& p, int first_token, int group, int first_head, int pr0, int first_row,
                            int rows_here, int thread, Staged&& staged) {
  static_assert(ROWS * CH % THREADS == 0, "the tile must split evenly over the threads");
  T* o = static_cast<T*>(p.o) + int64_t(first_token) * p.o_stride_n;
#pragma unroll
  for (int i = 0; i < ROWS * CH / THREADS; ++i) {
    const int idx = thread + THREADS * i, row = first_row + idx / CH, c = idx % CH;
    if (row < rows_here) {
      const int pr = pr0 + row;
      *reinterpret_cast<uint4*>(o + int64_t(pr / group) * p.o_stride_n +
                                int64_t(first_head + pr % group) * p.o_stride_h + c * 8) = staged(row, c);
    }
  }
}

// Writes one accumulator row as a partial state of a KV split: its columns scaled by inv (inverse_or_zero of
// the quad-summed denominator) as floats, p.partial_o + state * HEAD_DIM (this lane's 2 columns of each of the
// NT n8 blocks at acc[4 j] and acc[4 j + 1], as in stage_o_row), and (one lane of the quad) its lse,
// p.partial_lse[state] = row_lse(m, d, scl). prefill_merge_kernel combines the chunks.
template <int NT, int HEAD_DIM>
FI_DEVICE void store_partial_row(const PrefillParams& p, int64_t state, float inv, int lane, const float* acc, float m,
                                 float d, float scl) {
  float* dst = p.partial_o + state * HEAD_DIM + 2 * (lane % 4);
#pragma unroll
  for (int j = 0; j < NT; ++j)
    *reinterpret_cast<float2*>(dst + j * 8) = make_float2(acc[4 * j] * inv, acc[4 * j + 1] * inv);
  if (lane % 4 == 0) p.partial_lse[state] = row_lse(m, d, scl);
}

// ---------------------------------------------------------------------------------------------- fp8 K/V
// An fp8 KV cache (e4m3/e5m2) is copied into shared memory as it is stored (16-byte cp.async chunks of 16
// elements, half the bytes of a 16-bit tile), into a staging tile of ROWS rows of HEAD_DIM bytes; the threads
// then widen it into the kernel's 16-bit tile layout (exactly: fp8x8_to_chunk), which the unchanged MMA code
// reads after a barrier. The staging tiles (two stages of K and of V) take the space of the 16-bit tiles'
// second stage, so an fp8 kernel needs no more shared memory than a 16-bit one.

// Widens staging tile `src` (row r at src + r * HEAD_DIM bytes) into 16-bit chunks of type T: 16-byte chunk c
// of row r (eight elements) goes to chunk_at(r, c). By THREADS threads (this one `tid`), eight bytes each per
// step: consecutive threads write consecutive chunks of a row (one bank group each, under either swizzle).
// UNROLL steps at a time: the widening runs beside the live output accumulators, and a fully unrolled loop's
// loads in flight spill them (2: fa2 at 255 registers, fa3 at 128).
template <int ROWS, int HEAD_DIM, int THREADS, int UNROLL, typename T, typename F8, typename ChunkAt>
FI_DEVICE void widen_fp8_tile(const uint8_t* src, int tid, ChunkAt&& chunk_at) {
  constexpr int CH = HEAD_DIM / 8;
  static_assert(ROWS * CH % THREADS == 0, "the tile must split evenly over the threads");
#pragma unroll UNROLL
  for (int i = 0; i < ROWS * CH / THREADS; ++i) {
    const int idx = tid + i * THREADS, row = idx / CH, c = idx % CH;
    const uint2 raw = *reinterpret_cast<const uint2*>(src + row * HEAD_DIM + c * 8);
    *chunk_at(row, c) = fp8x8_to_chunk<T, F8>(raw);
  }
}

// The factor an output row's accumulators are scaled by in a prefill epilogue: 1 / d (the softmax normalisation;
// 0 for a row that saw no key), and with fp8 K/V times v_scale (it dequantises V; in fp32, before the one rounding
// of the output). 16-bit kernels leave v_scale to the caller (their machine code stays as it was).
template <bool FP8>
FI_DEVICE float output_factor(float row_d, const PrefillParams& p) {
  if constexpr (FP8) {
    return inverse_or_zero(row_d) * p.v_scale;
  } else {
    return inverse_or_zero(row_d);
  }
}

// fa2 without RoPE reads fp8 K/V straight from shared memory instead (fp8 fragments converted in registers,
// prefill.cuh): the tiles stay fp8, BK rows of HEAD_DIM bytes, and q is permuted along head_dim once per CTA so
// that one 32-bit word of a K row (four fp8 keys' dims) is one lane's whole B fragment of a k16 step.

// Byte offset of 16-byte chunk c (16 fp8 elements) of row `row` of such a tile. Rows of 128 bytes and more
// (d128, d256): chunk c ^ (row & 7), the ldmatrix swizzle. d64 (four chunks, two rows per 128-byte line): the
// chunks of line L = row / 2 XORed with (2 L + (L / 2 & 1)) & 7. Both are conflict-free for the kernel's two
// read patterns: K by ldmatrix (8 consecutive rows at one chunk: 8 different bank groups) and V by 32-bit loads
// (rows 2 t + e, t < 4, at two neighbouring chunks: 8 different bank groups). The chunk enters by an XOR,
// fp8_kv_offset(row, c) == fp8_kv_offset(row, 0) ^ 16 c, and rows r and r + 8 k share a pattern, so the MMA
// loops address fragments with one XOR and one add of constants.
template <int HEAD_DIM>
FI_DEVICE uint32_t fp8_kv_offset(int row, int c) {
  constexpr int CHS = HEAD_DIM / 16;
  static_assert(CHS == 4 || CHS == 8 || CHS == 16, "head_dim 64, 128 or 256");
  const int key = CHS >= 8 ? (row & 7) : ((2 * (row >> 1) + ((row >> 2) & 1)) & 7);
  return uint32_t(((row * CHS + c) ^ key) * 16);
}

// A register of two bfloat16 q values -> float16x2, the MMA type of the fp8 kernels (fp8 widens to float16 with one
// instruction per pair, to bfloat16 with four). Exact from 2^-14 to 65504 in magnitude (bfloat16 has 8
// significant bits, float16 11); smaller magnitudes keep an absolute error below 2^-25, larger ones clamp to
// +-65504 (a q element that large saturates any softmax anyway).
FI_DEVICE uint32_t bf16x2_to_half2_clamped(uint32_t w) {
  return pack2_half_clamped(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// Converts a bfloat16 q tile of ROWS rows of CH 16-byte chunks (chunk c of row r at chunk_at(r, c)) to float16 in
// place (bf16x2_to_half2_clamped), by THREADS threads (this one `tid`).
template <int ROWS, int CH, int THREADS, typename ChunkAt>
FI_DEVICE void q_tile_to_half(int tid, ChunkAt&& chunk_at) {
  static_assert(ROWS * CH % THREADS == 0, "the tile must split evenly over the threads");
#pragma unroll 2
  for (int i = 0; i < ROWS * CH / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    uint4* c = chunk_at(idx / CH, idx % CH);
    const uint4 w = *c;
    *c = make_uint4(bf16x2_to_half2_clamped(w.x), bf16x2_to_half2_clamped(w.y), bf16x2_to_half2_clamped(w.z),
                    bf16x2_to_half2_clamped(w.w));
  }
}

// Rewrites a swizzled 16-bit q tile (rows [0, ROWS), CH chunks each, chunk c of row r at chunk_at(r, c)) in place
// for the fp8 MMA loop: within each k16 step (chunks 2s, 2s + 1; 32-bit words w0..w7 of two dims each) chunk 2s
// becomes (w0, w2, w4, w6) and chunk 2s + 1 (w1, w3, w5, w7), so the A fragment ldmatrix gives lane t the dims
// 4t..4t+3 of the step, those of word t of a K row's 16-byte chunk; and the values become float16 (the MMA type:
// bf16x2_to_half2_clamped).
template <int ROWS, int CH, int THREADS, typename T, typename ChunkAt>
FI_DEVICE void permute_q_for_fp8(int tid, ChunkAt&& chunk_at) {
  static_assert(ROWS * (CH / 2) % THREADS == 0, "the tile must split evenly over the threads");
#pragma unroll 2
  for (int i = 0; i < ROWS * (CH / 2) / THREADS; ++i) {
    const int idx = tid + i * THREADS, row = idx / (CH / 2), s = idx % (CH / 2);
    uint4* lo = chunk_at(row, 2 * s);
    uint4* hi = chunk_at(row, 2 * s + 1);
    uint32_t w[8] = {lo->x, lo->y, lo->z, lo->w, hi->x, hi->y, hi->z, hi->w};
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = bf16x2_to_half2_clamped(w[j]);
    } else {
      static_assert(std::is_same<T, __half>::value, "T: __half or __nv_bfloat16");
    }
    *lo = make_uint4(w[0], w[2], w[4], w[6]);
    *hi = make_uint4(w[1], w[3], w[5], w[7]);
  }
}

// The epilogue of the fp8 MMA loop, whose output columns are permuted: n8 block 4 J + i, column 2 t + e of a
// lane (t = lane % 4) is dim 32 J + 8 t + 4 e + i, so the lane holds dims 32 J + 8 t .. + 7 of each 32-dim block
// J: acc[4 (4 J + i) + e], the C fragment layout as in stage_o_row. block8_fp8 gathers those 8 values of block J
// in dim order, scaled by inv.
FI_DEVICE void block8_fp8(const float* acc, int J, float inv, float (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = acc[4 * (4 * J + i)] * inv;
    v[4 + i] = acc[4 * (4 * J + i) + 1] * inv;
  }
}

// Stores each block's 8 values as one 16-byte chunk of DTypeO, chunk 4 J + t of staging row `row` at
// chunk_at(row, 4 J + t).
template <int NT, typename DTypeO, typename ChunkAt>
FI_DEVICE void stage_o_row_fp8(float inv, int row, int lane, const float* acc, ChunkAt&& chunk_at) {
#pragma unroll
  for (int J = 0; J < NT / 4; ++J) {
    float v[8];
    block8_fp8(acc, J, inv, v);
    *chunk_at(row, 4 * J + lane % 4) = pack8<DTypeO>(v);
  }
}

// store_partial_row for the permuted columns of stage_o_row_fp8: 8 consecutive floats per lane and block.
template <int NT, int HEAD_DIM>
FI_DEVICE void store_partial_row_fp8(const PrefillParams& p, int64_t state, float inv, int lane, const float* acc,
                                     float m, float d, float scl) {
  float* dst = p.partial_o + state * HEAD_DIM + 8 * (lane % 4);
#pragma unroll
  for (int J = 0; J < NT / 4; ++J) {
    float v[8];
    block8_fp8(acc, J, inv, v);
    *reinterpret_cast<float4*>(dst + 32 * J) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(dst + 32 * J + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
  if (lane % 4 == 0) p.partial_lse[state] = row_lse(m, d, scl);
}

// ---------------------------------------------------------------------------------------------- paged K/V
// The (page, slot) of each row of two K/V tiles sits in shared memory (s_rows[tile & 1][row]), looked up a tile
// ahead by one thread per row, so that issuing a tile's copies never waits on a dependent global load or a
// division by the page size. kv_start: the request's first entry of p.kv_indices.

// This thread's row (tid < BK) of K/V tile `tile` (keys from lo on): (page, slot), with page -1 for a page id
// outside the cache (page_in_cache: the row is zero-filled, never read); (0, 0) for rows from hi on, tiles past
// the last, other threads, or without PAGED.
template <bool PAGED, int BK>
FI_DEVICE int2 paged_row_ahead(const PrefillParams& p, int kv_start, int lo, int hi, int num_tiles, int tile, int tid) {
  const int t = lo + tile * BK + tid;
  int2 r = make_int2(0, 0);
  if (PAGED && tid < BK && tile < num_tiles && t < hi) {
    int page_pos, slot;
    split_token(t, p.page_size, page_pos, slot);
    const int page = p.kv_indices[kv_start + page_pos];
    r = make_int2(page_in_cache(page, p.num_pages) ? page : -1, slot);
  }
  return r;
}

// Fills the rows of tiles 0 and 1 (lookup(tile): this thread's paged_row_ahead) before the first copies.
template <bool PAGED, int BK, typename Lookup>
FI_DEVICE void paged_rows_prologue(int2* s_rows, int tid, Lookup&& lookup) {
  if constexpr (PAGED) {
    if (tid < BK) {
      s_rows[tid] = lookup(0);
      s_rows[BK + tid] = lookup(1);
    }
    __syncthreads();
  }
}

// Element offset of the row at (page, slot) = ps, from p.k or p.v with that tensor's page and token strides.
FI_DEVICE int64_t paged_row_offset(int2 ps, int64_t stride_page, int64_t stride_n) {
  return int64_t(ps.x) * stride_page + int64_t(ps.y) * stride_n;
}

// ---------------------------------------------------------------------------------------------- KV split
// Merges the chunk states of split-KV rows: one warp per (token, head), HEAD_DIM / 32 floats per lane.
// Single request (p.merge == nullptr): token t's chunks are partial rows t + c * qo_len, c < num_chunks.
template <int HEAD_DIM, typename DTypeO>
__global__ void __launch_bounds__(128) prefill_merge_kernel(const __grid_constant__ PrefillParams p) {
  constexpr int VEC = HEAD_DIM / 32;
  grid_dependency_wait();  // (launched with PDL after the batch kernel: its partial states must be complete)
  const int head = blockIdx.y * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (head >= p.num_qo_heads) return;
  const bool batch = p.merge != nullptr;
  const int count_all = batch ? *p.num_merge : p.qo_len;
  for (int mi = blockIdx.x; mi < count_all; mi += gridDim.x) {
    int token = mi, base = mi, chunks = p.num_chunks, stride = p.qo_len;
    if (batch) {
      token = p.merge[mi];
      base = p.merge[p.merge_capacity + mi];
      chunks = p.merge[2 * p.merge_capacity + mi];
      stride = p.merge[3 * p.merge_capacity + mi];
    }
    // The chunks' loads are issued kLoads at a time before any is folded in: one memory round trip per kLoads
    // chunks instead of one per chunk (the fold order, hence every bit of the result, is unchanged). Measured on an
    // H200 (the cascade's shared level, 2048 rows x 8 chunks, d128): 7.3 µs with a round trip per chunk.
    constexpr int kLoads = 8;
    StateAccumulator<VEC> acc;
    for (int c0 = 0; c0 < chunks; c0 += kLoads) {
      float lse[kLoads], vals[kLoads][VEC];
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        if (c0 + u >= chunks) break;
        const int64_t state = (int64_t(base) + int64_t(c0 + u) * stride) * p.num_qo_heads + head;
        const float* src = p.partial_o + state * HEAD_DIM + lane * VEC;
        lse[u] = p.partial_lse[state];
#pragma unroll
        for (int i = 0; i < VEC; i += 2) {
          const float2 v2 = *reinterpret_cast<const float2*>(src + i);
          vals[u][i] = v2.x;
          vals[u][i + 1] = v2.y;
        }
      }
#pragma unroll
      for (int u = 0; u < kLoads; ++u) {
        if (c0 + u < chunks) acc.add(lse[u], vals[u]);
      }
    }
    const float inv = inverse_or_zero(acc.d);
    DTypeO* dst = static_cast<DTypeO*>(p.o) + int64_t(token) * p.o_stride_n + int64_t(head) * p.o_stride_h + lane * VEC;
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      const float a = acc.o[i] * inv, b = acc.o[i + 1] * inv;
      DTypeO pair[2] = {from_float<DTypeO>(a), from_float<DTypeO>(b)};
      *reinterpret_cast<uint32_t*>(dst + i) = *reinterpret_cast<uint32_t*>(pair);
    }
    if (p.lse != nullptr && lane == 0) p.lse[int64_t(token) * p.num_qo_heads + head] = acc.lse();
  }
}

template <int HEAD_DIM, typename DTypeO>
cudaError_t launch_prefill_merge(const PrefillParams& p, int grid_x, cudaStream_t stream, bool pdl = false) {
  if (grid_x <= 0) return cudaSuccess;
  return launch_kernel(prefill_merge_kernel<HEAD_DIM, DTypeO>, dim3(grid_x, ceil_div(p.num_qo_heads, 4)), dim3(128), 0,
                       stream, pdl, p);
}

}  // namespace flashinfer

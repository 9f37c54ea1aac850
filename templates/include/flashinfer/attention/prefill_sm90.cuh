// Prefill attention on Hopper warpgroup MMA (wgmma, sm_90a): the "fa3" backend of single-request prefill.
//
// A CTA of two warpgroups owns 128 packed query rows of one KV head (GQA heads packed as rows, as in the fa2
// kernel); each warpgroup owns 64 rows. Per KV tile (64 keys without a mask, 128 causal: fa3_kv_tile):
//   S = Q K^T   8 x wgmma.m64n{64,128}k16, Q and K straight from swizzled shared memory (no ldmatrix)
//   online softmax in fp32 registers (exp2, the row max reduced over the 4 lanes of a quad), P packed to
//   16 bits in place: the wgmma accumulator layout is the m16n8k16 A-fragment layout of each warp's rows
//   O += P V    wgmma.m64n128k16 per 16 keys, P from registers, V (keys x head_dim) as an MN-major operand
// K and V are double-buffered with cp.async in separate commit groups (the copy of K(n+2) runs under P V(n),
// V(n+1) under Q K(n)^T), as in the fa2 kernel. A software-pipelined variant (S(n+1) issued before P V(n),
// the softmax overlapping P V) measured no faster on an H200 and was dropped; the two barriers per tile and
// the cp.async loads by the computing threads themselves are what a next step (TMA, warp specialisation)
// would remove.
// Scope: head_dim 128, 16-bit q and output, K/V in q's dtype or fp8 (e4m3/e5m2: copied as fp8 into staging stages in
// the second K/V stage's place and widened into one 16-bit tile each, prefill_common.cuh, while the wgmmas of the
// other operand run: see the fp8 schedule in the kernel), no mask or causal, no
// position encoding, window or soft cap; everything else goes to fa2 (see prefill.py). Two options (template flags, off
// for single_prefill_with_kv_cache): PAGED reads K/V through a page table (p.kv_indices, p.page_size, the page
// strides), the (page, slot) of each row resolved a tile ahead into shared memory as in the fa2 kernel; SPLIT cuts the
// KV range into p.num_chunks chunks of p.chunk_size keys (grid z), each leaving a partial (o, lse) state that
// prefill_merge_kernel combines. Together they run a cascade's shared level: every query of a batch against one shared
// prefix. The key range, mask predicate, online softmax, Q load, paged row lookup, merge and epilogue are the fa2
// kernel's (prefill_common.cuh), on this kernel's shared-memory layout.
#pragma once
#include "flashinfer/attention/mask.cuh"
#include "flashinfer/attention/prefill_common.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/smem.cuh"
#include "flashinfer/ptx/math.cuh"
#include "flashinfer/ptx/wgmma.cuh"

#include <type_traits>

namespace flashinfer {

// Keys per KV tile: 64 fit two CTAs per SM (96 KB of shared memory, 128 registers), 128 take 160 KB and one
// CTA per SM. Measured on an H200 (benchmarks/probe_prefill.py, 2026-11-22): 64 is 6-14% faster without a
// mask (431 vs 403 TFLOP/s at 8192 tokens), level for causal at 8192 and 10% slower for causal at 2048, so
// causal keeps 128. -DFI_FA3_BK=n overrides both (for probes).
template <MaskMode MASK>
constexpr int fa3_kv_tile() {
#ifdef FI_FA3_BK
  return FI_FA3_BK;
#else
  return MASK == MaskMode::kCausal ? 128 : 64;
#endif
}

template <MaskMode MASK>
struct Fa3Traits {
  static constexpr int kHeadDim = 128;
  static constexpr int kThreads = 256;            // two warpgroups
  static constexpr int BQ = 128;                  // packed query rows per CTA
  static constexpr int BK = fa3_kv_tile<MASK>();  // keys per KV tile
  static constexpr int kMinBlocks = BK == 64 ? 2 : 1;
  static constexpr int kQBytes = BQ * kHeadDim * 2;
  static constexpr int kKVBytes = BK * kHeadDim * 2;
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes;  // Q, K x2, V x2
  static constexpr int kRowsBytes = 2 * BK * 8;              // PAGED: (page, slot) of the rows of two KV tiles
  static_assert(BK == 64 || BK == 128, "KV tiles of 64 or 128 keys");
};

template <typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, bool PAGED = false, bool SPLIT = false>
__global__ void __launch_bounds__(Fa3Traits<MASK>::kThreads, Fa3Traits<MASK>::kMinBlocks)
    fa3_single_prefill_kernel(const __grid_constant__ PrefillParams p) {
  using Tr = Fa3Traits<MASK>;
  constexpr int D = Tr::kHeadDim, BQ = Tr::BQ, BK = Tr::BK, THREADS = Tr::kThreads, CH = D / 8;
  constexpr bool FP8 = is_fp8<DTypeKV>::value;
  // The type the tensor cores read Q, K, V (and P) in: q's, or float16 with fp8 K/V (one cvt per pair widens fp8
  // to it, four to bfloat16: the widening runs under the wgmmas, but shares their warps' issue slots; a bfloat16 q
  // is rounded to float16 once per CTA, as in the fa2 kernel: bf16x2_to_half2_clamped).
  using KVT = std::conditional_t<FP8, __half, DTypeQ>;
  static_assert(FP8 || std::is_same<DTypeQ, DTypeKV>::value, "one 16-bit type for q, k and v (or fp8 k and v)");
  extern __shared__ __align__(1024) uint4 smem[];  // same declaration as the fa2 kernels'
  uint8_t* sq = reinterpret_cast<uint8_t*>(smem);
  uint8_t* sk = sq + Tr::kQBytes;       // 2 stages
  uint8_t* sv = sk + 2 * Tr::kKVBytes;  // 2 stages
  const uint32_t sq_u = smem_addr(sq), sk_u = smem_addr(sk), sv_u = smem_addr(sv);
  // The 16-bit stage tile n's math reads (fp8: always the one widened tile), and fp8 staging stage s of K or V.
  auto stage = [](int n) { return FP8 ? 0 : (n & 1); };
  auto staging = [&](bool is_v, int s) { return (is_v ? sv : sk) + Tr::kKVBytes + s * (BK * D); };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  const int qtile = p.num_qtiles - 1 - blockIdx.x;  // heaviest (last, for causal) tiles first
  const int kv_head = blockIdx.y;
  const int group = p.group_size;
  const int qo_len = p.qo_len, kv_len = p.kv_len;
  const int pr0 = qtile * BQ;
  const int rows_here = min(BQ, qo_len * group - pr0);
  const int delta = kv_len - qo_len;  // query token i sits at position delta + i
  const int tok_min = pr0 / group, tok_max = (pr0 + rows_here - 1) / group;
  const int chunk = SPLIT ? int(blockIdx.z) : 0;
  const int chunk_begin = SPLIT ? chunk * p.chunk_size : 0;
  int lo, hi;  // this CTA's keys (no window)
  visible_key_range<MASK, false>(chunk_begin, SPLIT ? chunk_begin + p.chunk_size : kv_len, kv_len, delta, tok_min,
                                 tok_max, 0, lo, hi);
  const int num_tiles = hi > lo ? ceil_div(hi - lo, BK) : 0;

  // ---- Q tile -> shared memory (rows beyond the request are zero-filled)
  load_q_tile<BQ, CH, THREADS, DTypeQ>(p, 0, kv_head, group, pr0, rows_here, tid,
                                       [&](int row, int c) { return sq + sm90::tile_offset(row, c, BQ); });

  // PAGED: the page-table lookup of a tile's rows, one thread per row, a tile ahead (see the fa2 kernel).
  int2* s_rows = reinterpret_cast<int2*>(sv + 2 * Tr::kKVBytes);
  auto resolve_rows = [&](int tile) { return paged_row_ahead<PAGED, BK>(p, 0, lo, hi, num_tiles, tile, tid); };
  paged_rows_prologue<PAGED, BK>(s_rows, tid, resolve_rows);

  auto load_kv = [&](int tile, bool is_v) {
    [[maybe_unused]] uint8_t* dst = (is_v ? sv : sk) + (tile & 1) * Tr::kKVBytes;  // (16-bit)
    const DTypeKV* base =
        static_cast<const DTypeKV*>(is_v ? p.v : p.k) + int64_t(kv_head) * (is_v ? p.v_stride_h : p.k_stride_h);
    const int64_t stride_n = is_v ? p.v_stride_n : p.k_stride_n;
    constexpr int CHS = FP8 ? D / 16 : CH;  // 16-byte chunks per stored row
#pragma unroll
    for (int i = 0; i < BK * CHS / THREADS; ++i) {
      const int idx = tid + i * THREADS, row = idx / CHS, c = idx % CHS;
      const int t = lo + tile * BK + row;
      bool valid = t < hi;
      int64_t off;
      if constexpr (PAGED) {
        const int2 ps = s_rows[(tile & 1) * BK + row];
        valid = valid && ps.x >= 0;  // a row of an invalid page (paged_row_ahead) is zero-filled, not read
        const int64_t paged = paged_row_offset(ps, is_v ? p.v_stride_page : p.k_stride_page, stride_n);
        off = valid ? paged : 0;
      } else {
        off = int64_t(valid ? t : 0) * stride_n;
      }
      if constexpr (FP8) {
        cp_async_16(staging(is_v, tile & 1) + row * D + c * 16, base + off + c * 16, valid);
      } else {
        cp_async_16(dst + sm90::tile_offset(row, c, BK), base + off + c * 8, valid);
      }
    }
  };
  // fp8: widens staging stage tile & 1 of K or V into its 16-bit tile (the fence.proxy.async before the next
  // barrier makes the generic-proxy writes visible to wgmma).
  auto widen_kv = [&](int tile, bool is_v) {
    if constexpr (FP8) {
      uint8_t* dst = is_v ? sv : sk;
      widen_fp8_tile<BK, D, THREADS, 2, KVT, DTypeKV>(staging(is_v, tile & 1), tid, [&](int row, int c) {
        return reinterpret_cast<uint4*>(dst + sm90::tile_offset(row, c, BK));
      });
    }
  };

  // Commit groups, in order: Q, K0, V0, K1, then per iteration n: V(n+1), K(n+2) (empty groups keep counts).
  kv_pipeline_prologue(num_tiles, load_kv);
  // fp8 schedule: the widening leaves the critical path by running under the tensor cores' work. V(n) widens
  // while Q K(n)^T runs (V's 16-bit tile is free: every P V(n-1) completed before the loop's first barrier),
  // K(n+1) while P V(n) runs (K's tile is free: every Q K(n)^T completed before the second barrier). The copies
  // are issued where the 16-bit kernel issues them, but each barrier now needs the group committed before the
  // latest one landed (V(n) at the first, K(n+1) at the second: cp_async_wait<1>), and K(0) widens here.
  // Two barriers per tile, as in the 16-bit kernel (the previous design added two more, each waiting for a
  // whole widening on the critical path: 18-31% slower than bf16 on an H200).
  constexpr int kPending = FP8 ? 1 : 2;  // commit groups that may still be in flight at a barrier
  if constexpr (FP8) {
    cp_async_wait<2>();  // Q, K(0) landed (V(0), K(1) may be in flight)
    __syncthreads();
    if constexpr (!std::is_same<DTypeQ, KVT>::value) {
      q_tile_to_half<BQ, CH, THREADS>(
          tid, [&](int row, int c) { return reinterpret_cast<uint4*>(sq + sm90::tile_offset(row, c, BQ)); });
    }
    if (num_tiles > 0) widen_kv(0, false);
  }

  // This thread's accumulator rows (of the CTA's 128): wg*64 + (warp%4)*16 + lane/4, and that + 8; its
  // columns 8i + 2(lane%4) (+1), i < 16. Accumulator element 4i + 2r + e: row r (0: g, 1: g+8), column e.
  const int row0 = wg * 64 + (warp % 4) * 16 + lane / 4;
  // The query position of accumulator row r (causal mask), recomputed where used: registers are tight at two
  // CTAs per SM.
  auto qpos = [&](int r) { return delta + (pr0 + min(row0 + 8 * r, rows_here - 1)) / group; };
  const float scl = p.sm_scale * kLog2e;

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m[2] = {kNegInf, kNegInf}, d[2] = {0.f, 0.f};

  // Descriptors (see wgmma.cuh): Q rows of this warpgroup and K rows are K-major, V is MN-major.
  const uint32_t q_base = sq_u + wg * 64 * sm90::kSwizzleRowBytes;
  constexpr uint32_t kSbo = 8 * sm90::kSwizzleRowBytes;

  for (int n = 0; n < num_tiles; ++n) {
    cp_async_wait<kPending>();  // K(n) landed (V(n), K(n+1) may be in flight); fp8: V(n) (K(n+1) may be)
    sm90::fence_async_shared();
    __syncthreads();  // ... for every thread; and both warpgroups are done with V(n-1)'s stage
    if (n + 1 < num_tiles) load_kv(n + 1, true);
    cp_async_commit();
    // PAGED: rows of tile n+2 go where tile n's were (their last reader, V(n), was issued before the barrier
    // above); loaded now, stored before the next barrier, so the lookup's latency hides behind S = Q K^T.
    int2 rows_ahead = make_int2(0, 0);
    if constexpr (PAGED) rows_ahead = resolve_rows(n + 2);

    // ---- S = Q K^T
    constexpr int NB = BK / 8;  // n8 blocks of scores
    float s[BK / 2];
    // Descriptor bases made opaque to the compiler, so that it adds each step's offset in place instead of
    // keeping eight precomputed 64-bit descriptors live across the loop (registers are tight at 2 CTAs/SM).
    const uint64_t dq = sm90::opaque(sm90::make_desc(q_base, 16, kSbo));
    const uint64_t dk = sm90::opaque(sm90::make_desc(sk_u + stage(n) * Tr::kKVBytes, 16, kSbo));
    sm90::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const uint32_t col = (ks & 3) * 32;  // k16 step within the 64-column block
      const uint64_t da = sm90::desc_advance(dq, (ks >> 2) * BQ * sm90::kSwizzleRowBytes + col);
      const uint64_t db = sm90::desc_advance(dk, (ks >> 2) * BK * sm90::kSwizzleRowBytes + col);
      if constexpr (BK == 128) {
        sm90::wgmma_m64n128k16_ss<KVT>(s, da, db, ks > 0);
      } else {
        sm90::wgmma_m64n64k16_ss<KVT>(s, da, db, ks > 0);
      }
    }
    sm90::wgmma_commit();
    if constexpr (FP8) {
      widen_kv(n, true);  // V(n) -> V's 16-bit tile, under the wgmmas
      sm90::hold_operands(s);
    }
    sm90::wgmma_wait<0>();
    if constexpr (FP8) sm90::hold_operands(s);  // no read of S moves above the wait

    // ---- mask: keys past the end (last tile), and the causal diagonal
    mask_wgmma_tile<MASK, BK>(s, lo + n * BK, hi, delta, tok_min, tok_max, lane, qpos);

    // ---- online softmax (log2 domain)
    float corr[2];
    bool max_moved = false;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      corr[r] = online_softmax_row<NB>(m[r], d[r], scl, max_moved,
                                       [&](int i, int e) -> float& { return s[4 * i + 2 * r + e]; });
    }
    if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * i + e] *= corr[e / 2];
    }
    uint32_t pa[BK / 16][4];
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      pa[kk][0] = pack2<KVT>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<KVT>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<KVT>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<KVT>(s[8 * kk + 6], s[8 * kk + 7]);
    }

    if constexpr (PAGED) {
      if (tid < BK) s_rows[(n & 1) * BK + tid] = rows_ahead;
    }
    cp_async_wait<kPending>();  // V(n) landed (K(n+1), V(n+1) may be in flight); fp8: K(n+1) (V(n+1) may be)
    sm90::fence_async_shared();
    __syncthreads();  // ... for every thread; and both warpgroups are done with K(n)'s stage
    if (n + 2 < num_tiles) load_kv(n + 2, false);
    cp_async_commit();

    // ---- O += P V
    const uint64_t dv =
        sm90::opaque(sm90::make_desc(sv_u + stage(n) * Tr::kKVBytes, BK * sm90::kSwizzleRowBytes, kSbo));
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint64_t db = sm90::desc_advance(dv, kk * 16 * sm90::kSwizzleRowBytes);
      sm90::wgmma_m64n128k16_rs<KVT>(o, pa[kk], db, 1);
    }
    sm90::wgmma_commit();
    if constexpr (FP8) {
      if (n + 1 < num_tiles) widen_kv(n + 1, false);  // K(n+1) -> K's 16-bit tile, under the wgmmas
      sm90::hold_operands(o);
    }
    sm90::wgmma_wait<0>();
    if constexpr (FP8) sm90::hold_operands(o);
  }
  cp_async_wait<0>();
  __syncthreads();  // every wgmma read of Q is done before Q's rows are reused for staging O

  // ---- epilogue: normalise, stage the 16-bit rows in Q's place, write 16-byte chunks
#pragma unroll
  for (int r = 0; r < 2; ++r) d[r] = quad_sum(d[r]);
  // 1 / d, and for fp8 K/V times v_scale (as in the fa2 kernel).
  auto out_inv = [&](float row_d) { return output_factor<FP8>(row_d, p); };
  if constexpr (SPLIT) {
    if (p.num_chunks > 1) {  // a partial state: float rows (chunk * qo_len + token, head), merged afterwards
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row >= rows_here) continue;
        store_partial_row<16, D>(p, packed_row_index(p, chunk * qo_len, pr0 + row, group, kv_head * group),
                                 out_inv(d[r]), lane, o + 2 * r, m[r], d[r], scl);
      }
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    stage_o_row<16, DTypeO>(out_inv(d[r]), row0 + 8 * r, lane, o + 2 * r,
                            [&](int row, int i) { return sq + sm90::tile_offset(row, i, BQ); });
  }
  __syncthreads();
  const int hq0 = kv_head * group;
  store_o_tile<BQ, CH, THREADS, DTypeO>(p, 0, group, hq0, pr0, 0, rows_here, tid, [&](int row, int c) {
    return *reinterpret_cast<const uint4*>(sq + sm90::tile_offset(row, c, BQ));
  });
  if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row < rows_here) p.lse[packed_row_index(p, 0, pr0 + row, group, hq0)] = row_lse(m[r], d[r], scl);
    }
  }
}

// SPLIT: p.num_chunks chunks of p.chunk_size keys, partial states in p.partial_o (num_chunks * qo_len *
// num_qo_heads rows of 128 floats, then as many lse), merged into p.o / p.lse by a second kernel.
template <typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, bool PAGED = false, bool SPLIT = false>
cudaError_t launch_fa3_single_prefill(PrefillParams p, int device, cudaStream_t stream, int* occupancy_only) {
  constexpr auto kernel = fa3_single_prefill_kernel<DTypeQ, DTypeKV, DTypeO, MASK, PAGED, SPLIT>;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  using Tr = Fa3Traits<MASK>;
  constexpr int kSmem = Tr::kSmemBytes + (PAGED ? Tr::kRowsBytes : 0);
  // The setup is done on every call; with occupancy_only, it is all that is done (the CTAs per SM go there).
  cudaError_t err = kernel_occupancy<kernel>(Tr::kThreads, kSmem, device, occupancy_only);
  if (err != cudaSuccess || occupancy_only != nullptr) return err;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || p.num_chunks < 1) return cudaErrorInvalidValue;
  if (!SPLIT && p.num_chunks != 1) return cudaErrorInvalidValue;
  if (PAGED && p.page_size <= 0) return cudaErrorInvalidValue;
  const bool split = SPLIT && p.num_chunks > 1;
  if (split && (p.partial_o == nullptr || p.chunk_size <= 0)) return cudaErrorInvalidValue;
  p.group_size = p.num_qo_heads / p.num_kv_heads;
  p.num_qtiles = ceil_div(p.qo_len * p.group_size, Tr::BQ);
  if (p.num_qtiles == 0) return cudaSuccess;
  if (split) p.partial_lse = p.partial_o + int64_t(p.num_chunks) * p.qo_len * p.num_qo_heads * Tr::kHeadDim;
  kernel<<<dim3(p.num_qtiles, p.num_kv_heads, SPLIT ? p.num_chunks : 1), Tr::kThreads, kSmem, stream>>>(p);
  err = cudaGetLastError();
  if constexpr (SPLIT) {
    if (err == cudaSuccess && split) {
      p.merge = nullptr;
      return launch_prefill_merge<Tr::kHeadDim, DTypeO>(p, p.qo_len, stream);
    }
  }
  return err;
}

}  // namespace flashinfer

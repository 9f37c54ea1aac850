// Prefill attention on tensor cores (FlashAttention-2 style, sm_80+ mma.sync; the "fa2" backend).
//
// A CTA of 4 warps owns a tile of TILE_Q packed query rows of one KV head: with GQA the group_size query
// heads sharing a KV head are packed as rows (packed row r = token r / group, head r % group), so K/V
// are read once per group. Each warp owns 16 * MQ rows. Per KV tile of BK keys:
//   S = Q K^T   mma.m16n8k16, Q and K fragments by ldmatrix from XOR-swizzled shared memory
//   online softmax in fp32, log2 domain (exp2), row stats reduced over the 4 lanes of a quad
//   O += P V    P straight from the S accumulators (C layout == A layout), V by ldmatrix.trans
// K and V are double-buffered with cp.async, in separate commit groups, so the copy of K(n+2) runs under
// P V(n) and the copy of V(n+1) under Q K(n)^T. K/V rows are gathered per token, through a page table
// when PAGED: one kernel serves single requests, ragged batches, paged batches and page_size 1.
// When there are too few query tiles to fill the GPU the KV range is split into chunks; each chunk
// leaves a partial (o, lse) state in a float workspace and a merge kernel combines them.
// The mask, online softmax, Q load and epilogue are shared with the fa3 kernel (prefill_common.cuh).
// fp8 K/V (e4m3, e5m2) stay fp8 in shared memory and the MMA loops convert their fragments in registers (see
// FP8_REG in prefill_tile; with RoPE the tiles are widened to 16 bits in shared memory instead).
#pragma once
#include "flashinfer/attention/mask.cuh"
#include "flashinfer/attention/pos_enc.cuh"
#include "flashinfer/attention/prefill_common.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/smem.cuh"
#include "flashinfer/ptx/math.cuh"
#include "flashinfer/ptx/mma.cuh"

namespace flashinfer {

// Keys per KV tile at head_dim 128. A tuning knob for probes (benchmarks/probe_prefill.py builds variants
// with -DFI_PREFILL_BK128=n). 64 (half the barriers and bookkeeping per key of 32) measured 7% faster on an
// H200 even while it spilled; it fits in 255 registers since the XOR ldmatrix addressing.
#ifndef FI_PREFILL_BK128
#define FI_PREFILL_BK128 64
#endif

template <int HEAD_DIM, int MQ>
struct PrefillTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int TILE_Q = 16 * MQ * kWarps;
  static constexpr int BK = HEAD_DIM >= 256 ? 32 : HEAD_DIM >= 128 ? FI_PREFILL_BK128 : 64;  // keys per KV tile
  static constexpr int CH = HEAD_DIM / 8;                                                    // 16-byte chunks per row
  static constexpr int Q_CHUNKS = TILE_Q * CH;
  static constexpr int KV_CHUNKS = BK * CH;
  // Q, K x2, V x2, then (paged KV) the (page, slot) of each row of two KV tiles. An fp8 KV cache keeps one
  // 16-bit K and V tile and puts its two fp8 staging stages in the second's place (prefill_common.cuh).
  static constexpr int kSmemBytes = (Q_CHUNKS + 4 * KV_CHUNKS) * 16 + 2 * BK * 8;
  static_assert(HEAD_DIM % 64 == 0 && KV_CHUNKS % kThreads == 0 && Q_CHUNKS % kThreads == 0, "bad tile");
};

// Rotates rows [0, ROWS) of a swizzled tile in place (Llama RoPE, element e pairs with e + HEAD_DIM/2);
// row r sits at position pos_of(r). The angle is pos_enc.cuh's rope_cos_sin, as in the decode kernel.
template <int HEAD_DIM, int ROWS, int THREADS, typename T, typename PosFn>
FI_DEVICE void rope_rotate_smem(uint4* tile, const RopeTable& table, PosFn pos_of) {
  constexpr int CH = HEAD_DIM / 8, HALF = CH / 2;
  for (int idx = threadIdx.x; idx < ROWS * HALF; idx += THREADS) {
    const int row = idx / HALF, c = idx % HALF;
    const float pos = float(pos_of(row));
    uint4* pa = tile + swizzle<CH>(row, c);
    uint4* pb = tile + swizzle<CH>(row, c + HALF);
    float x[8], y[8];
    unpack8(*pa, x, T{});
    unpack8(*pb, y, T{});
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float co, s;
      rope_cos_sin(pos, table.hi[c * 8 + i], table.lo[c * 8 + i], co, s);
      const float xr = x[i] * co - y[i] * s;
      y[i] = y[i] * co + x[i] * s;
      x[i] = xr;
    }
    *pa = pack8<T>(x);
    *pb = pack8<T>(y);
  }
}

// Calls f(score, r, key) for every score of this lane's MQ x NT tile of S fragments (m16n8 C layout): r is the
// lane's row of the score (2 mq + e / 2; rows r of a lane are its 2 MQ query rows), key its key (from k0 on).
template <int MQ, int NT, typename F>
FI_DEVICE void for_each_score(float (&s)[MQ][NT][4], int k0, int lane, F&& f) {
#pragma unroll
  for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 2 * mq + e / 2;
        const int key = k0 + j * 8 + 2 * (lane % 4) + (e & 1);
        f(s[mq][j][e], r, key);
      }
}

// One work item: query tile `qtile` of one request against keys [chunk_begin, chunk_end) of KV head kv_head.
// kv_start: the request's first token (contiguous) or first page-table entry (PAGED).
template <int HEAD_DIM, int MQ, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, PosEncoding POS,
          bool WINDOW, bool SOFTCAP, bool FP16QK, bool PAGED, typename Rope>
FI_DEVICE void prefill_tile(const PrefillParams& p, const Rope& rope, uint4* smem, int qo_start, int qo_len,
                            int kv_start, int kv_len, int mask_byte_off, int qtile, int kv_head, int chunk_begin,
                            int chunk_end, int partial_row0) {
  using Tr = PrefillTraits<HEAD_DIM, MQ>;
  constexpr int CH = Tr::CH, BK = Tr::BK, TQ = Tr::TILE_Q, THREADS = Tr::kThreads;
  constexpr int NT_D = HEAD_DIM / 8, KS_D = HEAD_DIM / 16, NT_K = BK / 8, KS_K = BK / 16;
  constexpr bool ROPE = POS == PosEncoding::kRopeLlama;
  constexpr bool ALIBI = POS == PosEncoding::kAlibi;
  constexpr bool LINEAR = !ALIBI && !SOFTCAP;  // logits are a plain scaling of q.k: fold it into exp2
  // fp8 KV. Without RoPE (FP8_REG) K/V stay fp8 in shared memory, double-buffered like 16-bit tiles (in the first
  // half of each stage), and the MMA loops convert their fragments in registers: K by ldmatrix (one 32-bit word of
  // a row is a lane's B fragment of a k16 step, q permuted to match: permute_q_for_fp8), V by 32-bit loads of
  // two key rows merged with a byte permute (the output columns permuted: stage_o_row_fp8). Both products run in
  // float16 (fp8 widens to it exactly with one cvt per pair), so a bfloat16 q is rounded to float16 (exact in
  // its normal range; see permute_q_for_fp8). No extra barrier or shared-memory pass per tile: the previous design,
  // the widening still used with RoPE, copied each tile into a 16-bit tile between two more barriers (18% slower
  // than bf16 on an H200). RoPE rotates the K tile in shared memory, which needs it in 16 bits: FP8_WIDEN lands
  // K/V as fp8 in staging stages and widens them into one 16-bit tile of q's type each (widen_fp8_tile).
  constexpr bool FP8 = is_fp8<DTypeKV>::value;
  constexpr bool FP8_REG = FP8 && !ROPE;
  constexpr bool FP8_WIDEN = FP8 && ROPE;
  using KVT = std::conditional_t<FP8_REG, __half, kv_compute_t<DTypeQ, DTypeKV>>;  // the type of P V's operands
  using QKT = std::conditional_t<FP8_REG, __half, DTypeQ>;                         // ... and of Q K^T's

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int group = p.group_size;
  const int packed_len = qo_len * group;
  const int pr0 = qtile * TQ;
  const int rows_here = min(TQ, packed_len - pr0);
  const int delta = kv_len - qo_len;  // query token i sits at position delta + i
  const int tok_min = pr0 / group, tok_max = (pr0 + rows_here - 1) / group;
  int lo, hi;
  visible_key_range<MASK, WINDOW>(chunk_begin, chunk_end, kv_len, delta, tok_min, tok_max, p.window_left, lo, hi);
  const int num_tiles = hi > lo ? ceil_div(hi - lo, BK) : 0;

  uint4* sq = smem;
  uint4* sk = sq + Tr::Q_CHUNKS;       // 2 stages (FP8_WIDEN: one 16-bit tile, then the two fp8 staging stages)
  uint4* sv = sk + 2 * Tr::KV_CHUNKS;  // 2 stages (FP8_WIDEN: likewise)
  // The stage tile n's math reads (FP8_WIDEN: always the one widened tile), and fp8 staging stage s of K or V.
  auto stage = [](int n) { return FP8_WIDEN ? 0 : (n & 1); };
  auto staging = [&](bool is_v, int s) {
    return reinterpret_cast<uint8_t*>((is_v ? sv : sk) + Tr::KV_CHUNKS) + s * (BK * HEAD_DIM);
  };
  // 32-bit shared-window addresses for ldmatrix (cheaper than generic pointers in the unrolled loops).
  const uint32_t sq_u = smem_addr(sq), sk_u = smem_addr(sk), sv_u = smem_addr(sv);

  // ---- Q tile -> shared memory
  load_q_tile<TQ, CH, THREADS, DTypeQ>(p, qo_start, kv_head, group, pr0, rows_here, tid,
                                       [&](int row, int c) { return sq + swizzle<CH>(row, c); });

  // Paged KV: the (page, slot) of each row, looked up a tile ahead into shared memory (paged_row_ahead).
  int2* s_rows = reinterpret_cast<int2*>(sv + 2 * Tr::KV_CHUNKS);
  auto resolve_rows = [&](int tile) { return paged_row_ahead<PAGED, BK>(p, kv_start, lo, hi, num_tiles, tile, tid); };
  paged_rows_prologue<PAGED, BK>(s_rows, tid, resolve_rows);

  auto load_kv = [&](int tile, bool is_v) {
    // 16-byte chunks per stored row: HEAD_DIM / 8 of 16-bit elements, HEAD_DIM / 16 of fp8 ones.
    constexpr int CHS = FP8 ? HEAD_DIM / 16 : CH;
    constexpr int ROWS_PER_PASS = THREADS / CHS;
    [[maybe_unused]] uint4* dst = (is_v ? sv : sk) + (tile & 1) * Tr::KV_CHUNKS;  // (16-bit, FP8_REG)
    // Recomputed from the (constant-bank) params at each use rather than held in registers.
    const DTypeKV* base =
        static_cast<const DTypeKV*>(is_v ? p.v : p.k) + int64_t(kv_head) * (is_v ? p.v_stride_h : p.k_stride_h);
    const int64_t stride_n = is_v ? p.v_stride_n : p.k_stride_n;
    const int c = tid % CHS;
#pragma unroll
    for (int i = 0; i < BK / ROWS_PER_PASS; ++i) {
      const int row = tid / CHS + i * ROWS_PER_PASS;
      const int t = lo + tile * BK + row;
      bool valid = t < hi;
      int64_t off = 0;
      if constexpr (PAGED) {
        // Without a branch: s_rows holds (0, 0) for the rows from hi on and page -1 for a page outside the cache
        // (paged_row_ahead); either row is zero-filled, never read. (Written as a branch on the page id, ptxas
        // put a branch around every row's copy: +8% instructions in the paged kernel.)
        const int2 ps = s_rows[(tile & 1) * BK + row];
        valid = valid & (ps.x >= 0);
        off = paged_row_offset(make_int2(max(ps.x, 0), ps.y), is_v ? p.v_stride_page : p.k_stride_page, stride_n);
      } else if (valid) {
        off = int64_t(kv_start + t) * stride_n;
      }
      if constexpr (FP8_WIDEN) {
        cp_async_16(staging(is_v, tile & 1) + row * HEAD_DIM + c * 16, base + off + c * 16, valid);
      } else if constexpr (FP8_REG) {
        cp_async_16(reinterpret_cast<uint8_t*>(dst) + fp8_kv_offset<HEAD_DIM>(row, c), base + off + c * 16, valid);
      } else {
        cp_async_16(dst + swizzle<CH>(row, c), base + off + c * 8, valid);
      }
    }
  };
  // FP8_WIDEN: widens staging stage tile & 1 of K or V into its 16-bit tile (the caller's barriers order it).
  auto widen_kv = [&](int tile, bool is_v) {
    if constexpr (FP8_WIDEN) {
      widen_fp8_tile<BK, HEAD_DIM, THREADS, 2, KVT, DTypeKV>(
          staging(is_v, tile & 1), tid, [&](int row, int c) { return (is_v ? sv : sk) + swizzle<CH>(row, c); });
    }
  };

  // Commit groups, in order: Q, K0, V0, K1, then per iteration n: V(n+1), K(n+2) (empty groups keep counts).
  kv_pipeline_prologue(num_tiles, load_kv);

  if constexpr (ROPE) {
    if (num_tiles > 0) {
      cp_async_wait<3>();
      __syncthreads();
      rope_rotate_smem<HEAD_DIM, TQ, THREADS, DTypeQ>(sq, rope, [&](int row) {
        const int pr = pr0 + min(row, rows_here - 1);
        return delta + pr / group;
      });
    }
  }
  if constexpr (FP8_REG) {
    if (num_tiles > 0) {
      cp_async_wait<3>();  // Q landed (K0, V0, K1 may be in flight)
      __syncthreads();
      // In place; the loop's first barrier orders it before the ldmatrix reads.
      permute_q_for_fp8<TQ, CH, THREADS, DTypeQ>(tid, [&](int row, int c) { return sq + swizzle<CH>(row, c); });
    }
  }

  // ---- per-row constants of this thread: rows warp*16*MQ + mq*16 + lane/4 (+8)
  int qpos[2 * MQ], mtoken[2 * MQ];
  float slope[2 * MQ];
#pragma unroll
  for (int r = 0; r < 2 * MQ; ++r) {
    const int row = warp * 16 * MQ + (r / 2) * 16 + lane / 4 + 8 * (r % 2);
    const int pr = pr0 + min(row, rows_here - 1);
    mtoken[r] = pr / group;
    qpos[r] = delta + mtoken[r];
    slope[r] = ALIBI ? alibi_slope(kv_head * group + pr % group, p.num_qo_heads) : 0.f;
  }
  const float scl = LINEAR ? p.sm_scale * kLog2e : 1.f;

  float o[MQ][NT_D][4];
  float m[2 * MQ], d[2 * MQ];
#pragma unroll
  for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
    for (int j = 0; j < NT_D; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mq][j][e] = 0.f;
#pragma unroll
  for (int r = 0; r < 2 * MQ; ++r) {
    m[r] = kNegInf;
    d[r] = 0.f;
  }

  const int q_row_base = warp * 16 * MQ;
  // ldmatrix addresses. Every fragment row offset is a multiple of 8, so a lane's row has row & 7 ==
  // lane & 7, and the swizzle only permutes the low 3 bits of the 16-byte column: with tiles aligned to
  // kRowBytes, 16-byte column 2k + c of the lane's row is (lane part for c) ^ (k << 5). One XOR with an
  // immediate per ldmatrix, instead of a table of per-column offsets held in registers.
  constexpr uint32_t kRowBytes = CH * 16;
  const uint32_t q_addr = sq_u + 16u * swizzle<CH>(q_row_base + lane % 16, lane / 16);
  const uint32_t k_lane = 16u * swizzle<CH>(lane % 8 + 8 * (lane / 16), (lane / 8) % 2);
  const uint32_t v_lane = 16u * swizzle<CH>(lane % 16, lane / 16);
  // FP8_REG: byte offsets in an fp8 tile (fp8_kv_offset: chunk c enters as ^ 16 c, rows r + 8 k as + 8 k rows). K: lane
  // l gives the row of key l of 32 (ldmatrix matrix i = n8 block i). V: keys 2 t and 2 t + 1 (t = lane % 4; keys
  // + 8 are 8 rows further), word lane / 4 of the 32-dim block (chunk 2 J + lane / 16 of the row).
  constexpr uint32_t kRowBytes8 = HEAD_DIM;
  [[maybe_unused]] const uint32_t k8_lane = fp8_kv_offset<HEAD_DIM>(lane, 0);
  [[maybe_unused]] const uint32_t v8_lane0 = fp8_kv_offset<HEAD_DIM>(2 * (lane % 4), lane / 16) + 4 * (lane / 4 % 4);
  [[maybe_unused]] const uint32_t v8_lane1 =
      fp8_kv_offset<HEAD_DIM>(2 * (lane % 4) + 1, lane / 16) + 4 * (lane / 4 % 4);
  for (int n = 0; n < num_tiles; ++n) {
    cp_async_wait<2>();  // K(n) landed (V(n), K(n+1) may be in flight)
    __syncthreads();     // ... for every thread; and everyone is done with V(n-1)'s stage
    if (n + 1 < num_tiles) load_kv(n + 1, true);
    cp_async_commit();
    // Rows of tile n+2 go where tile n's were (its last reader, V(n), was issued before the barrier above);
    // the load is started here and stored after the tile's math, so its latency hides behind it.
    const int2 rows_ahead = resolve_rows(n + 2);
    if constexpr (FP8_WIDEN) {
      widen_kv(n, false);
      __syncthreads();  // K(n)'s 16-bit tile complete for every thread
    }
    uint4* skn = sk + stage(n) * Tr::KV_CHUNKS;
    const int k0 = lo + n * BK;
    if constexpr (ROPE) {
      rope_rotate_smem<HEAD_DIM, BK, THREADS, KVT>(skn, rope, [&](int row) { return k0 + row; });
      __syncthreads();
    }

    // ---- S = Q K^T (fp32 accumulators, or fp16 ones widened afterwards: use_fp16_qk_reduction)
    float s[MQ][NT_K][4];
    uint32_t sh[FP16QK ? MQ : 1][FP16QK ? NT_K : 1][2];
#pragma unroll
    for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
      for (int j = 0; j < NT_K; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mq][j][e] = 0.f;
        if constexpr (FP16QK) sh[mq][j][0] = sh[mq][j][1] = 0u;
      }
    const uint32_t k_addr = sk_u + stage(n) * Tr::KV_CHUNKS * 16 + k_lane;
#pragma unroll
    for (int ks = 0; ks < KS_D; ++ks) {
      uint32_t a[MQ][4];
#pragma unroll
      for (int mq = 0; mq < MQ; ++mq) ldmatrix_x4(a[mq], (q_addr + mq * 16 * kRowBytes) ^ (ks << 5));
      if constexpr (FP8_REG) {
        // Four n8 blocks (32 keys) per ldmatrix: word i is block 4 q4 + i's fragment (dims 16 ks + 4 t .. + 3).
        const uint32_t k8_addr = sk_u + stage(n) * Tr::KV_CHUNKS * 16 + k8_lane;
#pragma unroll
        for (int q4 = 0; q4 < NT_K / 4; ++q4) {
          uint32_t w[4];
          ldmatrix_x4(w, (k8_addr + q4 * 32 * kRowBytes8) ^ (ks << 4));
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t b0, b1;
            fp8x4_to_half2x2(w[i], b0, b1, DTypeKV{});
#pragma unroll
            for (int mq = 0; mq < MQ; ++mq) {
              if constexpr (FP16QK) {
                mma_16816_f16acc(sh[mq][4 * q4 + i], a[mq], b0, b1);
              } else {
                mma_16816<QKT>(s[mq][4 * q4 + i], a[mq], b0, b1);
              }
            }
          }
        }
      } else {
#pragma unroll
        for (int nk = 0; nk < NT_K / 2; ++nk) {
          uint32_t b[4];
          ldmatrix_x4(b, (k_addr + nk * 16 * kRowBytes) ^ (ks << 5));
#pragma unroll
          for (int mq = 0; mq < MQ; ++mq) {
            if constexpr (FP16QK) {
              mma_16816_f16acc(sh[mq][2 * nk], a[mq], b[0], b[1]);
              mma_16816_f16acc(sh[mq][2 * nk + 1], a[mq], b[2], b[3]);
            } else {
              mma_16816<QKT>(s[mq][2 * nk], a[mq], b[0], b[1]);
              mma_16816<QKT>(s[mq][2 * nk + 1], a[mq], b[2], b[3]);
            }
          }
        }
      }
    }
    if constexpr (FP16QK) {
#pragma unroll
      for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
        for (int j = 0; j < NT_K; ++j) {
          const float2 lo2 = unpack2_half(sh[mq][j][0]), hi2 = unpack2_half(sh[mq][j][1]);
          s[mq][j][0] = lo2.x;
          s[mq][j][1] = lo2.y;
          s[mq][j][2] = hi2.x;
          s[mq][j][3] = hi2.y;
        }
    }

    // ---- logit transform and mask
    if constexpr (!LINEAR) {
      for_each_score<MQ, NT_K>(s, k0, lane, [&](float& x, int r, int key) {
        x = transform_logit<ALIBI, SOFTCAP>(x * p.sm_scale, slope[r], key - qpos[r], p.logits_soft_cap);
      });
    }
    if (tile_needs_mask<MASK, WINDOW, BK>(k0, hi, delta, tok_min, tok_max, p.window_left)) {
      for_each_score<MQ, NT_K>(s, k0, lane, [&](float& x, int r, int key) {
        if (!key_visible<MASK, WINDOW>(key, hi, mtoken[r], qpos[r], p.window_left,
                                       CustomMask{p.mask, mask_byte_off, kv_len})) {
          x = kNegInf;
        }
      });
    }

    // ---- online softmax (log2 domain; the row's 4 lanes hold its columns)
    float corr[2 * MQ];
    bool max_moved = false;
#pragma unroll
    for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        corr[2 * mq + h] = online_softmax_row<NT_K>(m[2 * mq + h], d[2 * mq + h], scl, max_moved,
                                                    [&](int j, int e) -> float& { return s[mq][j][2 * h + e]; });
      }
    // Past the first tiles a row's max rarely moves: skip the rescale of O (a third of the non-MMA work of a
    // tile) when no row of the warp moved (corr is then exactly 1).
    if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
      for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
        for (int j = 0; j < NT_D; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mq][j][e] *= corr[2 * mq + e / 2];
    }

    uint32_t pa[MQ][KS_K][4];
#pragma unroll
    for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
      for (int kk = 0; kk < KS_K; ++kk) {
        pa[mq][kk][0] = pack2<KVT>(s[mq][2 * kk][0], s[mq][2 * kk][1]);
        pa[mq][kk][1] = pack2<KVT>(s[mq][2 * kk][2], s[mq][2 * kk][3]);
        pa[mq][kk][2] = pack2<KVT>(s[mq][2 * kk + 1][0], s[mq][2 * kk + 1][1]);
        pa[mq][kk][3] = pack2<KVT>(s[mq][2 * kk + 1][2], s[mq][2 * kk + 1][3]);
      }

    if (PAGED && tid < BK) s_rows[(n & 1) * BK + tid] = rows_ahead;
    cp_async_wait<2>();  // V(n) landed (K(n+1), V(n+1) may be in flight)
    __syncthreads();     // ... for every thread; and everyone is done with K(n)'s stage
    if (n + 2 < num_tiles) load_kv(n + 2, false);
    cp_async_commit();
    if constexpr (FP8_WIDEN) {
      widen_kv(n, true);
      __syncthreads();  // V(n)'s 16-bit tile complete for every thread
    }

    // ---- O += P V
    if constexpr (FP8_REG) {
      // Per 16 keys and 32-dim block J: this lane's 4 dims of keys 2 t, 2 t + 1 (va, vb) and + 8 (vc, vd);
      // byte-interleaved, a pair of keys at one dim is one B register (n8 block 4 J + i: dim 32 J + 4 g + i).
      const uint32_t v8_stage = sv_u + stage(n) * Tr::KV_CHUNKS * 16;
#pragma unroll
      for (int kk = 0; kk < KS_K; ++kk)
#pragma unroll
        for (int J = 0; J < HEAD_DIM / 32; ++J) {
          const uint32_t x0 = (v8_stage + v8_lane0 + kk * 16 * kRowBytes8) ^ (J << 5);
          const uint32_t x1 = (v8_stage + v8_lane1 + kk * 16 * kRowBytes8) ^ (J << 5);
          const uint32_t va = ld_shared_u32(x0), vb = ld_shared_u32(x1);
          const uint32_t vc = ld_shared_u32(x0 + 8 * kRowBytes8), vd = ld_shared_u32(x1 + 8 * kRowBytes8);
          uint32_t b0[4], b1[4];
          fp8x4_to_half2x2(__byte_perm(va, vb, 0x5140), b0[0], b0[1], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(va, vb, 0x7362), b0[2], b0[3], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(vc, vd, 0x5140), b1[0], b1[1], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(vc, vd, 0x7362), b1[2], b1[3], DTypeKV{});
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int mq = 0; mq < MQ; ++mq) mma_16816<KVT>(o[mq][4 * J + i], pa[mq][kk], b0[i], b1[i]);
        }
    } else {
      const uint32_t v_addr = sv_u + stage(n) * Tr::KV_CHUNKS * 16 + v_lane;
#pragma unroll
      for (int kk = 0; kk < KS_K; ++kk)
#pragma unroll
        for (int nd = 0; nd < NT_D / 2; ++nd) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, (v_addr + kk * 16 * kRowBytes) ^ (nd << 5));
#pragma unroll
          for (int mq = 0; mq < MQ; ++mq) {
            mma_16816<KVT>(o[mq][2 * nd], pa[mq][kk], b[0], b[1]);
            mma_16816<KVT>(o[mq][2 * nd + 1], pa[mq][kk], b[2], b[3]);
          }
        }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all reads of Q (and RoPE writes) done before Q's rows are reused for staging

  // ---- epilogue
#pragma unroll
  for (int r = 0; r < 2 * MQ; ++r) d[r] = quad_sum(d[r]);
  const int hq0 = kv_head * group;
  auto out_inv = [&](float row_d) { return output_factor<FP8>(row_d, p); };
  if (partial_row0 < 0) {
    // Stage this warp's rows in its own Q rows (as DTypeO), then write 16-byte chunks.
#pragma unroll
    for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (FP8_REG) {
          stage_o_row_fp8<NT_D, DTypeO>(out_inv(d[2 * mq + h]), q_row_base + mq * 16 + lane / 4 + 8 * h, lane,
                                        &o[mq][0][2 * h], [&](int row, int j) { return sq + swizzle<CH>(row, j); });
        } else {
          stage_o_row<NT_D, DTypeO>(out_inv(d[2 * mq + h]), q_row_base + mq * 16 + lane / 4 + 8 * h, lane,
                                    &o[mq][0][2 * h], [&](int row, int j) { return sq + swizzle<CH>(row, j); });
        }
      }
    __syncwarp();
    store_o_tile<16 * MQ, CH, 32, DTypeO>(p, qo_start, group, hq0, pr0, q_row_base, rows_here, lane,
                                          [&](int row, int c) { return sq[swizzle<CH>(row, c)]; });
    if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
      for (int r = 0; r < 2 * MQ; ++r) {
        const int row = q_row_base + (r / 2) * 16 + lane / 4 + 8 * (r % 2);
        if (row < rows_here) {
          const int pr = pr0 + row;
          p.lse[packed_row_index(p, qo_start, pr, group, hq0)] = row_lse(m[r], d[r], scl);
        }
      }
    }
  } else {
#pragma unroll
    for (int mq = 0; mq < MQ; ++mq)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 2 * mq + h;
        const int row = q_row_base + mq * 16 + lane / 4 + 8 * h;
        if (row >= rows_here) continue;
        if constexpr (FP8_REG) {
          store_partial_row_fp8<NT_D, HEAD_DIM>(p, packed_row_index(p, partial_row0, pr0 + row, group, hq0),
                                                out_inv(d[r]), lane, &o[mq][0][2 * h], m[r], d[r], scl);
        } else {
          store_partial_row<NT_D, HEAD_DIM>(p, packed_row_index(p, partial_row0, pr0 + row, group, hq0), out_inv(d[r]),
                                            lane, &o[mq][0][2 * h], m[r], d[r], scl);
        }
      }
  }
}

// Single request: grid (query tiles, KV heads, KV chunks); the heaviest (last, for causal) tiles first.
template <int HEAD_DIM, int MQ, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, PosEncoding POS,
          bool WINDOW, bool SOFTCAP, bool FP16QK>
__global__ void __launch_bounds__(PrefillTraits<HEAD_DIM, MQ>::kThreads)
    single_prefill_kernel(const __grid_constant__ PrefillParams p, const __grid_constant__ RopeTableFor<POS> rope) {
  extern __shared__ __align__(1024) uint4 smem[];  // tiles kRowBytes-aligned (ldmatrix addressing)
  const int qtile = p.num_qtiles - 1 - blockIdx.x;
  const int chunk = blockIdx.z;
  const int chunk_begin = chunk * p.chunk_size;
  prefill_tile<HEAD_DIM, MQ, DTypeQ, DTypeKV, DTypeO, MASK, POS, WINDOW, SOFTCAP, FP16QK, false>(
      p, rope, smem, 0, p.qo_len, 0, p.kv_len, 0, qtile, blockIdx.y, chunk_begin, chunk_begin + p.chunk_size,
      p.num_chunks > 1 ? chunk * p.qo_len : -1);
}

// Batch: the grid (x) per KV head (y) takes the plan's work items; their count is read from device memory,
// so one captured launch serves every later plan of the same wrapper (CUDA graphs). 64-row tiles walk the
// items as a persistent grid (graph mode's grid is fixed at capture); 128-row tiles take one item per CTA
// (grid = the plan's item count, never graph mode): the persistent loop's state does not fit in registers
// beside their accumulators (it spilled 400-540 bytes at head_dim 128).
template <int HEAD_DIM, int MQ, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, PosEncoding POS,
          bool WINDOW, bool SOFTCAP, bool FP16QK, bool PAGED>
__global__ void __launch_bounds__(PrefillTraits<HEAD_DIM, MQ>::kThreads)
    batch_prefill_kernel(const __grid_constant__ PrefillParams p, const __grid_constant__ RopeTableFor<POS> rope) {
  extern __shared__ __align__(1024) uint4 smem[];  // tiles kRowBytes-aligned (ldmatrix addressing)
  // May be launched with programmatic dependent launch (run(enable_pdl=True)): waits for the previous kernel
  // before reading what it wrote; a no-op otherwise.
  grid_dependency_chain();
  const int num_work = *p.num_work;
  const int cap = p.work_capacity;
  auto run_item = [&](int w) {
    const int req = p.work[w], qtile = p.work[cap + w];
    const int kv_begin = p.work[2 * cap + w], kv_end = p.work[3 * cap + w], prow = p.work[4 * cap + w];
    const int qo_start = p.qo_indptr[req], qo_len = p.qo_indptr[req + 1] - qo_start;
    const int kv_start = p.kv_indptr[req];
    int kv_len = p.kv_indptr[req + 1] - kv_start;
    if constexpr (PAGED) kv_len = paged_kv_len(kv_len, p.page_size, p.kv_last_page_len[req]);
    const int mask_off = MASK == MaskMode::kCustom ? p.mask_indptr[req] : 0;
    prefill_tile<HEAD_DIM, MQ, DTypeQ, DTypeKV, DTypeO, MASK, POS, WINDOW, SOFTCAP, FP16QK, PAGED>(
        p, rope, smem, qo_start, qo_len, kv_start, kv_len, mask_off, qtile, blockIdx.y, kv_begin, kv_end, prow);
  };
  if constexpr (MQ == 1) {
    for (int w = blockIdx.x; w < num_work; w += gridDim.x) {
      run_item(w);
      __syncthreads();  // the next item refills shared memory
    }
  } else if (blockIdx.x < num_work) {
    run_item(blockIdx.x);
  }
}

// ------------------------------------------------------------------------------------------- host side

template <int HEAD_DIM, int MQ, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, PosEncoding POS,
          bool WINDOW, bool SOFTCAP, bool FP16QK>
cudaError_t launch_single_prefill(PrefillParams p, int device, cudaStream_t stream, int* occupancy_only) {
  using Tr = PrefillTraits<HEAD_DIM, MQ>;
  constexpr auto kernel =
      single_prefill_kernel<HEAD_DIM, MQ, DTypeQ, DTypeKV, DTypeO, MASK, POS, WINDOW, SOFTCAP, FP16QK>;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  // The setup is done on every call; with occupancy_only, it is all that is done (the CTAs per SM go there).
  cudaError_t err = kernel_occupancy<kernel>(Tr::kThreads, Tr::kSmemBytes, device, occupancy_only);
  if (err != cudaSuccess || occupancy_only != nullptr) return err;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || p.num_chunks <= 0) return cudaErrorInvalidValue;
  p.group_size = p.num_qo_heads / p.num_kv_heads;
  p.num_qtiles = ceil_div(p.qo_len * p.group_size, Tr::TILE_Q);
  if (p.num_qtiles == 0) return cudaSuccess;
  if (p.num_chunks > 1) p.partial_lse = p.partial_o + int64_t(p.num_chunks) * p.qo_len * p.num_qo_heads * HEAD_DIM;
  dim3 grid(p.num_qtiles, p.num_kv_heads, p.num_chunks);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, make_rope_table<POS>(HEAD_DIM, p.rope_scale, p.rope_theta));
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_chunks == 1) return err;
  p.merge = nullptr;
  return launch_prefill_merge<HEAD_DIM, DTypeO>(p, p.qo_len, stream);
}

template <int HEAD_DIM, int MQ, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, PosEncoding POS,
          bool WINDOW, bool SOFTCAP, bool FP16QK, bool PAGED>
cudaError_t launch_batch_prefill(PrefillParams p, int grid_x, int merge_grid_x, int device, cudaStream_t stream,
                                 bool pdl, int* occupancy_only) {
  using Tr = PrefillTraits<HEAD_DIM, MQ>;
  constexpr auto kernel =
      batch_prefill_kernel<HEAD_DIM, MQ, DTypeQ, DTypeKV, DTypeO, MASK, POS, WINDOW, SOFTCAP, FP16QK, PAGED>;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  // The setup is done on every call; with occupancy_only, it is all that is done (the CTAs per SM go there).
  cudaError_t err = kernel_occupancy<kernel>(Tr::kThreads, Tr::kSmemBytes, device, occupancy_only);
  if (err != cudaSuccess || occupancy_only != nullptr) return err;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0) return cudaErrorInvalidValue;
  p.group_size = p.num_qo_heads / p.num_kv_heads;
  if (grid_x > 0) {
    err = launch_kernel(kernel, dim3(grid_x, p.num_kv_heads), dim3(Tr::kThreads), Tr::kSmemBytes, stream, pdl, p,
                        make_rope_table<POS>(HEAD_DIM, p.rope_scale, p.rope_theta));
    if (err != cudaSuccess) return err;
  }
  return launch_prefill_merge<HEAD_DIM, DTypeO>(p, merge_grid_x, stream, pdl);
}

}  // namespace flashinfer

// Decode attention: one query token per head against a long KV sequence.
//
// Memory bound: every key and value is read once, with 16-byte cp.async copies into a STAGES-deep
// shared-memory ring. The KV cache is 16-bit (the dtype of q) or fp8 (e4m3/e5m2): fp8 rows are half the bytes
// of the same tokens, copied with the same 16-byte copies and converted to float16 as they are used. A CTA serves one
// KV head and up to GT query heads of its GQA group, so K/V are read once for the whole group. Long sequences are split
// into chunks across CTAs so that even one request fills every SM; each CTA then leaves a partial (o, lse) state and a
// second kernel (launched with programmatic dependent launch, so its launch overlaps the first) merges them.
//
// decode_piece() is the whole of a CTA's work on one key range of one request; the single-request
// kernel here and the paged batch kernel (batch_decode.cuh) differ only in how they pick their pieces
// and in how a key's row is found (a KV "rows" source: contiguous here, through the page table there).
#pragma once
#include "flashinfer/attention/pos_enc.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/smem.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"
#include "flashinfer/ptx/math.cuh"
#include "flashinfer/ptx/mma.cuh"

#include <type_traits>

namespace flashinfer {

// Per-call scalars of a decode launch. Kernels take them by reference into their __grid_constant__
// parameters, so that they are read from parameter space where used instead of held in registers.
struct DecodeScalars {
  int num_qo_heads;  // for the ALiBi slopes
  float sm_scale, logits_soft_cap, v_scale;
};

struct SingleDecodeParams {
  const void* q;  // [num_qo_heads, HEAD_DIM], row stride q_stride_h
  const void* k;  // token n, head h at k + n * k_stride_n + h * k_stride_h (elements)
  const void* v;
  void* o;             // [num_qo_heads, HEAD_DIM] contiguous
  float* lse;          // [num_qo_heads] or nullptr
  float* partial_o;    // [num_chunks, num_qo_heads, HEAD_DIM] when num_chunks > 1
  float* partial_lse;  // [num_chunks, num_qo_heads]
  DecodeScalars sc;
  int num_kv_heads, kv_len;
  int64_t q_stride_h, k_stride_n, k_stride_h, v_stride_n, v_stride_h;
  int window_left;
  float rope_scale, rope_theta;
  // Filled in by the launcher.
  int group_size, head_tiles, kv_begin, chunk_size, num_chunks;
};

// Depth of the K/V ring. A tuning knob for probes (benchmarks/probe_decode_chunks.py builds variants with
// -DFI_DECODE_STAGES=n); the default is the measured best.
#ifndef FI_DECODE_STAGES
#define FI_DECODE_STAGES 3
#endif

// A stage holds 8 KB of K and 8 KB of V of a 16-bit cache. The tensor-core tiles (MMA) of an fp8 cache take the
// same bytes, i.e. twice the tokens: the work per tile that does not scale with its bytes (the wait and barrier,
// the online-softmax step and its rescale of the accumulators, the loop) is then paid once per 16 KB as for 16-bit
// K/V, and the ring keeps as many bytes in flight. The CUDA-core tiles of an fp8 cache (RoPE, head_dim 256) are
// bound by their per-key work (rotation, shuffle reductions) and keep the 16-bit token count (half the bytes):
// twice the tokens would double their unrolled loop for little. Their lanes take 8 elements of a row per token
// (half a 16-byte chunk for fp8), so their register budget is the 16-bit tiles'.
template <int HEAD_DIM, typename DTypeKV = __half, bool MMA = false>
struct DecodeTraits {
  static constexpr int kThreads = 128;
  static constexpr int LANES = HEAD_DIM / 8;     // threads sharing one K/V row, 8 elements each
  static constexpr int ROWS = kThreads / LANES;  // rows processed side by side
  static constexpr int TILE = 4096 / HEAD_DIM * (MMA && is_fp8<DTypeKV>::value ? 2 : 1);  // tokens per stage
  static constexpr int TOKENS_PER_ROW = TILE / ROWS;
  static constexpr int STAGES = FI_DECODE_STAGES;
  static constexpr int ROW_CHUNKS = HEAD_DIM * int(sizeof(DTypeKV)) / 16;  // 16-byte chunks of one K/V row
  static constexpr int CHUNK_ELEMS = 16 / int(sizeof(DTypeKV));
  static constexpr int COPIES = TILE * ROW_CHUNKS / kThreads;  // 16-byte copies per thread per stage, K and V each
  static constexpr int kSmemBytes = STAGES * 2 * TILE * ROW_CHUNKS * 16;
  static constexpr int kMinChunk = 256;  // shorter chunks cost more in merging than they gain
  static_assert(HEAD_DIM % 64 == 0 && LANES <= 32 && TOKENS_PER_ROW >= 1, "unsupported head_dim");
  static_assert(TILE * ROW_CHUNKS % kThreads == 0, "tile must split evenly over the threads");
};

// Where 16-byte chunk c of row (token) t of a K or V stage lives, in chunks from the stage's start.
// 16-bit rows (8 chunks and more): the ldmatrix swizzle. fp8 rows (4, 8 or 16 chunks): row after row, the chunks
// of each 128-byte line (one bank sweep) permuted by key(t), chosen for the tensor-core tile's reads:
//   - its K reads (8 consecutive lanes: rows 2j and 2j+1, chunks 4s..4s+3 of each) need the two rows in
//     different halves of the banks: key bit 2 = t bit 0 where a row fills a line (d128; d64 rows share one);
//   - its V reads (lanes of rows e, e+2, e+4, e+6 at one or two columns) need those four rows spread over the
//     banks: key bits 1-2 = t bits 1-2.
// The CUDA-core tile reads whole lines and the copies write whole lines: any permutation within a line suits
// them.
template <typename DTypeKV, int ROW_CHUNKS>
FI_DEVICE int ring_chunk(int t, int c) {
  if constexpr (is_fp8<DTypeKV>::value) {
    const int key = (t & 6) ^ (ROW_CHUNKS >= 8 ? (t & 1) << 2 : 0);
    return (t * ROW_CHUNKS + c) ^ key;
  } else {
    return swizzle<ROW_CHUNKS>(t, c);
  }
}

// Elements [8 * lane, 8 * lane + 8) of ring row t, as floats: a whole chunk (16-bit) or half of one (fp8).
template <typename DTypeKV, int ROW_CHUNKS>
FI_DEVICE void ring_row8(const uint4* stage, int t, int lane, float (&out)[8]) {
  if constexpr (is_fp8<DTypeKV>::value) {
    const uint2* halves = reinterpret_cast<const uint2*>(stage + ring_chunk<DTypeKV, ROW_CHUNKS>(t, lane >> 1));
    unpack8(halves[lane & 1], out, DTypeKV{});
  } else {
    unpack8(stage[ring_chunk<DTypeKV, ROW_CHUNKS>(t, lane)], out, DTypeKV{});
  }
}

// N (2 or 4) consecutive 32-bit words of fp8 ring row t, from word `first` on (within one chunk).
template <int N, typename DTypeKV, int ROW_CHUNKS>
FI_DEVICE void ring_words(const uint4* stage, int t, int first, uint32_t (&w)[N]) {
  static_assert(N == 2 || N == 4, "half a chunk or a whole one");
  const uint4* chunk = stage + ring_chunk<DTypeKV, ROW_CHUNKS>(t, first / 4);
  if constexpr (N == 4) {
    const uint4 x = *chunk;
    w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
  } else {
    const uint2 x = reinterpret_cast<const uint2*>(chunk)[(first / 2) & 1];
    w[0] = x.x, w[1] = x.y;
  }
}

// With 4 or 8 query heads per KV head the CUDA-core dot products cost more than the memory stream,
// so their tile math runs on tensor cores instead: Q.K^T and P.V as mma.sync with the heads as the
// rows of a 16-row tile (the other rows are zero). An fp8 cache halves the bytes per key while the CUDA-core
// work per key grows (every element is widened to float first), so there tiles of 1 and 2 heads run on tensor
// cores too: the instructions per key then hardly depend on the heads (a few conversions per pair of elements
// instead of a conversion and an FMA per element and head, and no shuffle reduction per key). RoPE, which
// rotates every key, and head_dim 256, whose accumulators would not fit, stay on CUDA cores.
template <int HEAD_DIM, int GT, typename DTypeKV, PosEncoding POS>
__host__ __device__ constexpr bool decode_uses_mma() {
  return GT >= (is_fp8<DTypeKV>::value ? 1 : 4) && HEAD_DIM <= 128 && POS != PosEncoding::kRopeLlama;
}

// Four CTAs per SM (16 warps) hide the latency of the shuffle chains; wider CUDA-core tiles need more
// registers per thread.
template <int HEAD_DIM, int GT, typename DTypeKV, PosEncoding POS>
__host__ __device__ constexpr int decode_min_blocks() {
  if (decode_uses_mma<HEAD_DIM, GT, DTypeKV, POS>()) return 4;
  return GT >= 8 ? 2 : (GT >= 4 && (POS == PosEncoding::kRopeLlama || HEAD_DIM >= 256) ? 3 : 4);
}

// Dynamic shared memory of a decode CTA: the K/V ring, then (CUDA-core tiles of 4+ heads) the
// probabilities of a tile; after the loop the partial states of the row groups (or warps) reuse it, which can
// take more than an fp8 ring.
template <int HEAD_DIM, int GT, typename DTypeKV, PosEncoding POS>
__host__ __device__ constexpr int decode_smem_bytes() {
  constexpr bool MMA = decode_uses_mma<HEAD_DIM, GT, DTypeKV, POS>();
  using T = DecodeTraits<HEAD_DIM, DTypeKV, MMA>;
  constexpr int states = MMA ? T::kThreads / 32 : T::ROWS;
  constexpr int ring = T::kSmemBytes + T::ROWS * T::TOKENS_PER_ROW * GT * int(sizeof(float));
  constexpr int scratch = (2 * states * GT + states * GT * HEAD_DIM) * int(sizeof(float));
  return ring > scratch ? ring : scratch;
}

// Query heads per CTA for a GQA group: groups of 8, 16, ... take tiles of 8 heads, other groups of 3+
// tiles of 4. Tiles of one KV head run side by side but do not reliably share K/V through L2
// (measured: two 4-head tiles read HBM twice), so large tiles win despite fewer resident CTAs.
__host__ __device__ constexpr int decode_head_tile(int group_size) {
  return group_size == 1 ? 1 : group_size == 2 ? 2 : group_size % 8 == 0 ? 8 : 4;
}

// Keys of one KV head stored contiguously with a token stride (NHD or HND tensors, or views). A KV "rows" source
// gives a token's K and V row offsets (offsets(); false: the row reads as zeros) and says whether they are one
// (kSameKV). Only the head index is held; the rest is read from the kernel's __grid_constant__ parameters where used,
// which keeps the register budget of the 4-CTAs-per-SM tile loops.
template <typename DTypeKV>
struct ContiguousRows {
  static constexpr bool kSameKV = false;  // K and V have strides of their own
  const SingleDecodeParams& p;
  int kv_head;
  FI_DEVICE const DTypeKV* k() const { return static_cast<const DTypeKV*>(p.k) + kv_head * p.k_stride_h; }
  FI_DEVICE const DTypeKV* v() const { return static_cast<const DTypeKV*>(p.v) + kv_head * p.v_stride_h; }
  FI_DEVICE bool offsets(int token, int64_t& off_k, int64_t& off_v) const {
    off_k = token * p.k_stride_n;
    off_v = token * p.v_stride_n;
    return true;
  }
};

// One CTA's piece of work: query heads [first_head, first_head + heads_here) of one request (a tile of GT
// slots), keys [begin, end) of it. Where the result goes is the caller's `store` functor's business: it
// is called once per (head j of the tile, 8 columns) at the end, so that output pointers need not stay
// live in registers through the loop.
template <typename DTypeQ>
struct DecodePiece {
  const DTypeQ* q;  // head first_head of the request
  int64_t q_stride_h;
  int first_head, heads_here;
  int begin, end, q_pos;  // q_pos: the query's position (kv_len - 1)

  // The heads of query-head tile `head_tile` (GT slots, from head first_head_ on) of a KV head's group of
  // group_size heads; q_request: head 0 of the request's query.
  template <int GT>
  FI_DEVICE void set_heads(const DTypeQ* q_request, int64_t q_stride_h_, int first_head_, int group_size,
                           int head_tile) {
    first_head = first_head_;
    q = q_request + first_head * q_stride_h_;
    q_stride_h = q_stride_h_;
    heads_here = min(GT, group_size - head_tile * GT);
  }
};

// The fastest-varying part of a CTA's block index (and the rest, left in bid): the query-head tile varies
// fastest so that the CTAs reading the same K/V run together.
FI_DEVICE int take_block_index(int& bid, int n) {
  const int part = bid % n;
  bid /= n;
  return part;
}

// Writes a finished (o, lse) of head j, columns [col, col + 8): to the output (scaled by v_scale) or as
// a partial state (o normalised, merged later by merge_states_block).
template <int HEAD_DIM, typename DTypeO>
FI_DEVICE void store_decode_state(float (&acc)[8], float d_all, float lse, float v_scale, int col, DTypeO* o,
                                  float* lse_out, float* partial_o, float* partial_lse) {
  // d_all == 0: the piece saw no key (an empty request, or keys all outside a window): o 0, lse -inf.
  if (partial_o == nullptr) {
    const float scale = v_scale * inverse_or_zero(d_all);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= scale;
    *reinterpret_cast<uint4*>(o + col) = pack8<DTypeO>(acc);
    if (lse_out != nullptr && col == 0) *lse_out = lse;
  } else {
    const float inv_d = inverse_or_zero(d_all);
    float4* dst = reinterpret_cast<float4*>(partial_o + col);
    dst[0] = make_float4(acc[0] * inv_d, acc[1] * inv_d, acc[2] * inv_d, acc[3] * inv_d);
    dst[1] = make_float4(acc[4] * inv_d, acc[5] * inv_d, acc[6] * inv_d, acc[7] * inv_d);
    if (col == 0) *partial_lse = lse;
  }
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, PosEncoding POS, bool SOFTCAP,
          typename Rows, typename Store>
FI_DEVICE void decode_piece(const Rows& rows, const DecodePiece<DTypeQ>& w, const DecodeScalars& sc,
                            const RopeTableFor<POS>& rope, uint8_t* smem_raw, const Store& store) {
  constexpr bool MMA = decode_uses_mma<HEAD_DIM, GT, DTypeKV, POS>();
  using T = DecodeTraits<HEAD_DIM, DTypeKV, MMA>;
  constexpr int LANES = T::LANES, ROWS = T::ROWS, TILE = T::TILE, TPR = T::TOKENS_PER_ROW, STAGES = T::STAGES;
  constexpr int RC = T::ROW_CHUNKS;
  constexpr bool FP8 = is_fp8<DTypeKV>::value;
  constexpr bool ROPE = POS == PosEncoding::kRopeLlama;
  constexpr bool ALIBI = POS == PosEncoding::kAlibi;
  constexpr int WARPS = T::kThreads / 32;
  // Partial softmax states left per head at the end: one per row group (CUDA cores) or warp (MMA).
  constexpr int NSTATES = MMA ? WARPS : ROWS;
  // [STAGES][K|V][TILE][RC] x 16 bytes; chunk c of token t stored at ring_chunk(t, c), so that the rows a
  // tensor-core fragment reads at one column fall into different bank groups.
  uint4* smem = reinterpret_cast<uint4*>(smem_raw);
  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
  const int heads_here = w.heads_here, q_pos = w.q_pos, chunk_begin = w.begin, chunk_end = w.end;
  const int num_tiles = ceil_div(chunk_end - chunk_begin, TILE);

  // In the fp8 tensor-core tiles (half the bytes per key of a 16-bit tile) finding the rows is a large share of
  // the loop (64-bit address arithmetic per copy, and a page table's dependent load), so the RC consecutive lanes
  // copying one row share that work: lane j of the group finds the row of its copy j, the others take the offsets
  // by shuffle (one for K and V where they share it, Rows::kSameKV). The other tiles find every copy's row
  // themselves (their machine code as measured).
  constexpr bool SHARE_LOOKUP = FP8 && MMA;
  auto load_tile = [&](int tile) {
    uint4* sk = smem + (tile % STAGES) * 2 * TILE * RC;
    uint4* sv = sk + TILE * RC;
    if constexpr (SHARE_LOOKUP) {
      static_assert(T::COPIES <= RC && 32 % RC == 0, "a row's lanes hold one lookup per copy, within a warp");
      const int c = threadIdx.x % RC;         // this lane's chunk of every row it copies
      const int lead = threadIdx.x % 32 - c;  // the group's first lane
      int64_t mine_k = 0, mine_v = 0;         // row 0 keeps the address in bounds when zero-filling
      int mine_valid = 0;
      if (c < T::COPIES) {
        const int token = chunk_begin + tile * TILE + (threadIdx.x - c + c * T::kThreads) / RC;
        mine_valid = token < chunk_end && rows.offsets(token, mine_k, mine_v);
      }
#pragma unroll
      for (int it = 0; it < T::COPIES; ++it) {
        const int t = (threadIdx.x + it * T::kThreads) / RC;
        const int64_t off_k = __shfl_sync(0xffffffffu, mine_k, lead + it);
        const int64_t off_v = Rows::kSameKV ? off_k : __shfl_sync(0xffffffffu, mine_v, lead + it);
        const bool valid = __shfl_sync(0xffffffffu, mine_valid, lead + it) != 0;
        cp_async_16(sk + ring_chunk<DTypeKV, RC>(t, c), rows.k() + off_k + c * T::CHUNK_ELEMS, valid);
        cp_async_16(sv + ring_chunk<DTypeKV, RC>(t, c), rows.v() + off_v + c * T::CHUNK_ELEMS, valid);
      }
    } else {
#pragma unroll
      for (int it = 0; it < T::COPIES; ++it) {
        const int idx = threadIdx.x + it * T::kThreads;
        const int t = idx / RC, c = idx % RC;
        const int token = chunk_begin + tile * TILE + t;
        int64_t off_k = 0, off_v = 0;  // row 0 keeps the address in bounds when zero-filling
        const bool valid = token < chunk_end && rows.offsets(token, off_k, off_v);
        cp_async_16(sk + ring_chunk<DTypeKV, RC>(t, c), rows.k() + off_k + c * T::CHUNK_ELEMS, valid);
        cp_async_16(sv + ring_chunk<DTypeKV, RC>(t, c), rows.v() + off_v + c * T::CHUNK_ELEMS, valid);
      }
    }
  };

  // Start the K/V stream before anything else: loading q first would cost a memory round trip.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();
  }

  float* s_m = reinterpret_cast<float*>(smem_raw);  // [NSTATES][GT], reusing the ring after the loop
  float* s_d = s_m + NSTATES * GT;                  // [NSTATES][GT]
  float* s_o = s_d + NSTATES * GT;                  // [NSTATES][GT][HEAD_DIM]
  static_assert((2 * NSTATES * GT + NSTATES * GT * HEAD_DIM) * 4 <= decode_smem_bytes<HEAD_DIM, GT, DTypeKV, POS>(),
                "merge scratch exceeds the shared memory");

  if constexpr (MMA && FP8) {
    // ---- tensor cores, fp8 K/V: warp w takes WTOK consecutive tokens of each tile ----
    // fp8 K/V enter the products as float16 (exact), so q and the probabilities do too. The scores are computed
    // transposed, S^T = K Q^T (m16n8k16: 16 keys x 8 heads), so that every row of a fragment is a real key (no
    // zero rows of padding heads, half the mma of Q K^T at 8 heads or fewer), and P.V likewise,
    // O^T = V^T P^T (16 dims x 8 heads per tile, k16 = the same 16 keys). Lane (g, t) holds the scores of keys g
    // and g+8 for heads 2t and 2t+1, so a head's softmax reduces over the 8 lanes of one t (xor 4, 8, 16) and
    // its rescale factor is at hand for its output columns (heads 2t, 2t+1 as well). movmatrix turns the
    // probabilities' C fragment (key rows) into P^T's B fragment (head rows). The fragments are read with plain
    // shared-memory loads in orders that suit one-byte elements (ldmatrix moves 16-bit ones):
    //   Q.K^T sums over head_dim in any order, so k16 step 4s + i takes, from lane (g, t), dims 64s + 16t + 4i
    //   .. +3 of keys g and g+8 (one 32-bit word of a 16-byte load each: a0/a1 = its dims 0-1, a2/a3 = 2-3) and
    //   q's same dims (b0, b1);
    //   P.V^T needs pairs of keys per register: lane (g, t) loads dims [g, g + 1) * HEAD_DIM / 8 of keys 2t,
    //   2t+1 (and 8 on) and interleaves their bytes (prmt), so that row g of output m-tile mt is dim
    //   g * HEAD_DIM / 8 + 2mt and row g+8 the next dim.
    constexpr int WTOK = TILE / WARPS;  // 16 (d128) or 32 (d64)
    constexpr int MK = WTOK / 16;       // m16 tiles of keys per warp and tile
    constexpr int KS = HEAD_DIM / 16;   // k16 steps of K Q^T
    constexpr int MT = HEAD_DIM / 16;   // m16 tiles of the transposed output
    constexpr int VW = HEAD_DIM / 32;   // 32-bit words of V per key and lane (the lane's HEAD_DIM / 8 dims)
    static_assert(WTOK % 16 == 0 && KS % 4 == 0, "a warp takes whole m16 key tiles; a K load covers 64 columns");
    const int g = warp_lane / 4, t4 = warp_lane % 4;  // fragment row (key; head of q's and P's B fragments), pair
    // ALiBi slopes of heads 2t and 2t+1 (this lane's score and output columns).
    float slope[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      slope[i] = ALIBI ? alibi_slope(w.first_head + min(2 * t4 + i, heads_here - 1), sc.num_qo_heads) : 0.f;
    }

    // q^T as the B operand, unscaled (a bfloat16 q is rounded to float16, exact for |q| in [2^-14, 65504], larger
    // magnitudes clamped): b0 = dims c0, c0+1 of head g, b1 = c0+2, c0+3; heads beyond the tile's are zero.
    uint32_t qb[KS][2];
    {
      const bool real_head = g < heads_here;
      const DTypeQ* qh = w.q + min(g, heads_here - 1) * w.q_stride_h;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int c0 = 64 * (ks / 4) + 16 * t4 + 4 * (ks % 4);
        qb[ks][0] = real_head ? pack2_half_clamped(to_float(qh[c0]), to_float(qh[c0 + 1])) : 0u;
        qb[ks][1] = real_head ? pack2_half_clamped(to_float(qh[c0 + 2]), to_float(qh[c0 + 3])) : 0u;
      }
    }

    // Heads 2t and 2t+1: m, d (d sums only this lane's keys until the end), and o: o[mt][0|1] = row g (heads
    // 2t, 2t+1), o[mt][2|3] = row g+8.
    float m[2] = {kNegInf, kNegInf}, d[2] = {0.f, 0.f};
    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

    for (int tile = 0; tile < num_tiles; ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1);
      cp_async_commit();
      const uint4* sk = smem + (tile % STAGES) * 2 * TILE * RC;
      const uint4* sv = sk + TILE * RC;
      const int tok0 = warp * WTOK;  // first token of this warp within the tile

      float st[MK][4];  // S^T of key tile mk: (key g, heads 2t, 2t+1), (key g+8, heads 2t, 2t+1)
#pragma unroll
      for (int mk = 0; mk < MK; ++mk) {
        st[mk][0] = st[mk][1] = st[mk][2] = st[mk][3] = 0.f;
#pragma unroll
        for (int s4 = 0; s4 < KS / 4; ++s4) {
          uint32_t k0[4], k8[4];  // dims 64*s4 + 16*t4 .. +15 of keys g and g+8
          ring_words<4, DTypeKV, RC>(sk, tok0 + mk * 16 + g, 4 * (4 * s4 + t4), k0);
          ring_words<4, DTypeKV, RC>(sk, tok0 + mk * 16 + g + 8, 4 * (4 * s4 + t4), k8);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t a[4];
            fp8x4_to_half2x2(k0[i], a[0], a[2], DTypeKV{});
            fp8x4_to_half2x2(k8[i], a[1], a[3], DTypeKV{});
            mma_16816<__half>(st[mk], a, qb[4 * s4 + i][0], qb[4 * s4 + i][1]);
          }
        }
      }

#pragma unroll
      for (int mk = 0; mk < MK; ++mk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int token = chunk_begin + tile * TILE + tok0 + mk * 16 + g + (r >= 2 ? 8 : 0);
          const float x =
              transform_logit<ALIBI, SOFTCAP>(st[mk][r] * sc.sm_scale, slope[r & 1], token - q_pos, sc.logits_soft_cap);
          st[mk][r] = token < chunk_end ? x : kNegInf;
        }
      }
      // Logits are already in the log2 domain (scl 1); a warp may see only padding in a short chunk. Head 2t+i's
      // scores of this lane: st[mk][i] and st[mk][2 + i], the rest in the lanes of the other rows g.
      bool moved = false;
      float corr[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        corr[i] = online_softmax_row<MK, 2, 8, 4>(m[i], d[i], 1.f, moved,
                                                  [&](int mk, int e) -> float& { return st[mk][2 * e + i]; });
      }
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          o[mt][0] *= corr[0], o[mt][1] *= corr[1], o[mt][2] *= corr[0], o[mt][3] *= corr[1];
      }
#pragma unroll
      for (int mk = 0; mk < MK; ++mk) {
        // P^T's B fragment (keys 2t, 2t+1 of head g; b1: keys 8 on), from the C fragment (key g; heads 2t, 2t+1).
        const uint32_t p0 = movmatrix_trans(pack2<__half>(st[mk][0], st[mk][1]));
        const uint32_t p1 = movmatrix_trans(pack2<__half>(st[mk][2], st[mk][3]));
        uint32_t va[VW], vb[VW], vc[VW], vd[VW];  // this lane's dims of keys 2t, 2t+1, 2t+8, 2t+9
        const int key = tok0 + mk * 16 + 2 * t4;
        ring_words<VW, DTypeKV, RC>(sv, key, g * VW, va);
        ring_words<VW, DTypeKV, RC>(sv, key + 1, g * VW, vb);
        ring_words<VW, DTypeKV, RC>(sv, key + 8, g * VW, vc);
        ring_words<VW, DTypeKV, RC>(sv, key + 9, g * VW, vd);
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          // Bytes (key 2t, key 2t+1) of dims 4j, 4j+1 and of dims 4j+2, 4j+3: rows g and g+8 of m-tiles 2j and
          // 2j+1; a0/a1 from keys 2t, 2t+1, a2/a3 from keys 2t+8, 2t+9.
          uint32_t a[4], b[4];
          fp8x4_to_half2x2(__byte_perm(va[j], vb[j], 0x5140), a[0], a[1], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(vc[j], vd[j], 0x5140), a[2], a[3], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(va[j], vb[j], 0x7362), b[0], b[1], DTypeKV{});
          fp8x4_to_half2x2(__byte_perm(vc[j], vd[j], 0x7362), b[2], b[3], DTypeKV{});
          mma_16816<__half>(o[2 * j], a, p0, p1);
          mma_16816<__half>(o[2 * j + 1], b, p0, p1);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // The 8 rows g of head 2t+i share its m; their d are this lane's keys only.
      d[i] = column_sum(d[i]);
      const int head = 2 * t4 + i;
      if (head < GT) {
        if (g == 0) {
          s_m[warp * GT + head] = m[i];
          s_d[warp * GT + head] = d[i];
        }
        // Rows g and g+8 of m-tile mt: dims g * HEAD_DIM / 8 + 2mt and + 1.
        float* dst = s_o + (warp * GT + head) * HEAD_DIM + g * (HEAD_DIM / 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dst[2 * mt] = o[mt][i];
          dst[2 * mt + 1] = o[mt][2 + i];
        }
      }
    }
  } else if constexpr (MMA) {
    // ---- tensor cores, 16-bit K/V: warp w takes WTOK consecutive tokens of each tile ----
    using MmaT = DTypeKV;
    constexpr int WTOK = TILE / WARPS;  // 8 (d128) or 16 (d64)
    constexpr int NT = WTOK / 8;        // n8 tiles of scores per warp and tile
    constexpr int KS = HEAD_DIM / 16;   // k16 steps of Q.K^T
    constexpr int MT = HEAD_DIM / 16;   // m16 tiles of the transposed output
    static_assert(KS % 2 == 0 && MT % 2 == 0, "a fragment load covers 32 columns");
    const int g = warp_lane / 4, t4 = warp_lane % 4;  // fragment row (= head of the tile) and column pair
    const bool real_row = g < heads_here;
    const float slope = ALIBI ? alibi_slope(w.first_head + min(g, heads_here - 1), sc.num_qo_heads) : 0.f;

    // q as the A operand, unscaled (exact in its 16-bit type): a0 = one column pair (cols 2t.. of the step), a2 =
    // the other (2t+8..);
    // rows g+8 (a1, a3) are zero, and so are rows beyond the tile's heads.
    uint32_t qa[KS][2];
    {
      const DTypeQ* qh = w.q + min(g, heads_here - 1) * w.q_stride_h;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const int c0 = ks * 16 + 2 * t4;
        const int c1 = c0 + 8;
        qa[ks][0] = real_row ? pack2<MmaT>(to_float(qh[c0]), to_float(qh[c0 + 1])) : 0u;
        qa[ks][1] = real_row ? pack2<MmaT>(to_float(qh[c1]), to_float(qh[c1 + 1])) : 0u;
      }
    }

    // P.V runs transposed, O^T = V^T P^T (m16n8k8: 16 dims x 8 heads per tile), so that no accumulator
    // holds a padding row: lane (g, t) accumulates dims mt*16 + g (+8) of heads 2t and 2t+1.
    float m = kNegInf, d = 0.f;  // of head g; d sums only this lane's columns until the end
    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

    for (int tile = 0; tile < num_tiles; ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1);
      cp_async_commit();
      const uint4* sk = smem + (tile % STAGES) * 2 * TILE * RC;
      const uint4* sv = sk + TILE * RC;
      const int tok0 = warp * WTOK;  // first token of this warp within the tile

      float st[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
#pragma unroll
        for (int ks2 = 0; ks2 < KS / 2; ++ks2) {
          // Matrix i of the x4 load: tokens tok0 + nt*8 + 0..7, 16-byte column 4*ks2 + i.
          uint32_t b[4];
          ldmatrix_x4(
              b, smem_addr(sk + ring_chunk<DTypeKV, RC>(tok0 + nt * 8 + (warp_lane & 7), ks2 * 4 + (warp_lane >> 3))));
          const uint32_t a0[4] = {qa[2 * ks2][0], 0u, qa[2 * ks2][1], 0u};
          const uint32_t a1[4] = {qa[2 * ks2 + 1][0], 0u, qa[2 * ks2 + 1][1], 0u};
          mma_16816<MmaT>(st[nt], a0, b[0], b[1]);
          mma_16816<MmaT>(st[nt], a1, b[2], b[3]);
        }
      }

#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int token = chunk_begin + tile * TILE + tok0 + nt * 8 + 2 * t4 + i;
          const float x =
              transform_logit<ALIBI, SOFTCAP>(st[nt][i] * sc.sm_scale, slope, token - q_pos, sc.logits_soft_cap);
          st[nt][i] = token < chunk_end ? x : kNegInf;
        }
      }
      // Logits are already in the log2 domain (scl 1); a warp may see only padding in a short chunk.
      bool moved = false;
      const float corr = online_softmax_row<NT>(m, d, 1.f, moved, [&](int nt, int i) -> float& { return st[nt][i]; });
      if (__any_sync(0xffffffffu, moved)) {
        const float scale0 = __shfl_sync(0xffffffffu, corr, 8 * t4);      // head 2t lives in lanes 8t..8t+3
        const float scale1 = __shfl_sync(0xffffffffu, corr, 8 * t4 + 4);  // head 2t+1
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) o[mt][0] *= scale0, o[mt][1] *= scale1, o[mt][2] *= scale0, o[mt][3] *= scale1;
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // Scores in C layout (head g, tokens 2t, 2t+1) are P^T in B layout (tokens 2t, 2t+1; head g).
        const uint32_t pb = real_row ? pack2<MmaT>(st[nt][0], st[nt][1]) : 0u;
#pragma unroll
        for (int mt2 = 0; mt2 < MT / 2; ++mt2) {
          // Transposed 8x8 blocks of these 8 tokens at 16-byte columns 4*mt2 .. 4*mt2+3: registers 2i and
          // 2i+1 are rows g and g+8 of V^T m-tile 2*mt2 + i.
          uint32_t a[4];
          ldmatrix_x4_trans(
              a, smem_addr(sv + ring_chunk<DTypeKV, RC>(tok0 + nt * 8 + (warp_lane & 7), mt2 * 4 + (warp_lane >> 3))));
          mma_1688<MmaT>(o[2 * mt2], a[0], a[1], pb);
          mma_1688<MmaT>(o[2 * mt2 + 1], a[2], a[3], pb);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();
    d = quad_sum(d);
    if (g < GT && t4 == 0) {
      s_m[warp * GT + g] = m;
      s_d[warp * GT + g] = d;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int head = 2 * t4 + i;
      if (head < GT) {
        // Rows g and g+8 of m-tile mt: dims mt*16 + g and + 8.
        float* dst = s_o + (warp * GT + head) * HEAD_DIM + g;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dst[mt * 16] = o[mt][i];
          dst[mt * 16 + 8] = o[mt][2 + i];
        }
      }
    }
  } else {
    // ---- CUDA cores: each row group of LANES threads takes every ROWS-th token of a tile ----
    // After the transposed reduction each lane owns the logits of one head of the tile: HEAD_LANES lanes
    // per head. Its softmax statistics (m, d) are kept by the owning lanes only; the probabilities and
    // rescale factors are broadcast to every lane for the P.V update.
    constexpr int HEAD_LANES = LANES / GT;
    constexpr bool P_IN_SMEM = GT >= 4;
    float* s_p = reinterpret_cast<float*>(smem_raw + T::kSmemBytes);  // [ROWS][TPR][GT], after the ring
    const int own = lane / HEAD_LANES;
    const int row_base = warp_lane - lane;  // first lane of this row within the warp
    RopeRate rate;
    if constexpr (ROPE) load_rope_rate<HEAD_DIM>(rate, rope, lane);

    float q[GT][8];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      // Spare slots of a partial tile repeat the last head; their results are never stored.
      const DTypeQ* qh = w.q + min(j, heads_here - 1) * w.q_stride_h + lane * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) q[j][i] = to_float(qh[i]);
      if constexpr (ROPE) rope_rotate<LANES>(q[j], rate, float(q_pos), lane);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[j][i] *= sc.sm_scale;
    }
    const float slope = ALIBI ? alibi_slope(w.first_head + min(own, heads_here - 1), sc.num_qo_heads) : 0.f;

    float m = kNegInf, d = 0.f, o[GT][8];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
#pragma unroll
      for (int i = 0; i < 8; ++i) o[j][i] = 0.f;
    }

    for (int tile = 0; tile < num_tiles; ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile's data visible to all; everyone is done with the stage refilled next
      if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1);
      cp_async_commit();

      const uint4* sk = smem + (tile % STAGES) * 2 * TILE * RC;
      const uint4* sv = sk + TILE * RC;
      const int tile_begin = chunk_begin + tile * TILE;

      float s[TPR];  // log2-domain logits of head `own`
#pragma unroll
      for (int t = 0; t < TPR; ++t) {
        const int tl = t * ROWS + row;
        const int token = tile_begin + tl;
        float kf[8];
        ring_row8<DTypeKV, RC>(sk, tl, lane, kf);
        if constexpr (ROPE) rope_rotate<LANES>(kf, rate, float(token), lane);
        float part[GT];
#pragma unroll
        for (int j = 0; j < GT; ++j) {
          part[j] = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) part[j] = fmaf(q[j][i], kf[i], part[j]);
        }
        const float x = transform_logit<ALIBI, SOFTCAP>(transpose_group_sum<GT, LANES>(part, lane), slope,
                                                        token - q_pos, sc.logits_soft_cap);
        s[t] = token < chunk_end ? x : kNegInf;
      }

      // This lane holds all of its head's TPR logits (log2 domain already: scl 1); a row may see only padding
      // in a short chunk.
      bool moved = false;
      const float corr = online_softmax_row<TPR, 1, 1>(m, d, 1.f, moved, [&](int t, int) -> float& { return s[t]; });
      // Once the running max settles, most tiles leave it unchanged: skip the rescale warp-wide then.
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int j = 0; j < GT; ++j) {
          const float sj = __shfl_sync(0xffffffffu, corr, row_base + j * HEAD_LANES);
#pragma unroll
          for (int i = 0; i < 8; ++i) o[j][i] *= sj;
        }
      }

      // Every lane needs all GT probabilities of a token: from GT >= 4 one 16-byte shared-memory read per
      // 4 heads is cheaper than a shuffle per head.
      if constexpr (P_IN_SMEM) {
        if (lane % HEAD_LANES == 0) {
#pragma unroll
          for (int t = 0; t < TPR; ++t) s_p[(row * TPR + t) * GT + own] = s[t];
        }
        __syncwarp();
      }
#pragma unroll
      for (int t = 0; t < TPR; ++t) {
        const int tl = t * ROWS + row;
        float vf[8];
        ring_row8<DTypeKV, RC>(sv, tl, lane, vf);
        float pt[GT];
        if constexpr (P_IN_SMEM) {
#pragma unroll
          for (int j = 0; j < GT; j += 4) {
            const float4 p4 = *reinterpret_cast<const float4*>(s_p + (row * TPR + t) * GT + j);
            pt[j] = p4.x, pt[j + 1] = p4.y, pt[j + 2] = p4.z, pt[j + 3] = p4.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < GT; ++j) pt[j] = __shfl_sync(0xffffffffu, s[t], row_base + j * HEAD_LANES);
        }
#pragma unroll
        for (int j = 0; j < GT; ++j) {
#pragma unroll
          for (int i = 0; i < 8; ++i) o[j][i] = fmaf(pt[j], vf[i], o[j][i]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();
    if (lane % HEAD_LANES == 0) {
      s_m[row * GT + own] = m;
      s_d[row * GT + own] = d;
    }
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      float4* dst = reinterpret_cast<float4*>(s_o + (row * GT + j) * HEAD_DIM + lane * 8);
      dst[0] = make_float4(o[j][0], o[j][1], o[j][2], o[j][3]);
      dst[1] = make_float4(o[j][4], o[j][5], o[j][6], o[j][7]);
    }
  }
  __syncthreads();

  // Merge the NSTATES partial states of each head and write the output or a partial state.
  for (int item = threadIdx.x; item < GT * LANES; item += T::kThreads) {
    const int j = item / LANES, col = (item % LANES) * 8;
    if (j >= heads_here) continue;
    // States that saw only padding weigh 0; so do all of them when the piece has no key (an empty request,
    // or a run-time window that leaves none).
    float m_all, acc[8];
    const float d_all = merge_state_set<NSTATES, 8, true>(
        m_all, acc, [&](int r) { return s_m[r * GT + j]; }, [&](int r) { return s_d[r * GT + j]; },
        [&](int r, int i) { return (s_o + (r * GT + j) * HEAD_DIM + col)[i]; });
    store(j, col, acc, d_all, d_all > 0.f ? m_all + ptx_log2(d_all) : kNegInf);
  }
  __syncthreads();  // the scratch is read before a next piece refills the ring
}

// One CTA per (query-head tile, chunk, KV head) of a single request.
template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, PosEncoding POS, bool SOFTCAP>
__global__ void __launch_bounds__(DecodeTraits<HEAD_DIM>::kThreads, decode_min_blocks<HEAD_DIM, GT, DTypeKV, POS>())
    single_decode_kernel(const __grid_constant__ SingleDecodeParams p, const __grid_constant__ RopeTableFor<POS> rope) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // Both kernels are launched with programmatic dependent launch: this one may be scheduled while the
  // previous kernel in the stream drains, so it waits here before touching memory that kernel may write;
  // the merge kernel, in turn, may be scheduled as soon as SMs free up and waits for this grid likewise.
  grid_dependency_chain();
  int bid = blockIdx.x;
  const int head_tile = take_block_index(bid, p.head_tiles);
  const int chunk = take_block_index(bid, p.num_chunks);
  const int kv_head = bid;
  const int qo_head0 = kv_head * p.group_size + head_tile * GT;

  const ContiguousRows<DTypeKV> rows{p, kv_head};
  DecodePiece<DTypeQ> w;
  w.set_heads<GT>(static_cast<const DTypeQ*>(p.q), p.q_stride_h, qo_head0, p.group_size, head_tile);
  w.begin = p.kv_begin + chunk * p.chunk_size;
  w.end = min(p.kv_len, w.begin + p.chunk_size);
  w.q_pos = p.kv_len - 1;
  // The store re-derives everything from the block index and p (parameter space) when it runs, so that
  // nothing of it stays live in registers through the loop.
  const auto store = [&](int j, int col, float (&acc)[8], float d_all, float lse) {
    int b = blockIdx.x;
    const int tile_of_head = take_block_index(b, p.head_tiles);
    const int h = (b / p.num_chunks) * p.group_size + tile_of_head * GT + j;
    const int64_t state = int64_t(b % p.num_chunks) * p.sc.num_qo_heads + h;
    const bool split = p.num_chunks > 1;
    store_decode_state<HEAD_DIM>(acc, d_all, lse, p.sc.v_scale, col, static_cast<DTypeO*>(p.o) + int64_t(h) * HEAD_DIM,
                                 p.lse != nullptr ? p.lse + h : nullptr,
                                 split ? p.partial_o + state * HEAD_DIM : nullptr,
                                 split ? p.partial_lse + state : nullptr);
  };
  decode_piece<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, POS, SOFTCAP>(rows, w, p.sc, rope, smem_raw, store);
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, PosEncoding POS, bool SOFTCAP>
static cudaError_t launch_single_decode_gt(SingleDecodeParams p, int workspace_chunks, int device,
                                           cudaStream_t stream) {
  using T = DecodeTraits<HEAD_DIM, DTypeKV>;
  constexpr auto kernel = single_decode_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, POS, SOFTCAP>;
  constexpr int smem_bytes = decode_smem_bytes<HEAD_DIM, GT, DTypeKV, POS>();
  int occ = 0;  // the grid is sized to what fits
  cudaError_t err = kernel_occupancy<kernel>(T::kThreads, smem_bytes, device, &occ);
  if (err != cudaSuccess) return err;
  p.head_tiles = ceil_div(p.group_size, GT);
  const int kv_span = p.kv_len - p.kv_begin;
  const int ctas_per_chunk = p.num_kv_heads * p.head_tiles;
  const int slots = occ * sm_count(device);
  int num_chunks = 1;
  if (workspace_chunks > 1 && ctas_per_chunk * 2 <= slots) {
    num_chunks = slots / ctas_per_chunk;
    num_chunks = min(num_chunks, min(workspace_chunks, ceil_div(kv_span, T::kMinChunk)));
  }
  // Chunks need not be whole tiles (the last tile of a chunk is masked): filling every resident slot
  // beats rounding the chunk up to a tile multiple, which left up to one chunk's worth of slots idle.
  p.chunk_size = ceil_div(kv_span, num_chunks);
  p.num_chunks = ceil_div(kv_span, p.chunk_size);
  if (p.num_chunks > 1) {
    p.partial_lse = p.partial_o + int64_t(p.num_chunks) * p.sc.num_qo_heads * HEAD_DIM;
  }
  // Both kernels with programmatic dependent launch (see single_decode_kernel).
  err = launch_kernel(kernel, dim3(ctas_per_chunk * p.num_chunks), dim3(T::kThreads), smem_bytes, stream, true, p,
                      make_rope_table<POS>(HEAD_DIM, p.rope_scale, p.rope_theta));
  if (err != cudaSuccess || p.num_chunks == 1) return err;
  return launch_kernel(merge_chunk_states_kernel<HEAD_DIM, DTypeO>, dim3(p.sc.num_qo_heads), dim3(kMergeThreads), 0,
                       stream, true, static_cast<const float*>(p.partial_o), static_cast<const float*>(p.partial_lse),
                       p.num_chunks, p.sc.num_qo_heads, static_cast<DTypeO*>(p.o), int64_t(HEAD_DIM), p.lse,
                       p.sc.v_scale);
}

// Picks the query-head tile for the group size, and runs under a guard for the tensors' device.
template <int HEAD_DIM, typename DTypeQ, typename DTypeKV, typename DTypeO, PosEncoding POS, bool WINDOW, bool SOFTCAP>
static cudaError_t launch_single_decode(SingleDecodeParams p, int workspace_chunks, int device, cudaStream_t stream) {
  if (p.num_kv_heads <= 0 || p.sc.num_qo_heads % p.num_kv_heads != 0 || p.kv_len <= 0) return cudaErrorInvalidValue;
  if (workspace_chunks > 1 && p.partial_o == nullptr) return cudaErrorInvalidValue;
  p.group_size = p.sc.num_qo_heads / p.num_kv_heads;
  p.kv_begin = WINDOW && p.window_left >= 0 ? max(0, p.kv_len - 1 - p.window_left) : 0;
#define FI_LAUNCH(GT) \
  launch_single_decode_gt<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, POS, SOFTCAP>(p, workspace_chunks, device, stream)
  return with_device(device, [&]() -> cudaError_t {
    switch (decode_head_tile(p.group_size)) {
      case 1:
        return FI_LAUNCH(1);
      case 2:
        return FI_LAUNCH(2);
      case 4:
        return FI_LAUNCH(4);
      default:
        return FI_LAUNCH(8);
    }
  });
#undef FI_LAUNCH
}

}  // namespace flashinfer

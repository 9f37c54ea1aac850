// The softmax state of attention rows, and the merging of partial states: every attention kernel's softmax
// and every merge (split-KV chunks, decode's per-CTA partials, batch pieces) goes through this header.
//
// A row's state over a set of keys, in the log2 domain (logits scaled by log2 e, so each exponential is one
// ex2): m, the max logit; d = sum exp2(logit - m); o = sum exp2(logit - m) * v, unnormalised. Written out as a
// partial state it is normalised: (o / d, lse) with lse = m + log2(d) (-inf for a row that saw no key). States
// over disjoint key sets merge by weighting each normalised o with exp2(lse - max lse), or each unnormalised
// (d, o) with exp2(m - max m).
//
//   online_softmax_row    one key tile of a row: m, d updated, scores overwritten by probabilities
//   inverse_or_zero, row_lse  normalising a row's final (m, d), its lse
//   merge_state_set       a known set of states, max first, then all weights at once (no serial chain)
//   StateAccumulator      a running merge of normalised states streamed from memory
//   merge_states_block    a block-wide merge of one output row's partial states in memory
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"
#include "flashinfer/ptx/math.cuh"

namespace flashinfer {

// One online-softmax step of a query row over a tile of keys. The row's scores of the tile are spread over
// LANES lanes STRIDE apart (4 consecutive: a quad, the row of an mma.sync or wgmma C/D fragment; 8 lanes 4 apart:
// a column of an mma.sync C fragment; 1: one lane holds them all); each of those lanes holds E * N of them,
// score(j, e) (j < N, e < E), in units where scl turns them into log2-domain logits. Folds the tile's max into
// m, rescales d, and overwrites the scores with their probabilities, summed into d (this lane's share). Returns
// the factor the row's output accumulators must be scaled by; `moved` is set when the row's max changed (the
// factor is exactly 1 otherwise).
template <int N, int E = 2, int LANES = 4, int STRIDE = 1, typename Score>
FI_DEVICE float online_softmax_row(float& m, float& d, float scl, bool& moved, Score&& score) {
  static_assert((E == 1 || E == 2) && (LANES & (LANES - 1)) == 0 && LANES * STRIDE <= 32,
                "pairs or single scores; a power-of-two set of lanes of one warp");
  float mx = kNegInf;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if constexpr (E == 2) {
      mx = fmaxf(mx, fmaxf(score(j, 0), score(j, 1)));
    } else {
      mx = fmaxf(mx, score(j, 0));
    }
  }
#pragma unroll
  for (int offset = STRIDE; offset < LANES * STRIDE; offset *= 2) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  }
  const float m_new = fmaxf(m, mx);
  const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing allowed yet stays at 0
  const float corr = ptx_exp2((m - m_use) * scl);
  moved |= m_new != m;
  m = m_new;
  d *= corr;
  const float neg = -m_use * scl;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < E; ++e) {
      float& x = score(j, e);
      x = ptx_exp2(fmaf(x, scl, neg));
      d += x;
    }
  return corr;
}

// 1 / a row's softmax denominator, 0 for a row that saw no key (its output is then 0).
FI_DEVICE float inverse_or_zero(float d) { return d > 0.f ? 1.f / d : 0.f; }

// The lse of a row's final state (m in the units of online_softmax_row's scl, d summed over the row's lanes):
// -inf for a row that saw no key.
FI_DEVICE float row_lse(float m, float d, float scl) {
  const float m_use = m == kNegInf ? 0.f : m;
  return d > 0.f ? m_use * scl + ptx_log2(d) : kNegInf;
}

// Merges COUNT states of one row, N output columns each: state r has max m_of(r), denominator d_of(r) and
// columns o_of(r, i) (unnormalised; for normalised partial states pass lse as m and 1 as d). Takes the max
// first, then weighs all states at once (independent, so no serial chain of running merges). Leaves the
// merged max in m_all and the weighted columns in acc (unnormalised, overwritten); returns the merged
// denominator. SKIP_EMPTY: states with m == -inf weigh 0 even when all are empty (else every merged set must
// hold at least one state that saw a key).
template <int COUNT, int N, bool SKIP_EMPTY, typename StateM, typename StateD, typename StateO>
FI_DEVICE float merge_state_set(float& m_all, float (&acc)[N], StateM&& m_of, StateD&& d_of, StateO&& o_of) {
  // The loops over states are left to the compiler's unrolling: fully unrolled, 16 states and more cost more
  // registers and code than they save (decode's per-CTA merge at head_dim 64).
  m_all = kNegInf;
  for (int r = 0; r < COUNT; ++r) m_all = fmaxf(m_all, m_of(r));
  float d_all = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  for (int r = 0; r < COUNT; ++r) {
    const float m_r = m_of(r);
    const float w = SKIP_EMPTY && m_r == kNegInf ? 0.f : ptx_exp2(m_r - m_all);
    d_all += w * d_of(r);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = fmaf(w, o_of(r, i), acc[i]);
  }
  return d_all;
}

// Running merge of normalised states (lse, o), one at a time, without materialising all weights.
template <int N>
struct StateAccumulator {
  float m = kNegInf;  // running max of lse
  float d = 0.f;      // sum of exp2(lse - m)
  float o[N];

  FI_DEVICE StateAccumulator() {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = 0.f;
  }

  // Holding one state: the same as add(lse, first) on an empty accumulator, without rescaling its zeros (an
  // empty first state's values are never read: they may be anything, NaN included).
  FI_DEVICE StateAccumulator(float lse, const float (&first)[N]) {
    const bool empty = lse == kNegInf;
    m = lse;
    d = empty ? 0.f : 1.f;
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = empty ? 0.f : first[i];
  }

  FI_DEVICE void add(float lse, const float (&other)[N]) {
    if (lse == kNegInf) return;  // empty state
    const float m_new = fmaxf(m, lse);
    const float scale_old = ptx_exp2(m - m_new);  // exp2(-inf) == 0 on the first add
    const float w = ptx_exp2(lse - m_new);
    d = d * scale_old + w;
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = o[i] * scale_old + w * other[i];
    m = m_new;
  }

  FI_DEVICE float lse() const { return d > 0.f ? m + ptx_log2(d) : kNegInf; }
};

// Merges `count` partial states of one output row: states first_row + i * row_stride (i < count) of
// partial_o [*, HEAD_DIM] f32 and partial_lse [*] f32 go to out[0..HEAD_DIM) (scaled by v_scale) and
// *lse_out (nullable). Called by a whole block of kMergeThreads: LANES threads cover the row (8 floats
// each) and GROUPS take every GROUPS-th state, loading kMergeBatch states before using any so that the
// loads overlap (the merge sits on the critical path of a decode step); then the group states are
// weighed together in shared memory.
constexpr int kMergeThreads = 256;
constexpr int kMergeBatch = 4;

template <int HEAD_DIM, typename DTypeO>
FI_DEVICE void merge_states_block(const float* __restrict__ partial_o, const float* __restrict__ partial_lse,
                                  int64_t first_row, int64_t row_stride, int count, DTypeO* __restrict__ out,
                                  float* __restrict__ lse_out, float v_scale) {
  constexpr int LANES = HEAD_DIM / 8;
  constexpr int GROUPS = kMergeThreads / LANES;
  static_assert(HEAD_DIM <= kMergeThreads, "one thread per output element in the final step");
  __shared__ float s_lse[GROUPS];
  __shared__ float s_o[GROUPS][HEAD_DIM];

  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  StateAccumulator<8> acc;
  for (int base = group; base < count; base += kMergeBatch * GROUPS) {
    float lse[kMergeBatch];
    float4 v[kMergeBatch][2];
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const int c = base + u * GROUPS;
      lse[u] = kNegInf;
      if (c < count) {
        const int64_t row = first_row + c * row_stride;
        lse[u] = partial_lse[row];
        const float4* src = reinterpret_cast<const float4*>(partial_o + row * HEAD_DIM + lane * 8);
        v[u][0] = src[0];
        v[u][1] = src[1];
      }
    }
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      const float vals[8] = {v[u][0].x, v[u][0].y, v[u][0].z, v[u][0].w, v[u][1].x, v[u][1].y, v[u][1].z, v[u][1].w};
      acc.add(lse[u], vals);
    }
  }
  const float inv_d = inverse_or_zero(acc.d);
  if (lane == 0) s_lse[group] = acc.lse();
#pragma unroll
  for (int i = 0; i < 8; ++i) s_o[group][lane * 8 + i] = acc.o[i] * inv_d;
  __syncthreads();
  if (threadIdx.x >= HEAD_DIM) return;
  const int e = threadIdx.x;
  float m_all, acc_e[1];
  const float d_all = merge_state_set<GROUPS, 1, true>(
      m_all, acc_e, [&](int g) { return s_lse[g]; }, [](int) { return 1.f; }, [&](int g, int) { return s_o[g][e]; });
  out[e] = from_float<DTypeO>(d_all > 0.f ? acc_e[0] * (v_scale / d_all) : 0.f);
  if (lse_out != nullptr && e == 0) *lse_out = d_all > 0.f ? m_all + ptx_log2(d_all) : kNegInf;
}

// Single decode: chunk c of head h is state c * num_heads + h; one block per head.
template <int HEAD_DIM, typename DTypeO>
__global__ void __launch_bounds__(kMergeThreads)
    merge_chunk_states_kernel(const float* __restrict__ partial_o, const float* __restrict__ partial_lse,
                              int num_chunks, int num_heads, DTypeO* __restrict__ out, int64_t out_stride_h,
                              float* __restrict__ lse_out, float v_scale) {
  grid_dependency_wait();
  const int head = blockIdx.x;
  merge_states_block<HEAD_DIM>(partial_o, partial_lse, head, num_heads, num_chunks, out + head * out_stride_h,
                               lse_out != nullptr ? lse_out + head : nullptr, v_scale);
}

}  // namespace flashinfer

// Merging partial attention states. A state over a set of keys is (o, lse): o the softmax-weighted
// mean of their values, lse = log2 of the sum of exp2 of their (log2-domain) logits. Two states merge
// by weighting each o with exp2(lse - max lse).
#pragma once
#include "common.cuh"
#include "cp_async.cuh"

namespace flashinfer {

// Running merge of states, one at a time, without materialising all weights.
template <int N>
struct StateAccumulator {
  float m = kNegInf;  // running max of lse
  float d = 0.f;      // sum of exp2(lse - m)
  float o[N];

  FI_DEVICE StateAccumulator() {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = 0.f;
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
  const float inv_d = acc.d > 0.f ? 1.f / acc.d : 0.f;
  if (lane == 0) s_lse[group] = acc.lse();
#pragma unroll
  for (int i = 0; i < 8; ++i) s_o[group][lane * 8 + i] = acc.o[i] * inv_d;
  __syncthreads();
  if (threadIdx.x >= HEAD_DIM) return;
  // The group states are independent: take their max first, then weigh them all at once, instead of a
  // serial chain of running merges.
  const int e = threadIdx.x;
  float m_all = kNegInf;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) m_all = fmaxf(m_all, s_lse[g]);
  float d_all = 0.f, acc_e = 0.f;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    const float w = s_lse[g] == kNegInf ? 0.f : ptx_exp2(s_lse[g] - m_all);
    d_all += w;
    acc_e = fmaf(w, s_o[g][e], acc_e);
  }
  out[e] = from_float<DTypeO>(d_all > 0.f ? acc_e * (v_scale / d_all) : 0.f);
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

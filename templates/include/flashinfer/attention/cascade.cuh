// Merging attention states held in 16-bit tensors: the kernels behind flashinfer.cascade's merge_state,
// merge_state_in_place and merge_states, and the level merges of cascade attention.
//
// The state of one (sequence position, head) is an output row v (head_dim 16-bit values) and the base-2
// log-sum-exp s of its logits. States are weighed with StateAccumulator (state.cuh), the same primitive
// the split-KV merges of decode and prefill use: an empty state (s = -inf) contributes nothing, so merging
// with one gives the other side exactly, and merging only empty states gives v = 0, s = -inf.
//
// One thread per 16-byte chunk (8 values) of a row. A block holds whole rows (rows_per_block rows of
// chunks_per_row threads), so an in-place merge can read every s of its rows before any thread writes one
// (the s of a row is read by all of its threads but written by the first).
#pragma once
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"  // FastDivmod

namespace flashinfer {

constexpr int kMergeRowThreads = 256;  // threads per block, rounded down to whole rows
constexpr int kMergeStateBatch = 8;    // states whose loads are issued before any is weighed

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
};

// Writes the accumulated state of one chunk (the lse from the row's first thread only).
template <typename DType>
FI_DEVICE void store_state(const MergeParams& p, const StateAccumulator<8>& acc, int n, int h, int chunk) {
  const float inv_d = acc.d > 0.f ? 1.f / acc.d : 0.f;
  float o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = acc.o[i] * inv_d;
  *reinterpret_cast<uint4*>(static_cast<DType*>(p.v_out) + n * p.o_stride_n + h * p.o_stride_h + chunk * 8) =
      pack8<DType>(o);
  // log2(1) = 0 spelled out: a single non-empty state keeps its lse exactly (lg2.approx only bounds the error).
  if (p.s_out != nullptr && chunk == 0)
    p.s_out[n * p.so_stride_n + h * p.so_stride_h] = acc.d == 1.f ? acc.m : acc.lse();
}

// Two states per row (a, b) -> out; out may be a itself. A memory-bound stream of 2 x 16 bytes in and 16 out
// per thread and row: each thread takes kPairRowsInFlight rows of its block's span per step and issues all
// their loads before weighing any (one row's loads per step left a third of the copy bandwidth unused).
constexpr int kPairRowsInFlight = 4;
constexpr int kPairMinBlocks = 4;  // 1024 threads per SM: up to 64 registers for the loads in flight

template <typename DType>
__global__ void __launch_bounds__(kMergeRowThreads, kPairMinBlocks)
    merge_state_pair_kernel(const __grid_constant__ MergeParams p) {
  constexpr int U = kPairRowsInFlight;
  const int local_row = threadIdx.x / p.chunks_per_row;
  const int chunk = threadIdx.x - local_row * p.chunks_per_row;
  const int span = U * p.rows_per_block;  // rows of one block step: U sub-blocks of rows_per_block rows
  for (int row0 = blockIdx.x * span; row0 < p.rows; row0 += gridDim.x * span) {
    // Only the loaded values stay in registers across the barrier; (position, head) is recomputed for the
    // store (a multiply-high), which keeps the kernel within kPairMinBlocks' 64 registers.
    unsigned active = 0;  // bit u: row u of this thread is merged
    float sa[U], sb[U];
    uint4 va[U], vb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int row = row0 + u * p.rows_per_block + local_row;
      sa[u] = sb[u] = kNegInf;
      va[u] = vb[u] = make_uint4(0, 0, 0, 0);
      if (row >= p.rows) continue;
      int n, h;
      p.heads.divmod(row, n, h);
      if (p.mask != nullptr && p.mask[n] == 0) continue;
      active |= 1u << u;
      const int64_t nn = n, hh = h;
      sa[u] = p.a.s[nn * p.a.s_stride_n + hh * p.a.s_stride_h];
      sb[u] = p.b.s[nn * p.b.s_stride_n + hh * p.b.s_stride_h];
      va[u] = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.a.v) + nn * p.a.v_stride_n +
                                              hh * p.a.v_stride_h + chunk * 8);
      vb[u] = *reinterpret_cast<const uint4*>(static_cast<const DType*>(p.b.v) + nn * p.b.v_stride_n +
                                              hh * p.b.v_stride_h + chunk * 8);
    }
    __syncthreads();  // in place: every thread of the block has read its s before any is overwritten
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!(active & (1u << u))) continue;
      int n, h;
      p.heads.divmod(row0 + u * p.rows_per_block + local_row, n, h);
      float fa[8], fb[8];
      unpack8(va[u], fa, DType{});
      unpack8(vb[u], fb, DType{});
      StateAccumulator<8> acc;
      acc.add(sa[u], fa);
      acc.add(sb[u], fb);
      store_state<DType>(p, acc, n, h, chunk);
    }
  }
}

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
    p.rows_per_block = kMergeRowThreads / p.chunks_per_row;
    const int threads = p.rows_per_block * p.chunks_per_row;
    // A grid of whole resident waves (the blocks loop over the rows): 2048 threads per SM, or the pair
    // kernel's kPairMinBlocks blocks of kPairRowsInFlight rows per thread.
    const int rows_per_step = PAIR ? kPairRowsInFlight * p.rows_per_block : p.rows_per_block;
    const int blocks_needed = ceil_div(p.rows, rows_per_step);
    const int resident = sm_count(device) * (PAIR ? kPairMinBlocks : 2048 / threads);
    const int blocks = blocks_needed < resident ? blocks_needed : resident;
    if (PAIR) {
      merge_state_pair_kernel<DType><<<blocks, threads, 0, stream>>>(p);
    } else {
      merge_states_kernel<DType><<<blocks, threads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace flashinfer

// Batch decode attention over a paged KV cache, on CUDA cores.
//
// plan() (host, once per batch shape) turns the page table into a balanced work list: W "workers" per
// (kv head, query-head tile), W chosen so that every CTA of the grid is resident at once (W * heads * tiles
// = occupancy * SMs). The requests' keys, laid end to end, are cut into W runs of equal cost (keys plus a
// fixed per-piece overhead); a run holds whole requests and at most two pieces of requests split at its
// ends. So one 32k request among 127 short ones, or a batch of one, still fills the GPU. A worker's
// pieces run one after the other, each streaming its keys through a 16-byte cp.async ring (the pages are
// looked up per row); a piece that is a whole request writes the output, a piece of a split request
// writes a partial (o, lse) state that a second kernel (programmatic dependent launch) merges. A piece is
// decode_piece() of decode.cuh, with the keys' rows found through the page table (PagedRows).
//
// Everything run() needs that changes with the batch lives in the device workspace (the plan region),
// so in CUDA-graph mode the grid (W * heads * tiles, and W merge slots) stays fixed across re-plans.
// The logit options (scale, soft cap, RoPE constants) and a narrower sliding window are run-time arguments.
// The planner (host side) is in host/batch_decode_plan.cuh.
#pragma once
#include "flashinfer/attention/decode.cuh"
#include "flashinfer/attention/pos_enc.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/host/batch_decode_plan.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/paged.cuh"
#include "flashinfer/ptx/griddepcontrol.cuh"

namespace flashinfer {

struct BatchDecodeParams {
  const void* q;  // request r, head h at q + r * q_stride_b + h * q_stride_h
  int64_t q_stride_b, q_stride_h;
  PagedKV kv;
  void* o;     // [batch, num_qo_heads, HEAD_DIM] contiguous
  float* lse;  // [batch, num_qo_heads] or nullptr
  const int* plan;
  BatchDecodeLayout layout;
  float* partial_o;    // [max_partials, num_qo_heads, HEAD_DIM]
  float* partial_lse;  // [max_partials, num_qo_heads]
  DecodeScalars sc;
  int num_kv_heads, group_size, head_tiles;
  int window_left;  // >= 0: keys before q_pos - window_left are skipped (on top of the plan's own window)
};

// ------------------------------------------------------------------------------------------- kernels

// Rows of one KV head of one request, through its page ids. KV_HND: a page holds
// [num_kv_heads][page_size][HEAD_DIM] (token stride HEAD_DIM); else [page_size][num_kv_heads][HEAD_DIM]
// (head stride HEAD_DIM). The page stride is free. Page ids outside [0, num_pages) are never read: their
// rows count as zeros.
template <int HEAD_DIM, typename DTypeKV, bool KV_HND>
struct PagedRows {
  static constexpr bool kSameKV = true;  // K and V share the cache's strides
  const BatchDecodeParams& p;
  const int* pages;  // this request's page ids
  int kv_head;
  FI_DEVICE int64_t head_offset() const { return kv_head * (KV_HND ? p.kv.stride_h : int64_t(HEAD_DIM)); }
  FI_DEVICE const DTypeKV* k() const { return static_cast<const DTypeKV*>(p.kv.k) + head_offset(); }
  FI_DEVICE const DTypeKV* v() const { return static_cast<const DTypeKV*>(p.kv.v) + head_offset(); }
  FI_DEVICE bool offsets(int token, int64_t& off_k, int64_t& off_v) const {
    int page, slot;
    if (!p.kv.locate(pages, token, page, slot)) return false;
    // The layout's constant stride (HEAD_DIM) folded in, rather than PagedKV::offset's run-time one.
    off_k = off_v = int64_t(page) * p.kv.stride_page + slot * (KV_HND ? int64_t(HEAD_DIM) : p.kv.stride_n);
    return true;
  }
};

// Writes query head h's columns [col, col + 8) of piece `piece` (an unnormalised o and its d, lse): to the output row
// of the piece's request, or as the piece's partial state when the request was split. The request and slot are read
// from the plan here, when the store runs, rather than held in registers through the key loop.
template <int HEAD_DIM, typename DTypeO>
FI_DEVICE void store_piece_state(const BatchDecodeParams& p, int piece, int h, int col, float (&acc)[8], float d_all,
                                 float lse) {
  const BatchDecodeLayout& L = p.layout;
  const int req = p.plan[L.piece_req + piece], slot = p.plan[L.piece_slot + piece];
  const int64_t out_row = int64_t(req) * p.sc.num_qo_heads + h;
  const int64_t state = int64_t(slot) * p.sc.num_qo_heads + h;
  const bool split = slot >= 0;
  store_decode_state<HEAD_DIM>(acc, d_all, lse, p.sc.v_scale, col, static_cast<DTypeO*>(p.o) + out_row * HEAD_DIM,
                               p.lse != nullptr ? p.lse + out_row : nullptr,
                               split ? p.partial_o + state * HEAD_DIM : nullptr,
                               split ? p.partial_lse + state : nullptr);
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
__global__ void __launch_bounds__(DecodeTraits<HEAD_DIM>::kThreads, decode_min_blocks<HEAD_DIM, GT, DTypeKV, POS>())
    batch_decode_paged_kernel(const __grid_constant__ BatchDecodeParams p,
                              const __grid_constant__ RopeTableFor<POS> rope) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  grid_dependency_chain();  // launched with programmatic dependent launch (see single_decode_kernel)
  int bid = blockIdx.x;
  const int head_tile = take_block_index(bid, p.head_tiles);
  const int kv_head = take_block_index(bid, p.num_kv_heads);
  const int worker = bid;
  const int qo_head0 = kv_head * p.group_size + head_tile * GT;
  const BatchDecodeLayout& L = p.layout;
  const int piece_last = p.plan[L.worker_indptr + worker + 1];
  for (int piece = p.plan[L.worker_indptr + worker]; piece < piece_last; ++piece) {
    const int r = p.plan[L.piece_req + piece];
    const PagedRows<HEAD_DIM, DTypeKV, KV_HND> rows{p, p.kv.indices + p.plan[L.req_page_base + r], kv_head};
    DecodePiece<DTypeQ> w;
    w.set_heads<GT>(static_cast<const DTypeQ*>(p.q) + r * p.q_stride_b, p.q_stride_h, qo_head0, p.group_size,
                    head_tile);
    w.begin = p.plan[L.piece_begin + piece];
    w.end = p.plan[L.piece_end + piece];
    w.q_pos = p.plan[L.req_kv_len + r] - 1;
    if (p.window_left >= 0) w.begin = max(w.begin, min(w.end, w.q_pos - p.window_left));
    const auto store = [&](int j, int col, float (&acc)[8], float d_all, float lse) {
      store_piece_state<HEAD_DIM, DTypeO>(p, piece, qo_head0 + j, col, acc, d_all, lse);
    };
    decode_piece<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, POS, SOFTCAP>(rows, w, p.sc, rope, smem_raw, store);
  }
}

// Merges the partial states of the split requests: block (head, merge m) combines the merge_count[m]
// consecutive states starting at merge_begin[m] into the output row of request merge_req[m]. Blocks
// beyond the plan's number of merges (graph mode launches a fixed number) exit.
template <int HEAD_DIM, typename DTypeO>
__global__ void __launch_bounds__(kMergeThreads)
    batch_merge_states_kernel(const int* __restrict__ plan, BatchDecodeLayout L, const float* __restrict__ partial_o,
                              const float* __restrict__ partial_lse, int num_heads, DTypeO* __restrict__ out,
                              float* __restrict__ lse_out, float v_scale) {
  grid_dependency_wait();
  const int head = blockIdx.x, m = blockIdx.y;
  if (m >= plan[0]) return;
  const int r = plan[L.merge_req + m];
  const int64_t out_row = int64_t(r) * num_heads + head;
  merge_states_block<HEAD_DIM>(partial_o, partial_lse, int64_t(plan[L.merge_begin + m]) * num_heads + head, num_heads,
                               plan[L.merge_count + m], out + out_row * HEAD_DIM,
                               lse_out != nullptr ? lse_out + out_row : nullptr, v_scale);
}

// ------------------------------------------------------------------------------------------- host side

// Filled by Python field by field, as BatchDecodePlanArgs (DECODE_RUN_ARGS).
struct BatchDecodeRunArgs {
  const void* q;
  int64_t q_stride_b, q_stride_h;
  const void* k;
  const void* v;
  int64_t stride_page, stride_n, stride_h;
  int num_pages;
  void* o;
  float* lse;
  float sm_scale, logits_soft_cap, v_scale, rope_scale, rope_theta;
  int window_left;  // -1: the plan's keys; >= 0: a window within them
  bool enable_pdl;  // programmatic dependent launch of both kernels
  int device;
  cudaStream_t stream;
};

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
static cudaError_t batch_decode_occupancy(int device, int* out) {
  return kernel_occupancy<batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>>(
      DecodeTraits<HEAD_DIM>::kThreads, decode_smem_bytes<HEAD_DIM, GT, DTypeKV, POS>(), device, out);
}

// The kernel parameters of a run of `plan` (what both paged decode kernels read).
static BatchDecodeParams batch_decode_params(const BatchDecodePlan& plan, const BatchDecodeRunArgs& a) {
  BatchDecodeParams p;
  p.q = a.q;
  p.q_stride_b = a.q_stride_b;
  p.q_stride_h = a.q_stride_h;
  p.kv.k = const_cast<void*>(a.k);  // PagedKV also describes caches that are written (page append)
  p.kv.v = const_cast<void*>(a.v);
  p.kv.stride_page = a.stride_page;
  p.kv.stride_n = a.stride_n;
  p.kv.stride_h = a.stride_h;
  p.kv.indices = plan.indices;
  p.kv.num_pages = a.num_pages;
  p.kv.page_size = FastDivmod(plan.page_size);
  p.o = a.o;
  p.lse = a.lse;
  char* ws = static_cast<char*>(plan.workspace);
  p.plan = reinterpret_cast<const int*>(ws + plan.plan_offset);
  p.layout = plan.layout;
  p.partial_o = reinterpret_cast<float*>(ws + plan.partial_o_offset);
  p.partial_lse = reinterpret_cast<float*>(ws + plan.partial_lse_offset);
  p.sc.num_qo_heads = plan.num_qo_heads;
  p.num_kv_heads = plan.num_kv_heads;
  p.group_size = plan.group_size;
  p.head_tiles = plan.head_tiles;
  p.sc.logits_soft_cap = a.logits_soft_cap;
  p.sc.sm_scale = a.sm_scale;
  p.sc.v_scale = a.v_scale;
  p.window_left = a.window_left;
  return p;
}

// The merge of the split requests' partial states after either decode kernel (none when nothing was split).
template <int HEAD_DIM, typename DTypeO>
static cudaError_t launch_batch_merge(const BatchDecodePlan& plan, const BatchDecodeRunArgs& a,
                                      const BatchDecodeParams& p) {
  if (plan.merge_blocks == 0) return cudaSuccess;
  return launch_kernel(batch_merge_states_kernel<HEAD_DIM, DTypeO>, dim3(plan.num_qo_heads, plan.merge_blocks),
                       dim3(kMergeThreads), 0, a.stream, a.enable_pdl, p.plan, p.layout,
                       static_cast<const float*>(p.partial_o), static_cast<const float*>(p.partial_lse),
                       plan.num_qo_heads, static_cast<DTypeO*>(a.o), a.lse, a.v_scale);
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
cudaError_t launch_batch_decode_gt(BatchDecodePlan& plan, const BatchDecodeRunArgs& a) {
  using T = DecodeTraits<HEAD_DIM>;
  int occ = 0;  // also makes sure this module's kernel got its shared-memory opt-in in this process
  cudaError_t err = batch_decode_occupancy<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>(a.device, &occ);
  if (err != cudaSuccess) return err;
  const BatchDecodeParams p = batch_decode_params(plan, a);
  RopeTableFor<POS> rope;
  if constexpr (POS == PosEncoding::kRopeLlama) {
    if (!plan.rope_filled || plan.rope_scale != a.rope_scale || plan.rope_theta != a.rope_theta) {
      fill_rope_table(plan.rope, HEAD_DIM, a.rope_scale, a.rope_theta);
      plan.rope_filled = true;
      plan.rope_scale = a.rope_scale;
      plan.rope_theta = a.rope_theta;
    }
    rope = plan.rope;
  }
  // Both kernels with programmatic dependent launch unless the caller turned it off (see single_decode_kernel).
  err = launch_kernel(batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>,
                      dim3(plan.workers * plan.num_kv_heads * plan.head_tiles), dim3(T::kThreads),
                      decode_smem_bytes<HEAD_DIM, GT, DTypeKV, POS>(), a.stream, a.enable_pdl, p, rope);
  if (err != cudaSuccess) return err;
  return launch_batch_merge<HEAD_DIM, DTypeO>(plan, a, p);
}

}  // namespace flashinfer

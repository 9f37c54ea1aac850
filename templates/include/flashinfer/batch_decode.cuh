// Batch decode attention over a paged KV cache, on CUDA cores.
//
// plan() (host, once per batch shape) turns the page table into a balanced work list: W "workers" per
// (kv head, query-head tile), W chosen so that every CTA of the grid is resident at once (W * heads * tiles
// = occupancy * SMs). The requests' keys, laid end to end, are cut into W runs of equal cost (keys plus a
// fixed per-piece overhead); a run holds whole requests and at most two pieces of requests split at its
// ends. So one 32k request among 127 short ones, or a batch of one, still fills the GPU. A worker's
// pieces run one after the other, each streaming its keys through a 16-byte cp.async ring (the pages are
// looked up per row); a piece that is a whole request writes the output, a piece of a split request
// writes a partial (o, lse) state that a second kernel (programmatic dependent launch) merges.
//
// Everything run() needs that changes with the batch lives in the device workspace (the plan region),
// so in CUDA-graph mode the grid (W * heads * tiles, and W merge slots) stays fixed across re-plans.
#pragma once
#include "common.cuh"
#include "cp_async.cuh"
#include "merge.cuh"
#include "page.cuh"
#include "pos_enc.cuh"

#include <math.h>
#include <string.h>

#include <type_traits>

namespace flashinfer {

// ------------------------------------------------------------------------------------------- plan layout

// Offsets (in int32 elements from the start of the plan region) of the plan's arrays; [0] holds the number
// of merges. Capacities are fixed per wrapper in graph mode, so the offsets are too.
struct BatchDecodeLayout {
  int worker_indptr;                                // [workers + 1]
  int piece_req, piece_begin, piece_end, piece_slot;  // [max_pieces]; slot -1: write the output directly
  int req_page_base, req_kv_len;                    // [max_batch]
  int merge_req, merge_begin, merge_count;          // [max_merges]
  int indices;                                      // [indices_capacity] (host indices copied along), or -1
  int total;

  static BatchDecodeLayout make(int workers, int max_pieces, int max_batch, int max_merges, int indices_capacity) {
    BatchDecodeLayout l;
    int at = 4;
    auto take = [&at](int n) {
      const int here = at;
      at += (n + 3) / 4 * 4;  // 16-byte aligned arrays
      return here;
    };
    l.worker_indptr = take(workers + 1);
    l.piece_req = take(max_pieces);
    l.piece_begin = take(max_pieces);
    l.piece_end = take(max_pieces);
    l.piece_slot = take(max_pieces);
    l.req_page_base = take(max_batch);
    l.req_kv_len = take(max_batch);
    l.merge_req = take(max_merges);
    l.merge_begin = take(max_merges);
    l.merge_count = take(max_merges);
    l.indices = indices_capacity > 0 ? take(indices_capacity) : -1;
    l.total = at;
    return l;
  }
};

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
  int num_qo_heads, num_kv_heads, group_size, head_tiles;
  float logits_soft_cap, sm_scale, v_scale;
};

template <int HEAD_DIM>
struct BatchDecodeTraits {
  static constexpr int kThreads = 128;
  static constexpr int LANES = HEAD_DIM / 8;     // threads sharing one K/V row, 8 elements each
  static constexpr int ROWS = kThreads / LANES;  // rows processed side by side
  static constexpr int TILE = 4096 / HEAD_DIM;   // tokens per stage: 8 KB of K and 8 KB of V
  static constexpr int TOKENS_PER_ROW = TILE / ROWS;
  static constexpr int STAGES = 3;
  static constexpr int COPIES = TILE * LANES / kThreads;
  static constexpr int kSmemBytes = STAGES * 2 * TILE * HEAD_DIM * 2;
  static_assert(HEAD_DIM % 64 == 0 && LANES <= 32 && TOKENS_PER_ROW >= 1, "unsupported head_dim");
};

template <int GT>
constexpr int batch_decode_min_blocks() {
  return GT <= 2 ? 4 : (GT == 4 ? 3 : 2);
}

template <PosEncoding POS>
using RopeTableFor = std::conditional_t<POS == PosEncoding::kRopeLlama, RopeTable, NoRopeTable>;

// ------------------------------------------------------------------------------------------- kernels

// KV_HND: a page holds [num_kv_heads][page_size][HEAD_DIM] (token stride HEAD_DIM); else
// [page_size][num_kv_heads][HEAD_DIM] (head stride HEAD_DIM). The page stride is free.
template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
__global__ void __launch_bounds__(BatchDecodeTraits<HEAD_DIM>::kThreads, batch_decode_min_blocks<GT>())
    batch_decode_paged_kernel(const __grid_constant__ BatchDecodeParams p, const __grid_constant__ RopeTableFor<POS> rope) {
  using T = BatchDecodeTraits<HEAD_DIM>;
  constexpr int LANES = T::LANES, ROWS = T::ROWS, TILE = T::TILE, TPR = T::TOKENS_PER_ROW, STAGES = T::STAGES;
  constexpr bool ROPE = POS == PosEncoding::kRopeLlama;
  constexpr bool ALIBI = POS == PosEncoding::kAlibi;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint4* smem = reinterpret_cast<uint4*>(smem_raw);  // [STAGES][K|V][TILE][LANES] x 16 bytes

  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  // Head tile varies fastest so that the CTAs reading the same K/V run together and share L2.
  int bid = blockIdx.x;
  const int head_tile = bid % p.head_tiles;
  bid /= p.head_tiles;
  const int kv_head = bid % p.num_kv_heads;
  const int worker = bid / p.num_kv_heads;
  const int heads_here = min(GT, p.group_size - head_tile * GT);
  const int qo_head0 = kv_head * p.group_size + head_tile * GT;
  const BatchDecodeLayout& L = p.layout;
  const int piece_first = p.plan[L.worker_indptr + worker];
  const int piece_last = p.plan[L.worker_indptr + worker + 1];

  RopeRate rate;
  if constexpr (ROPE) load_rope_rate<HEAD_DIM>(rate, rope, lane);
  float slope[GT];
#pragma unroll
  for (int j = 0; j < GT; ++j) slope[j] = ALIBI ? alibi_slope(qo_head0 + min(j, heads_here - 1), p.num_qo_heads) : 0.f;

  const int64_t stride_h = KV_HND ? p.kv.stride_h : HEAD_DIM;
  const int64_t stride_n = KV_HND ? HEAD_DIM : p.kv.stride_n;
  const DTypeKV* k_head = static_cast<const DTypeKV*>(p.kv.k) + kv_head * stride_h;
  const DTypeKV* v_head = static_cast<const DTypeKV*>(p.kv.v) + kv_head * stride_h;

  for (int piece = piece_first; piece < piece_last; ++piece) {
    const int r = p.plan[L.piece_req + piece];
    const int begin = p.plan[L.piece_begin + piece];
    const int end = p.plan[L.piece_end + piece];
    const int slot = p.plan[L.piece_slot + piece];
    const int* pages = p.kv.indices + p.plan[L.req_page_base + r];
    const int q_pos = p.plan[L.req_kv_len + r] - 1;
    const int num_tiles = ceil_div(end - begin, TILE);

    auto load_tile = [&](int tile) {
      uint4* sk = smem + (tile % STAGES) * 2 * TILE * LANES;
      uint4* sv = sk + TILE * LANES;
#pragma unroll
      for (int it = 0; it < T::COPIES; ++it) {
        const int idx = threadIdx.x + it * T::kThreads;
        const int token = begin + tile * TILE + idx / LANES;
        int page_in_req, slot_in_page;
        p.kv.page_size.divmod(token < end ? token : begin, page_in_req, slot_in_page);
        const int page = __ldg(pages + page_in_req);
        const bool valid = token < end && static_cast<unsigned>(page) < static_cast<unsigned>(p.kv.num_pages);
        // Zero-filled rows keep an in-bounds address.
        const int64_t off = valid ? int64_t(page) * p.kv.stride_page + slot_in_page * stride_n : 0;
        const int col = (idx % LANES) * 8;
        cp_async_16(sk + idx, k_head + off + col, valid);
        cp_async_16(sv + idx, v_head + off + col, valid);
      }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_tiles) load_tile(s);
      cp_async_commit();
    }

    float q[GT][8];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      // Spare slots of a partial tile repeat the last head; their results are never stored.
      const int h = qo_head0 + min(j, heads_here - 1);
      const DTypeQ* qh = static_cast<const DTypeQ*>(p.q) + r * p.q_stride_b + h * p.q_stride_h + lane * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) q[j][i] = to_float(qh[i]);
      if constexpr (ROPE) rope_rotate<LANES>(q[j], rate, float(q_pos), lane);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[j][i] *= p.sm_scale;
    }

    float m[GT], d[GT], o[GT][8];
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      m[j] = kNegInf;
      d[j] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[j][i] = 0.f;
    }

    for (int tile = 0; tile < num_tiles; ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile's data visible to all; everyone is done with the stage refilled next
      if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1);
      cp_async_commit();

      const uint4* sk = smem + (tile % STAGES) * 2 * TILE * LANES;
      const uint4* sv = sk + TILE * LANES;
      const int tile_begin = begin + tile * TILE;

      float s[GT][TPR];
#pragma unroll
      for (int t = 0; t < TPR; ++t) {
        const int tl = t * ROWS + row;
        const int token = tile_begin + tl;
        float kf[8];
        unpack8(sk[tl * LANES + lane], kf, DTypeKV{});
        if constexpr (ROPE) rope_rotate<LANES>(kf, rate, float(token), lane);
#pragma unroll
        for (int j = 0; j < GT; ++j) {
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc = fmaf(q[j][i], kf[i], acc);
          acc = group_sum<LANES>(acc);
          const float x = transform_logit<ALIBI, SOFTCAP>(acc, slope[j], token - q_pos, p.logits_soft_cap);
          s[j][t] = token < end ? x : kNegInf;
        }
      }

#pragma unroll
      for (int j = 0; j < GT; ++j) {
        float m_new = m[j];
#pragma unroll
        for (int t = 0; t < TPR; ++t) m_new = fmaxf(m_new, s[j][t]);
        const bool any = m_new != kNegInf;  // a row may see only padding in a short piece
        const float scale = any ? ptx_exp2(m[j] - m_new) : 1.f;
        d[j] *= scale;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[j][i] *= scale;
#pragma unroll
        for (int t = 0; t < TPR; ++t) {
          s[j][t] = any ? ptx_exp2(s[j][t] - m_new) : 0.f;
          d[j] += s[j][t];
        }
        m[j] = m_new;
      }

#pragma unroll
      for (int t = 0; t < TPR; ++t) {
        const int tl = t * ROWS + row;
        float vf[8];
        unpack8(sv[tl * LANES + lane], vf, DTypeKV{});
#pragma unroll
        for (int j = 0; j < GT; ++j) {
#pragma unroll
          for (int i = 0; i < 8; ++i) o[j][i] = fmaf(s[j][t], vf[i], o[j][i]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Merge the ROWS row states of each head through shared memory (the K/V ring is idle now).
    float* s_m = reinterpret_cast<float*>(smem_raw);  // [ROWS][GT]
    float* s_d = s_m + ROWS * GT;                     // [ROWS][GT]
    float* s_o = s_d + ROWS * GT;                     // [ROWS][GT][HEAD_DIM]
    static_assert((2 * ROWS * GT + ROWS * GT * HEAD_DIM) * 4 <= T::kSmemBytes, "merge scratch exceeds the ring");
#pragma unroll
    for (int j = 0; j < GT; ++j) {
      if (lane == 0) {
        s_m[row * GT + j] = m[j];
        s_d[row * GT + j] = d[j];
      }
      float4* dst = reinterpret_cast<float4*>(s_o + (row * GT + j) * HEAD_DIM + lane * 8);
      dst[0] = make_float4(o[j][0], o[j][1], o[j][2], o[j][3]);
      dst[1] = make_float4(o[j][4], o[j][5], o[j][6], o[j][7]);
    }
    __syncthreads();

    for (int item = threadIdx.x; item < GT * LANES; item += T::kThreads) {
      const int j = item / LANES, col = (item % LANES) * 8;
      if (j >= heads_here) continue;
      float m_all = kNegInf;
      for (int rr = 0; rr < ROWS; ++rr) m_all = fmaxf(m_all, s_m[rr * GT + j]);
      float d_all = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int rr = 0; rr < ROWS; ++rr) {
        const float w = ptx_exp2(s_m[rr * GT + j] - m_all);  // rows that saw only padding weigh 0
        d_all += w * s_d[rr * GT + j];
        const float* src = s_o + (rr * GT + j) * HEAD_DIM + col;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = fmaf(w, src[i], acc[i]);
      }
      const int h = qo_head0 + j;
      const float lse = m_all + ptx_log2(d_all);
      if (slot < 0) {
        const float scale = p.v_scale / d_all;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= scale;
        const int64_t out_row = int64_t(r) * p.num_qo_heads + h;
        *reinterpret_cast<uint4*>(static_cast<DTypeO*>(p.o) + out_row * HEAD_DIM + col) = pack8<DTypeO>(acc);
        if (p.lse != nullptr && col == 0) p.lse[out_row] = lse;
      } else {
        const int64_t state = int64_t(slot) * p.num_qo_heads + h;
        float* dst = p.partial_o + state * HEAD_DIM + col;
        const float inv_d = 1.f / d_all;
        reinterpret_cast<float4*>(dst)[0] = make_float4(acc[0] * inv_d, acc[1] * inv_d, acc[2] * inv_d, acc[3] * inv_d);
        reinterpret_cast<float4*>(dst)[1] = make_float4(acc[4] * inv_d, acc[5] * inv_d, acc[6] * inv_d, acc[7] * inv_d);
        if (col == 0) p.partial_lse[state] = lse;
      }
    }
    __syncthreads();  // the scratch is read before the next piece refills the ring
  }
  grid_dependency_launch_dependents();
}

// Merges the partial states of the split requests: block (head, merge m) combines the merge_count[m]
// consecutive states starting at merge_begin[m] into the output row of request merge_req[m]. Blocks
// beyond the plan's number of merges (graph mode launches a fixed number) exit.
template <int HEAD_DIM, typename DTypeO>
__global__ void __launch_bounds__(kMergeThreads)
    batch_merge_states_kernel(const int* __restrict__ plan, BatchDecodeLayout L, const float* __restrict__ partial_o,
                              const float* __restrict__ partial_lse, int num_heads, DTypeO* __restrict__ out,
                              float* __restrict__ lse_out, float v_scale) {
  constexpr int LANES = HEAD_DIM / 4;
  constexpr int GROUPS = kMergeThreads / LANES;
  __shared__ float s_lse[GROUPS];
  __shared__ float s_o[GROUPS][HEAD_DIM];

  grid_dependency_wait();
  const int head = blockIdx.x, m = blockIdx.y;
  if (m >= plan[0]) return;
  const int r = plan[L.merge_req + m], first = plan[L.merge_begin + m], count = plan[L.merge_count + m];
  const int lane = threadIdx.x % LANES, group = threadIdx.x / LANES;
  StateAccumulator<4> acc;
  for (int c = group; c < count; c += GROUPS) {
    const int64_t state = int64_t(first + c) * num_heads + head;
    const float4 v = *reinterpret_cast<const float4*>(partial_o + state * HEAD_DIM + lane * 4);
    const float vals[4] = {v.x, v.y, v.z, v.w};
    acc.add(partial_lse[state], vals);
  }
  const float inv_d = acc.d > 0.f ? 1.f / acc.d : 0.f;
  if (lane == 0) s_lse[group] = acc.lse();
#pragma unroll
  for (int i = 0; i < 4; ++i) s_o[group][lane * 4 + i] = acc.o[i] * inv_d;
  __syncthreads();
  if (group != 0) return;
  StateAccumulator<4> total;
#pragma unroll
  for (int g = 0; g < GROUPS; ++g) {
    const float vals[4] = {s_o[g][lane * 4], s_o[g][lane * 4 + 1], s_o[g][lane * 4 + 2], s_o[g][lane * 4 + 3]};
    total.add(s_lse[g], vals);
  }
  const float inv_total = total.d > 0.f ? v_scale / total.d : 0.f;
  const int64_t out_row = int64_t(r) * num_heads + head;
  float res[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) res[i] = total.o[i] * inv_total;
  DTypeO* dst = out + out_row * HEAD_DIM + lane * 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = from_float<DTypeO>(res[i]);
  if (lse_out != nullptr && lane == 0) lse_out[out_row] = total.lse();
}

// ------------------------------------------------------------------------------------------- host side

// What plan() leaves for run(): everything but the per-call pointers. Lives in host memory owned by the
// Python wrapper (a plain byte buffer of sizeof(BatchDecodePlan)).
struct BatchDecodePlan {
  int num_qo_heads, num_kv_heads, group_size, gt, head_tiles;
  int page_size, batch, workers, merge_blocks;
  BatchDecodeLayout layout;
  float logits_soft_cap, sm_scale;
  int64_t partial_o_offset, partial_lse_offset, plan_offset;  // bytes into the workspace
  void* workspace;
  const int* indices;  // device page ids (the plan region's copy, or the caller's tensor)
  RopeTable rope;
};

constexpr int kPlanInfoLen = 18;

// Plan error codes (negative; positive values are cudaError_t).
enum BatchDecodePlanError : int {
  kPlanBadIndptr = -1,        // info[7]: first bad position
  kPlanEmptyRequest = -2,     // info[7]: request
  kPlanBadLastPageLen = -3,   // info[7]: request
  kPlanWorkspaceTooSmall = -4,  // info[0]: bytes needed
  kPlanPinnedTooSmall = -5,   // info[8]: bytes needed
  kPlanNegativeIndex = -6,    // info[7]: position
  kPlanCapacity = -7,         // graph mode: batch or nnz above the frozen capacity
};

inline int& plan_occupancy_slot(int device, int gt) {
  static int cache[64][4] = {};
  const int g = gt <= 1 ? 0 : gt == 2 ? 1 : gt == 4 ? 2 : 3;
  return cache[device >= 0 && device < 64 ? device : 0][g];
}

inline int device_sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 1;
    cache[device] = n;
  }
  return cache[device];
}

inline int pick_gt(int group_size) { return group_size == 1 ? 1 : group_size == 2 ? 2 : group_size <= 4 ? 4 : 8; }

struct BatchDecodePlanArgs {
  const int* indptr;         // host [batch + 1]
  const int* last_page_len;  // host [batch]
  const int* host_indices;   // host [nnz] or nullptr (then device_indices is used as is)
  const int* device_indices;
  int batch, nnz, page_size, window_left, num_qo_heads, num_kv_heads, head_dim;
  int fixed_workers;      // > 0: graph mode, this frozen worker count; -1: graph mode, choose; 0: not graph mode
  int max_batch;          // graph mode: frozen batch capacity; 0: batch
  int indices_capacity;   // graph mode with host indices: frozen capacity; 0: nnz
  float logits_soft_cap, sm_scale, rope_scale, rope_theta;
  void* pinned;  // host staging buffer (page-locked), one of two the caller alternates between
  int64_t pinned_bytes;
  void* workspace;  // device
  int64_t workspace_bytes;
  int device;
  cudaStream_t stream;
  cudaEvent_t pinned_event;  // recorded after the copy out of `pinned`; waited on before refilling it
};

// Chooses the schedule, writes it to the pinned buffer, issues one async copy to the workspace and fills
// `plan`. info: [0] workspace bytes needed, [1] workers, [2] pieces, [3] merges, [4] max page id,
// [5] partial states used, [6] total keys, [7] bad position, [8] pinned bytes needed, [9] worker capacity.
// slots: CTAs resident at once (occupancy * SMs). A null workspace makes a dry run (no copy): the schedule
// is left in `pinned`, and info[10..17] give the layout's offsets (for tests).
template <int HEAD_DIM>
int batch_decode_plan(const BatchDecodePlanArgs& a, int slots, BatchDecodePlan* plan, int64_t* info) {
  using T = BatchDecodeTraits<HEAD_DIM>;
  constexpr int kOverhead = 32;          // per-piece cost in keys (launch of the ring, q load, output)
  constexpr int kMinWork = 4 * T::TILE;  // no worker gets less (the merge would cost more than it saves)
  constexpr int kMinPiece = T::TILE;     // no split leaves a piece shorter than this
  for (int i = 0; i < kPlanInfoLen; ++i) info[i] = 0;
  const bool graph = a.fixed_workers != 0;

  const int B = a.batch;
  const int* ip = a.indptr;
  const int* lp = a.last_page_len;
  if (ip[0] != 0) {
    info[7] = 0;
    return kPlanBadIndptr;
  }
  int64_t total_keys = 0, total_cost = 0;
  for (int r = 0; r < B; ++r) {
    const int pages = ip[r + 1] - ip[r];
    if (pages < 0) {
      info[7] = r + 1;
      return kPlanBadIndptr;
    }
    if (pages == 0) {
      info[7] = r;
      return kPlanEmptyRequest;
    }
    if (lp[r] < 1 || lp[r] > a.page_size) {
      info[7] = r;
      return kPlanBadLastPageLen;
    }
    const int64_t len = int64_t(pages - 1) * a.page_size + lp[r];
    const int64_t span = a.window_left >= 0 && len > int64_t(a.window_left) + 1 ? int64_t(a.window_left) + 1 : len;
    total_keys += span;
    total_cost += span + kOverhead;
  }

  const int group = a.num_qo_heads / a.num_kv_heads;
  const int gt = pick_gt(group);
  const int head_tiles = ceil_div(group, gt);
  const int ctas_per_worker = a.num_kv_heads * head_tiles;
  int workers = a.fixed_workers;
  if (workers <= 0) workers = slots / ctas_per_worker;
  if (workers < 1) workers = 1;
  const int max_batch = a.max_batch > 0 ? a.max_batch : B;
  if (B > max_batch) return kPlanCapacity;
  const int max_pieces = max_batch + workers;
  const int max_partials = workers > 1 ? 2 * workers : 0;
  const int max_merges = workers;
  int indices_capacity = 0;
  if (a.host_indices != nullptr) {
    indices_capacity = a.indices_capacity > 0 ? a.indices_capacity : a.nnz;
    if (a.nnz > indices_capacity) return kPlanCapacity;
  }
  const BatchDecodeLayout L = BatchDecodeLayout::make(workers, max_pieces, max_batch, max_merges, indices_capacity);

  const int64_t partial_o_bytes = int64_t(max_partials) * a.num_qo_heads * HEAD_DIM * 4;
  const int64_t partial_lse_bytes = int64_t(max_partials) * a.num_qo_heads * 4;
  const int64_t plan_offset = (partial_o_bytes + partial_lse_bytes + 255) / 256 * 256;
  const int64_t plan_bytes = int64_t(L.total) * 4;
  info[0] = plan_offset + plan_bytes;
  info[8] = plan_bytes;
  if (info[0] > a.workspace_bytes) return kPlanWorkspaceTooSmall;
  if (info[8] > a.pinned_bytes) return kPlanPinnedTooSmall;

  // The caller alternates between two staging buffers; this one's last copy (two plans ago) has almost
  // always run by now, else wait for it rather than overwrite bytes still to be copied.
  int* h = static_cast<int*>(a.pinned);
  if (a.workspace != nullptr && a.pinned_event != nullptr && cudaEventQuery(a.pinned_event) == cudaErrorNotReady) {
    cudaError_t err = cudaEventSynchronize(a.pinned_event);
    if (err != cudaSuccess) return err;
  }

  // Workers actually given work: enough that each has at least kMinWork (the rest exit at once).
  int64_t used = (total_cost + kMinWork - 1) / kMinWork;
  const int workers_used = static_cast<int>(used < workers ? (used < 1 ? 1 : used) : workers);
  // Each worker's budget is the cost still unassigned over the workers still open (so slack left by the
  // piece-length rules never piles up on the last one); a split adds one piece, hence one overhead, per worker.
  int64_t remaining = total_cost + int64_t(workers_used - 1) * kOverhead;
  auto budget_of = [&](int w) { return (remaining + (workers_used - w) - 1) / (workers_used - w); };

  int* worker_indptr = h + L.worker_indptr;
  int* piece_req = h + L.piece_req;
  int* piece_begin = h + L.piece_begin;
  int* piece_end = h + L.piece_end;
  int* piece_slot = h + L.piece_slot;
  int pieces = 0, merges = 0, partials = 0, w = 0;
  int64_t load = 0, budget = budget_of(0);  // cost given to worker w so far, and its share
  worker_indptr[0] = 0;
  auto close_worker = [&]() {
    worker_indptr[++w] = pieces;
    load = 0;
    budget = budget_of(w);
  };
  for (int r = 0; r < B; ++r) {
    const int len = (ip[r + 1] - ip[r] - 1) * a.page_size + lp[r];
    int b = a.window_left >= 0 && len > a.window_left + 1 ? len - 1 - a.window_left : 0;
    const int e = len;
    h[L.req_page_base + r] = ip[r];
    h[L.req_kv_len + r] = len;
    const int first_piece = pieces;
    while (b < e) {
      const int64_t room = budget - load - kOverhead;
      int take = e - b;
      if (w < workers_used - 1 && room < take) {
        if (room < kMinPiece) {  // close this worker; the request starts on the next one
          close_worker();
          continue;
        }
        take = (e - b - room < kMinPiece) ? e - b : static_cast<int>(room);
      }
      piece_req[pieces] = r;
      piece_begin[pieces] = b;
      piece_end[pieces] = b + take;
      piece_slot[pieces] = -1;
      ++pieces;
      b += take;
      load += take + kOverhead;
      remaining -= take + kOverhead;
      if (b < e) close_worker();  // the worker is full
    }
    const int n = pieces - first_piece;
    if (n > 1) {
      h[L.merge_req + merges] = r;
      h[L.merge_begin + merges] = partials;
      h[L.merge_count + merges] = n;
      ++merges;
      for (int i = first_piece; i < pieces; ++i) piece_slot[i] = partials++;
    }
  }
  while (w < workers) worker_indptr[++w] = pieces;
  h[0] = merges;
  h[1] = pieces;
  h[2] = workers_used;
  h[3] = 0;

  int64_t max_index = -1;
  if (a.host_indices != nullptr) {
    int* dst = h + L.indices;
    for (int i = 0; i < a.nnz; ++i) {
      const int v = a.host_indices[i];
      if (v < 0) {
        info[7] = i;
        return kPlanNegativeIndex;
      }
      if (v > max_index) max_index = v;
      dst[i] = v;
    }
  }
  const int64_t copy_bytes = int64_t(a.host_indices != nullptr ? L.indices + a.nnz : L.total) * 4;
  char* dev_plan = static_cast<char*>(a.workspace) + plan_offset;
  if (a.workspace != nullptr) {
    cudaError_t err = cudaMemcpyAsync(dev_plan, h, copy_bytes, cudaMemcpyHostToDevice, a.stream);
    if (err != cudaSuccess) return err;
    if (a.pinned_event != nullptr && (err = cudaEventRecord(a.pinned_event, a.stream)) != cudaSuccess) return err;
  }

  plan->num_qo_heads = a.num_qo_heads;
  plan->num_kv_heads = a.num_kv_heads;
  plan->group_size = group;
  plan->gt = gt;
  plan->head_tiles = head_tiles;
  plan->page_size = a.page_size;
  plan->batch = B;
  plan->workers = graph ? workers : workers_used;  // graph mode: a fixed grid; idle workers exit at once
  plan->merge_blocks = graph ? max_merges : merges;
  plan->layout = L;
  plan->logits_soft_cap = a.logits_soft_cap;
  plan->sm_scale = a.sm_scale;
  plan->partial_o_offset = 0;
  plan->partial_lse_offset = partial_o_bytes;
  plan->plan_offset = plan_offset;
  plan->workspace = a.workspace;
  plan->indices = a.host_indices != nullptr ? reinterpret_cast<const int*>(dev_plan) + L.indices : a.device_indices;
  fill_rope_table(plan->rope, HEAD_DIM, a.rope_scale, a.rope_theta);
  info[1] = workers_used;
  info[2] = pieces;
  info[3] = merges;
  info[4] = max_index;
  info[5] = partials;
  info[6] = total_keys;
  info[9] = workers;
  const int offsets[8] = {L.worker_indptr, L.piece_req, L.piece_begin, L.piece_end,
                          L.piece_slot,    L.merge_req, L.merge_begin, L.merge_count};
  for (int i = 0; i < 8; ++i) info[10 + i] = offsets[i];
  return 0;
}

struct BatchDecodeRunArgs {
  const void* q;
  int64_t q_stride_b, q_stride_h;
  const void* k;
  const void* v;
  int64_t stride_page, stride_n, stride_h;
  int num_pages;
  void* o;
  float* lse;
  float scale_mult, v_scale;
  int device;
  cudaStream_t stream;
};

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
cudaError_t batch_decode_occupancy(int device, int* out) {
  int& occ = plan_occupancy_slot(device, GT);
  if (occ == 0) {
    using T = BatchDecodeTraits<HEAD_DIM>;
    int n = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>, T::kThreads, T::kSmemBytes);
    if (err != cudaSuccess) return err;
    occ = n > 0 ? n : 1;
  }
  *out = occ;
  return cudaSuccess;
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
cudaError_t launch_batch_decode_gt(const BatchDecodePlan& plan, const BatchDecodeRunArgs& a) {
  using T = BatchDecodeTraits<HEAD_DIM>;
  BatchDecodeParams p;
  p.q = a.q;
  p.q_stride_b = a.q_stride_b;
  p.q_stride_h = a.q_stride_h;
  p.kv.k = a.k;
  p.kv.v = a.v;
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
  p.num_qo_heads = plan.num_qo_heads;
  p.num_kv_heads = plan.num_kv_heads;
  p.group_size = plan.group_size;
  p.head_tiles = plan.head_tiles;
  p.logits_soft_cap = plan.logits_soft_cap;
  p.sm_scale = plan.sm_scale * a.scale_mult;
  p.v_scale = a.v_scale;
  RopeTableFor<POS> rope;
  if constexpr (POS == PosEncoding::kRopeLlama) rope = plan.rope;
  const int grid = plan.workers * plan.num_kv_heads * plan.head_tiles;
  batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>
      <<<grid, T::kThreads, T::kSmemBytes, a.stream>>>(p, rope);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.merge_blocks == 0) return err;

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(plan.num_qo_heads, plan.merge_blocks);
  config.blockDim = dim3(kMergeThreads);
  config.dynamicSmemBytes = 0;
  config.stream = a.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, batch_merge_states_kernel<HEAD_DIM, DTypeO>, p.plan, p.layout,
                            static_cast<const float*>(p.partial_o), static_cast<const float*>(p.partial_lse),
                            plan.num_qo_heads, static_cast<DTypeO*>(a.o), a.lse, a.v_scale);
}

// Runs fn under a guard for `device` (the tensors' device, not necessarily the current one).
template <typename F>
cudaError_t with_device(int device, F&& fn) {
  int previous = -1;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (previous != device && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  err = fn();
  if (previous != device) cudaSetDevice(previous);
  return err;
}

}  // namespace flashinfer

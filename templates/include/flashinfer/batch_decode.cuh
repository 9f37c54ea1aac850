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
// A request without keys (no pages, as engines pad CUDA-graph batches) gets one empty piece: output 0,
// lse -inf. The logit options (scale, soft cap, RoPE constants) and a narrower sliding window are run-time
// arguments: a legacy forward() may change them without a new plan.
#pragma once
#include "decode.cuh"
#include "page.cuh"

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
  const BatchDecodeParams& p;
  const int* pages;  // this request's page ids
  int kv_head;
  FI_DEVICE int64_t head_offset() const { return kv_head * (KV_HND ? p.kv.stride_h : int64_t(HEAD_DIM)); }
  FI_DEVICE const DTypeKV* k() const { return static_cast<const DTypeKV*>(p.kv.k) + head_offset(); }
  FI_DEVICE const DTypeKV* v() const { return static_cast<const DTypeKV*>(p.kv.v) + head_offset(); }
  FI_DEVICE bool offsets(int token, int64_t& off_k, int64_t& off_v) const {
    int page_in_req, slot;
    p.kv.page_size.divmod(token, page_in_req, slot);
    const int page = __ldg(pages + page_in_req);
    if (static_cast<unsigned>(page) >= static_cast<unsigned>(p.kv.num_pages)) return false;
    off_k = off_v = int64_t(page) * p.kv.stride_page + slot * (KV_HND ? int64_t(HEAD_DIM) : p.kv.stride_n);
    return true;
  }
};

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
__global__ void __launch_bounds__(DecodeTraits<HEAD_DIM>::kThreads, decode_min_blocks<HEAD_DIM, GT, POS>())
    batch_decode_paged_kernel(const __grid_constant__ BatchDecodeParams p, const __grid_constant__ RopeTableFor<POS> rope) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // Launched with programmatic dependent launch (see single_decode_kernel).
  grid_dependency_wait();
  grid_dependency_launch_dependents();
  // Head tile varies fastest so that the CTAs reading the same K/V run together.
  int bid = blockIdx.x;
  const int head_tile = bid % p.head_tiles;
  bid /= p.head_tiles;
  const int kv_head = bid % p.num_kv_heads;
  const int worker = bid / p.num_kv_heads;
  const int qo_head0 = kv_head * p.group_size + head_tile * GT;
  const BatchDecodeLayout& L = p.layout;
  const int piece_last = p.plan[L.worker_indptr + worker + 1];
  for (int piece = p.plan[L.worker_indptr + worker]; piece < piece_last; ++piece) {
    const int r = p.plan[L.piece_req + piece];
    const PagedRows<HEAD_DIM, DTypeKV, KV_HND> rows{p, p.kv.indices + p.plan[L.req_page_base + r], kv_head};
    DecodePiece<DTypeQ> w;
    w.q = static_cast<const DTypeQ*>(p.q) + r * p.q_stride_b + qo_head0 * p.q_stride_h;
    w.q_stride_h = p.q_stride_h;
    w.first_head = qo_head0;
    w.heads_here = min(GT, p.group_size - head_tile * GT);
    w.begin = p.plan[L.piece_begin + piece];
    w.end = p.plan[L.piece_end + piece];
    w.q_pos = p.plan[L.req_kv_len + r] - 1;
    if (p.window_left >= 0) w.begin = max(w.begin, min(w.end, w.q_pos - p.window_left));
    // The store reads the piece's request and slot again from the plan when it runs (see single decode).
    const auto store = [&](int j, int col, float(&acc)[8], float d_all, float lse) {
      const int req = p.plan[L.piece_req + piece], slot = p.plan[L.piece_slot + piece];
      const int h = qo_head0 + j;
      const int64_t out_row = int64_t(req) * p.sc.num_qo_heads + h;
      const int64_t state = int64_t(slot) * p.sc.num_qo_heads + h;
      const bool split = slot >= 0;
      store_decode_state<HEAD_DIM>(acc, d_all, lse, p.sc.v_scale, col, static_cast<DTypeO*>(p.o) + out_row * HEAD_DIM,
                                   p.lse != nullptr ? p.lse + out_row : nullptr,
                                   split ? p.partial_o + state * HEAD_DIM : nullptr,
                                   split ? p.partial_lse + state : nullptr);
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

// What plan() leaves for run(): everything but the per-call pointers. Lives in host memory owned by the
// Python wrapper (a plain byte buffer of sizeof(BatchDecodePlan)).
struct BatchDecodePlan {
  int num_qo_heads, num_kv_heads, group_size, gt, head_tiles;
  int page_size, batch, workers, merge_blocks;
  BatchDecodeLayout layout;
  int64_t partial_o_offset, partial_lse_offset, plan_offset;  // bytes into the workspace
  void* workspace;
  const int* indices;  // device page ids (the plan region's copy, or the caller's tensor)
  RopeTable rope;
  // The (rope_scale, rope_theta) `rope` was filled for (by run(), RoPE variants only): its HEAD_DIM/2 pow()
  // calls would cost more than the launch, and an engine runs with the same values every step.
  bool rope_filled;
  float rope_scale, rope_theta;
};

// What a plan reports (the int64 info array; Python reads the positions from the module's constants).
enum BatchDecodePlanInfo : int {
  kInfoWorkspaceBytes,  // workspace bytes the plan needs
  kInfoWorkers,         // workers given work
  kInfoPieces,
  kInfoMerges,
  kInfoMaxIndex,       // largest host page id, -1 when the ids stay on the device
  kInfoPartialStates,
  kInfoTotalKeys,
  kInfoBadPosition,    // the request or position an error names
  kInfoPinnedBytes,    // staging bytes the plan needs
  kInfoWorkerCapacity,  // workers of the grid (graph mode: fixed)
  kInfoMaxKeys,         // keys of the longest request
  // Offsets (int32 elements) of the schedule's arrays in the plan region (for host_schedule).
  kInfoWorkerIndptr,
  kInfoPieceReq,
  kInfoPieceBegin,
  kInfoPieceEnd,
  kInfoPieceSlot,
  kInfoMergeReq,
  kInfoMergeBegin,
  kInfoMergeCount,
  kPlanInfoLen
};

// Plan error codes (negative; positive values are cudaError_t).
enum BatchDecodePlanError : int {
  kPlanBadIndptr = -1,          // info[kInfoBadPosition]: first bad position
  kPlanBadLastPageLen = -3,     // info[kInfoBadPosition]: request
  kPlanWorkspaceTooSmall = -4,  // info[kInfoWorkspaceBytes]: bytes needed
  kPlanPinnedTooSmall = -5,     // info[kInfoPinnedBytes]: bytes needed
  kPlanNegativeIndex = -6,      // info[kInfoBadPosition]: position
  kPlanCapacity = -7,           // graph mode: batch or nnz above the frozen capacity
};

// `static`: per-module caches (see sm_count in decode.cuh).
static int& plan_occupancy_slot(int device, int gt) {
  static int cache[64][4] = {};
  const int g = gt <= 1 ? 0 : gt == 2 ? 1 : gt == 4 ? 2 : 3;
  return cache[device >= 0 && device < 64 ? device : 0][g];
}


// Filled by Python field by field (flashinfer/_planning.py: DECODE_PLAN_ARGS names the fields; the template
// exports their offsets, which Python checks when it loads the module).
struct BatchDecodePlanArgs {
  const int* indptr;         // host [batch + 1]
  const int* last_page_len;  // host [batch]
  const int* host_indices;   // host [nnz] or nullptr (then device_indices is used as is)
  const int* device_indices;
  int batch, nnz, page_size, window_left, num_qo_heads, num_kv_heads, head_dim;
  int fixed_workers;      // > 0: graph mode, this frozen worker count; -1: graph mode, choose; 0: not graph mode
  int max_batch;          // graph mode: frozen batch capacity; 0: batch
  int indices_capacity;   // graph mode with host indices: frozen capacity; 0: nnz
  bool no_split;          // every request in one piece (disable_split_kv: no merges, run-to-run identical sums)
  void* pinned;  // host staging buffer (page-locked), one of two the caller alternates between
  int64_t pinned_bytes;
  void* workspace;  // device
  int64_t workspace_bytes;
  int device;
  cudaStream_t stream;
  cudaEvent_t pinned_event;  // recorded after the copy out of `pinned`; waited on before refilling it
};

// Chooses the schedule, writes it to the pinned buffer, issues one async copy to the workspace and fills
// `plan`; `info` gets the BatchDecodePlanInfo fields. slots: CTAs resident at once (occupancy * SMs). A null
// workspace makes a dry run (no copy): the schedule is left in `pinned` at the offsets info reports.
// A request's keys: 0 without pages (whatever its last_page_len), else (pages - 1) * page_size +
// last_page_len with last_page_len in [0, page_size] (larger would read past its pages).
template <int HEAD_DIM>
int batch_decode_plan(const BatchDecodePlanArgs& a, int slots, BatchDecodePlan* plan, int64_t* info) {
  using T = DecodeTraits<HEAD_DIM>;
  constexpr int kOverhead = 32;          // per-piece cost in keys (launch of the ring, q load, output)
  constexpr int kMinWork = 4 * T::TILE;  // no worker gets less (the merge would cost more than it saves)
  constexpr int kMinPiece = T::TILE;     // no split leaves a piece shorter than this
  for (int i = 0; i < kPlanInfoLen; ++i) info[i] = 0;
  const bool graph = a.fixed_workers != 0;

  const int B = a.batch;
  const int* ip = a.indptr;
  const int* lp = a.last_page_len;
  if (ip[0] != 0) {
    info[kInfoBadPosition] = 0;
    return kPlanBadIndptr;
  }
  auto keys_of = [&](int r) -> int64_t {
    const int pages = ip[r + 1] - ip[r];
    return pages == 0 ? 0 : int64_t(pages - 1) * a.page_size + lp[r];
  };
  int64_t total_keys = 0, total_cost = 0, max_keys = 0;
  for (int r = 0; r < B; ++r) {
    const int pages = ip[r + 1] - ip[r];
    if (pages < 0) {
      info[kInfoBadPosition] = r + 1;
      return kPlanBadIndptr;
    }
    if (pages > 0 && (lp[r] < 0 || lp[r] > a.page_size)) {
      info[kInfoBadPosition] = r;
      return kPlanBadLastPageLen;
    }
    const int64_t len = keys_of(r);
    max_keys = len > max_keys ? len : max_keys;
    const int64_t span = a.window_left >= 0 && len > int64_t(a.window_left) + 1 ? int64_t(a.window_left) + 1 : len;
    total_keys += span;
    total_cost += span + kOverhead;
  }

  const int group = a.num_qo_heads / a.num_kv_heads;
  const int gt = decode_head_tile(group);
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
  info[kInfoWorkspaceBytes] = plan_offset + plan_bytes;
  info[kInfoPinnedBytes] = plan_bytes;
  if (info[kInfoWorkspaceBytes] > a.workspace_bytes) return kPlanWorkspaceTooSmall;
  if (info[kInfoPinnedBytes] > a.pinned_bytes) return kPlanPinnedTooSmall;

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
    const int len = static_cast<int>(keys_of(r));
    int b = a.window_left >= 0 && len > a.window_left + 1 ? len - 1 - a.window_left : 0;
    const int e = len;
    h[L.req_page_base + r] = ip[r];
    h[L.req_kv_len + r] = len;
    const int first_piece = pieces;
    if (len == 0) {  // no keys: one empty piece writes o = 0, lse = -inf
      piece_req[pieces] = r;
      piece_begin[pieces] = piece_end[pieces] = 0;
      piece_slot[pieces] = -1;
      ++pieces;
      load += kOverhead;
      remaining -= kOverhead;
      continue;
    }
    while (b < e) {
      const int64_t room = budget - load - kOverhead;
      int take = e - b;
      if (w < workers_used - 1 && room < take) {
        if (room < kMinPiece || (a.no_split && load > 0)) {  // close this worker; the request starts on the next
          close_worker();
          continue;
        }
        if (!a.no_split) take = (e - b - room < kMinPiece) ? e - b : static_cast<int>(room);
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
        info[kInfoBadPosition] = i;
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
  plan->partial_o_offset = 0;
  plan->partial_lse_offset = partial_o_bytes;
  plan->plan_offset = plan_offset;
  plan->workspace = a.workspace;
  plan->indices = a.host_indices != nullptr ? reinterpret_cast<const int*>(dev_plan) + L.indices : a.device_indices;
  info[kInfoWorkers] = workers_used;
  info[kInfoPieces] = pieces;
  info[kInfoMerges] = merges;
  info[kInfoMaxIndex] = max_index;
  info[kInfoPartialStates] = partials;
  info[kInfoTotalKeys] = total_keys;
  info[kInfoWorkerCapacity] = workers;
  info[kInfoMaxKeys] = max_keys;
  info[kInfoWorkerIndptr] = L.worker_indptr;
  info[kInfoPieceReq] = L.piece_req;
  info[kInfoPieceBegin] = L.piece_begin;
  info[kInfoPieceEnd] = L.piece_end;
  info[kInfoPieceSlot] = L.piece_slot;
  info[kInfoMergeReq] = L.merge_req;
  info[kInfoMergeBegin] = L.merge_begin;
  info[kInfoMergeCount] = L.merge_count;
  return 0;
}

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
cudaError_t batch_decode_occupancy(int device, int* out) {
  int& occ = plan_occupancy_slot(device, GT);
  if (occ == 0) {  // first use on this device: opt in to > 48 KB of shared memory, then ask what fits
    auto kernel = batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>;
    constexpr int smem_bytes = decode_smem_bytes<HEAD_DIM, GT>();
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, DecodeTraits<HEAD_DIM>::kThreads, smem_bytes);
    if (err != cudaSuccess) return err;
    occ = n > 0 ? n : 1;
  }
  *out = occ;
  return cudaSuccess;
}

template <int HEAD_DIM, int GT, typename DTypeQ, typename DTypeKV, typename DTypeO, bool KV_HND, PosEncoding POS,
          bool SOFTCAP>
cudaError_t launch_batch_decode_gt(BatchDecodePlan& plan, const BatchDecodeRunArgs& a) {
  using T = DecodeTraits<HEAD_DIM>;
  int occ = 0;  // also makes sure this module's kernel got its shared-memory opt-in in this process
  cudaError_t err = batch_decode_occupancy<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>(a.device, &occ);
  if (err != cudaSuccess) return err;
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
  p.sc.num_qo_heads = plan.num_qo_heads;
  p.num_kv_heads = plan.num_kv_heads;
  p.group_size = plan.group_size;
  p.head_tiles = plan.head_tiles;
  p.sc.logits_soft_cap = a.logits_soft_cap;
  p.sc.sm_scale = a.sm_scale;
  p.sc.v_scale = a.v_scale;
  p.window_left = a.window_left;
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
  cudaLaunchAttribute pdl[1];
  pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(plan.workers * plan.num_kv_heads * plan.head_tiles);
  config.blockDim = dim3(T::kThreads);
  config.dynamicSmemBytes = decode_smem_bytes<HEAD_DIM, GT>();
  config.stream = a.stream;
  config.attrs = pdl;
  config.numAttrs = a.enable_pdl ? 1 : 0;
  err = cudaLaunchKernelEx(&config, batch_decode_paged_kernel<HEAD_DIM, GT, DTypeQ, DTypeKV, DTypeO, KV_HND, POS, SOFTCAP>,
                           p, rope);
  if (err != cudaSuccess || plan.merge_blocks == 0) return err;

  config.gridDim = dim3(plan.num_qo_heads, plan.merge_blocks);
  config.blockDim = dim3(kMergeThreads);
  config.dynamicSmemBytes = 0;
  return cudaLaunchKernelEx(&config, batch_merge_states_kernel<HEAD_DIM, DTypeO>, p.plan, p.layout,
                            static_cast<const float*>(p.partial_o), static_cast<const float*>(p.partial_lse),
                            plan.num_qo_heads, static_cast<DTypeO*>(a.o), a.lse, a.v_scale);
}

}  // namespace flashinfer

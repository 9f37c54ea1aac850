// The batch decode planner (host side of attention/batch_decode.cuh): turns a batch's page table into the
// balanced work list the paged decode kernel walks (see batch_decode.cuh for the scheme), and the layout of
// that list in the device workspace. A request without keys (no pages, as engines pad CUDA-graph batches) gets
// one empty piece: output 0, lse -inf. The logit options (scale, soft cap, RoPE constants) and a narrower
// sliding window are run-time arguments: a legacy forward() may change them without a new plan.
#pragma once
#include "flashinfer/attention/decode.cuh"
#include "flashinfer/attention/pos_enc.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/paged.cuh"

#include <cuda_runtime.h>
#include <stdint.h>

namespace flashinfer {

// Offsets (in int32 elements from the start of the plan region) of the plan's arrays; [0] holds the number
// of merges. Capacities are fixed per wrapper in graph mode, so the offsets are too.
struct BatchDecodeLayout {
  int worker_indptr;                                  // [workers + 1]
  int piece_req, piece_begin, piece_end, piece_slot;  // [max_pieces]; slot -1: write the output directly
  int req_page_base, req_kv_len;                      // [max_batch]
  int merge_req, merge_begin, merge_count;            // [max_merges]
  int indices;                                        // [indices_capacity] (host indices copied along), or -1
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
  bool tma;  // run on batch_decode_tma_kernel (batch_decode_tma.cuh), planned for one CTA an SM
};

// What a plan reports (the int64 info array; Python reads the positions from the module's constants).
enum BatchDecodePlanInfo : int {
  kInfoWorkspaceBytes,  // workspace bytes the plan needs
  kInfoWorkers,         // workers given work
  kInfoPieces,
  kInfoMerges,
  kInfoMaxIndex,  // largest host page id, -1 when the ids stay on the device
  kInfoPartialStates,
  kInfoTotalKeys,       // (kPlanKvTooLong: the keys of the request named by kInfoBadPosition)
  kInfoBadPosition,     // the request or position an error names
  kInfoPinnedBytes,     // staging bytes the plan needs
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
  kInfoTma,  // 1: the plan runs on the TMA kernel
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
  kPlanKvTooLong = -8,          // info[kInfoBadPosition]: request; info[kInfoTotalKeys]: its keys (above kMaxKvLen)
};

// Keys of one request: positions are int32 in the kernels, and a KV tile step past the last key must not
// overflow. The lengths are computed in 64-bit (page ids may repeat, so nothing else bounds them).
constexpr int64_t kMaxKvLen = (int64_t(1) << 31) - (int64_t(1) << 16);

// Filled by Python field by field (flashinfer/_planning.py: DECODE_PLAN_ARGS names the fields; the template
// exports their offsets, which Python checks when it loads the module).
struct BatchDecodePlanArgs {
  const int* indptr;         // host [batch + 1]
  const int* last_page_len;  // host [batch]
  const int* host_indices;   // host [nnz] or nullptr (then device_indices is used as is)
  const int* device_indices;
  int batch, nnz, page_size, window_left, num_qo_heads, num_kv_heads, head_dim;
  int fixed_workers;     // > 0: graph mode, this frozen worker count; -1: graph mode, choose; 0: not graph mode
  int max_batch;         // graph mode: frozen batch capacity; 0: batch
  int indices_capacity;  // graph mode with host indices: frozen capacity; 0: nnz
  bool no_split;         // every request in one piece (disable_split_kv: no merges, run-to-run identical sums)
  int max_ctas;          // > 0: the TMA kernel's grid on at most this many SMs (the rest left to a concurrent kernel)
  void* pinned;          // host staging buffer (page-locked), one of two the caller alternates between
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
    const int64_t len = pages == 0 ? 0 : int64_t(pages - 1) * a.page_size + lp[r];
    if (len > kMaxKvLen) {
      info[kInfoBadPosition] = r;
      info[kInfoTotalKeys] = len;
      return kPlanKvTooLong;
    }
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
    const int len = paged_kv_len(ip[r + 1] - ip[r], a.page_size, lp[r]);
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

  plan->tma = false;  // (the module's plan entry decides)
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

}  // namespace flashinfer

// Warp-specialised prefill attention on Hopper (sm_90a): TMA producer, two wgmma consumer warpgroups, a persistent
// grid. The "fa3_ws" backend of single-request prefill and of ragged and paged batch prefill (backend="fa3_ws", and
// "auto" where prefill.py measured it faster; "fa3" is prefill_sm90.cuh). One kernel, templated on BATCH (where a
// work item comes from) and PAGED (how K/V tiles reach shared memory: TMA boxes over the whole K/V, boxes of whole
// pages, or rows gathered through the page table).
//
// ---- Roles (one CTA per SM, 384 threads = 3 warpgroups)
//   warpgroup 0, producer (setmaxnreg.dec to kProducerRegs, fp8 kProducerRegsFp8): all 128 threads copy each work
//     item's query tile into shared memory with cp.async (packed GQA rows are not a TMA box); thread 0 alone
//     issues the K and V tiles of the item as TMA boxes into a kStages-deep ring (K(0) before the wait for the Q
//     slot, V(0) after its own Q copies, the rest once Q has landed). fp8 K/V ("dequantise in the
//     producer"): thread 0 issues each fp8 tile as one TMA box of whole rows (head_dim bytes, unswizzled) into a
//     staging tile of K or of V, and all 128 threads widen it (fp8 -> float16, exact) into the ring's 16-bit swizzled
//     slot; the consumers read float16 there as they read q's type otherwise. Each
//     thread loads its whole share of the staged tile into registers (8 x 16 bytes), the staging tile goes back to TMA
//     for the next tile at once, and only then does the thread wait for the ring slot and convert and store: the
//     registers are a second staging tile, and the copy of tile n + 1 runs under the wait for slot n and the widening
//     of tile n (e4m3: the conversion instruction; e5m2: byte permutes, common.cuh). The tiles are widened in the
//     consumers' order of use: an item's K(0) before its Q is copied, then K(n + 1) before V(n).
//   warpgroups 1 and 2, consumers (setmaxnreg.inc to kConsumerRegs, fp8 kConsumerRegsFp8): 64 packed query rows
//     each of the item's 128, S = Q K^T and O += P V on wgmma, the online softmax in registers, the epilogue.
//
// ---- Work items (persistent grid): w = blockIdx.x, + gridDim.x, ...
//   Single: item w = (query tile, KV head), KV heads in groups (kHeadGroup: full attention one head at a time,
//     causal all heads), a group's heads interleaved and its last query tiles first (they see the most keys under a
//     causal mask).
//     The producer and the consumers compute the same sequence independently from the parameters.
//   Batch: item w = (plan piece w / num_kv_heads, KV head); a piece is (request, query tile, kv begin,
//     kv end, partial row) from the Python planner's schedule (schedule_prefill: a request's keys cut into chunks
//     when the query tiles alone cannot fill the GPU; a chunk's items write float32 partial states, which the
//     module's prefill_merge_kernel combines), each request's pieces together, heaviest first. The producer reads the
//     piece and the request's qo/kv indptr entries from device memory ahead of the consumers (while they finish the
//     previous item) and hands the item's geometry over in shared memory with the Q tile (written by producer thread 0
//     before its q_full arrival; the consumers read it once after q_full, and every consumer thread that read it
//     arrives on q_empty itself, after which the producer may overwrite it). Queries and outputs sit at the
//     request's qo_indptr offset; K/V boxes start at kv_indptr[request] + key offset in tensor maps over the
//     whole ragged K/V, so a tile that runs past the request reads the next request's rows (or TMA's zeros
//     past the tensor's end): the key bound hi (the request's kv_len) masks them, as it masks a single
//     request's last tile. Causal aligned to the request's end (query i sees keys <= i + kv_len - qo_len);
//     rows that see no key (kv_len 0, or the first qo_len - kv_len rows) get O = 0 and lse = -inf.
//
// ---- Shared memory: Q (128 rows), O staging (128 rows), K[kStages], V[kStages] (BK rows each), all in the
//   wgmma 128-byte-swizzled layout (wgmma.cuh), fp8 only: the staging tiles of K and of V (BK rows of head_dim
//   bytes each), then the mbarriers, then (ragged) the current item's geometry. 16-bit single: 192 KB + 80 B; fp8:
//   224 KB + 96 B of the 227 KB (smem_bytes). The fp8 staging is one tile deep per operand in shared memory (two
//   would not fit beside two 16-bit stages); the producer's registers hold a second one (above): the copy of tile
//   n + 1 is issued as soon as tile n is loaded into registers, and runs while the producer waits for a free ring
//   slot and writes it.
//
// ---- Barriers, who arrives and who waits (parities: mbarrier.cuh). `it` counts the KV tiles a role has gone
//   through since the kernel started (over all its items); tile `it` sits in ring slot s = it % kStages, and
//   that slot's barriers are in the phase of parity ph = (it / kStages) & 1 for it. `j` counts the items.
//     k_full[s], v_full[s]  count 1: the producer's arrive.expect_tx(tile bytes), plus the TMA bytes. Paged:
//                           count 128, every producer thread arrives once its gathered rows have landed (a
//                           tile of page boxes: each issuing thread's arrive.expect_tx of its boxes' bytes, the
//                           others' plain arrivals).
//                           Consumers wait(ph) before reading the slot. fp8: count 128, every producer thread
//                           arrives after its share of the widened tile (then fence.proxy.async: wgmma reads it).
//     k_staged, v_staged    fp8 only, count 1: thread 0's arrive.expect_tx(fp8 tile bytes), plus the TMA bytes.
//                           Every producer thread waits(it & 1) before widening tile `it`; thread 0 refills the
//                           staging tile only after named barrier 5 (the 128 producer threads) says that every
//                           thread has read it (by default: loaded it into registers, before the slot's wait).
//     k_empty[s], v_empty[s] count kConsumerWarps: lane 0 of every consumer warp arrives once the wgmma
//                           reading the slot has completed (after its wgmma_wait). The producer waits(ph ^ 1)
//                           before refilling the slot (the first pass, parity 1 of a fresh barrier, is free).
//     q_full                count 128: every producer thread arrives after its Q copies landed
//                           (cp.async.wait_group 0, then fence.proxy.async so wgmma sees them). Consumers
//                           wait(j & 1).
//     q_empty               count kConsumerWarps (batches: 256, every consumer thread, each releasing its own read of
//                           the item's hand-over slot): after the item's last S = Q K^T completed. The producer
//                           waits((j & 1) ^ 1) before copying the next item's Q (the next Q is thus loaded
//                           while the consumers finish the current item's softmax, P V and epilogue).
//   Named barriers 1 and 2 (128 threads): one consumer warpgroup's epilogue (its own 64 rows of O staging);
//   3 and 4 (256 threads): the consumers' turns with -DFI_WS_PINGPONG=1 (off by default); 5 (128 threads, fp8
//   only): the producer warpgroup's own (a staging tile read by all, a bfloat16 Q tile copied by all, see below).
//   No block-wide barrier after the initial one: the producer may run ahead by kStages tiles and one Q.
//
// ---- Consumer loop (intra-warpgroup overlap: S(n) on the tensor cores while P(n-1) V(n-1) is issued behind it,
//   and the softmax of S(n) runs while P(n-1) V(n-1) is still executing):
//     S(0) = Q K(0)^T; wait; release K(0); mask, softmax(S(0)) -> P(0)
//     for n = 1 .. N-1:
//       issue S(n) = Q K(n)^T          (wgmma group A)
//       issue O += P(n-1) V(n-1)       (wgmma group B)
//       wait<1>: A done -> release K(n) (and Q after the last one); mask, softmax(S(n)) -> rescale factor
//       wait<0>: B done -> release V(n-1); O *= factor (only if some row max moved); P(n) = S(n) as 16 bits
//     O += P(N-1) V(N-1); wait; release V(N-1)
//   Registers per consumer thread: O 64 + S 64 + P 32 floats/words, ~200 with the rest (kConsumerRegs).
//
// Scope: head_dim 128, q/k/v/o one 16-bit type, no mask or causal, GQA, K/V of any strides that TMA takes
// (base and token/head strides multiples of 16 bytes: NHD and HND caches and their views); single requests and
// ragged batches; paged batches of any page size (16-bit K/V: pages of 8, 16, 32, 64, 128 or a multiple of 128 slots
// as TMA boxes of a 4-D map, sm90_ws_paged_map; other page sizes, and a tile holding a partial last page's slots,
// gathered row by row with cp.async by the producer warpgroup; see PAGED in the producer). Single requests also
// with fp8 K/V (e4m3/e5m2) and a 16-bit q and o, computed as the fa3 kernel does: float16 wgmmas (a bfloat16 Q tile
// rounded to float16 by the producer once per item: q_tile_to_half), k_scale folded into sm_scale by the caller,
// v_scale in the epilogue (output_factor). Not (yet): fp8 K/V in ragged batches (the kernel's fp8 path takes ragged
// items alike, but the batch launcher and scope are 16-bit), fp8 paged K/V, KV split of a single request, custom masks,
// windows, soft cap, RoPE, TMA store of O, CUDA graphs of the batch (the tensor maps hold each run's K/V address and
// row count); ping-pong of the two consumer warpgroups is there but off (-DFI_WS_PINGPONG=1, for probes).
#pragma once
#include "flashinfer/attention/mask.cuh"
#include "flashinfer/attention/prefill_common.cuh"
#include "flashinfer/attention/state.cuh"
#include "flashinfer/common.cuh"
#include "flashinfer/host/launch.cuh"
#include "flashinfer/host/tma.cuh"
#include "flashinfer/ptx/cp_async.cuh"
#include "flashinfer/ptx/math.cuh"
#include "flashinfer/ptx/mbarrier.cuh"
#include "flashinfer/ptx/smem.cuh"
#include "flashinfer/ptx/tma.cuh"
#include "flashinfer/ptx/warpgroup.cuh"
#include "flashinfer/ptx/wgmma.cuh"

#include <type_traits>

namespace flashinfer {

// head_dim 128 or 64 (64: one 64-column box a tile, O 32 accumulators, 96 KB of shared memory; fp8 K/V at 128 only).
template <int HEAD_DIM = 128>
struct Sm90WsTraitsT {
  static_assert(HEAD_DIM == 128 || HEAD_DIM == 64, "fa3_ws takes head_dim 128 or 64");
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kThreads = 384;  // producer warpgroup + two consumer warpgroups
  static constexpr int BQ = 128;        // packed query rows per work item (64 per consumer warpgroup)
  static constexpr int BK = 128;        // keys per KV tile
  // Ring depth of K and of V: two (at head_dim 128 all that fits beside Q and the O staging). At head_dim 64 three or
  // four fit but gain nothing: H200, 8192 x 32 heads, TFLOP/s 2 / 3 / 4 stages: full 430 / 433 / 430, causal
  // 397 / 394 / 396, 2048 full 367 / 375 / 375 (probe_prefill --d64 with a stage knob, since removed).
  static constexpr int kStages = 2;
#ifdef FI_WS_PINGPONG
  static constexpr bool kPingPong = FI_WS_PINGPONG;  // consumer warpgroups take turns issuing wgmma (see the kernel)
#else
  static constexpr bool kPingPong = false;
#endif
  static constexpr int kConsumerWarps = 8;
  // Registers per thread after setmaxnreg (-D overrides for probes, both K/V kinds): 128 * 56 + 256 * 224 <= the SM's
  // 64K. At 40 the producer spills its work-item state (ptxas, CUDA 13.0); the consumers need ~200 (O 64, S 64, P 32
  // and addresses). fp8 K/V: 72 + 216, the producer holding a whole staged tile (32 registers) in flight
  // (at 64 it spills).
#ifdef FI_WS_PRODUCER_REGS
  static constexpr int kProducerRegs = FI_WS_PRODUCER_REGS, kProducerRegsFp8 = FI_WS_PRODUCER_REGS;
#else
  static constexpr int kProducerRegs = 56, kProducerRegsFp8 = 72;
#endif
#ifdef FI_WS_CONSUMER_REGS
  static constexpr int kConsumerRegs = FI_WS_CONSUMER_REGS, kConsumerRegsFp8 = FI_WS_CONSUMER_REGS;
#else
  static constexpr int kConsumerRegs = 224, kConsumerRegsFp8 = 216;
#endif
  // Single prefill: how many KV heads' items are interleaved (sm90_ws_item): 0 = by the mask, full attention one
  // head at a time (the CTAs running at once share its K/V in L2; a full item's cost does not depend on its query
  // tile, so any order balances), causal all heads interleaved (heaviest first over the whole grid, which keeps
  // the CTAs' shares of the causal work even). H200, TFLOP/s, 32/32 heads, all interleaved -> one head at a time:
  // 16384 full 507 -> 595, 8192 full 540 -> 589, 2048 full 531 -> 546; causal 8192 520 -> 510, 2048 388 -> 400;
  // 32/8 heads 8192 causal 520-550 -> 483; groups of heads fitting 24 MB of K/V: between the two. -D
  // FI_WS_HEAD_GROUP=n: n heads interleaved whatever the mask (probe variants).
#ifdef FI_WS_HEAD_GROUP
  static constexpr int kHeadGroup = FI_WS_HEAD_GROUP;
#else
  static constexpr int kHeadGroup = 0;
#endif
  // A wait longer than this is a deadlock (an item takes milliseconds; compute-sanitizer slows it 100-1000x).
#ifdef FI_WS_WAIT_TIMEOUT_NS
  static constexpr uint64_t kWaitTimeoutNs = FI_WS_WAIT_TIMEOUT_NS;
#else
  static constexpr uint64_t kWaitTimeoutNs = 60ull * 1000 * 1000 * 1000;
#endif
  // Suspend hint (ns) of the producer's converged warps waiting for the next item's Q slot (mbarrier_wait_bounded;
  // 0: spin). Spinning, the waits' retry loops were 18% of the kernel's executed instructions (ncu, 8192 x 32 heads,
  // full), issued by the warps that share schedulers with the consumers. H200, probe_prefill (bf16, 32 heads,
  // d128, TFLOP/s, two runs, spin -> sleep): 8192 causal 494 -> 532 in both; 8192 full 588-593 -> 589-628, 16384
  // full 586-597 -> 584-587, 2048 full and causal equal. The consumers' waits suspended as well lost it (8192
  // causal 497, a probe build since removed): they spin. -D FI_WS_PRODUCER_SUSPEND_NS overrides (probes).
#ifdef FI_WS_PRODUCER_SUSPEND_NS
  static constexpr uint32_t kProducerSuspendNs = FI_WS_PRODUCER_SUSPEND_NS;
#else
  static constexpr uint32_t kProducerSuspendNs = 10u * 1000 * 1000;
#endif
  // K/V by TMA (thread 0; not paged, not fp8): an item's K(0) issued before the wait for its Q slot (K(0)'s slot
  // frees with the previous item's S(N - 2), Q's only after its S(N - 1)) and V(0) right after thread 0's Q copies,
  // rather than both after Q has landed: the item's first tiles no longer wait a memory round trip behind Q.
  // H200, bf16 d128, TFLOP/s after -> before (probe_prefill --ragged, two runs): ragged 64 x 256 causal 189-190 vs
  // 171, 16 x 1024 full 511-519 vs 487-488, 16 x 1024 causal and 4 x 4096 causal within 2%; single prefill (one
  // run) 8192 causal 518 vs 475, 2048 full 568 vs 555, 8192 and 16384 full within 2%. Two Q buffers (the next
  // item's Q copied a whole item ahead, 224 KB of shared memory) measured slower on top of this (ragged 16 x 1024
  // causal 322 vs 369, 64 x 256 causal 147 vs 191): reverted. -D FI_WS_EARLY_KV0=0 restores the previous order.
#ifdef FI_WS_EARLY_KV0
  static constexpr bool kEarlyKV0 = FI_WS_EARLY_KV0;
#else
  static constexpr bool kEarlyKV0 = true;
#endif
  static constexpr int kQBytes = BQ * kHeadDim * 2;
  static constexpr int kKVBytes = BK * kHeadDim * 2;  // one K or V tile: the transaction bytes of its boxes
  static constexpr int kBoxBytes = BK * 128;          // one 64-column box of a tile
  static constexpr int kBarriers = 4 * kStages + 2;   // k_full, k_empty, v_full, v_empty per slot; q_full, q_empty
  static constexpr int kSmemBytes = 2 * kQBytes + 2 * kStages * kKVBytes + kBarriers * 8;
  static constexpr int kItemBytes = 64;  // batches: the Sm90WsItem handed from the producer to the consumers
  // fp8 K/V: one staged fp8 tile of K and one of V (one TMA box each: BK rows of head_dim bytes), two more barriers
  // (k_staged, v_staged), and the producer warpgroup's named barrier.
  static constexpr int kF8TileBytes = BK * kHeadDim;
  static constexpr int kFp8Bytes = 2 * kF8TileBytes + 2 * 8;
  static constexpr int kProducerBarrier = 5;
  static constexpr int smem_bytes(bool ragged, bool fp8 = false) {
    return kSmemBytes + (ragged ? kItemBytes : 0) + (fp8 ? kFp8Bytes : 0);
  }
  static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "register split over the SM's file");
  static_assert(kProducerRegsFp8 * 128 + kConsumerRegsFp8 * 256 <= 65536, "register split over the SM's file");
  static_assert(kSmemBytes + kItemBytes + kFp8Bytes <= 227 * 1024, "shared memory of one CTA per SM");
};
using Sm90WsTraits = Sm90WsTraitsT<128>;  // (what does not depend on head_dim: tiles, roles, registers)

// The kernel's parameters: the prefill parameters and the K/V tensor maps (3-D: head_dim, then token and KV head in
// the order of their strides; boxes of 64 columns x BK keys x 1 head).
struct Sm90WsParams {
  CUtensorMap k_map;
  CUtensorMap v_map;
  PrefillParams p;
  int num_items;      // single: num_qtiles * num_kv_heads; batches: the plan's pieces * num_kv_heads
  int k_heads_inner;  // the map's dimension 1 is the KV head (NHD), else the token (sm90_ws_kv_map)
  int v_heads_inner;
  int kv_rows;     // ragged: token rows of the K/V arrays (the maps' extent; 0: no maps, every request empty)
  int head_group;  // single: KV heads whose items are interleaved (sm90_ws_item)
  int page_rows;   // paged: key rows per TMA box (maps over the paged cache, sm90_ws_paged_map); 0: every tile gathered
};

// One work item's geometry. Single: computed alike by the producer and the consumers; ragged: by the producer,
// handed to the consumers in shared memory (int fields only: copied field by field). q_first / kv_first: the
// request's first query / key row in q, o, lse / k, v (0 for a single request); lo, hi, delta and the key
// positions are the request's own (0 = its first key).
struct Sm90WsItem {
  int kv_head, pr0, rows_here, delta, tok_min, tok_max, lo, hi, num_tiles, q_first, kv_first, kv_len;
};
static_assert(sizeof(Sm90WsItem) <= Sm90WsTraits::kItemBytes, "the item's shared-memory slot");

// The ragged kernel's hand-over of an item in shared memory, field by field (no local copy in memory).
FI_DEVICE void sm90_ws_store_item(int* slot, const Sm90WsItem& t) {
  slot[0] = t.kv_head, slot[1] = t.pr0, slot[2] = t.rows_here, slot[3] = t.delta, slot[4] = t.tok_min;
  slot[5] = t.tok_max, slot[6] = t.lo, slot[7] = t.hi, slot[8] = t.num_tiles, slot[9] = t.q_first;
  slot[10] = t.kv_first, slot[11] = t.kv_len;
}
FI_DEVICE Sm90WsItem sm90_ws_load_item(const volatile int* slot) {
  return Sm90WsItem{slot[0], slot[1], slot[2], slot[3], slot[4],  slot[5],
                    slot[6], slot[7], slot[8], slot[9], slot[10], slot[11]};
}

template <MaskMode MASK>
FI_DEVICE Sm90WsItem sm90_ws_item(const Sm90WsParams& P, int w) {
  using Tr = Sm90WsTraits;
  const PrefillParams& p = P.p;
  Sm90WsItem t;
  // Heads in groups of P.head_group (the last one smaller); within a group the last query tiles first, the
  // group's heads interleaved.
  const int per_group = P.head_group * p.num_qtiles, g = w / per_group, in_group = w - g * per_group;
  const int heads_here = min(P.head_group, p.num_kv_heads - g * P.head_group);
  const int qtile = p.num_qtiles - 1 - in_group / heads_here;
  t.kv_head = g * P.head_group + in_group % heads_here;
  t.pr0 = qtile * Tr::BQ;
  t.rows_here = min(Tr::BQ, p.qo_len * p.group_size - t.pr0);
  t.delta = p.kv_len - p.qo_len;
  t.tok_min = t.pr0 / p.group_size;
  t.tok_max = (t.pr0 + t.rows_here - 1) / p.group_size;
  visible_key_range<MASK, false>(0, p.kv_len, p.kv_len, t.delta, t.tok_min, t.tok_max, 0, t.lo, t.hi);
  t.num_tiles = t.hi > t.lo ? ceil_div(t.hi - t.lo, Tr::BK) : 0;
  t.q_first = t.kv_first = 0;
  t.kv_len = p.kv_len;
  return t;
}

// Batch (ragged or paged K/V): item w of the plan's schedule (p.work, structure of arrays: request, query tile, kv
// begin, kv end, partial row). kv_first: the request's first row of the ragged K/V, or (paged) its first entry of
// kv_indices. A request whose keys the planner split into chunks has each chunk's items write partial states from
// their partial row on (sm90_ws_partial_row; -1: o and lse), merged by prefill_merge_kernel afterwards.
template <MaskMode MASK, bool PAGED>
FI_DEVICE Sm90WsItem sm90_ws_batch_item(const PrefillParams& p, int w) {
  using Tr = Sm90WsTraits;
  Sm90WsItem t;
  const int piece = w / p.num_kv_heads, cap = p.work_capacity;
  t.kv_head = w % p.num_kv_heads;
  const int req = p.work[piece], qtile = p.work[cap + piece];
  const int kv_begin = p.work[2 * cap + piece], kv_end = p.work[3 * cap + piece];
  t.q_first = p.qo_indptr[req];
  t.kv_first = p.kv_indptr[req];
  const int qo_len = p.qo_indptr[req + 1] - t.q_first;
  const int kv_len = PAGED ? paged_kv_len(p.kv_indptr[req + 1] - t.kv_first, p.page_size, p.kv_last_page_len[req])
                           : p.kv_indptr[req + 1] - t.kv_first;
  t.pr0 = qtile * Tr::BQ;
  t.rows_here = min(Tr::BQ, qo_len * p.group_size - t.pr0);
  t.delta = kv_len - qo_len;
  t.tok_min = t.pr0 / p.group_size;
  t.tok_max = (t.pr0 + t.rows_here - 1) / p.group_size;
  visible_key_range<MASK, false>(kv_begin, kv_end, kv_len, t.delta, t.tok_min, t.tok_max, 0, t.lo, t.hi);
  t.num_tiles = t.hi > t.lo ? ceil_div(t.hi - t.lo, Tr::BK) : 0;
  t.kv_len = kv_len;
  return t;
}

// Batch item w's first partial row (its chunk's partial states), or -1 when it writes o and lse: read by the
// consumers themselves (the producer's hand-over of the item, at its 56 registers, would spill one more field).
FI_DEVICE int sm90_ws_partial_row(const PrefillParams& p, int w) {
  return p.work[4 * p.work_capacity + w / p.num_kv_heads];
}

// ---- fp8 widening, register-staged. A thread's share of a staged fp8 tile (BK rows of 128
// bytes) is 8 loads of 16 bytes, one per step of 16 rows; each becomes the 16-bit chunks 2j and 2j + 1 of its row
// in the swizzled ring tile (tile_offset). In a quarter warp (tid / 8 = q) thread j = tid % 8 takes 16-byte column j
// of row q (j < 4) or of row q ^ 1 (j >= 4): the eight loads read 64 bytes of each of two rows (all 32 banks once),
// and the eight stores of chunk 2j (then 2j + 1) fall into both 64-column blocks at swizzle slots of opposite parity
// (all 8 slots once): both conflict-free. Row & 7 is fixed per thread, so step i's addresses are step 0's + 2048 i.
struct Sm90WsFp8Lane {
  uint32_t src, dst0, dst1;  // byte offsets: in the staging tile; of chunks 2j and 2j + 1 (dst0 ^ 16) in the ring tile
};
FI_DEVICE Sm90WsFp8Lane sm90_ws_fp8_lane(int tid) {
  const int j = tid % 8, row = (tid / 8) ^ (j >> 2);
  const uint32_t dst = sm90::tile_offset(row, 2 * j, Sm90WsTraits::BK);
  return {uint32_t(row * Sm90WsTraits::kHeadDim + 16 * j), dst, dst ^ 16u};
}
constexpr int kSm90WsFp8Step = 16 * Sm90WsTraits::kHeadDim;  // bytes between a thread's steps (16 rows)

// 16 fp8 values (element 0 in the low byte of x) -> two 16-byte chunks of float16 (elements 0..7, 8..15): e4m3 by
// the conversion instruction; e5m2 by byte permutes (H200 probe, 2026-11-30: e5m2 permutes 1-2% faster than its
// conversion instruction; e4m3 through integer-pipe bit operations 4-22% slower than its instruction, dropped).
template <typename F8>
FI_DEVICE void sm90_ws_fp8x16_to_half(const uint4& in, uint4& lo, uint4& hi) {
  const uint32_t w[4] = {in.x, in.y, in.z, in.w};
  uint32_t h[8];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (std::is_same<F8, __nv_fp8_e5m2>::value) {
      e5m2x4_to_half2x2_permute(w[k], h[2 * k], h[2 * k + 1]);
    } else {
      fp8x4_to_half2x2(w[k], h[2 * k], h[2 * k + 1], F8{});
    }
  }
  lo = make_uint4(h[0], h[1], h[2], h[3]);
  hi = make_uint4(h[4], h[5], h[6], h[7]);
}

template <int HEAD_DIM, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK, bool BATCH, bool PAGED>
__global__ void __launch_bounds__(Sm90WsTraits::kThreads, 1)
    sm90_ws_prefill_kernel(const __grid_constant__ Sm90WsParams P) {
  using Tr = Sm90WsTraitsT<HEAD_DIM>;
  constexpr int D = Tr::kHeadDim, BQ = Tr::BQ, BK = Tr::BK, CH = D / 8, S = Tr::kStages;
  static_assert(std::is_same<DTypeQ, __half>::value || std::is_same<DTypeQ, __nv_bfloat16>::value, "16-bit q/k/v");
  constexpr bool FP8 = is_fp8<DTypeKV>::value;
  static_assert(FP8 || std::is_same<DTypeQ, DTypeKV>::value, "one 16-bit type for q, k and v (or fp8 k and v)");
  static_assert(!FP8 || D == 128, "fp8 K/V at head_dim 128 only");
  // The type the wgmmas read Q, K, V and P in: q's, or float16 with fp8 K/V (fp8 widens to it exactly, one cvt per
  // pair; a bfloat16 q is rounded to it once per item).
  using KVT = std::conditional_t<FP8, __half, DTypeQ>;
  const PrefillParams& p = P.p;
  extern __shared__ __align__(1024) uint4 smem[];
  uint8_t* sq = reinterpret_cast<uint8_t*>(smem);
  uint8_t* so = sq + Tr::kQBytes;
  uint8_t* sk = so + Tr::kQBytes;
  uint8_t* sv = sk + S * Tr::kKVBytes;
  uint8_t* sf8 = sv + S * Tr::kKVBytes;  // fp8: staged K, then staged V (kF8TileBytes each)
  uint8_t* sbars = sf8 + (FP8 ? 2 * Tr::kF8TileBytes : 0);
  const uint32_t sq_u = smem_addr(sq), sk_u = smem_addr(sk), sv_u = smem_addr(sv);
  const uint32_t bars = smem_addr(sbars);
  auto k_full = [&](int s) { return bars + 8 * s; };
  auto k_empty = [&](int s) { return bars + 8 * (S + s); };
  auto v_full = [&](int s) { return bars + 8 * (2 * S + s); };
  auto v_empty = [&](int s) { return bars + 8 * (3 * S + s); };
  const uint32_t q_full = bars + 8 * (4 * S), q_empty = bars + 8 * (4 * S + 1);
  const uint32_t k_staged = bars + 8 * (4 * S + 2), v_staged = bars + 8 * (4 * S + 3);        // (fp8)
  int* const item_slot = reinterpret_cast<int*>(sbars + Tr::kBarriers * 8 + (FP8 ? 16 : 0));  // (batches only)
  // Every wait is bounded (see mbarrier_wait_bounded): a deadlocked pipeline fails the launch instead of hanging the
  // GPU. Tags (printed with -DFI_MBARRIER_DEBUG): producer 1 q_empty, 2 k_empty, 3 v_empty, 4 k_staged, 5 v_staged;
  // consumers 11 q_full, 12 k_full, 13 v_full.
  auto wait = [](uint32_t bar, uint32_t parity, int tag, uint32_t suspend_ns = 0) {
    sm90::mbarrier_wait_bounded(bar, parity, Tr::kWaitTimeoutNs, tag, suspend_ns);
  };

  const int tid = threadIdx.x, wg = tid / 128;
  // A batch may be launched with programmatic dependent launch (run(enable_pdl=True)): wait for the previous
  // kernel before reading what it wrote (a no-op otherwise).
  if constexpr (BATCH) grid_dependency_chain();
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbarrier_init(k_full(s), FP8 || PAGED ? 128 : 1);
      sm90::mbarrier_init(v_full(s), FP8 || PAGED ? 128 : 1);
      sm90::mbarrier_init(k_empty(s), Tr::kConsumerWarps);
      sm90::mbarrier_init(v_empty(s), Tr::kConsumerWarps);
    }
    sm90::mbarrier_init(q_full, 128);
    sm90::mbarrier_init(q_empty, BATCH ? 32 * Tr::kConsumerWarps : Tr::kConsumerWarps);
    if constexpr (FP8) {
      sm90::mbarrier_init(k_staged, 1);
      sm90::mbarrier_init(v_staged, 1);
    }
    sm90::mbarrier_init_fence();
    // (with no keys the maps are left empty: no tile is ever issued; paged K/V has maps only with page_rows)
    if (PAGED ? P.page_rows > 0 : (BATCH ? P.kv_rows : p.kv_len) > 0) {
      sm90::tma_prefetch_map(&P.k_map);
      sm90::tma_prefetch_map(&P.v_map);
    }
  }
  __syncthreads();  // the only block-wide barrier: from here on the roles meet on mbarriers only

  if (wg == 0) {
    // ================================================================ producer warpgroup
    sm90::setmaxnreg_dec<FP8 ? Tr::kProducerRegsFp8 : Tr::kProducerRegs>();
    // One K or V tile: its two 64-column boxes (keys key0.., head `head`), completing on mbarrier bar; fp8: one
    // box of whole rows.
    auto load_kv_tile = [&](uint32_t dst, const CUtensorMap* map, int heads_inner, int key0, int head, uint32_t bar) {
      const int c1 = heads_inner ? head : key0, c2 = heads_inner ? key0 : head;
      sm90::tma_load_3d(dst, map, 0, c1, c2, bar);
      if constexpr (!FP8 && D == 128) sm90::tma_load_3d(dst + Tr::kBoxBytes, map, 64, c1, c2, bar);
    };
    // fp8 (thread 0): the fp8 tile at K/V row key0 of K or V into its staging tile.
    auto stage_fp8 = [&](bool is_v, int key0, int head) {
      const uint32_t bar = is_v ? v_staged : k_staged;
      sm90::mbarrier_arrive_expect_tx(bar, Tr::kF8TileBytes);
      load_kv_tile(smem_addr(sf8 + (is_v ? Tr::kF8TileBytes : 0)), is_v ? &P.v_map : &P.k_map,
                   is_v ? P.v_heads_inner : P.k_heads_inner, key0, head, bar);
    };
    // fp8 (all 128 threads): widens tile `it` (slot s, phase ph of the ring) of K or V. The whole staged tile is
    // loaded into registers and the staging tile handed back to TMA (refilled with the tile at row next_key0; < 0:
    // none), so that the refill runs while the slot is waited for and written; then the tile is converted into the
    // slot and its full barrier completed. H200 probe (2026-11-30), e4m3/bf16 TFLOP/s at 8192 full / 8192 causal /
    // 16384 full: 1.026 / 1.016 / 1.036; staging handed back after the stores 0.999 / 1.014 / 1.021; loads in
    // batches of 2 (registers 56/224) 1.015 / 0.982 / 1.026; the fa3 kernel's widen_fp8_tile after the slot's wait
    // (one 8-byte load per store) 0.852 / 0.827 / 0.868.
    const Sm90WsFp8Lane f8lane = sm90_ws_fp8_lane(tid);
    auto widen_fp8 = [&](bool is_v, int it, int s, uint32_t ph, int next_key0, int head) {
      if constexpr (FP8) {  // (the body names fp8 types: not instantiated for 16-bit K/V)
        constexpr int kSteps = BK * D / 16 / 128;
        const uint32_t src = smem_addr(sf8) + (is_v ? Tr::kF8TileBytes : 0) + f8lane.src;
        const uint32_t ring = (is_v ? sv_u : sk_u) + s * Tr::kKVBytes;
        const uint32_t dst0 = ring + f8lane.dst0, dst1 = ring + f8lane.dst1;
        wait(is_v ? v_staged : k_staged, it & 1, is_v ? 5 : 4);
        uint4 raw[kSteps];
#pragma unroll
        for (int i = 0; i < kSteps; ++i) raw[i] = ld_shared_v4(src + i * kSm90WsFp8Step);
        // The refill is an async-proxy (TMA) write over what these generic-proxy loads read: each thread's proxy
        // fence orders its loads before it, the barrier before thread 0's copy. Without the fence the copy overtook
        // loads still in flight (H200: up to 130x the tolerance).
        sm90::fence_async_shared();
        sm90::named_barrier_sync(Tr::kProducerBarrier, 128);
        if (tid == 0 && next_key0 >= 0) stage_fp8(is_v, next_key0, head);
        wait(is_v ? v_empty(s) : k_empty(s), ph ^ 1, is_v ? 3 : 2);
#pragma unroll
        for (int i = 0; i < kSteps; ++i) {
          uint4 lo, hi;
          sm90_ws_fp8x16_to_half<DTypeKV>(raw[i], lo, hi);
          st_shared_v4(dst0 + i * kSm90WsFp8Step, lo);
          st_shared_v4(dst1 + i * kSm90WsFp8Step, hi);
        }
        sm90::fence_async_shared();  // generic-proxy writes -> visible to wgmma (async proxy)
        sm90::mbarrier_arrive(is_v ? v_full(s) : k_full(s));
      }
    };
    // Paged K/V: all 128 threads gather each tile with cp.async. Thread tid looks up key row tid: (page, slot),
    // page -1 for a row past the item's keys or on a page outside the cache, which is zero-filled (the slots
    // of a partial last page may hold anything, NaN included, and a masked P of 0 times NaN is still NaN). The
    // copies are coalesced: in pass i a warp copies two whole rows (32w + 2i and 32w + 2i + 1, lanes 0-15 and
    // 16-31, one 16-byte chunk each), the row's lookup taken from the lane that made it. Each thread's copies
    // arrive on the tile's full barrier (count 128) as they land (cp.async.mbarrier.arrive), so the producer
    // never waits for a copy; tiles are issued in the consumers' order of use, K(n + 1) before V(n).
    // H200, 16 x 1024 causal, pages of 16, 32/32 and 32/8 heads (ragged K/V by TMA: 332 / 356 TFLOP/s): one
    // row per thread, every 16-byte request to another row, 221 / 244 with each tile's arrival one issue late
    // (wait_group 1, proxy fence, arrive), 220 / 236 with the asynchronous arrival; as now (coalesced, K(0)
    // before Q, lookups a tile ahead) 229 / 232 at pages of 1, 16 or 64 alike, the consumers' proxy fence costing
    // nothing measurable, DRAM 12% busy (L2 hit rate 77%). Warp 0 alone polling the empty barriers, the other
    // three asleep on a named barrier: 214 / 220 (and single prefill 3-6% slower with that on q_empty), dropped.
    auto locate = [&](const Sm90WsItem& t, int n) {
      const int2 ps = paged_row_ahead<true, BK>(p, t.kv_first, t.lo, t.hi, t.num_tiles, n, tid);
      return make_int2(t.lo + n * BK + tid < t.hi ? ps.x : -1, ps.y);
    };
    // Tile i (of the ring's count) of K or V from rows (page, slot) = r, once its slot is free.
    auto gather = [&](const Sm90WsItem& t, bool is_v, int i, int2 r) {
      const int s = i % S;
      wait(is_v ? v_empty(s) : k_empty(s), ((i / S) & 1) ^ 1, is_v ? 3 : 2);
      // (from threadIdx.x here, not held across the item loop: at kProducerRegs they would spill)
      const int tx = sm90::opaque_int(threadIdx.x), lane = tx % 32, warp_row0 = tx - lane, chunk = lane % CH;
      const DTypeKV* src = static_cast<const DTypeKV*>(is_v ? p.v : p.k) +
                           int64_t(t.kv_head) * (is_v ? p.v_stride_h : p.k_stride_h) + chunk * 8;
      const int64_t stride_page = is_v ? p.v_stride_page : p.k_stride_page;
      const int64_t stride_n = is_v ? p.v_stride_n : p.k_stride_n;
      const uint32_t dst = (is_v ? sv_u : sk_u) + s * Tr::kKVBytes;
      // (a pass: 32 / CH whole rows, CH lanes each)
#pragma unroll 4
      for (int pass = 0; pass < CH; ++pass) {
        const int from = (32 / CH) * pass + lane / CH;
        const int page = __shfl_sync(0xffffffffu, r.x, from), slot = __shfl_sync(0xffffffffu, r.y, from);
        const int64_t off = paged_row_offset(make_int2(max(page, 0), slot), stride_page, stride_n);
        cp_async_16(dst + sm90::tile_offset(warp_row0 + from, chunk, BK), src + off, page >= 0);
      }
      sm90::cp_async_mbarrier_arrive_noinc(is_v ? v_full(s) : k_full(s));
    };
    // Paged K/V by TMA (P.page_rows = R > 0: pages of a multiple of 8 slots that divide BK, or that BK divides): a
    // tile as BK / R boxes of R slots of one page (R = the page size, or BK slots of a larger page), box b (its
    // 64-column boxes) issued by thread b R from its own row lookup (locate: the first row of the box) into rows
    // [b R, (b + 1) R) of the slot (R a multiple of 8: whole 1024-byte swizzle atoms, so the boxes land exactly as
    // one BK-row box would). Boxes past the request lie on pages past its last, or start at or past hi: page -1, a
    // coordinate outside the map (TMA's zeros). The stale slots of a partial last page can only be zero-filled by
    // the gather, so a tile holding any of them, or starting off a box boundary (a range that does not start at a
    // multiple of R), is gathered. The full barrier takes 128 arrivals either way: here each issuing thread's
    // arrive.expect_tx of its own boxes' bytes (before it issues them) and the others' plain arrivals, each thread
    // after its wait for the empty slot, so that no arrival can fall into the slot's previous phase.
    auto by_tma = [&](const Sm90WsItem& t, int n) {
      const int R = P.page_rows, key0 = t.lo + n * BK;  // (R a power of two)
      if (R == 0 || (key0 & (R - 1)) != 0) return false;
      const int stale_end = ceil_div(t.kv_len, p.page_size) * p.page_size;
      return key0 >= stale_end || key0 + BK <= t.kv_len;
    };
    auto tma_pages = [&](const Sm90WsItem& t, bool is_v, int i, int2 r) {
      const int s = i % S;
      const uint32_t full = is_v ? v_full(s) : k_full(s);
      wait(is_v ? v_empty(s) : k_empty(s), ((i / S) & 1) ^ 1, is_v ? 3 : 2);
      const int R = P.page_rows, tx = sm90::opaque_int(threadIdx.x);  // (as in gather: not held across items)
      if ((tx & (R - 1)) == 0) {
        sm90::mbarrier_arrive_expect_tx(full, R * D * 2);
        const uint32_t dst = (is_v ? sv_u : sk_u) + s * Tr::kKVBytes + tx * sm90::kSwizzleRowBytes;
        const CUtensorMap* map = is_v ? &P.v_map : &P.k_map;
        const bool inner = is_v ? P.v_heads_inner : P.k_heads_inner;
        const int c1 = inner ? t.kv_head : r.y, c2 = inner ? r.y : t.kv_head;
        sm90::tma_load_4d(dst, map, 0, c1, c2, r.x, full);
        if constexpr (D == 128) sm90::tma_load_4d(dst + Tr::kBoxBytes, map, 64, c1, c2, r.x, full);
      } else {
        sm90::mbarrier_arrive(full);
      }
    };
    // H200, 16 x 1024 causal, 32/32 and 32/8 heads, TFLOP/s (ragged by TMA: 364-378; every tile gathered: 206-232;
    // probe_prefill --paged): boxes issued by the threads that own their first rows, pages of 8 / 16 / 32 / 64:
    // 349 / 339-366 / 375 / 377, where all issued by warp 0's lanes (a loop over the lanes: TMA takes uniform
    // operands) had measured 234 / 296-306 / 354 / 366; V gathered beside K boxes 266-288 (slower).
    // Tile n of an item, copied as boxes or gathered, from this thread's row of it (locate, looked up a tile ahead of
    // its copies).
    auto copy_tile = [&](const Sm90WsItem& t, bool is_v, int i, int n, int2 rows) {
      if (by_tma(t, n)) {
        tma_pages(t, is_v, i, rows);
      } else {
        gather(t, is_v, i, rows);
      }
    };
    int it = 0;                // (thread 0; fp8 and paged: every thread) KV tiles issued so far
    int2 cur = {}, next = {};  // (paged) this thread's rows of the next K and V tiles to copy
    for (int w = blockIdx.x, j = 0; w < P.num_items; w += gridDim.x, ++j) {
      const Sm90WsItem t = BATCH ? sm90_ws_batch_item<MASK, PAGED>(p, w) : sm90_ws_item<MASK>(P, w);
      // fp8: the item's first K and V tiles are staged now (the staging tiles are free: the previous item's last
      // ones are widened), so that their copies run under the Q wait and copy.
      if constexpr (FP8) {
        if (tid == 0 && t.num_tiles > 0) {
          stage_fp8(false, t.kv_first + t.lo, t.kv_head);
          stage_fp8(true, t.kv_first + t.lo, t.kv_head);
        }
      }
      // fp8: tile n of the item's K or V, staged, widened into its ring slot, its staging tile refilled with tile
      // n + 1.
      auto widen_tile = [&](bool is_v, int n) {
        const int i = it + n;
        const int next_key0 = n + 1 < t.num_tiles ? t.kv_first + t.lo + (n + 1) * BK : -1;
        widen_fp8(is_v, i, i % S, (i / S) & 1, next_key0, t.kv_head);
      };
      // fp8: the item's K(0) before its Q: K(0)'s slot frees with the previous item's S(N - 2), its Q only after
      // S(N - 1), so the consumers start the item as soon as Q has landed (H200 probe: K(n) then V(n) after Q,
      // 1.009 / 0.997 / 1.020 against 1.026 / 1.016 / 1.036).
      if constexpr (FP8) {
        if (t.num_tiles > 0) widen_tile(false, 0);
      }
      // K/V by TMA (thread 0): tile n of the item's K or V, once its ring slot is free.
      auto tma_tile = [&](bool is_v, int n) {
        const int i = it + n, s = i % S;
        const uint32_t full = is_v ? v_full(s) : k_full(s);
        wait(is_v ? v_empty(s) : k_empty(s), ((i / S) & 1) ^ 1, is_v ? 3 : 2);
        sm90::mbarrier_arrive_expect_tx(full, Tr::kKVBytes);
        load_kv_tile((is_v ? sv_u : sk_u) + s * Tr::kKVBytes, is_v ? &P.v_map : &P.k_map,
                     is_v ? P.v_heads_inner : P.k_heads_inner, t.kv_first + t.lo + n * BK, t.kv_head, full);
      };
      constexpr bool kEarly = !PAGED && !FP8 && Tr::kEarlyKV0;
      const bool issues_kv0 = kEarly && tid == 0 && t.num_tiles > 0;
      if (issues_kv0) tma_tile(false, 0);
      // Paged: likewise K(0) is gathered before the Q wait, its copies landing while the previous item ends.
      if constexpr (PAGED) {
        if (t.num_tiles > 0) {
          cur = locate(t, 0);
          copy_tile(t, false, it, 0, cur);
          if (t.num_tiles > 1) next = locate(t, 1);
        }
      }
      // Q: wait until the consumers' last S = Q K^T of the previous item has completed, then all 128 threads
      // copy the tile (rows past the request zero-filled) and arrive on q_full once their copies landed.
      // With K/V by thread 0 alone (not paged, not fp8: there every producer thread copies or widens the item's
      // tiles first), warps 1-3 sleep in the wait: their retries were most of the kernel's 18% of spin
      // instructions. Warp 0's lanes 1-31 must not: their lane 0 issues the K/V tiles meanwhile. (Sleeping in the
      // paged and fp8 producers also made ptxas spill at their 56 and 72 registers.)
      wait(q_empty, (j & 1) ^ 1, 1, !PAGED && !FP8 && tid >= 32 ? Tr::kProducerSuspendNs : 0u);
      if constexpr (BATCH) {
        // The consumers' copy of the previous item was read before q_empty: this one is theirs after q_full.
        if (tid == 0) sm90_ws_store_item(item_slot, t);
      }
      // In slices of 32 rows, not unrolled: the producer's addresses must fit in its kProducerRegs registers.
#pragma unroll 1
      for (int r0 = 0; r0 < BQ; r0 += 32) {
        load_q_tile<32, CH, 128, DTypeQ>(p, t.q_first, t.kv_head, p.group_size, t.pr0 + r0, t.rows_here - r0, tid,
                                         [&](int row, int c) { return sq + sm90::tile_offset(r0 + row, c, BQ); });
      }
      if (issues_kv0) tma_tile(true, 0);  // (its slot frees with the previous item's P(N - 2) V(N - 2))
      if constexpr (PAGED) {
        // Paged: the Q copies arrive as they land (no wait behind this thread's K/V gathers in flight); the
        // consumers fence after q_full as after a K/V tile.
        sm90::cp_async_mbarrier_arrive_noinc(q_full);
      } else {
        cp_async_wait<0>();
      }
      if constexpr (FP8 && !std::is_same<DTypeQ, KVT>::value) {
        // bfloat16 q, float16 wgmmas: the tile is rounded in place (the fa3 kernel's q_tile_to_half), each thread
        // taking chunks that others copied, hence the barrier first.
        sm90::named_barrier_sync(Tr::kProducerBarrier, 128);
        q_tile_to_half<BQ, CH, 128>(
            tid, [&](int row, int c) { return reinterpret_cast<uint4*>(sq + sm90::tile_offset(row, c, BQ)); });
      }
      if constexpr (!PAGED) {
        sm90::fence_async_shared();  // generic-proxy (cp.async) writes -> visible to wgmma (async proxy)
        sm90::mbarrier_arrive(q_full);
      }
      if constexpr (FP8) {
        // The consumers' order of use: K(n + 1) before V(n) (S(n + 1) is issued before P(n) V(n)).
        for (int n = 0; n < t.num_tiles; ++n) {
          if (n + 1 < t.num_tiles) widen_tile(false, n + 1);
          widen_tile(true, n);
        }
        it += t.num_tiles;
      } else if constexpr (PAGED) {
        // (K(0) was issued before Q; the lookups run one tile ahead of the copies)
        for (int n = 0; n < t.num_tiles; ++n) {
          if (n + 1 < t.num_tiles) copy_tile(t, false, it + n + 1, n + 1, next);
          copy_tile(t, true, it + n, n, cur);
          cur = next;
          if (n + 2 < t.num_tiles) next = locate(t, n + 2);
        }
        it += t.num_tiles;
      } else if (tid == 0) {
        for (int n = kEarly ? 1 : 0; n < t.num_tiles; ++n) {
          tma_tile(false, n);
          tma_tile(true, n);
        }
        it += t.num_tiles;
      }
    }
    return;
  }

  // ================================================================== consumer warpgroups
  sm90::setmaxnreg_inc<FP8 ? Tr::kConsumerRegsFp8 : Tr::kConsumerRegs>();
  const int cwg = wg - 1, wtid = tid % 128, lane = tid % 32, warp = wtid / 32;
  // This thread's accumulator rows of the item's 128: cwg * 64 + warp * 16 + lane / 4, and that + 8; its columns
  // 8i + 2 (lane % 4) (+1). Accumulator element 4i + 2r + e: row r (0: g, 1: g + 8), column e (wgmma.cuh).
  const int row0 = cwg * 64 + warp * 16 + lane / 4;
  const int group = p.group_size;
  const float scl = p.sm_scale * kLog2e;
  const uint32_t q_base = sq_u + cwg * 64 * sm90::kSwizzleRowBytes;
  constexpr uint32_t kSbo = 8 * sm90::kSwizzleRowBytes;
  constexpr int NB = BK / 8;  // n8 blocks of scores per row
  // Ping-pong (opt-in, -DFI_WS_PINGPONG=1, for probes): the two consumer warpgroups take turns issuing their wgmma
  // batches, so that one's softmax runs while the other's products occupy the tensor cores. Warpgroup c bar.syncs
  // on named barrier 3 + c (256 threads: its own 128 and the other's 128 bar.arrive) before each issue, and
  // arrives on the other's barrier after it. Both issue the same number of batches per item (N + 1), and consumer
  // 1 arrives once up front so that consumer 0 goes first; the last arrival of the kernel goes unmatched.
  auto turn_wait = [&]() {
    if constexpr (Tr::kPingPong) sm90::named_barrier_sync(3 + cwg, 256);
  };
  auto turn_pass = [&]() {
    if constexpr (Tr::kPingPong) sm90::named_barrier_arrive(3 + (1 - cwg), 256);
  };
  if (cwg == 1) turn_pass();
  auto release = [&](uint32_t bar) {
    if (lane == 0) sm90::mbarrier_arrive(bar);
  };
  // q_empty: every thread in a batch (see the barrier list), a warp's lane 0 otherwise.
  auto release_q = [&]() {
    if (BATCH || lane == 0) sm90::mbarrier_arrive(q_empty);
  };
  // Paged K/V: the producer's cp.async copies (generic proxy) completed the full barrier just waited for; the
  // fence orders them before this thread's wgmmas (async proxy) read the tile (H200: no measurable cost).
  auto paged_fence = [&]() {
    if constexpr (PAGED) sm90::fence_async_shared();
  };

  int it = 0;  // KV tiles consumed so far
  for (int w = blockIdx.x, j = 0; w < P.num_items; w += gridDim.x, ++j) {
    Sm90WsItem t;
    if constexpr (BATCH) {
      wait(q_full, j & 1, 11);
      paged_fence();
      // Volatile: each field read exactly here, never again later (the producer overwrites the slot for the
      // next item once every consumer thread has arrived on q_empty: each thread's arrival releases its own read;
      // with one arrival a warp after a __syncwarp, compute-sanitizer's racecheck flagged the hand-over on batches
      // of many one-tile items, e.g. keys split in chunks of 300).
      t = sm90_ws_load_item(item_slot);
    } else {
      t = sm90_ws_item<MASK>(P, w);
    }
    const int last = t.num_tiles - 1;
    auto qpos = [&](int r) { return t.delta + (t.pr0 + min(row0 + 8 * r, t.rows_here - 1)) / group; };

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m[2] = {kNegInf, kNegInf}, d[2] = {0.f, 0.f};
    float s[BK / 2];
    uint32_t pa[BK / 16][4];

    // S = Q K(n)^T into s, issued and committed (not waited for); K(n) in slot `slot`.
    auto issue_s = [&](int slot) {
      const uint64_t dq = sm90::make_desc(q_base, 16, kSbo);
      const uint64_t dk = sm90::make_desc(sk_u + slot * Tr::kKVBytes, 16, kSbo);
      sm90::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const uint32_t col = (ks & 3) * 32;  // k16 step within the 64-column block
        sm90::wgmma_m64n128k16_ss<KVT>(s, sm90::desc_advance(dq, (ks >> 2) * BQ * sm90::kSwizzleRowBytes + col),
                                       sm90::desc_advance(dk, (ks >> 2) * BK * sm90::kSwizzleRowBytes + col), ks > 0);
      }
      sm90::wgmma_commit();
    };
    // O += P V(n), V(n) in slot `slot`, issued and committed.
    auto issue_pv = [&](int slot) {
      const uint64_t dv = sm90::make_desc(sv_u + slot * Tr::kKVBytes, BK * sm90::kSwizzleRowBytes, kSbo);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        sm90::wgmma_rs<KVT>(o, pa[kk], sm90::desc_advance(dv, kk * 16 * sm90::kSwizzleRowBytes), 1);
      }
      sm90::wgmma_commit();
    };
    // Masks tile n's scores (keys past hi, the causal diagonal) and runs the online softmax over them; returns
    // whether any row of this warp moved its max (O must then be scaled by corr).
    auto softmax = [&](int n, float (&corr)[2]) {
      mask_wgmma_tile<MASK, BK>(s, t.lo + n * BK, t.hi, t.delta, t.tok_min, t.tok_max, lane, qpos);
      bool moved = false;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        corr[r] = online_softmax_row<NB>(m[r], d[r], scl, moved,
                                         [&](int i, int e) -> float& { return s[4 * i + 2 * r + e]; });
      }
      return __any_sync(0xffffffffu, moved);
    };
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        pa[kk][0] = pack2<KVT>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack2<KVT>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2<KVT>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2<KVT>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    if constexpr (!BATCH) wait(q_full, j & 1, 11);
    if (t.num_tiles == 0) {
      release_q();  // no key visible to any row of the item: O = 0, lse = -inf
    } else {
      // ---- tile 0: S(0), softmax -> P(0)
      {
        const int slot = it % S;
        wait(k_full(slot), (it / S) & 1, 12);
        paged_fence();
        turn_wait();
        issue_s(slot);
        turn_pass();
        sm90::wgmma_wait<0>();
        sm90::fence_operand(s);
        release(k_empty(slot));
        if (last == 0) release_q();
        float corr[2];
        softmax(0, corr);  // (O is still 0: nothing to rescale)
        pack_p();
      }
      // ---- tiles 1..N-1: S(n) and P(n-1) V(n-1) in flight together
      for (int n = 1; n <= last; ++n) {
        const int slot = (it + n) % S, prev = (it + n - 1) % S;
        wait(k_full(slot), ((it + n) / S) & 1, 12);
        paged_fence();
        turn_wait();
        issue_s(slot);
        wait(v_full(prev), ((it + n - 1) / S) & 1, 13);
        paged_fence();
        issue_pv(prev);
        turn_pass();
        sm90::wgmma_wait<1>();  // S(n) complete (the older group); P(n-1) V(n-1) may still run
        sm90::fence_operand(s);
        release(k_empty(slot));
        if (n == last) release_q();
        float corr[2];
        const bool moved = softmax(n, corr);
        sm90::wgmma_wait<0>();  // P(n-1) V(n-1) complete: O and P(n-1) are free again
        sm90::fence_operand(o);
        sm90::fence_operand(pa);
        release(v_empty(prev));
        if (moved) {
#pragma unroll
          for (int i = 0; i < D / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[4 * i + e] *= corr[e / 2];
        }
        pack_p();
      }
      // ---- the last P V
      {
        const int slot = (it + last) % S;
        wait(v_full(slot), ((it + last) / S) & 1, 13);
        paged_fence();
        turn_wait();
        issue_pv(slot);
        turn_pass();
        sm90::wgmma_wait<0>();
        sm90::fence_operand(o);
        sm90::fence_operand(pa);
        release(v_empty(slot));
      }
      it += t.num_tiles;
    }

    const int hq0 = t.kv_head * group;
    const int partial = BATCH ? sm90_ws_partial_row(p, w) : -1;
    if (partial >= 0) {
      // ---- a chunk of a split request: its partial state (float32 O scaled by 1 / d, and lse), straight from the
      // accumulators (no staging: the merge kernel reads these rows once)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        const float dr = quad_sum(d[r]);
        if (row < t.rows_here)
          store_partial_row<D / 8, D>(p, packed_row_index(p, partial, t.pr0 + row, group, hq0),
                                      output_factor<FP8>(dr, p), lane, o + 2 * r, m[r], dr, scl);
      }
      continue;
    }
    // ---- epilogue: normalise, stage this warpgroup's 64 rows as 16 bits, write them as 16-byte chunks
    const int bar_id = 1 + cwg;
    sm90::named_barrier_sync(bar_id, 128);  // the previous item's reads of these staging rows are done
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      d[r] = quad_sum(d[r]);
      stage_o_row<D / 8, DTypeO>(output_factor<FP8>(d[r], p), row0 + 8 * r, lane, o + 2 * r,
                                 [&](int row, int i) { return so + sm90::tile_offset(row, i, BQ); });
    }
    sm90::named_barrier_sync(bar_id, 128);
    // (wtid made opaque: else the compiler hoists the store addresses out of the item loop and spills them)
    store_o_tile<64, CH, 128, DTypeO>(
        p, t.q_first, group, hq0, t.pr0, cwg * 64, t.rows_here, sm90::opaque_int(wtid),
        [&](int row, int c) { return *reinterpret_cast<const uint4*>(so + sm90::tile_offset(row, c, BQ)); });
    if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        if (row < t.rows_here)
          p.lse[packed_row_index(p, t.q_first, t.pr0 + row, group, hq0)] = row_lse(m[r], d[r], scl);
      }
    }
  }
}

// The K or V tensor map (keys > 0: a request's kv_len, or a ragged batch's total rows): 3-D, head_dim innermost, then
// the token and head dimensions in the order of their strides (NHD: heads, then tokens; HND: tokens, then heads), so
// that each stride spans the dimensions inside it as the driver's documentation lays tensors out. Boxes of 64 columns x
// BK keys x 1 head in either order land in shared memory as BK rows of 64 columns (fp8, T an fp8 type: boxes of all 128
// columns, BK unswizzled rows of 128 bytes). Returns in *heads_inner which order the kernel's box coordinates take.
template <int HEAD_DIM, typename T>
static cudaError_t sm90_ws_kv_map(CUtensorMap* map, const void* base, int64_t keys, int64_t heads, int64_t stride_n,
                                  int64_t stride_h, int* heads_inner) {
  using Tr = Sm90WsTraitsT<HEAD_DIM>;
  // The stride of a dimension of size 1 is never stepped over (and torch leaves it arbitrary): make it span the
  // dimension inside it.
  if (keys == 1 && heads == 1) {
    stride_n = stride_h = Tr::kHeadDim;
  } else if (heads == 1) {
    stride_h = stride_n * keys;
  } else if (keys == 1) {
    stride_n = stride_h * heads;
  }
  *heads_inner = heads > 1 && stride_h < stride_n;
  constexpr uint32_t kBoxCols = is_fp8<T>::value ? Tr::kHeadDim : 64;
  auto encode = [&](const uint64_t (&dims)[3], int64_t stride1, int64_t stride2, const uint32_t (&box)[3]) {
    const int64_t strides[2] = {stride1, stride2};
    if constexpr (is_fp8<T>::value) {
      return encode_tile_map_8bit<3>(map, base, dims, strides, box);
    } else {
      return encode_tile_map_16bit<3>(map, base, std::is_same<T, __nv_bfloat16>::value, dims, strides, box);
    }
  };
  if (*heads_inner) {
    const uint64_t dims[3] = {uint64_t(Tr::kHeadDim), uint64_t(heads), uint64_t(keys)};
    const uint32_t box[3] = {kBoxCols, 1, uint32_t(Tr::BK)};
    return encode(dims, stride_h, stride_n, box);
  }
  const uint64_t dims[3] = {uint64_t(Tr::kHeadDim), uint64_t(keys), uint64_t(heads)};
  const uint32_t box[3] = {kBoxCols, uint32_t(Tr::BK), 1};
  return encode(dims, stride_n, stride_h, box);
}

// A paged K or V cache (num_pages pages of page_size slots, 16-bit) as a 4-D tensor map for boxes of `rows` slots of
// one page and one head: head_dim innermost, then the slot and head dimensions in the order of their strides (as
// sm90_ws_kv_map), then the page. Returns in *heads_inner which order the kernel's box coordinates take.
template <int HEAD_DIM, typename T>
static cudaError_t sm90_ws_paged_map(CUtensorMap* map, const void* base, int64_t num_pages, int64_t page_size,
                                     int64_t heads, int64_t stride_page, int64_t stride_n, int64_t stride_h, int rows,
                                     int* heads_inner) {
  using Tr = Sm90WsTraitsT<HEAD_DIM>;
  *heads_inner = heads > 1 && stride_h < stride_n;
  // Strides of dimensions of size 1 (never stepped over; torch leaves them arbitrary) span the dimensions inside.
  if (heads == 1) stride_h = stride_n * page_size;
  const int64_t outer = *heads_inner ? stride_n * page_size : stride_h * heads;
  if (num_pages == 1) stride_page = outer;
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  if (*heads_inner) {
    const uint64_t dims[4] = {uint64_t(Tr::kHeadDim), uint64_t(heads), uint64_t(page_size), uint64_t(num_pages)};
    const int64_t strides[3] = {stride_h, stride_n, stride_page};
    const uint32_t box[4] = {64, 1, uint32_t(rows), 1};
    return encode_tile_map_16bit<4>(map, base, bf16, dims, strides, box);
  }
  const uint64_t dims[4] = {uint64_t(Tr::kHeadDim), uint64_t(page_size), uint64_t(heads), uint64_t(num_pages)};
  const int64_t strides[3] = {stride_n, stride_h, stride_page};
  const uint32_t box[4] = {64, uint32_t(rows), 1, 1};
  return encode_tile_map_16bit<4>(map, base, bf16, dims, strides, box);
}

// Key rows per TMA box of a paged cache, or 0 when its tiles are gathered: pages of a multiple of 8 slots (whole
// swizzle atoms) that divide the BK-key tile or are a multiple of it.
constexpr int sm90_ws_page_rows(int page_size) {
  using Tr = Sm90WsTraits;
  return page_size <= 0 || page_size % 8 != 0 ? 0
         : Tr::BK % page_size == 0            ? page_size
         : page_size % Tr::BK == 0            ? Tr::BK
                                              : 0;
}

template <int HEAD_DIM, typename DTypeQ, typename DTypeKV, typename DTypeO, MaskMode MASK>
cudaError_t launch_sm90_ws_single_prefill(PrefillParams p, int device, cudaStream_t stream, int* occupancy_only) {
  constexpr auto kernel = sm90_ws_prefill_kernel<HEAD_DIM, DTypeQ, DTypeKV, DTypeO, MASK, false, false>;
  using Tr = Sm90WsTraitsT<HEAD_DIM>;
  constexpr int kSmem = Tr::smem_bytes(false, is_fp8<DTypeKV>::value);
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  // The setup is done on every call; with occupancy_only, it is all that is done (the CTAs per SM go there).
  cudaError_t err = kernel_occupancy<kernel>(Tr::kThreads, kSmem, device, occupancy_only);
  if (err != cudaSuccess || occupancy_only != nullptr) return err;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || p.num_chunks != 1) return cudaErrorInvalidValue;
  p.group_size = p.num_qo_heads / p.num_kv_heads;
  p.num_qtiles = ceil_div(p.qo_len * p.group_size, Tr::BQ);
  if (p.num_qtiles == 0) return cudaSuccess;
  Sm90WsParams P = {};
  P.p = p;
  P.num_items = p.num_qtiles * p.num_kv_heads;
  P.head_group = Tr::kHeadGroup > 0          ? min(Tr::kHeadGroup, p.num_kv_heads)
                 : MASK == MaskMode::kCausal ? p.num_kv_heads
                                             : 1;
  if (p.kv_len > 0) {  // (an empty K/V may have no address at all; no tile is issued then)
    err = sm90_ws_kv_map<HEAD_DIM, DTypeKV>(&P.k_map, p.k, p.kv_len, p.num_kv_heads, p.k_stride_n, p.k_stride_h,
                                            &P.k_heads_inner);
    if (err == cudaSuccess)
      err = sm90_ws_kv_map<HEAD_DIM, DTypeKV>(&P.v_map, p.v, p.kv_len, p.num_kv_heads, p.v_stride_n, p.v_stride_h,
                                              &P.v_heads_inner);
    if (err != cudaSuccess) return err;
  }
  const int grid = min(P.num_items, sm_count(device));  // persistent: one CTA per SM at most
  kernel<<<grid, Tr::kThreads, kSmem, stream>>>(P);
  return cudaGetLastError();
}

// Batch prefill, ragged or (PAGED) paged K/V: p carries the plan's schedule (p.work: num_pieces pieces; p.merge:
// merge_grid_x rows merging the partial states of split requests, 0 when none is split) and the per-request
// qo_indptr / kv_indptr (paged: kv_indices, kv_last_page_len, page_size, num_pages and the page strides too);
// kv_rows is the number of token rows of a ragged k and v (kv_indptr[batch]; unused when paged). max_ctas bounds the
// persistent grid (0: one CTA per SM), leaving SMs to a kernel run beside this one (the cascade's decode level). With
// pdl, both kernels launched with programmatic dependent launch.
template <int HEAD_DIM, typename DTypeQ, typename DTypeO, MaskMode MASK, bool PAGED>
cudaError_t launch_sm90_ws_batch_prefill(PrefillParams p, int num_pieces, int merge_grid_x, int kv_rows, int max_ctas,
                                         int device, cudaStream_t stream, bool pdl, int* occupancy_only) {
  constexpr auto kernel = sm90_ws_prefill_kernel<HEAD_DIM, DTypeQ, DTypeQ, DTypeO, MASK, true, PAGED>;
  using Tr = Sm90WsTraitsT<HEAD_DIM>;
  constexpr int kSmem = Tr::smem_bytes(true);
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  cudaError_t err = kernel_occupancy<kernel>(Tr::kThreads, kSmem, device, occupancy_only);
  if (err != cudaSuccess || occupancy_only != nullptr) return err;
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || num_pieces < 0 || kv_rows < 0 || max_ctas < 0 ||
      int64_t(num_pieces) * p.num_kv_heads > INT32_MAX || (PAGED && p.page_size <= 0))
    return cudaErrorInvalidValue;
  p.group_size = p.num_qo_heads / p.num_kv_heads;
  Sm90WsParams P = {};
  P.p = p;
  P.num_items = num_pieces * p.num_kv_heads;
  P.kv_rows = kv_rows;
  if (P.num_items == 0) return cudaSuccess;
  if (PAGED && p.num_pages > 0 && sm90_ws_page_rows(p.page_size) > 0) {
    // Pages by TMA boxes where the driver encodes both maps (their strides multiples of 16 bytes), else gathered.
    const int rows = sm90_ws_page_rows(p.page_size);
    err = sm90_ws_paged_map<HEAD_DIM, DTypeQ>(&P.k_map, p.k, p.num_pages, p.page_size, p.num_kv_heads, p.k_stride_page,
                                              p.k_stride_n, p.k_stride_h, rows, &P.k_heads_inner);
    if (err == cudaSuccess)
      err = sm90_ws_paged_map<HEAD_DIM, DTypeQ>(&P.v_map, p.v, p.num_pages, p.page_size, p.num_kv_heads,
                                                p.v_stride_page, p.v_stride_n, p.v_stride_h, rows, &P.v_heads_inner);
    P.page_rows = err == cudaSuccess ? rows : 0;
    err = cudaSuccess;
  }
  if (!PAGED && kv_rows > 0) {  // (no rows at all: every request is empty, no tile is issued)
    err = sm90_ws_kv_map<HEAD_DIM, DTypeQ>(&P.k_map, p.k, kv_rows, p.num_kv_heads, p.k_stride_n, p.k_stride_h,
                                           &P.k_heads_inner);
    if (err == cudaSuccess)
      err = sm90_ws_kv_map<HEAD_DIM, DTypeQ>(&P.v_map, p.v, kv_rows, p.num_kv_heads, p.v_stride_n, p.v_stride_h,
                                             &P.v_heads_inner);
    if (err != cudaSuccess) return err;
  }
  const int sms = sm_count(device);
  const int grid = min(P.num_items, max_ctas > 0 ? min(max_ctas, sms) : sms);  // persistent: one CTA per SM at most
  err = launch_kernel(kernel, dim3(grid), dim3(Tr::kThreads), kSmem, stream, pdl, P);
  if (err != cudaSuccess) return err;
  // Split requests: their chunks' partial states merged (launched dependent on the kernel with pdl)
  return launch_prefill_merge<Tr::kHeadDim, DTypeO>(p, merge_grid_x, stream, pdl);
}

}  // namespace flashinfer

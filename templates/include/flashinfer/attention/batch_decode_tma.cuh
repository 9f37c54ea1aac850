// Paged batch decode on Hopper with the K/V stream fed by TMA (sm_90; 16-bit KV, head_dim 64/128, GQA groups of
// up to 8 query heads, KV heads a multiple of 8, pages a multiple of 16 tokens, no RoPE/ALiBi).
//
// Why a second decode kernel: the cp.async kernel (batch_decode.cuh) draws ~28-40 GB/s per SM, while its loads alone
// would draw ~90 (measured on an H200, benchmarks/probe_sm_bandwidth.cu: 16-byte cp.async rings 92 GB/s per SM on 16-32
// SMs, TMA boxes of 16 KB 90, boxes of 2 KB only 43), so the rest of its work per key bounds it. That matters only
// where decode gets a share of the SMs (the cascade's decode level beside its shared level on fa3_ws): on the whole GPU
// both kernels sit near the read bandwidth and the cp.async kernel measured 3-15% faster, so this one is opt-in
// (BatchDecodeWithPagedKVCacheWrapper._tma_decode; its grid may be bounded to the SMs left to it, max_ctas).
//
// A CTA serves 8 KV heads of one worker's pieces (the planner's schedule, batch_decode_plan.cuh, with one CTA an SM):
// warp 8 is the producer, whose lane 0 copies each stage (16 keys of the 8 heads: a box of 64 dims x 16 slots x 8
// heads per 128-byte column half, for K and for V: 64 KB at head_dim 128) into a ring of three stages, completing on
// the stage's full mbarrier; consumer warp h < 8 owns KV head h of the group and all of its query heads. Its scores
// are computed transposed, S^T = K Q^T (m16n8k16: 16 keys x 8 query heads), so that every fragment row is a real key,
// and P.V likewise, O^T = V^T P^T (16 dims x 8 heads, k = the 16 keys); movmatrix turns the probabilities' C fragment
// into P^T's B fragment. Each warp releases a stage on its empty mbarrier (8 arrivals). No block barrier in the loop.
//
// Keys outside a piece's [begin, end) in its first and last stage (the box is aligned to 16 keys) are masked, and
// their V rows zeroed in shared memory before P.V (a slot past the request's last key may hold any bits, NaN
// included, and 0 * NaN is NaN). A page id outside [0, num_pages) is asked for as page -1, outside the tensor map:
// TMA fills its box with zeros, i.e. keys of score 0 and value 0, as the cp.async kernel reads such rows.
#pragma once
#include "flashinfer/attention/batch_decode.cuh"
#include "flashinfer/host/tma.cuh"
#include "flashinfer/ptx/mbarrier.cuh"
#include "flashinfer/ptx/mma.cuh"
#include "flashinfer/ptx/smem.cuh"
#include "flashinfer/ptx/tma.cuh"
#include "flashinfer/ptx/wgmma.cuh"

namespace flashinfer {

constexpr int kTmaDecodeHeads = 8;              // KV heads of a CTA, one consumer warp each
constexpr int kTmaDecodeKeys = 16;              // keys of a ring stage
constexpr int kTmaDecodeMaxGroup = 8;           // query heads per KV head: the n8 of the transposed products
constexpr int kTmaDecodeRingBytes = 3 * 65536;  // three 64 KB stages at head_dim 128 (six of 32 KB at 64)

template <int HEAD_DIM>
struct TmaDecodeTraits {
  static constexpr int kHalves = HEAD_DIM / 64;                             // 128-byte columns of a row
  static constexpr int kBoxBytes = 128 * kTmaDecodeKeys * kTmaDecodeHeads;  // one column of 16 keys x 8 heads
  static constexpr int kStageBytes = 2 * kHalves * kBoxBytes;               // K, then V
  static constexpr int kStages = kTmaDecodeRingBytes / kStageBytes;
  static constexpr int kConsumers = kTmaDecodeHeads;
  static constexpr int kThreads = 32 * (kConsumers + 1);
  // Per warp, the output of its query heads (o^T as floats, then m and d) on its way to store_decode_state.
  static constexpr int kEpilogueFloats = kTmaDecodeMaxGroup * (HEAD_DIM + 2);
  static constexpr int kBarrierBytes = 2 * kStages * 8;
  // + 1024: the ring is aligned to 1024 bytes (the 128-byte swizzle's period) by hand.
  static constexpr int kSmemBytes = kTmaDecodeRingBytes + kConsumers * kEpilogueFloats * 4 + kBarrierBytes + 1024;
};

// Whether the TMA kernel serves this configuration (device side of the planner's choice; the rest is run-time:
// compute capability 9.x, num_kv_heads % 8 == 0, group <= 8, page_size % 16 == 0).
template <int HEAD_DIM, typename DTypeQ, typename DTypeKV, PosEncoding POS>
__host__ __device__ constexpr bool tma_decode_supported() {
  return (HEAD_DIM == 64 || HEAD_DIM == 128) && !is_fp8<DTypeKV>::value && std::is_same<DTypeQ, DTypeKV>::value &&
         POS == PosEncoding::kNone;
}

// Shared-memory address of 16-byte column `chunk` (0 .. HEAD_DIM/8 - 1) of row `key` (0..15) of KV head `head` in a
// stage's K or V part `base`: the box's rows are (head, slot) with the slot fastest, 128 bytes each, chunk c of row r
// at c ^ (r & 7) (CU_TENSOR_MAP_SWIZZLE_128B).
template <int HEAD_DIM>
FI_DEVICE uint32_t tma_decode_row(uint32_t base, int head, int key, int chunk) {
  const int row = head * kTmaDecodeKeys + key;
  return base + (chunk >> 3) * TmaDecodeTraits<HEAD_DIM>::kBoxBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

template <int HEAD_DIM, typename DTypeKV, typename DTypeO, bool SOFTCAP>
__global__ void __launch_bounds__(TmaDecodeTraits<HEAD_DIM>::kThreads, 1)
    batch_decode_tma_kernel(const __grid_constant__ BatchDecodeParams p, const __grid_constant__ CUtensorMap k_map,
                            const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using T = TmaDecodeTraits<HEAD_DIM>;
  constexpr int STAGES = T::kStages, KS = HEAD_DIM / 16, MT = HEAD_DIM / 16;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* ring = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* epilogue = reinterpret_cast<float*>(ring + kTmaDecodeRingBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(epilogue + T::kConsumers * T::kEpilogueFloats);
  uint64_t* empty = full + STAGES;
  const uint32_t ring_addr = smem_addr(ring);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbarrier_init(smem_addr(full + s), 1);
      sm90::mbarrier_init(smem_addr(empty + s), T::kConsumers);
    }
    sm90::mbarrier_init_fence();
  }
  if (warp == T::kConsumers && lane == 0) {
    sm90::tma_prefetch_map(&k_map);
    sm90::tma_prefetch_map(&v_map);
  }
  __syncthreads();
  grid_dependency_chain();  // launched with programmatic dependent launch (see single_decode_kernel)

  const int head_groups = p.num_kv_heads / kTmaDecodeHeads;
  const int head_group = blockIdx.x % head_groups, worker = blockIdx.x / head_groups;
  const BatchDecodeLayout& L = p.layout;
  const int piece_first = p.plan[L.worker_indptr + worker], piece_last = p.plan[L.worker_indptr + worker + 1];
  // A piece's keys [begin, end) (the run-time window applied as the cp.async kernel does) and its stages.
  auto piece_keys = [&](int piece, int& r, int& begin, int& end) {
    r = p.plan[L.piece_req + piece];
    begin = p.plan[L.piece_begin + piece];
    end = p.plan[L.piece_end + piece];
    const int q_pos = p.plan[L.req_kv_len + r] - 1;
    if (p.window_left >= 0) begin = max(begin, min(end, q_pos - p.window_left));
    return end > begin ? ceil_div(end - (begin & ~(kTmaDecodeKeys - 1)), kTmaDecodeKeys) : 0;
  };

  if (warp == T::kConsumers) {
    // ---- producer: lane j looks up the page of stage s0 + j, lane 0 issues the copies ----
    int count = 0;  // stages issued so far (ring position and phase)
    for (int piece = piece_first; piece < piece_last; ++piece) {
      int r, begin, end;
      const int stages = piece_keys(piece, r, begin, end);
      const int* pages = p.kv.indices + p.plan[L.req_page_base + r];
      const int key0 = begin & ~(kTmaDecodeKeys - 1);
      for (int s0 = 0; s0 < stages; s0 += 32) {
        int page = 0, slot = 0;
        if (s0 + lane < stages) {
          int page_in_request;
          split_token(key0 + (s0 + lane) * kTmaDecodeKeys, p.kv.page_size, page_in_request, slot);
          page = __ldg(pages + page_in_request);
          if (!page_in_cache(page, p.kv.num_pages)) page = -1;  // (a negative box coordinate reads as zeros)
        }
        const int n = min(32, stages - s0);
        for (int j = 0; j < n; ++j) {
          const int pg = __shfl_sync(0xffffffffu, page, j), sl = __shfl_sync(0xffffffffu, slot, j);
          if (lane == 0) {
            const int s = count % STAGES;
            if (count >= STAGES) sm90::mbarrier_wait(smem_addr(empty + s), ((count / STAGES) - 1) & 1);
            const uint32_t bar = smem_addr(full + s);
            sm90::mbarrier_arrive_expect_tx(bar, T::kStageBytes);
            const uint32_t dst = ring_addr + s * T::kStageBytes;
            const int h0 = head_group * kTmaDecodeHeads;
#pragma unroll
            for (int c = 0; c < T::kHalves; ++c) {
              sm90::tma_load_4d(dst + c * T::kBoxBytes, &k_map, 64 * c, sl, h0, pg, bar);
              sm90::tma_load_4d(dst + (T::kHalves + c) * T::kBoxBytes, &v_map, 64 * c, sl, h0, pg, bar);
            }
          }
          ++count;
        }
      }
    }
    return;
  }

  // ---- consumer warp: KV head `warp` of the group, its query heads as the n8 columns ----
  const int kv_head = head_group * kTmaDecodeHeads + warp;
  const int group = p.group_size;
  const int g = lane / 4, t4 = lane % 4;
  float* e_o = epilogue + warp * T::kEpilogueFloats;  // [group][HEAD_DIM]
  float* e_m = e_o + kTmaDecodeMaxGroup * HEAD_DIM;   // [group]
  float* e_d = e_m + kTmaDecodeMaxGroup;
  int count = 0;
  for (int piece = piece_first; piece < piece_last; ++piece) {
    int r, begin, end;
    const int stages = piece_keys(piece, r, begin, end);
    const int key0 = begin & ~(kTmaDecodeKeys - 1);
    // q^T as the B operand: b0 = dims 16ks + 2t, +1 of head g, b1 = 16ks + 8 + 2t, +1; heads beyond the group zero.
    uint32_t qb[KS][2];
    {
      const bool real = g < group;
      const DTypeKV* qh =
          static_cast<const DTypeKV*>(p.q) + r * p.q_stride_b + (kv_head * group + (real ? g : 0)) * p.q_stride_h;
      const uint16_t* qbits = reinterpret_cast<const uint16_t*>(qh);  // (q rows need only 2-byte alignment)
      auto pair = [&](int c) { return uint32_t(qbits[c]) | (uint32_t(qbits[c + 1]) << 16); };
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        qb[ks][0] = real ? pair(16 * ks + 2 * t4) : 0u;
        qb[ks][1] = real ? pair(16 * ks + 8 + 2 * t4) : 0u;
      }
    }
    // Heads 2t and 2t+1: m, d (this lane's keys until the end), o^T: o[mt][0|1] = dim 16mt + g, o[mt][2|3] = + 8.
    float m[2] = {kNegInf, kNegInf}, d[2] = {0.f, 0.f};
    float o[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

    for (int st = 0; st < stages; ++st, ++count) {
      const int s = count % STAGES;
      sm90::mbarrier_wait(smem_addr(full + s), (count / STAGES) & 1);
      const uint32_t k_base = ring_addr + s * T::kStageBytes, v_base = k_base + T::kHalves * T::kBoxBytes;
      const int first = key0 + st * kTmaDecodeKeys;
      const bool partial = first < begin || first + kTmaDecodeKeys > end;

      float sc4[4] = {0.f, 0.f, 0.f, 0.f};  // S^T: (key g, heads 2t, 2t+1), (key g+8, heads 2t, 2t+1)
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        // Matrix i of the x4 load: keys 8 * (i & 1) + 0..7, 16-byte column 2ks + (i >> 1).
        uint32_t a[4];
        ldmatrix_x4(a, tma_decode_row<HEAD_DIM>(k_base, warp, (lane & 8) + (lane & 7), 2 * ks + (lane >> 4)));
        mma_16816<DTypeKV>(sc4, a, qb[ks][0], qb[ks][1]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = first + g + (e >= 2 ? 8 : 0);
        const float x = transform_logit<false, SOFTCAP>(sc4[e] * p.sc.sm_scale, 0.f, 0, p.sc.logits_soft_cap);
        sc4[e] = key >= begin && key < end ? x : kNegInf;
      }
      bool moved = false;
      float corr[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        corr[i] = online_softmax_row<1, 2, 8, 4>(m[i], d[i], 1.f, moved,
                                                 [&](int, int e) -> float& { return sc4[2 * e + i]; });
      }
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          o[mt][0] *= corr[0], o[mt][1] *= corr[1], o[mt][2] *= corr[0], o[mt][3] *= corr[1];
      }
      if (partial) {
        // Zero this head's V rows of the masked keys (their probabilities are 0, their bits anything).
        for (int i = lane; i < kTmaDecodeKeys * HEAD_DIM / 8; i += 32) {
          const int key = i / (HEAD_DIM / 8), chunk = i % (HEAD_DIM / 8);
          if (first + key < begin || first + key >= end) {
            const uint32_t addr = tma_decode_row<HEAD_DIM>(v_base, warp, key, chunk);
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
          }
        }
        __syncwarp();
      }
      // P^T's B fragment (keys 2t, 2t+1 of head g; b1: keys 8 on), from the C fragment (key g; heads 2t, 2t+1).
      const uint32_t p0 = movmatrix_trans(pack2<DTypeKV>(sc4[0], sc4[1]));
      const uint32_t p1 = movmatrix_trans(pack2<DTypeKV>(sc4[2], sc4[3]));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // Transposed 8x8 blocks: matrix i = keys 8 * (i >> 1) + 0..7, 16-byte column 2mt + (i & 1): a0 = dims
        // 16mt + 0..7 x keys 0..7, a1 = dims + 8.. x keys 0..7, a2 / a3 the same of keys 8..15.
        uint32_t a[4];
        ldmatrix_x4_trans(
            a, tma_decode_row<HEAD_DIM>(v_base, warp, ((lane >> 4) << 3) + (lane & 7), 2 * mt + ((lane >> 3) & 1)));
        mma_16816<DTypeKV>(o[mt], a, p0, p1);
      }
      if (partial) sm90::fence_async_shared();  // (the zeroed rows: generic writes before the next TMA's)
      __syncwarp();
      if (lane == 0) sm90::mbarrier_arrive(smem_addr(empty + s));
    }

    // The 8 lanes of column t4 hold heads 2t, 2t+1 of 16 keys each: their d sum; m is common to them.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      d[i] = column_sum(d[i]);
      const int head = 2 * t4 + i;
      if (head < group) {
        if (g == 0) {
          e_m[head] = m[i];
          e_d[head] = d[i];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          e_o[head * HEAD_DIM + 16 * mt + g] = o[mt][i];
          e_o[head * HEAD_DIM + 16 * mt + g + 8] = o[mt][2 + i];
        }
      }
    }
    __syncwarp();
    for (int item = lane; item < group * (HEAD_DIM / 8); item += 32) {
      const int j = item / (HEAD_DIM / 8), col = (item % (HEAD_DIM / 8)) * 8;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = e_o[j * HEAD_DIM + col + i];
      const float d_all = e_d[j];
      store_piece_state<HEAD_DIM, DTypeO>(p, piece, kv_head * group + j, col, acc, d_all, row_lse(e_m[j], d_all, 1.f));
    }
    __syncwarp();  // (the staging area is read before the next piece writes it)
  }
#endif
}

// ------------------------------------------------------------------------------------------- host side

// The tensor maps of the paged cache's K and V as (dim, slot, head, page), boxes of 64 dims x 16 slots x 8 heads (one
// per 128-byte half of a row; 5-D boxes of whole rows, both halves in one box, measured slower on an H200: 64 x 4096
// keys 278 vs 271 us).
// NHD pages are [page_size][num_kv_heads][HEAD_DIM] (slot stride stride_n, head stride HEAD_DIM), HND pages
// [num_kv_heads][page_size][HEAD_DIM] (slot stride HEAD_DIM, head stride stride_h).
template <int HEAD_DIM, typename DTypeKV, bool KV_HND>
static cudaError_t tma_decode_maps(const BatchDecodeRunArgs& a, int page_size, int num_kv_heads, CUtensorMap* k_map,
                                   CUtensorMap* v_map) {
  const int64_t slot_stride = KV_HND ? int64_t(HEAD_DIM) : a.stride_n, head_stride = KV_HND ? a.stride_h : HEAD_DIM;
  constexpr bool kBf16 = std::is_same<DTypeKV, __nv_bfloat16>::value;
  // (a cache of no pages still gets a valid map: every page id is then outside it, and the kernel asks for page -1)
  const uint64_t num_pages = a.num_pages > 0 ? uint64_t(a.num_pages) : 1;
  const uint64_t dims[4] = {uint64_t(HEAD_DIM), uint64_t(page_size), uint64_t(num_kv_heads), num_pages};
  const int64_t strides[3] = {slot_stride, head_stride, a.stride_page};
  const uint32_t box[4] = {64, uint32_t(kTmaDecodeKeys), uint32_t(kTmaDecodeHeads), 1};
  cudaError_t err = encode_tile_map_16bit<4>(k_map, a.k, kBf16, dims, strides, box);
  if (err != cudaSuccess) return err;
  return encode_tile_map_16bit<4>(v_map, a.v, kBf16, dims, strides, box);
}

// Runs a plan made for the TMA kernel (plan.tma): the decode kernel, then the merge of split requests.
template <int HEAD_DIM, typename DTypeKV, typename DTypeO, bool KV_HND, bool SOFTCAP>
cudaError_t launch_batch_decode_tma(BatchDecodePlan& plan, const BatchDecodeRunArgs& a) {
  using T = TmaDecodeTraits<HEAD_DIM>;
  constexpr auto kKernel = batch_decode_tma_kernel<HEAD_DIM, DTypeKV, DTypeO, SOFTCAP>;
  cudaError_t err = kernel_occupancy<kKernel>(T::kThreads, T::kSmemBytes, a.device, nullptr);  // (the smem opt-in)
  if (err != cudaSuccess) return err;
  CUtensorMap k_map, v_map;
  err = tma_decode_maps<HEAD_DIM, DTypeKV, KV_HND>(a, plan.page_size, plan.num_kv_heads, &k_map, &v_map);
  if (err != cudaSuccess) return err;
  BatchDecodeParams p = batch_decode_params(plan, a);
  err = launch_kernel(kKernel, dim3(plan.workers * (plan.num_kv_heads / kTmaDecodeHeads)), dim3(T::kThreads),
                      T::kSmemBytes, a.stream, a.enable_pdl, p, k_map, v_map);
  if (err != cudaSuccess) return err;
  return launch_batch_merge<HEAD_DIM, DTypeO>(plan, a, p);
}

}  // namespace flashinfer

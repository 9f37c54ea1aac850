// Entry points of the sampling-kernel emulator (tests only; see emu.h): each runs the device function of one kernel
// for every output row, one cluster of CTAs at a time, with the cluster size and caching the real launcher would
// pick (or the ones asked for). Every function returns nullptr or an error text.
#include "emu.h"
#include "sampling.cuh"

namespace flashinfer {
namespace sampling {
alignas(16) uint8_t smem_raw[16];  // what the __global__ wrappers (not run here) declare
}  // namespace sampling
}  // namespace flashinfer

using namespace flashinfer::sampling;

namespace {

template <typename D, bool kC>
void sample_body(void* a) {
  sample_cta<D, kC>(*static_cast<const SampleParams*>(a), emu::my_cta().smem);
}
template <typename D, bool kC>
void row_op_body(void* a) {
  row_op_cta<D, kC>(*static_cast<const RowOpParams*>(a), emu::my_cta().smem);
}
template <typename D, bool kMask>
void row_select_body(void* a) {
  row_select_cta<D, kMask>(*static_cast<const RowOpParams*>(a), emu::my_cta().smem);
}
void chain_body(void* a) { chain_speculative_cta(*static_cast<const SpecParams*>(a), emu::my_cta().smem); }

// The single-pass top-k route alone: how many candidates reach rank 0, the bound, whether it held.
struct TopKProbe {
  const void* row;
  int vocab, k, logits;
  unsigned n, theta, ok, max_key, num_valid;
};
template <typename D, bool kC>
void topk_probe_body(void* a) {
  TopKProbe& t = *static_cast<TopKProbe*>(a);
  uint8_t* smem = emu::my_cta().smem;
  Shared& sh = *reinterpret_cast<Shared*>(smem);
  ClusterCtx cx = {cluster_rank(), cluster_size(), 0};
  if (threadIdx.x == 0) sh.gather_count = 0;
  const Row<D, kC> row(t.row, t.vocab, cx, reinterpret_cast<uint4*>(smem + sizeof(Shared)), t.logits ? -kInf : 0.f);
  row.fill_cache();
  const TopKStats ts = topk_collect(sh, cx, topk_filter(row, sh, t.logits != 0, t.k), t.k);
  const Weigher wg(t.logits != 0, ts.st.max_key);
  Gathered g = {0, 0};
  if (ts.ok) g = push_topk_candidates(row, sh, cx, wg, ts, false);
  if (cx.rank == 0 && threadIdx.x == 0) {
    t.n = g.n;
    t.theta = ts.theta;
    t.ok = ts.ok;
    t.max_key = ts.st.max_key;
    t.num_valid = ts.st.num_valid;
  }
}
template <typename D, bool kC>
struct TopKProbeBody {
  static constexpr emu::Body fn = topk_probe_body<D, kC>;
};

int elem_bytes(int dtype) { return dtype == 0 ? 4 : 2; }

// Declares the input tensor, `rows` rows of `vocab` elements `stride` elements apart, as the global memory the
// device code may read (see emu::global_readable).
void set_readable(const void* input, int64_t rows, int64_t stride, int vocab, int bytes) {
  emu::State& s = emu::st();
  s.readable_lo = static_cast<const uint8_t*>(input);
  s.readable_hi = s.readable_lo + (rows > 0 ? ((rows - 1) * stride + vocab) * bytes : 0);
}

// The plan the launcher would make, with the cluster size and caching overridden when asked (cluster 0 / cached -1:
// the launcher's choice).
constexpr int kEmulatedSms = 132;

const char* plan(int dtype, int vocab, int cluster, int cached, RowPlan* out, bool stream_rows = false,
                 int rows = 1) {
  RowPlan p = stream_rows ? plan_stream(rows, vocab, elem_bytes(dtype), kMaxCluster, kEmulatedSms)
                          : plan_rows(rows, vocab, elem_bytes(dtype), kMaxCluster, kEmulatedSms);
  if (cluster > 0) p.cluster = cluster;
  const int vec = 16 / elem_bytes(dtype);
  const int slice = ((vocab + vec - 1) / vec + 1 + p.cluster - 1) / p.cluster;
  if (cached >= 0) p.cached = cached != 0;
  p.smem = sizeof(Shared) + (p.cached ? static_cast<size_t>(slice) * 16 : 0);
  if (!plan_fits_chunks(vocab, elem_bytes(dtype), p)) return "slice too large for the chunk table";
  *out = p;
  return nullptr;
}

template <template <typename, bool> class Body>
emu::Body pick(int dtype, bool cached) {
  if (dtype == 0) return cached ? Body<float, true>::fn : Body<float, false>::fn;
  if (dtype == 1) return cached ? Body<__nv_bfloat16, true>::fn : Body<__nv_bfloat16, false>::fn;
  return cached ? Body<__half, true>::fn : Body<__half, false>::fn;
}
template <typename D, bool kC>
struct SampleBody {
  static constexpr emu::Body fn = sample_body<D, kC>;
};
template <typename D, bool kC>
struct RowOpBody {
  static constexpr emu::Body fn = row_op_body<D, kC>;
};

}  // namespace

extern "C" {

int emu_cluster_of(int dtype, int rows, int vocab) {
  return plan_rows(rows, vocab, elem_bytes(dtype), kMaxCluster, kEmulatedSms).cluster;
}

const char* emu_sample(int dtype, int cluster, int cached, unsigned sched_seed, const void* input, int64_t row_stride,
                       int num_rows, int vocab, int batch, int is_logits, const void* indices, int indices_int64,
                       void* samples, int samples_int64, void* valid, int filters, int top_k_first,
                       const int* top_k_arr, int top_k_val, const float* top_p_arr, float top_p_val,
                       const float* min_p_arr, float min_p_val, const int64_t* seed_arr, int seed_stride,
                       uint64_t seed_val, const int64_t* offset_arr, int offset_stride, uint64_t offset_val) {
  RowPlan pl;
  if (const char* e = plan(dtype, vocab, cluster, cached, &pl, (filters & kTopK) != 0, batch)) return e;
  SampleParams p = {};
  p.input = input;
  p.row_stride = row_stride;
  p.num_rows = num_rows;
  p.vocab = vocab;
  p.batch = batch;
  p.logits = is_logits != 0;
  p.indices = indices;
  p.indices_int64 = indices_int64 != 0;
  p.samples = samples;
  p.samples_int64 = samples_int64 != 0;
  p.valid = static_cast<bool*>(valid);
  p.filters = filters;
  p.top_k_first = top_k_first != 0;
  p.top_k_arr = top_k_arr;
  p.top_k_val = top_k_val;
  p.top_p_arr = top_p_arr;
  p.top_p_val = top_p_val;
  p.min_p_arr = min_p_arr;
  p.min_p_val = min_p_val;
  p.seed_arr = seed_arr;
  p.seed_stride = seed_stride;
  p.seed_val = seed_val;
  p.offset_arr = offset_arr;
  p.offset_stride = offset_stride;
  p.offset_val = offset_val;
  const emu::Body body = pick<SampleBody>(dtype, pl.cached);
  set_readable(input, num_rows, row_stride, vocab, elem_bytes(dtype));
  for (int b = 0; b < batch; ++b) {
    if (const char* e = emu::run_cluster(body, &p, pl.cluster, kThreads, b * pl.cluster, pl.smem, sched_seed + b))
      return e;
  }
  return nullptr;
}

// radix != 0: the top-k/top-p transforms through row_op_kernel's radix rounds even where the launcher picks
// row_select_kernel (cached slices).
const char* emu_row_op(int dtype, int cluster, int cached, unsigned sched_seed, const void* input, int64_t in_stride,
                       void* output, int64_t out_stride, int rows, int vocab, int op, const int* top_k_arr,
                       int top_k_val, const float* top_p_arr, float top_p_val, const float* temperature_arr,
                       float temperature_val, int radix) {
  RowPlan pl;
  if (const char* e = plan(dtype, vocab, cluster, cached, &pl, false, rows)) return e;
  RowOpParams p = {};
  p.input = input;
  p.in_stride = in_stride;
  p.output = output;
  p.out_stride = out_stride;
  p.rows = rows;
  p.vocab = vocab;
  p.op = op;
  p.top_k_arr = top_k_arr;
  p.top_k_val = top_k_val;
  p.top_p_arr = top_p_arr;
  p.top_p_val = top_p_val;
  p.temperature_arr = temperature_arr;
  p.temperature_val = temperature_val;
  emu::Body body = pick<RowOpBody>(dtype, pl.cached);
  if (pl.cached && op != kSoftmax && !radix) {
    const bool mask = op == kTopKMask;
    body = dtype == 0   ? (mask ? row_select_body<float, true> : row_select_body<float, false>)
           : dtype == 1 ? (mask ? row_select_body<__nv_bfloat16, true> : row_select_body<__nv_bfloat16, false>)
                        : (mask ? row_select_body<__half, true> : row_select_body<__half, false>);
    pl.smem = pl.smem - sizeof(Shared) + sizeof(SelShared);
  }
  set_readable(input, rows, in_stride, vocab, elem_bytes(dtype));
  for (int r = 0; r < rows; ++r) {
    if (const char* e = emu::run_cluster(body, &p, pl.cluster, kThreads, r * pl.cluster, pl.smem, sched_seed + r))
      return e;
  }
  return nullptr;
}

const char* emu_chain(unsigned sched_seed, const float* draft_probs, const int* draft_token_ids,
                      const float* target_probs, int* output_token_ids, int* accepted, int* emitted, int batch,
                      int num_speculative, int vocab, const int64_t* seed_arr, int seed_stride, uint64_t seed_val,
                      const int64_t* offset_arr, int offset_stride, uint64_t offset_val) {
  SpecParams p = {};
  p.draft_probs = draft_probs;
  p.draft_ids = draft_token_ids;
  p.target_probs = target_probs;
  p.output_ids = output_token_ids;
  p.accepted = accepted;
  p.emitted = emitted;
  p.batch = batch;
  p.n = num_speculative;
  p.vocab = vocab;
  p.seed_arr = seed_arr;
  p.seed_stride = seed_stride;
  p.seed_val = seed_val;
  p.offset_arr = offset_arr;
  p.offset_stride = offset_stride;
  p.offset_val = offset_val;
  set_readable(target_probs, static_cast<int64_t>(batch) * (num_speculative + 1), vocab, vocab, 4);
  for (int b = 0; b < batch; ++b) {
    if (const char* e = emu::run_cluster(chain_body, &p, 1, kThreads, b, sizeof(Shared), sched_seed + b)) return e;
  }
  return nullptr;
}

const char* emu_topk_probe(int dtype, int cluster, int cached, const void* row, int vocab, int k, int logits,
                           unsigned* out) {
  RowPlan pl;
  if (const char* e = plan(dtype, vocab, cluster, cached, &pl)) return e;
  TopKProbe t = {row, vocab, k, logits, 0, 0, 0, 0, 0};
  set_readable(row, 1, vocab, vocab, elem_bytes(dtype));
  if (const char* e = emu::run_cluster(pick<TopKProbeBody>(dtype, pl.cached), &t, pl.cluster, kThreads, 0, pl.smem, 7))
    return e;
  out[0] = t.n;
  out[1] = t.theta;
  out[2] = t.ok;
  out[3] = t.max_key;
  out[4] = t.num_valid;
  return nullptr;
}

// The device helpers, for unit checks.
void emu_philox(uint64_t seed, uint64_t offset, uint32_t row, uint32_t draw, uint32_t* out) {
  const uint4 r = philox(seed, offset, row, draw);
  out[0] = r.x;
  out[1] = r.y;
  out[2] = r.z;
  out[3] = r.w;
}
uint32_t emu_logit_key(float x) { return logit_key(x); }
uint32_t emu_prob_key(float x) { return prob_key(x); }
float emu_logit_from_key(uint32_t k) { return logit_from_key(k); }
uint64_t emu_fixed_weight(float w, int ref_exp) { return fixed_weight(w, ref_exp); }
uint64_t emu_mass_target(float fraction, uint64_t total) { return mass_target(fraction, total); }

// Checks of the row-select shortcuts against what they replace, over special and random bit patterns; each returns
// the number of disagreements. logit_key_flat = logit_key for every float.
int emu_check_logit_key_flat(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  int bad = 0;
  const uint32_t special[] = {0u,          0x80000000u, 1u,          0x80000001u, 0x007FFFFFu, 0x807FFFFFu,
                              0x00800000u, 0x80800000u, 0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F800000u, 0xFF800000u,
                              0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x3F800000u, 0xBF800000u};
  for (int i = 0; i < n + static_cast<int>(sizeof(special) / 4); ++i) {
    const uint32_t b = i < static_cast<int>(sizeof(special) / 4) ? special[i] : static_cast<uint32_t>(rng());
    const float x = __uint_as_float(b);
    bad += logit_key_flat(x) != logit_key(x);
  }
  return bad;
}
// Selector::last_weight = fixed_weight for weights below 2^(ref_exp - 14.9) (the fast round's last bin), every
// ref_exp of a positive finite largest probability.
int emu_check_last_weight(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const int ref_exp = static_cast<int>(rng() % 255) - 127;
    const int top = ref_exp - 15 + 127;  // exponent field just below the last bin's bound
    if (top < 0) continue;
    const uint32_t k = static_cast<uint32_t>(rng() % (static_cast<uint64_t>(top + 1) << 23));  // (0, 2^(ref_exp - 15))
    const float2 scale = Selector<float, false>::last_scale(ref_exp);
    bad += Selector<float, false>::last_weight(k, scale) != fixed_weight(__uint_as_float(k), ref_exp);
  }
  return bad;
}
// Divider = x / d correctly rounded, for d and x of any magnitude (positive, finite, nonzero), through its fast path
// where it takes it (the seed reciprocal off by up to an ulp: emu::rcp_approx).
int emu_check_divider(uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const float d = __uint_as_float(static_cast<uint32_t>(rng() % 0x7F7FFFFFu) + 1u);
    const float x = __uint_as_float(static_cast<uint32_t>(rng() % 0x7F7FFFFFu) + 1u);
    const float dn = i % 2 ? d : __uint_as_float((__float_as_uint(d) & 0x007FFFFFu) | 0x3F800000u);  // d in [1, 2)
    const Divider div(dn);
    const float q = div.fast(x) ? div.fast_div(x) : __fdiv_rn(x, dn);
    bad += __float_as_uint(q) != __float_as_uint(x / dn);
  }
  return bad;
}

// Fixed-point weights of a row as the kernels compute them (for references of logit rows).
void emu_weights(const float* x, int n, int logits, uint64_t* out) {
  uint32_t max_key = 0;
  for (int i = 0; i < n; ++i) {
    const uint32_t k = logits ? logit_key(x[i]) : prob_key(x[i]);
    max_key = k > max_key ? k : max_key;
  }
  const Weigher wg(logits != 0, max_key);
  for (int i = 0; i < n; ++i) out[i] = wg.key(x[i]) ? wg.weight_fx(x[i]) : 0;
}

}  // extern "C"

// Attention masks of the prefill kernels: which keys a query row may see. Query token i of a request with
// qo_len queries and kv_len keys sits at position delta + i (delta = kv_len - qo_len); causal lets it see keys
// j <= delta + i, a sliding window keys j >= delta + i - window_left, a custom mask the keys whose bit is set.
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

enum class MaskMode : int { kNone = 0, kCausal = 1, kCustom = 2 };

// A request's custom mask: bit-packed in little bit order, bit (i, j) for query token i and key j at bit
// i * kv_len + j counted from byte `byte_offset` of `bits`.
struct CustomMask {
  const uint8_t* bits;
  int byte_offset;
  int kv_len;
  FI_DEVICE bool allows(int token, int key) const {
    const int64_t bit = int64_t(token) * kv_len + key;
    return (bits[int64_t(byte_offset) + (bit >> 3)] >> (bit & 7)) & 1;
  }
};

// The keys [lo, hi) that query tokens tok_min..tok_max (a tile of query rows) may see within the chunk
// [chunk_begin, chunk_end) of a request's kv_len keys: causality cuts at the last token's diagonal, the window
// at the first token's window start. Rows of the tile still need key_visible() per key.
template <MaskMode MASK, bool WINDOW>
FI_DEVICE void visible_key_range(int chunk_begin, int chunk_end, int kv_len, int delta, int tok_min, int tok_max,
                                 int window_left, int& lo, int& hi) {
  lo = chunk_begin;
  hi = min(chunk_end, kv_len);
  if constexpr (MASK == MaskMode::kCausal) hi = min(hi, delta + tok_max + 1);
  if constexpr (WINDOW) lo = max(lo, delta + tok_min - window_left);
}

// Whether the key tile [k0, k0 + BK) needs per-key masking for the tile rows of tokens tok_min..tok_max: it
// runs past hi, or crosses the causal diagonal or the window start of some row, or the mask is custom.
template <MaskMode MASK, bool WINDOW, int BK>
FI_DEVICE bool tile_needs_mask(int k0, int hi, int delta, int tok_min, int tok_max, int window_left) {
  bool need_mask = k0 + BK > hi || MASK == MaskMode::kCustom;
  if constexpr (MASK == MaskMode::kCausal) need_mask |= k0 + BK - 1 > delta + tok_min;
  if constexpr (WINDOW) need_mask |= k0 < delta + tok_max - window_left;
  return need_mask;
}

// Whether query token `token` at position qpos may see key `key` (below hi, the end of visible_key_range).
// `custom` is read only with MaskMode::kCustom.
template <MaskMode MASK, bool WINDOW>
FI_DEVICE bool key_visible(int key, int hi, int token, int qpos, int window_left, const CustomMask& custom) {
  bool ok = key < hi;
  if constexpr (MASK == MaskMode::kCausal) ok = ok && key <= qpos;
  if constexpr (WINDOW) ok = ok && key >= qpos - window_left;
  if constexpr (MASK == MaskMode::kCustom) {
    if (ok) ok = custom.allows(token, key);
  }
  return ok;
}

// Masks one tile of scores held as a wgmma m64nBK accumulator (the Hopper prefill kernels, fa3 and fa3_ws): s[4 i + e]
// is the score of row g (e < 2) or g + 8 of the lane's warp and key k0 + 8 i + 2 (lane % 4) + (e & 1). Keys past hi
// and, for causal, past each row's diagonal (qpos(0), qpos(1): the positions of rows g and g + 8) become -inf; only
// tiles that tile_needs_mask picks are touched, and qpos is evaluated only for them.
template <MaskMode MASK, int BK, typename QPos>
FI_DEVICE void mask_wgmma_tile(float (&s)[BK / 2], int k0, int hi, int delta, int tok_min, int tok_max, int lane,
                               QPos&& qpos) {
  static_assert(MASK != MaskMode::kCustom, "the Hopper kernels take no custom mask");
  if (!tile_needs_mask<MASK, false, BK>(k0, hi, delta, tok_min, tok_max, 0)) return;
  const int qpos0 = qpos(0), qpos1 = qpos(1);
#pragma unroll
  for (int i = 0; i < BK / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = k0 + 8 * i + 2 * (lane % 4) + (e & 1);
      if (!key_visible<MASK, false>(key, hi, 0, e < 2 ? qpos0 : qpos1, 0, CustomMask{})) s[4 * i + e] = kNegInf;
    }
}

}  // namespace flashinfer

// Tensor-core building blocks (sm_80+): ldmatrix, mma.sync m16n8k16, and the XOR-swizzled shared-memory
// tile layout they read from without bank conflicts.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16 (4 regs of 2 halves): a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols), a2 (row g, cols 2t+8..),
//                                 a3 (row g+8, cols 2t+8..)
//   B 16x8  (2 regs): b0 (k rows 2t..2t+1, col g), b1 (k rows 2t+8..2t+9, col g)
//   C 16x8  (4 floats): c0,c1 (row g, cols 2t..2t+1), c2,c3 (row g+8, same cols)
// The C layout of two adjacent n8 tiles is exactly the A layout of one k16 step, so a softmax'ed score
// tile feeds the next product straight from registers.
#pragma once
#include "common.cuh"

namespace flashinfer {

FI_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Shared-memory tile of rows of ROW_CHUNKS 16-byte chunks (ROW_CHUNKS >= 8): logical chunk c of row r lives
// at chunk r * ROW_CHUNKS + (c ^ (r & 7)). Eight consecutive rows read at one logical column (what one
// ldmatrix 8x8 matrix reads) then hit eight different 16-byte bank groups.
template <int ROW_CHUNKS>
FI_DEVICE int swizzle(int row, int chunk) {
  static_assert(ROW_CHUNKS >= 8, "swizzled rows need at least 8 chunks (128 bytes)");
  return row * ROW_CHUNKS + (chunk ^ (row & 7));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
FI_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Same, transposed: lane l receives elements [2(l%4)][l/4] and [2(l%4)+1][l/4] of each stored matrix.
FI_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A * B + D with fp32 accumulators.
template <typename T>
FI_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
FI_DEVICE void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
FI_DEVICE void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// m16n8k8 (A 16x8: a0 (row g, cols 2t..2t+1), a1 (row g+8); B 8x8: b0 (k rows 2t..2t+1, col g); C as above).
template <typename T>
FI_DEVICE void mma_1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0);

template <>
FI_DEVICE void mma_1688<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(b0));
}

template <>
FI_DEVICE void mma_1688<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// fp16 inputs with fp16 accumulators (use_fp16_qk_reduction): d holds (c0,c1) and (c2,c3) as half2.
FI_DEVICE void mma_16816_f16acc(uint32_t (&d)[2], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
               : "+r"(d[0]), "+r"(d[1])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values (x in the low half).
template <typename T>
FI_DEVICE uint32_t pack2(float x, float y);

template <>
FI_DEVICE uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
FI_DEVICE uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

FI_DEVICE float2 unpack2_half(uint32_t r) { return __half22float2(*reinterpret_cast<__half2*>(&r)); }

// One online-softmax step of a query row whose scores sit in a quad of lanes (the C/D fragment layout of
// mma.sync and wgmma): each lane holds 2 * N of them, score(j, e) (e in {0, 1}), in units where scl turns
// them into log2-domain logits. Folds the tile's quad-wide max into m, rescales d, and overwrites the
// scores with their probabilities, summed into d (this lane's share). Returns the factor the row's
// output accumulators must be scaled by; `moved` is set when the row's max changed (the factor is exactly
// 1 otherwise).
template <int N, typename Score>
FI_DEVICE float online_softmax_row(float& m, float& d, float scl, bool& moved, Score&& score) {
  float mx = kNegInf;
#pragma unroll
  for (int j = 0; j < N; ++j) mx = fmaxf(mx, fmaxf(score(j, 0), score(j, 1)));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m, mx);
  const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing allowed yet stays at 0
  const float corr = ptx_exp2((m - m_use) * scl);
  moved |= m_new != m;
  m = m_new;
  d *= corr;
  const float neg = -m_use * scl;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float& x = score(j, e);
      x = ptx_exp2(fmaf(x, scl, neg));
      d += x;
    }
  return corr;
}

}  // namespace flashinfer

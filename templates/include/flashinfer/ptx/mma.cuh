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
#include "flashinfer/common.cuh"
#include "flashinfer/ptx/smem.cuh"

namespace flashinfer {

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
// Transposes an 8x8 matrix of 16-bit elements held in the mma fragment layout (lane 4r + c: row r, columns 2c
// and 2c+1, the lower column in the low half): afterwards the lane holds row r of the transpose, i.e. column r,
// rows 2c and 2c+1, of the input. How a C fragment (rows = keys) becomes a B operand (rows = the k dimension).
FI_DEVICE uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

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

}  // namespace flashinfer

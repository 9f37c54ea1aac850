// Hopper warpgroup MMA (wgmma, sm_90a) building blocks: shared-memory matrix descriptors for the 128-byte
// swizzled layout, the m64n128k16 instructions with A from shared memory (SS) or registers (RS), and the
// fences that order them.
//
// Layout of a tile in shared memory (both operands, and both K-major and MN-major uses): the columns are cut
// into blocks of 64 16-bit elements; block b holds every row as 128 bytes, rows contiguous, and 16-byte
// chunk c of row r sits at chunk position c ^ (r & 7) (the hardware's 128-byte swizzle, which XORs address
// bits [4:6] with bits [7:9], so tiles must be 1024-byte aligned).
//   K-major operand (Q as A, K as B of Q.K^T): 8-row groups 1024 bytes apart (SBO); the k16 step s of
//     block b starts at block b + 32 * (s % 4) bytes.
//   MN-major operand (V as B of P.V, rows = keys): 64-column blocks LBO bytes apart, 8-key groups 1024 bytes
//     apart (SBO); the k16 step s (keys 16s..16s+15) starts 16 rows = 2048 bytes further.
#pragma once
#include "flashinfer/common.cuh"
#include "flashinfer/ptx/smem.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flashinfer {
namespace sm90 {

constexpr int kSwizzleRowBytes = 128;

// Byte offset of 16-byte chunk c (0..15 for 128 columns) of row `row` in a tile of `rows` rows.
FI_DEVICE uint32_t tile_offset(int row, int c, int rows) {
  return uint32_t((c >> 3) * rows * kSwizzleRowBytes + row * kSwizzleRowBytes + (((c & 7) ^ (row & 7)) << 4));
}

FI_DEVICE uint64_t make_desc(uint32_t smem_address, uint32_t leading_bytes, uint32_t stride_bytes) {
  return uint64_t((smem_address & 0x3FFFF) >> 4) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);  // 128-byte swizzle
}

// A descriptor moved `bytes` further in shared memory (the start address field is address >> 4, and shared
// addresses stay below 256 KB, so the add never carries out of it).
FI_DEVICE uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// The value, hidden from the optimiser (keeps it from hoisting and holding values derived from it).
FI_DEVICE uint64_t opaque(uint64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// Registers written by ordinary instructions (accumulators, A fragments) before a wgmma reads them.
FI_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FI_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
FI_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties accumulator registers a wgmma writes asynchronously to this point of the instruction stream: placed
// after a commit and after the wait, it keeps the compiler from moving reads of them above the wait (the asm
// of the wgmma is where it sees them written), needed when other work is issued between commit and wait.
// (ptxas itself keeps a wgmma's register operands, A fragments included, untouched until its wait: it
// serializes the wgmmas when it cannot, with a "Potential Performance Loss" warning in the build log.)
template <int N>
FI_DEVICE void hold_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared memory written through the generic proxy (st.shared, cp.async) before wgmma reads it.
FI_DEVICE void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D (+)= A B, A 64x16 and B 16x128 both from shared memory (K-major); scale_d == 0 overwrites D.
template <typename T>
FI_DEVICE void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d);
// The same with N = 64.
template <typename T>
FI_DEVICE void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d);
// D += A B, A 64x16 from registers (the m16n8k16 A fragment of each warp's 16 rows), B MN-major in shared memory.
template <typename T>
FI_DEVICE void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int scale_d);
// The same with N = 64.
template <typename T>
FI_DEVICE void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d);
// O (+)= P V of the head_dim (N = 128 or 64) accumulator columns: the one of the two above that fits.
template <typename T>
FI_DEVICE void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  wgmma_m64n128k16_rs<T>(d, a, desc_b, scale_d);
}
template <typename T>
FI_DEVICE void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  wgmma_m64n64k16_rs<T>(d, a, desc_b, scale_d);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Accumulator operand lists of the inline assembly: "{%0, ..., %N-1}" and the N "+f" operands.
#define FI_WGMMA_ACC32_REGS                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31}"
#define FI_WGMMA_ACC64_REGS                                                                                         \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FI_WGMMA_ACC32_OPS                                                                                    \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FI_WGMMA_ACC64_OPS                                                                                    \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), \
      "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), \
      "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
      "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// One specialisation per (N, element type); A_OP.. are the operand numbers after the accumulators.
#define FI_WGMMA_SS(N, NACC, T, TS, A_OP, B_OP, S_OP)                                                        \
  template <>                                                                                                \
  FI_DEVICE void wgmma_m64n##N##k16_ss<T>(float (&d)[NACC], uint64_t desc_a, uint64_t desc_b, int scale_d) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S_OP                                                  \
                 ", 0;\n"                                                                                    \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " FI_WGMMA_ACC##NACC##_REGS   \
                 ", %" #A_OP ", %" #B_OP ", p, 1, 1, 0, 0;\n}\n"                                             \
                 : FI_WGMMA_ACC##NACC##_OPS                                                                  \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                  \
  }
#define FI_WGMMA_RS(N, NACC, T, TS, A0, A1, A2, A3, B_OP, S_OP)                                                     \
  template <>                                                                                                       \
  FI_DEVICE void wgmma_m64n##N##k16_rs<T>(float (&d)[NACC], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S_OP                                                         \
                 ", 0;\n"                                                                                           \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " FI_WGMMA_ACC##NACC##_REGS          \
                 ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B_OP ", p, 1, 1, 1;\n}\n"                         \
                 : FI_WGMMA_ACC##NACC##_OPS                                                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                          \
  }

FI_WGMMA_SS(128, 64, __nv_bfloat16, "bf16", 64, 65, 66)
FI_WGMMA_SS(128, 64, __half, "f16", 64, 65, 66)
FI_WGMMA_SS(64, 32, __nv_bfloat16, "bf16", 32, 33, 34)
FI_WGMMA_SS(64, 32, __half, "f16", 32, 33, 34)
FI_WGMMA_RS(128, 64, __nv_bfloat16, "bf16", 64, 65, 66, 67, 68, 69)
FI_WGMMA_RS(128, 64, __half, "f16", 64, 65, 66, 67, 68, 69)
FI_WGMMA_RS(64, 32, __nv_bfloat16, "bf16", 32, 33, 34, 35, 36, 37)
FI_WGMMA_RS(64, 32, __half, "f16", 32, 33, 34, 35, 36, 37)
#undef FI_WGMMA_SS
#undef FI_WGMMA_RS
#else
// Not an sm_90a target: the kernels using these are never launched there (the module is built for sm_90a).
template <>
FI_DEVICE void wgmma_m64n128k16_ss<__nv_bfloat16>(float (&)[64], uint64_t, uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n128k16_ss<__half>(float (&)[64], uint64_t, uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n64k16_ss<__nv_bfloat16>(float (&)[32], uint64_t, uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n64k16_ss<__half>(float (&)[32], uint64_t, uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n128k16_rs<__nv_bfloat16>(float (&)[64], const uint32_t (&)[4], uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n128k16_rs<__half>(float (&)[64], const uint32_t (&)[4], uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n64k16_rs<__nv_bfloat16>(float (&)[32], const uint32_t (&)[4], uint64_t, int) {
  __trap();
}
template <>
FI_DEVICE void wgmma_m64n64k16_rs<__half>(float (&)[32], const uint32_t (&)[4], uint64_t, int) {
  __trap();
}
#endif

// Pins registers that an in-flight wgmma reads or writes (accumulators, register A fragments) at this point of
// the program: the compiler sees them read and rewritten here, so it neither moves their other uses across the
// wgmma_wait that precedes this call nor reuses their registers while the wgmma may still be using them.
// Call it on the operands of an asynchronous wgmma right after the wgmma_wait that completes it.
template <int N>
FI_DEVICE void fence_operand(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// An int hidden from the optimiser (the same as opaque() above, for index arithmetic that must not be hoisted out of
// a loop and held in registers across it).
FI_DEVICE int opaque_int(int x) {
  asm volatile("" : "+r"(x));
  return x;
}
template <int M, int N>
FI_DEVICE void fence_operand(uint32_t (&r)[M][N]) {
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

}  // namespace sm90
}  // namespace flashinfer

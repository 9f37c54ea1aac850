// fp8 (e4m3 / e5m2) -> float16 conversions that use no conversion instruction: the integer/logic pipe (PRMT,
// SHF, LOP3, IADD) and one f16x2 multiply instead of F2FP.*.UNPACK_B (cvt.rn.f16x2.e4m3x2, fp8x4_to_half2x2 in
// common.cuh): a conversion instruction, which (we believe; the fa3_ws probe measures it) issues to the narrow
// pipe that also serves the softmax's MUFU.EX2. e4m3 takes 7 instructions per pair instead of one, e5m2 one byte
// permute per pair. All exact: every e4m3 and e5m2 value is a float16; NaN stays NaN (e4m3's S.1111.111; e5m2's
// NaNs and infinities are float16's own). Checked byte-exhaustively on a model of the bit operations and on the
// GPU through the fa3_ws kernel (tests/test_prefill.py).
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

// Two e4m3 bytes at bits 8..15 and 24..31 of x (the other bits zero) -> float16x2 (the byte at bit 8 in the low
// half). Each lane's byte S.EEEE.MMM becomes S.0EEEE.MMM0000000: EEEE.MMM moved right by one into float16's
// exponent and mantissa fields is the e4m3 value times 2^-8 for normal and subnormal e4m3 alike (float16's
// exponent bias 15 is e4m3's 7 plus 8, and both formats' subnormals share that scale), and one exact multiply by
// 2^8 gives the value. NaN (magnitude bits all ones, the one code whose magnitude + 1 carries into bit 7 of the
// byte) additionally sets bit 14: exponent 11111 with a non-zero mantissa, a float16 NaN that the multiply keeps.
FI_DEVICE uint32_t e4m3x2_hi_bytes_to_half2(uint32_t x) {
  const uint32_t mag = (x >> 1) & 0x3f803f80u;  // EEEE.MMM at bits 13..7 of each lane
  const uint32_t nan = mag + 0x00800080u;       // bit 14 of a lane set exactly when its EEEE.MMM is all ones
  const uint32_t h = mag | (x & 0x80008000u) | (nan & 0x40004000u);
  uint32_t out;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(out) : "r"(h), "r"(0x5c005c00u));  // x 2^8 (no .ftz: subnormals kept)
  return out;
}

// Four e4m3 values in one 32-bit word (element 0 in the low byte) -> two f16x2 registers holding elements (0, 1)
// and (2, 3), as fp8x4_to_half2x2 does with the conversion instruction.
FI_DEVICE void e4m3x4_to_half2x2_alu(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = e4m3x2_hi_bytes_to_half2(__byte_perm(w, 0u, 0x1404));  // bytes 0, 1 -> bits 8..15, 24..31
  hi = e4m3x2_hi_bytes_to_half2(__byte_perm(w, 0u, 0x3424));  // bytes 2, 3
}

// Four e5m2 values -> two f16x2 registers (elements (0, 1) and (2, 3)): an e5m2 byte is the high byte of the
// float16 of the same value (same sign, exponent field and bias; two of float16's ten mantissa bits), NaN and
// infinity included. One byte permute per register.
FI_DEVICE void e5m2x4_to_half2x2_alu(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = __byte_perm(w, 0u, 0x1404);
  hi = __byte_perm(w, 0u, 0x3424);
}

}  // namespace flashinfer

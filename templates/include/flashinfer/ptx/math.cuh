// Fast base-2 exponential and logarithm (MUFU.EX2 / MUFU.LG2): the softmax and state-merge arithmetic works
// in the log2 domain so that each exponential is one instruction.
#pragma once
#include "flashinfer/common.cuh"

namespace flashinfer {

// ex2.approx has ~2 ulp error and maps -inf to +0, which is what the online softmax wants.
FI_DEVICE float ptx_exp2(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// lg2.approx: log2 of a positive float (the lse of a softmax denominator).
FI_DEVICE float ptx_log2(float x) {
  float y;
  asm volatile("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// rcp.approx (MUFU.RCP): the seed of a correctly rounded division by a value used many times (see
// sampling.cuh: Divider). Not volatile: a pure function of x the compiler may hoist.
FI_DEVICE float ptx_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace flashinfer

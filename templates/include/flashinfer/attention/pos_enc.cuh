// Position encodings and logit transforms of the attention kernels: ALiBi slopes, Llama RoPE (the rotation
// angle as a primitive, and the in-register rotation of the decode kernel; prefill rotates its shared-memory
// tiles with the same angle, in prefill.cuh), soft cap.
#pragma once
#include "flashinfer/common.cuh"

#include <math.h>

#include <type_traits>

namespace flashinfer {

enum class PosEncoding : int { kNone = 0, kRopeLlama = 1, kAlibi = 2 };

// ALiBi slope of a head, for num_heads heads (Press et al.; the non-power-of-two rule interleaves the
// slopes of the next power of two).
FI_DEVICE float alibi_slope(int head, int num_heads) {
  int n = 1;
  while (n * 2 <= num_heads) n *= 2;
  if (head < n) return exp2f(-8.f * float(head + 1) / float(n));
  return exp2f(-4.f * float((head + 1 - n) * 2 - 1) / float(n));
}

// ---------------------------------------------------------------------------------------------- RoPE
//
// Llama RoPE rotates the pair (x[i], x[i + rotary_dim/2]) of a head vector (non-interleaved), i < rotary_dim/2,
// by the angle
//     pos / (rope_scale * rope_theta^(2i / rotary_dim))      radians.
// The angle is computed in half-turns (units of pi): the per-position rate, rope_rate_half_turns(), is kept as
// a float pair hi + lo (split from double), so that pos * rate reduced mod 2 stays accurate to ~1e-7 even at
// pos ~ 1e5 (a plain float angle is off by ~1e-3 rad there), and sincospif needs no slow range reduction.

// Rotation rate of pair i, in half-turns per position.
__host__ __device__ inline double rope_rate_half_turns(int i, int rotary_dim, double rope_scale, double rope_theta) {
  return 1.0 / (rope_scale * pow(rope_theta, 2.0 * i / rotary_dim)) / 3.14159265358979323846;
}

// sin and cos of the RoPE angle of position `pos` (an integer below 2^24, as a float) at the rate hi + lo
// (half-turns per position, hi the float nearest to the rate and lo the rest).
FI_DEVICE void rope_sincos(float pos, float rate_hi, float rate_lo, float& sin_out, float& cos_out) {
  const float t = pos * rate_hi;
  const float t_err = fmaf(pos, rate_hi, -t);  // exact rounding error of the product
  const float r = (t - 2.f * rintf(0.5f * t)) + (t_err + pos * rate_lo);
  sincospif(r, &sin_out, &cos_out);
}

// sin and cos of the RoPE angle of position `pos` for pair `i` (0 <= i < rotary_dim / 2): the rate computed
// here, in double. For kernels that rotate one pair of a head at a time; a kernel that rotates many positions
// with the same rates precomputes them once (RopeTable).
FI_DEVICE void rope_sincos(int pos, int i, int rotary_dim, float rope_scale, float rope_theta, float& sin_out,
                           float& cos_out) {
  const double rate = rope_rate_half_turns(i, rotary_dim, rope_scale, rope_theta);
  const float hi = static_cast<float>(rate);
  rope_sincos(float(pos), hi, static_cast<float>(rate - static_cast<double>(hi)), sin_out, cos_out);
}

// The rates of every pair of a head (rotary_dim = head_dim), filled on the host and passed as a kernel
// parameter.
struct RopeTable {
  float hi[128];  // indexed by e mod (head_dim / 2)
  float lo[128];
};
struct NoRopeTable {};

template <PosEncoding POS>
using RopeTableFor = std::conditional_t<POS == PosEncoding::kRopeLlama, RopeTable, NoRopeTable>;

inline void fill_rope_table(RopeTable& table, int head_dim, double rope_scale, double rope_theta) {
  for (int i = 0; i < head_dim / 2; ++i) {
    const double half_turns = rope_rate_half_turns(i, head_dim, rope_scale, rope_theta);
    table.hi[i] = static_cast<float>(half_turns);
    table.lo[i] = static_cast<float>(half_turns - static_cast<double>(table.hi[i]));
  }
}

// The table of a launch: filled for RoPE kernels, empty otherwise.
template <PosEncoding POS>
inline RopeTableFor<POS> make_rope_table(int head_dim, float rope_scale, float rope_theta) {
  RopeTableFor<POS> rope;
  if constexpr (POS == PosEncoding::kRopeLlama) fill_rope_table(rope, head_dim, rope_scale, rope_theta);
  return rope;
}

// The rates of the 8 elements [lane*8, lane*8+8) a lane holds of a head vector.
struct RopeRate {
  float hi[8], lo[8];
};

template <int HEAD_DIM>
FI_DEVICE void load_rope_rate(RopeRate& rate, const RopeTable& table, int lane) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = (lane * 8 + i) % (HEAD_DIM / 2);
    rate.hi[i] = table.hi[e];
    rate.lo[i] = table.lo[e];
  }
}

// x holds elements [lane*8, lane*8+8) of a head vector spread over LANES lanes; the partner half lives
// LANES/2 lanes away, fetched with one shuffle per element. pos must be an integer below 2^24.
template <int LANES>
FI_DEVICE void rope_rotate(float (&x)[8], const RopeRate& rate, float pos, int lane) {
  const bool first_half = lane < LANES / 2;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[i], LANES / 2);
    float s, c;
    rope_sincos(pos, rate.hi[i], rate.lo[i], s, c);
    x[i] = first_half ? x[i] * c - partner * s : x[i] * c + partner * s;
  }
}

// Scaled logit -> log2-domain logit: ALiBi bias, then soft cap c*tanh(x/c).
template <bool ALIBI, bool SOFTCAP>
FI_DEVICE float transform_logit(float x, float alibi_slope_h, int rel_pos, float soft_cap) {
  if constexpr (ALIBI) x += alibi_slope_h * float(rel_pos);
  if constexpr (SOFTCAP) x = soft_cap * tanhf(x / soft_cap);
  return x * kLog2e;
}

}  // namespace flashinfer

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
// Llama RoPE rotates the pair (x[i], x[i + rotary_dim/2]) of a head vector (non-interleaved; the standalone
// RoPE op also has the interleaved pairing), i < rotary_dim/2, by pos times the rate of frequency i,
// rope_frequency(): 1 / (rope_scale * rope_theta^(2i / rotary_dim)) radians per position, or Llama 3.1's
// scaled rate. Kernels take the rates as a table of float pairs hi + lo in half-turns (filled in double on
// the host), so that pos * rate reduced mod 2 stays accurate to ~1e-7 even at pos ~ 1e5 (a plain float
// angle is off by ~1e-3 rad there), and sincospif needs no slow range reduction: rope_cos_sin() is the one
// angle function of every kernel.
struct RopeTable {
  float hi[128];  // indexed by frequency: e mod (head_dim / 2) in the attention kernels
  float lo[128];
};
struct NoRopeTable {};

template <PosEncoding POS>
using RopeTableFor = std::conditional_t<POS == PosEncoding::kRopeLlama, RopeTable, NoRopeTable>;

// Llama 3.1 frequency scaling (Meta's apply_scaling): a frequency whose wavelength 2*pi/f exceeds
// old_context_len / low_freq_factor is divided by rope_scale, one below old_context_len / high_freq_factor is
// kept, and the band between interpolates linearly in old_context_len / wavelength.
struct Llama31Scaling {
  double low_freq_factor, high_freq_factor, old_context_len;
};

// Rotation rate (radians per position) of frequency i of a rotary_dim-wide RoPE, in double on the host.
inline double rope_frequency(int i, int rotary_dim, double rope_scale, double rope_theta,
                             const Llama31Scaling* llama31 = nullptr) {
  if (llama31 == nullptr) return 1.0 / (rope_scale * pow(rope_theta, 2.0 * i / rotary_dim));
  const double freq = 1.0 / pow(rope_theta, 2.0 * i / rotary_dim);
  const double band = llama31->high_freq_factor - llama31->low_freq_factor;
  double smooth = (llama31->old_context_len * freq / (2.0 * 3.14159265358979323846) - llama31->low_freq_factor) / band;
  smooth = smooth < 0.0 ? 0.0 : smooth > 1.0 ? 1.0 : smooth;
  return (1.0 - smooth) * freq / rope_scale + smooth * freq;
}

// Table of the rotary_dim / 2 rates (rotary_dim <= 256), in half-turns.
inline void fill_rope_table(RopeTable& table, int rotary_dim, double rope_scale, double rope_theta,
                            const Llama31Scaling* llama31 = nullptr) {
  for (int i = 0; i < rotary_dim / 2; ++i) {
    const double half_turns = rope_frequency(i, rotary_dim, rope_scale, rope_theta, llama31) / 3.14159265358979323846;
    table.hi[i] = static_cast<float>(half_turns);
    table.lo[i] = static_cast<float>(half_turns - static_cast<double>(table.hi[i]));
  }
}

// The table of an attention launch: filled (rotary_dim = head_dim) for RoPE kernels, empty otherwise.
template <PosEncoding POS>
inline RopeTableFor<POS> make_rope_table(int head_dim, float rope_scale, float rope_theta) {
  RopeTableFor<POS> rope;
  if constexpr (POS == PosEncoding::kRopeLlama) fill_rope_table(rope, head_dim, rope_scale, rope_theta);
  return rope;
}

// cos and sin of the angle pos * (hi + lo) half-turns: the one RoPE angle function of every kernel. pos must
// be an integer below 2^24 (exact as a float); the product is reduced mod 2 before sincospif with its exact
// rounding error, so the angle stays accurate to ~1e-7 at any such position.
FI_DEVICE void rope_cos_sin(float pos, float hi, float lo, float& c, float& s) {
  const float t = pos * hi;
  const float t_err = fmaf(pos, hi, -t);  // exact rounding error of the product
  const float r = (t - 2.f * rintf(0.5f * t)) + (t_err + pos * lo);
  sincospif(r, &s, &c);
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
    float c, s;
    rope_cos_sin(pos, rate.hi[i], rate.lo[i], c, s);
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

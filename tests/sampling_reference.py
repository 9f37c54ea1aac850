"""The exact definition of flashinfer.sampling's samplers, in plain Python integers (tests only).

A row's sample is a function of the row, its filter values and one Philox4x32-10 draw keyed by (seed, offset,
output position): probabilities (or exp(logit - max)) as fixed-point integers, the filters as thresholds on the
values, and the inverse CDF in vocabulary order. The kernels compute the same integers, so for probability inputs
(whose weights involve no exp) a kernel must return exactly these tokens; logits go through the GPU's ex2.approx,
which only the emulator (tests/_sampling_emu.py) reproduces exactly.
"""

from __future__ import annotations

import math
import struct
from typing import List, Optional, Sequence, Tuple

import numpy as np

WEIGHT_BITS = 39
_M32 = 0xFFFFFFFF


def philox4x32_10(seed: int, offset: int, row: int, draw: int) -> Tuple[int, int, int, int]:
    """Philox4x32-10 of counter (offset lo, offset hi, row, draw) and key (seed lo, seed hi)."""
    c = [offset & _M32, (offset >> 32) & _M32, row & _M32, draw & _M32]
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c[3] ^ k1) & _M32, p0 & _M32]
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c[0], c[1], c[2], c[3]


def random64(seed: int, offset: int, row: int, draw: int = 0) -> int:
    r = philox4x32_10(seed, offset, row, draw)
    return (r[0] << 32) | r[1]


def uniform(bits: int) -> float:
    """float32 (bits + 1) * 2^-32, as the kernels' uniform in (0, 1]."""
    return float(np.float32(np.float32(bits) + np.float32(1.0)) * np.float32(2.3283064365386963e-10))


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def prob_key(p: float) -> int:
    return _bits(p) if (p > 0 and p < math.inf) else 0


def logit_key(x: float) -> int:
    if not (x > -math.inf):
        return 0
    b = _bits(x)
    if b == 0x80000000:
        b = 0
    return (~b) & _M32 if b & 0x80000000 else b | 0x80000000


def fixed_weight(w: float, ref_exp: int) -> int:
    """floor(w * 2^(WEIGHT_BITS - ref_exp)) of a float32 w, exactly."""
    b = _bits(w)
    e = b >> 23
    mant = (b & 0x7FFFFF) | (0x800000 if e else 0)
    shift = (e if e else 1) - 150 + WEIGHT_BITS - ref_exp
    return mant << shift if shift >= 0 else (mant >> -shift if shift > -64 else 0)


def mass_target(fraction: float, total: int) -> int:
    """ceil(fraction * total) in double, clamped to [1, total]."""
    t = math.ceil(float(np.float32(fraction)) * float(total))
    if not t >= 1.0:
        return 1
    return total if t >= float(total) else int(t)


def keys_and_weights(row: Sequence[float], logits: bool, weights_fx: Optional[Sequence[int]] = None):
    """(keys, fixed-point weights, number of valid entries) of a float32 row. Logit weights need the device's exp
    (pass weights_fx); probability weights are exact."""
    row = np.asarray(row, dtype=np.float32)
    keys = [logit_key(float(v)) if logits else prob_key(float(v)) for v in row]
    valid = sum(1 for k in keys if k)
    if weights_fx is not None:
        return keys, [int(w) for w in weights_fx], valid
    if logits:
        raise ValueError("logit weights need the device's exp2: pass weights_fx")
    max_key = max(keys)
    e = max_key >> 23
    ref = e - 127 if e else -127
    return keys, [fixed_weight(float(v), ref) if k else 0 for v, k in zip(row, keys)], valid


def mass_threshold(keys: List[int], w: List[int], target: int, lo: int = 1) -> int:
    """The largest key t >= lo of a valid entry with sum(w[key >= t]) >= target."""
    acc = 0
    for k in sorted({k for k in keys if k >= lo}, reverse=True):
        acc += sum(wi for ki, wi in zip(keys, w) if ki == k)
        if acc >= target:
            return k
    return lo


def threshold(keys: List[int], w: List[int], num_valid: int, *, top_k: Optional[int] = None,
              top_p: Optional[float] = None, min_p: Optional[float] = None, top_k_first: bool = True,
              max_value: float = 0.0) -> int:
    """The kept set's threshold tau (kept: key >= tau) for the given filters (None: not applied), with the kernels'
    clamping of out-of-range values."""
    tau = 1
    if top_p is not None:
        top_p = 1.0 if top_p != top_p else max(top_p, 0.0)
    use_k = top_k is not None and 0 < top_k < num_valid
    use_p = top_p is not None and top_p < 1.0
    if use_k:
        tau = sorted((k for k in keys if k), reverse=True)[top_k - 1]
        if use_p:
            if top_k_first:
                m_k = sum(wi for ki, wi in zip(keys, w) if ki >= tau)
                tau = max(tau, mass_threshold(keys, w, mass_target(top_p, m_k), lo=tau))
            else:
                z = sum(wi for ki, wi in zip(keys, w) if ki)
                tau = max(tau, mass_threshold(keys, w, mass_target(top_p, z)))
    elif use_p:
        z = sum(wi for ki, wi in zip(keys, w) if ki)
        tau = mass_threshold(keys, w, mass_target(top_p, z))
    elif min_p is not None:
        min_p = 0.0 if min_p != min_p else min(min_p, 1.0)
        if min_p > 0:
            tau = max(1, _bits(float(np.float32(np.float32(max_value) * np.float32(min_p)))))
    return tau


def inverse_cdf(w_kept: List[int], r64: int) -> int:
    """The first index whose cumulative weight exceeds floor(total * r64 / 2^64); -1 if the total is 0."""
    total = sum(w_kept)
    if total == 0:
        return -1
    target = (total * r64) >> 64
    acc = 0
    for i, wi in enumerate(w_kept):
        acc += wi
        if acc > target:
            return i
    raise AssertionError("unreachable")


def sample_row(row: Sequence[float], r64: int, *, logits: bool = False, weights_fx: Optional[Sequence[int]] = None,
               **filters) -> Tuple[int, bool]:
    """(token, valid) of one row under the given filters (see threshold)."""
    keys, w, num_valid = keys_and_weights(row, logits, weights_fx)
    if num_valid == 0:
        return 0, False
    max_key = max(keys)
    max_value = struct.unpack("<f", struct.pack("<I", max_key))[0] if not logits else 0.0
    tau = threshold(keys, w, num_valid, max_value=max_value, **filters)
    token = inverse_cdf([wi if ki >= tau else 0 for ki, wi in zip(keys, w)], r64)
    return (token, True) if token >= 0 else (0, False)


def kept_mask(row: Sequence[float], *, logits: bool = False, weights_fx: Optional[Sequence[int]] = None,
              **filters) -> np.ndarray:
    """Boolean mask of the entries a filter keeps (the support of the sampled distribution)."""
    keys, w, num_valid = keys_and_weights(row, logits, weights_fx)
    if num_valid == 0:
        return np.zeros(len(keys), dtype=bool)
    max_key = max(keys)
    max_value = struct.unpack("<f", struct.pack("<I", max_key))[0] if not logits else 0.0
    tau = threshold(keys, w, num_valid, max_value=max_value, **filters)
    return np.array([k >= tau and k != 0 for k in keys])

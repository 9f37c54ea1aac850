"""The exact definition of flashinfer.sampling's samplers, in integers (numpy; tests only).

A row's sample is a function of the row, its filter values and one Philox4x32-10 draw keyed by (seed, offset,
output position): weights are fixed-point integers (probabilities, or exp(logit - max), scaled so that the row's
largest weight lies in [2^39, 2^40) and truncated), the filters are thresholds on the values (ties kept), and the
token is the inverse CDF in vocabulary order at floor(total * r / 2^64). The kernels compute the same integers, so
for probability rows (whose weights involve no exp) a kernel returns exactly these tokens; for logit rows the weights
go through the GPU's ex2.approx, which only the CPU emulator (tests/_sampling_emu.py) reproduces exactly (pass its
weights as ``weights_fx``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

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


def uniform(bits: int) -> np.float32:
    """float32 (bits + 1) * 2^-32: the kernels' uniform in (0, 1]."""
    return np.float32(np.float32(bits) + np.float32(1.0)) * np.float32(2.3283064365386963e-10)


def _f32(row) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(row, dtype=np.float32))


def prob_keys(row) -> np.ndarray:
    """Ordered keys of probabilities: the float bits of finite p > 0, else 0."""
    x = _f32(row)
    with np.errstate(invalid="ignore"):
        valid = (x > 0) & (x < np.inf)
    return np.where(valid, x.view(np.uint32), np.uint32(0)).astype(np.uint32)


def logit_keys(row) -> np.ndarray:
    """Ordered keys of logits (-0 as +0); 0 for NaN and -inf."""
    x = _f32(row)
    b = x.view(np.uint32).copy()
    b[b == 0x80000000] = 0
    neg = (b & 0x80000000) != 0
    k = np.where(neg, ~b, b | np.uint32(0x80000000)).astype(np.uint32)
    with np.errstate(invalid="ignore"):
        valid = x > -np.inf
    return np.where(valid, k, np.uint32(0)).astype(np.uint32)


def fixed_weights(w, ref_exp: int) -> np.ndarray:
    """floor(w * 2^(WEIGHT_BITS - ref_exp)) of float32 weights 0 <= w < 2^(ref_exp + 1), exactly (uint64)."""
    b = _f32(w).view(np.uint32).astype(np.int64)
    e = b >> 23
    mant = (b & 0x7FFFFF) | np.where(e != 0, 0x800000, 0)
    shift = np.where(e != 0, e, 1) - 150 + WEIGHT_BITS - ref_exp
    left = np.left_shift(mant, np.clip(shift, 0, 63))
    right = np.where(-shift < 64, np.right_shift(mant, np.clip(-shift, 0, 63)), 0)
    return np.where(shift >= 0, left, right).astype(np.uint64)


def mass_target(fraction: float, total: int) -> int:
    """ceil(fraction * total) in double, clamped to [1, total]."""
    t = math.ceil(float(np.float32(fraction)) * float(total))
    if not t >= 1.0:
        return 1
    return total if t >= float(total) else int(t)


def keys_and_weights(row, logits: bool, weights_fx: Optional[Sequence[int]] = None):
    """(keys, fixed-point weights) of a row. Probability weights are exact; logit weights need the device's exp
    (weights_fx), or are computed here in float64 (close, not bit-exact)."""
    keys = logit_keys(row) if logits else prob_keys(row)
    if weights_fx is not None:
        return keys, np.asarray(weights_fx, dtype=np.uint64)
    x = _f32(row)
    if not keys.any():
        return keys, np.zeros(keys.shape, dtype=np.uint64)
    if logits:
        m = float(x[keys.argmax()])
        if m == math.inf:
            w = np.where(x == np.inf, np.float32(1), np.float32(0))
        else:
            w = np.where(keys != 0, np.exp(np.float64(x) - m), 0).astype(np.float32)
        return keys, np.where(keys != 0, fixed_weights(w, 0), np.uint64(0))
    e = int(keys.max()) >> 23
    ref = e - 127 if e else -127
    return keys, np.where(keys != 0, fixed_weights(np.where(keys != 0, x, 0), ref), np.uint64(0))


def _mass_threshold(keys: np.ndarray, w: np.ndarray, target: int, lo: int = 1) -> int:
    """The largest key t >= lo of an entry with sum(w[key >= t]) >= target (lo if none)."""
    sel = keys >= lo
    k, ws = keys[sel], w[sel]
    if k.size == 0:
        return lo
    order = np.argsort(-k.astype(np.int64), kind="stable")
    k, ws = k[order], ws[order]
    cum = np.cumsum(ws, dtype=np.uint64)
    last_of_key = np.r_[k[1:] != k[:-1], True]  # cumulative mass of all keys >= k, at the last entry of each key
    hit = np.nonzero(last_of_key & (cum >= np.uint64(target)))[0]
    return int(k[hit[0]]) if hit.size else lo


def threshold(keys: np.ndarray, w: np.ndarray, *, top_k: Optional[int] = None, top_p: Optional[float] = None,
              min_p: Optional[float] = None, top_k_first: bool = True, max_prob: float = 0.0) -> int:
    """The kept set's threshold tau (kept: key >= tau) for the given filters (None: not applied), with the kernels'
    clamping of out-of-range values."""
    num_valid = int(np.count_nonzero(keys))
    tau = 1
    if top_p is not None:
        top_p = 1.0 if top_p != top_p else max(float(top_p), 0.0)
    use_k = top_k is not None and 0 < top_k < num_valid
    use_p = top_p is not None and top_p < 1.0
    if use_k:
        tau = int(np.sort(keys[keys != 0])[::-1][top_k - 1])
        if use_p:
            if top_k_first:
                m_k = int(w[keys >= tau].sum(dtype=np.uint64))
                tau = max(tau, _mass_threshold(keys, w, mass_target(top_p, m_k), lo=tau))
            else:
                z = int(w.sum(dtype=np.uint64))
                tau = max(tau, _mass_threshold(keys, w, mass_target(top_p, z)))
    elif use_p:
        tau = _mass_threshold(keys, w, mass_target(top_p, int(w.sum(dtype=np.uint64))))
    elif min_p is not None:
        min_p = 0.0 if min_p != min_p else min(float(min_p), 1.0)
        if min_p > 0:
            pivot = np.float32(np.float32(max_prob) * np.float32(min_p))
            tau = max(1, int(np.array([pivot], dtype=np.float32).view(np.uint32)[0]))
    return tau


def kept_mask(row, *, logits: bool = False, weights_fx=None, **filters) -> np.ndarray:
    """The entries a filter keeps (the support of the sampled distribution)."""
    keys, w = keys_and_weights(row, logits, weights_fx)
    if not keys.any():
        return np.zeros(keys.shape, dtype=bool)
    max_prob = 0.0 if logits else float(_f32(row)[keys.argmax()])
    tau = threshold(keys, w, max_prob=max_prob, **filters)
    return (keys >= tau) & (keys != 0)


def inverse_cdf(w_kept: np.ndarray, r64: int) -> int:
    """The first index whose cumulative weight exceeds floor(total * r64 / 2^64); -1 if the total is 0."""
    cum = np.cumsum(np.asarray(w_kept, dtype=np.uint64), dtype=np.uint64)
    total = int(cum[-1]) if cum.size else 0
    if total == 0:
        return -1
    target = (total * r64) >> 64
    return int(np.searchsorted(cum, np.uint64(target), side="right"))


def sample_row(row, r64: int, *, logits: bool = False, weights_fx=None, **filters) -> Tuple[int, bool]:
    """(token, valid) of one row under the given filters (see threshold)."""
    keys, w = keys_and_weights(row, logits, weights_fx)
    if not keys.any():
        return 0, False
    mask = kept_mask(row, logits=logits, weights_fx=w, **filters)
    token = inverse_cdf(np.where(mask, w, np.uint64(0)), r64)
    return (token, True) if token >= 0 else (0, False)


def filtered_distribution(row, *, logits: bool = False, **filters) -> np.ndarray:
    """The exact (float64) distribution a filtered sampler draws from: the kept entries' probabilities,
    renormalised (softmax of the logits for logit rows)."""
    x = np.asarray(row, dtype=np.float64)
    mask = kept_mask(row, logits=logits, **filters)
    if logits:
        m = x[mask].max() if mask.any() else 0.0
        p = np.where(mask, np.exp(np.where(mask, x - m, -np.inf)), 0.0)
    else:
        p = np.where(mask, x, 0.0)
    s = p.sum()
    return p / s if s > 0 else p

"""Plain-PyTorch attention references, computed in float64, independent of the kernels under test.

Shapes follow FlashInfer's NHD convention: q ``[qo_len, num_qo_heads, head_dim]``, k/v
``[kv_len, num_kv_heads, head_dim]``. Query row i sits at position ``kv_len - qo_len + i`` (the causal
mask and the RoPE/ALiBi positions are aligned bottom-right, as FlashInfer defines them for appends).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.'s slopes: 2^(-8 i / n) for the first n = 2^floor(log2 H) heads, then the odd
    multiples of the next power of two's step."""
    n = 2 ** int(math.floor(math.log2(num_heads)))
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2.0 ** (-4.0 * (2 * (i + 1) - 1) / n) for i in range(num_heads - n)]
    return torch.tensor(base + extra, dtype=torch.float64)


def rope_llama(x: torch.Tensor, positions: torch.Tensor, rope_scale: float = 1.0, rope_theta: float = 1e4) -> torch.Tensor:
    """Non-interleaved RoPE on ``x [L, H, D]`` at integer ``positions [L]``, in float64."""
    d = x.shape[-1]
    inv_freq = 1.0 / (rope_scale * rope_theta ** (torch.arange(0, d // 2, dtype=torch.float64, device=x.device) * 2 / d))
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [L, D/2]
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    x = x.to(torch.float64)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    pos_encoding_mode: str = "NONE",
    rope_scale: float = 1.0,
    rope_theta: float = 1e4,
    mask: Optional[torch.Tensor] = None,
    v_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns o ``[qo_len, num_qo_heads, head_dim]`` and lse ``[qo_len, num_qo_heads]`` (base 2), float64.

    ``mask`` (optional, bool ``[qo_len, kv_len]``): True where attention is allowed.
    """
    qo_len, num_qo_heads, d = q.shape
    kv_len, num_kv_heads, _ = k.shape
    assert num_qo_heads % num_kv_heads == 0
    group = num_qo_heads // num_kv_heads
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    q_pos = torch.arange(kv_len - qo_len, kv_len, device=q.device)
    kv_pos = torch.arange(kv_len, device=q.device)
    q, k, v = q.double(), k.double(), v.double()
    if pos_encoding_mode == "ROPE_LLAMA":
        q = rope_llama(q, q_pos, rope_scale, rope_theta)
        k = rope_llama(k, kv_pos, rope_scale, rope_theta)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * sm_scale  # [H, qo, kv]
    rel = (kv_pos[None, :] - q_pos[:, None]).double()  # [qo, kv]
    if pos_encoding_mode == "ALIBI":
        logits = logits + alibi_slopes(num_qo_heads).to(q.device)[:, None, None] * rel[None]
    if logits_soft_cap > 0:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    allowed = torch.ones(qo_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= rel <= 0
    if window_left >= 0:
        allowed &= rel >= -window_left
    if mask is not None:
        allowed &= mask.to(q.device)
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1) / math.log(2.0)  # [H, qo]
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no allowed key give zeros
    o = torch.einsum("hqk,khd->qhd", p, v) * v_scale
    return o, lse.transpose(0, 1)


# ---------------------------------------------------------------- per-token ops: RMSNorm, gated activations, RoPE


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, weight_bias: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (weight + weight_bias) over the last dimension, in float64."""
    x = x.double()
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x / rms * (weight.double() + weight_bias)


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(x[..., :d]) * x[..., d:] in float64; act one of silu, gelu (erf), gelu_tanh."""
    x = x.double()
    d = x.shape[-1] // 2
    a, b = x[..., :d], x[..., d:]
    if act == "silu":
        y = a / (1.0 + torch.exp(-a))
    elif act == "gelu":
        y = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    elif act == "gelu_tanh":
        y = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    else:
        raise ValueError(act)
    return y * b


def rope_frequencies(rotary_dim: int, rope_scale: float = 1.0, rope_theta: float = 1e4,
                     llama31: Optional[Tuple[float, float, float]] = None) -> torch.Tensor:
    """Radians per position of the rotary_dim / 2 frequencies, float64. llama31 = (low_freq_factor,
    high_freq_factor, old_context_len) applies Meta's Llama 3.1 scaling band by band (rope_scale is its factor)."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    freq = 1.0 / rope_theta ** (2.0 * i / rotary_dim)
    if llama31 is None:
        return freq / rope_scale
    low, high, old = llama31
    out = []
    for f in freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / rope_scale)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / rope_scale + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE of x ``[nnz, heads, head_dim]`` with per-token cos/sin ``[nnz, rotary_dim / 2]``, in float64: NeoX
    halves (f with f + rotary_dim/2) or interleaved pairs (2f with 2f + 1); elements past rotary_dim unchanged."""
    x = x.double()
    rot = 2 * cos.shape[-1]
    out = x.clone()
    c, s = cos.double()[:, None, :].to(x.device), sin.double()[:, None, :].to(x.device)
    if interleave:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2], out[..., 1:rot:2] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
        out[..., : rot // 2], out[..., rot // 2 : rot] = a * c - b * s, b * c + a * s
    return out


def rope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[nnz, rotary_dim / 2]`` (float64) of integer positions times frequencies."""
    angle = positions.double().cpu()[:, None] * freqs.double().cpu()[None, :]
    return torch.cos(angle), torch.sin(angle)


# ---------------------------------------------------------------- comparing kernels with the reference


def poisoned(shape, dtype, device="cuda") -> torch.Tensor:
    """An output buffer full of NaN, so that any element a kernel fails to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# (atol, rtol) of a kernel output in this dtype against a float64 reference on the same (rounded) inputs:
# about one unit in the last place of the output dtype, plus float32 accumulation.
TOLERANCES = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2), torch.float32: (1e-4, 1e-4)}
LSE_TOL = (1e-3, 1e-3)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = None, what: str = "output") -> None:
    atol, rtol = TOLERANCES[dtype or out.dtype]
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten element or bad math)"
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")

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

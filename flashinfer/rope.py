"""Rotary position embedding of queries and keys; drop-ins for FlashInfer's ``flashinfer.rope`` functions:
``apply_rope``, ``apply_rope_inplace``, ``apply_rope_pos_ids``, ``apply_rope_pos_ids_inplace``, their Llama 3.1
forms ``apply_llama31_rope*``, and the SGLang/vLLM-style ``apply_rope_with_cos_sin_cache`` /
``apply_rope_with_cos_sin_cache_inplace``.

Positions come from ``pos_ids`` (one per token) or a ragged batch (``indptr``/``offsets``); the cos/sin from
the same accurate angle function as the attention kernels' on-the-fly RoPE (frequencies in double on the host,
the angle reduced in half-turns on the device), or from a float32 cos/sin cache. One JIT module per dtype
(``rope_bf16``, ``rope_f16``) serves every head size, rotary dim, layout and position form.

Positions outside the cos/sin cache
-----------------------------------
Checking them on the host would need a device-to-host copy (a sync) on every call. Instead the kernel bounds
every position it reads: an out-of-range (or negative) position is never used as an index; the rotated
elements of its token become NaN, and the kernel records the position in mapped host memory. The next call of
either cos/sin-cache function in the process (or :func:`check_cos_sin_cache_positions`, once the GPU has run
the call) raises ``ValueError`` naming the position and the cache size. With ``FLASHINFER_ROPE_CHECK_POSITIONS=1``
every call checks its positions before launching instead (one host sync per call; for debugging).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import torch

from . import jit
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .utils import (
    DTYPE_CUDA,
    DTYPE_SHORT,
    check_device_tensor,
    current_stream_at,
    current_stream_ptr,
    dlpack_exchange_api,
    dtype_short,
    module_error,
    scalar,
    tracing,
)

__all__ = [
    "RopeSpec",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_llama31_rope_pos_ids_inplace",
    "apply_rope_with_cos_sin_cache",
    "apply_rope_with_cos_sin_cache_inplace",
    "check_cos_sin_cache_positions",
]

_QK_PARAMS = (
    "const void* q, const void* k, void* q_out, void* k_out, int64_t q_stride_n, int64_t q_stride_h, "
    "int64_t k_stride_n, int64_t k_stride_h, int64_t q_out_stride_n, int64_t q_out_stride_h, "
    "int64_t k_out_stride_n, int64_t k_out_stride_h, int nnz, int num_q_heads, int num_k_heads, "
    "int head_dim, int rotary_dim, int interleave, "
)


@register_family
@dataclasses.dataclass(frozen=True)
class RopeSpec(Spec):
    """Compile-time configuration of the RoPE module: only the element type of q and k."""

    dtype: str = "bf16"

    family = "rope"
    template = "rope.cu.jinja"
    launchers = (
        # cos/sin from the frequencies (old_context_len > 0: Llama 3.1 scaling); pos_ids or indptr/offsets
        Launcher(
            "flashinfer_rope",
            _QK_PARAMS + "const void* pos_ids, const void* indptr, const void* offsets, int pos_int64, "
            "int indptr_int64, int batch_size, double rope_scale, double rope_theta, double low_freq_factor, "
            "double high_freq_factor, double old_context_len, int device, void* stream",
        ),
        Launcher(
            "flashinfer_rope_cos_sin_cache",
            _QK_PARAMS + "const void* pos_ids, int pos_int64, const float* cos_sin_cache, int64_t cache_rows, "
            "int64_t cache_stride, int device, void* stream",
        ),
        Launcher("flashinfer_rope_position_error_record", "", restype="int64_t*"),
        # apply_rope_with_cos_sin_cache_inplace from the tensors themselves (the hot path of eager calls): their
        # PyObject* and torch's DLPack exchange table; declined (a non-zero return, nothing launched) unless the
        # plain case.
        Launcher(
            "flashinfer_rope_cos_sin_cache_inplace_dlpack",
            "const void* api, const void* positions, const void* query, const void* key, const void* cos_sin_cache, "
            "int head_size, int interleave",
            keeps_gil=True,
        ),
    )

    def name(self) -> str:
        return f"{self.family}_{self.dtype}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "dtype": DTYPE_CUDA[self.dtype]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"dtype": ("bf16", "f16")}


# FLASHINFER_ROPE_CHECK_POSITIONS=1: check cos/sin-cache positions on the host before every launch (syncs).
_CHECK_POSITIONS = os.environ.get("FLASHINFER_ROPE_CHECK_POSITIONS", "0") not in ("", "0")


class _RopeModule:
    __slots__ = ("module", "table", "cache", "max_rotary_dim", "_record")

    def __init__(self, dtype: str) -> None:
        self.module = jit.load(RopeSpec(dtype=dtype))
        self.table = self.module.launcher("flashinfer_rope").call
        self.cache = self.module.launcher("flashinfer_rope_cos_sin_cache").call
        self.max_rotary_dim = self.module.constants["max_rotary_dim"]
        self._record = None

    def record(self) -> Any:
        """The module's out-of-cache position record {flag, position, cache rows} (mapped host memory)."""
        if self._record is None:
            addr = self.module.launcher("flashinfer_rope_position_error_record").raw()
            if not addr:
                raise RuntimeError(
                    f"{self.module.spec.name()}: could not allocate the mapped host record of "
                    f"out-of-cache positions (cudaHostAlloc failed)"
                )
            self._record = (ctypes.c_int64 * 3).from_address(addr)
        return self._record


_modules: Dict[str, _RopeModule] = {}
# q's dtype -> (packed _dlpack entry point, its block's pack), filled when the Python path first loads the module (so
# the first call of a dtype takes that path) and only where torch has the DLPack exchange table (_DLPACK_API[0]).
_DLPACK: Dict[torch.dtype, Tuple[Any, Any]] = {}
_DLPACK_API = [0]


def _rope_module(dtype: str) -> _RopeModule:
    m = _modules.get(dtype)
    if m is None:
        m = _modules[dtype] = _RopeModule(dtype)
        _DLPACK_API[0] = api = dlpack_exchange_api()
        entry = m.module.launcher("flashinfer_rope_cos_sin_cache_inplace_dlpack")
        if api and entry.packed is not None:  # (skipped per call under _CHECK_POSITIONS)
            torch_dtype = next(t for t, short in DTYPE_SHORT.items() if short == dtype)
            _DLPACK[torch_dtype] = (entry.packed, entry.launcher.packing.pack)
    return m


def _raise_recorded(record: Any) -> None:
    if record[0]:
        pos, rows = record[1], record[2]
        record[0] = 0
        raise ValueError(
            f"apply_rope_with_cos_sin_cache: position {pos} lies outside the cos_sin_cache of {rows} rows "
            f"(valid positions: 0..{rows - 1}), in this call or an earlier one since the last check; the tokens "
            f"at such positions were left NaN in query/key. Pass positions below max_seq_len (or a larger "
            f"cache); FLASHINFER_ROPE_CHECK_POSITIONS=1 checks every call before launching"
        )


def check_cos_sin_cache_positions() -> None:
    """Raises ``ValueError`` if a cos/sin-cache RoPE call that the GPU has run since the last check met a position
    outside its cache (an extension over FlashInfer's API; see the module docstring). Reads host memory only: it
    does not synchronize, so call it after the work in question has completed (e.g. after
    ``torch.cuda.synchronize()``)."""
    for m in list(_modules.values()):
        # m.record(), not the cached m._record: a module whose calls all took the eager fast path has not read its
        # record from Python yet, but its kernels write it all the same.
        _raise_recorded(m.record())


# ------------------------------------------------------------------------------------------ validation


def _check_qk(q: Any, k: Any, in_place: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[nnz, Hq, D]`` and k ``[nnz, Hk, D]``: one dtype, one device, unit last stride (copied when not in
    place)."""
    check_device_tensor(q, "q")
    check_device_tensor(k, "k")
    qs, ks = q.shape, k.shape
    if len(qs) != 3 or len(ks) != 3:
        raise ValueError(f"q and k must be 3-D (nnz, num_heads, head_dim), got shapes {tuple(qs)} and {tuple(ks)}")
    dtype_short(q, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"all tensors must be on one device: q is on {q.device}, k on {k.device}")
    if qs[0] != ks[0] or qs[2] != ks[2]:
        raise ValueError(f"q {tuple(qs)} and k {tuple(ks)} must have the same nnz and head_dim")
    if qs[0] >= 2**31:
        raise ValueError(f"nnz {qs[0]} exceeds 2**31 - 1")
    if q.stride()[2] != 1 or k.stride()[2] != 1:
        if in_place:
            raise ValueError(
                f"q and k are rotated in place and must be contiguous in their last dimension (stride 1),"
                f" got strides {q.stride()} and {k.stride()}"
            )
        q, k = q.contiguous(), k.contiguous()
    return q, k


def _check_rotary_dim(rotary_dim: Any, head_dim: int) -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    if not (2 <= rotary_dim <= head_dim) or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in [2, head_dim={head_dim}], got {rotary_dim}")
    return rotary_dim


def _check_index(t: Any, name: str, device: torch.device, length: Optional[int] = None) -> torch.Tensor:
    check_device_tensor(t, name)
    shape = t.shape  # (one read: .dim()/.numel()/.stride(0) would each be a call)
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be torch.int32 or torch.int64, got {t.dtype}")
    if t.get_device() != device.index:
        raise ValueError(f"all tensors must be on one device: q is on {device}, {name} on {t.device}")
    n = shape[0]
    if length is not None and n != length:
        raise ValueError(f"{name} must have {length} elements, got {n}")
    return t if n <= 1 or t.stride()[0] == 1 else t.contiguous()


def _positive(x: Any, name: str, default: float) -> float:
    v = scalar(x, name, default)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


# ------------------------------------------------------------------------------------------ launches


# A q/k operand of a launch: (data pointer, token stride, head stride, heads), strides in elements.
_Operand = Tuple[int, int, int, int]


def _operand(t: torch.Tensor) -> _Operand:
    """The operand of a 3-D ``[nnz, heads, head_dim]`` tensor with unit last stride."""
    st = t.stride()
    return t.data_ptr(), st[0], st[1], t.shape[1]


def _launch_table(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    pos_ids: Optional[torch.Tensor],
    indptr: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    rotary_dim: int,
    interleave: bool,
    rope_scale: float,
    rope_theta: float,
    low_freq_factor: float,
    high_freq_factor: float,
    old_context_len: float,
) -> None:
    """Launch on validated 3-D tensors; old_context_len > 0 selects Llama 3.1 scaling."""
    nnz, _, d = q.shape
    if nnz == 0:
        return
    m = _rope_module(DTYPE_SHORT[q.dtype])
    if rotary_dim > m.max_rotary_dim:
        raise ValueError(
            f"rotary_dim {rotary_dim} exceeds {m.max_rotary_dim}, the most the on-the-fly frequencies "
            f"support (apply_rope_with_cos_sin_cache takes any rotary_dim)"
        )
    qp, qsn, qsh, hq = _operand(q)
    kp, ksn, ksh, hk = _operand(k)
    qop, qosn, qosh, _ = _operand(q_out) if q_out is not q else (qp, qsn, qsh, hq)
    kop, kosn, kosh, _ = _operand(k_out) if k_out is not k else (kp, ksn, ksh, hk)
    if pos_ids is not None:
        # (0, not None, for null pointers: the launcher's packed call takes them as they are)
        pos_ptr, ip_ptr, off_ptr, pos64, ip64, batch = (
            pos_ids.data_ptr(),
            0,
            0,
            pos_ids.dtype == torch.int64,
            0,
            0,
        )
    else:
        pos_ptr, ip_ptr, off_ptr = 0, indptr.data_ptr(), offsets.data_ptr()
        pos64, ip64, batch = offsets.dtype == torch.int64, indptr.dtype == torch.int64, offsets.shape[0]
    device = q.device
    rc = m.table(
        qp,
        kp,
        qop,
        kop,
        qsn,
        qsh,
        ksn,
        ksh,
        qosn,
        qosh,
        kosn,
        kosh,
        nnz,
        hq,
        hk,
        d,
        rotary_dim,
        interleave,
        pos_ptr,
        ip_ptr,
        off_ptr,
        pos64,
        ip64,
        batch,
        rope_scale,
        rope_theta,
        low_freq_factor,
        high_freq_factor,
        old_context_len,
        device.index,
        current_stream_ptr(device),
    )
    if rc:
        raise module_error(m.module, rc, f"rope ({m.module.spec.name()}) on {device}")


def _launch_cache_raw(
    device: torch.device,
    dtype: torch.dtype,
    q: _Operand,
    k: _Operand,
    q_out: _Operand,
    k_out: _Operand,
    nnz: int,
    head_dim: int,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    interleave: bool,
) -> None:
    m = _rope_module(DTYPE_SHORT[dtype])
    record = m.record()
    if record[0]:
        _raise_recorded(record)
    rows, rotary_dim = cos_sin_cache.shape
    cache_stride = cos_sin_cache.stride()[0]
    if _CHECK_POSITIONS and (int(positions.min()) < 0 or int(positions.max()) >= rows):
        bad = positions[(positions < 0) | (positions >= rows)][0].item()
        raise ValueError(
            f"apply_rope_with_cos_sin_cache: position {bad} lies outside the cos_sin_cache of {rows} "
            f"rows (valid positions: 0..{rows - 1})"
        )
    index = device.index
    rc = m.cache(
        q[0],
        k[0],
        q_out[0],
        k_out[0],
        q[1],
        q[2],
        k[1],
        k[2],
        q_out[1],
        q_out[2],
        k_out[1],
        k_out[2],
        nnz,
        q[3],
        k[3],
        head_dim,
        rotary_dim,
        interleave,
        positions.data_ptr(),
        positions.dtype == torch.int64,
        cos_sin_cache.data_ptr(),
        rows,
        cache_stride,
        index,
        current_stream_at(index),
    )
    if rc:
        raise module_error(m.module, rc, f"apply_rope_with_cos_sin_cache ({m.module.spec.name()}) on {device}")


def _launch_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    interleave: bool,
) -> None:
    """Launch on validated 3-D tensors (the custom ops' eager implementations)."""
    nnz, _, d = q.shape
    if nnz == 0:
        return
    qo, ko = _operand(q), _operand(k)
    _launch_cache_raw(
        q.device,
        q.dtype,
        qo,
        ko,
        qo if q_out is q else _operand(q_out),
        ko if k_out is k else _operand(k_out),
        nnz,
        d,
        cos_sin_cache,
        positions,
        interleave,
    )


# torch.library ops: what torch.compile traces. Eager calls launch directly (no dispatcher on the hot path).


@torch.library.custom_op("flashinfer::rope", mutates_args=("q_rope", "k_rope"))
def _rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    pos_ids: Optional[torch.Tensor],
    indptr: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    rotary_dim: int,
    interleave: bool,
    rope_scale: float,
    rope_theta: float,
    low_freq_factor: float,
    high_freq_factor: float,
    old_context_len: float,
) -> None:
    _launch_table(
        q,
        k,
        q_rope,
        k_rope,
        pos_ids,
        indptr,
        offsets,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        low_freq_factor,
        high_freq_factor,
        old_context_len,
    )


@_rope_op.register_fake
def _rope_fake(
    q,
    k,
    q_rope,
    k_rope,
    pos_ids,
    indptr,
    offsets,
    rotary_dim,
    interleave,
    rope_scale,
    rope_theta,
    low_freq_factor,
    high_freq_factor,
    old_context_len,
) -> None:
    return None


@torch.library.custom_op("flashinfer::rope_inplace", mutates_args=("q", "k"))
def _rope_inplace_op(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: Optional[torch.Tensor],
    indptr: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor],
    rotary_dim: int,
    interleave: bool,
    rope_scale: float,
    rope_theta: float,
    low_freq_factor: float,
    high_freq_factor: float,
    old_context_len: float,
) -> None:
    _launch_table(
        q,
        k,
        q,
        k,
        pos_ids,
        indptr,
        offsets,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        low_freq_factor,
        high_freq_factor,
        old_context_len,
    )


@_rope_inplace_op.register_fake
def _rope_inplace_fake(
    q,
    k,
    pos_ids,
    indptr,
    offsets,
    rotary_dim,
    interleave,
    rope_scale,
    rope_theta,
    low_freq_factor,
    high_freq_factor,
    old_context_len,
) -> None:
    return None


@torch.library.custom_op("flashinfer::rope_cos_sin_cache", mutates_args=("q_rope", "k_rope"))
def _rope_cache_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    interleave: bool,
) -> None:
    _launch_cache(q, k, q_rope, k_rope, cos_sin_cache, positions, interleave)


@_rope_cache_op.register_fake
def _rope_cache_fake(q, k, q_rope, k_rope, cos_sin_cache, positions, interleave) -> None:
    return None


@torch.library.custom_op("flashinfer::rope_cos_sin_cache_inplace", mutates_args=("q", "k"))
def _rope_cache_inplace_op(
    q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, positions: torch.Tensor, interleave: bool
) -> None:
    _launch_cache(q, k, q, k, cos_sin_cache, positions, interleave)


@_rope_cache_inplace_op.register_fake
def _rope_cache_inplace_fake(q, k, cos_sin_cache, positions, interleave) -> None:
    return None


# ------------------------------------------------------------------------------------------ front ends


_NO_LLAMA31 = (0.0, 0.0, 0.0)


def _llama31(low_freq_factor: Any, high_freq_factor: Any, old_context_len: Any) -> Tuple[float, float, float]:
    low = scalar(low_freq_factor, "low_freq_factor", 1.0)
    high = scalar(high_freq_factor, "high_freq_factor", 4.0)
    old = _positive(old_context_len, "old_context_len", 8192.0)
    if not high > low:
        raise ValueError(
            f"high_freq_factor ({high}) must exceed low_freq_factor ({low}): the Llama 3.1 "
            f"interpolation band between them would be empty"
        )
    return low, high, old


def _rope(
    q: Any,
    k: Any,
    pos_ids: Any,
    indptr: Any,
    offsets: Any,
    rotary_dim: Any,
    interleave: Any,
    rope_scale: Any,
    rope_theta: Any,
    llama31: Tuple[float, float, float],
    in_place: bool,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    q, k = _check_qk(q, k, in_place)
    nnz, _, head_dim = q.shape
    rotary_dim = _check_rotary_dim(rotary_dim, head_dim)
    interleave = bool(interleave)
    scale = _positive(rope_scale, "rope_scale", 1.0)
    theta = _positive(rope_theta, "rope_theta", 1e4)
    device = q.device
    if pos_ids is not None:
        pos_ids = _check_index(pos_ids, "pos_ids", device, nnz)
    else:
        indptr = _check_index(indptr, "indptr", device)
        if indptr.numel() < 1:
            raise ValueError("indptr must have batch_size + 1 >= 1 elements")
        offsets = _check_index(offsets, "offsets", device, indptr.numel() - 1)
    if in_place:
        if tracing():
            _rope_inplace_op(q, k, pos_ids, indptr, offsets, rotary_dim, interleave, scale, theta, *llama31)
        else:
            _launch_table(q, k, q, k, pos_ids, indptr, offsets, rotary_dim, interleave, scale, theta, *llama31)
        return None
    q_rope, k_rope = torch.empty_like(q), torch.empty_like(k)
    if tracing():
        _rope_op(q, k, q_rope, k_rope, pos_ids, indptr, offsets, rotary_dim, interleave, scale, theta, *llama31)
    else:
        _launch_table(q, k, q_rope, k_rope, pos_ids, indptr, offsets, rotary_dim, interleave, scale, theta, *llama31)
    return q_rope, k_rope


def apply_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> None:
    r"""Rotary embedding of a ragged batch of queries/keys, in place; cos/sin computed on the fly.

    Request ``b`` owns tokens ``indptr[b]:indptr[b + 1]``; its token ``i`` sits at position ``offsets[b] + i``.
    Frequency ``f`` (of ``rotary_dim / 2``) rotates by ``pos / (rope_scale * rope_theta ** (2 f / rotary_dim))``.

    Parameters
    ----------
    q : torch.Tensor
        ``(nnz, num_q_heads, head_dim)``, float16 or bfloat16, on a CUDA device, last dimension contiguous (token
        and head strides free, e.g. views of a packed qkv). Rotated in place.
    k : torch.Tensor
        ``(nnz, num_k_heads, head_dim)``, q's dtype and device. Rotated in place.
    indptr : torch.Tensor
        ``(batch_size + 1,)`` int32 or int64, non-decreasing. Tokens outside every request stay unrotated.
    offsets : torch.Tensor
        ``(batch_size,)`` int32 or int64: the position of each request's first token.
    rotary_dim : Optional[int]
        Rotate only the first ``rotary_dim`` (even, <= 256) elements of each head; None: all of them.
    interleave : bool
        True: rotate pairs ``(2f, 2f + 1)`` (GPT-J); False: ``(f, f + rotary_dim / 2)`` (NeoX/Llama halves).
    rope_scale : float
        Positions are divided by it (linear position interpolation).
    rope_theta : float
        RoPE base.
    """
    _rope(q, k, None, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, _NO_LLAMA31, True)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Rotary embedding of a ragged batch of queries/keys into new tensors (see :func:`apply_rope_inplace`).

    Parameters
    ----------
    q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta
        As :func:`apply_rope_inplace` (q and k may have any strides here).

    Returns
    -------
    q_rope : torch.Tensor
        ``(nnz, num_q_heads, head_dim)``, q's dtype.
    k_rope : torch.Tensor
        ``(nnz, num_k_heads, head_dim)``, k's dtype. Elements past ``rotary_dim`` are copied unchanged.
    """
    return _rope(q, k, None, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, _NO_LLAMA31, False)


def apply_rope_pos_ids_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> None:
    r"""Rotary embedding of queries/keys at explicit positions, in place; cos/sin computed on the fly.

    Parameters
    ----------
    q, k
        As :func:`apply_rope_inplace`.
    pos_ids : torch.Tensor
        ``(nnz,)`` int32 or int64: each token's position (below 2**24 for exact angles).
    rotary_dim, interleave, rope_scale, rope_theta
        As :func:`apply_rope_inplace`.
    """
    _rope(q, k, pos_ids, None, None, rotary_dim, interleave, rope_scale, rope_theta, _NO_LLAMA31, True)


def apply_rope_pos_ids(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 1,
    rope_theta: float = 1e4,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Rotary embedding of queries/keys at explicit positions into new tensors.

    Parameters
    ----------
    q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta
        As :func:`apply_rope_pos_ids_inplace`.

    Returns
    -------
    q_rope : torch.Tensor
        ``(nnz, num_q_heads, head_dim)``, q's dtype.
    k_rope : torch.Tensor
        ``(nnz, num_k_heads, head_dim)``, k's dtype.
    """
    return _rope(q, k, pos_ids, None, None, rotary_dim, interleave, rope_scale, rope_theta, _NO_LLAMA31, False)


def apply_llama31_rope_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> None:
    r"""Llama 3.1 rotary embedding of a ragged batch of queries/keys, in place.

    Parameters
    ----------
    q, k, indptr, offsets, rotary_dim, interleave
        As :func:`apply_rope_inplace`.
    rope_scale : float
        Llama 3.1 scale factor: low frequencies are divided by it.
    rope_theta : float
        RoPE base.
    low_freq_factor, high_freq_factor : float
        Frequencies with wavelength above ``old_context_len / low_freq_factor`` are divided by ``rope_scale``,
        those below ``old_context_len / high_freq_factor`` kept, the band between interpolated (high > low).
    old_context_len : int
        The original context length.
    """
    _rope(
        q,
        k,
        None,
        indptr,
        offsets,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        _llama31(low_freq_factor, high_freq_factor, old_context_len),
        True,
    )


def apply_llama31_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    indptr: torch.Tensor,
    offsets: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Llama 3.1 rotary embedding of a ragged batch of queries/keys into new tensors.

    Parameters
    ----------
    q, k, indptr, offsets, rotary_dim, interleave, rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len
        As :func:`apply_llama31_rope_inplace`.

    Returns
    -------
    q_rope : torch.Tensor
        ``(nnz, num_q_heads, head_dim)``, q's dtype.
    k_rope : torch.Tensor
        ``(nnz, num_k_heads, head_dim)``, k's dtype.
    """
    return _rope(
        q,
        k,
        None,
        indptr,
        offsets,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        _llama31(low_freq_factor, high_freq_factor, old_context_len),
        False,
    )


def apply_llama31_rope_pos_ids_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> None:
    r"""Llama 3.1 rotary embedding of queries/keys at explicit positions, in place.

    Parameters
    ----------
    q, k, pos_ids
        As :func:`apply_rope_pos_ids_inplace`.
    rotary_dim, interleave, rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len
        As :func:`apply_llama31_rope_inplace`.
    """
    _rope(
        q,
        k,
        pos_ids,
        None,
        None,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        _llama31(low_freq_factor, high_freq_factor, old_context_len),
        True,
    )


def apply_llama31_rope_pos_ids(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_ids: torch.Tensor,
    rotary_dim: Optional[int] = None,
    interleave: bool = False,
    rope_scale: float = 8,
    rope_theta: float = 5e5,
    low_freq_factor: float = 1,
    high_freq_factor: float = 4,
    old_context_len: int = 8192,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Llama 3.1 rotary embedding of queries/keys at explicit positions into new tensors.

    Parameters
    ----------
    q, k, pos_ids
        As :func:`apply_rope_pos_ids_inplace`.
    rotary_dim, interleave, rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len
        As :func:`apply_llama31_rope_inplace`.

    Returns
    -------
    q_rope : torch.Tensor
        ``(nnz, num_q_heads, head_dim)``, q's dtype.
    k_rope : torch.Tensor
        ``(nnz, num_k_heads, head_dim)``, k's dtype.
    """
    return _rope(
        q,
        k,
        pos_ids,
        None,
        None,
        rotary_dim,
        interleave,
        rope_scale,
        rope_theta,
        _llama31(low_freq_factor, high_freq_factor, old_context_len),
        False,
    )


def _heads_geometry(t: torch.Tensor, nnz: int, head_size: int, name: str) -> Tuple[int, int, int, bool]:
    """(heads, token stride, head stride, last stride is 1) of ``t`` seen as ``(nnz, -1, head_size)``, as FlashInfer
    views it (``t.view(nnz, -1, head_size)``), without building the view in the common layouts."""
    shape, stride = t.shape, t.stride()
    per_token = shape[1] if len(shape) == 2 else t.numel() // nnz
    if len(shape) < 2 or shape[0] != nnz or per_token % head_size:
        raise ValueError(
            f"{name} must be (nnz={nnz}, num_heads * head_size) with head_size={head_size}, got shape {tuple(shape)}"
        )
    if len(shape) == 2 and (stride[1] == 1 or shape[1] == 1):
        return per_token // head_size, stride[0], head_size, True
    if len(shape) == 3 and shape[2] == head_size:
        return shape[1], stride[0], stride[1], stride[2] == 1 or head_size == 1
    try:
        v = t.view(nnz, per_token // head_size, head_size)
    except RuntimeError as e:
        raise ValueError(
            f"{name} of shape {tuple(shape)} and strides {stride} cannot be viewed as "
            f"(nnz, num_heads, {head_size}): {e}"
        ) from None
    vs = v.stride()
    return v.shape[1], vs[0], vs[1], vs[2] == 1


def _rope_cos_sin_cache(
    positions: Any, query: Any, key: Any, head_size: Any, cos_sin_cache: Any, is_neox: Any, in_place: bool
) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    check_device_tensor(cos_sin_cache, "cos_sin_cache")
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache should be float32, got {cos_sin_cache.dtype}")
    check_device_tensor(query, "query")
    dtype = query.dtype
    dtype_short(query, "query")
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size must be a positive int, got {head_size!r}")
    device = query.device
    index = device.index
    qshape = query.shape
    nnz = qshape[0] if len(qshape) else 0
    positions = _check_index(positions, "positions", device, nnz)
    cshape = cos_sin_cache.shape
    if len(cshape) != 2 or cos_sin_cache.get_device() != index:
        raise ValueError(
            f"cos_sin_cache must be 2-D (max_seq_len, rotary_dim) on {device}, got "
            f"{tuple(cshape)} on {cos_sin_cache.device}"
        )
    rotary_dim = cshape[1]
    if not (2 <= rotary_dim <= head_size) or rotary_dim % 2:
        raise ValueError(
            f"cos_sin_cache's rotary_dim ({rotary_dim}: cos in the first half, sin in the second) must "
            f"be even and in [2, head_size={head_size}]"
        )
    if cos_sin_cache.stride()[1] != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    if key is not None:
        check_device_tensor(key, "key")
        if key.dtype != dtype or key.get_device() != index:
            raise ValueError(
                f"key must share query's dtype and device ({dtype}, {device}), got {key.dtype} on {key.device}"
            )
    if nnz >= 2**31:
        raise ValueError(f"nnz {nnz} exceeds 2**31 - 1")
    if nnz == 0:
        return None if in_place else (torch.empty_like(query), None if key is None else torch.empty_like(key))
    qg = _heads_geometry(query, nnz, head_size, "query")
    kg = _heads_geometry(key, nnz, head_size, "key") if key is not None else (0, 0, 0, True)
    if not (qg[3] and kg[3]):
        if in_place:
            raise ValueError("query and key are rotated in place and must be contiguous in their last dimension")
        query = query.contiguous()
        key = key.contiguous() if key is not None else None
        qg = _heads_geometry(query, nnz, head_size, "query")
        kg = _heads_geometry(key, nnz, head_size, "key") if key is not None else kg
    interleave = not bool(is_neox)

    if tracing():  # the custom ops take (nnz, heads, head_size) views
        q = query.view(nnz, qg[0], head_size)
        k = key.view(nnz, kg[0], head_size) if key is not None else q.new_empty((nnz, 0, head_size))
        if in_place:
            _rope_cache_inplace_op(q, k, cos_sin_cache, positions, interleave)
            return None
        query_out = torch.empty_like(query, memory_format=torch.contiguous_format)
        key_out = torch.empty_like(key, memory_format=torch.contiguous_format) if key is not None else None
        _rope_cache_op(
            q,
            k,
            query_out.view(q.shape),
            key_out.view(k.shape) if key_out is not None else k,
            cos_sin_cache,
            positions,
            interleave,
        )
        return query_out, key_out

    qp = query.data_ptr()
    q_op = (qp, qg[1], qg[2], qg[0])
    k_op = (key.data_ptr(), kg[1], kg[2], kg[0]) if key is not None else (qp, 0, 0, 0)
    if in_place:
        _launch_cache_raw(device, dtype, q_op, k_op, q_op, k_op, nnz, head_size, cos_sin_cache, positions, interleave)
        return None
    query_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    per_q = qg[0] * head_size
    qo_op = (query_out.data_ptr(), per_q, head_size, qg[0])
    key_out, ko_op = None, k_op
    if key is not None:
        key_out = torch.empty_like(key, memory_format=torch.contiguous_format)
        ko_op = (key_out.data_ptr(), kg[0] * head_size, head_size, kg[0])
    _launch_cache_raw(device, dtype, q_op, k_op, qo_op, ko_op, nnz, head_size, cos_sin_cache, positions, interleave)
    return query_out, key_out


def apply_rope_with_cos_sin_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Rotary embedding with precomputed cos/sin (the SGLang/vLLM form) into new tensors.

    Parameters
    ----------
    positions : torch.Tensor
        ``(nnz,)`` int32 or int64 rows of ``cos_sin_cache``. A position outside ``[0, max_seq_len)`` leaves its
        token NaN and raises ``ValueError`` at the next call (see the module docstring); nothing outside the
        cache is read.
    query : torch.Tensor
        ``(nnz, num_q_heads * head_size)`` (or any shape that views as ``(nnz, -1, head_size)``), float16 or
        bfloat16, on a CUDA device.
    key : torch.Tensor
        ``(nnz, num_k_heads * head_size)``, query's dtype; None rotates the query only (an extension).
    head_size : int
        Elements per head.
    cos_sin_cache : torch.Tensor
        ``(max_seq_len, rotary_dim)`` float32: cos in the first ``rotary_dim / 2`` columns, sin in the rest.
        ``rotary_dim`` may be below ``head_size`` (the rest of each head passes through).
    is_neox : bool
        True: rotate halves ``(f, f + rotary_dim / 2)``; False: interleaved pairs ``(2f, 2f + 1)``.

    Returns
    -------
    query_out : torch.Tensor
        The rotated query, query's shape and dtype.
    key_out : torch.Tensor
        The rotated key, key's shape and dtype.
    """
    return _rope_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox, False)


def apply_rope_with_cos_sin_cache_inplace(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    r"""Rotary embedding with precomputed cos/sin (the SGLang/vLLM form), in place.

    Parameters
    ----------
    positions, query, key, head_size, cos_sin_cache, is_neox
        As :func:`apply_rope_with_cos_sin_cache`; query and key (last dimension contiguous) are rotated in place.
    """
    # Eager fast path: the module reads the tensors itself (one ctypes call); anything but the plain case (another
    # type, dtype, device, shape or stride, no key, a pending out-of-cache record) is declined and checked by the
    # full path, as is a traced call and FLASHINFER_ROPE_CHECK_POSITIONS (read per call: tests switch it).
    if not _CHECK_POSITIONS and not tracing():
        try:
            entry = _DLPACK[query.dtype]
        except (AttributeError, KeyError, TypeError):
            entry = None
        if entry is not None and key is not None and type(head_size) is int and type(is_neox) is bool:
            launch, pack = entry
            try:
                declined = launch(
                    pack(_DLPACK_API[0], id(positions), id(query), id(key), id(cos_sin_cache), head_size, not is_neox)
                )
            except Exception:  # not a tensor, a head_size beyond int: the full path says why
                declined = 1
            if not declined:
                return
    _rope_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox, True)

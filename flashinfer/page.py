"""Paged KV cache helpers: ``append_paged_kv_cache`` (a JIT-compiled kernel), ``get_batch_indices_positions``
and ``get_seq_lens``; drop-ins for FlashInfer's functions of those names.

A paged KV cache is either one tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (``kv_layout="NHD"``)
/ ``[num_pages, 2, num_kv_heads, page_size, head_dim]`` (``"HND"``), or a tuple ``(k_cache, v_cache)`` of
``[num_pages, page_size, num_kv_heads, head_dim]`` / ``[num_pages, num_kv_heads, page_size, head_dim]``. The page
table is CSR: ``kv_indptr [batch + 1]``, ``kv_indices [nnz_pages]``, ``kv_last_page_len [batch]`` (0..page_size);
request r holds ``(pages - 1) * page_size + last_page_len`` tokens, none when it has no pages. This module is the one
place that takes a paged cache apart (``unpack_paged_kv_cache``) for every wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch

from . import jit
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .utils import (
    DTYPE_CUDA,
    KV_DTYPE_SHORT,
    SUPPORTED_HEAD_DIMS,
    canonical_layout,
    check_head_dim,
    check_same_device,
    current_stream_ptr,
    dtype_short,
    tracing,
)

PagedKVCache = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@register_family
@dataclasses.dataclass(frozen=True)
class PageAppendSpec(Spec):
    """Compile-time configuration of the append-to-paged-cache kernel (layouts are strides: one kernel; the
    cache's dtype: 16-bit or fp8, whose appended keys and values arrive already quantised)."""

    head_dim: int = 128
    dtype_kv: str = "bf16"

    family = "page_append"
    template = "page_append.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_append_paged_kv",
            "const void* key, const void* value, int64_t key_stride_n, int64_t key_stride_h, "
            "int64_t value_stride_n, int64_t value_stride_h, const int* batch_indices, const int* positions, "
            "const int* kv_indptr, void* k_cache, void* v_cache, int64_t stride_page, int64_t stride_n, "
            "int64_t stride_h, const int* kv_indices, int num_pages, int batch_size, int nnz, int num_heads, "
            "int page_size, int device, void* stream",
        ),
    )

    def name(self) -> str:
        return f"{self.family}_kv-{self.dtype_kv}_d{self.head_dim}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "head_dim": self.head_dim, "dtype_kv": DTYPE_CUDA[self.dtype_kv]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"head_dim": SUPPORTED_HEAD_DIMS, "dtype_kv": tuple(dict.fromkeys(KV_DTYPE_SHORT.values()))}


class PagedKV(NamedTuple):
    """A paged cache taken apart: K and V views ``[num_pages, ...]`` sharing strides, and its geometry."""

    k: torch.Tensor
    v: torch.Tensor
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    stride_page: int  # elements
    stride_n: int  # between the tokens of a page
    stride_h: int  # between heads


def unpack_paged_kv_cache(paged_kv_cache: PagedKVCache, kv_layout: str) -> PagedKV:
    """Validates a 16-bit paged cache of either form and returns its K/V views, geometry and element strides
    (the wrappers take fp8 caches apart with the same code).

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
        ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and num_kv_heads) or a
        tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, num_kv_heads, head_dim]``; float16/bfloat16 on
        CUDA (an fp8 cache raises TypeError naming the paths that read it).
    kv_layout : str
        ``"NHD"`` or ``"HND"``.

    Returns
    -------
    PagedKV
        The K/V views ``[num_pages, ...]``, the geometry and the strides (elements) of pages, tokens and heads.
    """
    return _unpack_paged_kv_cache(paged_kv_cache, kv_layout, False)


def _unpack_paged_kv_cache(paged_kv_cache: PagedKVCache, kv_layout: str, allow_fp8: bool) -> PagedKV:
    """Validates a paged cache of either form and returns its K/V views, geometry and element strides.

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
        ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD; HND swaps page_size and num_kv_heads) or a
        tuple ``(k_cache, v_cache)`` of ``[num_pages, page_size, num_kv_heads, head_dim]``; float16/bfloat16 on
        CUDA, or float8_e4m3fn/float8_e5m2 with ``allow_fp8``.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    allow_fp8 : bool
        Whether the caller's kernels read fp8 caches (the attention wrappers and the page append); else an fp8
        cache raises TypeError naming the paths that do.

    Returns
    -------
    PagedKV
        The K/V views ``[num_pages, ...]``, the geometry and the strides (elements of the cache's dtype) of
        pages, tokens and heads.
    """
    kv_layout = canonical_layout(kv_layout)
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError(f"paged_kv_cache tuple must be (k_cache, v_cache), got {len(paged_kv_cache)} tensors")
        k, v = paged_kv_cache
        for n, t in (("k_cache", k), ("v_cache", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{n} must be 4-D [num_pages, {'page_size, num_kv_heads' if kv_layout == 'NHD' else 'num_kv_heads, page_size'}, "
                    f"head_dim] (kv_layout={kv_layout!r}), got shape {tuple(t.shape)}"
                )
        if k.shape != v.shape or k.stride() != v.stride():
            raise ValueError(
                f"k_cache and v_cache must have the same shape and strides, got {tuple(k.shape)}/"
                f"{k.stride()} and {tuple(v.shape)}/{v.stride()}"
            )
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"k_cache and v_cache must share dtype and device, got {k.dtype}/{k.device} and {v.dtype}/{v.device}"
            )
    elif isinstance(paged_kv_cache, torch.Tensor):
        if paged_kv_cache.dim() != 5 or paged_kv_cache.shape[1] != 2:
            raise ValueError(
                f"paged_kv_cache must be 5-D [num_pages, 2, {'page_size, num_kv_heads' if kv_layout == 'NHD' else 'num_kv_heads, page_size'}, "
                f"head_dim] (kv_layout={kv_layout!r}) or a (k_cache, v_cache) tuple, got shape {tuple(paged_kv_cache.shape)}"
            )
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    else:
        raise TypeError(
            f"paged_kv_cache must be a tensor or a (k_cache, v_cache) tuple, got {type(paged_kv_cache).__name__}"
        )
    if not k.is_cuda:
        raise ValueError(f"paged_kv_cache is on {k.device}; the kernels run on CUDA devices only")
    dtype_short(k, "paged_kv_cache", allow_fp8)
    num_pages, a, b, head_dim = k.shape
    s0, s1, s2, s3 = k.stride()
    if kv_layout == "NHD":
        page_size, num_kv_heads, stride_n, stride_h = a, b, s1, s2
    else:
        num_kv_heads, page_size, stride_h, stride_n = a, b, s1, s2
    check_head_dim(head_dim)
    if s3 != 1 and head_dim > 1:
        raise ValueError(f"paged_kv_cache must be contiguous in head_dim (stride 1), got strides {k.stride()}")
    vec = 16 // k.element_size()  # elements of a 16-byte vector
    for what, s, size in (("page", s0, num_pages), ("token", stride_n, page_size), ("head", stride_h, num_kv_heads)):
        if size > 1 and s % vec != 0:
            raise ValueError(f"paged_kv_cache {what} stride {s} is not a multiple of {vec} elements (16 bytes)")
    if not tracing() and (k.data_ptr() % 16 or v.data_ptr() % 16):  # (fake tensors: no address)
        raise ValueError("paged_kv_cache data must be 16-byte aligned")
    if num_pages >= 2**31:
        raise ValueError(f"num_pages {num_pages} exceeds 2**31 - 1")
    if not 1 <= page_size <= 2**16:
        raise ValueError(f"page_size {page_size} out of range")
    return PagedKV(k, v, num_pages, page_size, num_kv_heads, head_dim, s0, stride_n, stride_h)


def _check_index(t: Any, name: str, device: torch.device, length: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32 (FlashInfer's index dtype), got {t.dtype}")
    if t.device != device:
        raise ValueError(
            f"all tensors must be on one device: paged_kv_cache is on {device} but {name} is on {t.device}"
        )
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have {length} elements, got {t.numel()}")
    return t if t.is_contiguous() else t.contiguous()


@functools.cache
def _append_fn(spec: PageAppendSpec):
    module = jit.load(spec)
    return module, module.launcher("flashinfer_append_paged_kv")


def append_paged_kv_cache(
    append_key: torch.Tensor,
    append_value: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    paged_kv_cache: PagedKVCache,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    kv_layout: str = "NHD",
) -> None:
    """Writes new keys and values into a paged KV cache, in place (FlashInfer's function).

    Token i goes to request ``batch_indices[i]`` at position ``positions[i]`` (see ``get_batch_indices_positions``).
    The kernel runs on the cache's device and its current stream. Entries whose request, position or page fall
    outside the page table are skipped (never written out of bounds).

    Parameters
    ----------
    append_key, append_value : torch.Tensor
        ``[nnz, num_kv_heads, head_dim]`` in the cache's dtype: for an fp8 cache (float8_e4m3fn/float8_e5m2) the
        keys and values arrive already quantised, as FlashInfer expects (their scales are run()'s
        ``k_scale``/``v_scale``).
    batch_indices, positions : torch.Tensor
        ``[nnz]`` int32: each token's request and position in it.
    paged_kv_cache : torch.Tensor or (torch.Tensor, torch.Tensor)
        The cache (see :func:`unpack_paged_kv_cache`), written in place.
    kv_indices : torch.Tensor
        ``[nnz_pages]`` int32 page ids.
    kv_indptr : torch.Tensor
        ``[batch_size + 1]`` int32 page offsets of the requests.
    kv_last_page_len : torch.Tensor
        ``[batch_size]`` int32: validated (shape, dtype, device) as FlashInfer's; the writes are bounded by the
        pages themselves, so it changes nothing here.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    """
    kv = _unpack_paged_kv_cache(paged_kv_cache, kv_layout, allow_fp8=True)
    device = kv.k.device
    for n, t in (("append_key", append_key), ("append_value", append_value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{n} must be 3-D [nnz, num_kv_heads, head_dim], got shape {tuple(t.shape)}")
    check_same_device([("paged_kv_cache", kv.k), ("append_key", append_key), ("append_value", append_value)])
    if append_key.shape != append_value.shape:
        raise ValueError(
            f"append_key and append_value shapes differ: {tuple(append_key.shape)} vs {tuple(append_value.shape)}"
        )
    nnz, heads, head_dim = append_key.shape
    if (heads, head_dim) != (kv.num_kv_heads, kv.head_dim):
        raise ValueError(
            f"append_key has {heads} heads of dim {head_dim}, the cache {kv.num_kv_heads} of dim {kv.head_dim} "
            f"(kv_layout={canonical_layout(kv_layout)!r})"
        )
    if append_key.dtype != kv.k.dtype or append_value.dtype != kv.k.dtype:
        raise TypeError(
            f"append_key/append_value dtype ({append_key.dtype}/{append_value.dtype}) must match the cache's {kv.k.dtype}"
            + (
                " (an fp8 cache takes keys and values already quantised to its dtype)"
                if kv.k.element_size() == 1
                else ""
            )
        )
    batch_indices = _check_index(batch_indices, "batch_indices", device, nnz)
    positions = _check_index(positions, "positions", device, nnz)
    kv_indptr = _check_index(kv_indptr, "kv_indptr", device)
    kv_indices = _check_index(kv_indices, "kv_indices", device)
    _check_index(kv_last_page_len, "kv_last_page_len", device, kv_indptr.numel() - 1)
    if kv_indptr.numel() < 1:
        raise ValueError("kv_indptr must have batch_size + 1 >= 1 elements")
    tensors = []
    vec = 16 // kv.k.element_size()  # elements of the kernel's 16-byte vectors
    for _name, t in (("append_key", append_key), ("append_value", append_value)):
        if (
            t.stride(-1) != 1
            or (t.size(0) > 1 and t.stride(0) % vec)
            or (t.size(1) > 1 and t.stride(1) % vec)
            or t.data_ptr() % 16
        ):
            t = t.contiguous()
        tensors.append(t)
    key, value = tensors
    if nnz == 0:
        return
    spec = PageAppendSpec(head_dim=head_dim, dtype_kv=KV_DTYPE_SHORT[kv.k.dtype])
    module, fn = _append_fn(spec)
    rc = fn(
        key=key.data_ptr(),
        value=value.data_ptr(),
        key_stride_n=key.stride(0),
        key_stride_h=key.stride(1),
        value_stride_n=value.stride(0),
        value_stride_h=value.stride(1),
        batch_indices=batch_indices.data_ptr(),
        positions=positions.data_ptr(),
        kv_indptr=kv_indptr.data_ptr(),
        k_cache=kv.k.data_ptr(),
        v_cache=kv.v.data_ptr(),
        stride_page=kv.stride_page,
        stride_n=kv.stride_n,
        stride_h=kv.stride_h,
        kv_indices=kv_indices.data_ptr(),
        num_pages=kv.num_pages,
        batch_size=kv_indptr.numel() - 1,
        nnz=nnz,
        num_heads=heads,
        page_size=kv.page_size,
        device=device.index,
        stream=current_stream_ptr(device),
    )
    if rc:
        module.check(rc, f"append_paged_kv_cache ({spec.name()}) on {device}")


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """Tokens per request from a page table, FlashInfer's formula.

    Parameters
    ----------
    kv_indptr : torch.Tensor
        ``[batch_size + 1]`` page offsets.
    kv_last_page_len : torch.Tensor
        ``[batch_size]`` tokens in each request's last page.
    page_size : int
        Tokens per page.

    Returns
    -------
    torch.Tensor
        ``[batch_size]``: ``max(pages - 1, 0) * page_size + last_page_len`` (so a request without pages counts its
        last_page_len, as in FlashInfer; the attention kernels give it no keys).
    """
    return torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size + kv_last_page_len


def get_batch_indices_positions(
    append_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    nnz: int,
    batch_indices: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each appended token's request and position (FlashInfer's function; no host sync: ``nnz`` is given).

    Request r's appended tokens take the last ``append_len_r`` positions of its ``seq_lens[r]`` (the lengths after
    the append).

    Parameters
    ----------
    append_indptr : torch.Tensor
        ``[batch_size + 1]`` CSR offsets of the appended tokens.
    seq_lens : torch.Tensor
        ``[batch_size]`` sequence lengths after the append.
    nnz : int
        Tokens appended (``append_indptr[-1]``).
    batch_indices, positions : torch.Tensor, optional
        Preallocated int32 ``[nnz]`` outputs, written and returned.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        int32 ``(batch_indices, positions)``, ``[nnz]`` each, on append_indptr's device.
    """
    device = append_indptr.device
    indptr = append_indptr.to(torch.int64)
    append_lens = indptr[1:] - indptr[:-1]
    batch = append_lens.numel()
    batch_idx = torch.repeat_interleave(torch.arange(batch, device=device), append_lens, output_size=nnz)
    offsets = torch.arange(nnz, device=device) - indptr[batch_idx]
    pos = seq_lens.to(device=device, dtype=torch.int64)[batch_idx] - append_lens[batch_idx] + offsets
    outs = []
    for name, given, value in (("batch_indices", batch_indices, batch_idx), ("positions", positions, pos)):
        if given is None:
            outs.append(value.to(torch.int32))
            continue
        if (
            not isinstance(given, torch.Tensor)
            or given.shape != (nnz,)
            or given.dtype != torch.int32
            or given.device != device
        ):
            raise ValueError(f"{name} must be an int32 tensor of shape [{nnz}] on {device}")
        outs.append(given.copy_(value))
    return outs[0], outs[1]

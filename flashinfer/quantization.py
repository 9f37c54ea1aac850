"""Bit packing of boolean attention masks (FlashInfer's ``packbits`` / ``segment_packbits``).

Both run as a few PyTorch ops on the input's device (no custom kernel: masks are packed once per batch).
``bitorder="little"``: element 8*i + b of the input lands in bit b (value 1 << b) of byte i, which is how the
prefill kernels read custom masks; ``"big"`` is numpy's default order (bit 7 - b).
"""

from __future__ import annotations

from typing import Tuple

import torch

_WEIGHTS = {}


def _weights(bitorder: str, device: torch.device) -> torch.Tensor:
    key = (bitorder, device)
    w = _WEIGHTS.get(key)
    if w is None:
        bits = torch.arange(8, dtype=torch.int32)
        w = (1 << bits) if bitorder == "little" else (1 << (7 - bits))
        w = _WEIGHTS[key] = w.to(torch.uint8).to(device)
    return w


def _check(x: torch.Tensor, bitorder: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if bitorder not in ("little", "big"):
        raise ValueError(f"bitorder must be 'little' or 'big', got {bitorder!r}")


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """Packs the flattened elements of ``x`` (nonzero = 1) into uint8, 8 per byte, padding the last with zeros.

    Same as ``numpy.packbits(x.flatten(), bitorder=bitorder)`` (FlashInfer's function).

    Parameters
    ----------
    x : torch.Tensor
        Any shape and dtype (a bool mask, typically); flattened.
    bitorder : str
        ``"big"`` (element 8i + b in bit 7 - b of byte i, numpy's default) or ``"little"`` (in bit b: the order the
        prefill kernels read custom masks in).

    Returns
    -------
    torch.Tensor
        uint8 ``[ceil(x.numel() / 8)]`` on x's device.
    """
    _check(x, bitorder)
    flat = x.reshape(-1)
    n = flat.numel()
    nbytes = (n + 7) // 8
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=x.device)
    bits[:n] = flat != 0
    return (bits.view(nbytes, 8) * _weights(bitorder, x.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def segment_packbits(x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big") -> Tuple[torch.Tensor, torch.Tensor]:
    """Packs each segment ``x[indptr[i]:indptr[i+1]]`` on its own, each from a byte boundary (FlashInfer's
    function; per-request custom masks of batch prefill).

    Parameters
    ----------
    x : torch.Tensor
        Flattened; nonzero = 1.
    indptr : torch.Tensor
        ``[num_segments + 1]`` int32/int64 offsets into x, non-decreasing within ``[0, x.numel()]``.
    bitorder : str
        ``"big"`` or ``"little"``, as :func:`packbits`.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``packed`` uint8 (the segments' bytes concatenated) and ``packed_indptr`` ``[num_segments + 1]`` (byte
        offsets: ``packed_indptr[i+1] - packed_indptr[i] = ceil(segment length / 8)``), on x's and indptr's devices.
    """
    _check(x, bitorder)
    if not isinstance(indptr, torch.Tensor) or indptr.dim() != 1 or indptr.numel() < 1:
        raise ValueError("indptr must be a 1-D tensor of segment offsets (length = segments + 1)")
    if indptr.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indptr must be int32 or int64, got {indptr.dtype}")
    flat = x.reshape(-1)
    ind = indptr.to(device="cpu", dtype=torch.int64)
    lengths = ind[1:] - ind[:-1]
    if (lengths < 0).any() or int(ind[0]) < 0 or int(ind[-1]) > flat.numel():
        raise ValueError(f"indptr must be non-decreasing within [0, {flat.numel()}], got {ind.tolist()[:16]}")
    nbytes = (lengths + 7) // 8
    packed_indptr = torch.zeros(ind.numel(), dtype=torch.int64)
    torch.cumsum(nbytes, 0, out=packed_indptr[1:])
    total = int(packed_indptr[-1])
    # Scatter every element to its padded bit position, then pack the padded stream in one go.
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pos_in_seg = torch.arange(int(lengths.sum())) - torch.repeat_interleave(ind[:-1] - ind[0], lengths)
    dst = (packed_indptr[:-1][seg] * 8 + pos_in_seg).to(x.device)
    bits = torch.zeros(total * 8, dtype=torch.uint8, device=x.device)
    bits[dst] = (flat[int(ind[0]) : int(ind[-1])] != 0).to(torch.uint8)
    packed = (bits.view(total, 8) * _weights(bitorder, x.device)).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return packed, packed_indptr.to(device=indptr.device, dtype=indptr.dtype)

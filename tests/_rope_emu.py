"""The RoPE kernels run on the CPU (tests/rope_emulator): rope.cuh's unmodified rope_kernel and launch_rope,
compiled with the host compiler for one setting of its knobs, their launches run thread by thread (the kernel's
threads never exchange values). Checks every kernel form and launch_rope's choice among them here; what this cannot
show: timing, PTX, the memory model."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import _host_emu

REPO = Path(__file__).resolve().parent.parent
HEADERS = REPO / "templates" / "include" / "flashinfer"
EMU = Path(__file__).resolve().parent / "rope_emulator"


def available() -> Optional[str]:
    """None when the emulator can be built here, else why not."""
    return _host_emu.available("cuda_bf16.h")


def _sources() -> Dict[str, str]:
    rope = (HEADERS / "ops" / "rope.cuh").read_text()
    for old, new in (("launch_kernel(", "::emu::launch("), ("sm_count(device)", "::emu::sms")):
        if old not in rope:
            raise RuntimeError(f"rope.cuh has no {old!r} for the emulator to replace")
        rope = rope.replace(old, new)
    files = {"rope.cuh": rope}
    for f in ("common.cuh", "attention/pos_enc.cuh", "host/launch.cuh"):  # host-compilable as they are
        files[f"flashinfer/{f}"] = (HEADERS / f).read_text()
    for f in ("prelude.h", "driver.cpp"):
        files[f] = (EMU / f).read_text()
    return files


_LIBS: Dict[Tuple[str, ...], ctypes.CDLL] = {}


def lib(*defines: str) -> ctypes.CDLL:
    """The emulator built with -D<each of defines> (rope.cuh's knobs; cached by content hash)."""
    if defines in _LIBS:
        return _LIBS[defines]
    flags = ["-O1", "-std=c++17", "-shared", "-fPIC", "-w", *(f"-D{d}" for d in defines)]
    so = _host_emu.build("rope", _sources(), flags)
    lib = ctypes.CDLL(str(so))
    lib.emu_rope.restype = ctypes.c_int
    lib.emu_kernels_launched.restype = ctypes.c_int
    _LIBS[defines] = lib
    return lib


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def rope(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    interleave: bool,
    rotary_dim: int,
    pos_ids: Optional[torch.Tensor] = None,
    ragged: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    cache: Optional[torch.Tensor] = None,
) -> List[int]:
    """One launch_rope on CPU tensors q/k ``[nnz, heads, head_dim]`` (16-bit): with ``cache`` (float32 ``[rows,
    rotary_dim]``) the cos/sin-cache launcher, else the frequency table (theta 1e4) of pos_ids or ragged
    (indptr, offsets). Returns the out-of-cache record {flag, position, rows}."""
    nnz, hq, d = q.shape
    strides = (ctypes.c_int64 * 8)(*(s for t in (q, k, q_out, k_out) for s in t.stride()[:2]))
    record = (ctypes.c_int64 * 8)()
    indptr, offsets = ragged if ragged is not None else (None, None)
    index = pos_ids if pos_ids is not None else offsets
    rc = lib.emu_rope(
        int(q.dtype == torch.bfloat16),
        _ptr(q),
        _ptr(k),
        _ptr(q_out),
        _ptr(k_out),
        strides,
        nnz,
        hq,
        k.shape[1],
        d,
        rotary_dim,
        int(interleave),
        _ptr(pos_ids),
        _ptr(indptr),
        _ptr(offsets),
        int(index.dtype == torch.int64),
        int(indptr is not None and indptr.dtype == torch.int64),
        indptr.numel() - 1 if indptr is not None else 0,
        _ptr(cache),
        ctypes.c_int64(cache.shape[0] if cache is not None else 0),
        ctypes.c_int64(cache.stride(0) if cache is not None else 0),
        ctypes.c_double(0.0 if cache is not None else 1e4),
        record,
    )
    if rc != 0:
        raise RuntimeError(f"launch_rope returned {rc}")
    return list(record[:3])

"""The sampling kernels' device code run on the CPU (tests/sampling_emulator): builds the emulator once per
content hash with the host compiler and wraps its entry points for CPU torch tensors.

The device functions compiled here are the unmodified ones of templates/include/flashinfer/ops/sampling.cuh; only
ptx/math.cuh's PTX (ex2/lg2 approximations), ptx/cp_async.cuh and ptx/griddepcontrol.cuh are replaced by host
versions. A global read (``__ldg``, ``cp.async``) outside the input tensor's bytes fails the launch, as
compute-sanitizer's memcheck would for an exact allocation. What this cannot show:
timing, the memory model (threads interleave only at barriers, in a random order: the shared-memory hazards that
compute-sanitizer racecheck reports do not show here), PTX-level details.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Optional

import torch

import _host_emu

REPO = Path(__file__).resolve().parent.parent
HEADERS = REPO / "templates" / "include" / "flashinfer"
EMU = Path(__file__).resolve().parent / "sampling_emulator"
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_PTX = {
    r'asm volatile\("ex2\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);': "y = ::emu::exp2_ftz(x);",
    r'asm volatile\("lg2\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);': "y = std::log2(x);",
    r'asm\("rcp\.approx\.ftz\.f32 %0, %1;" : "=f"\(y\) : "f"\(x\)\);': "y = ::emu::rcp_approx(x);",
}


def available() -> Optional[str]:
    """None when the emulator can be built here, else why not."""
    return _host_emu.available("cuda_fp16.h")


def _sources() -> dict:
    """{path under the build dir: text}: the headers sampling.cuh includes, by their include paths."""
    math = (HEADERS / "ptx" / "math.cuh").read_text()
    for pattern, repl in _PTX.items():
        math = re.sub(pattern, repl, math)
    if "asm" in re.sub(r"//.*", "", math):
        raise RuntimeError("ptx/math.cuh has PTX the emulator does not replace")
    files = {"sampling.cuh": (HEADERS / "ops" / "sampling.cuh").read_text(), "flashinfer/ptx/math.cuh": math}
    for f in ("common.cuh", "host/launch.cuh"):  # host-compilable as they are
        files[f"flashinfer/{f}"] = (HEADERS / f).read_text()
    for f in ("cp_async.cuh", "griddepcontrol.cuh"):
        files[f"flashinfer/ptx/{f}"] = (EMU / f).read_text()
    for f in ("emu.h", "cooperative_groups.h", "driver.cpp"):
        files[f] = (EMU / f).read_text()
    return files


_LIB = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    so = _host_emu.build(
        "sampling", _sources(), ["-O2", "-fno-strict-aliasing", "-std=c++17", "-shared", "-fPIC", "-w"]
    )
    _LIB = ctypes.CDLL(str(so))
    for name in ("emu_sample", "emu_row_op", "emu_chain", "emu_topk_probe"):
        getattr(_LIB, name).restype = ctypes.c_char_p
    _LIB.emu_philox.restype = None
    _LIB.emu_philox.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
    _LIB.emu_logit_key.restype = ctypes.c_uint32
    _LIB.emu_logit_key.argtypes = [ctypes.c_float]
    _LIB.emu_prob_key.restype = ctypes.c_uint32
    _LIB.emu_prob_key.argtypes = [ctypes.c_float]
    _LIB.emu_logit_from_key.restype = ctypes.c_float
    _LIB.emu_logit_from_key.argtypes = [ctypes.c_uint32]
    _LIB.emu_fixed_weight.restype = ctypes.c_uint64
    _LIB.emu_fixed_weight.argtypes = [ctypes.c_float, ctypes.c_int]
    _LIB.emu_mass_target.restype = ctypes.c_uint64
    _LIB.emu_mass_target.argtypes = [ctypes.c_float, ctypes.c_uint64]
    for name in ("emu_check_logit_key_flat", "emu_check_last_weight", "emu_check_divider"):
        getattr(_LIB, name).restype = ctypes.c_int
        getattr(_LIB, name).argtypes = [ctypes.c_uint64, ctypes.c_int]
    _LIB.emu_weights.restype = None
    _LIB.emu_weights.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    _LIB.emu_cluster_of.restype = ctypes.c_int
    _LIB.emu_cluster_of.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return _LIB


def _p(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _check(err) -> None:
    if err:
        raise RuntimeError(err.decode())


FILTER_TOP_K, FILTER_TOP_P, FILTER_MIN_P = 1, 2, 4  # (the module exports the same values as constants)
OP_SOFTMAX, OP_TOP_P_RENORM, OP_TOP_K_RENORM, OP_TOP_K_MASK = 0, 1, 2, 3


def sample(
    x: torch.Tensor,
    *,
    logits: bool,
    filters: int = 0,
    top_k_first: bool = True,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    indices: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    seed_arr: Optional[torch.Tensor] = None,
    offset_arr: Optional[torch.Tensor] = None,
    cluster: int = 0,
    cached: int = -1,
    sched_seed: int = 1,
):
    """Runs the sampling kernel over CPU rows x [rows, >= vocab] (any row stride); returns (samples, valid)."""
    vocab = x.size(1)
    batch = indices.size(0) if indices is not None else x.size(0)
    samples = torch.full((batch,), -7, dtype=indices.dtype if indices is not None else torch.int32)
    valid = torch.zeros(batch, dtype=torch.bool)
    k_arr = top_k if isinstance(top_k, torch.Tensor) else None
    p_arr = top_p if isinstance(top_p, torch.Tensor) else None
    m_arr = min_p if isinstance(min_p, torch.Tensor) else None
    _check(
        lib().emu_sample(
            DTYPES[x.dtype],
            cluster,
            cached,
            ctypes.c_uint(sched_seed),
            _p(x),
            ctypes.c_int64(x.stride(0)),
            x.size(0),
            vocab,
            batch,
            int(logits),
            _p(indices),
            int(indices is not None and indices.dtype == torch.int64),
            _p(samples),
            int(samples.dtype == torch.int64),
            _p(valid),
            filters,
            int(top_k_first),
            _p(k_arr),
            0 if k_arr is not None else int(top_k),
            _p(p_arr),
            ctypes.c_float(0 if p_arr is not None else top_p),
            _p(m_arr),
            ctypes.c_float(0 if m_arr is not None else min_p),
            _p(seed_arr),
            0 if seed_arr is None or seed_arr.numel() == 1 else 1,
            ctypes.c_uint64(seed),
            _p(offset_arr),
            0 if offset_arr is None or offset_arr.numel() == 1 else 1,
            ctypes.c_uint64(offset),
        )
    )
    return samples, valid


def row_op(
    x: torch.Tensor,
    op: int,
    *,
    top_k=0,
    top_p=1.0,
    temperature=1.0,
    cluster: int = 0,
    cached: int = -1,
    sched_seed: int = 1,
    radix: bool = False,
) -> torch.Tensor:
    out_dtype = torch.float32 if op == OP_SOFTMAX else x.dtype
    out = torch.full((x.size(0), x.size(1)), float("nan"), dtype=out_dtype)
    k_arr = top_k if isinstance(top_k, torch.Tensor) else None
    p_arr = top_p if isinstance(top_p, torch.Tensor) else None
    t_arr = temperature if isinstance(temperature, torch.Tensor) else None
    _check(
        lib().emu_row_op(
            DTYPES[x.dtype],
            cluster,
            cached,
            ctypes.c_uint(sched_seed),
            _p(x),
            ctypes.c_int64(x.stride(0)),
            _p(out),
            ctypes.c_int64(out.stride(0)),
            x.size(0),
            x.size(1),
            op,
            _p(k_arr),
            0 if k_arr is not None else int(top_k),
            _p(p_arr),
            ctypes.c_float(0 if p_arr is not None else top_p),
            _p(t_arr),
            ctypes.c_float(0 if t_arr is not None else temperature),
            int(radix),
        )
    )
    return out


def chain(draft_probs, draft_ids, target_probs, *, seed: int = 0, offset: int = 0, sched_seed: int = 1):
    b, n, vocab = draft_probs.shape
    out = torch.full((b, n + 1), -7, dtype=torch.int32)
    acc = torch.zeros(b, dtype=torch.int32)
    emi = torch.zeros(b, dtype=torch.int32)
    _check(
        lib().emu_chain(
            ctypes.c_uint(sched_seed),
            _p(draft_probs),
            _p(draft_ids),
            _p(target_probs),
            _p(out),
            _p(acc),
            _p(emi),
            b,
            n,
            vocab,
            _p(None),
            0,
            ctypes.c_uint64(seed),
            _p(None),
            0,
            ctypes.c_uint64(offset),
        )
    )
    return out, acc, emi


def weights(row: torch.Tensor, logits: bool) -> list:
    """The kernels' fixed-point weights of one row (float32 values of any dtype's row)."""
    x = row.to(torch.float32).contiguous()
    out = (ctypes.c_uint64 * x.numel())()
    lib().emu_weights(x.data_ptr(), x.numel(), int(logits), ctypes.addressof(out))
    return list(out)


def topk_probe(row: torch.Tensor, k: int, *, logits: bool, cluster: int = 0, cached: int = -1) -> dict:
    """The single-pass top-k route on one row (1-D CPU tensor): candidates gathered, bound, whether it held."""
    out = (ctypes.c_uint * 5)()
    _check(
        lib().emu_topk_probe(
            DTYPES[row.dtype],
            cluster,
            cached,
            _p(row),
            row.numel(),
            k,
            int(logits),
            ctypes.c_void_p(ctypes.addressof(out)),
        )
    )
    return {"n": out[0], "theta": out[1], "ok": bool(out[2]), "max_key": out[3], "num_valid": out[4]}


def philox(seed: int, offset: int, row: int, draw: int):
    buf = (ctypes.c_uint32 * 4)()
    lib().emu_philox(seed, offset, row, draw, ctypes.addressof(buf))
    return list(buf)

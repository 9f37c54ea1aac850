"""A DLPack exchange table for CPU-only machines: torch's own table, except that CPU tensors are reported as CUDA
tensors (device 0) and the current stream of every device is a fixed dummy value. The "_dlpack" entry points then
check CPU tensors as they would check CUDA ones, so their accept/decline logic can be tested (and their host time
measured, benchmarks/host_overhead.py --stub) without a GPU. An accepted call goes on into the real launcher, whose
first CUDA call fails on a machine without a GPU: NEVER use this table where a GPU is visible (the launcher would
run a kernel on host pointers); :func:`shim_api` refuses to build it there."""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

import torch

_SHIM_C = r"""
#include <stdint.h>
typedef struct { void* data; int32_t device_type, device_id, ndim; uint8_t code, bits; uint16_t lanes;
                 int64_t* shape; int64_t* strides; uint64_t byte_offset; } View;
typedef struct { uint32_t major, minor; const void* prev; void* a; void* b; void* c;
                 int (*view)(void*, View*); int (*stream)(int32_t, int32_t, void**); } Table;
static const Table* torch_table;
static Table shim;
static int view_as_cuda(void* obj, View* out) {
  int rc = torch_table->view(obj, out);
  if (rc == 0 && out->device_type == 1) { out->device_type = 2; out->device_id = 0; }
  return rc;
}
static int dummy_stream(int32_t type, int32_t device, void** stream) { *stream = (void*)0x1000; return 0; }
/* For timing: an entry point that reports an accepted call (the launcher's CUDA error on a machine without a
   GPU) as success, as the launch would on a GPU; slot i forwards to the entry set by fi_shim_set_entry(i, fn). */
typedef int (*Entry)(const void*);
static Entry entries[8];
void fi_shim_set_entry(int slot, void* fn) { entries[slot] = (Entry)fn; }
#define FI_SHIM_SLOT(i) int fi_shim_entry##i(const void* block) { return entries[i](block) == 2000 ? 2000 : 0; }
FI_SHIM_SLOT(0) FI_SHIM_SLOT(1) FI_SHIM_SLOT(2) FI_SHIM_SLOT(3) FI_SHIM_SLOT(4) FI_SHIM_SLOT(5) FI_SHIM_SLOT(6)
FI_SHIM_SLOT(7)
const void* fi_shim_table(const void* real) {
  torch_table = (const Table*)real;
  shim = *torch_table;
  shim.view = view_as_cuda;
  shim.stream = dummy_stream;
  return &shim;
}
"""

_LIB = []


def shim_api(real_api: int) -> int:
    """Address of the shim table over torch's table at ``real_api`` (built with the host C compiler once)."""
    if torch.cuda.is_available():
        raise RuntimeError("the CPU-as-CUDA DLPack shim must not be used where a GPU is visible")
    if not _LIB:
        d = Path(tempfile.mkdtemp(prefix="fi_dlpack_shim_"))
        (d / "shim.c").write_text(_SHIM_C)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(d / "libshim.so"), str(d / "shim.c")], check=True)
        lib = ctypes.CDLL(str(d / "libshim.so"))
        lib.fi_shim_table.restype = ctypes.c_void_p
        lib.fi_shim_table.argtypes = [ctypes.c_void_p]
        _LIB.append(lib)
    return _LIB[0].fi_shim_table(real_api)


def accepting_entry(packed) -> object:
    """For timing only: a stand-in for the bound packed entry ``packed`` (GIL held, as bound) that calls it and reports
    every call it did not decline as a success (on a machine without a GPU the launch itself fails)."""
    if not _LIB:
        raise RuntimeError("call shim_api first")
    lib = _LIB[0]
    slot = len(_SLOTS)
    if slot >= 8:
        raise RuntimeError("at most 8 shimmed entry points")
    lib.fi_shim_set_entry.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.fi_shim_set_entry(slot, ctypes.cast(packed, ctypes.c_void_p).value)
    fn = ctypes.PyDLL(lib._name, handle=lib._handle)[f"fi_shim_entry{slot}"]
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_char_p]
    _SLOTS.append(fn)
    return fn


_SLOTS: list = []

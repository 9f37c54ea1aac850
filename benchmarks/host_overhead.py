"""Host (CPU) time per call of the hot public ops: rmsnorm (new output and out= given), fused_add_rmsnorm (and its
Gemma form), apply_rope_with_cos_sin_cache_inplace, silu_and_mul (new output and out= given) (16 tokens, bf16),
single_decode_with_kv_cache and BatchDecodeWithPagedKVCacheWrapper.run (issue 14).

    python benchmarks/host_overhead.py [--no-reference] [--calls N]   # on a GPU: real calls
    python benchmarks/host_overhead.py --stub [--profile OP]         # without a GPU: the Python path alone
    python benchmarks/host_overhead.py --instructions                 # the same, instructions per call (valgrind)

GPU mode: host time = wall time of N back-to-back calls without synchronizing, divided by N (best of 5 rounds; the
inputs are small, so the GPU finishes each kernel before the next launch is ready and never throttles the loop).
The real FlashInfer runs the same cases in its own process (``common.run_reference``) for comparison. Prints a
table and one JSON line; records nothing.

Stub mode (no GPU needed, for measuring changes to the Python path): the modules are really built and loaded, but
every entry point that would launch work is swapped for a C function that returns 0 at once, bound with the same
ctypes signature (so argument marshalling is still paid); tensors are CPU tensors that report cuda:0
(``torch.Tensor``'s ``is_cuda``/``device``/``get_device`` patched), ``torch.empty``/``torch.empty_like`` hand out a tensor made once per shape and dtype (so this mode cannot show
what a cheaper factory call saves), and the stream and device-property queries return
constants. The norm and activation ops' "_dlpack" entry points (which read the tensors through torch's DLPack C
exchange table) see CPU tensors as CUDA ones through tests/_dlpack_shim.py, and their accepted calls count as
launched (the launcher's first CUDA call fails on a machine without a GPU: the entry's checks run, the launch does
not). What remains is the cost of validation, module lookup, marshalling and the ctypes call itself, not
of cudaLaunchKernel or the CUDA caching allocator. ``--profile OP`` prints cProfile's view of one op. Times on a
shared CPU wander by 2x between runs; ``--instructions`` counts the instructions of the timed loops under
valgrind's callgrind instead (deterministic; a few minutes), for before/after comparisons.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

REFERENCE_FLAG = "--flashinfer-reference"
OPS = (
    "rmsnorm",
    "rmsnorm_out",
    "fused_add_rmsnorm",
    "gemma_fused_add_rmsnorm",
    "rope_cos_sin_cache_inplace",
    "silu_and_mul",
    "silu_and_mul_out",
    "single_decode",
    "batch_decode_run",
)
TOKENS = 16
HIDDEN = 4096
SILU_D = 14336
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
KV_LEN = 512
BATCH, PAGE_SIZE, PAGES_PER_REQ = 16, 16, 8
DTYPE = torch.bfloat16


def make_cases(fi, device: str) -> Dict[str, Callable[[], object]]:
    """One call per op of the library ``fi`` (this project's flashinfer or the real one: the same API) on inputs
    made on ``device``."""

    def randn(*shape, dtype=DTYPE):
        return torch.randn(*shape, dtype=dtype, device=device)

    cases: Dict[str, Callable[[], object]] = {}
    x, res, w = randn(TOKENS, HIDDEN), randn(TOKENS, HIDDEN), randn(HIDDEN)
    cases["rmsnorm"] = lambda: fi.norm.rmsnorm(x, w)
    cases["fused_add_rmsnorm"] = lambda: fi.norm.fused_add_rmsnorm(x, res, w)
    cases["gemma_fused_add_rmsnorm"] = lambda: fi.norm.gemma_fused_add_rmsnorm(x, res, w)
    y = torch.empty_like(x)
    cases["rmsnorm_out"] = lambda: fi.norm.rmsnorm(x, w, out=y)  # (bench_ops' host column: out given)
    q, k = randn(TOKENS, Q_HEADS * HEAD_DIM), randn(TOKENS, KV_HEADS * HEAD_DIM)
    cos_sin = randn(4096, HEAD_DIM, dtype=torch.float32)
    pos = torch.arange(TOKENS, dtype=torch.int64, device=device)
    cases["rope_cos_sin_cache_inplace"] = lambda: fi.rope.apply_rope_with_cos_sin_cache_inplace(
        pos, q, k, HEAD_DIM, cos_sin, True
    )
    g = randn(TOKENS, 2 * SILU_D)
    cases["silu_and_mul"] = lambda: fi.activation.silu_and_mul(g)
    g_out = randn(TOKENS, SILU_D)
    cases["silu_and_mul_out"] = lambda: fi.activation.silu_and_mul(g, out=g_out)
    dq, dk, dv = randn(Q_HEADS, HEAD_DIM), randn(KV_LEN, KV_HEADS, HEAD_DIM), randn(KV_LEN, KV_HEADS, HEAD_DIM)
    cases["single_decode"] = lambda: fi.decode.single_decode_with_kv_cache(dq, dk, dv)

    ws = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    wrapper = fi.decode.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    indptr = torch.arange(BATCH + 1, dtype=torch.int32) * PAGES_PER_REQ
    indices = torch.arange(BATCH * PAGES_PER_REQ, dtype=torch.int32)
    last = torch.full((BATCH,), PAGE_SIZE, dtype=torch.int32)
    wrapper.plan(indptr, indices, last, Q_HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE, q_data_type=DTYPE)
    cache = randn(BATCH * PAGES_PER_REQ, 2, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    bq = randn(BATCH, Q_HEADS, HEAD_DIM)
    cases["batch_decode_run"] = lambda: wrapper.run(bq, cache)
    return cases


def host_us(
    fn: Callable[[], object], calls: int, sync: Callable[[], None], rounds: int = 5, clock=time.perf_counter
) -> float:
    """Best of ``rounds`` rounds of ``calls`` back-to-back calls, microseconds per call (the sync is outside the
    timing)."""
    for _ in range(50):
        fn()
    times = []
    for _ in range(rounds):
        sync()
        t = clock()
        for _ in range(calls):
            fn()
        times.append((clock() - t) / calls * 1e6)
    sync()
    return min(times)


# ------------------------------------------------------------------------------------------------ stub mode

_NOOP_C = "int flashinfer_host_overhead_noop(void) { return 0; }\n"


def _noop_library():
    """A C function that returns 0 at once (called with any arguments: the x86-64/aarch64 C conventions let the
    callee ignore them), built with the host's C compiler."""
    import ctypes

    d = Path(tempfile.mkdtemp(prefix="fi_host_overhead_"))
    (d / "noop.c").write_text(_NOOP_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(d / "libnoop.so"), str(d / "noop.c")], check=True)
    return ctypes.CDLL(str(d / "libnoop.so"))


def install_stubs() -> None:
    """Patch what needs a GPU (see the module docstring). Call before the first flashinfer op."""
    import ctypes

    from flashinfer.jit import abi

    lib = _noop_library()
    launches = {
        "flashinfer_batch_decode_run",
        "flashinfer_batch_decode_plan",
        "flashinfer_batch_prefill",
        "flashinfer_event_create",
        "flashinfer_event_destroy",
    }
    real_bind = abi.Launcher.bind

    def noop_like(fn):
        stub = lib._FuncPtr(("flashinfer_host_overhead_noop", lib))
        stub.restype, stub.argtypes = fn.restype, fn.argtypes
        return stub

    def bind(self, library):
        bound = real_bind(self, library)
        if self.symbol == "flashinfer_rope_position_error_record":  # (mapped host memory: cudaHostAlloc)
            record = (ctypes.c_int64 * 3)()
            bound.raw = lambda: ctypes.addressof(record)
        elif "stream" in self.names or self.symbol in launches:
            # The same launcher over no-op entry points (the packed one too, where the library has it).
            packed = getattr(bound, "packed", None)
            if packed is not None:
                return type(bound)(self, noop_like(bound.raw), noop_like(packed))
            return type(bound)(self, noop_like(bound.raw))
        return bound

    abi.Launcher.bind = bind
    _shim_dlpack_entries()
    # Every tensor reports cuda:0. Patched on the class rather than a subclass: torch's C++ methods take a slower
    # path (a __torch_function__ lookup) for subclasses, which would inflate every tensor method the ops call.
    cuda0 = torch.device("cuda", 0)
    torch.Tensor.is_cuda = property(lambda self: True)
    torch.Tensor.is_cpu = property(lambda self: False)
    torch.Tensor.device = property(lambda self: cuda0)
    torch.Tensor.get_device = lambda self: 0
    real_empty = torch.empty
    made: Dict[Tuple, torch.Tensor] = {}

    def empty(*args, dtype=None, device=None, pin_memory=False, **kwargs):
        # A tensor made once per (shape, dtype) and handed out again: as cheap as the CUDA caching allocator's
        # hit, and without the CPU allocator's page faults on large blocks.
        key = (args, dtype, tuple(kwargs.items()))
        t = made.get(key)
        if t is None:
            t = made[key] = real_empty(*args, dtype=dtype, **kwargs)
        return t

    class _Props:
        multi_processor_count = 132
        L2_cache_size = 60 << 20

    real_empty_like = torch.empty_like

    def empty_like(t, **kwargs):
        key = (tuple(t.shape), t.dtype, tuple(kwargs.items()))
        out = made.get(key)
        if out is None:
            out = made[key] = real_empty_like(t, **kwargs)
        return out

    torch.empty = empty
    torch.empty_like = empty_like
    torch._C._cuda_getCurrentRawStream = abs  # (a builtin: 0 for device 0, at a builtin call's cost)
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.get_device_properties = lambda device=None: _Props()


def _shim_dlpack_entries() -> None:
    """The "_dlpack" entry points (norm, activation, cos/sin-cache RoPE) over CPU tensors: torch's DLPack table wrapped so that CPU
    tensors read as CUDA tensors (tests/_dlpack_shim.py), each entry's accepted calls reported as launched. The
    entries' own checks still run; the launch fails at its first CUDA call (no GPU) instead of launching. Without
    torch's DLPack table the ops keep their Python path, as they would on a GPU."""
    from flashinfer import activation, norm, rope, utils

    real = utils.dlpack_exchange_api() if hasattr(utils, "dlpack_exchange_api") else 0  # (older revisions: none)
    if not real:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from _dlpack_shim import accepting_entry, shim_api

    table = shim_api(real)
    for mod, loader in ((norm, "_module_for"), (activation, "_module_for"), (rope, "_rope_module")):
        shimmed = set()
        real_loader = getattr(mod, loader)

        def module_for(*args, _real=real_loader, _mod=mod, _shimmed=shimmed):
            m = _real(*args)
            _mod._DLPACK_API[0] = table
            for dtype, entry in _mod._DLPACK.items():
                if dtype in _shimmed:
                    continue
                _shimmed.add(dtype)
                if isinstance(entry, tuple):  # activation: (packed, pack, codes); rope: (packed, pack)
                    _mod._DLPACK[dtype] = (accepting_entry(entry[0]), *entry[1:])
                else:  # norm: _DlpackEntries
                    entry.rmsnorm = accepting_entry(entry.rmsnorm)
                    entry.fused_add = accepting_entry(entry.fused_add)
            return m

        setattr(mod, loader, module_for)


# ------------------------------------------------------------------------------------------------ main


def measure(fi, stub: bool, calls: int, only: Tuple[str, ...]) -> Dict[str, float]:
    if stub:
        cases = make_cases(fi, "cpu")
        sync = lambda: None  # noqa: E731
    else:
        cases = make_cases(fi, "cuda")
        sync = torch.cuda.synchronize
    # Stub mode runs on a shared CPU: this thread's CPU time (not the time it waited for a core), best of more rounds.
    rounds, clock = (60, time.thread_time) if stub else (5, time.perf_counter)
    return {op: host_us(cases[op], calls, sync, rounds, clock) for op in OPS if not only or op in only}


# Instruction counts (stub mode under valgrind's callgrind): deterministic, unlike times on a shared CPU.
_CALLGRIND_C = """#include <valgrind/callgrind.h>
void fi_cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void fi_cg_stop(const char* name) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(name); }
"""


def count_instructions(calls: int, only: Tuple[str, ...]) -> Dict[str, int]:
    """Reruns this script's stub mode under callgrind (instrumenting only the timed loops, through client requests)
    and returns the instructions per call of each op. Needs valgrind and its headers."""
    d = Path(tempfile.mkdtemp(prefix="fi_host_overhead_cg_"))
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={d}/cg.%p",
        sys.executable,
        str(Path(__file__).resolve()),
        "--stub",
        "--callgrind-child",
        "--calls",
        str(calls),
    ] + (["--ops", ",".join(only)] if only else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: Dict[str, int] = {}
    for f in sorted(d.glob("cg.*.*")):
        text = f.read_text(errors="replace")
        op = next((ln.split("Client Request: ", 1)[1] for ln in text.splitlines() if "Client Request: " in ln), None)
        total = next((int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("totals:")), None)
        if op in OPS and total is not None:
            out[op] = total // calls
    return {op: out[op] for op in OPS if op in out}


def _callgrind_child(fi, calls: int, only: Tuple[str, ...]) -> None:
    import ctypes

    d = Path(tempfile.mkdtemp(prefix="fi_host_overhead_cgc_"))
    (d / "cg.c").write_text(_CALLGRIND_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(d / "libcg.so"), str(d / "cg.c")], check=True)
    cg = ctypes.CDLL(str(d / "libcg.so"))
    cases = make_cases(fi, "cpu")
    for op in OPS:
        if only and op not in only:
            continue
        fn = cases[op]
        for _ in range(20):
            fn()
        cg.fi_cg_start()
        for _ in range(calls):
            fn()
        cg.fi_cg_stop(op.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stub", action="store_true", help="no GPU: time the Python path with launches stubbed out")
    ap.add_argument("--no-reference", action="store_true", help="skip the real FlashInfer")
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing round")
    ap.add_argument("--ops", default="", help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--profile", default="", help="stub or GPU mode: cProfile one op (by own time)")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="stub mode under valgrind (callgrind): instructions per call instead of times (needs valgrind)",
    )
    ap.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(REFERENCE_FLAG, dest="reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    only = tuple(filter(None, args.ops.split(",")))
    if args.instructions:
        counts = count_instructions(min(args.calls, 200), only)
        print("instructions per call, stub (Python path only, launches stubbed)")
        for op, n in counts.items():
            print(f"{op:30s} {n:8d}")
        print(json.dumps({"instructions": counts}))
        return

    if args.reference:  # the real FlashInfer only (it is first on PYTHONPATH): one JSON line
        import flashinfer as real_fi  # noqa: F401
        import flashinfer.activation  # noqa: E401, F401
        import flashinfer.decode
        import flashinfer.norm
        import flashinfer.rope

        print(json.dumps(measure(real_fi, False, args.calls, only)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.stub:
        install_stubs()
    import flashinfer as fi

    if args.callgrind_child:
        _callgrind_child(fi, args.calls, only)
        return
    if args.profile:
        import cProfile
        import pstats

        cases = make_cases(fi, "cpu" if args.stub else "cuda")
        fn = cases[args.profile]
        for _ in range(100):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    ours = measure(fi, args.stub, args.calls, only)
    ref: Dict[str, float] = {}
    if not args.stub and not args.no_reference:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import run_reference

        extra = ["--calls", str(args.calls)] + (["--ops", args.ops] if args.ops else [])
        ref = run_reference(str(Path(__file__).resolve()), extra) or {}
    mode = "stub (Python path only, launches stubbed)" if args.stub else torch.cuda.get_device_name()
    print(f"host us per call, {mode}")
    print(f"{'op':30s} {'ours':>8s} {'FlashInfer':>11s} {'FI/ours':>8s}")
    for op, us in ours.items():
        r = ref.get(op)
        ratio = "-" if r is None else f"{r / us:.2f}"
        print(f"{op:30s} {us:8.2f} {'-' if r is None else f'{r:.2f}':>11} {ratio:>8s}")
    print(json.dumps({"ours": ours, "flashinfer": ref, "stub": args.stub}))


if __name__ == "__main__":
    main()

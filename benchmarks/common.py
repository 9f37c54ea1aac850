"""Timing helpers shared by the benchmarks: CUDA-event medians, graph replays, measured ceilings, the RESULTS.md
writer, and the scattered page cache of the paged benchmarks. Nothing here is used by tests (timings never go into
tests)."""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
from pathlib import Path
from typing import Callable, List, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


_L2_FLUSH: dict = {}


def flush_l2() -> None:
    """Evicts the L2 so the next call reads its inputs from HBM: reads a buffer twice the L2's size. Reading (not
    writing) leaves clean lines behind, so no write-back of the flush lands inside the timed call."""
    dev = torch.cuda.current_device()
    buf = _L2_FLUSH.get(dev)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20) or (64 << 20)
        buf = _L2_FLUSH[dev] = (
            torch.zeros(2 * l2 // 4, dtype=torch.int32, device="cuda"),
            torch.empty((), dtype=torch.int64, device="cuda"),
        )
    torch.sum(buf[0], dim=0, out=buf[1])


def median_ms(
    fn: Callable[[int], object], n_inputs: int, warmup: int = 10, iters: int = 100, flush: bool = False
) -> float:
    """Median time of one call, events around each call; fn(i) uses input set i % n_inputs. With
    ``flush=True`` the L2 is evicted before each call (outside the timed region)."""
    for i in range(warmup):
        fn(i % n_inputs)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if flush:
            flush_l2()
        starts[i].record()
        fn(i % n_inputs)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_ms(fn: Callable[[int], object], n_inputs: int, reps: int = 20, calls_per_graph: int = 0) -> float:
    """Device time of one call without host overhead: a CUDA graph of calls over all input sets,
    replayed; median replay time over the number of calls in it."""
    calls = calls_per_graph or max(n_inputs, 10)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i % n_inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n_inputs)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def first_call_times(snippet: str) -> dict:
    """Runs `snippet` (prints one JSON line: its first-call timings) in two fresh processes sharing an empty
    cache: "cold" builds the module, "warm" loads it from the cache."""
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FLASHINFER_JIT_CACHE=cache)
        res = {}
        for what in ("cold", "warm"):
            p = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-2000:])
            res[what] = json.loads(p.stdout.strip().splitlines()[-1])
        return res


REFERENCE_FLAG = "--flashinfer-reference"


def run_reference(script: str, args: Sequence[str] = ()) -> dict | None:
    """Runs ``python <script> --flashinfer-reference <args>`` in its own process with only the real FlashInfer on
    PYTHONPATH (``FI_REF_SITE``, default /tmp/fi_ref_site, unpacked by .bench/install.sh) and returns the JSON
    object it prints last; None (with a note on stderr) when the reference is not installed or fails.

    The script's reference mode must import the real ``flashinfer`` (not this project's) and time the same cases
    with the same helpers from this module."""
    import sys

    env = reference_env()
    if env is None:
        return None
    # Its JIT compiles each module on first use (10-25 s, fa3 and sampling modules 60-120 s): bounded, so that a
    # slow reference leaves our columns filled rather than the whole benchmark killed by the caller's limit.
    limit = float(os.environ.get("FI_REF_TIMEOUT", "900"))
    try:
        p = subprocess.run(
            [sys.executable, script, REFERENCE_FLAG, *args],
            env=env,
            capture_output=True,
            text=True,
            cwd="/tmp",
            timeout=limit,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        partial = _last_json(out)
        print(
            f"[reference] {script} took more than FI_REF_TIMEOUT={limit:.0f} s: "
            f"{f'{len(partial)} cases it had printed kept' if partial else 'reference columns left empty'}; "
            f"its stderr so far:\n{err[-4000:]}",
            file=sys.stderr,
        )
        return partial
    if p.returncode != 0:
        print(f"[reference] {script} failed (exit {p.returncode}):\n{p.stderr[-4000:]}", file=sys.stderr)
        return None
    return _last_json(p.stdout)


def reference_env() -> dict | None:
    """The environment of a ``--flashinfer-reference`` process: only the real FlashInfer (``FI_REF_SITE``, default
    /tmp/fi_ref_site) and the benchmarks folder on PYTHONPATH; None, with a note on stderr, when it is not
    installed."""
    import sys

    site = os.environ.get("FI_REF_SITE", "/tmp/fi_ref_site")
    if not os.path.isdir(os.path.join(site, "flashinfer")):
        print(
            f"[reference] FlashInfer reference not installed at {site}: reference columns left empty", file=sys.stderr
        )
        return None
    bench_dir = str(Path(__file__).resolve().parent)
    return dict(
        os.environ,
        PYTHONPATH=f"{site}:{bench_dir}",
        FLASHINFER_CUDA_ARCH_LIST="9.0",
        FLASHINFER_WORKSPACE_BASE=os.environ.get("FI_REF_WS", "/tmp/fi_ref_ws"),
    )


def _last_json(stdout: str) -> dict | None:
    """The last JSON object line a reference process printed (a script may print its cases cumulatively, so that
    a reference cut by FI_REF_TIMEOUT still fills the columns it reached)."""
    import json

    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def scattered_pages(k: torch.Tensor, v: torch.Tensor, num_reqs: int, page_size: int):
    """A page cache holding num_reqs equal-length requests' keys and values, its pages in random order.

    Parameters
    ----------
    k, v : torch.Tensor
        ``[num_reqs * L, num_kv_heads, head_dim]``, request r at rows ``r * L``, L a multiple of page_size.
    num_reqs, page_size : int

    Returns
    -------
    (cache, page ids, kv_indptr, last_page_len)
        ``cache [num_pages, 2, page_size, num_kv_heads, head_dim]`` (k's dtype and device); int32 CPU tables:
        page ids ``[num_pages]``, ``kv_indptr [num_reqs + 1]``, ``last_page_len [num_reqs]`` (all full pages).
    """
    total, hkv, d = k.shape
    pages_per = total // num_reqs // page_size
    num_pages = num_reqs * pages_per
    assert pages_per * page_size * num_reqs == total, "requests of equal length, a multiple of page_size"
    perm = torch.randperm(num_pages, dtype=torch.int32)
    cache = torch.empty(num_pages, 2, page_size, hkv, d, device=k.device, dtype=k.dtype)
    cache[perm.long(), 0] = k.reshape(num_pages, page_size, hkv, d)
    cache[perm.long(), 1] = v.reshape(num_pages, page_size, hkv, d)
    kv_indptr = torch.arange(0, num_pages + 1, pages_per, dtype=torch.int32)
    return cache, perm, kv_indptr, torch.full((num_reqs,), page_size, dtype=torch.int32)


def copy_bandwidth_tbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), 1, warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def bf16_matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda i: a @ b, 1, warmup=5, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def git_commit() -> str:
    if os.environ.get("FI_COMMIT"):  # the device copy of the tree has no .git: the caller passes it
        return os.environ["FI_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}"


def write_results(title: str, header: Sequence[str], rows: List[Sequence[object]], notes: Sequence[str]) -> str:
    """Appends a dated table to benchmarks/RESULTS.md (and $OUT/RESULTS.md when OUT is set); returns it."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title}", "", f"- date: {now}", f"- device: {device_line()}", f"- commit: {git_commit()}"]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n"
    with open(RESULTS, "a") as f:
        f.write(text)
    out = os.environ.get("OUT")
    if out:
        with open(Path(out) / "RESULTS.md", "a") as f:
            f.write(text)
    return text


FP8_HEADER = [
    "shape",
    "bf16 KV µs (% copy)",
    "e4m3 KV µs (% copy)",
    "tokens/s e4m3 / bf16",
    "target",
    "FlashInfer e4m3 µs",
    "FlashInfer / ours (e4m3)",
    "target",
]


def fp8_row(name: str, r: dict, fi_us: float | None, target: float, fi_target: float) -> list:
    """One row of an fp8-vs-bf16 decode table (FP8_HEADER): our two times (with % of copy bandwidth), the
    tokens/s ratio against ``target``, and FlashInfer's e4m3 time over ours against ``fi_target`` ("-" without
    the reference)."""
    row = [
        name,
        f"{r['us_bf16']:.1f} ({r['pct_bf16']:.0f}%)",
        f"{r['us_e4m3']:.1f} ({r['pct_e4m3']:.0f}%)",
        f"{r['ratio']:.2f}x",
        f"≥{target}x: {'met' if r['ratio'] >= target else 'MISSED'}",
    ]
    if not fi_us:
        return row + ["-", "-", "-"]
    vs = fi_us / r["us_e4m3"]
    return row + [f"{fi_us:.1f}", f"{vs:.2f}x", f"≥{fi_target}x: {'met' if vs >= fi_target else 'MISSED'}"]

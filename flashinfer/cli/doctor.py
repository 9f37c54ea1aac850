"""``demo`` (build, and on a GPU run, check and time one decode module) and ``doctor`` (what the JIT engine
would use here: toolkit, arch flags, cache, versions, environment)."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import jit
from .._families import load_families
from .._version import __version__

# The environment variables that change what the engine does (doctor prints each).
ENV_VARS = (
    "FLASHINFER_JIT_CACHE",
    "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS",
    "FLASHINFER_DISABLE_JIT",
    "FLASHINFER_JIT_RECORD",
    "FLASHINFER_JIT_VERBOSE",
    "FLASHINFER_JIT_LOCK_TIMEOUT",
    "FLASHINFER_NVCC_THREADS",
    "TORCH_CUDA_ARCH_LIST",
    "CUDA_HOME",
    "CUDA_PATH",
    "MAX_JOBS",
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``demo`` and ``doctor`` commands."""
    de = sub.add_parser("demo", help="build the bf16 d128 NHD decode module; with a GPU, run, check and time it")
    de.add_argument("--kv-len", type=int, default=32768)
    de.add_argument("--iters", type=int, default=100)
    de.add_argument("--warmup", type=int, default=10)
    de.set_defaults(func=cmd_demo)
    do = sub.add_parser("doctor", help="print toolkit, arch flags, cache root and versions")
    do.set_defaults(func=cmd_doctor)


def demo_reference(q: Any, k: Any, v: Any, sm_scale: float) -> Any:
    """float32 softmax attention of one query token.

    Parameters
    ----------
    q : torch.Tensor
        ``[num_qo_heads, head_dim]``.
    k, v : torch.Tensor
        ``[kv_len, num_kv_heads, head_dim]`` (NHD); query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    sm_scale : float
        Scale of the logits.

    Returns
    -------
    torch.Tensor
        ``[num_qo_heads, head_dim]``, float32.
    """
    import torch

    hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().view(hkv, g, d)
    s = torch.einsum("kgd,lkd->kgl", qf, k.float()) * sm_scale
    p = torch.softmax(s, dim=-1)
    return torch.einsum("kgl,lkd->kgd", p, v.float()).reshape(hq, d)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the bf16 d128 NHD single-decode module; with a GPU, check it against float32 and time it."""
    import torch

    families = load_families()
    spec = families["decode_single"](
        head_dim=128,
        dtype_q="bf16",
        dtype_kv="bf16",
        dtype_o="bf16",
        kv_layout="NHD",
        pos_encoding_mode="NONE",
        use_window=False,
        use_logits_soft_cap=False,
    )
    print(f"module: {spec.name()}")
    print(f"cache:  {jit.cache_root()}")
    t0 = time.perf_counter()
    try:
        rep = jit.ensure_built(spec)
    except Exception as e:
        print(f"build failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if rep.status == "cached":
        print(f"build:  cached ({rep.key}, checked in {time.perf_counter() - t0:.2f}s)")
    else:
        print(f"build:  compiled in {rep.seconds:.1f}s ({rep.key})")

    if not torch.cuda.is_available():
        print(
            "No CUDA GPU found (torch.cuda.is_available() is False): the module is built and cached, "
            "but the kernel could not be run here."
        )
        return 0

    from ..decode import single_decode_with_kv_cache

    hq, hkv, d, kv_len = 32, 8, 128, args.kv_len
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(kv_len, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(kv_len, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    sm_scale = 1.0 / d**0.5
    o = single_decode_with_kv_cache(q, k, v, kv_layout="NHD")
    ref = demo_reference(q, k, v, sm_scale)
    err = (o.float() - ref).abs().max().item()
    tol = 1e-2 + 1e-2 * ref.abs().max().item()
    verdict = "OK" if err <= tol else "MISMATCH"
    print(f"device: {torch.cuda.get_device_name(dev)}")
    print(f"shape:  q [{hq}, {d}], k/v [{kv_len}, {hkv}, {d}] bf16 NHD")
    print(f"check:  max |out - fp32 reference| = {err:.3e} (tolerance {tol:.1e}) -> {verdict}")

    for _ in range(args.warmup):
        single_decode_with_kv_cache(q, k, v, kv_layout="NHD", out=o)
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        single_decode_with_kv_cache(q, k, v, kv_layout="NHD", out=o)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    nbytes = sum(x.numel() * x.element_size() for x in (q, k, v, o))
    print(f"time:   {t * 1e6:.1f} us (median of {args.iters}, CUDA events)")
    print(f"bw:     {nbytes / t / 1e12:.2f} TB/s ({nbytes / 2**20:.1f} MiB of q, k, v, o)")
    return 0 if err <= tol else 1


def _line(label: str, value: object) -> None:
    print(f"{label:<22} {value}")


def _print_torch() -> None:
    try:
        import torch

        _line("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = ", ".join(
            f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
            for i in range(n)
        )
        _line("GPUs", gpus or "none visible (torch.cuda.is_available() is False)")
    except Exception as e:  # doctor reports a broken torch instead of dying on it
        _line("torch", f"import failed: {e}")


def _print_toolkit() -> bool:
    try:
        home = jit.find_cuda_home()
    except Exception as e:
        _line("CUDA toolkit", f"NOT FOUND: {e}")
        return False
    _line("CUDA toolkit", str(home))
    nvcc = Path(home) / "bin" / "nvcc"
    try:
        outp = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
        rel = re.search(r"release ([\d.]+), (V[\w.]+)", outp)
        _line("nvcc", f"{nvcc} ({rel.group(1)}, {rel.group(2)})" if rel else str(nvcc))
    except Exception as e:
        _line("nvcc", f"{nvcc}: {e}")
    return True


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print what the engine would use; exit 1 when something it needs is missing."""
    package_dir = Path(__file__).resolve().parents[1]
    _line("flashinfer", f"{__version__} ({package_dir})")
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _print_torch()
    ok = _print_toolkit()
    try:
        families = load_families()
    except Exception as e:  # a broken family: say which, and fail
        _line("spec families", f"ERROR: {type(e).__name__}: {e}")
        families, ok = {}, False
    else:
        _line("spec families", ", ".join(f"{f} ({len(c.expand())})" for f, c in sorted(families.items())) or "(none)")
    sample = next((families[f].expand()[0] for f in ("decode_single", "probe") if f in families), None)
    if sample is not None:
        try:
            _line("arch flags", " ".join(jit.arch_flags(sample)))
        except Exception as e:
            _line("arch flags", f"error: {e}")
    _line("templates", str(jit.templates_dir()))
    _line("cache root", str(jit.cache_root()))
    try:
        entries = list(jit.list_entries())
        _line("cache entries", f"{len(entries)} ({sum(1 for e in entries if not e.valid)} invalid)")
    except Exception as e:
        _line("cache entries", f"error: {e}")
    for var in ENV_VARS:
        _line(var, os.environ.get(var, "(unset)"))
    return 0 if ok else 1

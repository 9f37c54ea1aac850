"""Environment of the JIT engine: where things are, which toolkit, which archs, which versions.

Everything here that the warm path (loading an already built module) needs is cheap: environment
variables, ``stat`` calls and small file reads, memoized per process. Subprocesses (``nvcc --dryrun``)
are only a last resort for resolving a wrapper script that is not a plain ``exec`` line.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import CUDAToolkitNotFoundError, JITCacheError

# Bump when the build recipe changes in a way that changes binaries (flags, link mode, layout of an
# entry, manifest format). Part of every cache key.
#   1: nvcc compile + nvcc link run by the engine itself
#   2: torch.utils.cpp_extension.load (ninja; torch's nvcc defaults, c++ link with --as-needed)
RECIPE_VERSION = "2"

# nvcc flags we pass to every module (torch.utils.cpp_extension.load's extra_cuda_cflags; part of the
# cache key together with the arch flags and the spec's own extra_cuda_cflags()). No --use_fast_math:
# specs that want it say so in extra_cuda_cflags().
#
# torch puts its own flags in front of these: -DTORCH_EXTENSION_NAME=..., -isystem <torch/python/cuda
# includes> (unused: the kernel sources include no torch header), --compiler-options '-fPIC',
# --expt-relaxed-constexpr and -D__CUDA_NO_HALF_OPERATORS__ / _HALF_CONVERSIONS__ /
# _BFLOAT16_CONVERSIONS__ / _HALF2_OPERATORS__. The -U flags below undo the last four, so the kernels
# see cuda_fp16.h / cuda_bf16.h with their operators and conversions, as nvcc's defaults have them.
# Because our flags contain -gencode, torch adds no arch flags of its own
# (cpp_extension._get_cuda_arch_flags returns [] when a flag mentions 'arch'); and since they contain
# -std=c++17, torch adds no -std either.
BASE_NVCC_FLAGS: Tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "--resource-usage",
    "--expt-relaxed-constexpr",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
)
# Link flags we pass (extra_ldflags). torch links with $CXX (default c++) as
#   c++ <objs> -shared <ours> -L<torch/lib> -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch
#       -ltorch_python -L<cuda>/lib64 -lcudart -o <name>.so
# --as-needed (ours come first) drops every torch library, since the kernels reference none of their
# symbols: the module depends on libcudart.so.N (and libstdc++/libc) only, like a plain nvcc
# -cudart=shared link, loads with ctypes.CDLL without torch, and in a torch process reuses the
# libcudart.so.N torch already loaded (matched by soname). The build adds -rpath <cuda>/lib64.
BASE_LINK_FLAGS: Tuple[str, ...] = ("-Wl,--as-needed",)

DEFAULT_ARCH = "9.0"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")

_TRUTHY = {"1", "true", "yes", "on"}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


# --------------------------------------------------------------------------------------------------
# Package layout: source checkout or installed package
# --------------------------------------------------------------------------------------------------


def package_dir() -> Path:
    """The ``flashinfer`` package directory."""
    return Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def checkout_root() -> Optional[Path]:
    """Repo root when running from a source checkout (pyproject.toml + templates/ beside flashinfer/)."""
    root = package_dir().parent
    if (root / "pyproject.toml").is_file() and (root / "templates").is_dir():
        return root
    return None


@functools.lru_cache(maxsize=None)
def templates_dir() -> Path:
    """``<repo>/templates`` in a checkout, else the installed package data dir ``flashinfer/_templates``."""
    root = checkout_root()
    if root is not None:
        return root / "templates"
    installed = package_dir() / "_templates"
    if installed.is_dir():
        return installed
    fallback = package_dir().parent / "templates"  # checkout without pyproject.toml
    if fallback.is_dir():
        return fallback
    return installed


def include_dir() -> Path:
    """The include path of every module (``templates/include``)."""
    return templates_dir() / "include"


# --------------------------------------------------------------------------------------------------
# Cache root
# --------------------------------------------------------------------------------------------------

_FIX_HINT = (
    "Set FLASHINFER_JIT_CACHE to a writable directory, e.g. "
    "`export FLASHINFER_JIT_CACHE=$HOME/.cache/flashinfer/jit`."
)


def cache_root_path() -> Path:
    """Where the cache lives, without creating or checking anything (warm path)."""
    env = os.environ.get("FLASHINFER_JIT_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    root = checkout_root()
    if root is not None:
        return root / "jit_cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "flashinfer" / "jit").absolute()


def _root_source() -> str:
    if os.environ.get("FLASHINFER_JIT_CACHE"):
        return "from FLASHINFER_JIT_CACHE"
    if checkout_root() is not None:
        return "the source checkout's jit_cache/"
    return "the default user cache dir"


def ensure_dir(path: Path, what: str = "JIT cache directory") -> Path:
    """Create ``path`` (mode 0700 for new dirs) and check it is a writable directory, else JITCacheError."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise JITCacheError(
            f"cannot create {what} {path} ({_root_source()}): {e.strerror or e}. {_FIX_HINT}"
        ) from e
    if not path.is_dir():
        raise JITCacheError(f"{what} {path} is not a directory. {_FIX_HINT}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise JITCacheError(f"{what} {path} ({_root_source()}) is not writable. {_FIX_HINT}")
    return path


def cache_root() -> Path:
    """The cache root (created with mode 0700); JITCacheError when it cannot be created or written."""
    return ensure_dir(cache_root_path())


# --------------------------------------------------------------------------------------------------
# CUDA toolkit
# --------------------------------------------------------------------------------------------------


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda.h").is_file()


def _nvcc_wrapper_target(nvcc: Path) -> Optional[Path]:
    """If ``nvcc`` is a small shell script that execs another nvcc, return that nvcc (cheap read)."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for m in re.finditer(rb"(/[^\s\"';|&]*?/bin/nvcc)\b", head):
        cand = Path(m.group(1).decode(errors="replace"))
        if cand.resolve() != nvcc.resolve() and cand.is_file():
            return cand
    return None


def _nvcc_dryrun_top(nvcc: str) -> Optional[Path]:
    """Ask nvcc where it lives (``#$ TOP=...`` of ``nvcc -v --dryrun``). A subprocess: last resort."""
    try:
        out = subprocess.run(
            [nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"#\$\s*TOP=(.*)$", line.strip())
        if m:
            return Path(m.group(1).strip()).resolve()
    return None


_cuda_home_memo: Dict[Tuple[Optional[str], Optional[str], Optional[str]], Path] = {}


def find_cuda_home() -> Path:
    """Locate the CUDA toolkit: CUDA_HOME / CUDA_PATH, nvcc on PATH (wrapper scripts resolved),
    then /usr/local/cuda. Sets ``os.environ["CUDA_HOME"]`` (and torch's cpp_extension.CUDA_HOME if that
    module is imported) to the result. Raises CUDAToolkitNotFoundError listing what was tried."""
    memo_key = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), os.environ.get("PATH"))
    home = _cuda_home_memo.get(memo_key)
    if home is None:
        home = _find_cuda_home_uncached()
        _cuda_home_memo[memo_key] = home
        # The memo key includes CUDA_HOME, which we are about to set: remember under that too.
        _cuda_home_memo[(str(home), memo_key[1], memo_key[2])] = home
    _export_cuda_home(home)
    return home


def _find_cuda_home_uncached() -> Path:
    tried: List[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val:
            p = Path(val).expanduser()
            if _is_toolkit(p):
                return p
            tried.append(f"${var}={val} (no bin/nvcc + include/cuda.h there)")
        else:
            tried.append(f"${var} (not set)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        if _is_toolkit(real.parent.parent):
            return real.parent.parent
        target = _nvcc_wrapper_target(real)
        if target is not None and _is_toolkit(target.resolve().parent.parent):
            return target.resolve().parent.parent
        top = _nvcc_dryrun_top(nvcc)
        if top is not None:
            for cand in (top, top.parent):
                if _is_toolkit(cand):
                    return cand
        tried.append(f"nvcc on PATH ({nvcc}; could not find its toolkit dir)")
    else:
        tried.append("nvcc on PATH (not found)")
    default = DEFAULT_CUDA_HOME
    if _is_toolkit(default):
        return default
    tried.append(f"{default} (no bin/nvcc + include/cuda.h there)")
    raise CUDAToolkitNotFoundError(
        "CUDA toolkit not found; looked at: "
        + "; ".join(tried)
        + ". Install the CUDA toolkit (nvcc and headers) or set CUDA_HOME to its root."
    )


def _export_cuda_home(home: Path) -> None:
    if os.environ.get("CUDA_HOME") != str(home):
        os.environ["CUDA_HOME"] = str(home)
    import sys

    ext = sys.modules.get("torch.utils.cpp_extension")
    if ext is not None and getattr(ext, "CUDA_HOME", None) != str(home):
        try:
            ext.CUDA_HOME = str(home)
        except Exception:  # pragma: no cover
            pass


@functools.lru_cache(maxsize=None)
def _cuda_version_of(home: str) -> int:
    try:
        with open(os.path.join(home, "include", "cuda.h"), "rb") as f:
            text = f.read()
    except OSError:
        return 0
    m = re.search(rb"^\s*#define\s+CUDA_VERSION\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def cuda_toolkit_version() -> int:
    """CUDA_VERSION of the toolkit's cuda.h (e.g. 13000), 0 if unreadable."""
    return _cuda_version_of(str(find_cuda_home()))


def nvcc_path() -> Path:
    return find_cuda_home() / "bin" / "nvcc"


def cuda_lib_dir() -> Path:
    home = find_cuda_home()
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub).is_dir():
            return home / sub
    return home / "lib64"


# --------------------------------------------------------------------------------------------------
# Target architectures
# --------------------------------------------------------------------------------------------------

_NAMED_ARCHS = {
    "turing": ["7.5"],
    "ampere": ["8.0", "8.6"],
    "ada": ["8.9"],
    "hopper": ["9.0"],
    "blackwell": ["10.0"],
}

_ARCH_RE = re.compile(r"^(\d+)\.(\d+)([af]?)(\+ptx)?$", re.I)


def _parse_arch_list(text: str) -> List[Tuple[str, bool]]:
    """'9.0;8.0+PTX' -> [('90', False), ('80', True)] (cc string incl. suffix, with-PTX)."""
    out: List[Tuple[str, bool]] = []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        if tok.lower() in _NAMED_ARCHS:
            out.extend((a.replace(".", ""), False) for a in _NAMED_ARCHS[tok.lower()])
            continue
        m = _ARCH_RE.match(tok)
        if not m:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST: cannot parse {tok!r} (expected e.g. '9.0', '8.0+PTX', '9.0a')"
            )
        out.append((f"{m.group(1)}{m.group(2)}{m.group(3).lower()}", bool(m.group(4))))
    return out


@functools.lru_cache(maxsize=None)
def _visible_device_archs() -> Tuple[str, ...]:
    """Capabilities of visible CUDA devices (memoized; torch's device query, no subprocess)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return ()
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(f"{a}.{b}" for a, b in sorted(caps))
    except Exception:
        return ()


def target_archs() -> List[Tuple[str, bool]]:
    """[(cc, with_ptx)] from TORCH_CUDA_ARCH_LIST, else visible devices, else 9.0."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        archs = _parse_arch_list(env)
        if archs:
            return archs
    devs = _visible_device_archs()
    if devs:
        return _parse_arch_list(";".join(devs))
    return _parse_arch_list(DEFAULT_ARCH)


def arch_flags(spec=None) -> List[str]:
    """nvcc -gencode flags for ``spec``: sm_90 -> sm_90a for specs with needs_sm90a()."""
    archs = target_archs()
    if spec is not None and spec.needs_sm90a():
        archs90 = [(("90a" if cc.startswith("90") else cc), ptx) for cc, ptx in archs if cc.startswith("90")]
        if not archs90:
            raise ValueError(
                f"{spec.name()} needs sm_90a (Hopper) but the target archs are "
                f"{[cc for cc, _ in archs]} (TORCH_CUDA_ARCH_LIST or visible devices)"
            )
        archs = archs90
    flags: List[str] = []
    seen = set()
    for cc, ptx in archs:
        codes = [f"sm_{cc}"] + ([f"compute_{cc}"] if ptx else [])
        flag = f"-gencode=arch=compute_{cc},code=[{','.join(codes)}]" if ptx else f"-gencode=arch=compute_{cc},code=sm_{cc}"
        if flag not in seen:
            seen.add(flag)
            flags.append(flag)
    return flags


# --------------------------------------------------------------------------------------------------
# Versions and build settings
# --------------------------------------------------------------------------------------------------


def flashinfer_version() -> str:
    from .._version import __version__

    return __version__


def versions() -> Dict[str, object]:
    """Versions that go into every cache key (cheap: no subprocesses)."""
    import torch

    return {
        "recipe": RECIPE_VERSION,
        "flashinfer": flashinfer_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_toolkit": cuda_toolkit_version(),
    }


def host_compiler() -> Optional[str]:
    """CC when set: torch's cpp_extension passes it to nvcc as ``-ccbin`` (part of the key)."""
    return os.environ.get("CC") or None


def cxx_compiler() -> str:
    """The compiler torch's cpp_extension links with: CXX, else ``c++`` (part of the key)."""
    return os.environ.get("CXX") or "c++"


def max_jobs() -> Optional[int]:
    v = os.environ.get("MAX_JOBS", "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


def nvcc_threads() -> Optional[int]:
    v = os.environ.get("FLASHINFER_NVCC_THREADS", "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


def lock_timeout() -> float:
    v = os.environ.get("FLASHINFER_JIT_LOCK_TIMEOUT", "").strip()
    try:
        return float(v) if v else 600.0
    except ValueError:
        return 600.0


def jit_disabled() -> bool:
    return env_flag("FLASHINFER_DISABLE_JIT")


def jit_verbose() -> bool:
    return env_flag("FLASHINFER_JIT_VERBOSE")


def nvcc_flags(spec) -> List[str]:
    """The nvcc flags the build passes to torch.utils.cpp_extension.load (extra_cuda_cflags)."""
    return list(BASE_NVCC_FLAGS) + arch_flags(spec) + list(spec.extra_cuda_cflags())


def compile_flags(spec) -> List[str]:
    """All nvcc compile flags of ``spec`` that we choose, except paths and speed-only knobs (the part in
    the key): ``-ccbin $CC`` (added by torch when CC is set) + :func:`nvcc_flags`."""
    flags = nvcc_flags(spec)
    cc = host_compiler()
    if cc:
        flags = ["-ccbin", cc] + flags
    return flags


def link_flags(spec) -> List[str]:
    """Link flags we pass (extra_ldflags), without the rpath (a path)."""
    return list(BASE_LINK_FLAGS)


def describe_flags(spec) -> Dict[str, Sequence[str]]:
    return {"nvcc": compile_flags(spec), "link": link_flags(spec), "cxx": [cxx_compiler()]}

"""Environment of the JIT engine: where things are, which toolkit, which archs, which versions.

Everything here that the warm path (loading an already built module) needs is cheap: environment
variables, ``stat`` calls and small file reads, memoized per process. Subprocesses (``nvcc --dryrun``)
are only a last resort for resolving a wrapper script that is not a plain ``exec`` line.

Every ``FLASHINFER_*`` variable the engine reads is parsed here, strictly: a value that is not one of
the accepted forms raises :class:`JITEnvironmentError` naming the variable, its value and what is
accepted (an unset or empty variable means its default). Nothing here writes ``os.environ``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import errno
import math

from .errors import CUDAToolkitNotFoundError, JITCacheError, JITEnvironmentError

# Bump when the build recipe changes in a way that changes binaries (flags, link mode, layout of an
# entry, manifest format). Part of every cache key.
#   1: nvcc compile + nvcc link run by the engine itself
#   2: torch.utils.cpp_extension.load (ninja; torch's nvcc defaults, c++ link with --as-needed)
#   3: manifests record the toolkit-free selector (entries load on hosts without a CUDA toolkit)
RECIPE_VERSION = "3"

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


# --------------------------------------------------------------------------------------------------
# Strict parsing of environment variables
# --------------------------------------------------------------------------------------------------

_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
_BOOL_ACCEPTED = "1/true/yes/on or 0/false/no/off (any case), or unset"


def _env_text(name: str) -> Optional[str]:
    """The stripped value of ``name``; None when unset or empty (both mean: the default)."""
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    return v.strip()


def _bad_env(name: str, value: str, accepted: str) -> JITEnvironmentError:
    return JITEnvironmentError(f"{name}={value!r} is not accepted: expected {accepted}")


def env_bool(name: str, default: bool = False) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off, case-insensitive; anything else is an error."""
    v = _env_text(name)
    if v is None:
        return default
    low = v.lower()
    if low in _TRUE_WORDS:
        return True
    if low in _FALSE_WORDS:
        return False
    raise _bad_env(name, v, _BOOL_ACCEPTED)


def env_seconds(name: str, default: float) -> float:
    """A finite, non-negative number of seconds (``inf``, ``nan``, negatives and words are errors)."""
    v = _env_text(name)
    if v is None:
        return default
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not math.isfinite(x) or x < 0:
        raise _bad_env(name, v, f"a finite number of seconds >= 0, e.g. 600 or 2.5 (unset: {default:g})")
    return x


def env_int(name: str, default: Optional[int], minimum: int = 0) -> Optional[int]:
    """A decimal integer >= ``minimum``."""
    v = _env_text(name)
    if v is None:
        return default
    if not re.fullmatch(r"[+]?\d+", v) or int(v) < minimum:
        raise _bad_env(name, v, f"an integer >= {minimum}")
    return int(v)


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> Optional[int]:
    """``"4096"``, ``"512M"``, ``"16GiB"``, ``"1g"`` -> bytes (binary units); None when malformed or < 1."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.I)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        return None
    n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    return n if n >= 1 else None


def env_bytes(name: str, default: int) -> int:
    """A positive size in bytes, optionally with a binary unit: 1048576, 512K, 256M, 16G, 1T (KiB.. also)."""
    v = _env_text(name)
    if v is None:
        return default
    n = parse_bytes(v)
    if n is None:
        raise _bad_env(name, v, "a positive size in bytes, optionally with a unit K/M/G/T (powers of 1024), e.g. 256M")
    return n


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
    """Where the cache lives (FLASHINFER_JIT_CACHE, else the checkout's jit_cache/, else the user cache
    dir), without creating or checking anything (warm path)."""
    env = _env_text("FLASHINFER_JIT_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    root = checkout_root()
    if root is not None:
        return root / "jit_cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "flashinfer" / "jit").absolute()


def _root_source() -> str:
    if _env_text("FLASHINFER_JIT_CACHE"):
        return "from FLASHINFER_JIT_CACHE"
    if checkout_root() is not None:
        return "the source checkout's jit_cache/"
    return "the default user cache dir"


def shared_cache() -> bool:
    """FLASHINFER_JIT_CACHE_SHARED: build and import entries readable by every user (dirs 0755, files
    0644, libraries 0755) instead of private ones (the default; never group/other-writable either way)."""
    return env_bool("FLASHINFER_JIT_CACHE_SHARED")


def _owner_desc(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def why_not_writable(path: Path, err: Optional[OSError] = None) -> str:
    """Why this process cannot write to ``path``: "read-only file system", "permission denied (owned by
    X, mode M; this process runs as Y)", "no space left on device", or the error's own text."""
    code = err.errno if err is not None else None
    if code == errno.EROFS:
        return "read-only file system"
    if code == errno.ENOSPC:
        return "no space left on device"
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    if code in (None, errno.EACCES, errno.EPERM):
        try:
            st = os.stat(probe)
            return (f"permission denied ({probe} is owned by {_owner_desc(st.st_uid)}, mode "
                    f"{st.st_mode & 0o7777:04o}; this process runs as {_owner_desc(os.geteuid())})")
        except OSError:
            return "permission denied"
    return (err.strerror or str(err)).lower() if err is not None else "not writable"


def ensure_dir(path: Path, what: str = "JIT cache directory", shared: bool = False, writable: bool = True) -> Path:
    """Create ``path`` if missing (mode 0700; 0755 when ``shared``) and check it is a directory, and,
    with ``writable``, that this process can write to it. JITCacheError (saying "permission denied" or
    "read-only file system" when that is the cause) otherwise. Never needs write access when
    ``writable`` is False and the directory exists: read-only commands work on read-only caches."""
    if os.path.lexists(path) and not path.is_dir():
        raise JITCacheError(f"{what} {path} ({_root_source()}) is not a directory. {_FIX_HINT}")
    if not path.is_dir():
        try:
            path.mkdir(mode=0o755 if shared else 0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise JITCacheError(
                f"cannot create {what} {path} ({_root_source()}): {why_not_writable(path, e)}. {_FIX_HINT}"
            ) from e
        if not path.is_dir():
            raise JITCacheError(f"{what} {path} is not a directory. {_FIX_HINT}")
    if shared:
        make_shared_dir(path)
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise JITCacheError(
            f"cannot write to {what} {path} ({_root_source()}): {why_not_writable(path)}. "
            f"Reading cached modules works without write access; building or importing needs it. {_FIX_HINT}"
        )
    return path


def make_shared_dir(path: Path) -> None:
    """Give others read+search access to a directory this process owns (and never write access)."""
    try:
        st = os.lstat(path)
        if st.st_uid == os.geteuid():
            mode = (st.st_mode & 0o7777 | 0o755) & ~0o022
            if mode != st.st_mode & 0o7777:
                os.chmod(path, mode)
    except OSError:
        pass


def cache_root(shared: Optional[bool] = None) -> Path:
    """The cache root, created (mode 0700, or 0755 for a shared cache) when missing. Does not require
    write access (reading a read-only cache works); JITCacheError when it cannot be created or is not a
    directory. ``shared`` defaults to FLASHINFER_JIT_CACHE_SHARED."""
    return ensure_dir(cache_root_path(), shared=shared_cache() if shared is None else shared, writable=False)


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
    """Locate the CUDA toolkit: $CUDA_HOME (else $CUDA_PATH) when set, strictly: it must hold bin/nvcc
    and include/cuda.h, else CUDAToolkitNotFoundError naming it (never a silent fallback to another
    toolkit). When neither is set: nvcc on PATH (wrapper scripts resolved), then /usr/local/cuda.
    Memoized per (CUDA_HOME, CUDA_PATH, PATH). Never writes ``os.environ``: a build hands the toolkit to
    torch's cpp_extension itself (``build._cpp_extension``)."""
    memo_key = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), os.environ.get("PATH"))
    home = _cuda_home_memo.get(memo_key)
    if home is None:
        home = _find_cuda_home_uncached()
        _cuda_home_memo[memo_key] = home
    return home


def _missing_toolkit_parts(home: Path) -> List[str]:
    return [part for part in ("bin/nvcc", "include/cuda.h") if not (home / part).is_file()]


def _find_cuda_home_uncached() -> Path:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = _env_text(var)
        if val is None:
            continue
        p = Path(val).expanduser()
        if _is_toolkit(p):
            return p
        what = "does not exist" if not p.exists() else f"has no {' and no '.join(_missing_toolkit_parts(p))}"
        raise CUDAToolkitNotFoundError(
            f"{var}={val!r} is not a CUDA toolkit: {p} {what}. Point {var} at the toolkit's root (the "
            f"directory holding bin/nvcc and include/cuda.h), or unset it to use nvcc on PATH or "
            f"{DEFAULT_CUDA_HOME}. (Loading modules that are already in the cache needs no toolkit.)"
        )
    tried: List[str] = ["$CUDA_HOME and $CUDA_PATH (not set)"]
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
            raise JITEnvironmentError(
                f"TORCH_CUDA_ARCH_LIST={text!r}: cannot parse {tok!r}; expected a list of compute "
                f"capabilities like '9.0', '8.0+PTX', '9.0a' or a name ({', '.join(_NAMED_ARCHS)}), "
                f"separated by ';', ',' or spaces"
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


def versions(toolkit: bool = True) -> Dict[str, object]:
    """Versions that go into every cache key (cheap: no subprocesses). ``toolkit=False`` leaves out the
    CUDA toolkit's version (the one thing that needs a toolkit): the versions an entry is selected by on
    a host without one."""
    import torch

    out: Dict[str, object] = {
        "recipe": RECIPE_VERSION,
        "flashinfer": flashinfer_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    if toolkit:
        out["cuda_toolkit"] = cuda_toolkit_version()
    return out


def host_compiler() -> Optional[str]:
    """CC when set: torch's cpp_extension passes it to nvcc as ``-ccbin`` (part of the key)."""
    return os.environ.get("CC") or None


def cxx_compiler() -> str:
    """The compiler torch's cpp_extension links with: CXX, else ``c++`` (part of the key)."""
    return os.environ.get("CXX") or "c++"


def max_jobs() -> Optional[int]:
    """MAX_JOBS (read by torch's cpp_extension itself; parsed here only to report it)."""
    return env_int("MAX_JOBS", None, minimum=1)


def nvcc_threads() -> Optional[int]:
    """FLASHINFER_NVCC_THREADS: nvcc ``--threads N`` (an integer >= 0; 0 or unset: not passed)."""
    return env_int("FLASHINFER_NVCC_THREADS", None, minimum=0) or None


DEFAULT_LOCK_TIMEOUT_S = 600.0


def lock_timeout() -> float:
    """FLASHINFER_JIT_LOCK_TIMEOUT: seconds to wait for another process's build of a key (finite, >= 0;
    0 = do not wait; default 600)."""
    return env_seconds("FLASHINFER_JIT_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S)


def jit_disabled() -> bool:
    """FLASHINFER_DISABLE_JIT: never compile; load only what the cache holds (selected without the toolkit)."""
    return env_bool("FLASHINFER_DISABLE_JIT")


def jit_verbose() -> bool:
    """FLASHINFER_JIT_VERBOSE: copy each build's compiler output to stderr."""
    return env_bool("FLASHINFER_JIT_VERBOSE")


def record_path() -> Optional[str]:
    """FLASHINFER_JIT_RECORD: a file to append the spec of every loaded module to (None: off)."""
    return _env_text("FLASHINFER_JIT_RECORD")


TRUSTED_OWNERS_ENV = "FLASHINFER_JIT_CACHE_TRUSTED_OWNERS"
_trusted_memo: Dict[str, frozenset] = {}


def trusted_owner_uids() -> frozenset:
    """FLASHINFER_JIT_CACHE_TRUSTED_OWNERS: uids named by user name or number (comma or semicolon list).
    An unknown name or a malformed token is an error (fail closed: never trust by accident)."""
    text = os.environ.get(TRUSTED_OWNERS_ENV, "")
    got = _trusted_memo.get(text)
    if got is not None:
        return got
    uids = set()
    for tok in text.replace(";", ",").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.isdigit():
            uids.add(int(tok))
            continue
        try:
            import pwd

            uids.add(pwd.getpwnam(tok).pw_uid)
        except (KeyError, ImportError):
            raise _bad_env(TRUSTED_OWNERS_ENV, text, f"a comma list of user names or numeric uids; "
                                                     f"unknown user {tok!r}") from None
    out = frozenset(uids)
    _trusted_memo[text] = out
    return out


# Archive import caps (see archive.py): a member larger than the per-file cap, or an archive whose files
# add up to more than the total cap, is refused before anything is written.
DEFAULT_IMPORT_MAX_FILE_BYTES = 256 << 20
DEFAULT_IMPORT_MAX_TOTAL_BYTES = 16 << 30


def import_max_file_bytes() -> int:
    """FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES: largest file `cache import` accepts (default 256 MiB)."""
    return env_bytes("FLASHINFER_JIT_IMPORT_MAX_FILE_BYTES", DEFAULT_IMPORT_MAX_FILE_BYTES)


def import_max_total_bytes() -> int:
    """FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES: largest total of an archive's files (default 16 GiB)."""
    return env_bytes("FLASHINFER_JIT_IMPORT_MAX_TOTAL_BYTES", DEFAULT_IMPORT_MAX_TOTAL_BYTES)


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

"""Loading modules: in-process memo -> valid on-disk entry -> build under the key's file lock.

The entry is found by its key when this host can compute one (the key includes the CUDA toolkit's
version). With FLASHINFER_DISABLE_JIT, or when no toolkit is found, it is selected without the toolkit
(:func:`cache.select_entry`: the manifest's toolkit-free selector), so a prewarmed or imported cache
loads on a host with only the driver and torch. The library is loaded through the descriptor it was
verified on (``/proc/self/fd/N``); that descriptor stays open for the life of the process, because
glibc remembers a loaded library by the path it was opened with and would hand the old library back for
a later ``dlopen`` of the same ``/proc/self/fd/N`` string (one descriptor per loaded module).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import cache, env
from .abi import COMMON_LAUNCHERS, CONSTANTS, ERROR_STRING, BoundLauncher, read_constants
from .build import BuildReport, build_into
from .errors import CUDAToolkitNotFoundError, JITCacheError, JITDisabledError
from .locks import file_lock, thread_lock

_memo: Dict[Any, JITModule] = {}
_memo_lock = threading.Lock()
_lib_fds: List[int] = []  # descriptors of loaded libraries: kept open (see the module docstring)


def _prewarm_hint(spec) -> str:
    parts = ["python -m flashinfer prewarm", f"--families {spec.family}"]
    for k, v in spec.to_json().items():
        if k == "family":
            continue
        parts.append(f"--axis {k}={('on' if v else 'off') if isinstance(v, bool) else v}")
    return f"build it ahead of time into this cache with `{' '.join(parts)}`, or unset FLASHINFER_DISABLE_JIT"


def _check_supported(spec) -> None:
    reason = spec.unsupported_reason()
    if reason:
        raise ValueError(f"{spec.name()} is not supported: {reason}")


def _ensure(spec, shared: Optional[bool] = None) -> Tuple[BuildReport, cache.VerifiedEntry]:
    """The verified entry of ``spec`` (open: the caller closes it) and how it was obtained.

    With a toolkit: double-checked by key (valid entry? else lock, look again, build). With
    FLASHINFER_DISABLE_JIT or without a toolkit: selected by the toolkit-free selector, never built."""
    root = env.cache_root_path()
    disabled = env.jit_disabled()
    key = None
    no_toolkit: Optional[CUDAToolkitNotFoundError] = None
    if not disabled:
        try:
            key = cache.cache_key(spec)
        except CUDAToolkitNotFoundError as e:
            no_toolkit = e
    if key is None:
        ent, reason = cache.select_entry(spec, root, raise_insecure=True)
        if ent is not None:
            return _cached_report(spec, ent.key, root, ent.manifest), ent
        if disabled:
            raise JITDisabledError(  # the hint first: its command is the first `...` of the message
                f"FLASHINFER_DISABLE_JIT is set and {spec.name()} is not usable from the JIT cache {root}: "
                f"{_prewarm_hint(spec)}. In the cache: {reason}."
            )
        raise CUDAToolkitNotFoundError(
            f"{spec.name()} is not in the JIT cache {root} ({reason}), and building it needs a CUDA toolkit: "
            f"{no_toolkit}",
            spec_name=spec.name(),
        ) from no_toolkit
    ent, man, reason = cache.open_entry(key, root, raise_insecure=True)
    if ent is not None:
        return _cached_report(spec, key, root, man), ent
    _check_supported(spec)
    shared = env.shared_cache() if shared is None else shared
    try:
        env.ensure_dir(root, shared=shared)
    except JITCacheError as e:
        raise JITCacheError(
            f"{spec.name()} (key {key}) is not usable from the JIT cache ({reason}) and cannot be built there: {e}"
        ) from e
    with file_lock(key, root):
        ent, man, reason = cache.open_entry(key, root, raise_insecure=True)
        if ent is not None:
            return _cached_report(spec, key, root, man), ent
        report = build_into(spec, key, root, shared)
        ent, man, reason = cache.open_entry(key, root, raise_insecure=True)
    if ent is None:
        raise JITCacheError(f"{spec.name()} (key {key}) was built but does not verify: {reason}")
    return report, ent


def _cached_report(spec, key: str, root: Path, man) -> BuildReport:
    lp = man.get("log_path") if man else None
    return BuildReport(spec, key, "cached", 0.0, cache.entry_dir(key, root), Path(lp) if lp else None)


def ensure_built(spec, shared: Optional[bool] = None) -> BuildReport:
    """Build ``spec`` if it is not cached, without loading it into this process.

    ``shared`` (default FLASHINFER_JIT_CACHE_SHARED=1 or not): a new entry is made readable by every user
    (dirs and library 0755, files 0644), for caches prepared by one user (e.g. root, in an image) and
    read by others. Needs no write access when the module is cached."""
    with thread_lock(spec):
        report, ent = _ensure(spec, shared)
        ent.close()
        return report


class JITModule:
    """A loaded module: ``.spec``, ``.key``, ``.path`` (the .so), ``.entry_dir``, ``.launcher(symbol)`` (a
    keyword-argument call of a declared launcher) and ``.constants`` (the module's ``FI_MODULE_CONSTANTS``)."""

    def __init__(
        self, spec, key: str, path: Path, entry_dir: Path, report: BuildReport, handle_path: Optional[str] = None
    ) -> None:
        self.spec = spec
        self.key = key
        self.path = path
        self.entry_dir = entry_dir
        self.report = report
        self.lib = ctypes.CDLL(handle_path or str(path))  # handle_path: the verified descriptor
        self._declared = {ln.symbol: ln for ln in (*COMMON_LAUNCHERS, *spec.launchers)}
        self._bound: Dict[str, BoundLauncher] = {}
        self._constants: Dict[str, int] | None = None

    @property
    def status(self) -> str:
        """``"built"`` if this process built it, else ``"cached"``."""
        return self.report.status

    def launcher(self, symbol: str) -> BoundLauncher:
        """The declared launcher ``symbol``, bound to this library (memoized); call it with keywords."""
        b = self._bound.get(symbol)
        if b is not None:
            return b
        decl = self._declared.get(symbol)
        if decl is None:
            raise AttributeError(
                f"{self.spec.name()}: {symbol!r} is not declared in {type(self.spec).__name__}.launchers "
                f"(known: {sorted(self._declared)})"
            )
        b = self._bound[symbol] = decl.bind(self.lib)
        return b

    def fn(self, symbol: str) -> Callable:
        """A positional call of a declared launcher (arguments in declaration order; through its packed entry
        point where the module has one)."""
        return self.launcher(symbol).call

    @property
    def constants(self) -> Dict[str, int]:
        """Named compile-time constants the module exports (tile sizes, layouts, error codes)."""
        if self._constants is None:
            self._constants = read_constants(self.launcher(CONSTANTS.symbol))
        return self._constants

    def error_string(self, code: int) -> str:
        s = self.launcher(ERROR_STRING.symbol).raw(int(code))
        return s.decode(errors="replace") if isinstance(s, bytes) else str(s)

    def check(self, code: int, what: str = "") -> None:
        """Raise RuntimeError when a launcher returned a non-zero cudaError_t."""
        if code:
            raise RuntimeError(f"{what or self.spec.name()}: CUDA error {code}: {self.error_string(code)}")

    def __repr__(self) -> str:
        return f"JITModule({self.key!r}, path={str(self.path)!r})"


def load(spec) -> JITModule:
    """The module of ``spec``: memo -> valid cache entry -> build under the file lock; then dlopen of the
    verified library through its descriptor."""
    mod = _memo.get(spec)
    if mod is not None:
        return mod
    with thread_lock(spec):
        mod = _memo.get(spec)
        if mod is not None:
            return mod
        report, ent = _ensure(spec)
        try:
            if env.record_path():
                _record(spec)
            try:
                mod = JITModule(spec, ent.key, ent.so, ent.path, report, handle_path=ent.load_path())
            except OSError as e:
                raise JITCacheError(
                    f"loading {ent.so} ({spec.name()}) failed: {e}. The library was verified (checksum) but "
                    f"the dynamic loader refused it: its dependencies (libcudart.so of torch's CUDA version) "
                    f"must be loadable in this process"
                ) from e
            _lib_fds.append(ent.take_lib_fd())
        finally:
            ent.close()
        _memo[spec] = mod
        return mod


_RECORD_ENV = "FLASHINFER_JIT_RECORD"


def _record(spec) -> None:
    """FLASHINFER_JIT_RECORD=FILE: append the spec of every module this process loads (one JSON object a
    line; ``prewarm --config FILE`` builds exactly those). Once per spec and process (after the memo)."""
    import json

    path = env.record_path()
    if not path:
        return
    line = json.dumps(spec.to_json(), sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines of parallel processes do not interleave
    finally:
        os.close(fd)


def loaded_modules() -> Dict[Any, JITModule]:
    return dict(_memo)


def _forget(spec=None) -> None:
    """Test helper: drop memoized modules (the libraries stay mapped)."""
    with _memo_lock:
        if spec is None:
            _memo.clear()
        else:
            _memo.pop(spec, None)

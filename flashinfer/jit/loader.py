"""Loading modules: in-process memo -> valid on-disk entry -> build under the key's file lock."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict

from . import cache, env
from .abi import COMMON_LAUNCHERS, CONSTANTS, ERROR_STRING, BoundLauncher, read_constants
from .build import BuildReport, build_into
from .errors import JITDisabledError
from .locks import file_lock, thread_lock

_memo: Dict[Any, JITModule] = {}
_memo_lock = threading.Lock()


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


def _ensure(spec, key: str) -> BuildReport:
    """Double-checked: valid entry? else lock, look again, build."""
    root = env.cache_root_path()
    so, man, reason = cache.check_entry(key, root, raise_insecure=True)
    if so is not None:
        return _cached_report(spec, key, root, man)
    if env.jit_disabled():
        raise JITDisabledError(
            f"FLASHINFER_DISABLE_JIT is set and {spec.name()} (key {key}) is not in the JIT cache "
            f"{root} ({reason}); {_prewarm_hint(spec)}."
        )
    _check_supported(spec)
    env.ensure_dir(root)
    with file_lock(key, root):
        so, man, reason = cache.check_entry(key, root, raise_insecure=True)
        if so is not None:
            return _cached_report(spec, key, root, man)
        return build_into(spec, key, root)


def _cached_report(spec, key: str, root: Path, man) -> BuildReport:
    lp = man.get("log_path") if man else None
    return BuildReport(spec, key, "cached", 0.0, cache.entry_dir(key, root), Path(lp) if lp else None)


def ensure_built(spec) -> BuildReport:
    """Build ``spec`` if it is not cached, without loading it into this process."""
    from .cache import cache_key

    key = cache_key(spec)
    with thread_lock(key):
        return _ensure(spec, key)


class JITModule:
    """A loaded module: ``.spec``, ``.key``, ``.path`` (the .so), ``.entry_dir``, ``.launcher(symbol)`` (a
    keyword-argument call of a declared launcher) and ``.constants`` (the module's ``FI_MODULE_CONSTANTS``)."""

    def __init__(self, spec, key: str, path: Path, entry_dir: Path, report: BuildReport) -> None:
        self.spec = spec
        self.key = key
        self.path = path
        self.entry_dir = entry_dir
        self.report = report
        self.lib = ctypes.CDLL(str(path))
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
        """The raw ctypes function of a declared launcher (positional arguments, in declaration order)."""
        return self.launcher(symbol).raw

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
    """The module of ``spec``: memo -> valid cache entry -> build under the file lock; then ctypes.CDLL."""
    mod = _memo.get(spec)
    if mod is not None:
        return mod
    from .cache import cache_key

    key = cache_key(spec)
    with thread_lock(key):
        mod = _memo.get(spec)
        if mod is not None:
            return mod
        report = _ensure(spec, key)
        if _RECORD_ENV in os.environ:
            _record(spec)
        so = report.entry_dir / cache.lib_name(key)
        try:
            mod = JITModule(spec, key, so, report.entry_dir, report)
        except OSError:
            # Entry removed or replaced between verification and dlopen (e.g. a concurrent cache clear):
            # go through the lock once more.
            report = _ensure(spec, key)
            mod = JITModule(spec, key, report.entry_dir / cache.lib_name(key), report.entry_dir, report)
        _memo[spec] = mod
        return mod


_RECORD_ENV = "FLASHINFER_JIT_RECORD"


def _record(spec) -> None:
    """FLASHINFER_JIT_RECORD=FILE: append the spec of every module this process loads (one JSON object a
    line; ``prewarm --config FILE`` builds exactly those). Once per spec and process (after the memo)."""
    import json

    path = os.environ.get(_RECORD_ENV)
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

"""Launcher signatures, declared once.

Every module is a plain shared library whose ``extern "C"`` launchers take raw pointers, sizes and a
``cudaStream_t``. Each launcher is declared exactly once, here in Python, as a :class:`Launcher`; from that one
declaration come

* the C prototype the template stamps in front of the launcher's body (``{{ abi.<symbol> }} { ... }``),
* the ctypes ``restype``/``argtypes`` the loader binds, and
* a keyword-argument call (``module.launcher(symbol)(q=..., k=..., stream=...)``) that fails on a missing or
  unknown argument instead of passing values in the wrong order.

Values that the Python side needs from a module (tile sizes, the layout of an info array, error codes) are not
mirrored by hand either: a template lists them in ``FI_MODULE_CONSTANTS`` and Python reads them once per module
through :data:`CONSTANTS` (``module.constants["kv_tile"]``).
"""

from __future__ import annotations

import ctypes
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = ["Launcher", "BoundLauncher", "ERROR_STRING", "CONSTANTS", "COMMON_LAUNCHERS", "prototypes"]

# C parameter/return types a launcher may use -> ctypes. Every pointer travels as c_void_p (an int address or
# None from Python); its C spelling only documents and types the kernel side.
_SCALARS: Dict[str, Any] = {
    "void": None,
    "int": ctypes.c_int,
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "const char*": ctypes.c_char_p,
}
_PARAM = re.compile(r"^\s*((?:const\s+)?[A-Za-z_][A-Za-z0-9_]*(?:\s*\*+)?)\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")


def _ctype(c_type: str) -> Any:
    c_type = " ".join(c_type.replace("*", " * ").split()).replace(" *", "*")
    if c_type in _SCALARS:
        return _SCALARS[c_type]
    if c_type.endswith("*"):
        return ctypes.c_void_p
    raise ValueError(f"unsupported C type {c_type!r} in a launcher signature (known: {sorted(_SCALARS)} and pointers)")


class Launcher:
    """One ``extern "C"`` function of a module.

    Parameters
    ----------
    symbol : str
        The exported C name (``flashinfer_<family>_<what>``).
    params : str
        The C parameter list, e.g. ``"const void* q, int kv_len, void* stream"``; empty for none.
    restype : str
        The C return type; launchers return ``int`` (a ``cudaError_t``) unless they report a value.
    """

    __slots__ = ("symbol", "params", "restype", "names", "c_types", "argtypes", "c_restype")

    def __init__(self, symbol: str, params: str = "", restype: str = "int") -> None:
        self.symbol = symbol
        self.params = " ".join(params.split())
        self.restype = restype
        names: List[str] = []
        c_types: List[str] = []
        for part in filter(None, (p.strip() for p in self.params.split(","))):
            m = _PARAM.match(part)
            if not m:
                raise ValueError(f"{symbol}: cannot parse parameter {part!r} (write it as 'type name')")
            c_types.append(m.group(1))
            names.append(m.group(2))
        if len(set(names)) != len(names):
            raise ValueError(f"{symbol}: duplicate parameter names in {names}")
        self.names: Tuple[str, ...] = tuple(names)
        self.c_types: Tuple[str, ...] = tuple(c_types)
        self.argtypes = [_ctype(t) for t in c_types]
        self.c_restype = _ctype(restype)

    def prototype(self) -> str:
        """The C declarator the template puts in front of the body: ``extern "C" FI_EXPORT int f(...)``."""
        return f'extern "C" FI_EXPORT {self.restype} {self.symbol}({self.params})'

    def bind(self, lib: ctypes.CDLL) -> BoundLauncher:
        fn = getattr(lib, self.symbol)
        fn.restype = self.c_restype
        fn.argtypes = list(self.argtypes)
        return BoundLauncher(self, fn)

    def __repr__(self) -> str:
        return f"Launcher({self.prototype()!r})"


class BoundLauncher:
    """A launcher bound to a loaded library, called with keyword arguments named as in its declaration."""

    __slots__ = ("launcher", "raw", "_names", "_n")

    def __init__(self, launcher: Launcher, raw: Any) -> None:
        self.launcher = launcher
        self.raw = raw  # the ctypes function (positional), for the few callers that time every microsecond
        self._names = launcher.names
        self._n = len(launcher.names)

    def __call__(self, **kwargs: Any) -> Any:
        if len(kwargs) == self._n:
            try:
                return self.raw(*[kwargs[n] for n in self._names])
            except KeyError:
                pass
        missing = [n for n in self._names if n not in kwargs]
        unknown = [n for n in kwargs if n not in self._names]
        raise TypeError(f"{self.launcher.symbol}: missing arguments {missing}, unknown arguments {unknown}")


# Every module exports these two (rendered by templates/module_exports.jinja, which each template includes).
ERROR_STRING = Launcher("flashinfer_error_string", "int error", restype="const char*")
CONSTANTS = Launcher("flashinfer_module_constants", "const char** names, int64_t* values, int capacity")
COMMON_LAUNCHERS: Tuple[Launcher, ...] = (ERROR_STRING, CONSTANTS)
MAX_CONSTANTS = 128


def prototypes(launchers: Iterable[Launcher]) -> Dict[str, str]:
    """{symbol: C prototype} for a spec's launchers and the common ones (the template's ``abi`` variable)."""
    out = {ln.symbol: ln.prototype() for ln in COMMON_LAUNCHERS}
    for ln in launchers:
        if ln.symbol in out:
            raise ValueError(f"launcher {ln.symbol} declared twice")
        out[ln.symbol] = ln.prototype()
    return out


def read_constants(bound: Optional[BoundLauncher]) -> Dict[str, int]:
    """The module's ``FI_MODULE_CONSTANTS`` as a dict (empty for a module that lists none)."""
    if bound is None:
        return {}
    names = (ctypes.c_char_p * MAX_CONSTANTS)()
    values = (ctypes.c_int64 * MAX_CONSTANTS)()
    n = bound(names=ctypes.addressof(names), values=ctypes.addressof(values), capacity=MAX_CONSTANTS)
    if n < 0 or n > MAX_CONSTANTS:
        raise RuntimeError(f"flashinfer_module_constants returned {n} (capacity {MAX_CONSTANTS})")
    return {names[i].decode(): int(values[i]) for i in range(n)}

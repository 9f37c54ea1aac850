"""Launcher signatures, declared once.

Every module is a plain shared library whose ``extern "C"`` launchers take raw pointers, sizes and a
``cudaStream_t``. Each launcher is declared exactly once, here in Python, as a :class:`Launcher`; from that one
declaration come

* the C prototype the template stamps in front of the launcher's body (``{{ abi.<symbol> }} { ... }``),
* the ctypes ``restype``/``argtypes`` the loader binds, and
* a keyword-argument call (``module.launcher(symbol)(q=..., k=..., stream=...)``) that fails on a missing or
  unknown argument instead of passing values in the wrong order, and
* a packed entry point (``<symbol>_packed``, stamped into every module by ``module_exports.jinja``) that takes the
  arguments as one block laid out like a C struct of the parameters: Python packs them with one
  ``struct.Struct.pack`` and makes a one-argument ctypes call. A ctypes call converts every argument through its
  argtype in Python-level code, a few tenths of a microsecond each; the hot per-token launchers take 10 to 31
  arguments, so that conversion was the largest single piece of their host time.

A launcher declared with ``keeps_gil=True`` is called with the GIL held (bound as ``ctypes.PyDLL`` binds): its C
side may call back into the interpreter, e.g. the "_dlpack" entry points of the per-token ops, which take
``torch.Tensor`` objects (``id(t)``: their ``PyObject*``) and read them through the DLPack C exchange API
(``templates/include/flashinfer/host/dlpack.cuh``). A Python error such a call leaves set is raised by ctypes.

Values that the Python side needs from a module (tile sizes, the layout of an info array, error codes) are not
mirrored by hand either: a template lists them in ``FI_MODULE_CONSTANTS`` and Python reads them once per module
through :data:`CONSTANTS` (``module.constants["kv_tile"]``).
"""

from __future__ import annotations

import ctypes
import re
import struct
from typing import Any, Dict, Iterable, List, Optional, Tuple

__all__ = [
    "Launcher",
    "BoundLauncher",
    "ERROR_STRING",
    "CONSTANTS",
    "COMMON_LAUNCHERS",
    "packed_entries",
    "prototypes",
]

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
# C scalar types -> their struct format code in a packed argument block (native alignment, as the C compiler lays
# out the same fields); every pointer is "P".
_PACK_CODES: Dict[str, str] = {"int": "i", "int64_t": "q", "uint64_t": "Q", "float": "f", "double": "d"}
PACKED_SUFFIX = "_packed"
_PARAM = re.compile(r"^\s*((?:const\s+)?[A-Za-z_][A-Za-z0-9_]*(?:\s*\*+)?)\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")


def _normal(c_type: str) -> str:
    return " ".join(c_type.replace("*", " * ").split()).replace(" *", "*")


def _ctype(c_type: str) -> Any:
    c_type = _normal(c_type)
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
    keeps_gil : bool
        Call it with the GIL held (``ctypes.PyDLL``'s convention) instead of releasing it around the call: for entry
        points that take Python objects and call the interpreter's or a framework's C API on them.
    """

    __slots__ = ("symbol", "params", "restype", "names", "c_types", "argtypes", "c_restype", "packing", "keeps_gil")

    def __init__(self, symbol: str, params: str = "", restype: str = "int", keeps_gil: bool = False) -> None:
        self.symbol = symbol
        self.keeps_gil = keeps_gil
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
        self.packing: Optional[struct.Struct] = _packing(self.c_types) if restype == "int" else None

    @property
    def packed_symbol(self) -> str:
        return self.symbol + PACKED_SUFFIX

    def prototype(self) -> str:
        """The C declarator the template puts in front of the body: ``extern "C" FI_EXPORT int f(...)``."""
        return f'extern "C" FI_EXPORT {self.restype} {self.symbol}({self.params})'

    def packed_entry(self) -> str:
        """C source of ``<symbol>_packed(const void* packed)``: copies the block into a struct of the parameters and
        calls the launcher; with a null block it returns the struct's size (checked against :attr:`packing` when
        the module is bound, so a layout mismatch fails at load, never at a launch). Empty for a launcher without
        one (:attr:`packing` is None)."""
        if self.packing is None:
            return ""
        fields = "".join(f"    {t} {n};\n" for t, n in zip(self.c_types, self.names))
        args = ", ".join(f"a.{n}" for n in self.names)
        return (
            f"{self.prototype()};\n"
            f'extern "C" FI_EXPORT int {self.packed_symbol}(const void* packed) {{\n'
            f"  struct Args {{\n{fields}  }};\n"
            f"  if (packed == nullptr) return static_cast<int>(sizeof(Args));\n"
            f"  Args a;\n"
            f"  __builtin_memcpy(&a, packed, sizeof(Args));\n"
            f"  return {self.symbol}({args});\n"
            f"}}\n"
        )

    def bind(self, lib: ctypes.CDLL) -> BoundLauncher:
        if self.keeps_gil:  # the same library through PyDLL's function type (the GIL stays held, errors are raised)
            lib = ctypes.PyDLL(lib._name, handle=lib._handle)
        fn = getattr(lib, self.symbol)
        fn.restype = self.c_restype
        fn.argtypes = list(self.argtypes)
        packed = None
        if self.packing is not None:
            try:
                packed = getattr(lib, self.packed_symbol)
            except AttributeError:  # a library without packed entry points (a test's own template): plain calls
                packed = None
            else:
                packed.restype = ctypes.c_int
                packed.argtypes = [ctypes.c_char_p]
                size = packed(None)
                if size != self.packing.size:
                    raise RuntimeError(
                        f"{self.packed_symbol}: the module's argument block is {size} bytes, Python packs "
                        f"{self.packing.size} (format {self.packing.format!r}); the module and its declaration "
                        f"disagree"
                    )
        return BoundLauncher(self, fn, packed)

    def __repr__(self) -> str:
        return f"Launcher({self.prototype()!r}{', keeps_gil=True' if self.keeps_gil else ''})"


def _packing(c_types: Tuple[str, ...]) -> Optional[struct.Struct]:
    """The struct layout of a packed argument block of these C parameter types, padded at the end to the
    alignment of its widest field as a C struct is (None when there are no parameters or one has no code)."""
    codes = []
    for t in c_types:
        t = _normal(t)
        code = "P" if t.endswith("*") else _PACK_CODES.get(t)
        if code is None:
            return None
        codes.append(code)
    if not codes:
        return None
    widest = max(codes, key=struct.calcsize)
    return struct.Struct("@" + "".join(codes) + "0" + widest)


def _positional(raw: Any, packed: Any, pack: Any, pointers: Tuple[int, ...]) -> Any:
    """A positional call of a launcher through its packed entry point. None for a pointer (``pointers``: their
    positions) packs as a null pointer; any other value the block cannot hold as given (an int beyond its field, a
    float beyond float32, a wrong type) takes the plain ctypes call, which converts (or refuses) it as ctypes does.
    Either way the launcher sees what the plain call would pass. Hot callers pass 0 for null pointers: the
    retry costs an exception."""

    def call(*args: Any) -> Any:
        try:
            block = pack(*args)
        except (struct.error, OverflowError):
            nulled = list(args)
            for i in pointers:
                if i < len(nulled) and nulled[i] is None:
                    nulled[i] = 0
            try:
                block = pack(*nulled)
            except (struct.error, OverflowError):
                return raw(*args)
        return packed(block)

    return call


class BoundLauncher:
    """A launcher bound to a loaded library: ``bound(name=value, ...)`` with keyword arguments named as in its
    declaration, or ``bound.call(value, ...)`` with them in declaration order (what the per-token ops use: no
    keyword dict). Both go through the packed entry point when the module has one.

    Parameters
    ----------
    launcher : Launcher
        The declaration.
    raw : ctypes function
        The launcher itself, argtypes set (``.raw``).
    packed : ctypes function, optional
        Its packed entry point (``<symbol>_packed``), whose block size the caller has checked.
    """

    __slots__ = ("launcher", "raw", "packed", "call", "_names", "_n")

    def __init__(self, launcher: Launcher, raw: Any, packed: Any = None) -> None:
        self.launcher = launcher
        self.raw = raw  # the ctypes function (positional, every argument converted by ctypes)
        self.packed = packed
        if packed is not None:
            pointers = tuple(i for i, t in enumerate(launcher.c_types) if _normal(t).endswith("*"))
            self.call = _positional(raw, packed, launcher.packing.pack, pointers)
        else:
            self.call = raw
        self._names = launcher.names
        self._n = len(launcher.names)

    def __call__(self, **kwargs: Any) -> Any:
        if len(kwargs) == self._n:
            try:
                args = [kwargs[n] for n in self._names]
            except KeyError:
                pass
            else:
                return self.call(*args)
        missing = [n for n in self._names if n not in kwargs]
        unknown = [n for n in kwargs if n not in self._names]
        raise TypeError(f"{self.launcher.symbol}: missing arguments {missing}, unknown arguments {unknown}")


# Every module exports these two (rendered by templates/module_exports.jinja, which each template includes).
ERROR_STRING = Launcher("flashinfer_error_string", "int error", restype="const char*")
CONSTANTS = Launcher("flashinfer_module_constants", "const char** names, int64_t* values, int capacity")
COMMON_LAUNCHERS: Tuple[Launcher, ...] = (ERROR_STRING, CONSTANTS)
MAX_CONSTANTS = 128


def packed_entries(launchers: Iterable[Launcher]) -> str:
    """C source of the packed entry points of a spec's launchers (the template's ``abi_packed`` variable, stamped by
    ``module_exports.jinja`` after the launchers' definitions)."""
    return "".join(ln.packed_entry() for ln in launchers)


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

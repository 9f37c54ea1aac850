"""ProbeSpec: a tiny real module (one trivial kernel) for CI, ``doctor`` and ``demo`` on GPU-less machines."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

from .abi import Launcher
from .spec import Spec, register_family

_CTYPES = {"f32": "float", "i32": "int"}


@register_family
@dataclasses.dataclass(frozen=True)
class ProbeSpec(Spec):
    """``x[i] += constant`` over ``n`` elements of ``dtype`` ("f32" or "i32").

    Exports ``flashinfer_probe_add(void* x, int64 n, int device, void* stream) -> cudaError_t``,
    ``flashinfer_probe_constant() -> double`` (host only: which binary is this?),
    ``flashinfer_probe_runtime_version() -> int`` (cudaRuntimeGetVersion, works without a GPU) and
    ``flashinfer_error_string(int) -> const char*``.
    """

    constant: int = 1
    dtype: str = "f32"

    family = "probe"
    template = "probe.cu.jinja"
    launchers = (
        Launcher("flashinfer_probe_add", "void* x, int64_t n, int device, void* stream"),
        Launcher("flashinfer_probe_constant", restype="double"),
        Launcher("flashinfer_probe_runtime_version"),
    )

    def __post_init__(self) -> None:
        if self.dtype not in _CTYPES:
            raise ValueError(f"ProbeSpec.dtype must be one of {sorted(_CTYPES)}, not {self.dtype!r}")
        if not isinstance(self.constant, int) or isinstance(self.constant, bool):
            raise TypeError(f"ProbeSpec.constant must be an int, not {self.constant!r}")

    def name(self) -> str:
        return f"probe_{self.dtype}_c{self.constant}"

    def render_vars(self) -> Dict[str, Any]:
        return {
            "dtype_c": _CTYPES[self.dtype],
            "constant": self.constant,
            "extra_code": "",  # test hook: subclasses stamp extra (e.g. broken) code here
        }

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"constant": (1, 2), "dtype": ("f32", "i32")}

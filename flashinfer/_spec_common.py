"""What the attention kernel specs (single/batch decode, single/batch prefill) share: how a spec names itself,
the Jinja variables of its common fields, the axes of its matrix and the dtype rule (q and output 16-bit; the KV
cache q's dtype, or fp8 (``e4m3``/``e5m2``, values of the same ``dtype_kv`` axis) in the families that read it).

A spec's name is ``<family>[_<prefix fields>]_q-<dq>_kv-<dkv>_o-<do>_d<head_dim>`` followed by one part per
remaining field in declaration order (``nhd``, ``mask-causal``, ``pos-ropellama``, ``window-on``, ``fa2``...);
its axes follow the field order too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

from .jit.spec import Spec, spec_families
from .utils import DTYPE_CUDA, SUPPORTED_HEAD_DIMS, PosEncodingMode, cuda_bool, on_off, pos_encoding_cuda

_DTYPES = ("bf16", "f16")
FP8_KV_DTYPES = ("e4m3", "e5m2")  # fp8 KV caches: values of the KV-dtype axis read by families with fp8_kv
_FLAG = (False, True)
_DTYPE_FIELDS = ("head_dim", "dtype_q", "dtype_kv", "dtype_o")

# Supported values of the fields several specs share; a family adds its own in ``own_axes``.
SHARED_AXES: Dict[str, Tuple[Any, ...]] = {
    "head_dim": SUPPORTED_HEAD_DIMS,
    "dtype_q": _DTYPES,
    "dtype_kv": _DTYPES + FP8_KV_DTYPES,
    "dtype_o": _DTYPES,
    "kv_layout": ("NHD", "HND"),
    "pos_encoding_mode": tuple(m.name for m in PosEncodingMode),
    "use_window": _FLAG,
    "use_logits_soft_cap": _FLAG,
    "use_fp16_qk_reduction": _FLAG,
}

# On/off fields: their label in the name (the Jinja variable keeps the field's name).
_FLAG_LABELS = {"use_window": "window", "use_logits_soft_cap": "softcap", "use_fp16_qk_reduction": "fp16qk"}


def _name_part(field: str, value: Any) -> str:
    if field == "kv_layout":
        return value.lower()
    if field == "mask_mode":
        return f"mask-{value}"
    if field == "pos_encoding_mode":
        return f"pos-{value.lower().replace('_', '')}"
    if field in _FLAG_LABELS:
        return f"{_FLAG_LABELS[field]}-{on_off(value)}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class AttentionSpec(Spec):
    """Base of the attention specs: its fields come first in every family (positional construction keeps
    working); a family adds pos_encoding_mode and any of kv_layout, mask_mode, use_window, use_logits_soft_cap,
    use_fp16_qk_reduction, backend (and its own)."""

    head_dim: int = 128
    dtype_q: str = "bf16"
    dtype_kv: str = "bf16"
    dtype_o: str = "bf16"

    own_axes: ClassVar[Dict[str, Tuple[Any, ...]]] = {}  # axes of fields only this family has
    name_prefix: ClassVar[Tuple[str, ...]] = ()  # fields named right after the family (e.g. kv_storage)
    fp8_kv: ClassVar[bool] = False  # whether the family's kernels read fp8 KV caches (dtype_kv e4m3/e5m2)

    def name(self) -> str:
        parts = [
            self.family,
            *(str(getattr(self, f)) for f in self.name_prefix),
            f"q-{self.dtype_q}_kv-{self.dtype_kv}_o-{self.dtype_o}_d{self.head_dim}",
        ]
        parts += [
            _name_part(f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _DTYPE_FIELDS and f.name not in self.name_prefix
        ]
        return "_".join(parts)

    def attention_vars(self) -> Dict[str, Any]:
        """The Jinja variables of the shared fields (a family adds its own in render_vars)."""
        fields = {f.name for f in dataclasses.fields(self)}
        out: Dict[str, Any] = {"name": self.name(), "head_dim": self.head_dim}
        out.update({f: DTYPE_CUDA[getattr(self, f)] for f in ("dtype_q", "dtype_kv", "dtype_o")})
        if "kv_layout" in fields:
            out["kv_layout_hnd"] = cuda_bool(self.kv_layout == "HND")
        out["pos_encoding"] = pos_encoding_cuda(self.pos_encoding_mode)
        out.update({f: cuda_bool(getattr(self, f)) for f in _FLAG_LABELS if f in fields})
        return out

    def render_vars(self) -> Dict[str, Any]:
        return self.attention_vars()

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {
            f.name: cls.own_axes[f.name] if f.name in cls.own_axes else SHARED_AXES[f.name]
            for f in dataclasses.fields(cls)
        }

    def unsupported_reason(self) -> Optional[str]:
        if self.dtype_q not in _DTYPES:
            return f"q dtype {self.dtype_q}: q must be 16-bit ({', '.join(_DTYPES)})"
        if self.dtype_kv in FP8_KV_DTYPES and not self.fp8_kv:
            readers = sorted(f for f, cls in spec_families().items() if getattr(cls, "fp8_kv", False))
            return (
                f"kv dtype {self.dtype_kv} (fp8): {self.family} does not read fp8 KV caches ({', '.join(readers)} do)"
            )
        if self.dtype_kv != self.dtype_q and self.dtype_kv not in FP8_KV_DTYPES:
            return f"q dtype {self.dtype_q} with kv dtype {self.dtype_kv}: kv must be q's 16-bit dtype" + (
                " or fp8 (e4m3, e5m2)" if self.fp8_kv else ""
            )
        if self.dtype_o != self.dtype_q:
            return f"output dtype {self.dtype_o} differs from q dtype {self.dtype_q}: the output takes q's dtype"
        return None

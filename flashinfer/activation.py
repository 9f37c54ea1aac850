"""Gated activations: ``silu_and_mul``, ``gelu_and_mul``, ``gelu_tanh_and_mul``; drop-ins for FlashInfer's
``flashinfer.activation`` functions of those names.

``input [..., 2d] -> out [..., d]`` with ``out = act(input[..., :d]) * input[..., d:]`` in float32. One JIT module
per dtype (``activation_bf16``, ``activation_f16``) holds all three activations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import torch

from . import jit
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .utils import (
    DTYPE_CUDA,
    DTYPE_SHORT,
    check_device_tensor,
    check_pdl_arg,
    current_stream_at,
    dlpack_exchange_api,
    dtype_short,
    module_error,
    resolve_pdl_at,
    tracing,
)

__all__ = ["ActivationSpec", "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"]


@register_family
@dataclasses.dataclass(frozen=True)
class ActivationSpec(Spec):
    """Compile-time configuration of the gated-activation module: only the element type."""

    dtype: str = "bf16"

    family = "activation"
    template = "activation.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_act_and_mul",
            "const void* input, void* out, int64_t input_stride, int64_t out_stride, int rows, int d, "
            "int activation, int enable_pdl, int device, void* stream",
        ),
        # The same launch from the tensors themselves (the hot path of eager calls): their PyObject* and torch's
        # DLPack exchange table; declined (a non-zero return, nothing launched) unless the plain case.
        Launcher(
            "flashinfer_act_and_mul_dlpack",
            "const void* api, const void* input, const void* out, int activation, int enable_pdl",
            keeps_gil=True,
        ),
    )

    def name(self) -> str:
        return f"{self.family}_{self.dtype}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "dtype": DTYPE_CUDA[self.dtype]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"dtype": ("bf16", "f16")}


class _ActModule:
    __slots__ = ("module", "launch", "codes")

    def __init__(self, dtype: str) -> None:
        self.module = jit.load(ActivationSpec(dtype=dtype))
        self.launch = self.module.launcher("flashinfer_act_and_mul").call
        # The activation ids the module exports (FI_MODULE_CONSTANTS), by FlashInfer's function prefix.
        self.codes = {name: self.module.constants[name] for name in ("silu", "gelu", "gelu_tanh")}


@functools.cache
def _act_module(dtype: str) -> _ActModule:
    return _ActModule(dtype)


# dtype -> loaded module: a dict read per call instead of the lru_cache'd builder.
_MODULES: Dict[torch.dtype, _ActModule] = {}
# dtype -> (packed _dlpack entry point, its block's pack, activation codes), filled when the Python path first loads
# the module (so the first call of a dtype takes that path) and only where torch has the DLPack exchange table
# (_DLPACK_API[0]: its address).
_DLPACK: Dict[torch.dtype, Tuple[Any, Any, Dict[str, int]]] = {}
_DLPACK_API = [0]


def _module_for(dtype: torch.dtype) -> _ActModule:
    m = _MODULES.get(dtype)
    if m is None:
        m = _MODULES[dtype] = _act_module(DTYPE_SHORT[dtype])
        _DLPACK_API[0] = api = dlpack_exchange_api()
        entry = m.module.launcher("flashinfer_act_and_mul_dlpack")
        if api and entry.packed is not None:
            _DLPACK[dtype] = (entry.packed, entry.launcher.packing.pack, m.codes)
    return m


def _rows_stride(shape: torch.Size, stride: Tuple[int, ...]) -> Optional[int]:
    """The row stride of ``shape``'s leading dimensions collapsed into one, or None when they do not collapse."""
    row_stride = stride[-2] if len(shape) >= 2 else shape[-1]
    expected = row_stride
    for i in range(len(shape) - 2, 0, -1):  # dim i - 1 must step over all of dim i
        expected *= shape[i]
        if shape[i - 1] > 1 and stride[i - 1] != expected:
            return None
    return row_stride


def _launch(
    act: str,
    out: torch.Tensor,
    input: torch.Tensor,
    enable_pdl: Optional[bool],
    in_shape: Optional[torch.Size] = None,
    fresh_out: bool = False,
) -> None:
    """Launch on validated tensors: input ``[..., 2d]`` (of shape ``in_shape`` when the caller has read it), out
    ``[..., d]``, both with unit last stride; ``fresh_out``: out was just made contiguous (its rows are d apart)."""
    shape = out.size()
    d = shape[-1]
    rows = out.numel() // d if d else 0
    if rows == 0:
        return
    in_stride = _rows_stride(input.size() if in_shape is None else in_shape, input.stride())
    if in_stride is None:
        input = input.contiguous()
        in_stride = input.shape[-1]
    out_stride = d if fresh_out else _rows_stride(shape, out.stride())
    target = None
    if out_stride is None:  # the leading dimensions of out do not collapse: compute contiguously, then copy
        target, out = out, torch.empty(shape, dtype=out.dtype, device=out.device)
        out_stride = d
    if rows == 1:  # a single row's stride is never used: report the packed one (it must not block 16-byte vectors)
        in_stride, out_stride = 2 * d, d
    m = _module_for(input.dtype)
    device = input.get_device()
    rc = m.launch(
        input.data_ptr(),
        out.data_ptr(),
        in_stride,
        out_stride,
        rows,
        d,
        m.codes[act],
        resolve_pdl_at(enable_pdl, device),
        device,
        current_stream_at(device),
    )
    if rc:
        raise module_error(m.module, rc, f"{act}_and_mul ({m.module.spec.name()}) on {input.device}")
    if target is not None:
        target.copy_(out)


def _make_op(act: str):
    @torch.library.custom_op(f"flashinfer::{act}_and_mul", mutates_args=("out",))
    def op(out: torch.Tensor, input: torch.Tensor, enable_pdl: Optional[bool]) -> None:
        _launch(act, out, input, enable_pdl)

    @op.register_fake
    def _fake(out, input, enable_pdl) -> None:
        return None

    return op


_OPS = {act: _make_op(act) for act in ("silu", "gelu", "gelu_tanh")}


def _act_and_mul(
    act: str, input: torch.Tensor, out: Optional[torch.Tensor], enable_pdl: Optional[bool]
) -> torch.Tensor:
    # Eager fast path: the module reads the tensors itself (one ctypes call); anything but the plain case (another
    # type, dtype, device, shape or stride) is declined and checked below, as is a traced call.
    if not tracing():
        try:
            entry = _DLPACK[input.dtype]
        except (AttributeError, KeyError, TypeError):
            entry = None
        pdl = 2 if enable_pdl is None else 1 if enable_pdl is True else 0 if enable_pdl is False else -1
        if entry is not None and pdl >= 0:
            o = out
            if o is None:
                shape = input.size()
                o = torch.empty(*shape[:-1], shape[-1] // 2, dtype=input.dtype, device=input.device) if shape else None
            if o is not None:
                launch, pack, codes = entry
                try:
                    declined = launch(pack(_DLPACK_API[0], id(input), id(o), codes[act], pdl))
                except Exception:  # an argument torch cannot view (not a tensor...): the checks below say why
                    declined = 1
                if not declined:
                    return o
    return _act_and_mul_checked(act, input, out, enable_pdl)


def _act_and_mul_checked(
    act: str, input: torch.Tensor, out: Optional[torch.Tensor], enable_pdl: Optional[bool]
) -> torch.Tensor:
    """The gated activations' full path: every check, copies where needed, the custom op when traced."""
    check_device_tensor(input, "input")
    if input.dtype not in DTYPE_SHORT:
        dtype_short(input, "input")  # raises the dtype error
    shape = input.size()
    if len(shape) < 1 or shape[-1] % 2:
        raise ValueError(f"input must be (..., 2 * d): its last dimension must be even, got shape {tuple(shape)}")
    d = shape[-1] // 2
    if d >= 2**31 or (d and input.numel() // (2 * d) >= 2**31):
        raise ValueError(f"input shape {tuple(shape)}: rows and d must stay below 2**31")
    pdl = check_pdl_arg(enable_pdl)
    if input.stride()[-1] != 1 and d:
        input = input.contiguous()
    out_shape = (*shape[:-1], d)
    fresh = out is None
    if fresh:  # (the sizes as separate ints: a tuple or torch.Size argument costs the factory call more)
        out = torch.empty(*out_shape, dtype=input.dtype, device=input.device)
    else:
        check_device_tensor(out, "out")
        if out.size() != out_shape or out.dtype != input.dtype or out.get_device() != input.get_device():
            raise ValueError(
                f"out must be a {input.dtype} tensor of shape {out_shape} on {input.device} (input "
                f"{tuple(shape)} -> (..., d)), got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if out.stride()[-1] != 1 and d > 1:
            raise ValueError(f"out must be contiguous in its last dimension (stride 1), got strides {out.stride()}")
    if tracing():
        _OPS[act](out, input, pdl)
    else:
        _launch(act, out, input, pdl, shape, fresh)  # (input.contiguous() keeps the shape)
    return out


def silu_and_mul(
    input: torch.Tensor, out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None
) -> torch.Tensor:
    r"""Fused SiLU and multiply: ``silu(input[..., :d]) * input[..., d:]``.

    Parameters
    ----------
    input : torch.Tensor
        ``(..., 2 * d)``, float16 or bfloat16, on a CUDA device; any strides (a copy is made when the last
        dimension is not contiguous or the leading ones do not collapse).
    out : Optional[torch.Tensor]
        ``(..., d)`` output in the input's dtype, last dimension contiguous; written in place.
    enable_pdl : Optional[bool]
        Launch as a programmatic dependent launch; ``None`` enables it on sm_90+ (ignored below sm_90).

    Returns
    -------
    torch.Tensor
        ``(..., d)`` in the input's dtype (``out`` when given), computed in float32.
    """
    return _act_and_mul("silu", input, out, enable_pdl)


def gelu_and_mul(
    input: torch.Tensor, out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None
) -> torch.Tensor:
    r"""Fused GELU (exact, erf form) and multiply: ``gelu(input[..., :d]) * input[..., d:]``.

    Parameters and result as :func:`silu_and_mul`.

    Returns
    -------
    torch.Tensor
        ``(..., d)`` in the input's dtype (``out`` when given).
    """
    return _act_and_mul("gelu", input, out, enable_pdl)


def gelu_tanh_and_mul(
    input: torch.Tensor, out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None
) -> torch.Tensor:
    r"""Fused GELU (tanh approximation) and multiply: ``gelu_tanh(input[..., :d]) * input[..., d:]``.

    Parameters and result as :func:`silu_and_mul`.

    Returns
    -------
    torch.Tensor
        ``(..., d)`` in the input's dtype (``out`` when given).
    """
    return _act_and_mul("gelu_tanh", input, out, enable_pdl)

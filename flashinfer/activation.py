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
    current_stream_ptr,
    dtype_short,
    module_error,
    resolve_pdl,
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
        Launcher("flashinfer_act_and_mul",
                 "const void* input, void* out, int64_t input_stride, int64_t out_stride, int rows, int d, "
                 "int activation, int enable_pdl, int device, void* stream"),
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
        self.launch = self.module.launcher("flashinfer_act_and_mul").raw
        # The activation ids the module exports (FI_MODULE_CONSTANTS), by FlashInfer's function prefix.
        self.codes = {name: self.module.constants[name] for name in ("silu", "gelu", "gelu_tanh")}


@functools.lru_cache(maxsize=None)
def _act_module(dtype: str) -> _ActModule:
    return _ActModule(dtype)


def _as_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (non-empty) as 2-D ``[rows, last]`` sharing its memory, or None when its leading dimensions do
    not collapse."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _launch(act: str, out: torch.Tensor, input: torch.Tensor, enable_pdl: Optional[bool]) -> None:
    """Launch on validated tensors: input ``[..., 2d]``, out ``[..., d]``, both with unit last stride."""
    d = out.shape[-1]
    if d == 0 or out.numel() == 0:
        return
    x = _as_rows(input)
    if x is None:
        x = input.reshape(-1, input.shape[-1])
    y = _as_rows(out)
    target = None
    if y is None:  # the leading dimensions of out do not collapse: compute contiguously, then copy
        target, y = out, torch.empty((x.shape[0], d), dtype=out.dtype, device=out.device)
    rows = x.shape[0]
    # A single row's stride is never used; report the packed one so it does not block 16-byte vectors.
    in_stride, out_stride = (x.stride(0), y.stride(0)) if rows > 1 else (2 * d, d)
    m = _act_module(DTYPE_SHORT[input.dtype])
    device = input.device
    rc = m.launch(x.data_ptr(), y.data_ptr(), in_stride, out_stride, rows, d, m.codes[act],
                  resolve_pdl(enable_pdl, device), device.index, current_stream_ptr(device))
    if rc:
        raise module_error(m.module, rc, f"{act}_and_mul ({m.module.spec.name()}) on {device}")
    if target is not None:
        target.copy_(y.view(target.shape))


def _make_op(act: str):
    @torch.library.custom_op(f"flashinfer::{act}_and_mul", mutates_args=("out",))
    def op(out: torch.Tensor, input: torch.Tensor, enable_pdl: Optional[bool]) -> None:
        _launch(act, out, input, enable_pdl)

    @op.register_fake
    def _fake(out, input, enable_pdl) -> None:
        return None

    return op


_OPS = {act: _make_op(act) for act in ("silu", "gelu", "gelu_tanh")}


def _act_and_mul(act: str, input: torch.Tensor, out: Optional[torch.Tensor], enable_pdl: Optional[bool]) -> torch.Tensor:
    check_device_tensor(input, "input")
    dtype_short(input, "input")
    if input.dim() < 1 or input.shape[-1] % 2:
        raise ValueError(f"input must be (..., 2 * d): its last dimension must be even, got shape {tuple(input.shape)}")
    if input.shape[-1] // 2 >= 2**31 or (input.shape[-1] and input.numel() // input.shape[-1] >= 2**31):
        raise ValueError(f"input shape {tuple(input.shape)}: rows and d must stay below 2**31")
    pdl = check_pdl_arg(enable_pdl)
    if input.stride(-1) != 1:
        input = input.contiguous()
    shape = (*input.shape[:-1], input.shape[-1] // 2)
    if out is None:
        out = torch.empty(shape, dtype=input.dtype, device=input.device)
    else:
        check_device_tensor(out, "out")
        if tuple(out.shape) != shape or out.dtype != input.dtype or out.device != input.device:
            raise ValueError(f"out must be a {input.dtype} tensor of shape {shape} on {input.device} (input "
                             f"{tuple(input.shape)} -> (..., d)), got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.stride(-1) != 1 and shape[-1] > 1:
            raise ValueError(f"out must be contiguous in its last dimension (stride 1), got strides {out.stride()}")
    if torch.compiler.is_compiling():
        _OPS[act](out, input, pdl)
    else:
        _launch(act, out, input, pdl)
    return out


def silu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                 enable_pdl: Optional[bool] = None) -> torch.Tensor:
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


def gelu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                 enable_pdl: Optional[bool] = None) -> torch.Tensor:
    r"""Fused GELU (exact, erf form) and multiply: ``gelu(input[..., :d]) * input[..., d:]``.

    Parameters and result as :func:`silu_and_mul`.

    Returns
    -------
    torch.Tensor
        ``(..., d)`` in the input's dtype (``out`` when given).
    """
    return _act_and_mul("gelu", input, out, enable_pdl)


def gelu_tanh_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                      enable_pdl: Optional[bool] = None) -> torch.Tensor:
    r"""Fused GELU (tanh approximation) and multiply: ``gelu_tanh(input[..., :d]) * input[..., d:]``.

    Parameters and result as :func:`silu_and_mul`.

    Returns
    -------
    torch.Tensor
        ``(..., d)`` in the input's dtype (``out`` when given).
    """
    return _act_and_mul("gelu_tanh", input, out, enable_pdl)

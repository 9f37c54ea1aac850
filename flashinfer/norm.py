"""RMSNorm: ``rmsnorm``, ``fused_add_rmsnorm``, ``gemma_rmsnorm``, ``gemma_fused_add_rmsnorm``; drop-ins for
FlashInfer's ``flashinfer.norm`` functions of those names.

One JIT module per dtype (``norm_bf16``, ``norm_f16``) holds all four: the Gemma forms only add 1 to the weight
(``weight_bias``), and the kernel shape (a warp per short row, a CTA per long row; 16-byte vectors or single
elements) is picked at launch from the hidden size and alignment. Reductions run in float32.
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
    scalar,
)

__all__ = ["NormSpec", "rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm"]


@register_family
@dataclasses.dataclass(frozen=True)
class NormSpec(Spec):
    """Compile-time configuration of the RMSNorm module: only the element type (every hidden size, layout and
    variant is served by the same module)."""

    dtype: str = "bf16"

    family = "norm"
    template = "norm.cu.jinja"
    launchers = (
        Launcher("flashinfer_rmsnorm",
                 "const void* input, void* out, const void* weight, int64_t input_stride0, int64_t input_stride1, "
                 "int64_t out_stride0, int64_t out_stride1, int rows, int inner, int hidden, float eps, "
                 "float weight_bias, int enable_pdl, int device, void* stream"),
        Launcher("flashinfer_fused_add_rmsnorm",
                 "void* input, void* residual, const void* weight, int64_t input_stride0, int64_t input_stride1, "
                 "int64_t residual_stride0, int64_t residual_stride1, int rows, int inner, int hidden, float eps, "
                 "float weight_bias, int enable_pdl, int device, void* stream"),
    )

    def name(self) -> str:
        return f"{self.family}_{self.dtype}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "dtype": DTYPE_CUDA[self.dtype]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"dtype": ("bf16", "f16")}


class _NormModule:
    """A loaded norm module's launchers (raw ctypes: positional, in declaration order) and limits."""

    __slots__ = ("module", "rmsnorm", "fused_add", "max_hidden")

    def __init__(self, dtype: str) -> None:
        self.module = jit.load(NormSpec(dtype=dtype))
        self.rmsnorm = self.module.launcher("flashinfer_rmsnorm").raw
        self.fused_add = self.module.launcher("flashinfer_fused_add_rmsnorm").raw
        self.max_hidden = self.module.constants["max_hidden"]


@functools.lru_cache(maxsize=None)
def _norm_module(dtype: str) -> _NormModule:
    return _NormModule(dtype)


def _rows(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(rows, inner, stride0, stride1) of a 2-D ``[rows, hidden]`` or 3-D ``[batch, heads, hidden]`` tensor:
    row r is at (r // inner) * stride0 + (r % inner) * stride1."""
    if t.dim() == 2:
        return t.shape[0], 1, t.stride(0), 0
    return t.shape[0] * t.shape[1], t.shape[1], t.stride(0), t.stride(1)


def _check_rows(t: Any, name: str) -> torch.Tensor:
    check_device_tensor(t, name)
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D (batch_size, hidden_size) or 3-D (batch_size, num_heads, hidden_size), "
                         f"got shape {tuple(t.shape)}")
    return t


def _check_weight(weight: Any, input: torch.Tensor) -> torch.Tensor:
    check_device_tensor(weight, "weight")
    hidden = input.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be 1-D of the hidden size {hidden}, got shape {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match the input's {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"all tensors must be on one device: input is on {input.device}, weight on {weight.device}")
    return weight if weight.stride(0) == 1 or hidden <= 1 else weight.contiguous()


def _module_for(input: torch.Tensor) -> _NormModule:
    """The module of the input's dtype, with the hidden size checked against its limit."""
    m = _norm_module(DTYPE_SHORT[input.dtype])
    hidden = input.shape[-1]
    if hidden > m.max_hidden:
        raise ValueError(f"hidden size {hidden} exceeds the largest supported, {m.max_hidden}")
    return m


def _launch_rmsnorm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, eps: float, weight_bias: float,
                    enable_pdl: Optional[bool]) -> None:
    """Launch on validated tensors (input/out: same shape, unit last stride; weight contiguous)."""
    rows, inner, s0, s1 = _rows(input)
    if rows == 0:
        return
    _, _, o0, o1 = _rows(out)
    m = _module_for(input)
    device = input.device
    rc = m.rmsnorm(input.data_ptr(), out.data_ptr(), weight.data_ptr(), s0, s1, o0, o1, rows, inner,
                   input.shape[-1], eps, weight_bias, resolve_pdl(enable_pdl, device), device.index,
                   current_stream_ptr(device))
    if rc:
        raise module_error(m.module, rc, f"rmsnorm ({m.module.spec.name()}) on {device}")


def _launch_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                              weight_bias: float, enable_pdl: Optional[bool]) -> None:
    rows, inner, s0, s1 = _rows(input)
    if rows == 0:
        return
    _, _, r0, r1 = _rows(residual)
    m = _module_for(input)
    device = input.device
    rc = m.fused_add(input.data_ptr(), residual.data_ptr(), weight.data_ptr(), s0, s1, r0, r1, rows, inner,
                     input.shape[-1], eps, weight_bias, resolve_pdl(enable_pdl, device), device.index,
                     current_stream_ptr(device))
    if rc:
        raise module_error(m.module, rc, f"fused_add_rmsnorm ({m.module.spec.name()}) on {device}")


@torch.library.custom_op("flashinfer::rmsnorm", mutates_args=("out",))
def _rmsnorm_op(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, eps: float, weight_bias: float,
                enable_pdl: Optional[bool]) -> None:
    _launch_rmsnorm(out, input, weight, eps, weight_bias, enable_pdl)


@_rmsnorm_op.register_fake
def _rmsnorm_fake(out, input, weight, eps, weight_bias, enable_pdl) -> None:
    return None


@torch.library.custom_op("flashinfer::fused_add_rmsnorm", mutates_args=("input", "residual"))
def _fused_add_rmsnorm_op(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          weight_bias: float, enable_pdl: Optional[bool]) -> None:
    _launch_fused_add_rmsnorm(input, residual, weight, eps, weight_bias, enable_pdl)


@_fused_add_rmsnorm_op.register_fake
def _fused_add_rmsnorm_fake(input, residual, weight, eps, weight_bias, enable_pdl) -> None:
    return None


def _rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: object, out: Optional[torch.Tensor],
             enable_pdl: Optional[bool], weight_bias: float) -> torch.Tensor:
    _check_rows(input, "input")
    dtype_short(input, "input")
    weight = _check_weight(weight, input)
    eps = scalar(eps, "eps", 1e-6)
    pdl = check_pdl_arg(enable_pdl)
    if input.shape[-1] == 0:
        raise ValueError(f"hidden size is 0 (input shape {tuple(input.shape)})")
    if input.stride(-1) != 1:
        input = input.contiguous()
    if out is None:
        out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    else:
        check_device_tensor(out, "out")
        if out.shape != input.shape or out.dtype != input.dtype or out.device != input.device:
            raise ValueError(f"out must be a {input.dtype} tensor of the input's shape {tuple(input.shape)} on "
                             f"{input.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if out.stride(-1) != 1:
            raise ValueError(f"out must be contiguous in its last dimension (stride 1), got strides {out.stride()}")
    if torch.compiler.is_compiling():
        _rmsnorm_op(out, input, weight, eps, weight_bias, pdl)
    else:
        _launch_rmsnorm(out, input, weight, eps, weight_bias, pdl)
    return out


def _fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: object,
                       enable_pdl: Optional[bool], weight_bias: float) -> None:
    _check_rows(input, "input")
    dtype_short(input, "input")
    check_device_tensor(residual, "residual")
    if residual.shape != input.shape or residual.dtype != input.dtype:
        raise ValueError(f"residual must match the input's shape {tuple(input.shape)} and dtype {input.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if residual.device != input.device:
        raise ValueError(f"all tensors must be on one device: input is on {input.device}, residual on {residual.device}")
    weight = _check_weight(weight, input)
    eps = scalar(eps, "eps", 1e-6)
    pdl = check_pdl_arg(enable_pdl)
    if input.shape[-1] == 0:
        raise ValueError(f"hidden size is 0 (input shape {tuple(input.shape)})")
    for name, t in (("input", input), ("residual", residual)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} is updated in place and must be contiguous in its last dimension (stride 1), "
                             f"got strides {t.stride()}")
    if torch.compiler.is_compiling():
        _fused_add_rmsnorm_op(input, residual, weight, eps, weight_bias, pdl)
    else:
        _launch_fused_add_rmsnorm(input, residual, weight, eps, weight_bias, pdl)


def rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
    enable_pdl: Optional[bool] = None,
) -> torch.Tensor:
    r"""Root mean square normalization: ``out[i] = input[i] / RMS(input) * weight[i]``.

    Parameters
    ----------
    input : torch.Tensor
        ``(batch_size, hidden_size)`` or ``(batch_size, num_heads, hidden_size)`` (QK-norm), float16 or bfloat16,
        on a CUDA device. Rows may be strided (e.g. a column slice); hidden_size up to 32768 (8192 when rows are
        not 16-byte aligned: hidden_size not a multiple of 8, or strides off 16 bytes).
    weight : torch.Tensor
        ``(hidden_size,)``, the input's dtype.
    eps : float
        Added to the mean square before the reciprocal square root.
    out : Optional[torch.Tensor]
        Output of the input's shape and dtype (last dimension contiguous); may be ``input`` itself.
    enable_pdl : Optional[bool]
        Launch as a programmatic dependent launch; ``None`` enables it on sm_90+ (ignored below sm_90).

    Returns
    -------
    torch.Tensor
        The normalized tensor, the input's shape and dtype (``out`` when given). Computed in float32.
    """
    return _rmsnorm(input, weight, eps, out, enable_pdl, 0.0)


def gemma_rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
    enable_pdl: Optional[bool] = None,
) -> torch.Tensor:
    r"""Gemma-style RMSNorm: ``out[i] = input[i] / RMS(input) * (weight[i] + 1)``.

    Parameters and result as :func:`rmsnorm`.

    Returns
    -------
    torch.Tensor
        The normalized tensor, the input's shape and dtype (``out`` when given).
    """
    return _rmsnorm(input, weight, eps, out, enable_pdl, 1.0)


def fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: Optional[bool] = None,
) -> None:
    r"""Residual add fused with RMSNorm, both in place:

    ``residual[i] += input[i]``, then ``input[i] = residual[i] / RMS(residual) * weight[i]``
    (the norm uses the float32 sum, before it is rounded into ``residual``).

    Parameters
    ----------
    input : torch.Tensor
        ``(batch_size, hidden_size)`` or ``(batch_size, num_heads, hidden_size)``, float16 or bfloat16, last
        dimension contiguous (rows may be strided). Overwritten with the normalized sum.
    residual : torch.Tensor
        The input's shape and dtype, last dimension contiguous. Overwritten with ``input + residual``.
    weight : torch.Tensor
        ``(hidden_size,)``, the input's dtype.
    eps : float
        Added to the mean square before the reciprocal square root.
    enable_pdl : Optional[bool]
        Launch as a programmatic dependent launch; ``None`` enables it on sm_90+.
    """
    _fused_add_rmsnorm(input, residual, weight, eps, enable_pdl, 0.0)


def gemma_fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    enable_pdl: Optional[bool] = None,
) -> None:
    r"""Gemma-style fused add RMSNorm, in place: ``residual += input``, then
    ``input = residual / RMS(residual) * (weight + 1)``.

    Parameters as :func:`fused_add_rmsnorm`.
    """
    _fused_add_rmsnorm(input, residual, weight, eps, enable_pdl, 1.0)

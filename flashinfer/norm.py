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
    current_stream_at,
    dlpack_exchange_api,
    dtype_short,
    module_error,
    resolve_pdl_at,
    scalar,
    tracing,
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
        Launcher(
            "flashinfer_rmsnorm",
            "const void* input, void* out, const void* weight, int64_t input_stride0, int64_t input_stride1, "
            "int64_t out_stride0, int64_t out_stride1, int rows, int inner, int hidden, float eps, "
            "float weight_bias, int enable_pdl, int device, void* stream",
        ),
        Launcher(
            "flashinfer_fused_add_rmsnorm",
            "void* input, void* residual, const void* weight, int64_t input_stride0, int64_t input_stride1, "
            "int64_t residual_stride0, int64_t residual_stride1, int rows, int inner, int hidden, float eps, "
            "float weight_bias, int enable_pdl, int device, void* stream",
        ),
        # The same launches from the tensors themselves (the hot path of eager calls): the PyObject* of each tensor
        # and torch's DLPack exchange table; declined (a non-zero return, nothing launched) unless the plain case.
        Launcher(
            "flashinfer_rmsnorm_dlpack",
            "const void* api, const void* input, const void* out, const void* weight, double eps, float weight_bias, "
            "int enable_pdl",
            keeps_gil=True,
        ),
        Launcher(
            "flashinfer_fused_add_rmsnorm_dlpack",
            "const void* api, const void* input, const void* residual, const void* weight, double eps, "
            "float weight_bias, int enable_pdl",
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


class _NormModule:
    """A loaded norm module's launchers (positional calls, in declaration order) and limits."""

    __slots__ = ("module", "rmsnorm", "fused_add", "max_hidden")

    def __init__(self, dtype: str) -> None:
        self.module = jit.load(NormSpec(dtype=dtype))
        self.rmsnorm = self.module.launcher("flashinfer_rmsnorm").call
        self.fused_add = self.module.launcher("flashinfer_fused_add_rmsnorm").call
        self.max_hidden = self.module.constants["max_hidden"]


class _DlpackEntries:
    """A module's "_dlpack" entry points as the eager fast path calls them: the packed entry (one ctypes argument,
    GIL held) and the struct that packs its block (``pack(api, id(a), id(b), id(weight), eps, weight_bias, pdl)``)."""

    __slots__ = ("rmsnorm", "fused_add", "pack")

    def __init__(self, module: Any) -> None:
        rms = module.launcher("flashinfer_rmsnorm_dlpack")
        fused = module.launcher("flashinfer_fused_add_rmsnorm_dlpack")
        self.rmsnorm, self.fused_add = rms.packed, fused.packed
        self.pack = rms.launcher.packing.pack  # (both take the same C parameter types)


@functools.cache
def _norm_module(dtype: str) -> _NormModule:
    return _NormModule(dtype)


def _rows(shape: torch.Size, stride: Tuple[int, ...]) -> Tuple[int, int, int, int]:
    """(rows, inner, stride0, stride1) of a 2-D ``[rows, hidden]`` or 3-D ``[batch, heads, hidden]`` tensor:
    row r is at (r // inner) * stride0 + (r % inner) * stride1."""
    if len(shape) == 2:
        return shape[0], 1, stride[0], 0
    return shape[0] * shape[1], shape[1], stride[0], stride[1]


def _check_input(t: Any) -> torch.Size:
    """A 2-D/3-D float16/bfloat16 CUDA tensor with a non-empty last dimension; returns its shape."""
    check_device_tensor(t, "input")
    shape = t.size()  # .size() is half the cost of .shape
    if len(shape) not in (2, 3):
        raise ValueError(
            f"input must be 2-D (batch_size, hidden_size) or 3-D (batch_size, num_heads, hidden_size), "
            f"got shape {tuple(shape)}"
        )
    if t.dtype not in DTYPE_SHORT:
        dtype_short(t, "input")  # raises the dtype error
    if shape[-1] == 0:
        raise ValueError(f"hidden size is 0 (input shape {tuple(shape)})")
    if (shape[0] if len(shape) == 2 else shape[0] * shape[1]) >= 2**31:
        raise ValueError(f"input shape {tuple(shape)}: more than 2**31 - 1 rows")
    return shape


def _check_weight(weight: Any, input: torch.Tensor, hidden: int, device: int) -> torch.Tensor:
    check_device_tensor(weight, "weight")
    wshape = weight.shape  # (one read; .dim()/.size(0) would parse an argument each)
    if len(wshape) != 1 or wshape[0] != hidden:
        raise ValueError(f"weight must be 1-D of the hidden size {hidden}, got shape {tuple(wshape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match the input's {input.dtype}")
    if weight.get_device() != device:
        raise ValueError(f"all tensors must be on one device: input is on {input.device}, weight on {weight.device}")
    return weight if hidden <= 1 or weight.stride()[0] == 1 else weight.contiguous()


# dtype -> loaded module: a dict read per call instead of the lru_cache'd builder.
_MODULES: Dict[torch.dtype, _NormModule] = {}
# dtype -> its module's _dlpack entry points, filled when the Python path first loads the module (so the first call
# of a dtype takes that path) and only where torch has the DLPack exchange table (_DLPACK[0]: its address).
_DLPACK: Dict[torch.dtype, _DlpackEntries] = {}
_DLPACK_API = [0]


def _module_for(dtype: torch.dtype, hidden: int) -> _NormModule:
    """The module of the dtype, with the hidden size checked against its limit."""
    m = _MODULES.get(dtype)
    if m is None:
        m = _MODULES[dtype] = _norm_module(DTYPE_SHORT[dtype])
        _DLPACK_API[0] = api = dlpack_exchange_api()
        if api and m.module.launcher("flashinfer_rmsnorm_dlpack").packed is not None:
            _DLPACK[dtype] = _DlpackEntries(m.module)
    if hidden > m.max_hidden:
        raise ValueError(f"hidden size {hidden} exceeds the largest supported, {m.max_hidden}")
    return m


def _launch(
    fused_add: bool,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_bias: float,
    enable_pdl: Optional[bool],
    shape: torch.Size,
    a_stride: Tuple[int, ...],
    b_stride: Tuple[int, ...],
    device: Optional[int] = None,
) -> None:
    """Launch on validated tensors of ``shape`` with unit last stride (weight contiguous): rmsnorm(input=a,
    out=b), or the fused add of input a and residual b. ``device``: a's device index, when the caller has it."""
    if len(shape) == 2:  # (rows, inner, stride0, stride1) as _rows gives them, without the call
        rows, inner, a0, a1, b0, b1 = shape[0], 1, a_stride[0], 0, b_stride[0], 0
    else:
        rows, inner, a0, a1 = _rows(shape, a_stride)
        _, _, b0, b1 = _rows(shape, b_stride)
    if rows == 0:
        return
    hidden = shape[-1]
    m = _module_for(a.dtype, hidden)
    if device is None:
        device = a.get_device()
    fn = m.fused_add if fused_add else m.rmsnorm
    rc = fn(
        a.data_ptr(),
        b.data_ptr(),
        weight.data_ptr(),
        a0,
        a1,
        b0,
        b1,
        rows,
        inner,
        hidden,
        eps,
        weight_bias,
        resolve_pdl_at(enable_pdl, device),
        device,
        current_stream_at(device),
    )
    if rc:
        what = "fused_add_rmsnorm" if fused_add else "rmsnorm"
        raise module_error(m.module, rc, f"{what} ({m.module.spec.name()}) on {a.device}")


@torch.library.custom_op("flashinfer::rmsnorm", mutates_args=("out",))
def _rmsnorm_op(
    out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_bias: float,
    enable_pdl: Optional[bool],
) -> None:
    _launch(False, input, out, weight, eps, weight_bias, enable_pdl, input.shape, input.stride(), out.stride())


@_rmsnorm_op.register_fake
def _rmsnorm_fake(out, input, weight, eps, weight_bias, enable_pdl) -> None:
    return None


@torch.library.custom_op("flashinfer::fused_add_rmsnorm", mutates_args=("input", "residual"))
def _fused_add_rmsnorm_op(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    weight_bias: float,
    enable_pdl: Optional[bool],
) -> None:
    _launch(True, input, residual, weight, eps, weight_bias, enable_pdl, input.shape, input.stride(), residual.stride())


@_fused_add_rmsnorm_op.register_fake
def _fused_add_rmsnorm_fake(input, residual, weight, eps, weight_bias, enable_pdl) -> None:
    return None


def _rmsnorm(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: object,
    out: Optional[torch.Tensor],
    enable_pdl: Optional[bool],
    weight_bias: float,
) -> torch.Tensor:
    # Eager fast path: the module reads the tensors itself (one ctypes call); anything but the plain case (another
    # type, dtype, device, shape or stride; eps not a float) is declined and checked below, as is a traced call.
    if not tracing():
        try:
            entries = _DLPACK[input.dtype]
        except (AttributeError, KeyError, TypeError):
            entries = None
        if entries is not None and type(eps) is float:
            pdl = 2 if enable_pdl is None else 1 if enable_pdl is True else 0 if enable_pdl is False else -1
            if pdl >= 0:
                o = torch.empty_like(input) if out is None else out
                try:
                    declined = entries.rmsnorm(
                        entries.pack(_DLPACK_API[0], id(input), id(o), id(weight), eps, weight_bias, pdl)
                    )
                except Exception:  # an argument torch cannot view (not a tensor...): the checks below say why
                    declined = 1
                if not declined:
                    return o
    return _rmsnorm_checked(input, weight, eps, out, enable_pdl, weight_bias)


def _rmsnorm_checked(
    input: torch.Tensor,
    weight: torch.Tensor,
    eps: object,
    out: Optional[torch.Tensor],
    enable_pdl: Optional[bool],
    weight_bias: float,
) -> torch.Tensor:
    """rmsnorm's full path: every check, copies where needed, the custom op when traced."""
    shape = _check_input(input)
    device = input.get_device()
    weight = _check_weight(weight, input, shape[-1], device)
    eps = scalar(eps, "eps", 1e-6)
    pdl = check_pdl_arg(enable_pdl)
    stride = input.stride()
    if stride[-1] != 1 and shape[-1] > 1:
        input = input.contiguous()
        stride = input.stride()
    if out is None:
        # A new contiguous tensor, its strides known without asking it. empty_like, not torch.empty(shape, dtype=,
        # device=): a torch.Size argument and a device keyword cost a factory call several times empty_like's.
        out_stride = (shape[1], 1) if len(shape) == 2 else (shape[1] * shape[2], shape[2], 1)
        if stride == out_stride:
            out = torch.empty_like(input)
        else:
            out = torch.empty_like(input, memory_format=torch.contiguous_format)
    else:
        check_device_tensor(out, "out")
        if out.size() != shape or out.dtype != input.dtype or out.get_device() != device:
            raise ValueError(
                f"out must be a {input.dtype} tensor of the input's shape {tuple(shape)} on "
                f"{input.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        out_stride = out.stride()
        if out_stride[-1] != 1 and shape[-1] > 1:
            raise ValueError(f"out must be contiguous in its last dimension (stride 1), got strides {out_stride}")
    if tracing():
        _rmsnorm_op(out, input, weight, eps, weight_bias, pdl)
    else:
        _launch(False, input, out, weight, eps, weight_bias, pdl, shape, stride, out_stride, device)
    return out


def _fused_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: object,
    enable_pdl: Optional[bool],
    weight_bias: float,
) -> None:
    if not tracing():  # the eager fast path, as in _rmsnorm
        try:
            entries = _DLPACK[input.dtype]
        except (AttributeError, KeyError, TypeError):
            entries = None
        if entries is not None and type(eps) is float:
            pdl = 2 if enable_pdl is None else 1 if enable_pdl is True else 0 if enable_pdl is False else -1
            if pdl >= 0:
                try:
                    declined = entries.fused_add(
                        entries.pack(_DLPACK_API[0], id(input), id(residual), id(weight), eps, weight_bias, pdl)
                    )
                except Exception:  # (as above)
                    declined = 1
                if not declined:
                    return
    _fused_add_rmsnorm_checked(input, residual, weight, eps, enable_pdl, weight_bias)


def _fused_add_rmsnorm_checked(
    input: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: object,
    enable_pdl: Optional[bool],
    weight_bias: float,
) -> None:
    """fused_add_rmsnorm's full path: every check, the custom op when traced."""
    shape = _check_input(input)
    check_device_tensor(residual, "residual")
    if residual.size() != shape or residual.dtype != input.dtype:
        raise ValueError(
            f"residual must match the input's shape {tuple(shape)} and dtype {input.dtype}, got "
            f"{tuple(residual.shape)} {residual.dtype}"
        )
    device = input.get_device()
    if residual.get_device() != device:
        raise ValueError(
            f"all tensors must be on one device: input is on {input.device}, residual on {residual.device}"
        )
    weight = _check_weight(weight, input, shape[-1], device)
    eps = scalar(eps, "eps", 1e-6)
    pdl = check_pdl_arg(enable_pdl)
    stride, rstride = input.stride(), residual.stride()
    if (stride[-1] != 1 or rstride[-1] != 1) and shape[-1] > 1:
        raise ValueError(
            f"input and residual are updated in place and must be contiguous in their last dimension "
            f"(stride 1), got strides {stride} and {rstride}"
        )
    if tracing():
        _fused_add_rmsnorm_op(input, residual, weight, eps, weight_bias, pdl)
    else:
        _launch(True, input, residual, weight, eps, weight_bias, pdl, shape, stride, rstride, device)


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

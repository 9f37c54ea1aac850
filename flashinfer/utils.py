"""Shared helpers of the API modules: FlashInfer's enums (``PosEncodingMode``, ``TensorLayout``, ``MaskMode``),
dtype names, host index tensors, input validation, devices and streams. One place for each of them: the
attention modules import these instead of keeping their own copies."""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .jit.env import env_bool as _env_bool


class PosEncodingMode(enum.Enum):
    """Position encoding applied inside the attention kernels (FlashInfer's values)."""

    NONE = 0
    ROPE_LLAMA = 1
    ALIBI = 2


class TensorLayout(enum.Enum):
    """KV layout: ``NHD`` = ``[..., tokens, heads, head_dim]``, ``HND`` = ``[..., heads, tokens, head_dim]``."""

    NHD = 0
    HND = 1


class MaskMode(enum.Enum):
    """Attention mask of the prefill kernels (FlashInfer's values; ``MULTIITEMSCORING`` is not implemented)."""

    NON_CAUSAL = 0
    CAUSAL = 1
    CUSTOM = 2
    MULTIITEMSCORING = 3


# RoPE positions are carried as floats in the kernels and must be exact: positions up to 2**24.
MAX_ROPE_POSITION = 1 << 24


# Short names used in spec names and the CLI, and the CUDA types the templates are stamped with. DTYPE_SHORT: the
# dtypes of q, the output and a 16-bit KV cache; FP8_DTYPE_SHORT: the fp8 KV caches, which only the paths that
# name FP8_KV_PATHS read (every other path refuses them with an error naming those).
DTYPE_SHORT = {torch.float16: "f16", torch.bfloat16: "bf16"}
FP8_DTYPE_SHORT = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
KV_DTYPE_SHORT = {**DTYPE_SHORT, **FP8_DTYPE_SHORT}
DTYPE_CUDA = {"f16": "__half", "bf16": "__nv_bfloat16", "e4m3": "__nv_fp8_e4m3", "e5m2": "__nv_fp8_e5m2"}
FP8_KV_PATHS = (
    "single_decode_with_kv_cache, BatchDecodeWithPagedKVCacheWrapper, single_prefill_with_kv_cache, "
    "BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper, the cascade wrappers "
    "(flashinfer.cascade) and append_paged_kv_cache"
)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
_POS_ENCODING_CUDA = {"NONE": "kNone", "ROPE_LLAMA": "kRopeLlama", "ALIBI": "kAlibi"}


def pos_encoding_cuda(mode: str) -> str:
    return _POS_ENCODING_CUDA[mode]


def cuda_bool(flag: bool) -> str:
    return "true" if flag else "false"


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


_POS_ENCODING_NAMES = tuple(m.name for m in PosEncodingMode)
_LAYOUT_NAMES = tuple(m.name for m in TensorLayout)


def _enum_name(value: object, enum_cls: type, names: Tuple[str, ...]) -> Optional[str]:
    """The member name of ``enum_cls`` that value spells (its name in any case, a member, or its integer
    value). Strings are checked against the plain tuple ``names`` first: torch.compile traces this, and
    dynamo cannot trace ``Enum.__members__``."""
    if isinstance(value, str):
        return value.upper() if value.upper() in names else None
    if isinstance(value, enum_cls):
        return value.name
    if isinstance(value, int) and not isinstance(value, bool):
        for m in enum_cls:
            if m.value == value:
                return m.name
    return None


def canonical_pos_encoding(mode: Union[str, int, PosEncodingMode]) -> str:
    """``"NONE"``/``"ROPE_LLAMA"``/``"ALIBI"`` from a string, a PosEncodingMode or its integer value."""
    name = _enum_name(mode, PosEncodingMode, _POS_ENCODING_NAMES)
    if name is not None:
        return name
    raise ValueError(f"pos_encoding_mode must be one of {list(_POS_ENCODING_CUDA)}, got {mode!r}")


def canonical_layout(layout: Union[str, int, TensorLayout]) -> str:
    """``"NHD"`` or ``"HND"`` from a string, a TensorLayout or its integer value."""
    name = _enum_name(layout, TensorLayout, _LAYOUT_NAMES)
    if name is not None:
        return name
    raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {layout!r}")


_DTYPE_NAMES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "e4m3": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
}


def canonical_dtype(x: Any, name: str, default: Optional[torch.dtype] = None, allow_fp8: bool = False) -> torch.dtype:
    """A supported attention dtype from a ``torch.dtype`` or its name (``"float16"``, ``"torch.bfloat16"``,
    ``"bf16"``, ``"float8_e4m3fn"``, ``"e5m2"``...); ``None`` gives ``default`` (an error when there is none).

    Parameters
    ----------
    x : torch.dtype, str or None
        The dtype or its name.
    name : str
        The argument's name, for messages.
    default : torch.dtype, optional
        What None means.
    allow_fp8 : bool
        Whether torch.float8_e4m3fn / torch.float8_e5m2 are accepted (a KV cache of a path that reads fp8); else
        they raise TypeError naming the paths that do.

    Returns
    -------
    torch.dtype
    """
    if x is None:
        if default is None:
            raise TypeError(f"{name} is required (torch.float16 or torch.bfloat16)")
        return default
    if isinstance(x, torch.dtype):
        dt = x
    elif isinstance(x, str) and x.lower().replace("torch.", "") in _DTYPE_NAMES:
        dt = _DTYPE_NAMES[x.lower().replace("torch.", "")]
    elif isinstance(x, str) and isinstance(getattr(torch, x.replace("torch.", ""), None), torch.dtype):
        dt = getattr(torch, x.replace("torch.", ""))
    else:
        raise TypeError(f"{name} must be torch.float16/torch.bfloat16 or its name, got {x!r}")
    if dt in DTYPE_SHORT or (allow_fp8 and dt in FP8_DTYPE_SHORT):
        return dt
    raise _unsupported_dtype(f"{name} {dt}", dt, allow_fp8)


def _unsupported_dtype(what: str, dt: torch.dtype, allow_fp8: bool) -> TypeError:
    """The error for a dtype the caller does not take: what is accepted, and for fp8 which paths read it."""
    if dt in FP8_DTYPE_SHORT:
        return TypeError(
            f"{what} is not supported here; supported: torch.float16, torch.bfloat16 (fp8 KV caches are read by "
            f"{FP8_KV_PATHS})"
        )
    accepted = "torch.float16, torch.bfloat16" + (", torch.float8_e4m3fn, torch.float8_e5m2" if allow_fp8 else "")
    return TypeError(f"{what} is not supported; supported: {accepted}")


def host_int32(t: Any, name: str) -> torch.Tensor:
    """A 1-D index tensor (int32 or int64, any device) as a contiguous int32 CPU tensor. A CUDA tensor costs
    one device-to-host copy (a sync): plan() callers pass CPU tensors to avoid it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor (torch.int32), got {t.dtype}")
    if not t.is_cpu:
        t = t.to("cpu")
    if t.dtype != torch.int32:
        bad = torch.nonzero((t > INT32_MAX) | (t < -(2**31)))
        if bad.numel():
            at = int(bad[0, 0])
            check_int32_values([int(t[at])], name, first=at)  # (raises, naming the entry)
        t = t.to(torch.int32)
    return t if t.is_contiguous() else t.contiguous()


_RANGE_BUFS: Dict[Tuple[str, torch.device], torch.Tensor] = {}


def _get_range_buf(seq_len: int, device: Union[str, torch.device]) -> torch.Tensor:
    """``arange(seq_len)`` int32 on ``device``, a view of a cached buffer (FlashInfer's helper of that name)."""
    device = torch.device(device)
    n = 1 << max(0, int(seq_len) - 1).bit_length()
    buf = _RANGE_BUFS.get(("range", device))
    if buf is None or buf.numel() < n:
        buf = _RANGE_BUFS[("range", device)] = torch.arange(n, dtype=torch.int32, device=device)
    return buf[:seq_len]


@functools.cache
def _capability(device_index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_support_pdl(device: torch.device) -> bool:
    """Whether ``device`` supports programmatic dependent launch (sm_90 and newer)."""
    return device.type == "cuda" and _capability(device.index if device.index is not None else 0)[0] >= 9


def not_supported(name: str, value: Any, accepted: str) -> NotImplementedError:
    """The error for an argument FlashInfer accepts but this implementation does not (never ignored)."""
    return NotImplementedError(f"{name}={value!r} is not implemented here; accepted: {accepted}")


def dtype_short(t: torch.Tensor, name: str, allow_fp8: bool = False) -> str:
    """The short name of a tensor's dtype (``"bf16"``...); fp8 (``"e4m3"``, ``"e5m2"``) only with ``allow_fp8``
    (a KV cache of a path that reads fp8), else TypeError naming the paths that do."""
    short = KV_DTYPE_SHORT.get(t.dtype) if allow_fp8 else DTYPE_SHORT.get(t.dtype)
    if short is None:
        raise _unsupported_dtype(f"{name} of dtype {t.dtype}", t.dtype, allow_fp8)
    return short


def check_tensor(t: object, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:  # (cheaper than t.device.type: no device object)
        raise ValueError(f"{name} is on {t.device}; the kernels run on CUDA devices only")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_same_device(named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> torch.device:
    """All given tensors on one device; returns it."""
    present = [(n, t) for n, t in named if t is not None]
    device = present[0][1].device
    for n, t in present[1:]:
        if t.device != device:
            raise ValueError(
                f"all tensors must be on one device: {present[0][0]} is on {device} but {n} is on {t.device}"
            )
    return device


def check_vector_rows(t: torch.Tensor, name: str, leading_dims: int) -> None:
    """The kernels read rows with 16-byte loads: last dim contiguous, other strides and the base aligned."""
    stride, shape = t.stride(), t.shape  # (one read each: t.size(d)/t.stride(d) parse their argument per call)
    if stride[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {stride}")
    align = 16 // t.element_size()
    for d in range(leading_dims):
        if shape[d] > 1 and stride[d] % align != 0:
            raise ValueError(
                f"{name} stride {stride[d]} of dim {d} is not a multiple of {align} elements (16 bytes); "
                f"got strides {stride}. Pass a tensor whose rows start 16-byte aligned, e.g. .contiguous()"
            )
    check_aligned(t, name)


def aligned_rows(t: torch.Tensor, leading_dims: int) -> torch.Tensor:
    """``t`` itself when its rows suit 16-byte vector loads (what check_vector_rows demands), else a contiguous
    copy (for inputs that a kernel accepts as any view, passed on to one that needs aligned rows)."""
    align = 16 // t.element_size()
    ok = t.stride(-1) == 1 and all(t.size(d) <= 1 or t.stride(d) % align == 0 for d in range(leading_dims))
    if ok and (tracing() or t.data_ptr() % 16 == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


try:  # whether a Python dispatch mode (fake tensors, make_fx's proxy, functionalization, ...) is active: one call
    _python_key_included = torch._C._dispatch_tls_is_dispatch_key_included
    _PYTHON_KEY = torch._C.DispatchKey.Python
except AttributeError:  # (a torch without them: torch.compile's flag alone)
    _python_key_included = None


# (Bound once: dynamo recognises the function itself, under any name, and folds it to True while it traces.)
_is_compiling = torch.compiler.is_compiling


def tracing() -> bool:
    """Whether this call is being traced rather than run: torch.compile/export (dynamo), or a Python dispatch mode
    is active (fake tensors, make_fx's proxy tracing, functionalization; also a user's mode). The public ops then go
    through their ``torch.library`` custom op (which such tracers record, mutations declared); otherwise they
    launch directly, skipping the dispatcher's several microseconds per call. One rule for every family."""
    if _python_key_included is None:
        return _is_compiling()
    return _is_compiling() or _python_key_included(_PYTHON_KEY)


def check_aligned(t: torch.Tensor, name: str) -> None:
    """16-byte aligned base pointer (a no-op while traced: fake tensors have no address; the op's eager
    implementation checks again)."""
    if not tracing() and t.data_ptr() % 16 != 0:
        raise ValueError(
            f"{name} data pointer must be 16-byte aligned; got a view at element offset {t.storage_offset()}"
        )


def check_out(
    out: Optional[torch.Tensor], name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}; got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}, contiguous={out.is_contiguous()}"
        )


def workspace_too_small(have_bytes: int, need_bytes: int) -> ValueError:
    """The error of a plan whose schedule does not fit the caller's float_workspace_buffer."""
    return ValueError(
        f"float_workspace_buffer holds {have_bytes} bytes; this plan needs {need_bytes} bytes: pass a larger buffer"
    )


def scalar(x: object, name: str, default: float) -> float:
    """A Python number or a one-element (0-d or 1-element) CPU tensor, as a float. A CUDA tensor is refused
    (TypeError naming the argument): reading its value on the host would synchronize the device on every call."""
    if type(x) is float and math.isfinite(x):  # the common case, first: this runs on every per-token op call
        return x
    if x is None:
        return float(default)
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(
                f"{name} is a tensor on {x.device}: reading it on the host would synchronize the device on every "
                f"call; pass a Python float or a one-element CPU tensor (e.g. the layer's scale as a float)"
            )
        if x.numel() != 1:
            raise TypeError(f"{name} must be a Python number or a one-element CPU tensor, got shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_logit_options(
    head_dim: int,
    pos_encoding_mode: str,
    window_left: object,
    logits_soft_cap: object,
    sm_scale: object,
    rope_scale: object,
    rope_theta: object,
    max_window: int = 2**31 - 1,
) -> Tuple[int, float, float, float, float]:
    """The attention options every kernel takes, checked: returns (window_left clamped to max_window, soft cap
    (0: off), sm_scale (default 1/sqrt(head_dim)), rope_scale, rope_theta)."""
    if isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"window_left must be an int >= -1 (-1: no window), got {window_left!r}")
    window_left = min(window_left, max_window)
    soft_cap = scalar(logits_soft_cap, "logits_soft_cap", 0.0)
    if soft_cap < 0:
        raise ValueError(f"logits_soft_cap must be > 0 (or None/0 to disable), got {soft_cap}")
    scale = scalar(sm_scale, "sm_scale", 1.0 / math.sqrt(head_dim))
    r_scale = scalar(rope_scale, "rope_scale", 1.0)
    r_theta = scalar(rope_theta, "rope_theta", 1e4)
    if pos_encoding_mode == "ROPE_LLAMA" and (r_scale <= 0 or r_theta <= 0):
        raise ValueError(f"rope_scale and rope_theta must be > 0, got {r_scale} and {r_theta}")
    return window_left, soft_cap, scale, r_scale, r_theta


def check_fp8_q(q_dtype: torch.dtype, kv_dtype: Any, what: str) -> None:
    """fp8 queries are not implemented anywhere here: NotImplementedError naming the combination."""
    if q_dtype in FP8_DTYPE_SHORT:
        raise NotImplementedError(
            f"{what}: q {q_dtype} with KV {kv_dtype} is not implemented; q (and the output) must be torch.float16 "
            f"or torch.bfloat16 (fp8 is supported for the KV cache only)"
        )


def check_kv_dtype_rule(
    q_dtype: torch.dtype, kv_dtype: torch.dtype, what: str, q_name: str = "q", kv_name: str = "k"
) -> None:
    """The attention dtype rule (``what`` names the call, ``q_name``/``kv_name`` its arguments, for messages): q
    16-bit; the KV cache q's dtype or fp8 (e4m3/e5m2). An fp8 q raises NotImplementedError, any other mix
    TypeError."""
    check_fp8_q(q_dtype, kv_dtype, what)
    if kv_dtype != q_dtype and kv_dtype not in FP8_DTYPE_SHORT:
        raise TypeError(
            f"{what}: {kv_name} {kv_dtype} with {q_name} {q_dtype}; the KV dtype must be q's (float16 or "
            "bfloat16) or fp8 (torch.float8_e4m3fn, torch.float8_e5m2)"
        )


def plan_dtypes(q_data_type: Any, kv_data_type: Any, what: str) -> Tuple[torch.dtype, torch.dtype]:
    """plan()'s q_data_type and kv_data_type (torch dtypes or names; q defaults to float16, kv to q's) under
    :func:`check_kv_dtype_rule`."""
    q_dtype = canonical_dtype(q_data_type, "q_data_type", torch.float16, allow_fp8=True)
    kv_dtype = canonical_dtype(kv_data_type, "kv_data_type", q_dtype, allow_fp8=True)
    check_kv_dtype_rule(q_dtype, kv_dtype, what, "q_data_type", "kv_data_type")
    return q_dtype, kv_dtype


def check_kv_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> Tuple[str, str]:
    """The attention dtype rule of the single-request functions (``what``, for messages): k and v share one
    dtype, under :func:`check_kv_dtype_rule`. Returns the short names of q's and the KV's dtypes."""
    check_fp8_q(q.dtype, k.dtype, what)
    dq, dk = dtype_short(q, "q"), dtype_short(k, "k", True)
    if v.dtype != k.dtype:
        raise TypeError(f"{what}: k and v must share one dtype; got k {k.dtype}, v {v.dtype}")
    check_kv_dtype_rule(q.dtype, k.dtype, what)
    return dq, dk


def check_kv(k: torch.Tensor, v: torch.Tensor, kv_layout: str, num_qo_heads: int, head_dim: int) -> Tuple[int, int]:
    """k/v of one request (``[kv_len, num_kv_heads, head_dim]`` NHD or ``[num_kv_heads, kv_len, head_dim]`` HND)
    against q's heads and head_dim; returns (kv_len, num_kv_heads)."""
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[2]} does not match q's head_dim {head_dim}")
    if kv_layout == "NHD":
        kv_len, num_kv_heads = k.shape[0], k.shape[1]
    else:
        num_kv_heads, kv_len = k.shape[0], k.shape[1]
    if num_kv_heads == 0 or num_qo_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_qo_heads ({num_qo_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads}) "
            f"(kv_layout={kv_layout!r}: k is "
            f"{'[kv_len, num_kv_heads, head_dim]' if kv_layout == 'NHD' else '[num_kv_heads, kv_len, head_dim]'})"
        )
    return kv_len, num_kv_heads


def check_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {list(SUPPORTED_HEAD_DIMS)}")


def current_stream_ptr(device: torch.device) -> int:
    """Raw cudaStream_t of the device's current stream (not of the current device's)."""
    return current_stream_at(device.index)


def current_stream_at(index: int) -> int:
    """Raw cudaStream_t of the current stream of CUDA device ``index`` (``tensor.get_device()``: cheaper than
    building a torch.device on every launch)."""
    try:
        # Skips building a torch.cuda.Stream object: a few microseconds on every launch.
        return torch._C._cuda_getCurrentRawStream(index)
    except AttributeError:  # older or future torch without the private binding
        return torch.cuda.current_stream(index).cuda_stream


@functools.cache
def dlpack_exchange_api() -> int:
    """Address of torch's DLPack C exchange table (``torch.Tensor.__dlpack_c_exchange_api__``, a capsule named
    ``"dlpack_exchange_api"``; torch 2.11 and newer), which the per-token ops' "_dlpack" entry points read tensors
    through (``templates/include/flashinfer/host/dlpack.cuh``); 0 when this torch has none or not DLPack 1.x (the
    ops then take their Python path only). ``FLASHINFER_DLPACK_LAUNCH=0`` turns that fast path off."""
    if not _env_bool("FLASHINFER_DLPACK_LAUNCH", True):
        return 0
    capsule = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    if capsule is None:
        return 0
    import ctypes

    # Prototypes of our own: setting restype/argtypes on ctypes.pythonapi's functions would change them for every
    # other user of that shared object in the process.
    capsule_fn = ctypes.PYFUNCTYPE
    is_valid = capsule_fn(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_IsValid", ctypes.pythonapi))
    get_pointer = capsule_fn(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    name = b"dlpack_exchange_api"
    if not is_valid(capsule, name):
        return 0
    address = get_pointer(capsule, name) or 0
    if address and ctypes.c_uint32.from_address(address).value != 1:  # header.version.major: the layout we know
        return 0
    return address


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ------------------------------------------------------------------ helpers of the per-token op families


def check_device_tensor(t: object, name: str) -> torch.Tensor:
    """A tensor on a CUDA device (any shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:  # a third of the cost of t.device.type: this runs for every tensor of every call
        raise ValueError(f"{name} is on {t.device}; the kernels run on CUDA devices only")
    return t


_PDL_DEVICES: dict = {}


def check_pdl_arg(enable_pdl: object) -> Optional[bool]:
    if enable_pdl is not None and not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be None or a bool, got {type(enable_pdl).__name__}")
    return enable_pdl


def resolve_pdl(enable_pdl: Optional[bool], device: torch.device) -> bool:
    """FlashInfer's ``enable_pdl``: None (and True) mean "where the GPU supports it" (sm_90+); False disables.
    Asks the device (once per device): call it at launch, not while torch.compile traces."""
    return resolve_pdl_at(enable_pdl, device.index)


def resolve_pdl_at(enable_pdl: Optional[bool], index: int) -> bool:
    """:func:`resolve_pdl` for CUDA device ``index``."""
    if enable_pdl is False:
        return False
    ok = _PDL_DEVICES.get(index)
    if ok is None:
        ok = _PDL_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return ok


def module_error(module, code: int, what: str) -> Exception:
    """The exception for a launcher's non-zero return: ValueError for the module's own codes (bad input it
    alone could see, e.g. alignment), RuntimeError for a CUDA error."""
    text = module.error_string(code)
    cls = ValueError if code >= 1000 else RuntimeError
    return cls(f"{what}: {'CUDA error ' if cls is RuntimeError else ''}{code}: {text}")


# ------------------------------------------------------------------------------------------------------------
# Page tables and lengths that reach a kernel
#
# The kernels index tokens with 32-bit ints and read pages through int32 ids. What the host can see is checked
# here, before any narrowing or launch; what it cannot see without a device sync (page ids already on the GPU)
# is bounded in every kernel that reads or writes through a page table: an id outside [0, num_pages) is never
# dereferenced and its keys read as zeros (K = 0 and V = 0: each such key adds weight exp(-max logit) and nothing
# to the output, a finite, deterministic result). FlashInfer leaves such ids undefined. With
# FLASHINFER_CHECK_INPUTS=1 run() also checks device page ids (one sync) and names the first invalid one.

INT32_MAX = 2**31 - 1
# Keys of one request: positions are int32 in the kernels, which step a KV tile (at most 64 Ki keys) past the
# last key; a longer request would overflow there, so every plan() refuses it.
MAX_KV_LEN = 2**31 - 2**16


def check_int32_values(values: Sequence[int], name: str, first: int = 0) -> None:
    """Raise ValueError naming ``name``'s first entry outside int32, instead of narrowing it (or torch's
    ``value cannot be converted to type int32``).

    Parameters
    ----------
    values : sequence of int
        Host values (indptr arrays, lengths) about to be stored as int32.
    name : str
        The argument's name, for the message.
    first : int
        The position of ``values[0]`` in the argument (for the message).
    """
    for i, v in enumerate(values, first):
        if not -(2**31) <= v <= INT32_MAX:
            raise ValueError(
                f"{name}[{i}] = {v} does not fit int32 (the kernels index with 32-bit ints; accepted: "
                f"[-2**31, 2**31 - 1])"
            )


def check_kv_lengths(kv_lens: Sequence[int], what: str = "request") -> None:
    """Raise ValueError for the first request whose KV length exceeds ``MAX_KV_LEN`` (computed in Python ints,
    so a table of repeated pages that sums past 2**31 is caught, never wrapped).

    Parameters
    ----------
    kv_lens : sequence of int
        Keys per request.
    what : str
        What one entry is, for the message.
    """
    for r, n in enumerate(kv_lens):
        if n > MAX_KV_LEN:
            raise ValueError(
                f"{what} {r} has {n} keys; at most {MAX_KV_LEN} (2**31 - 2**16) keys per request are "
                f"supported (token positions are 32-bit in the kernels)"
            )


def page_ids_int32(indices: torch.Tensor, count: int, name: str) -> Tuple[torch.Tensor, int]:
    """The first ``count`` page ids as int32, and the largest id when the host knows it (-1 otherwise).

    CPU ids are checked: a negative id or one beyond int32 raises ValueError naming its position. Device
    int64 ids are narrowed without a sync: an id outside [0, 2**31) becomes -1, an invalid page the kernels
    never read (never a silent wrap onto another page). Device int32 ids are returned as they are.

    Parameters
    ----------
    indices : torch.Tensor
        1-D int32 or int64 page ids, CPU or CUDA.
    count : int
        How many of them the page table uses (indptr[-1]).
    name : str
        The argument's name, for messages.

    Returns
    -------
    (torch.Tensor, int)
        int32 ids ``[count]`` on ``indices``'s device (contiguous), and the largest id or -1.
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32 or int64 tensor of page ids")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    ids = indices[:count]
    if ids.device.type == "cpu":
        if count:
            bad = torch.nonzero((ids < 0) | (ids > INT32_MAX))
            if bad.numel():
                at = int(bad[0, 0])
                raise ValueError(
                    f"{name}[{at}] = {int(ids[at])} is not a page id (accepted: 0 <= id < num_pages, "
                    f"num_pages <= 2**31 - 1)"
                )
        return ids.to(torch.int32).contiguous(), int(ids.max()) if count else -1
    if ids.dtype == torch.int64:
        ids = torch.where((ids < 0) | (ids > INT32_MAX), torch.full_like(ids, -1), ids)
    return ids.to(torch.int32).contiguous(), -1


def check_inputs_enabled() -> bool:
    """Whether ``FLASHINFER_CHECK_INPUTS`` asks run() to check device-side page ids (one device sync per call).
    Strict: 1/true/yes/on or 0/false/no/off; anything else raises JITEnvironmentError naming the variable."""
    return _env_bool("FLASHINFER_CHECK_INPUTS", False)


def check_page_ids_in_cache(
    indices: Optional[torch.Tensor], num_pages: int, max_index: int, name: str, count: Optional[int] = None
) -> None:
    """run()'s page-id check against the cache: ``max_index`` (known on the host from plan()) is compared at
    no cost; device ids are compared only under FLASHINFER_CHECK_INPUTS=1 (one sync), else the kernel skips
    invalid ids (their keys read as zeros). Raises ValueError naming the first invalid id.

    Parameters
    ----------
    indices : torch.Tensor or None
        The planned int32 page ids ``[nnz]`` (any device), or None when there are none.
    num_pages : int
        Pages of the cache given to run().
    max_index : int
        Largest id when the host knows it, else -1.
    name : str
        The argument's name, for the message.
    count : int, optional
        How many of ``indices`` the plan reads (its first entries; default all). Sliced only when checked, so
        run() adds no tensor op unless FLASHINFER_CHECK_INPUTS=1.
    """
    if max_index >= num_pages:
        raise ValueError(
            f"{name} holds page id {max_index} but paged_kv_cache has {num_pages} pages "
            f"(accepted: 0 <= id < {num_pages})"
        )
    if indices is None or max_index >= 0 or indices.is_cpu or not check_inputs_enabled():
        return  # (ids known on the host were checked through max_index)
    if count is not None:
        indices = indices[:count]
    bad = torch.nonzero((indices < 0) | (indices >= num_pages))
    if bad.numel():
        at = int(bad[0, 0])
        raise ValueError(
            f"{name}[{at}] = {int(indices[at])} is not a page of paged_kv_cache (accepted: 0 <= id < "
            f"{num_pages}; FLASHINFER_CHECK_INPUTS=1 found it)"
        )


class FP4Tensor:
    """FlashInfer's NVFP4 tensor wrapper (data plus block scales): not implemented here. Importable so that
    engines' backends, which import it at load time, load; constructing one raises NotImplementedError."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"FP4Tensor (NVFP4 data, {len(args)} positional / {sorted(kwargs)} keyword "
            "arguments) is not implemented: outputs take q's 16-bit dtype"
        )

"""Sampling the next token without sorting the vocabulary: drop-ins for FlashInfer's ``flashinfer.sampling``.

Every function takes rows of probabilities (``probs``) or logits over a vocabulary, ``[batch_size, vocab_size]``
(float32, float16 or bfloat16; any row stride, unit stride in the vocabulary), and filters them by thresholds on
the values, found by radix search over the unsorted rows (see ``templates/include/flashinfer/ops/sampling.cuh``):

* top-k keeps the k largest entries, top-p the shortest head of the distribution (in descending order) that
  holds ``top_p`` of its mass, min-p the entries of at least ``min_p`` times the largest probability. Entries
  equal to the threshold are all kept (ties at the boundary never split).
* Out-of-range filter values do not raise when they come in tensors (reading them would synchronize): a
  ``top_k`` <= 0 or >= the vocabulary keeps everything, ``top_p`` >= 1 keeps everything and ``top_p`` <= 0 only
  the largest entry (and its ties), ``min_p`` > 1 acts as 1. Scalars are checked on the host.
* NaN, negative and infinite probabilities and logits of -inf carry no mass. A row without mass samples token 0
  with ``valid=False`` (``return_valid``).

Sampling is reproducible: a row's token is a function of the row, its filter values and the Philox draw keyed by
(seed, offset, output position) only; the cluster of CTAs that works on a row, the batch it came in and the
order in which threads finish do not matter (masses are exact fixed-point sums; ``deterministic`` is accepted and
always holds). Seeds come from ``generator`` (default: the device's CUDA generator), whose offset is advanced on
the host without a device synchronization, or from ``seed``/``offset`` (integers or int64 tensors of length 1 or
``batch_size``; tensors keep a captured CUDA graph reproducible and fresh when updated in place).

No function synchronizes with the host except ``check_nan=True`` (it reads whether the input holds a NaN, as
FlashInfer does) or allocates anything besides its outputs; at a fixed batch size they can be captured in CUDA
graphs.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import jit
from .jit.abi import Launcher
from .jit.spec import Spec, register_family
from .utils import current_stream_ptr, tracing

__all__ = [
    "SamplingSpec",
    "chain_speculative_sampling",
    "min_p_sampling_from_probs",
    "sampling_from_logits",
    "sampling_from_probs",
    "softmax",
    "top_k_mask_logits",
    "top_k_renorm_prob",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_prob",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
]

_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_DTYPE_CUDA = {"f32": "float", "bf16": "__nv_bfloat16", "f16": "__half"}


@register_family
@dataclasses.dataclass(frozen=True)
class SamplingSpec(Spec):
    """Compile-time configuration of the sampling kernels: the element type of the rows they read (probabilities or
    logits; the speculative-sampling kernel, float32 only, is in every module)."""

    dtype: str = "f32"

    family = "sampling"
    template = "sampling.cu.jinja"
    launchers = (
        Launcher(
            "flashinfer_sampling_sample",
            "const void* input, int64_t row_stride, int num_rows, int vocab, int batch, int is_logits, "
            "const void* indices, int indices_int64, void* samples, int samples_int64, void* valid, "
            "int filters, int top_k_first, const int* top_k_arr, int top_k_val, const float* top_p_arr, "
            "float top_p_val, const float* min_p_arr, float min_p_val, const int64_t* seed_arr, "
            "int seed_stride, uint64_t seed_val, const int64_t* offset_arr, int offset_stride, "
            "uint64_t offset_val, int device, void* stream",
        ),
        Launcher(
            "flashinfer_sampling_row_op",
            "const void* input, int64_t in_stride, void* output, int64_t out_stride, int rows, int vocab, "
            "int op, const int* top_k_arr, int top_k_val, const float* top_p_arr, float top_p_val, "
            "const float* temperature_arr, float temperature_val, int pdl, int route, int device, void* stream",
        ),
        Launcher(
            "flashinfer_sampling_chain_speculative",
            "const float* draft_probs, const int* draft_token_ids, const float* target_probs, "
            "int* output_token_ids, int* accepted, int* emitted, int batch, int num_speculative, int vocab, "
            "const int64_t* seed_arr, int seed_stride, uint64_t seed_val, const int64_t* offset_arr, "
            "int offset_stride, uint64_t offset_val, int device, void* stream",
        ),
    )

    def name(self) -> str:
        return f"{self.family}_{self.dtype}"

    def render_vars(self) -> Dict[str, Any]:
        return {"name": self.name(), "dtype": self.dtype, "dtype_cuda": _DTYPE_CUDA[self.dtype]}

    @classmethod
    def axes(cls) -> Dict[str, Tuple[Any, ...]]:
        return {"dtype": ("f32", "bf16", "f16")}

    def unsupported_reason(self) -> Optional[str]:
        if self.dtype not in _DTYPE_CUDA:
            return f"dtype {self.dtype!r} is not one of {sorted(_DTYPE_CUDA)}"
        return None


class _Module:
    """A loaded sampling module, its launchers and the constants it exports (filter bits, op codes, limits)."""

    __slots__ = ("module", "sample", "row_op", "chain", "c")

    def __init__(self, dtype: str) -> None:
        self.module = jit.load(SamplingSpec(dtype))
        self.sample = self.module.launcher("flashinfer_sampling_sample")
        self.row_op = self.module.launcher("flashinfer_sampling_row_op")
        self.chain = self.module.launcher("flashinfer_sampling_chain_speculative")
        self.c = self.module.constants


_modules: Dict[str, _Module] = {}


def _module(dtype: str) -> _Module:
    m = _modules.get(dtype)
    if m is None:
        m = _modules[dtype] = _Module(dtype)
    return m


# Which kernel the top-k/top-p row transforms run: "select" (the default: row_select_kernel over cached slices, and
# scalar top-k <= 128 on 128+ rows streamed), "radix" (the previous row_op_kernel's radix rounds, kept for comparison:
# benchmarks/probe_sampling.py times both) or "stream" (scalar top-k <= 128 streamed at any batch: tests, probes).
_ROW_KERNEL = "select"
_ROW_ROUTES = {"select": 0, "radix": 1, "stream": 2}  # (RowRoute in sampling.cuh)

_U64 = (1 << 64) - 1
_MAX_ROWS = (1 << 31) // 16 - 1  # rows x CTAs per row (up to 16) must fit a grid


# ----------------------------------------------------------------------------------------- validation


def _check_rows(x: Any, name: str) -> torch.Tensor:
    """A 2-D CUDA tensor of float32/float16/bfloat16 rows (float64 is converted to float32), unit stride in the
    vocabulary (else copied)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cuda":
        raise ValueError(f"{name} is on {x.device}; the kernels run on CUDA devices only")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch_size, vocab_size), got shape {tuple(x.shape)}")
    if x.dtype == torch.float64:
        x = x.float()
    if x.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16 (float64 is converted)")
    if x.size(1) == 0:
        raise ValueError(f"{name} has an empty vocabulary (shape {tuple(x.shape)})")
    if x.size(0) > _MAX_ROWS:
        raise ValueError(f"{name} has {x.size(0)} rows; at most {_MAX_ROWS} are supported")
    if x.stride(1) != 1 and x.size(1) > 1:
        x = x.contiguous()
    return x


def _check_vocab(m: _Module, vocab: int, name: str) -> None:
    """(In the ops' bodies, where the module is loaded anyway: tracing does not build modules.)"""
    if vocab > m.c["max_vocab"]:
        raise ValueError(f"{name} has {vocab} entries per row; at most {m.c['max_vocab']} are supported")


def _check_indices(indices: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if indices is None:
        return None
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor or None, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (batch_size,), got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be torch.int32 or torch.int64, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but the rows are on {device}")
    if indices.size(0) > _MAX_ROWS:
        raise ValueError(f"indices has {indices.size(0)} entries; at most {_MAX_ROWS} are supported")
    return indices.contiguous()


def _param(
    value: Any,
    name: str,
    batch: int,
    device: torch.device,
    integral: bool,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
) -> Tuple[Optional[torch.Tensor], Any]:
    """A per-request filter value: (tensor or None, scalar). Tensors must be 1-D of length batch_size on the rows'
    device (converted to int32 / float32, no host synchronization); scalars are checked against [lo, hi]."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(
                f"Expected a 1D tensor of shape (batch_size,) or scalar for the sampling parameter "
                f"{name}, but got a 0-dimensional tensor."
            )
        if value.dim() > 1:
            raise ValueError(
                f"Expected a 1D tensor or scalar for the sampling parameter {name}, but got a {value.dim()}D tensor."
            )
        if value.size(0) != batch:
            raise ValueError(
                f"Sampling parameter tensor batch size mismatch: {name} has length {value.size(0)}, "
                f"expected {batch} (one value per output row)."
            )
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the rows are on {device}")
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer or floating tensor, got {value.dtype}")
        t = value.to(torch.int32 if integral else torch.float32).contiguous()
        return t, 0
    if integral:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int or a 1-D tensor, got {type(value).__name__}")
        return None, max(min(int(value), 2**31 - 1), -(2**31))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 1-D tensor, got {type(value).__name__}")
    v = float(value)
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return None, v


def _seed_offset(
    generator: Optional[torch.Generator], seed: Any, offset: Any, device: torch.device, batch: int, increment: int
) -> Tuple[Optional[torch.Tensor], int, Optional[torch.Tensor], int]:
    """(seed tensor or None, seed, offset tensor or None, offset): from seed/offset when given, else from the
    generator, whose Philox offset advances by ``increment`` rounded up to a multiple of 4 (as FlashInfer's)."""
    if seed is None and offset is None:
        gen = generator
        if gen is None:
            torch.cuda.init()
            gen = torch.cuda.default_generators[device.index]
        elif not isinstance(gen, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(gen).__name__}")
        elif (
            gen.device.type != device.type
            or (gen.device.index if gen.device.index is not None else torch.cuda.current_device()) != device.index
        ):
            # torch.Generator(device="cuda") reports device "cuda" without an index: the device current at its creation.
            raise ValueError(f"generator is on {gen.device} but the rows are on {device}")
        state = gen.get_state()
        words = state.view(torch.int64).clone()
        s, o = int(words[0]), int(words[1])
        words[1] = o + (increment + 3) // 4 * 4
        gen.set_state(words.view(torch.uint8))
        return None, s & _U64, None, o & _U64
    if seed is None or offset is None:
        raise ValueError("seed and offset must be given together (or neither, to use the generator)")
    if generator is not None:
        raise ValueError("pass either generator or seed/offset, not both")
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError("seed and offset must both be tensors or both be scalars")
    out = []
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, torch.Tensor):
            if v.device != device:
                raise ValueError(f"{name} tensor must be on {device}, got {v.device}")
            if v.dtype not in (torch.int64, torch.uint64):
                raise ValueError(f"{name} tensor must be int64/uint64, got {v.dtype}")
            if v.dim() != 1:
                raise ValueError(f"{name} tensor must be 1D, got shape {tuple(v.shape)}")
            if v.size(0) not in (1, batch):
                raise ValueError(f"{name} tensor length must be 1 or {batch}, got {v.size(0)}")
            out += [v.contiguous(), 0]
        else:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int or an int64 tensor, got {type(v).__name__}")
            out += [None, int(v) & _U64]
    return out[0], out[1], out[2], out[3]


def _check_nan(x: torch.Tensor, what: str) -> None:
    if bool(torch.isnan(x).any()):  # (a host synchronization, only with check_nan=True)
        raise ValueError(f"Input {what} contains NaN.")


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stride(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.size(0) == 1 else 1


# ----------------------------------------------------------------------------------------- launches


def _sample(
    x: torch.Tensor,
    indices: Optional[torch.Tensor],
    is_logits: bool,
    filters: int,
    top_k_first: bool,
    top_k_arr: Optional[torch.Tensor],
    top_k_val: int,
    top_p_arr: Optional[torch.Tensor],
    top_p_val: float,
    min_p_arr: Optional[torch.Tensor],
    min_p_val: float,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch on validated inputs; returns (samples, valid)."""
    device = x.device
    batch = indices.size(0) if indices is not None else x.size(0)
    samples = torch.empty(batch, dtype=indices.dtype if indices is not None else torch.int32, device=device)
    valid = torch.empty(batch, dtype=torch.bool, device=device)
    m = _module(_DTYPE_NAMES[x.dtype])
    _check_vocab(m, x.size(1), "logits" if is_logits else "probs")
    if batch == 0:
        return samples, valid
    rc = m.sample(
        input=x.data_ptr(),
        row_stride=x.stride(0),
        num_rows=x.size(0),
        vocab=x.size(1),
        batch=batch,
        is_logits=int(is_logits),
        indices=_ptr(indices),
        indices_int64=int(indices is not None and indices.dtype == torch.int64),
        samples=samples.data_ptr(),
        samples_int64=int(samples.dtype == torch.int64),
        valid=valid.data_ptr(),
        filters=filters,
        top_k_first=int(top_k_first),
        top_k_arr=_ptr(top_k_arr),
        top_k_val=top_k_val,
        top_p_arr=_ptr(top_p_arr),
        top_p_val=top_p_val,
        min_p_arr=_ptr(min_p_arr),
        min_p_val=min_p_val,
        seed_arr=_ptr(seed_arr),
        seed_stride=_stride(seed_arr),
        seed_val=seed_val & _U64,
        offset_arr=_ptr(offset_arr),
        offset_stride=_stride(offset_arr),
        offset_val=offset_val & _U64,
        device=device.index,
        stream=current_stream_ptr(device),
    )
    if rc:
        m.module.check(rc, f"sampling ({m.module.spec.name()}) on {device}")
    return samples, valid


def _row_op(
    x: torch.Tensor,
    op: str,
    top_k_arr: Optional[torch.Tensor] = None,
    top_k_val: int = 0,
    top_p_arr: Optional[torch.Tensor] = None,
    top_p_val: float = 1.0,
    temperature_arr: Optional[torch.Tensor] = None,
    temperature_val: float = 1.0,
    pdl: bool = False,
) -> torch.Tensor:
    """softmax / top_p_renorm / top_k_renorm / top_k_mask of validated rows into a new contiguous tensor."""
    out = torch.empty(x.shape, dtype=torch.float32 if op == "softmax" else x.dtype, device=x.device)
    m = _module(_DTYPE_NAMES[x.dtype])
    _check_vocab(m, x.size(1), "logits" if op in ("softmax", "top_k_mask") else "probs")
    if x.size(0) == 0:
        return out
    rc = m.row_op(
        input=x.data_ptr(),
        in_stride=x.stride(0),
        output=out.data_ptr(),
        out_stride=out.stride(0),
        rows=x.size(0),
        vocab=x.size(1),
        op=m.c["op_" + op],
        top_k_arr=_ptr(top_k_arr),
        top_k_val=top_k_val,
        top_p_arr=_ptr(top_p_arr),
        top_p_val=top_p_val,
        temperature_arr=_ptr(temperature_arr),
        temperature_val=temperature_val,
        pdl=int(pdl),
        route=_ROW_ROUTES[_ROW_KERNEL],
        device=x.device.index,
        stream=current_stream_ptr(x.device),
    )
    if rc:
        m.module.check(rc, f"{op} ({m.module.spec.name()}) on {x.device}")
    return out


def _filters(m: _Module, top_k: bool = False, top_p: bool = False, min_p: bool = False) -> int:
    return (
        (m.c["filter_top_k"] if top_k else 0)
        | (m.c["filter_top_p"] if top_p else 0)
        | (m.c["filter_min_p"] if min_p else 0)
    )


# ----------------------------------------------------------------------------------------- custom ops
# One op per public function (as FlashInfer registers them), traced by torch.compile through its fake. The public
# functions validate, draw the seed and call the op under torch.compile, its plain implementation otherwise (no
# dispatcher on the eager path).


class _Op:
    """A plain implementation and the custom op ``flashinfer::<name>`` that wraps it."""

    __slots__ = ("impl", "op")

    def __init__(self, name: str, impl, fake, mutates_args: Tuple[str, ...] = ()) -> None:
        self.impl = impl
        self.op = torch.library.custom_op(f"flashinfer::{name}", impl, mutates_args=mutates_args)
        self.op.register_fake(fake)

    def __call__(self, *args):
        return self.op(*args) if tracing() else self.impl(*args)


def _fake_samples(x: torch.Tensor, indices: Optional[torch.Tensor], *_) -> Tuple[torch.Tensor, torch.Tensor]:
    batch = indices.size(0) if indices is not None else x.size(0)
    dtype = indices.dtype if indices is not None else torch.int32
    return x.new_empty((batch,), dtype=dtype), x.new_empty((batch,), dtype=torch.bool)


def _fake_rows(x: torch.Tensor, *_) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _sampling_from_probs_impl(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor],
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sample(
        probs, indices, False, 0, False, None, 0, None, 1.0, None, 0.0, seed_arr, seed_val, offset_arr, offset_val
    )


def _sampling_from_logits_impl(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor],
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sample(
        logits, indices, True, 0, False, None, 0, None, 1.0, None, 0.0, seed_arr, seed_val, offset_arr, offset_val
    )


def _top_p_sampling_impl(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor],
    top_p_arr: Optional[torch.Tensor],
    top_p_val: float,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    m = _module(_DTYPE_NAMES[probs.dtype])
    return _sample(
        probs,
        indices,
        False,
        _filters(m, top_p=True),
        False,
        None,
        0,
        top_p_arr,
        top_p_val,
        None,
        0.0,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _top_k_sampling_impl(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor],
    top_k_arr: Optional[torch.Tensor],
    top_k_val: int,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    m = _module(_DTYPE_NAMES[probs.dtype])
    return _sample(
        probs,
        indices,
        False,
        _filters(m, top_k=True),
        False,
        top_k_arr,
        top_k_val,
        None,
        1.0,
        None,
        0.0,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _min_p_sampling_impl(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor],
    min_p_arr: Optional[torch.Tensor],
    min_p_val: float,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    m = _module(_DTYPE_NAMES[probs.dtype])
    return _sample(
        probs,
        indices,
        False,
        _filters(m, min_p=True),
        False,
        None,
        0,
        None,
        1.0,
        min_p_arr,
        min_p_val,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _top_k_top_p_impl(
    x: torch.Tensor,
    indices: Optional[torch.Tensor],
    top_k_arr: Optional[torch.Tensor],
    top_k_val: int,
    top_p_arr: Optional[torch.Tensor],
    top_p_val: float,
    top_k_first: bool,
    is_logits: bool,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    m = _module(_DTYPE_NAMES[x.dtype])
    return _sample(
        x,
        indices,
        is_logits,
        _filters(m, top_k=True, top_p=True),
        top_k_first,
        top_k_arr,
        top_k_val,
        top_p_arr,
        top_p_val,
        None,
        0.0,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _top_k_top_p_probs_impl(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor],
    top_k_arr: Optional[torch.Tensor],
    top_k_val: int,
    top_p_arr: Optional[torch.Tensor],
    top_p_val: float,
    top_k_first: bool,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _top_k_top_p_impl(
        probs,
        indices,
        top_k_arr,
        top_k_val,
        top_p_arr,
        top_p_val,
        top_k_first,
        False,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _top_k_top_p_logits_impl(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor],
    top_k_arr: Optional[torch.Tensor],
    top_k_val: int,
    top_p_arr: Optional[torch.Tensor],
    top_p_val: float,
    top_k_first: bool,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _top_k_top_p_impl(
        logits,
        indices,
        top_k_arr,
        top_k_val,
        top_p_arr,
        top_p_val,
        top_k_first,
        True,
        seed_arr,
        seed_val,
        offset_arr,
        offset_val,
    )


def _top_p_renorm_impl(probs: torch.Tensor, top_p_arr: Optional[torch.Tensor], top_p_val: float) -> torch.Tensor:
    return _row_op(probs, "top_p_renorm", top_p_arr=top_p_arr, top_p_val=top_p_val)


def _top_k_renorm_impl(probs: torch.Tensor, top_k_arr: Optional[torch.Tensor], top_k_val: int) -> torch.Tensor:
    return _row_op(probs, "top_k_renorm", top_k_arr=top_k_arr, top_k_val=top_k_val)


def _top_k_mask_impl(logits: torch.Tensor, top_k_arr: Optional[torch.Tensor], top_k_val: int) -> torch.Tensor:
    return _row_op(logits, "top_k_mask", top_k_arr=top_k_arr, top_k_val=top_k_val)


def _softmax_impl(
    logits: torch.Tensor, temperature_arr: Optional[torch.Tensor], temperature_val: float, enable_pdl: bool
) -> torch.Tensor:
    return _row_op(logits, "softmax", temperature_arr=temperature_arr, temperature_val=temperature_val, pdl=enable_pdl)


def _fake_softmax(logits, *_):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _chain_impl(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    accepted: torch.Tensor,
    emitted: torch.Tensor,
    seed_arr: Optional[torch.Tensor],
    seed_val: int,
    offset_arr: Optional[torch.Tensor],
    offset_val: int,
) -> torch.Tensor:
    b, n = draft_token_ids.shape
    out = torch.empty((b, n + 1), dtype=torch.int32, device=draft_probs.device)
    m = _module("f32")
    _check_vocab(m, draft_probs.size(2), "draft_probs")
    if b == 0:
        return out
    rc = m.chain(
        draft_probs=draft_probs.data_ptr(),
        draft_token_ids=draft_token_ids.data_ptr(),
        target_probs=target_probs.data_ptr(),
        output_token_ids=out.data_ptr(),
        accepted=accepted.data_ptr(),
        emitted=emitted.data_ptr(),
        batch=b,
        num_speculative=n,
        vocab=draft_probs.size(2),
        seed_arr=_ptr(seed_arr),
        seed_stride=_stride(seed_arr),
        seed_val=seed_val & _U64,
        offset_arr=_ptr(offset_arr),
        offset_stride=_stride(offset_arr),
        offset_val=offset_val & _U64,
        device=draft_probs.device.index,
        stream=current_stream_ptr(draft_probs.device),
    )
    if rc:
        m.module.check(rc, f"chain_speculative_sampling on {draft_probs.device}")
    return out


def _fake_chain(draft_probs, draft_token_ids, *_):
    b, n = draft_token_ids.shape
    return draft_probs.new_empty((b, n + 1), dtype=torch.int32)


_SAMPLING_FROM_PROBS = _Op("sampling_from_probs", _sampling_from_probs_impl, _fake_samples)
_SAMPLING_FROM_LOGITS = _Op("sampling_from_logits", _sampling_from_logits_impl, _fake_samples)
_TOP_P_SAMPLING = _Op("top_p_sampling_from_probs", _top_p_sampling_impl, _fake_samples)
_TOP_K_SAMPLING = _Op("top_k_sampling_from_probs", _top_k_sampling_impl, _fake_samples)
_MIN_P_SAMPLING = _Op("min_p_sampling_from_probs", _min_p_sampling_impl, _fake_samples)
_TOP_K_TOP_P_PROBS = _Op("top_k_top_p_sampling_from_probs", _top_k_top_p_probs_impl, _fake_samples)
_TOP_K_TOP_P_LOGITS = _Op("top_k_top_p_sampling_from_logits", _top_k_top_p_logits_impl, _fake_samples)
_TOP_P_RENORM = _Op("top_p_renorm_probs", _top_p_renorm_impl, _fake_rows)
_TOP_K_RENORM = _Op("top_k_renorm_probs", _top_k_renorm_impl, _fake_rows)
_TOP_K_MASK = _Op("top_k_mask_logits", _top_k_mask_impl, _fake_rows)
_SOFTMAX = _Op("softmax", _softmax_impl, _fake_softmax)
_CHAIN = _Op("chain_speculative_sampling", _chain_impl, _fake_chain, mutates_args=("accepted", "emitted"))


def _signed(v: int) -> int:
    """A 64-bit seed/offset as the int64 the custom-op schema carries."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _sampling_call(
    op: _Op,
    x: torch.Tensor,
    indices: Optional[torch.Tensor],
    params: tuple,
    generator,
    seed,
    offset,
    increment_per_row: int,
    return_valid: bool,
):
    batch = indices.size(0) if indices is not None else x.size(0)
    sa, sv, oa, ov = _seed_offset(generator, seed, offset, x.device, batch, batch * increment_per_row)
    samples, valid = op(x, indices, *params, sa, _signed(sv), oa, _signed(ov))
    return (samples, valid) if return_valid else samples


# ----------------------------------------------------------------------------------------- public API


def softmax(
    logits: torch.Tensor,
    temperature: Optional[Union[torch.Tensor, float]] = None,
    enable_pdl: Optional[bool] = None,
) -> torch.Tensor:
    """Softmax of each row of ``logits / temperature``, in one read of the row.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch_size, vocab_size)`` float32, float16 or bfloat16 (float64 is converted), on a CUDA device.
    temperature : float or torch.Tensor, optional
        A positive scalar, or ``(batch_size,)`` floating values on the logits' device (one per row); default 1.
    enable_pdl : bool, optional
        Launch with programmatic dependent launch (sm_90+; the kernel waits for its predecessor before reading);
        default: on for sm_90 and newer.

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` float32 probabilities (a row of -inf logits gives NaN, as torch.softmax).
    """
    logits = _check_rows(logits, "logits")
    device = logits.device
    t_arr, t_val = None, 1.0
    if temperature is not None:
        if isinstance(temperature, torch.Tensor):
            if temperature.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise ValueError(
                    f"temperature tensor must have dtype float16, bfloat16, float32, or float64, got "
                    f"{temperature.dtype}"
                )
            if temperature.dim() != 1 or temperature.size(0) != logits.size(0):
                raise ValueError(
                    f"temperature tensor must be 1D with one value per logits row ({logits.size(0)}), "
                    f"got shape {tuple(temperature.shape)}"
                )
            if temperature.device != device:
                raise ValueError(
                    f"temperature tensor must be on the same device as logits ({device}), got {temperature.device}"
                )
            t_arr = temperature.to(torch.float32).contiguous()
        else:
            if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
                raise TypeError(
                    "temperature must be None, a real scalar, or a 1D floating-point tensor with one "
                    "value per logits row"
                )
            t_val = float(temperature)
            if not t_val > 0 or t_val == float("inf"):
                raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if enable_pdl is None:
        enable_pdl = torch.cuda.get_device_capability(device)[0] >= 9
    elif not isinstance(enable_pdl, bool):
        raise TypeError(f"enable_pdl must be a bool or None, got {type(enable_pdl).__name__}")
    if enable_pdl and torch.cuda.get_device_capability(device)[0] < 9:
        raise NotImplementedError("enable_pdl=True needs an sm_90+ device (programmatic dependent launch)")
    return _SOFTMAX(logits, t_arr, t_val, bool(enable_pdl))


def sampling_from_probs(
    probs: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Samples a token from each row of probabilities (unnormalised rows are fine).

    Parameters
    ----------
    probs : torch.Tensor
        ``(num_rows, vocab_size)`` float32 (float16/bfloat16 read natively), on a CUDA device.
    indices : torch.Tensor, optional
        ``(batch_size,)`` int32/int64: output i samples row ``indices[i]`` (an index outside the rows gives
        token 0, ``valid=False``). The output has its dtype. Default: output i samples row i (int32 output).
    deterministic : bool
        Accepted for compatibility: sampling is always deterministic.
    generator : torch.Generator, optional
        Source of seed and offset (default: the device's CUDA generator); its offset advances by ``batch_size``.
    check_nan : bool
        Raise ValueError when probs holds a NaN (synchronizes with the host).
    seed, offset : int or torch.Tensor, optional
        Philox seed and offset instead of the generator: integers, or int64/uint64 tensors of length 1 or
        ``batch_size`` on the device (required for CUDA graph replays to draw fresh numbers).
    return_valid : bool
        Also return ``valid`` ``(batch_size,)`` bool: False for rows without mass.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``samples`` ``(batch_size,)``, or ``(samples, valid)``.
    """
    probs, indices = _prepare(probs, "probs", indices, check_nan)
    return _sampling_call(_SAMPLING_FROM_PROBS, probs, indices, (), generator, seed, offset, 1, return_valid)


def sampling_from_logits(
    logits: torch.Tensor,
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Samples a token from ``softmax(logits)`` of each row, without writing the probabilities.

    Parameters
    ----------
    logits : torch.Tensor
        ``(num_rows, vocab_size)`` float32, float16 or bfloat16, on a CUDA device.
    indices, deterministic, generator, check_nan, seed, offset
        As in :func:`sampling_from_probs` (the generator's offset advances by ``batch_size * vocab_size``, as
        FlashInfer's).

    Returns
    -------
    torch.Tensor
        ``samples`` ``(batch_size,)``, int32 or the dtype of ``indices``.
    """
    logits, indices = _prepare(logits, "logits", indices, check_nan)
    return _sampling_call(_SAMPLING_FROM_LOGITS, logits, indices, (), generator, seed, offset, logits.size(1), False)


def top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Top-p (nucleus) sampling: samples from the shortest head of each row (in descending order, ties kept) that
    holds ``top_p`` of its mass, renormalised.

    Parameters
    ----------
    probs : torch.Tensor
        ``(num_rows, vocab_size)`` float32 (float16/bfloat16 read natively), on a CUDA device.
    top_p : float or torch.Tensor
        A float in [0, 1], or ``(batch_size,)`` values (one per output row).
    indices, deterministic, generator, check_nan, seed, offset, return_valid
        As in :func:`sampling_from_probs` (the generator's offset advances by ``32 * batch_size``).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``samples`` ``(batch_size,)``, or ``(samples, valid)``.
    """
    probs, indices = _prepare(probs, "probs", indices, check_nan)
    batch = indices.size(0) if indices is not None else probs.size(0)
    p = _param(top_p, "top_p", batch, probs.device, False, 0.0, 1.0)
    return _sampling_call(_TOP_P_SAMPLING, probs, indices, p, generator, seed, offset, 32, return_valid)


def top_k_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Top-k sampling: samples from the ``top_k`` largest probabilities of each row (and any entry tied with the
    k-th), renormalised.

    Parameters
    ----------
    probs : torch.Tensor
        ``(num_rows, vocab_size)`` float32 (float16/bfloat16 read natively), on a CUDA device.
    top_k : int or torch.Tensor
        An int, or ``(batch_size,)`` integers (one per output row); <= 0 or >= vocab_size: no filter.
    indices, deterministic, generator, check_nan, seed, offset, return_valid
        As in :func:`sampling_from_probs` (the generator's offset advances by ``32 * batch_size``).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``samples`` ``(batch_size,)``, or ``(samples, valid)``.
    """
    probs, indices = _prepare(probs, "probs", indices, check_nan)
    batch = indices.size(0) if indices is not None else probs.size(0)
    k = _param(top_k, "top_k", batch, probs.device, True)
    return _sampling_call(_TOP_K_SAMPLING, probs, indices, k, generator, seed, offset, 32, return_valid)


def min_p_sampling_from_probs(
    probs: torch.Tensor,
    min_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Min-p sampling: samples from the entries of each row of at least ``min_p`` times its largest probability
    (the product rounded to float32), renormalised.

    Parameters
    ----------
    probs : torch.Tensor
        ``(num_rows, vocab_size)`` float32 (float16/bfloat16 read natively), on a CUDA device.
    min_p : float or torch.Tensor
        A float in [0, 1], or ``(batch_size,)`` values (one per output row).
    indices, deterministic, generator, check_nan, seed, offset, return_valid
        As in :func:`sampling_from_probs` (the generator's offset advances by ``batch_size``).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``samples`` ``(batch_size,)``, or ``(samples, valid)``.
    """
    probs, indices = _prepare(probs, "probs", indices, check_nan)
    batch = indices.size(0) if indices is not None else probs.size(0)
    p = _param(min_p, "min_p", batch, probs.device, False, 0.0, 1.0)
    return _sampling_call(_MIN_P_SAMPLING, probs, indices, p, generator, seed, offset, 1, return_valid)


def _filter_order(filter_apply_order: str) -> bool:
    """True for "top_k_first", False for "joint"."""
    if filter_apply_order == "top_k_first":
        return True
    if filter_apply_order == "joint":
        return False
    raise ValueError(f"Invalid filter_apply_order: {filter_apply_order!r} (expected 'top_k_first' or 'joint')")


def top_k_top_p_sampling_from_logits(
    logits: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Top-k and top-p sampling from ``softmax(logits)`` in one kernel (the probabilities are never written).

    Parameters
    ----------
    logits : torch.Tensor
        ``(num_rows, vocab_size)`` float32, float16 or bfloat16, on a CUDA device.
    top_k : int or torch.Tensor
        As in :func:`top_k_sampling_from_probs`.
    top_p : float or torch.Tensor
        As in :func:`top_p_sampling_from_probs`.
    filter_apply_order : str
        ``"top_k_first"``: top-p over the top-k entries renormalised (= top_k_mask_logits, softmax, top-p
        sampling); ``"joint"``: the entries that pass both filters of the unfiltered distribution.
    indices, deterministic, generator, check_nan, seed, offset
        As in :func:`sampling_from_probs` (the generator's offset advances by ``32 * batch_size``).

    Returns
    -------
    torch.Tensor
        ``samples`` ``(batch_size,)``, int32 or the dtype of ``indices``.
    """
    top_k_first = _filter_order(filter_apply_order)
    logits, indices = _prepare(logits, "logits", indices, check_nan)
    batch = indices.size(0) if indices is not None else logits.size(0)
    params = (
        *_param(top_k, "top_k", batch, logits.device, True),
        *_param(top_p, "top_p", batch, logits.device, False, 0.0, 1.0),
        top_k_first,
    )
    return _sampling_call(_TOP_K_TOP_P_LOGITS, logits, indices, params, generator, seed, offset, 32, False)


def top_k_top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    top_p: Union[torch.Tensor, float],
    indices: Optional[torch.Tensor] = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    check_nan: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
    return_valid: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Top-k and top-p sampling from probabilities in one kernel.

    Parameters
    ----------
    probs : torch.Tensor
        ``(num_rows, vocab_size)`` float32 (float16/bfloat16 read natively), on a CUDA device.
    top_k, top_p, filter_apply_order
        As in :func:`top_k_top_p_sampling_from_logits` (``"top_k_first"`` = top_k_renorm_probs, then top-p
        sampling).
    indices, deterministic, generator, check_nan, seed, offset, return_valid
        As in :func:`sampling_from_probs` (the generator's offset advances by ``32 * batch_size``).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``samples`` ``(batch_size,)``, or ``(samples, valid)``.
    """
    top_k_first = _filter_order(filter_apply_order)
    probs, indices = _prepare(probs, "probs", indices, check_nan)
    batch = indices.size(0) if indices is not None else probs.size(0)
    params = (
        *_param(top_k, "top_k", batch, probs.device, True),
        *_param(top_p, "top_p", batch, probs.device, False, 0.0, 1.0),
        top_k_first,
    )
    return _sampling_call(_TOP_K_TOP_P_PROBS, probs, indices, params, generator, seed, offset, 32, return_valid)


def top_p_renorm_probs(
    probs: torch.Tensor,
    top_p: Union[torch.Tensor, float],
    is_deterministic: bool = False,
) -> torch.Tensor:
    """Zeroes the entries outside each row's top-p head (see :func:`top_p_sampling_from_probs`) and renormalises.

    Parameters
    ----------
    probs : torch.Tensor
        ``(batch_size, vocab_size)`` probabilities, float32 (float16/bfloat16/float64 are converted, as in
        FlashInfer), on a CUDA device.
    top_p : float or torch.Tensor
        A float in [0, 1], or ``(batch_size,)`` values.
    is_deterministic : bool
        Accepted for compatibility: the result is always deterministic.

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` float32.
    """
    probs = _check_rows(probs, "probs")
    if probs.dtype != torch.float32:
        probs = probs.float()
    p = _param(top_p, "top_p", probs.size(0), probs.device, False, 0.0, 1.0)
    return _TOP_P_RENORM(probs, *p)


top_p_renorm_prob = top_p_renorm_probs


def top_k_renorm_probs(
    probs: torch.Tensor,
    top_k: Union[torch.Tensor, int],
    is_deterministic: bool = False,
) -> torch.Tensor:
    """Zeroes all but the ``top_k`` largest entries of each row (and entries tied with the k-th) and
    renormalises.

    Parameters
    ----------
    probs : torch.Tensor
        ``(batch_size, vocab_size)`` float32, float16 or bfloat16, on a CUDA device.
    top_k : int or torch.Tensor
        An int, or ``(batch_size,)`` integers; <= 0 or >= vocab_size: no filter (just the renormalisation).
    is_deterministic : bool
        Accepted for compatibility: the result is always deterministic.

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` in the dtype of ``probs``.
    """
    probs = _check_rows(probs, "probs")
    k = _param(top_k, "top_k", probs.size(0), probs.device, True)
    return _TOP_K_RENORM(probs, *k)


top_k_renorm_prob = top_k_renorm_probs


def top_k_mask_logits(logits: torch.Tensor, top_k: Union[torch.Tensor, int]) -> torch.Tensor:
    """Sets all but the ``top_k`` largest logits of each row (and logits tied with the k-th) to -inf.

    Parameters
    ----------
    logits : torch.Tensor
        ``(batch_size, vocab_size)`` float32, float16 or bfloat16, on a CUDA device.
    top_k : int or torch.Tensor
        An int, or ``(batch_size,)`` integers; <= 0 or >= vocab_size: the logits are copied unchanged. NaN
        logits are masked too (when the row is filtered).

    Returns
    -------
    torch.Tensor
        ``(batch_size, vocab_size)`` in the dtype of ``logits``.
    """
    logits = _check_rows(logits, "logits")
    k = _param(top_k, "top_k", logits.size(0), logits.device, True)
    return _TOP_K_MASK(logits, *k)


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative sampling of a chain of draft tokens (Leviathan et al. / Chen et al., 2023).

    Draft token i of a request is accepted with probability ``min(1, target[i, d] / draft[i, d])`` (u * draft <
    target, u uniform in (0, 1]); at the first rejection the token is replaced by a sample of
    ``max(target[i] - draft[i], 0)`` renormalised (of ``target[i]`` when that is all zero) and the rest are -1;
    when all are accepted a bonus token is sampled from ``target[n]``. Each output token is thus distributed as the
    target model's.

    Parameters
    ----------
    draft_probs : torch.Tensor
        ``(batch_size, n, vocab_size)`` float32 (other float dtypes are converted).
    draft_token_ids : torch.Tensor
        ``(batch_size, n)`` int32/int64 (an id outside the vocabulary is rejected).
    target_probs : torch.Tensor
        ``(batch_size, n + 1, vocab_size)`` float32.
    maybe_output_accepted_token_num : torch.Tensor, optional
        ``(batch_size,)`` int32/int64, added to in place: the emitted count plus, from the first rejected position
        on, how many positions an independent fresh draw would accept (FlashInfer's "accepted" metric).
    maybe_output_emitted_draft_token_num : torch.Tensor, optional
        ``(batch_size,)`` int32/int64, added to in place: draft tokens emitted (the bonus token not counted).
    deterministic : bool
        Accepted for compatibility: always deterministic.
    generator, seed, offset
        As in :func:`sampling_from_probs` (the generator's offset advances by ``batch_size * (n + 1)``).

    Returns
    -------
    (torch.Tensor, torch.Tensor, torch.Tensor)
        ``output_token_ids`` ``(batch_size, n + 1)`` int32 (-1 after the first rejection), the accepted and the
        emitted counts (the given tensors, or new int32 ones).
    """
    for name, t, nd in (
        ("draft_probs", draft_probs, 3),
        ("draft_token_ids", draft_token_ids, 2),
        ("target_probs", target_probs, 3),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; the kernels run on CUDA devices only")
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
    device = draft_probs.device
    b, n, vocab = draft_probs.shape
    if tuple(draft_token_ids.shape) != (b, n):
        raise ValueError(
            f"draft_token_ids must be ({b}, {n}) like draft_probs' first dims, got {tuple(draft_token_ids.shape)}"
        )
    if tuple(target_probs.shape) != (b, n + 1, vocab):
        raise ValueError(f"target_probs must be ({b}, {n + 1}, {vocab}), got {tuple(target_probs.shape)}")
    for name, t in (("draft_token_ids", draft_token_ids), ("target_probs", target_probs)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but draft_probs is on {device}")
    if draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"draft_token_ids must be int32 or int64, got {draft_token_ids.dtype}")
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if vocab == 0:
        raise ValueError("the vocabulary is empty")
    if b > _MAX_ROWS:
        raise ValueError(f"batch_size {b} exceeds the supported {_MAX_ROWS}")
    draft_probs = draft_probs.to(torch.float32).contiguous()
    target_probs = target_probs.to(torch.float32).contiguous()
    ids = draft_token_ids.to(torch.int32).contiguous()
    counts = []
    for name, t in (
        ("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
        ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num),
    ):
        if t is None:
            counts.append((torch.zeros(b, dtype=torch.int32, device=device), None))
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (b,) or t.device != device:
            raise ValueError(f"{name} must be a ({b},) tensor on {device}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.dtype == torch.int32 and t.is_contiguous():
            counts.append((t, None))
        else:  # counted in int32, then added to the caller's tensor
            counts.append((torch.zeros(b, dtype=torch.int32, device=device), t))
    sa, sv, oa, ov = _seed_offset(generator, seed, offset, device, b, b * (n + 1))
    (acc, acc_user), (emi, emi_user) = counts
    out = _CHAIN(draft_probs, ids, target_probs, acc, emi, sa, _signed(sv), oa, _signed(ov))
    if acc_user is not None:
        acc = acc_user.add_(acc)
    if emi_user is not None:
        emi = emi_user.add_(emi)
    return out, acc, emi


def _prepare(
    x: torch.Tensor, name: str, indices: Optional[torch.Tensor], check_nan: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    x = _check_rows(x, name)
    indices = _check_indices(indices, x.device)
    if check_nan:
        _check_nan(x, name)
    return x, indices

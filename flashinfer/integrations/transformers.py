"""An attention backend for Hugging Face transformers that runs on this library's single-request kernels.

>>> import flashinfer.integrations.transformers as fi_tf
>>> fi_tf.register()                                      # once per process; returns "fi_attention"
>>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="fi_attention")

The name holds no "flash": transformers treats every ``attn_implementation`` containing "flash" as a
flash-attention kernel to import (and errors out).

Every attention layer of the model then calls :func:`flashinfer_attention_forward`: a prefill (more than one new
token) goes to ``flashinfer.single_prefill_with_kv_cache``, a decode step (one new token) to
``flashinfer.single_decode_with_kv_cache``, one call per sequence of the batch, reading the K/V tensors of
transformers' own cache in place (``kv_layout="HND"``: they are ``[batch, kv_heads, kv_len, head_dim]``).
Taken from the model: GQA (any query/KV head ratio), the softmax scale, causality, a sliding window
(``sliding_window``, e.g. Mistral, Gemma-2/3's local layers) and a logits soft cap (``softcap``, Gemma-2).

Masks. :func:`flashinfer_attention_mask` is registered as the mask builder under the same name. It asks
transformers for the exact boolean mask (the one the ``sdpa`` backend would use) and compares it once per
forward with the pattern the kernels apply by themselves: causal aligned bottom-right, plus the sliding window.
When they agree (no padding, a dynamic cache: the normal case) the layers get ``None`` and run the fast causal
kernels. Otherwise (left padding in a batch, packed sequences, a static cache's unfilled tail, chunked or
bidirectional attention) the layers get the mask and run it as a custom mask on the prefill kernel: slower but
exact. That comparison costs one device-to-host synchronisation per mask type and forward.

Not supported, each with an exception naming it: dropout > 0 (training), ``output_attentions=True``, additive
(float) masks or per-head masks, attention sinks (``s_aux``), position biases (``position_bias``), key and value
head dims that differ, head dims other than 64, 128 or 256, dtypes other than float16/bfloat16, CPU tensors.

Supported versions: transformers >= 5.0, < 6 (``SUPPORTED_TRANSFORMERS``); tested with 5.17.0. transformers is an
optional extra (``pip install 'flashinfer[transformers]'``); this module imports it only in :func:`register`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Tuple

import torch

import flashinfer

__all__ = [
    "DEFAULT_NAME",
    "SUPPORTED_TRANSFORMERS",
    "flashinfer_attention_forward",
    "flashinfer_attention_mask",
    "is_registered",
    "register",
    "unregister",
]

DEFAULT_NAME = "fi_attention"
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
_MIN_VERSION = (5, 0)
_MAX_VERSION = (6, 0)  # exclusive
_HEAD_DIMS = (64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16)

# The kernels, looked up at call time so that the CPU tests can put a reference in their place.
_prefill: Callable[..., torch.Tensor] = flashinfer.single_prefill_with_kv_cache
_decode: Callable[..., torch.Tensor] = flashinfer.single_decode_with_kv_cache


# ------------------------------------------------------------------------------------------------ registration


def _version_tuple(version: str) -> Tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = re.match(r"\d*", piece).group() or "0"  # the leading digits: "5.17.0.dev0", "6rc1"
        parts.append(int(digits))
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def _transformers():
    """The transformers module, or an ImportError that says how to get a supported version."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "flashinfer.integrations.transformers needs Hugging Face transformers "
            f"({SUPPORTED_TRANSFORMERS}): pip install 'flashinfer[transformers]'"
        ) from e
    version = _version_tuple(transformers.__version__)
    if not _MIN_VERSION <= version < _MAX_VERSION:
        raise ImportError(
            f"flashinfer.integrations.transformers supports transformers {SUPPORTED_TRANSFORMERS}; "
            f"found {transformers.__version__}"
        )
    return transformers


def register(name: str = DEFAULT_NAME) -> str:
    """Registers this backend with transformers under ``name``: the attention function with ``AttentionInterface``
    and its mask builder with ``AttentionMaskInterface`` (process-wide, for every model class).

    Parameters
    ----------
    name : str
        The value to pass as ``attn_implementation`` (``from_pretrained``, ``from_config``,
        ``model.set_attn_implementation``). Must not be one of transformers' own backends.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    ImportError
        transformers is missing or outside ``SUPPORTED_TRANSFORMERS``.
    ValueError
        ``name`` is empty, contains "flash", or already names another backend.
    """
    if not isinstance(name, str) or not name or name.startswith("paged|") or name == "eager":
        raise ValueError(f"name must be a non-empty string, not 'eager' nor a 'paged|' name; got {name!r}")
    if "flash" in name:
        raise ValueError(f"name {name!r} contains 'flash': transformers would treat it as a flash-attention kernel to "
                         f"import; use a name without it (default {DEFAULT_NAME!r})")
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    current = AttentionInterface._global_mapping.get(name)
    if current is not None and current is not flashinfer_attention_forward:
        raise ValueError(f"attn_implementation {name!r} is already registered by transformers or another library "
                         f"({getattr(current, '__module__', '?')}.{getattr(current, '__name__', '?')}); choose another name")
    AttentionInterface.register(name, flashinfer_attention_forward)
    AttentionMaskInterface.register(name, flashinfer_attention_mask)
    return name


def unregister(name: str = DEFAULT_NAME) -> None:
    """Removes a registration made by :func:`register` (no-op if ``name`` is not registered to this backend)."""
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if AttentionInterface._global_mapping.get(name) is flashinfer_attention_forward:
        del AttentionInterface._global_mapping[name]
    if AttentionMaskInterface._global_mapping.get(name) is flashinfer_attention_mask:
        del AttentionMaskInterface._global_mapping[name]


def is_registered(name: str = DEFAULT_NAME) -> bool:
    """Whether ``name`` currently maps to this backend in transformers' ``AttentionInterface``."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    return AttentionInterface._global_mapping.get(name) is flashinfer_attention_forward


# ------------------------------------------------------------------------------------------------------- masks


def kernel_causal_pattern(q_len: int, kv_len: int, sliding_window: Optional[int], device) -> torch.Tensor:
    """What the kernels apply without a mask, as bool ``[q_len, kv_len]`` (True: attend): query i sits at
    position ``kv_len - q_len + i`` (aligned bottom-right, the last query is the last key) and sees the keys at or
    before it, only the last ``sliding_window`` of them when a window is given (transformers' convention:
    ``kv_idx > q_idx - sliding_window``; the kernels' ``window_left`` is ``sliding_window - 1``)."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = kv_pos <= q_pos
    if sliding_window is not None:
        allowed &= kv_pos > q_pos - sliding_window
    return allowed


def flashinfer_attention_mask(*args: Any, **kwargs: Any) -> Optional[torch.Tensor]:
    """transformers' mask builder for this backend (registered by :func:`register`; same arguments as the
    ``sdpa`` builder, which it calls).

    Returns
    -------
    None or torch.Tensor
        ``None`` when the exact mask equals the kernels' own causal (+ sliding window, ``local_size``) pattern for
        every sequence of the batch; otherwise the exact mask, bool ``[batch, 1, q_len, kv_len]`` (True: attend),
        which :func:`flashinfer_attention_forward` runs as a custom mask.
    """
    from transformers.masking_utils import AttentionMaskInterface

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    mask = AttentionMaskInterface._global_mapping["sdpa"](*args, **kwargs)
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    q_len, kv_len = mask.shape[-2], mask.shape[-1]
    if q_len > kv_len:
        return mask
    pattern = kernel_causal_pattern(q_len, kv_len, kwargs.get("local_size"), mask.device)
    return None if bool((mask == pattern).all()) else mask


# --------------------------------------------------------------------------------------------------- attention


def _check_inputs(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], dropout: float, kwargs: dict) -> None:
    where = f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"
    if dropout and dropout > 0:
        raise NotImplementedError(
            f"{where}: attention dropout {dropout} (training mode) is not supported by the flashinfer backend, "
            "which is inference-only; call model.eval() or use attn_implementation='sdpa' for training")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(f"{where}: output_attentions=True: the flashinfer backend never materialises the "
                                  "attention weights; use attn_implementation='eager'")
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{where}: {unsupported} (attention sinks / additive position bias) is not "
                                      "supported by the flashinfer backend")
    for n, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{where}: {n} must be a 4-D tensor [batch, heads, seq_len, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if query.dtype not in _DTYPES:
        raise TypeError(f"{where}: the flashinfer backend runs float16/bfloat16 models, got {query.dtype}; load the "
                        "model with dtype=torch.bfloat16 (or float16)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"{where}: query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    batch, num_qo_heads, _, head_dim = query.shape
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"{where}: key {tuple(key.shape)} and value {tuple(value.shape)} do not match query "
                         f"{tuple(query.shape)} (expected [batch, kv_heads, kv_len, head_dim])")
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        raise NotImplementedError(f"{where}: query/key/value head dims {head_dim}/{key.shape[-1]}/{value.shape[-1]} "
                                  "differ; the flashinfer backend needs one head_dim")
    if head_dim not in _HEAD_DIMS:
        raise NotImplementedError(f"{where}: head_dim {head_dim} is not supported (supported: {list(_HEAD_DIMS)})")
    if num_qo_heads % key.shape[1]:
        raise ValueError(f"{where}: {num_qo_heads} query heads is not a multiple of {key.shape[1]} KV heads")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise NotImplementedError(f"{where}: attention_mask of type {type(attention_mask).__name__} (e.g. a "
                                      "flex-attention BlockMask) is not supported; pass a bool mask or none")
        if attention_mask.dtype != torch.bool:
            raise NotImplementedError(
                f"{where}: an additive (float, {attention_mask.dtype}) attention mask is not supported; the flashinfer "
                "backend takes boolean masks (True: attend), as its registered mask builder makes")
        q_len, kv_len = query.shape[2], key.shape[2]
        if (attention_mask.dim() != 4 or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] != 1
                or tuple(attention_mask.shape[2:]) != (q_len, kv_len)):
            raise NotImplementedError(
                f"{where}: attention_mask of shape {tuple(attention_mask.shape)} is not supported; expected "
                f"[batch or 1, 1, q_len, kv_len] = [{batch}, 1, {q_len}, {kv_len}] (per-head masks are not supported)")


def flashinfer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention function for this backend (``AttentionInterface`` signature).

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer (``is_causal`` and ``layer_idx`` are read from it when present).
    query : torch.Tensor
        ``[batch, num_qo_heads, q_len, head_dim]``, float16 or bfloat16, CUDA.
    key, value : torch.Tensor
        ``[batch, num_kv_heads, kv_len, head_dim]`` (the cache's whole content for the layer, new tokens last),
        query's dtype and device; ``num_qo_heads`` a multiple of ``num_kv_heads``; head_dim 64, 128 or 256.
    attention_mask : torch.Tensor or None
        ``None`` (causal, aligned bottom-right, see :func:`flashinfer_attention_mask`) or bool
        ``[batch or 1, 1, q_len, kv_len]`` (True: attend), run as a custom mask.
    dropout : float
        Must be 0 (inference only).
    scaling : float, optional
        Softmax scale; default ``1 / sqrt(head_dim)``.
    sliding_window : int, optional
        Each query sees its last ``sliding_window`` keys (itself included). Ignored with a mask, which holds it.
    softcap : float, optional
        Logits soft cap ``c``: logits become ``c * tanh(logit / c)``; None or 0 disables.
    is_causal : bool, optional
        Defaults to ``module.is_causal`` (True when absent). Without a mask, False attends to every key.

    Returns
    -------
    tuple
        ``(attn_output, None)``: attn_output ``[batch, q_len, num_qo_heads, head_dim]`` in query's dtype (no
        attention weights are materialised).
    """
    _check_inputs(module, query, key, value, attention_mask, dropout, kwargs)
    batch, num_qo_heads, q_len, head_dim = query.shape
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    soft_cap = float(softcap) if softcap else None
    window_left = -1
    if sliding_window is not None and attention_mask is None:
        if not causal:
            raise NotImplementedError("a sliding window on non-causal attention without a mask is not supported")
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
        window_left = sliding_window - 1
    sm_scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)

    out = torch.empty((batch, q_len, num_qo_heads, head_dim), dtype=query.dtype, device=query.device)
    if q_len == 0:
        return out, None
    for b in range(batch):
        q = query[b].transpose(0, 1)  # [q_len, heads, head_dim]: a strided view, no copy
        k, v = key[b], value[b]  # [kv_heads, kv_len, head_dim]: HND, read in place
        if attention_mask is not None:
            mask = attention_mask[b if attention_mask.shape[0] > 1 else 0, 0]
            _prefill(q, k, v, custom_mask=mask, kv_layout="HND", sm_scale=sm_scale, logits_soft_cap=soft_cap,
                     out=out[b])
        elif q_len == 1:  # one new token: it attends to every key (causal or not), minus the window
            _decode(q[0], k, v, kv_layout="HND", window_left=window_left, logits_soft_cap=soft_cap,
                    sm_scale=sm_scale, out=out[b, 0])
        else:
            _prefill(q, k, v, causal=causal, kv_layout="HND", sm_scale=sm_scale, window_left=window_left,
                     logits_soft_cap=soft_cap, out=out[b])
    return out, None

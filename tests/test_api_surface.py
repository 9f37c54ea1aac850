"""The public surface is FlashInfer's, and no public parameter is accepted and then ignored.

CPU only. What is checked:

* module paths: every implemented name is importable from FlashInfer's module for it, and nothing from a module
  FlashInfer does not have (``flashinfer.batch_decode``);
* signatures: parameter names, order, kinds and defaults against FlashInfer's current source (recorded below from
  flashinfer-ai/flashinfer at 0.6.18; our extensions are listed and must be keyword-only);
* no parameter is ignored, two ways: statically (each parameter is read in its function's body) and by behaviour:
  every optional parameter of every public function and method gets a non-default value, and the call must then
  either change what runs (the kernels' launch arguments and variant, the plan, the returned tensors, the wrapper's
  attributes) or raise NotImplementedError/ValueError/TypeError naming it. The GPU is replaced by tests/fake_cuda.py
  (launchers record their keyword arguments); the numbers themselves are checked by the GPU tests.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import textwrap
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import flashinfer
from fake_cuda import cuda, fake_cuda, workspace
from flashinfer import decode, page, prefill, quantization, utils

# ------------------------------------------------------------------------------------------- module paths

MODULE_NAMES = {
    "flashinfer.decode": [
        "single_decode_with_kv_cache",
        "BatchDecodeWithPagedKVCacheWrapper",
        "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
        "get_seq_lens",
        "fast_decode_plan",
        "_get_range_buf",
        "trtllm_batch_decode_with_kv_cache",
    ],
    "flashinfer.prefill": [
        "single_prefill_with_kv_cache",
        "single_prefill_with_kv_cache_return_lse",
        "BatchPrefillWithPagedKVCacheWrapper",
        "BatchPrefillWithRaggedKVCacheWrapper",
        "trtllm_batch_context_with_kv_cache",
    ],
    "flashinfer.page": ["append_paged_kv_cache", "get_batch_indices_positions", "get_seq_lens"],
    "flashinfer.quantization": ["packbits", "segment_packbits"],
    "flashinfer.utils": ["PosEncodingMode", "TensorLayout", "MaskMode", "_get_range_buf"],
    # FlashInfer's top level, for the names implemented here.
    "flashinfer": [
        "BatchDecodeWithPagedKVCacheWrapper",
        "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
        "BatchPrefillWithPagedKVCacheWrapper",
        "BatchPrefillWithRaggedKVCacheWrapper",
        "fast_decode_plan",
        "single_decode_with_kv_cache",
        "single_prefill_with_kv_cache",
        "single_prefill_with_kv_cache_return_lse",
        "append_paged_kv_cache",
        "get_batch_indices_positions",
        "get_seq_lens",
        "packbits",
        "segment_packbits",
        "__version__",
    ],
}


@pytest.mark.parametrize("module", sorted(MODULE_NAMES))
def test_names_live_in_flashinfers_modules(module):
    mod = importlib.import_module(module)
    missing = [n for n in MODULE_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_no_module_flashinfer_lacks():
    # (the package's own modules: an editable install of another checkout may still resolve the name)
    assert "batch_decode" not in {m.name for m in pkgutil.iter_modules(flashinfer.__path__)}
    # the same objects wherever they are re-exported
    assert flashinfer.BatchDecodeWithPagedKVCacheWrapper is decode.BatchDecodeWithPagedKVCacheWrapper
    assert decode.get_seq_lens is page.get_seq_lens
    assert [m.value for m in utils.MaskMode] == [0, 1, 2, 3] and [m.value for m in utils.PosEncodingMode] == [0, 1, 2]


def test_version_names_the_api_level_and_this_build():
    from packaging.version import Version

    v = Version(flashinfer.__version__)
    assert v.public == flashinfer.__flashinfer_api_version__ and v.local and v.local.startswith("jit")
    assert v >= Version(flashinfer.__flashinfer_api_version__)  # engines' ">= level" gates pass
    assert not v > Version(".".join(map(str, (*v.release[:-1], v.release[-1] + 1))))  # and no newer release's


# ---------------------------------------------------------------------------------------------- signatures

# FlashInfer's current signatures (flashinfer-ai/flashinfer, 0.6.18): names in order, "=default" when optional,
# "*" before keyword-only parameters, "*args" for a variadic. (Batch decode plan(): FlashInfer 0.6's positional
# order, which 0.6.18 still accepts positionally, then its keyword-only additions.)
FLASHINFER_SIGNATURES = {
    "single_decode_with_kv_cache": "q k v kv_layout='NHD' pos_encoding_mode='NONE' use_tensor_cores=False q_scale=None "
    "k_scale=None v_scale=None window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None "
    "return_lse=False",
    "single_prefill_with_kv_cache": "q k v scale_q=None scale_k=None scale_v=None o_dtype=None custom_mask=None "
    "packed_custom_mask=None causal=False kv_layout='NHD' pos_encoding_mode='NONE' use_fp16_qk_reduction=False "
    "sm_scale=None window_left=-1 logits_soft_cap=None rope_scale=None rope_theta=None backend='auto' return_lse=False "
    "kv_cache_sf=None k_scale=None v_scale=None",
    "BatchDecodeWithPagedKVCacheWrapper.__init__": "float_workspace_buffer kv_layout='NHD' use_cuda_graph=False "
    "use_tensor_cores=False paged_kv_indptr_buffer=None paged_kv_indices_buffer=None "
    "paged_kv_last_page_len_buffer=None backend='auto' jit_args=None",
    "BatchDecodeWithPagedKVCacheWrapper.plan": "indptr indices last_page_len num_qo_heads num_kv_heads head_dim "
    "page_size pos_encoding_mode='NONE' window_left=-1 logits_soft_cap=None q_data_type='float16' kv_data_type=None "
    "o_data_type=None data_type=None sm_scale=None rope_scale=None rope_theta=None non_blocking=True block_tables=None "
    "seq_lens=None fixed_split_size=None disable_split_kv=False * window_right=0 q_len_per_req=1",
    "BatchDecodeWithPagedKVCacheWrapper.run": "q paged_kv_cache *args q_scale=None k_scale=None v_scale=None out=None "
    "lse=None return_lse=False enable_pdl=None window_left=None sinks=None q_len_per_req=None "
    "skip_softmax_threshold_scale_factor=None kv_cache_sf=None",
    "BatchDecodeWithPagedKVCacheWrapper.forward": "q paged_kv_cache pos_encoding_mode='NONE' q_scale=None k_scale=None "
    "v_scale=None window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None",
    "BatchDecodeWithPagedKVCacheWrapper.forward_return_lse": "q paged_kv_cache pos_encoding_mode='NONE' q_scale=None "
    "k_scale=None v_scale=None window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None",
    "BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer": "float_workspace_buffer int_workspace_buffer",
    "BatchDecodeWithPagedKVCacheWrapper.end_forward": "",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.__init__": "workspace_buffer indptr_buffer indices_buffer "
    "last_page_len_buffer kv_layout='NHD' use_tensor_cores=False",
    "fast_decode_plan": "self indptr indices last_page_len num_qo_heads num_kv_heads head_dim page_size "
    "pos_encoding_mode='NONE' window_left=-1 logits_soft_cap=None q_data_type=None kv_data_type=None data_type=None "
    "sm_scale=None rope_scale=None rope_theta=None non_blocking=True fixed_split_size=None disable_split_kv=False "
    "q_len_per_req=1 global_override_indptr_cpu=None",
    "BatchPrefillWithPagedKVCacheWrapper.__init__": "float_workspace_buffer kv_layout='NHD' use_cuda_graph=False "
    "qo_indptr_buf=None paged_kv_indptr_buf=None paged_kv_indices_buf=None paged_kv_last_page_len_buf=None "
    "custom_mask_buf=None mask_indptr_buf=None backend='auto' jit_args=None jit_kwargs=None",
    "BatchPrefillWithPagedKVCacheWrapper.plan": "qo_indptr paged_kv_indptr paged_kv_indices paged_kv_last_page_len "
    "num_qo_heads num_kv_heads head_dim_qk page_size head_dim_vo=None custom_mask=None packed_custom_mask=None "
    "causal=False pos_encoding_mode='NONE' use_fp16_qk_reduction=False sm_scale=None window_left=-1 "
    "logits_soft_cap=None rope_scale=None rope_theta=None q_data_type='float16' kv_data_type=None o_data_type=None "
    "non_blocking=True prefix_len_ptr=None token_pos_in_items_ptr=None token_pos_in_items_len=0 max_item_len_ptr=None "
    "seq_lens=None seq_lens_q=None block_tables=None max_token_per_sequence=None max_sequence_kv=None "
    "fixed_split_size=None disable_split_kv=False",
    "BatchPrefillWithPagedKVCacheWrapper.run": "q paged_kv_cache *args q_scale=None k_scale=None v_scale=None out=None "
    "lse=None return_lse=False enable_pdl=None window_left=None sinks=None kv_cache_sf=None "
    "skip_softmax_threshold_scale_factor=None use_fp16_softmax=None uses_spcompress=None",
    "BatchPrefillWithPagedKVCacheWrapper.forward": "q paged_kv_cache causal=False pos_encoding_mode='NONE' "
    "use_fp16_qk_reduction=False k_scale=None v_scale=None window_left=-1 logits_soft_cap=None sm_scale=None "
    "rope_scale=None rope_theta=None",
    "BatchPrefillWithPagedKVCacheWrapper.forward_return_lse": "q paged_kv_cache causal=False pos_encoding_mode='NONE' "
    "use_fp16_qk_reduction=False k_scale=None v_scale=None window_left=-1 logits_soft_cap=None sm_scale=None "
    "rope_scale=None rope_theta=None",
    "BatchPrefillWithPagedKVCacheWrapper.reset_workspace_buffer": "float_workspace_buffer int_workspace_buffer",
    "BatchPrefillWithRaggedKVCacheWrapper.__init__": "float_workspace_buffer kv_layout='NHD' use_cuda_graph=False "
    "qo_indptr_buf=None kv_indptr_buf=None custom_mask_buf=None mask_indptr_buf=None backend='auto' jit_args=None "
    "jit_kwargs=None",
    "BatchPrefillWithRaggedKVCacheWrapper.plan": "qo_indptr kv_indptr num_qo_heads num_kv_heads head_dim_qk "
    "head_dim_vo=None custom_mask=None packed_custom_mask=None causal=False pos_encoding_mode='NONE' "
    "use_fp16_qk_reduction=False window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None "
    "q_data_type='float16' kv_data_type=None o_data_type=None non_blocking=True prefix_len_ptr=None "
    "token_pos_in_items_ptr=None token_pos_in_items_len=0 max_item_len_ptr=None fixed_split_size=None "
    "disable_split_kv=False seq_lens=None seq_lens_q=None max_token_per_sequence=None max_sequence_kv=None "
    "v_indptr=None o_indptr=None",
    "BatchPrefillWithRaggedKVCacheWrapper.run": "q k v *args q_scale=None k_scale=None v_scale=None o_scale=None "
    "out=None lse=None return_lse=False enable_pdl=None kv_cache_sf=None",
    "BatchPrefillWithRaggedKVCacheWrapper.forward": "q k v causal=False pos_encoding_mode='NONE' "
    "use_fp16_qk_reduction=False window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None",
    "BatchPrefillWithRaggedKVCacheWrapper.forward_return_lse": "q k v causal=False pos_encoding_mode='NONE' "
    "use_fp16_qk_reduction=False window_left=-1 logits_soft_cap=None sm_scale=None rope_scale=None rope_theta=None",
    "BatchPrefillWithRaggedKVCacheWrapper.reset_workspace_buffer": "float_workspace_buffer int_workspace_buffer",
    "append_paged_kv_cache": "append_key append_value batch_indices positions paged_kv_cache kv_indices kv_indptr "
    "kv_last_page_len kv_layout='NHD'",
    "get_batch_indices_positions": "append_indptr seq_lens nnz batch_indices=None positions=None",
    "get_seq_lens": "kv_indptr kv_last_page_len page_size",
    "packbits": "x bitorder='big'",
    "segment_packbits": "x indptr bitorder='big'",
}
# Extensions over FlashInfer's signatures (keyword-only, at the end) and defaults where FlashInfer has none.
EXTENSIONS = {"single_decode_with_kv_cache": ["out", "lse"], "single_prefill_with_kv_cache": ["out", "lse"]}
EXTRA_DEFAULTS = {"reset_workspace_buffer": {"int_workspace_buffer"}}

_OWNERS = {
    "single_decode_with_kv_cache": decode,
    "fast_decode_plan": decode,
    "single_prefill_with_kv_cache": prefill,
    "append_paged_kv_cache": page,
    "get_batch_indices_positions": page,
    "get_seq_lens": page,
    "packbits": quantization,
    "segment_packbits": quantization,
}


def _resolve(qualname: str) -> Any:
    if "." in qualname:
        cls, meth = qualname.split(".")
        return getattr(getattr(flashinfer, cls), meth)
    return getattr(_OWNERS[qualname], qualname)


def _render(sig: inspect.Signature, drop_self: bool) -> Tuple[List[str], Dict[str, Any]]:
    parts, defaults, kw_only_seen = [], {}, False
    for p in sig.parameters.values():
        if drop_self and p.name == "self":
            continue
        if p.kind == p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            kw_only_seen = True
            continue
        if p.kind == p.KEYWORD_ONLY and not kw_only_seen:
            parts.append("*")
            kw_only_seen = True
        parts.append(p.name)
        if p.default is not p.empty:
            defaults[p.name] = p.default
    return parts, defaults


@pytest.mark.parametrize("qualname", sorted(FLASHINFER_SIGNATURES))
def test_signature_is_flashinfers(qualname):
    expected = FLASHINFER_SIGNATURES[qualname].split()
    exp_names = [e.split("=")[0] for e in expected]
    exp_defaults = {e.split("=")[0]: ast.literal_eval(e.split("=", 1)[1]) for e in expected if "=" in e}
    obj = _resolve(qualname)
    names, defaults = _render(inspect.signature(obj), drop_self="." in qualname)
    extra = EXTENSIONS.get(qualname, [])
    if extra:
        assert names[-len(extra) - 1 :] == ["*", *extra] or names[-len(extra) :] == extra, names
        assert all(inspect.signature(obj).parameters[n].kind == inspect.Parameter.KEYWORD_ONLY for n in extra)
        names = [n for n in names if n not in extra]
        if names and names[-1] == "*" and "*" not in exp_names:
            names = names[:-1]
    assert names == exp_names, f"{qualname}: positional order/kinds differ from FlashInfer's"
    for n, d in exp_defaults.items():
        assert n in defaults and defaults[n] == d, (
            f"{qualname}: default of {n} is {defaults.get(n)!r}, FlashInfer's {d!r}"
        )
    lenient = EXTRA_DEFAULTS.get(qualname.split(".")[-1], set())
    surplus = set(defaults) - set(exp_defaults) - lenient - set(extra)
    assert not surplus, f"{qualname}: defaults FlashInfer does not have: {surplus}"


def test_partials_keep_their_targets_signature():
    sig = inspect.signature(flashinfer.single_prefill_with_kv_cache_return_lse)
    assert sig.parameters["return_lse"].default is True
    for cls in (
        flashinfer.BatchDecodeWithPagedKVCacheWrapper,
        flashinfer.BatchPrefillWithPagedKVCacheWrapper,
        flashinfer.BatchPrefillWithRaggedKVCacheWrapper,
    ):
        assert inspect.signature(cls.run_return_lse).parameters["return_lse"].default is True
        assert cls.begin_forward is cls.plan


# ------------------------------------------------------------------------------ no parameter ignored: static


def _public_functions() -> List[Tuple[str, Callable]]:
    """(name, function) of every public function ("f") and method ("Class.method") of the API modules."""
    out = []
    for mod in (decode, prefill, page, quantization):
        for name in getattr(mod, "__all__", []) or [n for n in dir(mod) if not n.startswith("_")]:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                out.append((name, obj))
            elif inspect.isclass(obj) and obj.__module__ == mod.__name__ and not hasattr(obj, "family"):
                for mname, meth in vars(obj).items():
                    if inspect.isfunction(meth) and (not mname.startswith("_") or mname == "__init__"):
                        out.append((f"{obj.__name__}.{mname}", meth))
    out += [
        (n, getattr(mod, n))
        for mod, n in ((decode, "trtllm_batch_decode_with_kv_cache"), (prefill, "trtllm_batch_context_with_kv_cache"))
    ]
    return out


def _read_names(fn: Callable) -> set:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    fdef = tree.body[0]
    body = ast.Module(body=fdef.body, type_ignores=[])
    return {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@pytest.mark.parametrize("qualname,fn", _public_functions(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_parameter_is_read(qualname, fn):
    """A parameter the body never reads is accepted and ignored (e.g. ``def forward(self, *args, **ignored)``)."""
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    unread = [p for p in params if p not in _read_names(fn)]
    assert not unread, f"{qualname} accepts {unread} but never reads them"


# --------------------------------------------------------------------------- no parameter ignored: behaviour

EFFECT = "effect"


def _raises(exc, match):
    return (exc, match)


H, HKV, D = 8, 2, 128
F16 = torch.float16


def _decode_inputs():
    g = torch.Generator().manual_seed(0)
    lens = [20, 0, 3000]  # (a request without pages: output 0, lse -inf)
    pages = [(n + 15) // 16 for n in lens]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * 16 if p else 1 for n, p in zip(lens, pages)], dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    q = cuda(torch.randn(3, H, D, generator=g).to(F16))
    cache = cuda(torch.randn(int(indptr[-1]) + 2, 2, 16, HKV, D, generator=g).to(F16))
    return indptr, indices, last, q, cache


def _prefill_inputs():
    g = torch.Generator().manual_seed(1)
    qo = torch.tensor([0, 5, 12], dtype=torch.int32)
    kv_lens = [20, 3000]
    pages = [(n + 15) // 16 for n in kv_lens]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * 16 for n, p in zip(kv_lens, pages)], dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    kv_indptr = torch.tensor([0, 20, 3020], dtype=torch.int32)
    q = cuda(torch.randn(12, H, D, generator=g).to(F16))
    cache = cuda(torch.randn(int(indptr[-1]) + 2, 2, 16, HKV, D, generator=g).to(F16))
    k = cuda(torch.randn(3020, HKV, D, generator=g).to(F16))
    return qo, indptr, indices, last, kv_indptr, q, cache, k


def _summary(x: Any, provided: List[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        return (
            "tensor",
            tuple(x.shape),
            str(x.dtype),
            any(x.data_ptr() == p.data_ptr() for p in provided),
            x.double().nan_to_num(7.0).sum().item(),
        )
    if isinstance(x, (tuple, list)):
        return tuple(_summary(y, provided) for y in x)
    return x


# Queries whose answers are memoized (so the first call of a test makes them and later ones do not).
_MEMOIZED = ("_occupancy", "_plan_size", "event_create", "event_destroy", "head_tile")


def _launch_view(rec) -> List[Any]:
    out = []
    for sym, kw in rec.calls:
        if sym.endswith(_MEMOIZED):
            continue
        spec = kw.get("_spec")
        decl = {ln.symbol: ln for ln in spec.launchers}.get(sym) if spec is not None else None
        vals = []
        for n, v in kw.items():
            if n == "_spec":
                continue
            if decl is not None and n in decl.names and "*" in decl.c_types[decl.names.index(n)]:
                v = v is not None and v != 0  # an address: only whether there is one
            vals.append((n, v))
        out.append((sym, spec.name() if spec is not None else None, tuple(vals)))
    return out


def _plan_view(w: Any) -> Any:
    p = getattr(w, "_plan_info", None)
    attrs = tuple(
        (a, repr(getattr(w, a, None)))
        for a in (
            "_causal",
            "_pos_encoding_mode",
            "_use_fp16_qk_reduction",
            "_window_left",
            "_logits_soft_cap",
            "_sm_scale",
            "_rope_scale",
            "_rope_theta",
            "_cached_q_data_type",
            "_cached_kv_data_type",
            "_backend",
            "_kv_layout",
            "_use_cuda_graph",
            "_use_tensor_cores",
            "_fixed_batch_size",
        )
    )
    extra = (getattr(w, "_int_workspace_buffer", None) is not None,)
    if p is None:
        return attrs, extra
    sched = p.schedule
    if isinstance(sched, prefill.BatchPrefillWithPagedKVCacheWrapper):
        sched = sched._plan_info.schedule
    if isinstance(sched, prefill.PrefillSchedule):
        tensors = [
            sched.buffer,
            sched.qo_indptr,
            sched.kv_indptr,
            sched.kv_indices,
            sched.kv_last_page_len,
            sched.mask,
            sched.mask_indptr,
        ]
        sched = (
            sched.tile_q,
            sched.grid_x,
            sched.merge_grid_x,
            tuple(None if t is None else tuple(t.as_subclass(torch.Tensor).tolist()) for t in tensors),
        )
    else:
        sched = None
    tables = getattr(w, "_tables", None)
    tables = None if tables is None else tuple(tuple(t.as_subclass(torch.Tensor).tolist()) for t in tables)
    return attrs, extra, p.spec.name(), p.get_stats().as_dict(), sched, tables, p.max_page_id


def _observe(rec, result, wrapper=None, provided=()) -> Any:
    return (_launch_view(rec), _summary(result, list(provided)), _plan_view(wrapper) if wrapper is not None else None)


# Scenarios: run a callable with some arguments replaced, on the fake GPU, and return what can be observed. The
# call under test raises through; the steps after it (a run() after a plan()) report their error as a result, so
# that a value which makes them fail (a dtype or layout the inputs do not have) still counts as an effect.


def _follow(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return ("error", type(e).__name__, str(e)[:120])


def _decode_scenario(rec, phase, init=None, plan=None, method="run", call=None, extra_args=(), graph=False, tc=False):
    indptr, indices, last, q, cache = _decode_inputs()
    init = dict(init or {})
    if graph:
        init.update(
            use_cuda_graph=True,
            paged_kv_indptr_buffer=cuda(torch.zeros(4, dtype=torch.int32)),
            paged_kv_indices_buffer=cuda(torch.zeros(512, dtype=torch.int32)),
            paged_kv_last_page_len_buffer=cuda(torch.zeros(3, dtype=torch.int32)),
        )
    if tc:
        init.setdefault("use_tensor_cores", True)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), **init)
    plan_kw = {"q_data_type": F16, **(plan or {})}
    if method == "fast_decode_plan":
        flashinfer.fast_decode_plan(w, indptr, indices, last, H, HKV, D, 16, **(call or {}))
        result = _follow(lambda: w.run(q, cache))
    else:
        plan_call = lambda: w.plan(indptr, indices, last, H, HKV, D, 16, **plan_kw)  # noqa: E731
        if phase == "init":
            result = _follow(plan_call)
        else:
            plan_call()
        if method == "plan" or phase == "init":
            result = (result if phase == "init" else None, _follow(lambda: w.run(q, cache)))
        elif method == "reset_workspace_buffer":
            w.reset_workspace_buffer(workspace(), **(call or {}))
            result = _follow(lambda: (plan_call(), w.run(q, cache)))
        else:
            result = getattr(w, method)(q, cache, *extra_args, **(call or {}))
    provided = [t for t in (call or {}).values() if isinstance(t, torch.Tensor)]
    return _observe(rec, result, w, provided)


def _graph_decode_scenario(rec, phase, init=None, **_):
    indptr, indices, last, q, cache = _decode_inputs()
    bufs = (
        cuda(torch.zeros(4, dtype=torch.int32)),
        cuda(torch.zeros(512, dtype=torch.int32)),
        cuda(torch.zeros(3, dtype=torch.int32)),
    )
    w = flashinfer.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace(), *bufs, **(init or {}))
    res = _follow(lambda: (w.plan(indptr, indices, last, H, HKV, D, 16, q_data_type=F16), w.run(q, cache)))
    return _observe(rec, res, w)


def _prefill_scenario(rec, kind, phase, init=None, plan=None, method="run", call=None, extra_args=()):
    qo, indptr, indices, last, kv_indptr, q, cache, k = _prefill_inputs()
    cls = (
        flashinfer.BatchPrefillWithPagedKVCacheWrapper
        if kind == "paged"
        else flashinfer.BatchPrefillWithRaggedKVCacheWrapper
    )
    w = cls(workspace(), **(init or {}))
    plan_kw = {"q_data_type": F16, **(plan or {})}
    kv_args = (cache,) if kind == "paged" else (k, k)

    def do_plan():
        if kind == "paged":
            w.plan(qo, indptr, indices, last, H, HKV, D, 16, **plan_kw)
        else:
            w.plan(qo, kv_indptr, H, HKV, D, **plan_kw)

    if phase == "init":
        result = _follow(lambda: (do_plan(), w.run(q, *kv_args)))
    elif method == "plan":
        do_plan()
        result = _follow(lambda: w.run(q, *kv_args))
    elif method == "reset_workspace_buffer":
        do_plan()
        w.reset_workspace_buffer(workspace(), **(call or {}))
        result = _follow(lambda: (do_plan(), w.run(q, *kv_args)))
    else:
        do_plan()
        result = getattr(w, method)(q, *kv_args, *extra_args, **(call or {}))
    provided = [t for t in (call or {}).values() if isinstance(t, torch.Tensor)]
    return _observe(rec, result, w, provided)


def _single_decode_scenario(rec, call=None, **_):
    g = torch.Generator().manual_seed(2)
    q = cuda(torch.randn(H, D, generator=g).to(F16))
    k = cuda(torch.randn(700, HKV, D, generator=g).to(F16))
    call = dict(call or {})
    if call.get("kv_layout") == "HND":
        k = cuda(torch.randn(HKV, 700, D, generator=g).to(F16))
    res = flashinfer.single_decode_with_kv_cache(q, k, k, **call)
    return _observe(rec, res, None, [t for t in call.values() if isinstance(t, torch.Tensor)])


def _single_prefill_scenario(rec, call=None, fn=None, **_):
    g = torch.Generator().manual_seed(3)
    q = cuda(torch.randn(300, H, D, generator=g).to(F16))
    k = cuda(torch.randn(900, HKV, D, generator=g).to(F16))
    call = dict(call or {})
    if call.get("kv_layout") == "HND":
        k = cuda(torch.randn(HKV, 900, D, generator=g).to(F16))
    res = (fn or flashinfer.single_prefill_with_kv_cache)(q, k, k, **call)
    return _observe(rec, res, None, [t for t in call.values() if isinstance(t, torch.Tensor)])


def _page_scenario(rec, name, call=None, **_):
    call = dict(call or {})
    if name == "append_paged_kv_cache":
        cache = cuda(torch.zeros(4, 2, 16, HKV, D, dtype=F16))
        if call.get("kv_layout") == "HND":
            cache = cuda(torch.zeros(4, 2, HKV, 16, D, dtype=F16))
        key = cuda(torch.ones(3, HKV, D, dtype=F16))
        i32 = lambda *v: cuda(torch.tensor(v, dtype=torch.int32))  # noqa: E731
        res = page.append_paged_kv_cache(
            key, key, i32(0, 0, 0), i32(0, 1, 2), cache, i32(1, 2), i32(0, 2), i32(3), **call
        )
        return _observe(rec, res)
    if name == "get_batch_indices_positions":
        res = page.get_batch_indices_positions(
            torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([4, 6], dtype=torch.int32), 5, **call
        )
        return _observe(rec, res, None, [t for t in call.values() if isinstance(t, torch.Tensor)])
    x = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    if name == "packbits":
        return _observe(rec, quantization.packbits(x, **call))
    return _observe(rec, quantization.segment_packbits(x, torch.tensor([0, 3, 10]), **call))


def _i32(*v):
    return cuda(torch.tensor(v, dtype=torch.int32))


# Non-default values (the call's kwargs), what they must do, and the baseline's extra kwargs (the same for both).
ROPE = {"pos_encoding_mode": "ROPE_LLAMA"}
COMMON = {
    "kv_layout": ({"kv_layout": "HND"}, EFFECT),
    "pos_encoding_mode": ({"pos_encoding_mode": "ALIBI"}, EFFECT),
    "use_tensor_cores": ({"use_tensor_cores": True}, EFFECT),
    "q_scale": ({"q_scale": 2.0}, EFFECT),
    "k_scale": ({"k_scale": 2.0}, EFFECT),
    "v_scale": ({"v_scale": 2.0}, EFFECT),
    "window_left": ({"window_left": 5}, EFFECT),
    "logits_soft_cap": ({"logits_soft_cap": 3.0}, EFFECT),
    "sm_scale": ({"sm_scale": 0.3}, EFFECT),
    "rope_scale": ({"rope_scale": 2.0}, EFFECT, ROPE),
    "rope_theta": ({"rope_theta": 5e5}, EFFECT, ROPE),
    "return_lse": ({"return_lse": True}, EFFECT),
    "causal": ({"causal": True}, EFFECT),
    "use_fp16_qk_reduction": ({"use_fp16_qk_reduction": True}, EFFECT),
    "backend": ({"backend": "trtllm-gen"}, _raises(NotImplementedError, "trtllm-gen")),
    "jit_args": ({"jit_args": [1]}, _raises(NotImplementedError, "jit_args")),
    "jit_kwargs": ({"jit_kwargs": {"a": 1}}, _raises(NotImplementedError, "jit_kwargs")),
    "non_blocking": ({"non_blocking": False}, EFFECT),  # plan() waits for its copies (a stream sync)
    "enable_pdl": ({"enable_pdl": True}, EFFECT),
    "sinks": ({"sinks": torch.zeros(H)}, _raises(NotImplementedError, "sinks")),
    "kv_cache_sf": ({"kv_cache_sf": (torch.zeros(1), torch.zeros(1))}, _raises(NotImplementedError, "kv_cache_sf")),
    "skip_softmax_threshold_scale_factor": (
        {"skip_softmax_threshold_scale_factor": 1.0},
        _raises(NotImplementedError, "skip_softmax"),
    ),
    "q_len_per_req": ({"q_len_per_req": 2}, _raises(NotImplementedError, "q_len_per_req")),
    "window_right": ({"window_right": 3}, _raises(NotImplementedError, "window_right")),
    "block_tables": (
        {"block_tables": torch.zeros(3, 4, dtype=torch.int32)},
        _raises(NotImplementedError, "block_tables"),
    ),
    "o_data_type": ({"o_data_type": torch.bfloat16}, _raises(NotImplementedError, "o_data_type")),
    "kv_data_type": ({"kv_data_type": torch.bfloat16}, _raises(TypeError, "kv_data_type")),
    "q_data_type": ({"q_data_type": torch.bfloat16, "kv_data_type": torch.bfloat16}, EFFECT),
    "data_type": ({"data_type": torch.bfloat16}, EFFECT, {"q_data_type": None}),
    "fixed_split_size": ({"fixed_split_size": 16}, EFFECT),
    "disable_split_kv": ({"disable_split_kv": True}, EFFECT),
    "head_dim_vo": ({"head_dim_vo": 64}, _raises(NotImplementedError, "head_dim_vo")),
    "prefix_len_ptr": ({"prefix_len_ptr": torch.zeros(2)}, _raises(NotImplementedError, "prefix_len_ptr")),
    "token_pos_in_items_ptr": ({"token_pos_in_items_ptr": torch.zeros(2)}, _raises(NotImplementedError, "token_pos")),
    "token_pos_in_items_len": ({"token_pos_in_items_len": 4}, _raises(NotImplementedError, "token_pos_in_items_len")),
    "max_item_len_ptr": ({"max_item_len_ptr": torch.zeros(2)}, _raises(NotImplementedError, "max_item_len_ptr")),
    "seq_lens_q": ({"seq_lens_q": torch.tensor([5, 6])}, _raises(ValueError, "seq_lens_q")),
    "max_token_per_sequence": ({"max_token_per_sequence": 2}, _raises(ValueError, "max_token_per_sequence")),
    "max_sequence_kv": ({"max_sequence_kv": 10}, _raises(ValueError, "max_sequence_kv")),
    "v_indptr": ({"v_indptr": torch.zeros(3)}, _raises(NotImplementedError, "v_indptr")),
    "o_indptr": ({"o_indptr": torch.zeros(3)}, _raises(NotImplementedError, "o_indptr")),
    "o_scale": ({"o_scale": 2.0}, _raises(NotImplementedError, "o_scale")),
    "use_fp16_softmax": ({"use_fp16_softmax": True}, _raises(NotImplementedError, "use_fp16_softmax")),
    "uses_spcompress": ({"uses_spcompress": True}, _raises(NotImplementedError, "uses_spcompress")),
    "use_cuda_graph": ({"use_cuda_graph": True}, _raises(ValueError, "use_cuda_graph=True needs")),
    "int_workspace_buffer": ({"int_workspace_buffer": workspace(64)}, EFFECT),
    "scale_q": ({"scale_q": torch.ones(1)}, _raises(NotImplementedError, "scale_q")),
    "scale_k": ({"scale_k": torch.ones(1)}, _raises(NotImplementedError, "scale_k")),
    "scale_v": ({"scale_v": torch.ones(1)}, _raises(NotImplementedError, "scale_v")),
    "o_dtype": ({"o_dtype": torch.bfloat16}, _raises(NotImplementedError, "o_dtype")),
    "bitorder": ({"bitorder": "little"}, EFFECT),
}

# Per callable: which scenario runs it and how its parameters differ from COMMON.
DECODE_BUFS = {
    n: ({n: _i32(0, 0, 0, 0)}, _raises(ValueError, "use_cuda_graph=True"))
    for n in ("paged_kv_indptr_buffer", "paged_kv_indices_buffer", "paged_kv_last_page_len_buffer")
}
PREFILL_BUFS = {
    n: ({n: _i32(0, 0, 0)}, _raises(ValueError, "use_cuda_graph=True"))
    for n in (
        "qo_indptr_buf",
        "kv_indptr_buf",
        "paged_kv_indptr_buf",
        "paged_kv_indices_buf",
        "paged_kv_last_page_len_buf",
        "mask_indptr_buf",
    )
}
PREFILL_BUFS["custom_mask_buf"] = (
    {"custom_mask_buf": cuda(torch.zeros(8, dtype=torch.uint8))},
    _raises(ValueError, "use_cuda_graph=True"),
)
CUSTOM_MASK = {  # per request qo_len x kv_len bits (5 x 20 and 7 x 3000)
    "custom_mask": (
        {"custom_mask": cuda(torch.rand(5 * 20 + 7 * 3000, generator=torch.Generator().manual_seed(4)) < 0.5)},
        EFFECT,
    ),
    "packed_custom_mask": ({"packed_custom_mask": cuda(torch.full((13 + 2625,), 0x5A, dtype=torch.uint8))}, EFFECT),
}
DECODE_RUN = {
    "window_left": ({"window_left": 5}, _raises(ValueError, "window_left")),
    "enable_pdl": ({"enable_pdl": False}, EFFECT),
    "out": ({"out": cuda(torch.zeros(3, H, D, dtype=F16))}, EFFECT),
    "lse": ({"lse": cuda(torch.zeros(3, H))}, EFFECT),
}
PREFILL_RUN = {
    "window_left": ({"window_left": 5}, _raises(ValueError, "window_left")),
    "out": ({"out": cuda(torch.zeros(12, H, D, dtype=F16))}, EFFECT),
    "lse": ({"lse": cuda(torch.zeros(12, H))}, EFFECT),
}

CALLABLES: Dict[str, Tuple[Callable, str, Dict[str, Any], Dict[str, Any]]] = {
    # qualname: (function, phase the parameters go to, scenario kwargs, overrides)
    "single_decode_with_kv_cache": (
        decode.single_decode_with_kv_cache,
        "call",
        {"scenario": "single_decode"},
        {"out": ({"out": cuda(torch.zeros(H, D, dtype=F16))}, EFFECT), "lse": ({"lse": cuda(torch.zeros(H))}, EFFECT)},
    ),
    "single_prefill_with_kv_cache": (
        prefill.single_prefill_with_kv_cache,
        "call",
        {"scenario": "single_prefill"},
        {
            "out": ({"out": cuda(torch.zeros(300, H, D, dtype=F16))}, EFFECT),
            "lse": ({"lse": cuda(torch.zeros(300, H))}, EFFECT),
            "backend": ({"backend": "fa3"}, EFFECT),
            "custom_mask": ({"custom_mask": cuda(torch.rand(300, 900) < 0.5)}, EFFECT),
            "packed_custom_mask": (
                {"packed_custom_mask": cuda(torch.full((300 * 900 // 8,), 0x5A, dtype=torch.uint8))},
                EFFECT,
            ),
        },
    ),
    "single_prefill_with_kv_cache_return_lse": (
        prefill.single_prefill_with_kv_cache_return_lse,
        "call",
        {"scenario": "single_prefill_lse"},
        {
            "return_lse": ({"return_lse": False}, EFFECT),
            "out": ({"out": cuda(torch.zeros(300, H, D, dtype=F16))}, EFFECT),
            "lse": ({"lse": cuda(torch.zeros(300, H))}, EFFECT),
            "backend": ({"backend": "fa3"}, EFFECT),
            "custom_mask": ({"custom_mask": cuda(torch.rand(300, 900) < 0.5)}, EFFECT),
            "packed_custom_mask": (
                {"packed_custom_mask": cuda(torch.full((300 * 900 // 8,), 0x5A, dtype=torch.uint8))},
                EFFECT,
            ),
        },
    ),
    "BatchDecodeWithPagedKVCacheWrapper.__init__": (
        decode.BatchDecodeWithPagedKVCacheWrapper.__init__,
        "init",
        {"scenario": "decode"},
        DECODE_BUFS,
    ),
    "BatchDecodeWithPagedKVCacheWrapper.plan": (
        decode.BatchDecodeWithPagedKVCacheWrapper.plan,
        "plan",
        {"scenario": "decode", "method": "plan"},
        {
            "fixed_split_size": ({"fixed_split_size": 16}, _raises(ValueError, "fixed_split_size")),
            "seq_lens": ({"seq_lens": torch.tensor([20, 1, 3000])}, _raises(ValueError, "seq_lens")),
        },
    ),
    "BatchDecodeWithPagedKVCacheWrapper.plan[tensor cores]": (
        decode.BatchDecodeWithPagedKVCacheWrapper.plan,
        "plan",
        {"scenario": "decode", "method": "plan", "tc": True},
        {"seq_lens": ({"seq_lens": torch.tensor([20, 1, 3000])}, _raises(ValueError, "seq_lens"))},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.run": (
        decode.BatchDecodeWithPagedKVCacheWrapper.run,
        "call",
        {"scenario": "decode", "method": "run"},
        DECODE_RUN,
    ),
    "BatchDecodeWithPagedKVCacheWrapper.run[tensor cores]": (
        decode.BatchDecodeWithPagedKVCacheWrapper.run,
        "call",
        {"scenario": "decode", "method": "run", "tc": True},
        {**DECODE_RUN, "enable_pdl": ({"enable_pdl": True}, EFFECT)},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.run_return_lse": (
        decode.BatchDecodeWithPagedKVCacheWrapper.run_return_lse,
        "call",
        {"scenario": "decode", "method": "run_return_lse"},
        {**DECODE_RUN, "return_lse": ({"return_lse": False}, EFFECT)},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.forward": (
        decode.BatchDecodeWithPagedKVCacheWrapper.forward,
        "call",
        {"scenario": "decode", "method": "forward"},
        {},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.forward[tensor cores]": (
        decode.BatchDecodeWithPagedKVCacheWrapper.forward,
        "call",
        {"scenario": "decode", "method": "forward", "tc": True},
        {},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.forward_return_lse": (
        decode.BatchDecodeWithPagedKVCacheWrapper.forward_return_lse,
        "call",
        {"scenario": "decode", "method": "forward_return_lse"},
        {},
    ),
    "BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer": (
        decode.BatchDecodeWithPagedKVCacheWrapper.reset_workspace_buffer,
        "call",
        {"scenario": "decode", "method": "reset_workspace_buffer"},
        {},
    ),
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.__init__": (
        decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper.__init__,
        "init",
        {"scenario": "graph_decode"},
        {},
    ),
    "fast_decode_plan": (
        decode.fast_decode_plan,
        "call",
        {"scenario": "decode", "method": "fast_decode_plan"},
        {
            "fixed_split_size": ({"fixed_split_size": 16}, _raises(ValueError, "fixed_split_size")),
            "global_override_indptr_cpu": (
                {"global_override_indptr_cpu": torch.tensor([0, 2, 2, 3], dtype=torch.int32)},
                EFFECT,
            ),
            "q_data_type": ({"q_data_type": torch.bfloat16, "kv_data_type": torch.bfloat16}, EFFECT),
        },
    ),
}
for _kind, _cls in (
    ("paged", prefill.BatchPrefillWithPagedKVCacheWrapper),
    ("ragged", prefill.BatchPrefillWithRaggedKVCacheWrapper),
):
    _name = _cls.__name__
    _seq = torch.tensor([20, 9]) if _kind == "paged" else torch.tensor([20, 9])
    CALLABLES.update(
        {
            f"{_name}.__init__": (
                _cls.__init__,
                "init",
                {"scenario": _kind},
                {**PREFILL_BUFS, "backend": ({"backend": "cudnn"}, _raises(NotImplementedError, "cudnn"))},
            ),
            f"{_name}.plan": (
                _cls.plan,
                "plan",
                {"scenario": _kind, "method": "plan"},
                {**CUSTOM_MASK, "seq_lens": ({"seq_lens": _seq}, _raises(ValueError, "seq_lens"))},
            ),
            f"{_name}.run": (_cls.run, "call", {"scenario": _kind, "method": "run"}, PREFILL_RUN),
            f"{_name}.run_return_lse": (
                _cls.run_return_lse,
                "call",
                {"scenario": _kind, "method": "run_return_lse"},
                {**PREFILL_RUN, "return_lse": ({"return_lse": False}, EFFECT)},
            ),
            f"{_name}.forward": (_cls.forward, "call", {"scenario": _kind, "method": "forward"}, {}),
            f"{_name}.forward_return_lse": (
                _cls.forward_return_lse,
                "call",
                {"scenario": _kind, "method": "forward_return_lse"},
                {},
            ),
            f"{_name}.reset_workspace_buffer": (
                _cls.reset_workspace_buffer,
                "call",
                {"scenario": _kind, "method": "reset_workspace_buffer"},
                {},
            ),
        }
    )
for _fn in (
    page.append_paged_kv_cache,
    page.get_batch_indices_positions,
    quantization.packbits,
    quantization.segment_packbits,
):
    CALLABLES[_fn.__name__] = (
        _fn,
        "call",
        {"scenario": "page", "name": _fn.__name__},
        {
            "batch_indices": ({"batch_indices": torch.zeros(5, dtype=torch.int32)}, EFFECT),
            "positions": ({"positions": torch.zeros(5, dtype=torch.int32)}, EFFECT),
        },
    )


def _scenario(rec, scen: Dict[str, Any], phase: str, kwargs: Dict[str, Any], extra_args=()):
    s = dict(scen)
    kind = s.pop("scenario")
    if kind in ("decode", "graph_decode"):
        fn = _decode_scenario if kind == "decode" else _graph_decode_scenario
        return fn(rec, phase, **{phase: kwargs}, extra_args=extra_args, **s)
    if kind in ("paged", "ragged"):
        return _prefill_scenario(rec, kind, phase, **{phase: kwargs}, extra_args=extra_args, **s)
    if kind == "single_decode":
        return _single_decode_scenario(rec, call=kwargs)
    if kind in ("single_prefill", "single_prefill_lse"):
        fn = flashinfer.single_prefill_with_kv_cache_return_lse if kind.endswith("lse") else None
        return _single_prefill_scenario(rec, call=kwargs, fn=fn)
    return _page_scenario(rec, s["name"], call=kwargs)


def _cases():
    for qualname, (fn, phase, scen, overrides) in CALLABLES.items():
        for p in inspect.signature(fn).parameters.values():
            if p.name == "self" or (p.default is p.empty and p.kind != p.VAR_POSITIONAL):
                continue  # required parameters are read (test_every_parameter_is_read) and checked by the GPU tests
            yield pytest.param(qualname, p.name, id=f"{qualname}:{p.name}")


@pytest.mark.parametrize("qualname,param", list(_cases()))
def test_no_parameter_is_ignored(qualname, param, monkeypatch):
    """A non-default value of each optional parameter changes what runs or raises naming it (see the module doc)."""
    fn, phase, scen, overrides = CALLABLES[qualname]
    kind = inspect.signature(fn).parameters[param].kind
    if kind == inspect.Parameter.VAR_POSITIONAL:
        case = ({}, _raises(NotImplementedError, "positional"))
    else:
        case = overrides.get(param) or COMMON.get(param)
        assert case is not None, f"no test value for {qualname}({param}=...): add one to COMMON or the overrides"
    variant, expect = case[0], case[1]
    base = dict(case[2]) if len(case) > 2 else {}
    if param in base:  # the baseline sets another value of the parameter itself
        pass
    with fake_cuda(monkeypatch) as rec:
        baseline = _scenario(rec, scen, phase, dict(base))
        rec.clear()
        extra_args = (1,) if kind == inspect.Parameter.VAR_POSITIONAL else ()
        if expect == EFFECT:
            changed = _scenario(rec, scen, phase, {**base, **variant}, extra_args)
            assert changed != baseline, f"{qualname}({param}={variant.get(param)!r}) changed nothing: ignored"
        else:
            exc, match = expect
            with pytest.raises(exc, match=match):
                _scenario(rec, scen, phase, {**base, **variant}, extra_args)


def test_every_public_callable_is_covered():
    """Each public function and method is in CALLABLES (so test_no_parameter_is_ignored sees its parameters), or
    has no optional parameter."""
    covered = {q.split("[")[0] for q in CALLABLES}
    missing = []
    for name, fn in _public_functions():
        optional = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and (p.default is not p.empty or p.kind == p.VAR_POSITIONAL)
        ]
        if name.startswith("trtllm_"):  # stubs: always NotImplementedError
            continue
        if optional and name not in covered and fn not in {CALLABLES[c][0] for c in CALLABLES}:
            missing.append(name)
    assert not missing, f"public callables without a parameter test: {missing}"


# ------------------------------------------------------------------------------------------ docstrings


@pytest.mark.parametrize(
    "qualname,fn",
    [(n, f) for n, f in _public_functions() if not n.startswith("trtllm_")],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_public_functions_have_numpydoc_sections(qualname, fn):
    """Numpydoc sections: Parameters (every parameter named) where there are parameters, Returns where something
    is returned; a constructor's parameters may be documented on its class."""
    doc = inspect.getdoc(fn) or ""
    if qualname.endswith(".__init__"):
        doc += "\n" + (
            inspect.getdoc(getattr(decode, qualname.split(".")[0], None) or getattr(prefill, qualname.split(".")[0]))
            or ""
        )
    params = [p for p in inspect.signature(fn).parameters if p != "self" or qualname == "fast_decode_plan"]
    if params:
        assert "Parameters\n----------" in doc, f"{qualname}: no Parameters section"
        section = doc.split("Parameters\n----------", 1)[1]
        undocumented = [
            p
            for p in params
            if not any(p in line for line in section.splitlines() if line and not line.startswith(" "))
        ]
        assert not undocumented, f"{qualname}: parameters not documented: {undocumented}"
    returns = inspect.signature(fn).return_annotation
    if returns not in (None, "None", inspect.Signature.empty) and not qualname.endswith(".__init__"):
        assert "Returns\n-------" in doc, f"{qualname}: no Returns section"


# ------------------------------------------------------------------------ wrapper behaviours (fake GPU)


def _launches(rec, part):
    return [(kw["_spec"], kw) for s, kw in rec.calls if s.endswith(part)]


@pytest.mark.parametrize("kind", ["decode", "decode-tc", "paged", "ragged"])
def test_forward_changes_the_options_not_the_plan(kind, monkeypatch):
    """forward(...) sets the wrapper's options (FlashInfer's attributes) and the launch follows them with the same
    plan; run() keeps them; plan() resets them to its own."""
    with fake_cuda(monkeypatch) as rec:
        if kind.startswith("decode"):
            indptr, indices, last, q, cache = _decode_inputs()
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), use_tensor_cores=kind == "decode-tc")
            replan = lambda: w.plan(indptr, indices, last, H, HKV, D, 16, q_data_type=F16)  # noqa: E731
            fwd = lambda **kw: w.forward(q, cache, **kw)  # noqa: E731
            kv_args, launch = (cache,), "_run" if kind == "decode" else "batch_prefill"
            options = dict(sm_scale=0.25, logits_soft_cap=7.0, window_left=9, pos_encoding_mode="ALIBI")
        else:
            qo, indptr, indices, last, kv_indptr, q, cache, k = _prefill_inputs()
            if kind == "paged":
                w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace())
                replan = lambda: w.plan(qo, indptr, indices, last, H, HKV, D, 16, q_data_type=F16)  # noqa: E731
                kv_args = (cache,)
            else:
                w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace())
                replan = lambda: w.plan(qo, kv_indptr, H, HKV, D, q_data_type=F16)  # noqa: E731
                kv_args = (k, k)
            fwd = lambda **kw: w.forward(q, *kv_args, **kw)  # noqa: E731
            launch = "batch_prefill"
            options = dict(
                causal=True,
                sm_scale=0.25,
                logits_soft_cap=7.0,
                window_left=9,
                pos_encoding_mode="ALIBI",
                use_fp16_qk_reduction=True,
            )
        replan()
        plan = w._plan_info
        rec.clear()
        fwd(**options)
        assert w._plan_info is plan
        spec, kw = _launches(rec, launch)[-1]
        assert spec.pos_encoding_mode == "ALIBI" and spec.use_logits_soft_cap
        kw = {k[5:] if k.startswith("args.") else k: v for k, v in kw.items()}  # (batch decode: a struct's fields)
        assert kw["sm_scale"] == pytest.approx(0.25) and kw["logits_soft_cap"] == 7.0 and kw["window_left"] == 9
        if kind in ("paged", "ragged"):
            assert spec.mask_mode == "causal" and spec.use_fp16_qk_reduction and spec.use_window
            assert w._causal is True
        rec.clear()
        w.run(q, *kv_args)
        assert _launches(rec, launch)[-1][0] == spec  # run() keeps forward()'s options
        replan()
        rec.clear()
        w.run(q, *kv_args)
        spec2, kw2 = _launches(rec, launch)[-1]
        kw2 = {k[5:] if k.startswith("args.") else k: v for k, v in kw2.items()}
        assert spec2.pos_encoding_mode == "NONE" and not spec2.use_logits_soft_cap and kw2["window_left"] == -1


def test_graph_mode_custom_mask_lives_in_the_callers_buffers(monkeypatch):
    with fake_cuda(monkeypatch):
        qo, indptr, indices, last, kv_indptr, q, cache, k = _prefill_inputs()
        bufs = dict(
            qo_indptr_buf=_i32(0, 0, 0),
            paged_kv_indptr_buf=_i32(0, 0, 0),
            paged_kv_indices_buf=cuda(torch.zeros(400, dtype=torch.int32)),
            paged_kv_last_page_len_buf=_i32(0, 0),
            custom_mask_buf=cuda(torch.zeros(4096, dtype=torch.uint8)),
            mask_indptr_buf=_i32(0, 0, 0),
        )
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), use_cuda_graph=True, **bufs)
        n = 5 * 20 + 7 * 3000
        addresses = set()
        for seed in range(3):
            mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
            w.plan(qo, indptr, indices, last, H, HKV, D, 16, q_data_type=F16, custom_mask=cuda(mask))
            s = w._plan_info.schedule
            addresses.add(
                (
                    s.mask.data_ptr(),
                    s.mask_indptr.data_ptr(),
                    s.buffer.data_ptr(),
                    s.qo_indptr.data_ptr(),
                    s.kv_indptr.data_ptr(),
                    s.kv_indices.data_ptr(),
                    s.kv_last_page_len.data_ptr(),
                )
            )
            packed = quantization.segment_packbits(mask, torch.tensor([0, 100, n]), bitorder="little")[0]
            assert torch.equal(bufs["custom_mask_buf"][: packed.numel()].as_subclass(torch.Tensor), packed)
        assert addresses == {
            (
                bufs["custom_mask_buf"].data_ptr(),
                bufs["mask_indptr_buf"].data_ptr(),
                *next(iter(addresses))[2:3],
                bufs["qo_indptr_buf"].data_ptr(),
                bufs["paged_kv_indptr_buf"].data_ptr(),
                bufs["paged_kv_indices_buf"].data_ptr(),
                bufs["paged_kv_last_page_len_buf"].data_ptr(),
            )
        }
        with pytest.raises(ValueError, match="kernel variant"):  # a captured graph bakes the variant in
            w.plan(qo, indptr, indices, last, H, HKV, D, 16, q_data_type=F16, causal=True)
        w2 = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace(), use_cuda_graph=True, **{k: v for k, v in bufs.items() if "mask" not in k}
        )
        with pytest.raises(ValueError, match="custom_mask_buf"):
            w2.plan(
                qo,
                indptr,
                indices,
                last,
                H,
                HKV,
                D,
                16,
                q_data_type=F16,
                custom_mask=cuda(torch.ones(n, dtype=torch.bool)),
            )


def test_plans_flashinfer_accepts(monkeypatch):
    """Causal with more queries than keys, requests without keys, last_page_len 0 or anything without pages,
    paged indptr starting past 0 (vLLM's prefills after its decodes): planned, as FlashInfer does."""
    with fake_cuda(monkeypatch):
        pw = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace())
        pw.plan(
            torch.tensor([0, 300, 301], dtype=torch.int32),
            torch.tensor([0, 100, 100], dtype=torch.int32),
            H,
            HKV,
            D,
            causal=True,
            q_data_type=F16,
        )
        assert pw._plan_info.max_kv_len == 100
        pp = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace())
        pp.plan(
            torch.tensor([0, 4, 8, 9], dtype=torch.int32),
            torch.tensor([5, 7, 7, 8], dtype=torch.int32),
            torch.arange(8, dtype=torch.int32),
            torch.tensor([3, 99, 0], dtype=torch.int32),
            H,
            HKV,
            D,
            16,
            causal=True,
            q_data_type=F16,
        )
        assert pp._plan_info.get_stats().total_keys == 16 + 3 + 0  # (pages 5-6, none, page 7 with 0 tokens)
        for tc in (False, True):
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), use_tensor_cores=tc)
            w.plan(
                torch.tensor([0, 0, 2, 2, 3], dtype=torch.int32),
                torch.arange(3, dtype=torch.int32),
                torch.tensor([1, 5, 16, 0], dtype=torch.int32),
                H,
                HKV,
                D,
                16,
                q_data_type=F16,
            )
            assert w.plan_stats["total_keys"] == 21
            if not tc:
                continue  # (the compiled planner's errors: test_batch_decode.py's host_schedule tests)
            with pytest.raises(ValueError, match="outside 0..page_size"):
                w.plan(
                    torch.tensor([0, 1], dtype=torch.int32),
                    torch.arange(1, dtype=torch.int32),
                    torch.tensor([17], dtype=torch.int32),
                    H,
                    HKV,
                    D,
                    16,
                    q_data_type=F16,
                )


def test_data_type_fills_only_the_dtypes_left_none(monkeypatch):
    """FlashInfer's rule for the deprecated data_type: it fills q_data_type/kv_data_type only where they are None
    (q_data_type's default is "float16", so a bfloat16 data_type alone makes a float16/bfloat16 mix)."""
    with fake_cuda(monkeypatch):
        indptr, indices, last, q, cache = _decode_inputs()
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace())
        w.plan(indptr, indices, last, H, HKV, D, 16, q_data_type=None, data_type=torch.bfloat16)
        assert w._cached_q_data_type == w._cached_kv_data_type == torch.bfloat16
        w.plan(indptr, indices, last, H, HKV, D, 16, data_type="float16")
        assert w._cached_q_data_type == w._cached_kv_data_type == torch.float16
        with pytest.raises(TypeError, match="the KV dtype must be q.s"):
            w.plan(indptr, indices, last, H, HKV, D, 16, data_type=torch.bfloat16)

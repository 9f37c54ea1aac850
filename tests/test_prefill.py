"""Prefill attention (single request and batches, ragged and paged) against the float64 reference: the spec
matrix, the issue's length/group/page/mask matrix, views, graphs and bad input; on the CPU: spec naming,
validation that needs no GPU, and a real nvcc build of one prefill module."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch

import flashinfer
from _jit_checks import assert_register_only, sass_of
from flashinfer.prefill import BatchPrefillSpec, SinglePrefillSpec, decode_with_tensor_cores
from reference import LSE_TOL, TOLERANCES, assert_close, attention, poisoned

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def _nhd_to(layout, x):
    return x if layout == "NHD" else x.transpose(0, 1).contiguous()


def _ref(q, k, v, *, mask_mode="none", mask=None, **kw):
    return attention(q, k, v, causal=mask_mode == "causal", mask=mask, **kw)


def _check_lse(lse, ref_lse, what="lse", rope_dtype=None):
    assert not torch.isnan(lse).any(), f"{what}: NaN (unwritten)"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{what}: -inf pattern differs"
    # With RoPE the kernel rotates q/k in shared memory and rounds them back to 16 bits (as FlashInfer does);
    # the float64 reference rotates exact values, so the logits differ by ~1 ulp of the input dtype.
    tol = TOLERANCES[rope_dtype] if rope_dtype is not None else LSE_TOL
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol[0], rtol=tol[1])


def _run_single(
    qo_len,
    kv_len,
    num_kv_heads,
    group,
    head_dim,
    dtype,
    layout="NHD",
    mask_mode="none",
    pos="NONE",
    window_left=-1,
    soft_cap=0.0,
    fp16qk=False,
    scale=1.0,
    **extra,
):
    q = torch.randn(qo_len, num_kv_heads * group, head_dim, device="cuda", dtype=dtype) * scale
    k = torch.randn(kv_len, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(kv_len, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    mask = torch.rand(qo_len, kv_len, device="cuda") < 0.7 if mask_mode == "custom" else None
    kw = dict(
        pos_encoding_mode=pos,
        window_left=window_left,
        logits_soft_cap=soft_cap or None,
        use_fp16_qk_reduction=fp16qk,
        **extra,
    )
    out = poisoned((qo_len, num_kv_heads * group, head_dim), dtype)
    lse = poisoned((qo_len, num_kv_heads * group), torch.float32)
    o, l = flashinfer.single_prefill_with_kv_cache(
        q,
        _nhd_to(layout, k),
        _nhd_to(layout, v),
        custom_mask=mask,
        causal=mask_mode == "causal",
        kv_layout=layout,
        return_lse=True,
        out=out,
        lse=lse,
        **kw,
    )
    assert o is out and l is lse
    ref_kw = {n: extra[n] for n in ("sm_scale", "rope_scale", "rope_theta") if n in extra}
    ref_o, ref_lse = _ref(
        q,
        k,
        v,
        mask_mode=mask_mode,
        mask=mask,
        window_left=window_left,
        logits_soft_cap=soft_cap,
        pos_encoding_mode=pos,
        **ref_kw,
    )
    if fp16qk:
        torch.testing.assert_close(o.double(), ref_o, atol=2e-2, rtol=2e-2)
    elif pos == "ROPE_LLAMA":  # rotated q/k are rounded back to 16 bits in shared memory: one more input rounding
        atol, rtol = TOLERANCES[dtype]
        assert not torch.isnan(o).any()
        torch.testing.assert_close(o.double(), ref_o, atol=2 * atol, rtol=2 * rtol)
    else:
        assert_close(o, ref_o, what="o")
    _check_lse(l, ref_lse, rope_dtype=dtype if pos == "ROPE_LLAMA" else None)


# ------------------------------------------------------------------------------------- GPU: single prefill

SINGLE_SPECS = (
    [
        s
        for s in SinglePrefillSpec.expand(
            dtype_kv=("bf16", "f16"), use_window=(False,), use_logits_soft_cap=(False,), use_fp16_qk_reduction=(False,)
        )
        if s.unsupported_reason() is None
    ]
    + [
        s
        for s in SinglePrefillSpec.expand(
            head_dim=(128,), dtype_q=("bf16",), dtype_kv=("bf16",), dtype_o=("bf16",), use_fp16_qk_reduction=(False,)
        )
        if s.unsupported_reason() is None and (s.use_window or s.use_logits_soft_cap)
    ]
    + [SinglePrefillSpec(128, "f16", "f16", "f16", m, "NONE", False, False, True) for m in ("none", "causal")]
)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SINGLE_SPECS, ids=lambda s: s.name())
def test_single_prefill_spec_matrix(spec: SinglePrefillSpec):
    dtype = DTYPES[spec.dtype_q]
    for qo_len, kv_len in ((17, 517), (128, 128), (1000, 4096)):
        kw = {}
        if spec.pos_encoding_mode == "ROPE_LLAMA" and kv_len == 4096:
            kw.update(rope_scale=2.0, rope_theta=5e5)
        _run_single(
            qo_len,
            kv_len,
            2,
            4,
            spec.head_dim,
            dtype,
            mask_mode=spec.mask_mode,
            pos=spec.pos_encoding_mode,
            window_left=kv_len // 3 if spec.use_window else -1,
            soft_cap=1.5 if spec.use_logits_soft_cap else 0.0,
            fp16qk=spec.use_fp16_qk_reduction,
            scale=2.0 if spec.use_logits_soft_cap else 1.0,
            backend=spec.backend,
            **kw,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("qo_len", [1, 17, 128, 1000])
@pytest.mark.parametrize("kv_extra", [0, 500, "4096"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("mask_mode", ["none", "causal", "custom"])
def test_single_prefill_lengths_groups_masks(qo_len, kv_extra, group, mask_mode):
    kv_len = 4096 if kv_extra == "4096" else qo_len + kv_extra
    layout = "HND" if (qo_len + group) % 2 else "NHD"
    _run_single(qo_len, kv_len, 2, group, 128, torch.bfloat16, layout=layout, mask_mode=mask_mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize(
    "qo_len,kv_len,group", [(1, 1, 1), (17, 17, 4), (128, 628, 1), (1000, 1000, 8), (300, 4096, 4), (2048, 2048, 1)]
)
def test_single_prefill_fa3(dtype, mask_mode, qo_len, kv_len, group):
    # The Hopper wgmma kernel, forced (auto takes it only when its query tiles fill the GPU).
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fa3 backend needs a Hopper (sm_90) GPU")
    layout = "HND" if qo_len % 2 else "NHD"
    _run_single(qo_len, kv_len, 2, group, 128, dtype, layout=layout, mask_mode=mask_mode, backend="fa3")


# The warp-specialised Hopper kernel (backend="fa3_ws", prefill_sm90_ws.cuh): query and key lengths around its
# 128-row query tiles and 128-key KV tiles (1, mid-tile, one short of / at / one past a tile, long), GQA 1/4/8.
# Causal needs qo_len <= kv_len (FlashInfer's single prefill aligns the mask bottom-right; qo_len > kv_len is
# refused, see test_single_prefill_fa3_ws_refusals); without a mask every pair runs, qo_len > kv_len included.
_WS_PAIRS = [
    (1, 1),
    (17, 17),
    (64, 64),
    (127, 127),
    (128, 128),
    (129, 129),
    (1000, 1000),
    (4096, 4096),
    (1, 4096),
    (17, 1000),
    (127, 129),
    (129, 8192),
    (1000, 4096),
    (129, 17),
    (1000, 127),
    (4096, 64),
]


def _need_hopper(what: str = "the fa3_ws backend") -> None:
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{what} needs a Hopper (sm_90) GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64], ids=["d128", "d64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("qo_len,kv_len", _WS_PAIRS, ids=[f"q{a}-kv{b}" for a, b in _WS_PAIRS])
def test_single_prefill_fa3_ws(dtype, mask_mode, group, qo_len, kv_len, head_dim):
    _need_hopper()
    if mask_mode == "causal" and qo_len > kv_len:
        pytest.skip("causal needs qo_len <= kv_len (refused: test_single_prefill_fa3_ws_refusals)")
    layout = "HND" if (qo_len + group) % 2 else "NHD"
    _run_single(qo_len, kv_len, 2, group, head_dim, dtype, layout=layout, mask_mode=mask_mode, backend="fa3_ws")


@pytest.mark.gpu
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize(
    "qo_len,kv_len,group,head_dim",
    [(8192, 8192, 1, 128), (8321, 8321, 8, 128), (2000, 16384, 4, 128), (8321, 8321, 4, 64)],
)
def test_single_prefill_fa3_ws_long(mask_mode, qo_len, kv_len, group, head_dim):
    """Long sequences: 64-130 KV tiles per work item, so every ring slot's mbarrier wraps its phase many times."""
    _need_hopper()
    _run_single(qo_len, kv_len, 1, group, head_dim, torch.bfloat16, mask_mode=mask_mode, backend="fa3_ws")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64], ids=["d128", "d64"])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
def test_single_prefill_fa3_ws_many_items_per_cta(mask_mode, head_dim):
    """More work items than SMs (the persistent grid walks ~8-16 items per CTA: the Q barriers' phases and the K/V
    ring position carry over from item to item), heads and GQA mixed, a scale other than the default."""
    _need_hopper()
    _run_single(3000, 3000, 8, 4, head_dim, torch.float16, mask_mode=mask_mode, backend="fa3_ws", sm_scale=0.05)
    _run_single(2000, 2500, 16, 1, head_dim, torch.bfloat16, mask_mode=mask_mode, backend="fa3_ws")


@pytest.mark.gpu
def test_single_prefill_fa3_ws_views_empty_kv_and_stream():
    """Strided K/V views (TMA takes any 16-byte multiple strides), a single KV row and KV head, no keys at all
    (zeros and lse -inf), and the launch on the current stream."""
    _need_hopper()
    dt = torch.bfloat16
    q = torch.randn(300, 8, 128, device="cuda", dtype=dt)
    big = torch.randn(700, 4, 2, 128, device="cuda", dtype=dt)
    k, v = big[::2, :, 0], big[1::2, :, 1]  # token stride 2048 elements, head stride 256
    ref, ref_lse = attention(q, k, v, causal=True)
    o, lse = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, backend="fa3_ws", return_lse=True)
    assert_close(o, ref)
    _check_lse(lse, ref_lse)
    k1 = torch.randn(1, 1, 128, device="cuda", dtype=dt)
    o1 = flashinfer.single_prefill_with_kv_cache(q[:5, :4], k1, k1, backend="fa3_ws")
    assert_close(o1, attention(q[:5, :4], k1, k1)[0])
    z, zl = flashinfer.single_prefill_with_kv_cache(q[:3], k[:0], k[:0], return_lse=True, backend="fa3_ws")
    assert (z == 0).all() and torch.isinf(zl).all() and (zl < 0).all()
    k_src = torch.randn(4096, 8, 128, device="cuda", dtype=dt)
    kk = torch.full_like(k_src, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        kk.copy_(k_src)
        o2 = flashinfer.single_prefill_with_kv_cache(q, kk, kk, causal=True, backend="fa3_ws")
    side.synchronize()
    assert_close(o2, attention(q, k_src, k_src, causal=True)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("qo_len,kv_len,group", [(129, 129, 1), (1000, 4096, 4), (4096, 4096, 8)])
def test_single_prefill_fa3_ws_equals_fa3_causal(dtype, qo_len, kv_len, group):
    """A diagnostic with no tolerance: with a causal mask both Hopper kernels use 128-row query tiles and 128-key
    KV tiles and do the same floating-point operations in the same order (S by the same wgmma k16 steps, the same
    online softmax, the O rescale before P(n) V(n) is added, the same epilogue): only the pipeline around them
    differs, so the outputs and lse should be bitwise equal. The reference tests above are the correctness
    criterion; if they pass and this one does not, the compilers ordered some arithmetic differently."""
    _need_hopper()
    q = torch.randn(qo_len, 2 * group, 128, device="cuda", dtype=dtype)
    k = torch.randn(kv_len, 2, 128, device="cuda", dtype=dtype)
    v = torch.randn(kv_len, 2, 128, device="cuda", dtype=dtype)
    f = flashinfer.single_prefill_with_kv_cache
    o3, l3 = f(q, k, v, causal=True, backend="fa3", return_lse=True)
    ow, lw = f(q, k, v, causal=True, backend="fa3_ws", return_lse=True)
    assert torch.equal(ow, o3), (ow.float() - o3.float()).abs().max().item()
    assert torch.equal(lw, l3), (lw - l3).abs().max().item()


@pytest.mark.gpu
def test_single_prefill_fa3_ws_refusals():
    _need_hopper()
    q = torch.randn(20, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(10, 2, 128, device="cuda", dtype=torch.bfloat16)
    f = flashinfer.single_prefill_with_kv_cache
    with pytest.raises(ValueError, match="qo_len <= kv_len"):
        f(q, k, k, causal=True, backend="fa3_ws")
    with pytest.raises(ValueError, match="fa3_ws"):
        f(q, k, k, window_left=3, backend="fa3_ws")
    with pytest.raises(ValueError, match="fa3_ws takes 128 or 64"):
        q2, k2 = torch.cat([q, q], -1), torch.cat([k, k], -1)  # (head_dim 256)
        f(q2, k2, k2, backend="fa3_ws")
    with pytest.raises(ValueError, match="fp8 K/V at head_dim 64"):
        k8 = k[..., :64].to(torch.float8_e4m3fn)
        f(q[..., :64].contiguous(), k8, k8, backend="fa3_ws")
    with pytest.raises(ValueError, match="zero stride"):
        kz = k[:1].expand(10, 2, 128)
        f(q, kz, kz, backend="fa3_ws")
    with pytest.raises(ValueError, match="zero stride"):
        kz8 = k[:1].to(torch.float8_e4m3fn).expand(10, 2, 128)
        f(q, kz8, kz8, backend="fa3_ws")


@pytest.mark.gpu
def test_single_prefill_auto_takes_fa3_for_long_queries_on_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fa3 backend needs a Hopper (sm_90) GPU")
    from flashinfer import jit

    _run_single(2048, 2048, 8, 4, 128, torch.bfloat16, mask_mode="causal")
    assert any(
        getattr(s, "backend", None) == "fa3" and s.family == "prefill_single" and s.mask_mode == "causal"
        for s in jit.loaded_modules()
    )


@pytest.mark.gpu
@pytest.mark.parametrize("window_left", [0, 1, 63, 64, 700, 10**6])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
def test_single_prefill_window_edges(window_left, mask_mode):
    _run_single(300, 2000, 4, 2, 64, torch.float16, mask_mode=mask_mode, window_left=window_left)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_single_prefill_split_kv_long(head_dim):
    # Few query tiles, long KV: the KV range is split into chunks and merged.
    _run_single(16, 33001, 1, 8, head_dim, torch.bfloat16, mask_mode="causal")
    _run_single(3, 20000, 2, 1, head_dim, torch.float16, pos="ALIBI", sm_scale=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_prefill_strided_views(layout):
    d = 128
    q_big = torch.randn(200, 8, 3 * d, device="cuda", dtype=torch.float16)
    q = q_big[:, :, d : 2 * d]
    k_big = torch.randn(900, 2, 2 * d, device="cuda", dtype=torch.float16)
    v_big = torch.randn(900, 2, 2 * d, device="cuda", dtype=torch.float16)
    k_nhd, v_nhd = k_big[:, :, :d], v_big[:, :, d:]
    k, v = (k_nhd, v_nhd) if layout == "NHD" else (k_nhd.transpose(0, 1), v_nhd.transpose(0, 1))
    assert not q.is_contiguous() and not k.is_contiguous()
    o = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout=layout)
    ref, _ = attention(q, k_nhd, v_nhd, causal=True)
    assert_close(o, ref)


@pytest.mark.gpu
def test_single_prefill_packed_mask_and_return_lse_alias():
    q = torch.randn(77, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(77, 300, device="cuda") < 0.5
    mask[5] = False  # a row with nothing allowed: zeros, lse -inf
    packed = flashinfer.packbits(mask.flatten(), bitorder="little")
    o1, l1 = flashinfer.single_prefill_with_kv_cache_return_lse(q, k, v, packed_custom_mask=packed)
    o2 = flashinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=mask, causal=True)  # the mask wins
    ref, ref_lse = attention(q, k, v, mask=mask)
    assert_close(o1, ref)
    assert torch.equal(o1, o2)
    assert (o1[5] == 0).all() and torch.isinf(l1[5]).all()
    _check_lse(l1, ref_lse)


@pytest.mark.gpu
def test_single_prefill_runs_on_current_stream_and_empty_inputs():
    q = torch.randn(512, 8, 128, device="cuda", dtype=torch.bfloat16)
    k_src = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.full_like(k_src, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        k.copy_(k_src)
        o = flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True)
    side.synchronize()
    ref, _ = attention(q, k_src, k_src, causal=True)
    assert_close(o, ref)
    # empty query: empty output; empty kv: zeros and lse -inf
    e = flashinfer.single_prefill_with_kv_cache(q[:0], k_src, k_src)
    assert e.shape == (0, 8, 128)
    z, zl = flashinfer.single_prefill_with_kv_cache(q[:3], k_src[:0], k_src[:0], return_lse=True)
    assert (z == 0).all() and torch.isinf(zl).all() and (zl < 0).all()


@pytest.mark.gpu
def test_single_prefill_torch_compile():
    q = torch.randn(100, 16, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(300, 4, 128, device="cuda", dtype=torch.bfloat16)

    def f(q, k):
        o, lse = flashinfer.single_prefill_with_kv_cache(q, k, k, causal=True, return_lse=True)
        return o * 2, lse

    o, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k)
    ref, ref_lse = attention(q, k, k, causal=True)
    assert_close(o, 2 * ref)
    _check_lse(lse, ref_lse)


def _single_bad_cases():
    c, bf = "cuda", torch.bfloat16
    t = lambda *s, dt=bf, dev=c: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    q, k = t(8, 4, 128), t(10, 2, 128)
    yield "cpu", (t(8, 4, 128, dev="cpu"), k, k), {}, ValueError, "CUDA"
    yield "dtypes", (t(8, 4, 128, dt=torch.float16), k, k), {}, TypeError, "dtype"
    yield "fp32", (t(8, 4, 128, dt=torch.float32),) * 3, {}, TypeError, "float16"
    yield "head_dim", (t(8, 4, 96), t(10, 2, 96), t(10, 2, 96)), {}, ValueError, "head_dim 96"
    yield "groups", (t(8, 3, 128), k, k), {}, ValueError, "multiple"
    yield "causal qo>kv", (t(11, 4, 128), k, k), {"causal": True}, ValueError, "qo_len <= kv_len"
    yield (
        "mask shape",
        (q, k, k),
        {"custom_mask": torch.ones(8, 11, dtype=torch.bool, device=c)},
        ValueError,
        "custom_mask",
    )
    yield "mask dtype", (q, k, k), {"custom_mask": torch.ones(8, 10, dtype=torch.int32, device=c)}, TypeError, "bool"
    yield (
        "packed len",
        (q, k, k),
        {"packed_custom_mask": torch.zeros(9, dtype=torch.uint8, device=c)},
        ValueError,
        "bytes",
    )
    yield (
        "packed dtype",
        (q, k, k),
        {"packed_custom_mask": torch.zeros(10, dtype=torch.int8, device=c)},
        TypeError,
        "uint8",
    )
    yield "fp16qk bf16", (q, k, k), {"use_fp16_qk_reduction": True}, ValueError, "float16"
    yield "backend", (q, k, k), {"backend": "cudnn"}, NotImplementedError, "cudnn"
    yield "fa3 scope", (q, k, k), {"backend": "fa3", "window_left": 3}, ValueError, "fa3"
    yield "backend name", (q, k, k), {"backend": "nope"}, ValueError, "backend"
    yield "window", (q, k, k), {"window_left": -3}, ValueError, "window_left"
    yield "layout", (q, k, k), {"kv_layout": "NDH"}, ValueError, "kv_layout"
    yield "pos", (q, k, k), {"pos_encoding_mode": "ROPE"}, ValueError, "pos_encoding_mode"
    yield "out", (q, k, k), {"out": t(8, 4, 64)}, ValueError, "out must be"
    yield "k/v", (q, k, t(11, 2, 128)), {}, ValueError, "same shape"
    if torch.cuda.device_count() > 1:
        yield "devices", (q, t(10, 2, 128, dev="cuda:1"), k), {}, ValueError, "one device"


@pytest.mark.gpu
def test_single_prefill_bad_input():
    for what, args, kw, exc, match in _single_bad_cases():
        with pytest.raises(exc, match=match):
            flashinfer.single_prefill_with_kv_cache(*args, **kw)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- GPU: batch


def _make_batch(qo_lens, kv_lens, hkv, group, d, dtype):
    qs = [torch.randn(q, hkv * group, d, device="cuda", dtype=dtype) for q in qo_lens]
    ks = [torch.randn(kv, hkv, d, device="cuda", dtype=dtype) for kv in kv_lens]
    vs = [torch.randn(kv, hkv, d, device="cuda", dtype=dtype) for kv in kv_lens]
    return qs, ks, vs


def _paged(ks, vs, page_size, layout, tuple_cache=False, nan_fill=False):
    """A scattered paged cache holding (ks, vs): (cache, page ids, indptr, last page lengths). With nan_fill, every
    slot no request owns (past a last page's tokens, unused pages) holds NaN."""
    pages = [-(-k.shape[0] // page_size) for k in ks]
    total = sum(pages)
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    perm = torch.randperm(total + 3, dtype=torch.int32)[:total]  # scattered, some pages unused
    shape, dt = (total + 3, 2, page_size, hkv, d), ks[0].dtype
    if dt == torch.uint8:  # (fp8 caches as bytes: _fp8_paged)
        cache = torch.randint(0, 256, shape, device="cuda", dtype=dt)
    elif nan_fill:
        cache = torch.full(shape, float("nan"), device="cuda", dtype=dt)
    else:
        cache = torch.randn(shape, device="cuda", dtype=dt)
    pos = 0
    for k, v, n in zip(ks, vs, pages):
        for j in range(n):
            rows = slice(j * page_size, min((j + 1) * page_size, k.shape[0]))
            cnt = rows.stop - rows.start
            cache[perm[pos + j], 0, :cnt] = k[rows]
            cache[perm[pos + j], 1, :cnt] = v[rows]
        pos += n
    indptr = torch.tensor([0] + list(itertools.accumulate(pages)), dtype=torch.int32)
    last = torch.tensor([(k.shape[0] - 1) % page_size + 1 if k.shape[0] else 0 for k in ks], dtype=torch.int32)
    if layout == "HND":
        cache = cache.transpose(2, 3).contiguous()
    if tuple_cache:
        cache = (cache[:, 0], cache[:, 1])
    return cache, perm, indptr, last


def _batch_ref(qs, ks, vs, masks, mask_mode, **kw):
    outs, lses = [], []
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        o, l = attention(q, k, v, causal=mask_mode == "causal", mask=masks[i] if masks else None, **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


BATCH_CASES = [
    # qo_lens, kv_lens (None: qo + 500), group
    ([17, 0, 128, 1, 1000], [17, 600, 628, 4096, 1000], 1),
    ([1, 17, 128, 1000], [4096, 517, 128, 1500], 4),
    ([128, 0, 5], [0, 0, 300], 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("storage,page_size", [("ragged", 0), ("paged", 1), ("paged", 16)])
@pytest.mark.parametrize("case", range(len(BATCH_CASES)))
@pytest.mark.parametrize("mask_mode", ["none", "causal", "custom"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_batch_prefill_matrix(storage, page_size, case, mask_mode, layout):
    qo_lens, kv_lens, group = BATCH_CASES[case]  # (causal with qo_len > kv_len: leading rows see no key)
    dtype = torch.bfloat16 if (case + len(layout)) % 2 else torch.float16
    hkv, d = 2, (64, 128, 256)[case]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, hkv, group, d, dtype)
    masks = [torch.rand(q, k, device="cuda") < 0.6 for q, k in zip(qo_lens, kv_lens)] if mask_mode == "custom" else None
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    kw = dict(
        custom_mask=torch.cat([m.flatten() for m in masks]) if masks else None,
        causal=mask_mode == "causal",
        q_data_type=dtype,
    )
    q = torch.cat(qs)
    if storage == "ragged":
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, layout)
        kv_indptr = torch.tensor([0] + list(itertools.accumulate(kv_lens)), dtype=torch.int32)
        w.plan(qo_indptr, kv_indptr, hkv * group, hkv, d, **kw)
        k, v = torch.cat(ks), torch.cat(vs)
        if layout == "HND":
            k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        args = (k, v)
    else:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, layout)
        cache, perm, indptr, last = _paged(ks, vs, page_size, layout, tuple_cache=case == 1)
        w.plan(qo_indptr, indptr, perm, last, hkv * group, hkv, d, page_size, **kw)
        args = (cache,)
    out = poisoned(q.shape, dtype)
    lse = poisoned(q.shape[:2], torch.float32)
    o, l = w.run(q, *args, out=out, lse=lse, return_lse=True)
    assert o is out and l is lse
    ref_o, ref_lse = _batch_ref(qs, ks, vs, masks, mask_mode)
    assert_close(o, ref_o)
    _check_lse(l, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("pos", ["NONE", "ROPE_LLAMA", "ALIBI"])
def test_batch_prefill_options_and_split_kv(pos):
    # Few query rows against long KV: the planner splits KV into chunks and merges them.
    qo_lens, kv_lens = [3, 16, 1], [9000, 20000, 5000]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, 4, 128, torch.bfloat16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    cache, perm, indptr, last = _paged(ks, vs, 16, "NHD")
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    w.plan(
        qo_indptr,
        indptr,
        perm,
        last,
        8,
        2,
        128,
        16,
        causal=True,
        pos_encoding_mode=pos,
        window_left=4000,
        logits_soft_cap=30.0,
        q_data_type="bfloat16",
    )
    o, l = w.run(torch.cat(qs), cache, return_lse=True)
    ref_o, ref_lse = _batch_ref(
        qs, ks, vs, None, "causal", pos_encoding_mode=pos, window_left=4000, logits_soft_cap=30.0
    )
    assert_close(o, ref_o)
    _check_lse(l, ref_lse, rope_dtype=torch.bfloat16 if pos == "ROPE_LLAMA" else None)


@pytest.mark.gpu
def test_batch_prefill_cuda_graph_replays_new_plans():
    hkv, group, d, ps = 2, 4, 128, 16
    max_pages = 2000
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    bufs = dict(
        qo_indptr_buf=torch.empty(5, dtype=torch.int32, device="cuda"),
        paged_kv_indptr_buf=torch.empty(5, dtype=torch.int32, device="cuda"),
        paged_kv_indices_buf=torch.empty(max_pages, dtype=torch.int32, device="cuda"),
        paged_kv_last_page_len_buf=torch.empty(4, dtype=torch.int32, device="cuda"),
    )
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, **bufs)
    total_q = 400
    q_buf = torch.empty(total_q, hkv * group, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q_buf)

    def setup(qo_lens, kv_lens):
        qs, ks, vs = _make_batch(qo_lens, kv_lens, hkv, group, d, torch.bfloat16)
        cache, perm, indptr, last = _paged(ks, vs, ps, "NHD")
        qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
        w.plan(qo_indptr, indptr, perm, last, hkv * group, hkv, d, ps, causal=True, q_data_type=torch.bfloat16)
        q_buf.copy_(torch.cat(qs))
        return qs, ks, vs, cache

    lens1 = ([100, 100, 100, 100], [100, 900, 3000, 400])
    qs, ks, vs, cache = setup(*lens1)
    cache_buf = torch.zeros(1000, *cache.shape[1:], device="cuda", dtype=cache.dtype)
    cache_buf[: cache.shape[0]].copy_(cache)
    w.run(q_buf, cache_buf, out=out)  # warm-up outside capture (builds and loads the module)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q_buf, cache_buf, out=out)
    for qo_lens, kv_lens in (lens1, ([10, 300, 40, 50], [5000, 300, 8000, 60]), ([100, 100, 100, 100], [100] * 4)):
        qs, ks, vs, cache = setup(qo_lens, kv_lens)
        cache_buf[: cache.shape[0]].copy_(cache)
        out.fill_(float("nan"))
        g.replay()
        ref, _ = _batch_ref(qs, ks, vs, None, "causal")
        assert_close(out, ref)
    # A wrapper not built for graphs refuses to be captured.
    w2 = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws)
    ind = torch.tensor([0, 10], dtype=torch.int32)
    w2.plan(ind, ind, 8, 2, 128, q_data_type=torch.bfloat16)
    qq = torch.randn(10, 8, 128, device="cuda", dtype=torch.bfloat16)
    kk = torch.randn(10, 2, 128, device="cuda", dtype=torch.bfloat16)
    w2.run(qq, kk, kk)
    with pytest.raises(RuntimeError, match="CUDA graphs"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            w2.run(qq, kk, kk)


@pytest.mark.gpu
def test_batch_prefill_bad_input():
    ws = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws)
    i2 = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="lengths must match"):
        w.plan(i2, torch.tensor([0, 9], dtype=torch.int32), 8, 2, 128)
    with pytest.raises(ValueError, match="custom_mask"):
        w.plan(i2, i2, 8, 2, 128, custom_mask=torch.ones(40, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        w.plan(i2, i2, 8, 2, 128, custom_mask=torch.ones(41, dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim"):
        w.plan(i2, i2, 8, 2, 96)
    with pytest.raises(RuntimeError, match="plan"):
        flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws).run(*(torch.zeros(9, 8, 128, device="cuda"),) * 3)
    w.plan(i2, i2, 8, 2, 128, q_data_type=torch.bfloat16)
    q = torch.randn(9, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(9, 2, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q must have shape"):
        w.run(q[:8], k, k)
    with pytest.raises(TypeError, match="dtypes"):
        w.run(q.half(), k.half(), k.half())
    pw = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws)
    with pytest.raises(ValueError, match="last_page_len"):
        pw.plan(
            i2,
            torch.tensor([0, 1, 2], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([5], dtype=torch.int32),
            8,
            2,
            128,
            16,
        )
    torch.cuda.synchronize()


def _plan_batch(storage, ws, layout, qs, ks, vs, page_size=16, backend="auto", nan_fill=False, tuple_cache=False, **kw):
    """A planned wrapper of either storage for requests (qs, ks, vs), and the KV arguments of its run() (paged:
    nan_fill and tuple_cache as _paged's)."""
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(q.shape[0] for q in qs)), dtype=torch.int32)
    if storage == "ragged":
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, layout, backend=backend)
        kv_indptr = torch.tensor([0] + list(itertools.accumulate(k.shape[0] for k in ks)), dtype=torch.int32)
        w.plan(qo_indptr, kv_indptr, qs[0].shape[1], hkv, d, **kw)
        k, v = _nhd_to(layout, torch.cat(ks)), _nhd_to(layout, torch.cat(vs))
        return w, (k, v)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, layout, backend=backend)
    cache, perm, indptr, last = _paged(ks, vs, page_size, layout, tuple_cache=tuple_cache, nan_fill=nan_fill)
    w.plan(qo_indptr, indptr, perm, last, qs[0].shape[1], hkv, d, page_size, **kw)
    return w, (cache,)


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["ragged", "paged"])
@pytest.mark.parametrize("group", [1, 4])
def test_batch_prefill_causal_with_more_queries_than_keys(storage, group):
    """FlashInfer's causal mask with qo_len > kv_len: query row i sees keys j <= i + kv_len - qo_len; the first
    qo_len - kv_len rows see none (output 0, lse -inf). Long and short requests, a split long KV, no KV at all."""
    qo_lens, kv_lens = [300, 5, 1, 200, 64], [100, 1, 0, 9000, 0]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, group, 128, torch.bfloat16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w, kv = _plan_batch(storage, ws, "NHD", qs, ks, vs, causal=True, q_data_type=torch.bfloat16)
    q = torch.cat(qs)
    out, lse = poisoned(q.shape, q.dtype), poisoned(q.shape[:2], torch.float32)
    w.run(q, *kv, out=out, lse=lse, return_lse=True)
    ref_o, ref_lse = _batch_ref(qs, ks, vs, None, "causal")
    assert_close(out, ref_o)
    _check_lse(lse, ref_lse)
    assert torch.equal(out[:200], torch.zeros_like(out[:200])) and torch.isneginf(lse[:200]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["ragged", "paged"])
def test_batch_prefill_forward_applies_causal_and_options_without_a_new_plan(storage):
    """FlashInfer's legacy call sequence: begin_forward() without causal, then forward(causal=True, sm_scale=...,
    window_left=..., logits_soft_cap=...). The options apply to that call (another kernel variant where needed)
    and later run() calls, without a new plan; causal used to be dropped silently."""
    qo_lens, kv_lens = [17, 300, 1], [500, 300, 4000]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, 4, 128, torch.float16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w, kv = _plan_batch(storage, ws, "NHD", qs, ks, vs, q_data_type=torch.float16)
    plan = w._plan_info
    q = torch.cat(qs)
    cases = [
        dict(causal=True),
        dict(causal=True, sm_scale=0.05, logits_soft_cap=20.0),
        dict(causal=False, window_left=100),
        dict(causal=True, pos_encoding_mode="ALIBI"),
        dict(causal=True, use_fp16_qk_reduction=True),
        dict(),
    ]
    for kw in cases:
        o, l = w.forward_return_lse(q, *kv, **kw)
        assert w._plan_info is plan, "forward() planned again"
        ref_kw = {n: kw[n] for n in ("sm_scale", "window_left", "pos_encoding_mode") if n in kw}
        ref_o, ref_lse = _batch_ref(
            qs,
            ks,
            vs,
            None,
            "causal" if kw.get("causal") else "none",
            logits_soft_cap=kw.get("logits_soft_cap", 0.0),
            **ref_kw,
        )
        if kw.get("use_fp16_qk_reduction"):
            torch.testing.assert_close(o.double(), ref_o, atol=2e-2, rtol=2e-2)
        else:
            assert_close(o, ref_o, what=str(kw))
            _check_lse(l, ref_lse, what=str(kw))
        assert w._causal is bool(kw.get("causal")) and w.run(q, *kv).shape == q.shape
    assert w._sm_scale is None and w._logits_soft_cap is None and w._window_left == -1


@pytest.mark.gpu
def test_batch_prefill_ragged_auto_takes_fa3_ws_and_falls_back_to_fa2():
    """backend="auto" on a ragged batch whose query tiles fill a Hopper GPU plans fa3_ws; K/V views TMA cannot read
    (a zero head stride) and an option set by forward() outside fa3_ws's scope (a window) run the same plan on fa2.
    Each against the float64 reference, outputs NaN-poisoned."""
    _need_hopper()
    dt = torch.float16
    qs, ks, vs = _make_batch([1000, 1000, 1000], [1500, 1000, 2000], 2, 4, 128, dt)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w, (k, v) = _plan_batch("ragged", ws, "NHD", qs, ks, vs, causal=True, q_data_type=dt)
    assert w._plan_info.spec.backend == "fa3_ws" and w.plan_stats["merges"] == 0
    q = torch.cat(qs)
    out = poisoned(q.shape, dt)
    w.run(q, k, v, out=out)
    assert_close(out, _batch_ref(qs, ks, vs, None, "causal")[0])
    # one K/V head broadcast to both (head stride 0): not a TMA tensor map, so fa2
    kz, vz = k[:, :1].expand(-1, 2, -1), v[:, :1].expand(-1, 2, -1)
    split = list(itertools.accumulate([1500, 1000, 2000]))
    ksz, vsz = (list(torch.tensor_split(x.contiguous(), split[:-1])) for x in (kz, vz))
    out = poisoned(q.shape, dt)
    w.run(q, kz, vz, out=out)
    assert_close(out, _batch_ref(qs, ksz, vsz, None, "causal")[0])
    o, lse = w.forward_return_lse(q, k, v, causal=False, window_left=100)
    ref_o, ref_lse = _batch_ref(qs, ks, vs, None, "none", window_left=100)
    assert_close(o, ref_o)
    _check_lse(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 8, 5])
def test_batch_prefill_paged_auto_takes_fa3_ws_for_tma_pages(page_size):
    """backend="auto" on a paged batch whose query tiles fill a Hopper GPU plans fa3_ws for pages it copies as TMA
    boxes (16, 8; fa2 for pages of 5), every slot no request owns holding NaN (1500 and 1000 keys: a partial and a
    full last page); against the float64 reference, outputs NaN-poisoned."""
    _need_hopper()
    dt = torch.bfloat16
    qs, ks, vs = _make_batch([1000, 1000, 1000], [1500, 1000, 2000], 2, 4, 128, dt)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w, kv = _plan_batch("paged", ws, "NHD", qs, ks, vs, page_size=page_size, nan_fill=True, causal=True, q_data_type=dt)
    assert w._plan_info.spec.backend == ("fa3_ws" if page_size % 8 == 0 else "fa2")
    q = torch.cat(qs)
    out = poisoned(q.shape, dt)
    w.run(q, *kv, out=out)
    assert_close(out, _batch_ref(qs, ks, vs, None, "causal")[0])


@pytest.mark.gpu
def test_batch_prefill_graph_mode_custom_mask_buffers_stay_across_replans():
    """Graph mode with a custom mask: plan() writes each batch's mask into the caller's custom_mask_buf and
    mask_indptr_buf (never a new allocation a replay would miss); a graph captured once replays new plans."""
    hkv, group, d, ps, batch = 2, 4, 128, 16, 3
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    i32 = dict(dtype=torch.int32, device="cuda")
    bufs = dict(
        qo_indptr_buf=torch.empty(batch + 1, **i32),
        paged_kv_indptr_buf=torch.empty(batch + 1, **i32),
        paged_kv_indices_buf=torch.empty(400, **i32),
        paged_kv_last_page_len_buf=torch.empty(batch, **i32),
        custom_mask_buf=torch.empty(1 << 20, dtype=torch.uint8, device="cuda"),
        mask_indptr_buf=torch.empty(batch + 1, **i32),
    )
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, **bufs)
    q_buf = torch.empty(64, hkv * group, d, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q_buf)
    cache_buf = torch.zeros(400, 2, ps, hkv, d, device="cuda", dtype=torch.float16)

    def setup(qo_lens, kv_lens):
        qs, ks, vs = _make_batch(qo_lens, kv_lens, hkv, group, d, torch.float16)
        masks = [torch.rand(a, b, device="cuda") < 0.6 for a, b in zip(qo_lens, kv_lens)]
        cache, perm, indptr, last = _paged(ks, vs, ps, "NHD")
        cache_buf[: cache.shape[0]].copy_(cache)
        qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
        w.plan(
            qo_indptr,
            indptr,
            perm,
            last,
            hkv * group,
            hkv,
            d,
            ps,
            q_data_type=torch.float16,
            custom_mask=torch.cat([m.flatten() for m in masks]),
        )
        q_buf.copy_(torch.cat(qs))
        return qs, ks, vs, masks

    lens = [([20, 30, 14], [100, 2000, 14]), ([64, 0, 0], [900, 5, 0]), ([1, 1, 62], [3000, 1, 70])]
    setup(*lens[0])
    w.run(q_buf, cache_buf, out=out)  # warm-up outside capture
    schedule = w._plan_info.schedule
    assert schedule.mask.data_ptr() == bufs["custom_mask_buf"].data_ptr()
    assert schedule.mask_indptr.data_ptr() == bufs["mask_indptr_buf"].data_ptr()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q_buf, cache_buf, out=out)
    for qo_lens, kv_lens in lens:
        qs, ks, vs, masks = setup(qo_lens, kv_lens)
        s = w._plan_info.schedule
        assert (s.mask.data_ptr(), s.mask_indptr.data_ptr(), s.buffer.data_ptr()) == (
            schedule.mask.data_ptr(),
            schedule.mask_indptr.data_ptr(),
            schedule.buffer.data_ptr(),
        )
        out.fill_(float("nan"))
        g.replay()
        ref, _ = _batch_ref(qs, ks, vs, masks, "custom")
        assert_close(out, ref, what=str(qo_lens))


@pytest.mark.gpu
@pytest.mark.parametrize("storage", ["ragged", "paged"])
def test_batch_prefill_split_control_pdl_scales_and_lse(storage):
    """fixed_split_size cuts every request at the same keys (its result independent of the batch, bitwise);
    disable_split_kv never cuts; enable_pdl on or off computes the same; q/k/v scales; lse given without
    return_lse is written."""
    qo_lens, kv_lens = [3, 40], [9000, 600]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, 4, 128, torch.bfloat16)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    q = torch.cat(qs)
    ref_o, ref_lse = _batch_ref(qs, ks, vs, None, "none")
    for kw in (dict(fixed_split_size=64), dict(disable_split_kv=True)):
        w, kv = _plan_batch(storage, ws, "NHD", qs, ks, vs, q_data_type=torch.bfloat16, **kw)
        o_all = w.run(q, *kv)
        assert_close(o_all, ref_o, what=str(kw))
        if kw.get("disable_split_kv"):
            assert w.plan_stats["merges"] == 0
        w1, kv1 = _plan_batch(storage, ws, "NHD", qs[:1], ks[:1], vs[:1], q_data_type=torch.bfloat16, **kw)
        assert torch.equal(w1.run(qs[0], *kv1), o_all[:3]), f"{kw}: request 0 depends on the batch"
    w, kv = _plan_batch(storage, ws, "NHD", qs, ks, vs, q_data_type=torch.bfloat16)
    lse = poisoned(q.shape[:2], torch.float32)
    o_pdl = w.run(q, *kv, enable_pdl=True)
    o = w.run(q, *kv, enable_pdl=False, lse=lse)
    assert torch.equal(o, o_pdl)
    _check_lse(lse, ref_lse)
    o_s = w.run(q, *kv, q_scale=2.0, k_scale=0.5, v_scale=3.0)
    assert_close(o_s, 3.0 * ref_o)


# The warp-specialised Hopper kernel on ragged batches (BatchPrefillWithRaggedKVCacheWrapper(backend="fa3_ws")):
# requests around its 128-row query tiles and 128-key KV tiles (1, 127, 128, 129, 1000), as many keys as queries
# and more; a mixed batch with requests without queries (with and without keys), without keys, with more queries
# than keys (causal: the first qo_len - kv_len rows see no key) and KV tiles that run into the next request.
_WS_BATCH_CASES = {
    "tiles": ([1, 127, 128, 129, 1000], [1, 127, 128, 129, 1000]),
    "longer_kv": ([1, 127, 128, 129, 1000], [129, 128, 1000, 4096, 1127]),
    "mixed": ([0, 1, 17, 129, 0, 1000, 300, 5], [5, 1, 0, 129, 0, 1000, 100, 700]),
}


def _ws_and_fa2(qs, ks, vs, layout, mask_mode, ws, storage="ragged", page_size=16, split=None, **run_kw):
    """(o, lse) of the fa3_ws and the fa2 wrappers of a storage on the same batch (NaN-poisoned outputs; paged: every
    slot no request owns holds NaN). split: None plans as the planner likes (it splits long requests' keys when the
    query tiles do not fill the GPU), "off" with disable_split_kv, n > 0 fixed_split_size=n (pages, when paged); the
    fa3_ws plan's merges are checked to be there (n) or not ("off")."""
    plan_kw = {"off": dict(disable_split_kv=True), None: {}}.get(split, dict(fixed_split_size=split))
    q = torch.cat(qs)
    res = []
    for backend in ("fa3_ws", "fa2"):
        torch.manual_seed(7)  # (the same page permutation for both)
        w, kv = _plan_batch(
            storage,
            ws,
            layout,
            qs,
            ks,
            vs,
            page_size=page_size,
            backend=backend,
            nan_fill=storage == "paged",
            causal=mask_mode == "causal",
            q_data_type=q.dtype,
            **plan_kw,
        )
        if backend == "fa3_ws" and split == "off":
            assert w.plan_stats["merges"] == 0
        if backend == "fa3_ws" and isinstance(split, int):
            assert w.plan_stats["merges"] > 0
        out, lse = poisoned(q.shape, q.dtype), poisoned(q.shape[:2], torch.float32)
        o, l = w.run(q, *kv, out=out, lse=lse, return_lse=True, **run_kw)
        assert o is out and l is lse
        res.append((o, l))
    return res


def _check_ws_batch(qs, ks, vs, mask_mode, results, case=None, fa2_tol=None):
    """fa3_ws's (o, lse) against the float64 reference and against fa2's (``results``: _ws_and_fa2's) within
    bfloat16's tolerance (or fa2_tol); the mixed case's rows that see no key: O = 0 and lse -inf."""
    (o, l), (o2, l2) = results
    ref_o, ref_lse = _batch_ref(qs, ks, vs, None, mask_mode)
    assert_close(o, ref_o)
    _check_lse(l, ref_lse)
    atol, rtol = fa2_tol or TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(o.double(), o2.double(), atol=atol, rtol=rtol)
    if fa2_tol is None:
        torch.testing.assert_close(l, l2, atol=LSE_TOL[0], rtol=LSE_TOL[1])
    if case == "mixed":  # no keys (request 2, rows 1..17), or causal rows before the first key (request 6)
        empty = [slice(1, 18)] + ([slice(1147, 1347)] if mask_mode == "causal" else [])
        for rows in empty:
            assert (o[rows] == 0).all() and torch.isneginf(l[rows]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64], ids=["d128", "d64"])
@pytest.mark.parametrize("split", [None, "off", 300], ids=["split_auto", "split_off", "split_300"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("case", list(_WS_BATCH_CASES))
def test_batch_prefill_fa3_ws_ragged(case, group, mask_mode, layout, dtype, split, head_dim):
    """Against the float64 reference (outputs NaN-poisoned, lse requested), and against the fa2 ragged path within
    bfloat16's tolerance; keys split as the planner likes (these small batches: into chunks, partial states
    merged), not split, and in fixed chunks of 300 keys (chunks ending mid-tile; under causal, chunks that some of
    an item's rows, or all of them, cannot see)."""
    _need_hopper()
    qo_lens, kv_lens = _WS_BATCH_CASES[case]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, group, head_dim, dtype)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    _check_ws_batch(qs, ks, vs, mask_mode, _ws_and_fa2(qs, ks, vs, layout, mask_mode, ws, split=split), case)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("split", [None, "off", 5], ids=["split_auto", "split_off", "split_5pages"])
@pytest.mark.parametrize("page_size", [1, 5, 8, 16, 64, 128, 256])
@pytest.mark.parametrize("case", list(_WS_BATCH_CASES))
def test_batch_prefill_fa3_ws_paged(case, page_size, group, mask_mode, layout, split):
    """The paged kernel: pages gathered row by row by its producer (1 token, a size that divides nothing: 5) and
    pages as TMA boxes (8, 16, 64: several a tile; 128: one; 256: a tile of half a page), every slot no request
    owns holding NaN (a partial last page's slots must be zero-filled, not read: the tile that holds them is
    gathered); requests whose last page is full (128 keys) and partial; keys split as the planner likes, not split,
    and in fixed chunks of 5 pages (pages of 8-128: chunks that start mid-tile on a box boundary); against the float64
    reference and the fa2 paged path."""
    _need_hopper()
    if split == 5 and not 8 <= page_size <= 128:
        pytest.skip("fixed chunks of 5 pages are tried with page boxes of pages of 8-128 (256: no request splits)")
    qo_lens, kv_lens = _WS_BATCH_CASES[case]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, group, 128, torch.bfloat16)
    ws = torch.empty((256 if split == 5 else 64) << 20, dtype=torch.uint8, device="cuda")  # (5-page chunks: ~190 MB)
    res = _ws_and_fa2(qs, ks, vs, layout, mask_mode, ws, storage="paged", page_size=page_size, split=split)
    _check_ws_batch(qs, ks, vs, mask_mode, res, case)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize("page_size", [1, 5, 16, 64, 256])
@pytest.mark.parametrize("case", list(_WS_BATCH_CASES))
def test_batch_prefill_fa3_ws_paged_d64(case, page_size, mask_mode, layout):
    """The paged kernel at head_dim 64 (one 64-column box a tile; the row gather 8 chunks a row, 4 rows a warp
    pass): gathered pages (1, 5) and TMA boxes (16, 64, 256), NaN in every slot no request owns, GQA 4, keys split
    as the planner likes."""
    _need_hopper()
    qo_lens, kv_lens = _WS_BATCH_CASES[case]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, 4, 64, torch.float16)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    res = _ws_and_fa2(qs, ks, vs, layout, mask_mode, ws, storage="paged", page_size=page_size)
    _check_ws_batch(qs, ks, vs, mask_mode, res, case)


@pytest.mark.gpu
@pytest.mark.parametrize("max_ctas", [1, 3, 100])
@pytest.mark.parametrize("storage", ["ragged", "paged"])
def test_batch_prefill_fa3_ws_bounded_grid(storage, max_ctas, monkeypatch):
    """A persistent grid of fewer CTAs than SMs (_max_ctas: the cascade's shared level leaves SMs to the decode
    level beside it): each CTA takes many items in turn (phases and ring positions carried across them), keys split
    as planned for that many CTAs; against the float64 reference and fa2."""
    _need_hopper()
    monkeypatch.setattr(flashinfer.prefill._BatchPrefillBase, "_max_ctas", max_ctas)
    qo_lens, kv_lens = _WS_BATCH_CASES["mixed"]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 2, 4, 128, torch.bfloat16)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    res = _ws_and_fa2(qs, ks, vs, "NHD", "causal", ws, storage=storage)
    _check_ws_batch(qs, ks, vs, "causal", res, "mixed")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "storage,dtype", [("ragged", torch.bfloat16), ("paged", torch.float16)], ids=["ragged", "paged"]
)
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(32, 32), (32, 8)])
def test_batch_prefill_fa3_ws_benchmark_shape(num_qo_heads, num_kv_heads, storage, dtype):
    """The benchmark's batch (16 requests x 1024, causal; ragged in bfloat16, paged with pages of 16 in float16):
    2048-4096 work items, ~16-31 per CTA of the persistent grid (the barriers' phases and the ring position carry
    over from item to item and request to request)."""
    _need_hopper()
    n = 16
    qs, ks, vs = _make_batch([1024] * n, [1024] * n, num_kv_heads, num_qo_heads // num_kv_heads, 128, dtype)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    res = _ws_and_fa2(qs, ks, vs, "NHD", "causal", ws, storage=storage)
    _check_ws_batch(qs, ks, vs, "causal", res, fa2_tol=(1e-2, 1e-2))


def _ws_edge_batch(dt):
    """The fa3_ws option tests' batch: 300, 1 and 129 queries on 700, 1 and 2000 keys, 4 KV heads of 2 query heads:
    (qo_lens, kv_lens, (qs, ks, vs), causal float64 reference (o, lse), q, a workspace)."""
    qo_lens, kv_lens = [300, 1, 129], [700, 1, 2000]
    qs, ks, vs = _make_batch(qo_lens, kv_lens, 4, 2, 128, dt)
    ref = _batch_ref(qs, ks, vs, None, "causal")
    return qo_lens, kv_lens, (qs, ks, vs), ref, torch.cat(qs), torch.empty(64 << 20, dtype=torch.uint8, device="cuda")


@pytest.mark.gpu
def test_batch_prefill_fa3_ws_paged_tuple_cache_scales_pdl_and_refusals():
    """A (k_cache, v_cache) tuple of HND views, q/k/v scales, enable_pdl; fp8 caches, a custom mask and graph mode
    refused with the reason."""
    _need_hopper()
    dt = torch.bfloat16
    qo_lens, kv_lens, (qs, ks, vs), (ref_o, _), q, ws = _ws_edge_batch(dt)
    plan = functools.partial(_plan_batch, "paged", ws, "HND", qs, ks, vs, backend="fa3_ws", q_data_type=dt)
    w, (cache,) = plan(tuple_cache=True, nan_fill=True, causal=True)
    assert isinstance(cache, tuple)
    o = w.run(q, cache)
    assert_close(o, ref_o)
    assert torch.equal(w.run(q, cache, enable_pdl=True), o)
    assert_close(w.run(q, cache, q_scale=2.0, k_scale=0.5, v_scale=3.0), 3.0 * ref_o)
    with pytest.raises(ValueError, match="fa3_ws"):
        plan(kv_data_type=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fa3_ws"):
        plan(custom_mask=torch.ones(sum(a * b for a, b in zip(qo_lens, kv_lens)), dtype=torch.bool))
    with pytest.raises(ValueError, match="CUDA-graph"):
        flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, backend="fa3_ws")


@pytest.mark.gpu
def test_batch_prefill_fa3_ws_views_scales_pdl_stream_and_empty():
    """Strided K/V views (TMA takes any 16-byte multiple strides), q/k/v scales, lse without return_lse, enable_pdl,
    the launch on the current stream, a batch without keys at all (no tensor maps) and one without queries; an
    option change by forward() outside the kernel's scope is refused."""
    _need_hopper()
    dt = torch.bfloat16
    qo_lens, kv_lens, (qs, ks, vs), (ref_o, ref_lse), q, ws = _ws_edge_batch(dt)
    w, _ = _plan_batch("ragged", ws, "NHD", qs, ks, vs, backend="fa3_ws", causal=True, q_data_type=dt)
    big = torch.randn(sum(kv_lens), 4, 2, 128, device="cuda", dtype=dt)
    big[:, :, 0], big[:, :, 1] = torch.cat(ks), torch.cat(vs)
    k, v = big[:, :, 0], big[:, :, 1]  # token stride 1024 elements, head stride 256
    lse = poisoned(q.shape[:2], torch.float32)
    o = w.run(q, k, v, lse=lse)
    assert_close(o, ref_o)
    _check_lse(lse, ref_lse)
    assert torch.equal(w.run(q, k, v, enable_pdl=True), o)
    assert_close(w.run(q, k, v, q_scale=2.0, k_scale=0.5, v_scale=3.0), 3.0 * ref_o)
    # the current stream: K/V written there just before the launch
    kk, vv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)
        kk.copy_(k)
        vv.copy_(v)
        o_side = w.run(q, kk, vv)
    side.synchronize()
    assert torch.equal(o_side, o)
    with pytest.raises(ValueError, match="fa3_ws"):
        w.forward(q, k, v, causal=True, window_left=10)
    # no keys in the whole batch: zeros and lse -inf
    qs0, ks0, vs0 = _make_batch([3, 130], [0, 0], 4, 2, 128, dt)
    w0, kv0 = _plan_batch("ragged", ws, "HND", qs0, ks0, vs0, backend="fa3_ws", q_data_type=dt)
    z, zl = w0.run(torch.cat(qs0), *kv0, return_lse=True)
    assert (z == 0).all() and torch.isneginf(zl).all()
    # no queries: nothing to launch
    qs1, ks1, vs1 = _make_batch([0, 0], [5, 9], 4, 2, 128, dt)
    w1, kv1 = _plan_batch("ragged", ws, "NHD", qs1, ks1, vs1, backend="fa3_ws", q_data_type=dt)
    assert w1.run(torch.cat(qs1), *kv1).shape == (0, 8, 128)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_with_tensor_cores_matches_reference(group):
    q = torch.randn(2 * group, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(7000, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(7000, 2, 128, device="cuda", dtype=torch.bfloat16)
    o, lse = decode_with_tensor_cores(q, k, v, return_lse=True)
    ref, ref_lse = attention(q[None], k, v)
    assert_close(o, ref[0])
    _check_lse(lse, ref_lse[0])


# ------------------------------------------------------------------------------------ GPU: fp8 KV caches

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

# The fp8 single-prefill specs the GPU tests load (tests/prewarm_test.toml lists them): e4m3 with bf16 q and e5m2
# with f16 at every head_dim, no mask and causal; the crossed pairs at d128 causal; the Hopper fa3 kernel (d128);
# and at d128 a custom mask, RoPE, ALiBi with window and soft cap, and fp16 QK reduction.
FP8_SINGLE_SPECS = (
    [
        SinglePrefillSpec(d, dq, dkv, dq, m)
        for d in (64, 128, 256)
        for dq, dkv in (("bf16", "e4m3"), ("f16", "e5m2"))
        for m in ("none", "causal")
    ]
    + [SinglePrefillSpec(128, dq, dkv, dq, "causal") for dq, dkv in (("f16", "e4m3"), ("bf16", "e5m2"))]
    + [
        SinglePrefillSpec(128, dq, dkv, dq, m, backend="fa3")
        for dq, dkv in (("bf16", "e4m3"), ("f16", "e5m2"))
        for m in ("none", "causal")
    ]
    + [
        SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "custom"),
        SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal", "ROPE_LLAMA"),
        SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "none", "ALIBI", True, True),
        SinglePrefillSpec(128, "f16", "e4m3", "f16", "causal", "NONE", False, False, True),
    ]
)
# Batch prefill with fp8 KV: BATCH_CASES' head dims with these (q, kv) dtypes.
FP8_BATCH_DTYPES = {0: ("bf16", "e4m3"), 1: ("f16", "e5m2"), 2: ("bf16", "e5m2")}


def _fp8_tensor(shape, dtype, scale):
    """Random values / scale rounded to fp8 ``dtype``, as an engine quantises its cache, and the reference's
    dequantisation of those same fp8 values (``.float() * scale``), so that quantisation error is never mistaken
    for kernel error."""
    x8 = (torch.randn(shape, device="cuda") / scale).to(dtype)
    return x8, x8.float() * scale


def _fp8_nhd_to(layout, x8):
    return _nhd_to(layout, x8.view(torch.uint8)).view(x8.dtype)  # (byte copies: no fp8 arithmetic needed)


def _fp8_tolerance(dtype, pos="NONE", fp16qk=False):
    """(atol, rtol) of an fp8-KV output against the float64 reference on the dequantised K/V. The fp8 values
    widen exactly (to float16, the MMA type of the fp8 kernels, or with RoPE to q's dtype), and a bfloat16 q of
    randn magnitudes is exact in float16, so what remains is the 16-bit path's error (reference.py's dtype
    tolerance: the probabilities and the output rounded, float32 accumulation), with a margin of one more
    rounding of the output (v_scale is applied in the kernels' epilogue, in fp32); RoPE rounds the rotated
    q/k to 16 bits (one more), and fp16 QK reduction accumulates the logits in fp16."""
    if fp16qk:
        return 2e-2, 2e-2
    atol, rtol = TOLERANCES[dtype]
    n = 3 if pos == "ROPE_LLAMA" else 2
    return n * atol, n * rtol


def _check_fp8_out(o, ref_o, dtype, what, **tol_kw):
    atol, rtol = _fp8_tolerance(dtype, **tol_kw)
    assert not torch.isnan(o).any(), f"{what}: NaN in the output (unwritten element or bad math)"
    torch.testing.assert_close(o.double(), ref_o, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", FP8_SINGLE_SPECS, ids=lambda s: s.name())
def test_single_prefill_fp8(spec: SinglePrefillSpec):
    """fp8 K/V (both formats) against the reference on their dequantised values, scales != 1 (floats, and 0-d /
    one-element CPU tensors), GQA groups 1/4/5/8, NHD and HND, one key and one query, query and key counts that
    end mid-tile, and a long KV (split over the GPU by fa2); NaN-poisoned outputs."""
    q_dtype, kv_dtype, d = DTYPES[spec.dtype_q], FP8[spec.dtype_kv], spec.head_dim
    cases = [(1, 1, 1, 4, "NHD"), (17, 517, 2, 1, "HND"), (128, 128, 1, 8, "NHD"), (1000, 4096, 2, 5, "HND")]
    for i, (qo_len, kv_len, hkv, group, layout) in enumerate(cases):
        k_scale, v_scale = (0.5, 1.75) if i % 2 else (1.25, 0.375)
        q = torch.randn(qo_len, hkv * group, d, device="cuda", dtype=q_dtype)
        k8, k_ref = _fp8_tensor((kv_len, hkv, d), kv_dtype, k_scale)
        v8, v_ref = _fp8_tensor((kv_len, hkv, d), kv_dtype, v_scale)
        mask = torch.rand(qo_len, kv_len, device="cuda") < 0.7 if spec.mask_mode == "custom" else None
        window = kv_len // 3 if spec.use_window else -1
        soft_cap = 1.5 if spec.use_logits_soft_cap else 0.0
        kw = {}
        if spec.pos_encoding_mode == "ROPE_LLAMA" and kv_len == 4096:
            kw.update(rope_scale=2.0, rope_theta=5e5)
        out = poisoned((qo_len, hkv * group, d), q_dtype)
        lse = poisoned((qo_len, hkv * group), torch.float32)
        scales = (torch.tensor(k_scale), torch.tensor([v_scale])) if i == 2 else (k_scale, v_scale)
        o, l = flashinfer.single_prefill_with_kv_cache(
            q,
            _fp8_nhd_to(layout, k8),
            _fp8_nhd_to(layout, v8),
            custom_mask=mask,
            causal=spec.mask_mode == "causal",
            kv_layout=layout,
            pos_encoding_mode=spec.pos_encoding_mode,
            use_fp16_qk_reduction=spec.use_fp16_qk_reduction,
            window_left=window,
            logits_soft_cap=soft_cap or None,
            backend=spec.backend,
            return_lse=True,
            k_scale=scales[0],
            v_scale=scales[1],
            out=out,
            lse=lse,
            **kw,
        )
        assert o is out and l is lse
        ref_o, ref_lse = attention(
            q,
            k_ref,
            v_ref,
            causal=spec.mask_mode == "causal",
            mask=mask,
            window_left=window,
            logits_soft_cap=soft_cap,
            pos_encoding_mode=spec.pos_encoding_mode,
            **kw,
        )
        what = f"o (qo {qo_len}, kv {kv_len}, group {group}, {layout})"
        _check_fp8_out(o, ref_o, q_dtype, what, pos=spec.pos_encoding_mode, fp16qk=spec.use_fp16_qk_reduction)
        _check_lse(l, ref_lse, rope_dtype=q_dtype if spec.pos_encoding_mode == "ROPE_LLAMA" else None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa2", "fa3", "fa3_ws"])
def test_fp8_prefill_bf16_q_of_wide_magnitudes(backend):
    """The fp8 kernels compute in float16 and round a bfloat16 q to it, exactly from 2**-14 to 65504 in magnitude:
    q elements around 1e4 (up to 6e4) and around 1e-3 (some below 2**-14), the logit scale keeping the softmax soft,
    match the reference as a randn q does."""
    if backend != "fa2" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the {backend} kernel needs a Hopper GPU")
    d, hkv, group = 128, 2, 4
    k8, k_ref = _fp8_tensor((700, hkv, d), torch.float8_e4m3fn, 0.5)
    v8, v_ref = _fp8_tensor((700, hkv, d), torch.float8_e4m3fn, 1.5)
    for mag in (1e4, 1e-3):
        q = (torch.randn(300, hkv * group, d, device="cuda") * mag).clamp(-6e4, 6e4).to(torch.bfloat16)
        sm_scale = 1.0 / (mag * d**0.5)
        out = poisoned(q.shape, torch.bfloat16)
        o = flashinfer.single_prefill_with_kv_cache(
            q, k8, v8, causal=True, sm_scale=sm_scale, k_scale=0.5, v_scale=1.5, backend=backend, out=out
        )
        ref_o, _ = attention(q, k_ref, v_ref, causal=True, sm_scale=sm_scale)
        _check_fp8_out(o, ref_o, torch.bfloat16, f"{backend} o (|q| ~ {mag})")


# The warp-specialised Hopper kernel with fp8 K/V (backend="fa3_ws": TMA copies the fp8 tiles, its producer
# warpgroup widens them to float16): lengths around its 128-row query tiles and 128-key KV tiles, GQA 1/4/8, no
# mask and causal, e4m3 with a bfloat16 q (rounded to float16 in the kernel) and e5m2 with a float16 q.
_WS_FP8_PAIRS = [
    (1, 1),
    (127, 127),
    (128, 128),
    (129, 129),
    (1000, 1000),
    (4096, 4096),
    (1, 4096),
    (127, 129),
    (129, 1000),
    (1000, 127),
]
_WS_FP8_DTYPES = [("bf16", "e4m3"), ("f16", "e5m2")]
# The fa3_ws fp8 modules these tests load (tests/prewarm_test.toml lists them): every (q, kv) pair, crossed ones
# included (test_single_prefill_fa3_ws_fp8_long_crossed_and_many_items), no mask and causal.
WS_FP8_SPECS = [
    SinglePrefillSpec(128, dq, dkv, dq, m, backend="fa3_ws")
    for dq in ("bf16", "f16")
    for dkv in ("e4m3", "e5m2")
    for m in ("none", "causal")
]


def _fp8_single_check(qo_len, kv_len, hkv, group, q_dtype, kv_dtype, mask_mode, layout, backend, scales, **kw):
    """One fp8 single prefill (NaN-poisoned out and lse) against the float64 reference on the dequantised K/V."""
    k_scale, v_scale = scales
    q = torch.randn(qo_len, hkv * group, 128, device="cuda", dtype=q_dtype)
    k8, k_ref = _fp8_tensor((kv_len, hkv, 128), kv_dtype, k_scale)
    v8, v_ref = _fp8_tensor((kv_len, hkv, 128), kv_dtype, v_scale)
    out = poisoned(q.shape, q_dtype)
    lse = poisoned(q.shape[:2], torch.float32)
    o, l = flashinfer.single_prefill_with_kv_cache(
        q,
        _fp8_nhd_to(layout, k8),
        _fp8_nhd_to(layout, v8),
        causal=mask_mode == "causal",
        kv_layout=layout,
        backend=backend,
        return_lse=True,
        k_scale=k_scale,
        v_scale=v_scale,
        out=out,
        lse=lse,
        **kw,
    )
    assert o is out and l is lse
    ref_o, ref_lse = attention(q, k_ref, v_ref, causal=mask_mode == "causal", **kw)
    what = f"{backend} o (qo {qo_len}, kv {kv_len}, group {group}, {layout})"
    _check_fp8_out(o, ref_o, q_dtype, what)
    _check_lse(l, ref_lse)
    return o, l


@pytest.mark.gpu
@pytest.mark.parametrize("dq,dkv", _WS_FP8_DTYPES, ids=[f"{a}-{b}" for a, b in _WS_FP8_DTYPES])
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("qo_len,kv_len", _WS_FP8_PAIRS, ids=[f"q{a}-kv{b}" for a, b in _WS_FP8_PAIRS])
def test_single_prefill_fa3_ws_fp8(dq, dkv, mask_mode, group, qo_len, kv_len):
    _need_hopper()
    if mask_mode == "causal" and qo_len > kv_len:
        pytest.skip("causal needs qo_len <= kv_len (refused: test_single_prefill_fa3_ws_refusals)")
    layout = "HND" if (qo_len + group) % 2 else "NHD"
    scales = (1.25, 0.375) if group % 2 else (0.5, 1.75)
    _fp8_single_check(qo_len, kv_len, 2, group, DTYPES[dq], FP8[dkv], mask_mode, layout, "fa3_ws", scales)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
def test_single_prefill_fa3_ws_fp8_long_crossed_and_many_items(mask_mode):
    """fp8 fa3_ws over long sequences (64-65 KV tiles per item: every ring slot and staging barrier wraps its phase
    many times), the crossed dtype pairs (float16 q with e4m3, bfloat16 q with e5m2), and more work items than SMs
    (the staging tiles and the Q barriers carry over from item to item) with a scale other than the default."""
    _need_hopper()
    bf, f16 = torch.bfloat16, torch.float16
    e4, e5 = FP8["e4m3"], FP8["e5m2"]
    _fp8_single_check(8192, 8192, 1, 8, bf, e4, mask_mode, "NHD", "fa3_ws", (0.5, 1.5))
    _fp8_single_check(2000, 8321, 2, 4, f16, e5, mask_mode, "HND", "fa3_ws", (2.0, 0.25))
    _fp8_single_check(1000, 4096, 2, 4, f16, e4, mask_mode, "NHD", "fa3_ws", (0.75, 1.25))
    _fp8_single_check(1000, 4096, 2, 4, bf, e5, mask_mode, "HND", "fa3_ws", (1.5, 0.5))
    _fp8_single_check(3000, 3000, 8, 4, f16, e4, mask_mode, "NHD", "fa3_ws", (0.5, 2.0), sm_scale=0.05)


@pytest.mark.gpu
def test_single_prefill_fa3_ws_fp8_views_empty_kv_and_auto(monkeypatch):
    """fp8 K/V views with 16-byte multiple strides (TMA reads them as they are), a single key and KV head, no keys at
    all (zeros, lse -inf), and "auto" running fa3_ws for fp8 K/V (an expanded fp8 view: fa3), as observed on the
    module each call loads."""
    _need_hopper()
    import flashinfer.prefill as fp

    ran = []
    lookup = fp._module
    monkeypatch.setattr(fp, "_module", lambda spec: ran.append(spec.backend) or lookup(spec))
    e4, bf = FP8["e4m3"], torch.bfloat16
    q = torch.randn(300, 8, 128, device="cuda", dtype=bf)
    big8, big_ref = _fp8_tensor((700, 4, 2, 128), e4, 0.5)
    k, v = big8[::2, :, 0], big8[1::2, :, 1]  # token stride 2048 bytes, head stride 256
    ref_o, ref_lse = attention(q, big_ref[::2, :, 0], big_ref[1::2, :, 1], causal=True)
    f = flashinfer.single_prefill_with_kv_cache
    o, lse = f(q, k, v, causal=True, backend="fa3_ws", return_lse=True, k_scale=0.5, v_scale=0.5)
    _check_fp8_out(o, ref_o, bf, "strided fp8 views")
    _check_lse(lse, ref_lse)
    k1, k1_ref = _fp8_tensor((1, 1, 128), e4, 1.0)
    o1 = f(q[:5, :4], k1, k1, backend="fa3_ws")
    _check_fp8_out(o1, attention(q[:5, :4], k1_ref, k1_ref)[0], bf, "one key")
    z, zl = f(q[:3], k[:0], k[:0], return_lse=True, backend="fa3_ws")
    assert (z == 0).all() and torch.isinf(zl).all() and (zl < 0).all()
    assert ran == ["fa3_ws"] * 3
    # "auto": 8192 tokens x 4 packed heads x 8 KV heads are 2048 query tiles, enough for any Hopper's SMs: fa3_ws;
    # an expanded (zero-stride) fp8 view, which no tensor map describes: fa3. Checked on a slice of heads.
    qa = torch.randn(8192, 32, 128, device="cuda", dtype=bf)
    ka, ka_ref = _fp8_tensor((8192, 8, 128), e4, 0.5)
    oa = f(qa, ka, ka, causal=True, k_scale=0.5, v_scale=0.5)
    assert ran[-1] == "fa3_ws", ran
    _check_fp8_out(oa[:, :4], attention(qa[:, :4], ka_ref[:, :1], ka_ref[:, :1], causal=True)[0], bf, "auto o")
    kz, kz_ref = ka[:1].expand(8192, 8, 128), ka_ref[:1].expand(8192, 8, 128)
    oz = f(qa, kz, kz, causal=True, k_scale=0.5, v_scale=0.5)
    assert ran[-1] == "fa3", ran
    _check_fp8_out(oz[:, :4], attention(qa[:, :4], kz_ref[:, :1], kz_ref[:, :1], causal=True)[0], bf, "expanded o")


@pytest.mark.gpu
@pytest.mark.parametrize("dq,dkv", _WS_FP8_DTYPES, ids=[f"{a}-{b}" for a, b in _WS_FP8_DTYPES])
@pytest.mark.parametrize("qo_len,kv_len,group", [(129, 129, 1), (1000, 4096, 4), (4096, 4096, 8)])
def test_single_prefill_fa3_ws_fp8_equals_fa3_causal(dq, dkv, qo_len, kv_len, group):
    """A diagnostic with no tolerance (as test_single_prefill_fa3_ws_equals_fa3_causal for 16 bits): with fp8 K/V
    and a causal mask both Hopper kernels widen the same fp8 values to float16 (widen_fp8_tile), round a bfloat16 q
    the same way (q_tile_to_half) and do the same float16 wgmmas, softmax and epilogue (output_factor): the outputs
    and lse should be bitwise equal. The reference tests above are the correctness criterion."""
    _need_hopper()
    q = torch.randn(qo_len, 2 * group, 128, device="cuda", dtype=DTYPES[dq])
    k8, _ = _fp8_tensor((kv_len, 2, 128), FP8[dkv], 0.5)
    v8, _ = _fp8_tensor((kv_len, 2, 128), FP8[dkv], 1.5)
    f = flashinfer.single_prefill_with_kv_cache
    kw = dict(causal=True, return_lse=True, k_scale=0.5, v_scale=1.5)
    o3, l3 = f(q, k8, v8, backend="fa3", **kw)
    ow, lw = f(q, k8, v8, backend="fa3_ws", **kw)
    assert torch.equal(ow, o3), (ow.float() - o3.float()).abs().max().item()
    assert torch.equal(lw, l3), (lw - l3).abs().max().item()


def _half_bits_to_float(bits):
    """float16 bit patterns (int64 tensor, 16 bits used) -> float64 values."""
    return bits.to(torch.int16).view(torch.float16).double()


def test_fp8_e5m2_permute_widening_is_exact():
    """e5m2x4_to_half2x2_permute (common.cuh: bytes 0, 1 of a word to bits 8..15 and 24..31, __byte_perm selector
    0x1404), modelled in integers on every pair of bytes: each lane is the float16 of torch's e5m2 -> float32 value,
    signed zeros, subnormals and infinities included, NaN for NaN."""
    b = torch.arange(256, dtype=torch.int64)
    lo, hi = (x.reshape(-1) for x in torch.meshgrid(b, b, indexing="ij"))
    x = (lo << 8) | (hi << 24)
    for shift, code in ((0, lo), (16, hi)):
        got = _half_bits_to_float((x >> shift) & 0xFFFF)
        want = code.to(torch.uint8).view(torch.float8_e5m2).double()
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        fin = ~torch.isnan(want)
        assert torch.equal(got[fin], want[fin]) and torch.equal(torch.signbit(got[fin]), torch.signbit(want[fin]))


def _fp8_codes(kv_dtype, n, shift):
    """n fp8 byte codes cycling through every finite code (NaN and infinity left out), starting at shift."""
    every = torch.arange(256, dtype=torch.uint8)
    finite = every[torch.isfinite(every.view(kv_dtype).float())]
    return finite[(torch.arange(n) + shift) % len(finite)]


@pytest.mark.gpu
@pytest.mark.parametrize("dq,dkv", _WS_FP8_DTYPES, ids=[f"{a}-{b}" for a, b in _WS_FP8_DTYPES])
def test_single_prefill_fa3_ws_fp8_widening_exact(dq, dkv):
    """The widening of every fp8 code, bit-exact on the GPU: per KV head 128 queries and 128 keys, query i and key i
    one-hot on dim i (1 and 256), sm_scale 1: each softmax row is one-hot (the other keys' exp2(-369) is 0, and the
    rounding of the row's own logit leaves its weight within 2^-15 of 1, which the output's rounding absorbs), so
    that output row i is V row i times v_scale (0.5: exact in the output dtype). V holds every finite fp8 code (shifted per head), the
    160 KV heads are more work items than SMs (the ring and staging barriers wrap). Then NaN (for e5m2 NaN and -inf)
    codes at two places of V: the output row that selects that key has NaN (-inf) there; other rows of that column
    have NaN (0 x NaN, 0 x inf) or their value, every other output is unchanged."""
    _need_hopper()
    q_dtype, kv_dtype = DTYPES[dq], FP8[dkv]
    hkv, n, d = 160, 128, 128
    eye = torch.eye(n, d, device="cuda")
    q = eye.to(q_dtype)[:, None].expand(n, hkv, d).contiguous()
    k = (256 * eye).to(kv_dtype).view(torch.uint8)[:, None].expand(n, hkv, d).contiguous().view(kv_dtype)
    codes = torch.stack([_fp8_codes(kv_dtype, n * d, 7 * h) for h in range(hkv)], 1).reshape(n, d, hkv)
    v = codes.permute(0, 2, 1).contiguous().cuda().view(kv_dtype)  # (n, hkv, d)
    run = lambda vv: flashinfer.single_prefill_with_kv_cache(  # noqa: E731
        q, k, vv, backend="fa3_ws", sm_scale=1.0, v_scale=0.5, out=poisoned(q.shape, q_dtype)
    )
    o = run(v)
    want = (v.float() * 0.5).to(q_dtype)
    assert torch.equal(o, want), (o.float() - want.float()).abs().max().item()
    special = torch.tensor([0x7F, 0xFF] if dkv == "e4m3" else [0x7E, 0xFC], dtype=torch.uint8)
    vs = v.view(torch.uint8).clone()
    vs[3, 5, 5], vs[100, 5, 77] = special[0], special[1]  # (key, head, dim)
    o = run(vs.view(kv_dtype))
    touched = torch.zeros(o.shape, dtype=torch.bool, device="cuda")
    touched[:, 5, 5] = touched[:, 5, 77] = True
    assert torch.equal(o[~touched], want[~touched])
    assert torch.isnan(o[3, 5, 5].float())
    if dkv == "e4m3":
        assert torch.isnan(o[100, 5, 77].float())
    else:
        assert o[100, 5, 77].item() == float("-inf")
    for col in (5, 77):
        c, w = o[:, 5, col].float(), want[:, 5, col].float()
        assert (torch.isnan(c) | (c == w))[torch.arange(n, device="cuda") != (3 if col == 5 else 100)].all()


def _fp8_batch_kv(kv_lens, hkv, d, kv_dtype, k_scale, v_scale):
    k = [_fp8_tensor((n, hkv, d), kv_dtype, k_scale) for n in kv_lens]
    v = [_fp8_tensor((n, hkv, d), kv_dtype, v_scale) for n in kv_lens]
    return [x for x, _ in k], [x for x, _ in v], [r for _, r in k], [r for _, r in v]


def _fp8_paged(k8s, v8s, page_size, layout, tuple_cache=False):
    """_paged on the fp8 bytes (the cache's other slots hold random bytes, NaN patterns included: never read)."""
    dt = k8s[0].dtype
    cache, perm, indptr, last = _paged(
        [k.view(torch.uint8) for k in k8s], [v.view(torch.uint8) for v in v8s], page_size, layout, tuple_cache
    )
    cache = tuple(c.view(dt) for c in cache) if tuple_cache else cache.view(dt)
    return cache, perm, indptr, last


@pytest.mark.gpu
@pytest.mark.parametrize("storage,page_size", [("ragged", 0), ("paged", 1), ("paged", 16)])
@pytest.mark.parametrize("case", range(len(BATCH_CASES)))
@pytest.mark.parametrize("mask_mode", ["none", "causal"])
def test_batch_prefill_fp8(storage, page_size, case, mask_mode):
    """Ragged and paged (page sizes 1 and 16, a (k, v) tuple cache) fp8 K/V at head dims 64/128/256 (BATCH_CASES:
    requests without queries or keys, one query, lengths ending mid-tile, GQA 1/4/8, causal with more queries
    than keys), both layouts, scales != 1 on run(); NaN-poisoned outputs."""
    qo_lens, kv_lens, group = BATCH_CASES[case]
    dq, dkv = FP8_BATCH_DTYPES[case]
    q_dtype, kv_dtype = DTYPES[dq], FP8[dkv]
    layout = "HND" if (case + page_size) % 2 else "NHD"
    hkv, d = 2, (64, 128, 256)[case]
    k_scale, v_scale = (0.75, 2.5) if case % 2 else (1.5, 0.625)
    qs = [torch.randn(n, hkv * group, d, device="cuda", dtype=q_dtype) for n in qo_lens]
    k8s, v8s, k_refs, v_refs = _fp8_batch_kv(kv_lens, hkv, d, kv_dtype, k_scale, v_scale)
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    kw = dict(causal=mask_mode == "causal", q_data_type=q_dtype, kv_data_type=kv_dtype)
    if storage == "ragged":
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, layout)
        kv_indptr = torch.tensor([0] + list(itertools.accumulate(kv_lens)), dtype=torch.int32)
        w.plan(qo_indptr, kv_indptr, hkv * group, hkv, d, **kw)
        k = torch.cat([x.view(torch.uint8) for x in k8s]).view(kv_dtype)
        v = torch.cat([x.view(torch.uint8) for x in v8s]).view(kv_dtype)
        args = (_fp8_nhd_to(layout, k), _fp8_nhd_to(layout, v))
    else:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, layout)
        cache, perm, indptr, last = _fp8_paged(k8s, v8s, page_size, layout, tuple_cache=case == 1)
        w.plan(qo_indptr, indptr, perm, last, hkv * group, hkv, d, page_size, **kw)
        args = (cache,)
    q = torch.cat(qs)
    out = poisoned(q.shape, q_dtype)
    lse = poisoned(q.shape[:2], torch.float32)
    o, l = w.run(q, *args, k_scale=k_scale, v_scale=v_scale, out=out, lse=lse, return_lse=True)
    assert o is out and l is lse
    ref_o, ref_lse = _batch_ref(qs, k_refs, v_refs, None, mask_mode)
    _check_fp8_out(o, ref_o, q_dtype, "o")
    _check_lse(l, ref_lse)


@pytest.mark.gpu
def test_batch_prefill_fp8_paged_causal_bf16_e4m3_with_tensor_scales():
    """The serving configuration (bf16 q, e4m3 paged cache, d128, causal, GQA 4) with 0-d / one-element CPU scale
    tensors, long requests split over the GPU and merged."""
    qo_lens, kv_lens = [3, 200, 1], [9000, 1000, 17]
    k8s, v8s, k_refs, v_refs = _fp8_batch_kv(kv_lens, 2, 128, torch.float8_e4m3fn, 0.3, 2.5)
    qs = [torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16) for n in qo_lens]
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    cache, perm, indptr, last = _fp8_paged(k8s, v8s, 16, "NHD")
    qo_indptr = torch.tensor([0] + list(itertools.accumulate(qo_lens)), dtype=torch.int32)
    w.plan(qo_indptr, indptr, perm, last, 8, 2, 128, 16, causal=True, q_data_type="bfloat16", kv_data_type="e4m3")
    q = torch.cat(qs)
    out = poisoned(q.shape, torch.bfloat16)
    o = w.run(q, cache, k_scale=torch.tensor(0.3), v_scale=torch.tensor([2.5], dtype=torch.float64), out=out)
    ref_o, _ = _batch_ref(qs, k_refs, v_refs, None, "causal")
    _check_fp8_out(o, ref_o, torch.bfloat16, "o")


@pytest.mark.gpu
@pytest.mark.parametrize("dq,dkv", [("bf16", "e4m3"), ("f16", "e5m2")])
def test_decode_with_tensor_cores_fp8(dq, dkv):
    """use_tensor_cores=True decode (single and the batch wrapper) reads fp8 caches through the prefill kernels."""
    q_dtype, kv_dtype = DTYPES[dq], FP8[dkv]
    q = torch.randn(8, 128, device="cuda", dtype=q_dtype)
    k8, k_ref = _fp8_tensor((7000, 2, 128), kv_dtype, 0.5)
    v8, v_ref = _fp8_tensor((7000, 2, 128), kv_dtype, 1.5)
    o, lse = flashinfer.single_decode_with_kv_cache(
        q, k8, v8, use_tensor_cores=True, k_scale=0.5, v_scale=1.5, return_lse=True
    )
    ref, ref_lse = attention(q[None], k_ref, v_ref)
    _check_fp8_out(o, ref[0], q_dtype, "single o")
    _check_lse(lse, ref_lse[0])
    kv_lens = [1, 700, 33]
    k8s, v8s, k_refs, v_refs = _fp8_batch_kv(kv_lens, 2, 128, kv_dtype, 0.5, 1.5)
    cache, perm, indptr, last = _fp8_paged(k8s, v8s, 16, "NHD")
    qb = torch.randn(3, 8, 128, device="cuda", dtype=q_dtype)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    w.plan(indptr, perm, last, 8, 2, 128, 16, q_data_type=q_dtype, kv_data_type=kv_dtype)
    out = poisoned(qb.shape, q_dtype)
    ob = w.run(qb, cache, k_scale=0.5, v_scale=1.5, out=out)
    ref_b, _ = _batch_ref([x[None] for x in qb], k_refs, v_refs, None, "none")
    _check_fp8_out(ob, ref_b, q_dtype, "batch o")


# ---------------------------------------------------------------------------------------------- CPU


def test_single_spec_names_and_matrix():
    specs = SinglePrefillSpec.expand()
    assert len({s.name() for s in specs}) == len(specs)
    s = SinglePrefillSpec()
    assert s.name() == (
        "prefill_single_q-bf16_kv-bf16_o-bf16_d128_mask-none_pos-none_window-off_softcap-off_fp16qk-off_fa2"
    )
    assert SinglePrefillSpec.from_json(s.to_json()) == s
    assert "float16" in SinglePrefillSpec(use_fp16_qk_reduction=True).unsupported_reason()
    assert (
        SinglePrefillSpec(dtype_q="f16", dtype_kv="f16", dtype_o="f16", use_fp16_qk_reduction=True).unsupported_reason()
        is None
    )
    supported = [s for s in specs if s.unsupported_reason() is None]
    # Per KV dtype (q's 16-bit one, e4m3, e5m2): fa2: 3 head dims x (bf16 + f16 x fp16qk on/off) x 3 masks x 3 pos
    # x window x softcap; fa3 and fa3_ws: head_dim 128 x (bf16, f16) x (none, causal); fa3_ws also head_dim 64 with
    # 16-bit K/V
    assert len(supported) == 3 * (3 * 3 * 3 * 3 * 2 * 2 + 2 * 2 + 2 * 2) + 2 * 2
    assert len([s for s in supported if s.dtype_kv == s.dtype_q]) == 3 * 3 * 3 * 3 * 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2
    fa3 = [s for s in supported if s.backend == "fa3" and s.dtype_kv == s.dtype_q]
    assert {(s.dtype_q, s.mask_mode) for s in fa3} == {(d, m) for d in ("bf16", "f16") for m in ("none", "causal")}
    assert all(s.needs_sm90a() for s in fa3) and not any(s.needs_sm90a() for s in supported if s.backend == "fa2")
    assert "fa3" in SinglePrefillSpec(mask_mode="custom", backend="fa3").unsupported_reason()
    assert "single-request" in BatchPrefillSpec(backend="fa3").unsupported_reason()


def test_fa3_ws_spec_scope_and_rendering():
    """fa3_ws is a backend value of the single-prefill family (and of the batch family, ragged and 16-bit only: see
    test_fa3_ws_batch_spec_scope_and_rendering): fa3's scope (16-bit or fp8 K/V), built for sm_90a; its module
    includes prefill_sm90_ws.cuh and launches it with the K/V type (fp8: the producer's widening), and the fa2/fa3
    modules render as before (no fa3_ws code in them)."""
    from flashinfer.jit.templating import render

    ws = [s for s in SinglePrefillSpec.expand(backend=("fa3_ws",)) if s.unsupported_reason() is None]
    assert {(s.head_dim, s.dtype_q, s.dtype_kv, s.mask_mode, s.pos_encoding_mode) for s in ws} == {
        (128, d, kv, m, "NONE") for d in ("bf16", "f16") for kv in (d, "e4m3", "e5m2") for m in ("none", "causal")
    } | {(64, d, d, m, "NONE") for d in ("bf16", "f16") for m in ("none", "causal")}
    assert all(s.needs_sm90a() and s.name().endswith("_fa3_ws") for s in ws)
    assert "kv must be" in SinglePrefillSpec(128, "bf16", "f16", "bf16", backend="fa3_ws").unsupported_reason()
    for kv, cuda_type in (("e4m3", "__nv_fp8_e4m3"), ("e5m2", "__nv_fp8_e5m2")):
        src = render(SinglePrefillSpec(128, "bf16", kv, "bf16", "causal", backend="fa3_ws"))["single_prefill.cu"]
        assert f"using DTypeKV = {cuda_type};" in src
        assert "launch_sm90_ws_single_prefill<kHeadDim, DTypeQ, DTypeKV, DTypeO, kMask>" in src
    assert "fa3_ws" in SinglePrefillSpec(128, mask_mode="custom", backend="fa3_ws").unsupported_reason()
    assert SinglePrefillSpec(64, backend="fa3_ws").unsupported_reason() is None
    assert "fa3_ws takes 128 or 64" in SinglePrefillSpec(256, backend="fa3_ws").unsupported_reason()
    assert "fa3 takes 128" in SinglePrefillSpec(64, backend="fa3").unsupported_reason()
    assert (
        "fp8 K/V at head_dim 64" in SinglePrefillSpec(64, "bf16", "e4m3", "bf16", backend="fa3_ws").unsupported_reason()
    )
    assert BatchPrefillSpec(128, "bf16", "bf16", "bf16", backend="fa3_ws").unsupported_reason() is None  # (paged)
    src = render(SinglePrefillSpec(128, "f16", "f16", "f16", "causal", backend="fa3_ws"))["single_prefill.cu"]
    assert '#include "flashinfer/attention/prefill_sm90_ws.cuh"' in src and "launch_sm90_ws_single_prefill<" in src
    for other in ("fa3", "fa2"):
        src = render(SinglePrefillSpec(128, "f16", "f16", "f16", "causal", backend=other))["single_prefill.cu"]
        assert "sm90_ws" not in src.replace("prefill_sm90_ws.cuh (fa3_ws)", "")


def test_fa3_ws_single_prefill_dispatch(monkeypatch):
    """On fake CUDA tensors (a fake Hopper): backend="fa3_ws" launches the fa3_ws module with one KV chunk and no
    workspace (fp8 K/V too: k_scale folded into sm_scale, v_scale passed to the kernel); "auto" takes it for many
    query tiles of 16-bit or fp8 K/V, fa3 for expanded views; what it
    cannot run is refused before any module loads."""
    from fake_cuda import cuda, fake_cuda
    from flashinfer.prefill import _single_backend

    bf = torch.bfloat16
    with fake_cuda(monkeypatch) as rec:
        q, k = cuda(torch.randn(300, 8, 128).to(bf)), cuda(torch.randn(900, 2, 128).to(bf))
        f = flashinfer.single_prefill_with_kv_cache
        with pytest.raises(ValueError, match="fa3_ws.*soft cap"):
            f(q, k, k, logits_soft_cap=5.0, backend="fa3_ws")
        with pytest.raises(ValueError, match="zero stride"):
            kz = k[:1].expand(900, 2, 128)
            f(q, kz, kz, backend="fa3_ws")
        assert rec.loaded == [] and rec.calls == []
        f(q, k, k, causal=True, backend="FA3_WS")
        ((_, kw),) = [c for c in rec.launches("flashinfer_single_prefill") if c[0] == "flashinfer_single_prefill"]
        assert kw["_spec"] == SinglePrefillSpec(128, "bf16", "bf16", "bf16", "causal", backend="fa3_ws")
        assert kw["num_chunks"] == 1 and kw["workspace"] is None
        # "auto" on the (fake) Hopper: fa3_ws for many query tiles (fa3 where fa3_ws does not apply), fa2 for few
        dev = torch.device("cuda", 0)
        assert _single_backend("auto", None, dev, 1 << 20, 32) == "fa3_ws"
        assert _single_backend("auto", None, dev, 1 << 20, 32, "fp8 K/V") == "fa3"
        # head_dim 64: fa3 does not apply, fa3_ws does
        assert _single_backend("auto", "head_dim 64 (fa3 takes 128)", dev, 1 << 20, 32) == "fa3_ws"
        assert _single_backend("auto", "head_dim 64 (fa3 takes 128)", dev, 1 << 20, 32, "zero stride") == "fa2"
        q64, k64 = cuda(torch.randn(4096, 32, 64).to(bf)), cuda(torch.randn(4096, 8, 64).to(bf))
        f(q64, k64, k64, causal=True)
        kw = [c for c in rec.launches("flashinfer_single_prefill") if c[0] == "flashinfer_single_prefill"][-1][1]
        assert kw["_spec"] == SinglePrefillSpec(64, "bf16", "bf16", "bf16", "causal", backend="fa3_ws")
        assert _single_backend("auto", None, dev, 128, 1) == "fa2"
        n = len(rec.launches("flashinfer_single_prefill"))
        qa = cuda(torch.randn(8192, 32, 128).to(bf))
        ka = cuda(torch.randn(8192, 8, 128).to(bf))
        f(qa, ka, ka, causal=True)
        assert rec.launches("flashinfer_single_prefill")[n][1]["_spec"].backend == "fa3_ws"
        # an expanded K/V view (zero stride: no tensor map describes it): "auto" falls back to fa3
        kz = ka[:1].expand(8192, 8, 128)
        f(qa, kz, kz, causal=True)
        assert rec.launches("flashinfer_single_prefill")[n + 1][1]["_spec"].backend == "fa3"
        # fp8 K/V (both formats): forced and "auto" run fa3_ws; for an expanded fp8 view "auto" takes fa3
        for fmt, short in ((torch.float8_e4m3fn, "e4m3"), (torch.float8_e5m2, "e5m2")):
            k8 = cuda(torch.randn(900, 2, 128).to(fmt))
            f(q, k8, k8, backend="fa3_ws", k_scale=0.5, v_scale=1.5, sm_scale=0.1)
            kw = rec.launches("flashinfer_single_prefill")[-1][1]
            assert kw["_spec"] == SinglePrefillSpec(128, "bf16", short, "bf16", backend="fa3_ws")
            assert kw["num_chunks"] == 1 and kw["workspace"] is None
            assert kw["v_scale"] == 1.5 and kw["sm_scale"] == pytest.approx(0.05)
            ka8 = cuda(torch.randn(8192, 8, 128).to(fmt))
            f(qa, ka8, ka8, causal=True, k_scale=0.5, v_scale=1.5)
            assert rec.launches("flashinfer_single_prefill")[-1][1]["_spec"] == SinglePrefillSpec(
                128, "bf16", short, "bf16", "causal", backend="fa3_ws"
            )
            kz8 = ka8[:1].expand(8192, 8, 128)
            f(qa, kz8, kz8, causal=True)
            assert rec.launches("flashinfer_single_prefill")[-1][1]["_spec"].backend == "fa3"


@pytest.mark.parametrize(
    "cls", [flashinfer.BatchPrefillWithRaggedKVCacheWrapper, flashinfer.BatchPrefillWithPagedKVCacheWrapper]
)
def test_batch_wrappers_refuse_the_fa3_backend(cls):
    with pytest.raises(ValueError, match="fa3 backend covers single_prefill"):
        cls(torch.empty(16, dtype=torch.uint8), backend="fa3")
    with pytest.raises(ValueError, match="CUDA-graph"):  # (fa3_ws: both storages, no graphs)
        cls(torch.empty(16, dtype=torch.uint8), use_cuda_graph=True, backend="fa3_ws")
    with pytest.raises(NotImplementedError, match="cudnn"):
        cls(torch.empty(16, dtype=torch.uint8), backend="cudnn")
    with pytest.raises(ValueError, match="backend must be"):
        cls(torch.empty(16, dtype=torch.uint8), backend="nope")


def test_fa3_ws_batch_spec_scope_and_rendering():
    """fa3_ws is a backend value of the batch family for ragged KV: the single kernel's scope (d128 or d64, one 16-bit dtype,
    no mask or causal, no other feature), built for sm_90a; its module includes prefill_sm90_ws.cuh and instantiates
    the ragged kernel only; the fa2 batch modules render without fa3_ws code."""
    from flashinfer.jit.templating import render

    ws = [s for s in BatchPrefillSpec.expand(backend=("fa3_ws",)) if s.unsupported_reason() is None]
    assert {
        (s.kv_storage, s.head_dim, s.dtype_q, s.dtype_kv, s.dtype_o, s.mask_mode, s.pos_encoding_mode) for s in ws
    } == {
        (st, hd, d, d, d, m, "NONE")
        for st in ("ragged", "paged")
        for hd in (128, 64)
        for d in ("bf16", "f16")
        for m in ("none", "causal")
    }
    assert all(s.needs_sm90a() and s.name().endswith("_fa3_ws") for s in ws)
    assert all(not s.use_window and not s.use_logits_soft_cap and not s.use_fp16_qk_reduction for s in ws)
    bad = {
        "(fa2 reads fp8)": BatchPrefillSpec(128, "f16", "e5m2", "f16", kv_storage="paged", backend="fa3_ws"),
        "no fp8": BatchPrefillSpec(128, "bf16", "e4m3", "bf16", kv_storage="ragged", backend="fa3_ws"),
        "no mask or causal": BatchPrefillSpec(kv_storage="ragged", mask_mode="custom", backend="fa3_ws"),
        "fa3_ws takes 128 or 64": BatchPrefillSpec(256, kv_storage="ragged", backend="fa3_ws"),
    }
    for why, spec in bad.items():
        assert why in spec.unsupported_reason(), (why, spec.unsupported_reason())
    assert "single-request" in BatchPrefillSpec(kv_storage="ragged", backend="fa3").unsupported_reason()
    for storage, paged in (("ragged", "false"), ("paged", "true")):
        spec = BatchPrefillSpec(128, "f16", "f16", "f16", kv_storage=storage, mask_mode="causal", backend="fa3_ws")
        src = render(spec)["batch_prefill.cu"]
        assert '#include "flashinfer/attention/prefill_sm90_ws.cuh"' in src
        assert "launch_sm90_ws_batch_prefill<kHeadDim, DTypeQ, DTypeO, kMask, kPaged>" in src
        assert f"constexpr bool kPaged = {paged};" in src and "launch_batch_prefill<" not in src
        assert '"query_tile_0", Sm90WsTraits::BQ' in src and '{"query_tiles", 1}' in src
    for storage in ("ragged", "paged"):
        src = render(BatchPrefillSpec(128, kv_storage=storage, mask_mode="causal"))["batch_prefill.cu"]
        assert "sm90_ws" not in src.replace("prefill_sm90_ws.cuh (fa3_ws", "")


def test_fa3_ws_ragged_batch_dispatch_and_refusals(monkeypatch):
    """On fake CUDA tensors (a fake Hopper): BatchPrefillWithRaggedKVCacheWrapper(backend="fa3_ws") plans one
    unsplit piece per (request, 128-row query tile) and launches the fa3_ws module with the ragged K/V's row count;
    what the kernel cannot run is refused by plan() (or the constructor, or run()) with a ValueError naming the
    reason, before any module loads; "auto" takes fa3_ws only for a batch whose query tiles fill the GPU."""
    from fake_cuda import cuda, fake_cuda, workspace
    from flashinfer import prefill

    bf = torch.bfloat16
    W = flashinfer.BatchPrefillWithRaggedKVCacheWrapper
    # qo_lens [3, 0, 300], kv_lens [20000, 5, 700]
    qo = torch.tensor([0, 3, 3, 303], dtype=torch.int32)
    kv = torch.tensor([0, 20000, 20005, 20705], dtype=torch.int32)
    with fake_cuda(monkeypatch) as rec:
        with pytest.raises(ValueError, match="CUDA-graph"):
            W(
                workspace(),
                use_cuda_graph=True,
                qo_indptr_buf=cuda(qo.clone()),
                kv_indptr_buf=cuda(kv.clone()),
                backend="fa3_ws",
            )
        with pytest.raises(ValueError, match="CUDA-graph"):
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), use_cuda_graph=True, backend="fa3_ws")
        w = W(workspace(), "NHD", backend="fa3_ws")
        refusals = [
            ("fa3_ws.*no mask or causal", dict(custom_mask=cuda(torch.ones(3 * 20000 + 300 * 700, dtype=torch.bool)))),
            ("fa3_ws takes 128 or 64", dict(head_dim_qk=256)),
            ("fa3_ws.*no fp8", dict(kv_data_type=torch.float8_e4m3fn)),
            ("fa3_ws.*window", dict(window_left=3)),
            ("fa3_ws.*soft cap", dict(logits_soft_cap=30.0)),
            ("fa3_ws.*position encoding", dict(pos_encoding_mode="ROPE_LLAMA")),
            ("fa3_ws.*fp16 QK", dict(use_fp16_qk_reduction=True, q_data_type=torch.float16)),
        ]
        for why, kw in refusals:
            args = dict(num_qo_heads=8, num_kv_heads=2, head_dim_qk=128, causal=True, q_data_type=bf)
            args.update(kw)
            with pytest.raises(ValueError, match=why):
                w.plan(qo, kv, **args)
        assert rec.loaded == [] and rec.calls == []

        w.plan(qo, kv, 8, 2, 128, causal=True, q_data_type=bf, disable_split_kv=True)
        assert w.plan_stats["merges"] == 0 and w.plan_stats["partial_states"] == 0
        q = cuda(torch.randn(303, 8, 128).to(bf))
        k = cuda(torch.randn(20705, 2, 128).to(bf))
        w.run(q, k, k)
        ((_, a),) = [c for c in rec.launches("flashinfer_batch_prefill") if c[0] == "flashinfer_batch_prefill"]
        assert a["_spec"] == BatchPrefillSpec(
            128, "bf16", "bf16", "bf16", kv_storage="ragged", mask_mode="causal", backend="fa3_ws"
        )
        # pieces: 1 query tile of request 0 (3 x 4 rows), none of request 1, 10 of request 2 (300 x 4 rows)
        assert a["args.tile_q"] == 128 and a["args.kv_rows"] == 20705
        assert a["args.grid_x"] == 11 and a["args.merge_grid_x"] == 0
        # as planned by default: the 11 query tiles x 2 KV heads cannot fill the GPU, so the requests' keys are
        # cut into chunks (as fa2 would), their partial states merged by the module's second kernel
        w.plan(qo, kv, 8, 2, 128, causal=True, q_data_type=bf)
        st = w.plan_stats
        assert st["merges"] > 0 and st["partial_states"] > 0 and st["pieces"] > 11
        w.run(q, k, k)
        a = [c for c in rec.launches("flashinfer_batch_prefill") if c[0] == "flashinfer_batch_prefill"][-1][1]
        assert a["_spec"].backend == "fa3_ws" and a["args.grid_x"] == st["pieces"]
        assert a["args.merge_grid_x"] == st["merges"]
        with pytest.raises(ValueError, match="zero stride"):
            kz = k[:1].expand(20705, 2, 128)
            w.run(q, kz, kz)
        with pytest.raises(ValueError, match="fa3_ws"):  # an option outside the scope, set by forward()
            w.forward(q, k, k, causal=True, logits_soft_cap=5.0)
        # "auto" with 11 query tiles x 2 KV heads (too few for the GPU) but at least half full (1212 of 1408 rows):
        # fa3_ws, its keys split; decode-like requests (1 query x 4 heads in each 128-row tile): fa2
        wa = W(workspace(), "NHD")
        wa.plan(qo, kv, 8, 2, 128, causal=True, q_data_type=bf)
        assert wa._plan_info.spec.backend == "fa3_ws" and wa.plan_stats["merges"] > 0
        qo1 = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
        wa.plan(qo1, kv, 8, 2, 128, causal=True, q_data_type=bf)
        assert wa._plan_info.spec.backend == "fa2"
        # "auto" with query tiles enough to fill the GPU (3 x 1000 tokens x 4 heads: 96 tiles x 2 KV heads >= 132
        # SMs): fa3_ws, unsplit; its plan on fa2 for K/V views TMA cannot read and for options outside its scope.
        qo3 = torch.tensor([0, 1000, 2000, 3000], dtype=torch.int32)
        kv3 = torch.tensor([0, 1500, 3000, 4500], dtype=torch.int32)
        wb = W(workspace(), "NHD")
        wb.plan(qo3, kv3, 8, 2, 128, causal=True, q_data_type=bf)
        assert wb._plan_info.spec.backend == "fa3_ws" and wb.plan_stats["merges"] == 0
        q3, k3 = cuda(torch.randn(3000, 8, 128).to(bf)), cuda(torch.randn(4500, 2, 128).to(bf))

        def last_spec():
            return [c for c in rec.launches("flashinfer_batch_prefill") if c[0] == "flashinfer_batch_prefill"][-1][1]

        wb.run(q3, k3, k3)
        assert last_spec()["_spec"].backend == "fa3_ws" and last_spec()["args.tile_q"] == 128
        kz3 = k3[:1].expand(4500, 2, 128)
        wb.run(q3, kz3, kz3)
        assert last_spec()["_spec"] == BatchPrefillSpec(
            128, "bf16", "bf16", "bf16", kv_storage="ragged", mask_mode="causal", backend="fa2"
        )
        assert last_spec()["args.tile_q"] == 128 and last_spec()["args.grid_x"] == wb.plan_stats["pieces"]
        wb.forward(q3, k3, k3, causal=True, logits_soft_cap=5.0)
        assert last_spec()["_spec"].backend == "fa2" and last_spec()["_spec"].use_logits_soft_cap
        wb.plan(qo3, kv3, 8, 2, 128, causal=True, q_data_type=bf, fixed_split_size=4096)
        assert wb._plan_info.spec.backend == "fa2"
        monkeypatch.setattr(prefill, "_device_capability", lambda index: (8, 0))
        with pytest.raises(ValueError, match="needs a Hopper GPU"):
            W(workspace(), "NHD", backend="fa3_ws").plan(qo, kv, 8, 2, 128, q_data_type=bf)


@pytest.mark.parametrize(
    "page_size,backend",
    [(16, "fa3_ws"), (64, "fa3_ws"), (128, "fa3_ws"), (256, "fa3_ws"), (8, "fa3_ws"), (1, "fa2"), (48, "fa2")],
)
def test_fa3_ws_paged_auto_dispatch(monkeypatch, page_size, backend):
    """On fake CUDA tensors (a fake Hopper): "auto" plans a paged batch whose query tiles fill the GPU on fa3_ws for
    the page sizes its producer copies as TMA boxes (8, 16, 64, 128, 256), on fa2 for the others (1 and 48:
    gathered row by row, slower than fa2); a batch of too few query tiles for the GPU
    takes it only when they are at least half full; fixed_split_size (batch invariance: one kernel whatever the
    batch) stays on fa2."""
    from fake_cuda import fake_cuda, workspace

    bf = torch.bfloat16
    W = flashinfer.BatchPrefillWithPagedKVCacheWrapper
    lens = [1000, 1000, 1000]
    pages = [-(-n // page_size) for n in lens]
    indptr = torch.tensor([0] + list(itertools.accumulate(pages)), dtype=torch.int32)
    indices = torch.arange(int(indptr[-1]), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(lens, pages)], dtype=torch.int32)
    qo = torch.tensor([0, 1000, 2000, 3000], dtype=torch.int32)
    with fake_cuda(monkeypatch):
        w = W(workspace(64 << 20), "NHD")
        w.plan(qo, indptr, indices, last, 8, 2, 128, page_size, causal=True, q_data_type=bf)
        assert w._plan_info.spec.backend == backend
        assert w._plan_info.spec.kv_storage == "paged"
        split = max(1, 512 // page_size)  # (pages: 512-key chunks)
        w.plan(qo, indptr, indices, last, 8, 2, 128, page_size, causal=True, q_data_type=bf, fixed_split_size=split)
        assert w._plan_info.spec.backend == "fa2"
        qo1 = torch.tensor([0, 10, 20, 30], dtype=torch.int32)  # 3 tiles x 2 KV heads, 40 of 128 rows each: fa2
        w.plan(qo1, indptr, indices, last, 8, 2, 128, page_size, causal=True, q_data_type=bf)
        assert w._plan_info.spec.backend == "fa2"
        qo2 = torch.tensor([0, 20, 40, 60], dtype=torch.int32)  # 80 of 128 rows: fa3_ws where the pages allow it
        w.plan(qo2, indptr, indices, last, 8, 2, 128, page_size, causal=True, q_data_type=bf)
        assert w._plan_info.spec.backend == backend


def test_cpu_tensors_refused_before_any_build():
    q = torch.randn(8, 4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.single_prefill_with_kv_cache(q, q, q)


def test_prefill_module_builds_without_spills(tmp_path, monkeypatch):
    """A real nvcc build of one prefill module (no launch): exports, HMMA-free check is in the GPU CI."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = SinglePrefillSpec(64, "f16", "f16", "f16", "causal", "NONE", False, False, False)
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    assert mod.fn("flashinfer_single_prefill") is not None
    log = report.log_path.read_text()
    assert "spill" in log and all("0 bytes spill stores" in ln for ln in log.splitlines() if "spill stores" in ln)


def test_batch_spec_names_and_planner():
    from flashinfer._planning import schedule_prefill

    s = BatchPrefillSpec()
    assert s.name().startswith("prefill_batch_paged_q-bf16") and BatchPrefillSpec.from_json(s.to_json()) == s
    assert "kv_storage" in BatchPrefillSpec(kv_storage="blocked").unsupported_reason()
    # Few rows, long KV: split into chunks, partial rows and merge rows laid out per request.
    tile, work, merge, part = schedule_prefill(
        [2, 0, 3], [5000, 10, 3000], 4, 2, 128, (64,), 64, lambda t: 2, 132, True, 1 << 30, 8
    )
    assert tile == 64
    assert {w[0] for w in work} == {0, 2}  # the empty request has no work
    for req, kv_len in ((0, 5000), (2, 3000)):  # each request's chunks tile its whole KV range, in order
        spans = sorted((w[2], w[3]) for w in work if w[0] == req)
        assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == kv_len
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # One merge row per query token (2 + 3), each over its request's chunks; their partial rows are distinct
    # and fill the partial-state area exactly.
    assert [m[0] for m in merge] == [0, 1, 2, 3, 4]
    assert [m[2] for m in merge] == [10, 10, 6, 6, 6] and part == 38
    rows = [m[1] + c * m[3] for m in merge for c in range(m[2])]
    assert sorted(rows) == list(range(part))
    # Many rows: no split, every item writes o directly.
    tile, work, merge, part = schedule_prefill(
        [4096] * 8, [4096] * 8, 1, 32, 128, (64,), 64, lambda t: 2, 132, True, 1 << 30, 32
    )
    assert merge == [] and part == 0 and all(w[4] == -1 for w in work)
    assert work[0][3] == 4096  # heaviest (last causal tiles) first
    # fixed_split_size: every request cut at the same key offsets whatever the batch; disable_split_kv: never cut.
    for qo, kv in (([2, 3], [5000, 3000]), ([2], [5000])):
        tile, work, merge, part = schedule_prefill(
            qo, kv, 4, 2, 128, (64,), 64, lambda t: 2, 132, True, 1 << 30, 8, fixed_chunk=1024
        )
        assert sorted((w[2], w[3]) for w in work if w[0] == 0) == [
            (0, 1024),
            (1024, 2048),
            (2048, 3072),
            (3072, 4096),
            (4096, 5000),
        ]
    tile, work, merge, part = schedule_prefill(
        [2, 0, 3], [5000, 10, 3000], 4, 2, 128, (64,), 64, lambda t: 2, 132, True, 1 << 30, 8, split_kv=False
    )
    assert merge == [] and part == 0 and sorted((w[0], w[2], w[3]) for w in work) == [(0, 0, 5000), (2, 0, 3000)]
    # request_major (fa3_ws): the same items, each request's together, the heaviest request first, within it the
    # heaviest tiles first.
    args = ([300, 0, 1000, 700], [300, 5, 4000, 700], 4, 2, 128, (128,), 128, lambda t: 1, 132, True, 1 << 30, 8)
    _, flat, _, _ = schedule_prefill(*args, split_kv=False)
    _, grouped, _, _ = schedule_prefill(*args, split_kv=False, request_major=True)
    changes = lambda ws: sum(a[0] != b[0] for a, b in zip(ws, ws[1:]))  # noqa: E731
    assert sorted(grouped) == sorted(flat) and changes(flat) > 2 and changes(grouped) == 2
    reqs = [w[0] for w in grouped]
    assert reqs == sorted(reqs, key=[2, 3, 0].index)  # request 2 (1000 x 4000) first, 0 (300 x 300) last
    for r in (0, 2, 3):  # within a request, heaviest first as over the whole batch
        assert [w for w in grouped if w[0] == r] == [w for w in flat if w[0] == r]


def test_split_kv_fills_whole_waves():
    """One long request with few query rows (a cascade's shared level: 64 decode queries x group 4): the chunks
    fill one wave of resident CTAs instead of overflowing it by a few (272 CTAs for 264 slots ran a second wave)."""
    from flashinfer._planning import schedule_prefill

    # (query rows, KV, KV heads, fewest CTAs expected: chunks stay >= 512 keys, so short KV fills less)
    for qo, kv, heads, least in (
        ([64], [32768], 8, 240),
        ([8], [131072], 8, 240),
        ([256], [32768], 8, 240),
        ([3], [20000], 2, 78),
    ):
        tile, work, merge, part = schedule_prefill(
            qo, kv, 4, heads, 128, (64, 128), 64, lambda t: 2, 132, False, 1 << 30, 4 * heads
        )
        ctas = len(work) * heads
        assert least <= ctas <= 264, (qo, kv, ctas)  # one wave
        spans = sorted((w[1], w[2], w[3]) for w in work)
        assert spans[0][1] == 0 and max(w[3] for w in work) == kv[0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_prefill_on_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    q = torch.randn(300, 8, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(800, 2, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    o = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert o.device == dev and torch.cuda.current_device() == 0
    ref, _ = attention(q, k, v, causal=True)
    assert_close(o, ref)


# ------------------------------------------------------------------------------------------ CPU: fp8 KV


def test_fp8_prefill_specs():
    """fp8 KV (e4m3/e5m2) is a dtype_kv value of both prefill families and of the fa3 kernel, with a 16-bit q = o;
    an fp8 q is unsupported with a reason; the GPU tests' fp8 specs are all supported."""
    s = SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal")
    assert s.unsupported_reason() is None and s.render_vars()["dtype_kv"] == "__nv_fp8_e4m3"
    assert (
        s.name()
        == "prefill_single_q-bf16_kv-e4m3_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa2"
    )
    assert SinglePrefillSpec.from_json(s.to_json()) == s
    assert SinglePrefillSpec(128, "f16", "e5m2", "f16", "none", backend="fa3").unsupported_reason() is None
    b = BatchPrefillSpec(64, "f16", "e5m2", "f16", kv_storage="ragged")
    assert b.unsupported_reason() is None and b.name().startswith("prefill_batch_ragged_q-f16_kv-e5m2_o-f16_d64")
    assert "q dtype e4m3" in SinglePrefillSpec(128, "e4m3", "e4m3", "bf16").unsupported_reason()
    assert "q dtype e5m2" in BatchPrefillSpec(128, "e5m2", "e5m2", "bf16").unsupported_reason()
    assert all(x.unsupported_reason() is None for x in FP8_SINGLE_SPECS) and len(set(FP8_SINGLE_SPECS)) == 22
    fa3 = [
        x for x in SinglePrefillSpec.expand(dtype_kv=("e4m3", "e5m2"), backend=("fa3",)) if not x.unsupported_reason()
    ]
    assert {(x.dtype_q, x.dtype_kv, x.mask_mode) for x in fa3} == {
        (q, kv, m) for q in ("bf16", "f16") for kv in ("e4m3", "e5m2") for m in ("none", "causal")
    }


def _fake_fp8(dtype, *shape):
    from fake_cuda import cuda

    return cuda(torch.randn(shape).to(dtype))


def test_fp8_single_prefill_validation_and_scales(monkeypatch):
    """On fake CUDA tensors: an fp8 q, mixed KV dtypes, device scale tensors and misaligned fp8 rows are refused
    before any module loads; a valid call launches the fp8 module with k_scale folded into the logit scale and
    v_scale passed to the kernel (its epilogue applies it: the output is not multiplied again), while a 16-bit
    module gets v_scale 1 and the output is multiplied after it (the fake launch leaves outputs at 1)."""
    from fake_cuda import fake_cuda

    bf, e4, e5 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    with fake_cuda(monkeypatch) as rec:
        q, k = _fake_fp8(bf, 20, 8, 128), _fake_fp8(e4, 300, 2, 128)
        f = flashinfer.single_prefill_with_kv_cache
        with pytest.raises(NotImplementedError, match="single_prefill_with_kv_cache: q torch.float8_e4m3fn with KV"):
            f(_fake_fp8(e4, 20, 8, 128), k, k)
        with pytest.raises(TypeError, match="share one dtype"):
            f(q, k, _fake_fp8(e5, 300, 2, 128))
        with pytest.raises(TypeError, match="share one dtype"):
            f(q, k, _fake_fp8(bf, 300, 2, 128))
        with pytest.raises(TypeError, match="k_scale is a tensor on cuda"):
            f(q, k, k, k_scale=_fake_fp8(torch.float32, 1))
        with pytest.raises(TypeError, match="v_scale is a tensor on cuda"):
            f(q, k, k, v_scale=_fake_fp8(torch.float32))
        with pytest.raises(TypeError, match="one-element"):
            f(q, k, k, k_scale=torch.ones(2))
        odd = _fake_fp8(e4, 300, 2, 136)[:, :, :128]  # head stride 136 bytes: 16-byte loads need 16-element strides
        with pytest.raises(ValueError, match="multiple of 16 elements"):
            f(q, odd, odd)
        with pytest.raises(NotImplementedError, match="scale_k"):
            f(q, k, k, scale_k=_fake_fp8(torch.float32, 2))
        assert rec.loaded == [] and rec.calls == []
        o = f(q, k, k, causal=True, sm_scale=0.2, k_scale=torch.tensor(0.25), v_scale=3.0, backend="fa2")
        ((_, kw),) = [c for c in rec.launches("flashinfer_single_prefill") if c[0] == "flashinfer_single_prefill"]
        assert kw["_spec"] == SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal")
        assert kw["sm_scale"] == pytest.approx(0.2 * 0.25) and kw["v_scale"] == 3.0
        assert torch.equal(o.cpu(), torch.ones(20, 8, 128, dtype=bf))
        rec.clear()
        f(q, k, k, backend="fa3", v_scale=torch.tensor([0.5]))  # (the fake GPU is a Hopper)
        ((_, kw),) = [c for c in rec.launches("flashinfer_single_prefill") if c[0] == "flashinfer_single_prefill"]
        assert kw["_spec"] == SinglePrefillSpec(128, "bf16", "e4m3", "bf16", backend="fa3") and kw["v_scale"] == 0.5
        rec.clear()
        k16 = _fake_fp8(bf, 300, 2, 128)
        o = f(q, k16, k16, v_scale=3.0, backend="fa2")
        ((_, kw),) = [c for c in rec.launches("flashinfer_single_prefill") if c[0] == "flashinfer_single_prefill"]
        assert kw["_spec"].dtype_kv == "bf16" and kw["v_scale"] == 1.0
        assert torch.equal(o.cpu(), torch.full((20, 8, 128), 3.0, dtype=bf))


@pytest.mark.parametrize("storage", ["ragged", "paged"])
def test_fp8_batch_prefill_plan_run_and_errors(storage, monkeypatch):
    """plan(kv_data_type=fp8) plans the fp8 module; run() folds q_scale and k_scale into the logit scale and hands
    v_scale to the kernel (not multiplied again after it: the fake launch leaves the output at 1); an fp8
    q, a 16-bit kv_data_type other than q's, a cache in another dtype than planned and device scales are refused
    with errors naming them."""
    from fake_cuda import cuda, fake_cuda, workspace

    bf, e4, e5 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    with fake_cuda(monkeypatch) as rec:
        qo_indptr = torch.tensor([0, 5, 9], dtype=torch.int32)
        q = _fake_fp8(bf, 9, 8, 128)
        if storage == "ragged":
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace())
            kv_indptr = torch.tensor([0, 40, 100], dtype=torch.int32)
            plan = lambda **kw: w.plan(qo_indptr, kv_indptr, 8, 2, 128, **kw)  # noqa: E731
            kv = lambda dt: (_fake_fp8(dt, 100, 2, 128), _fake_fp8(dt, 100, 2, 128))  # noqa: E731
        else:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace())
            indptr = torch.tensor([0, 3, 10], dtype=torch.int32)
            indices, last = torch.arange(10, dtype=torch.int32), torch.tensor([8, 4], dtype=torch.int32)
            plan = lambda **kw: w.plan(qo_indptr, indptr, indices, last, 8, 2, 128, 16, **kw)  # noqa: E731
            kv = lambda dt: (_fake_fp8(dt, 10, 2, 16, 2, 128),)  # noqa: E731
        name = type(w).__name__
        with pytest.raises(NotImplementedError, match=f"{name}.plan: q torch.float8_e4m3fn with KV"):
            plan(q_data_type=e4, kv_data_type=e4)
        with pytest.raises(TypeError, match="the KV dtype must be q.s .* or fp8"):
            plan(q_data_type=bf, kv_data_type=torch.float16)
        plan(q_data_type="bfloat16", kv_data_type="float8_e4m3fn", causal=True, sm_scale=0.2)
        assert w._plan_info.spec.dtype_kv == "e4m3" and w._cached_kv_data_type == e4
        assert w._cached_q_data_type == bf
        o = w.run(q, *kv(e4), q_scale=0.5, k_scale=torch.tensor([0.25]), v_scale=2.0)
        ((_, kw),) = [c for c in rec.launches("flashinfer_batch_prefill") if c[0] == "flashinfer_batch_prefill"]
        assert kw["_spec"].dtype_kv == "e4m3" and kw["_spec"].kv_storage == storage
        assert kw["args.sm_scale"] == pytest.approx(0.2 * 0.5 * 0.25) and kw["args.v_scale"] == 2.0
        assert torch.equal(o.cpu(), torch.ones(9, 8, 128, dtype=bf))
        for dt in (bf, e5):
            with pytest.raises(
                TypeError, match="planned q_data_type torch.bfloat16 and kv_data_type torch.float8_e4m3fn"
            ):
                w.run(q, *kv(dt))
        with pytest.raises(TypeError, match="k_scale is a tensor on cuda"):
            w.run(q, *kv(e4), k_scale=cuda(torch.ones(1)))
        with pytest.raises(TypeError, match="v_scale is a tensor on cuda"):
            w.run(q, *kv(e4), v_scale=cuda(torch.ones(())))


def test_fp8_tensor_core_decode_plans_the_fp8_prefill_module(monkeypatch):
    from fake_cuda import fake_cuda, workspace

    with fake_cuda(monkeypatch) as rec:
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), use_tensor_cores=True)
        indptr, last = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([5, 16], dtype=torch.int32)
        w.plan(
            indptr,
            torch.arange(3, dtype=torch.int32),
            last,
            8,
            2,
            128,
            16,
            data_type=torch.float8_e5m2,
            q_data_type=torch.float16,
        )
        assert [s.name() for s in rec.loaded if s.family == "prefill_batch"] == [
            BatchPrefillSpec(128, "f16", "e5m2", "f16", kv_storage="paged").name()
        ]
        q = _fake_fp8(torch.float16, 2, 8, 128)
        w.run(q, _fake_fp8(torch.float8_e5m2, 4, 2, 16, 2, 128), k_scale=0.5)
        ((_, kw),) = [c for c in rec.launches("flashinfer_batch_prefill") if c[0] == "flashinfer_batch_prefill"]
        assert kw["args.sm_scale"] == pytest.approx(128**-0.5 * 0.5)


def test_cascade_reads_fp8_caches_and_refuses_fp8_q():
    """The cascade wrappers take fp8 KV caches (on the batch kernels above); an fp8 q is refused naming the
    combination (tests/test_cascade.py checks the dispatch)."""
    from flashinfer.utils import FP8_KV_PATHS, plan_dtypes

    assert "cascade" in FP8_KV_PATHS
    assert plan_dtypes("bfloat16", "e4m3", "cascade") == (torch.bfloat16, torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="q torch.float8_e4m3fn with KV torch.float8_e4m3fn"):
        plan_dtypes(torch.float8_e4m3fn, None, "cascade")


# fp8 prefill kernels at their register budgets (ptxas's report in the build log): fa2 single and paged batch (the
# batch module holds the 64- and 128-row tiles) at d128 causal, where the 16-bit kernels use 249-254 registers, with
# a custom mask and with ALiBi + window + soft cap, with RoPE (the shared-memory widening path), d64 ragged (e5m2,
# f16), and fa3 without a mask (two CTAs per SM = 128 registers; its 16-bit counterpart spills 24 bytes) and causal
# (one CTA per SM). Not in this list, because they spill (ptxas, sm_90): paged batch d256, 60 bytes with fp8 (the MMA
# loops converting fragments; 36 with the previous shared-memory widening), 236 at 16 bits; the 64-row tile of the
# paged batch d64 causal module, 8 bytes (two values kept for the epilogue, stored once per work item: ptxas caps
# that kernel at 128 registers; 165 at 16 bits, no spill).
_FP8_NO_SPILL_SPECS = [
    SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal"),
    SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "custom"),
    SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "none", "ALIBI", True, True),
    SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal", "ROPE_LLAMA"),
    BatchPrefillSpec(128, "bf16", "e4m3", "bf16", kv_storage="paged", mask_mode="causal"),
    BatchPrefillSpec(64, "f16", "e5m2", "f16", kv_storage="ragged"),
    SinglePrefillSpec(128, "bf16", "e4m3", "bf16", backend="fa3"),
    SinglePrefillSpec(128, "f16", "e5m2", "f16", "causal", backend="fa3"),
]


def test_fa3_ws_kernel_keeps_to_registers(tmp_path, monkeypatch):
    """A real sm_90a build of the warp-specialised kernel: one kernel, no stack frame or spills at its setmaxnreg
    split (producer 56, consumers 224 registers); the launch register count is the 168 that the split is carved
    out of (384 threads x 168 = 128 x 56 + 256 x 224: less, and setmaxnreg.inc would wait forever). Its module
    loads, exports the single-prefill launchers and reports its tiles."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = SinglePrefillSpec(128, "bf16", "bf16", "bf16", "causal", backend="fa3_ws")
    report = jit.ensure_built(spec)
    assert_register_only(report, kernels=1)
    log = report.log_path.read_text()
    assert "Used 168 registers" in log, [ln for ln in log.splitlines() if "registers" in ln]
    assert "serialized" not in log  # ptxas's wgmma serialisation advisory: the overlap would be lost
    mod = jit.load(spec)
    assert mod.fn("flashinfer_single_prefill") is not None and mod.fn("flashinfer_single_prefill_occupancy") is not None
    assert mod.constants["query_tile"] == 128 and mod.constants["kv_tile"] == 128
    # The machine code has the pipeline's parts (where a cuobjdump is at hand: the toolkit's or triton's bundle):
    # the register split, TMA loads, and a wait that leaves one wgmma group in flight (S(n) done, P V(n-1) not).
    sass = sass_of(next(Path(report.entry_dir).glob("*.so")))
    if sass is not None:
        for part in ("USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC", "UTMALDG.3D", "WARPGROUP.DEPBAR.LE gsb0, 0x1"):
            assert part in sass, part


@pytest.mark.parametrize("storage", ["ragged", "paged"])
def test_fa3_ws_batch_kernel_keeps_to_registers(storage, tmp_path, monkeypatch):
    """A real sm_90a build of the ragged and of the paged batch module of the warp-specialised kernel: two kernels
    (its own and the merge of split requests' partial states), no stack frame or spills at the producer's 56 registers with the work item
    read from the plan and handed over in shared memory (paged: and each thread's page lookups and row gather),
    launched at 168; it loads, exports the batch launchers and the planner's constants (one 128-row query tile,
    128-key KV tiles), and its argument struct matches BATCH_PREFILL_ARGS. Ragged K/V comes by 3-D TMA boxes, paged
    K/V by 4-D boxes of whole pages (pages of a multiple of 8 slots) and by cp.async (LDGSTS: other page sizes, and
    the tiles that hold a partial last page's slots)."""
    from flashinfer import jit
    from flashinfer.prefill import _args_type

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = BatchPrefillSpec(128, "bf16", "bf16", "bf16", kv_storage=storage, mask_mode="causal", backend="fa3_ws")
    report = jit.ensure_built(spec)
    assert_register_only(report, kernels=2)
    log = report.log_path.read_text()
    assert "Used 168 registers" in log, [ln for ln in log.splitlines() if "registers" in ln]
    assert "serialized" not in log
    mod = jit.load(spec)
    assert mod.fn("flashinfer_batch_prefill") is not None and mod.fn("flashinfer_batch_prefill_occupancy") is not None
    c = mod.constants
    assert (c["query_tiles"], c["query_tile_0"], c["kv_tile"], c["work_fields"]) == (1, 128, 128, 5)
    assert _args_type(mod) is not None  # (raises when the layout differs)
    sass = sass_of(next(Path(report.entry_dir).glob("*.so")))
    if sass is not None:
        for part in ("USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "LDGSTS"):
            assert part in sass, part
        assert ("UTMALDG.3D" in sass) == (storage == "ragged")
        assert ("UTMALDG.4D" in sass) == (storage == "paged")


@pytest.mark.parametrize(
    "spec",
    [
        SinglePrefillSpec(128, "bf16", "e4m3", "bf16", "causal", backend="fa3_ws"),
        SinglePrefillSpec(128, "f16", "e5m2", "f16", backend="fa3_ws"),
    ],
    ids=lambda s: s.name(),
)
def test_fa3_ws_fp8_kernel_keeps_to_registers(spec, tmp_path, monkeypatch):
    """A real sm_90a build of the fp8 warp-specialised kernel: one kernel, no stack frame or spills at its fp8
    setmaxnreg split (the producer holds a whole staged fp8 tile in its 72 registers, the consumers keep to 216), no
    wgmma serialisation; in its machine code the staged tile read with 16-byte loads, e4m3 pairs widened by the
    hardware conversion and e5m2 by byte permutes (no conversion instruction), float16 wgmmas only (a bfloat16 q is
    rounded to float16), TMA loads."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    report = jit.ensure_built(spec)
    assert_register_only(report, kernels=1)
    log = report.log_path.read_text()
    assert "Used 168 registers" in log, [ln for ln in log.splitlines() if "registers" in ln]
    assert "serialized" not in log
    mod = jit.load(spec)
    assert mod.fn("flashinfer_single_prefill") is not None
    assert mod.constants["query_tile"] == 128 and mod.constants["kv_tile"] == 128
    sass = sass_of(next(Path(report.entry_dir).glob("*.so")))
    if sass is not None:
        unpack = "F2FP.F16.E4M3.UNPACK_B" if spec.dtype_kv == "e4m3" else "PRMT"
        for part in ("USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC", "UTMALDG.3D", unpack, "HGMMA.64x128x16.F32"):
            assert part in sass, part
        assert "LDS.128" in sass and "LDS.64" not in sass  # (16-byte loads of the staged tile)
        assert "HGMMA.64x128x16.F32.BF16" not in sass and "F2FP.F16.E5M2.UNPACK_B" not in sass


@pytest.mark.parametrize("spec", _FP8_NO_SPILL_SPECS, ids=lambda s: s.name())
def test_fp8_prefill_kernels_keep_to_registers(spec, tmp_path, monkeypatch):
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    assert_register_only(jit.ensure_built(spec))

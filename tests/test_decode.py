"""single_decode_with_kv_cache: the spec matrix against a float64 reference, GQA groups, views, streams,
devices, bad input; fp8 (e4m3/e5m2) KV caches with their scales; and on the CPU, spec naming, validation of
fp8 inputs (fake CUDA tensors) and real JIT builds of decode modules (no register spills)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

import flashinfer
from _jit_checks import assert_register_only, sass_functions, sass_of
from flashinfer.decode import SingleDecodeSpec
from reference import LSE_TOL, TOLERANCES, assert_close, attention, poisoned

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# The supported matrix with a 16-bit KV cache (KV = q's dtype) ...
SUPPORTED = [s for s in SingleDecodeSpec.expand(dtype_kv=("bf16", "f16")) if s.unsupported_reason() is None]
# ... and the fp8 KV specs the GPU tests load (tests/prewarm_test.toml lists them): e4m3 with bf16 q and e5m2 with
# f16 q at every head_dim and layout (each spec compiles every query-head tile: tensor cores at d64/d128, CUDA cores
# at d256); the crossed pairs; RoPE (CUDA cores at every tile), ALiBi with window and soft cap.
FP8_SPECS = [
    SingleDecodeSpec(d, dq, dkv, dq, layout, "NONE", False, False)
    for dq, dkv in (("bf16", "e4m3"), ("f16", "e5m2"))
    for d in (64, 128, 256)
    for layout in ("NHD", "HND")
] + [
    SingleDecodeSpec(128, "f16", "e4m3", "f16", "NHD", "NONE", False, False),
    SingleDecodeSpec(128, "bf16", "e5m2", "bf16", "NHD", "NONE", False, False),
    SingleDecodeSpec(128, "bf16", "e4m3", "bf16", "NHD", "ROPE_LLAMA", False, False),
    SingleDecodeSpec(128, "bf16", "e4m3", "bf16", "NHD", "ALIBI", True, True),
]


def _inputs(kv_len, num_qo_heads, num_kv_heads, head_dim, dtype, layout, scale=1.0):
    q = torch.randn(num_qo_heads, head_dim, device="cuda", dtype=dtype) * scale
    k_nhd = torch.randn(kv_len, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v_nhd = torch.randn(kv_len, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    if layout == "NHD":
        return q, k_nhd, v_nhd, k_nhd, v_nhd
    return q, k_nhd.transpose(0, 1).contiguous(), v_nhd.transpose(0, 1).contiguous(), k_nhd, v_nhd


def _check(q, k, v, k_nhd, v_nhd, layout, **kw):
    num_qo_heads, head_dim = q.shape
    out = poisoned((num_qo_heads, head_dim), q.dtype)
    lse = poisoned((num_qo_heads,), torch.float32)
    o, l = flashinfer.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True, out=out, lse=lse, **kw)
    assert o is out and l is lse
    ref_kw = {n: kw[n] for n in ("pos_encoding_mode", "window_left", "sm_scale", "rope_scale", "rope_theta") if n in kw}
    ref_o, ref_lse = attention(
        q[None],
        k_nhd,
        v_nhd,
        logits_soft_cap=kw.get("logits_soft_cap") or 0.0,
        v_scale=kw.get("v_scale") or 1.0,
        **ref_kw,
    )
    assert_close(o, ref_o[0], what="o")
    assert not torch.isnan(l).any(), "lse: NaN (unwritten)"
    torch.testing.assert_close(l.double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kv_len", [1, 7, 127, 1024, 33001])
@pytest.mark.parametrize("spec", SUPPORTED, ids=lambda s: s.name())
def test_decode_matrix(spec: SingleDecodeSpec, kv_len: int):
    dtype = DTYPES[spec.dtype_q]
    q, k, v, k_nhd, v_nhd = _inputs(kv_len, 8, 2, spec.head_dim, dtype, spec.kv_layout, scale=2.0)
    kw = {"pos_encoding_mode": spec.pos_encoding_mode}
    if spec.use_window:
        kw["window_left"] = kv_len // 3
    if spec.use_logits_soft_cap:
        kw["logits_soft_cap"] = 1.5
    if spec.pos_encoding_mode == "ROPE_LLAMA":
        kw.update(rope_scale=2.0, rope_theta=5e5) if kv_len == 1024 else None
    _check(q, k, v, k_nhd, v_nhd, spec.kv_layout, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_kv_heads,group", [(1, 1), (32, 1), (8, 2), (4, 3), (8, 4), (2, 5), (4, 7), (8, 8), (2, 16), (1, 32), (3, 12)]
)
@pytest.mark.parametrize("kv_len", [127, 33001])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_gqa_groups(num_kv_heads, group, kv_len, layout):
    q, k, v, k_nhd, v_nhd = _inputs(kv_len, num_kv_heads * group, num_kv_heads, 128, torch.bfloat16, layout)
    _check(q, k, v, k_nhd, v_nhd, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("pos", ["NONE", "ROPE_LLAMA", "ALIBI"])
def test_decode_scales_and_defaults(pos):
    q, k, v, k_nhd, v_nhd = _inputs(5000, 16, 4, 64, torch.float16, "NHD")
    sm = 0.07
    out = flashinfer.single_decode_with_kv_cache(
        q, k, v, pos_encoding_mode=pos, sm_scale=sm, q_scale=0.5, k_scale=1.5, v_scale=0.25
    )
    ref, _ = attention(q[None], k_nhd, v_nhd, sm_scale=sm * 0.75, pos_encoding_mode=pos, v_scale=0.25)
    assert_close(out, ref[0])
    # Defaults: sm_scale 1/sqrt(d), no lse; the tensor-core route (the prefill kernel) agrees up to rounding.
    o1 = flashinfer.single_decode_with_kv_cache(q, k, v, pos_encoding_mode=pos)
    o2 = flashinfer.single_decode_with_kv_cache(q, k, v, pos_encoding_mode=pos, use_tensor_cores=True)
    ref, _ = attention(q[None], k_nhd, v_nhd, pos_encoding_mode=pos)
    assert_close(o1, ref[0])
    _assert_close_tc(o2, ref[0], pos)


@pytest.mark.gpu
@pytest.mark.parametrize("window_left", [0, 1, 255, 256, 4095, 10**6])
def test_decode_window_edges(window_left):
    q, k, v, k_nhd, v_nhd = _inputs(4096, 8, 8, 128, torch.bfloat16, "NHD")
    _check(q, k, v, k_nhd, v_nhd, "NHD", window_left=window_left)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("kv_len", [100, 20000])
def test_decode_strided_views(layout, kv_len):
    d = 128
    q_big = torch.randn(32, 3 * d, device="cuda", dtype=torch.float16)
    q = q_big[:, d : 2 * d]  # rows 768 elements apart
    k_big = torch.randn(kv_len, 4, 2 * d, device="cuda", dtype=torch.float16)
    v_big = torch.randn(kv_len, 4, 2 * d, device="cuda", dtype=torch.float16)
    k_nhd, v_nhd = k_big[:, :, :d], v_big[:, :, d:]
    if layout == "NHD":
        k, v = k_nhd, v_nhd
    else:  # HND views of NHD storage: token stride < head stride swapped
        k, v = k_nhd.transpose(0, 1), v_nhd.transpose(0, 1)
    assert not k.is_contiguous() and not q.is_contiguous()
    _check(q, k, v, k_nhd, v_nhd, layout)
    # q strided in its last dim is copied, not refused
    q_t = torch.randn(d, 32, device="cuda", dtype=torch.float16).t()
    _check(q_t, k, v, k_nhd, v_nhd, layout)


@pytest.mark.gpu
def test_decode_runs_on_current_stream_of_tensor_device():
    q, k_src, v_src, k_nhd, v_nhd = _inputs(33001, 32, 8, 128, torch.bfloat16, "NHD")
    k = torch.full_like(k_src, float("nan"))
    v = torch.full_like(v_src, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keeps the side stream busy: a launch on another stream would read NaN
        k.copy_(k_src)
        v.copy_(v_src)
        o = flashinfer.single_decode_with_kv_cache(q, k, v)
    side.synchronize()
    ref, _ = attention(q[None], k_nhd, v_nhd)
    assert_close(o, ref[0])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_decode_on_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    q = torch.randn(32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(9000, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(9000, 8, 128, device=dev, dtype=torch.bfloat16)
    o = flashinfer.single_decode_with_kv_cache(q, k, v)
    assert o.device == dev
    ref, _ = attention(q[None], k, v)
    assert_close(o, ref[0])
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_decode_torch_compile_traces_the_custom_op():
    q, k, v, k_nhd, v_nhd = _inputs(3000, 16, 4, 128, torch.bfloat16, "NHD")

    def f(q, k, v):
        o, lse = flashinfer.single_decode_with_kv_cache(q, k, v, return_lse=True)
        return o * 2, lse

    o, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    ref, ref_lse = attention(q[None], k_nhd, v_nhd)
    assert_close(o, 2 * ref[0])
    torch.testing.assert_close(lse.double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


# ------------------------------------------------------------------------------------ GPU: fp8 KV caches


def _fp8_inputs(kv_len, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, layout, k_scale, v_scale):
    """q, and K/V stored in fp8 as an engine stores them (random values / scale, rounded to ``kv_dtype``), in
    ``layout``; with the reference's K/V: those same fp8 values dequantised (``.double() * scale``, NHD), so that
    quantisation error is never mistaken for kernel error."""
    q = torch.randn(num_qo_heads, head_dim, device="cuda", dtype=q_dtype) * 2.0
    k8 = (torch.randn(kv_len, num_kv_heads, head_dim, device="cuda") / k_scale).to(kv_dtype)
    v8 = (torch.randn(kv_len, num_kv_heads, head_dim, device="cuda") / v_scale).to(kv_dtype)
    k_ref, v_ref = k8.double() * k_scale, v8.double() * v_scale
    if layout == "HND":
        k8, v8 = k8.transpose(0, 1).contiguous(), v8.transpose(0, 1).contiguous()
    return q, k8, v8, k_ref, v_ref


def _decode_into_poisoned(q, k, v, **kw):
    """single_decode_with_kv_cache(return_lse=True) into NaN-poisoned out/lse, which it must return (unwritten
    elements then fail the comparison)."""
    num_qo_heads, head_dim = q.shape
    out = poisoned((num_qo_heads, head_dim), q.dtype)
    lse = poisoned((num_qo_heads,), torch.float32)
    o, l = flashinfer.single_decode_with_kv_cache(q, k, v, return_lse=True, out=out, lse=lse, **kw)
    assert o is out and l is lse
    return o, l


def _check_fp8(q, k, v, k_ref, v_ref, layout, k_scale, v_scale, q_scale=None, **kw):
    """One call with NaN-poisoned outputs against the float64 reference on the dequantised K/V (k_ref, v_ref hold
    the scales). What separates them is what the 16-bit path leaves too: the output's rounding to q's dtype and
    float32 accumulation (reference.py's dtype tolerances); the fp8 values convert to float16 exactly, and the
    tensor-core tiles (every head tile at d64/d128 without RoPE) round the probabilities to float16 (2^-11
    relative, inside those tolerances) and a bfloat16 q to float16 (exact in its normal range)."""
    head_dim = q.shape[1]
    o, l = _decode_into_poisoned(q, k, v, kv_layout=layout, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, **kw)
    sm = (kw.get("sm_scale") or head_dim**-0.5) * float(q_scale if q_scale is not None else 1.0)
    ref_kw = {n: kw[n] for n in ("pos_encoding_mode", "window_left", "rope_scale", "rope_theta") if n in kw}
    ref_o, ref_lse = attention(
        q[None], k_ref, v_ref, sm_scale=sm, logits_soft_cap=kw.get("logits_soft_cap") or 0.0, **ref_kw
    )
    assert_close(o, ref_o[0], what="o")
    assert not torch.isnan(l).any(), "lse: NaN (unwritten)"
    torch.testing.assert_close(l.double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
@pytest.mark.parametrize("spec", FP8_SPECS, ids=lambda s: s.name())
def test_decode_fp8_matrix(spec: SingleDecodeSpec):
    """Both fp8 formats, head dims 64/128/256, NHD and HND, GQA groups 1, 2, 4, 8 and 5 (a partial tile of 4),
    one key, a key count that ends mid-tile, and one long enough to split over the GPU; scales != 1."""
    q_dtype, kv_dtype = DTYPES[spec.dtype_q], FP8[spec.dtype_kv]
    for i, (num_kv_heads, group) in enumerate([(4, 1), (2, 2), (2, 4), (1, 8), (2, 5)]):
        for kv_len in (1, 127, 33001):
            k_scale, v_scale = (0.5, 1.75) if i % 2 else (1.25, 0.375)
            q, k, v, k_ref, v_ref = _fp8_inputs(
                kv_len,
                num_kv_heads * group,
                num_kv_heads,
                spec.head_dim,
                q_dtype,
                kv_dtype,
                spec.kv_layout,
                k_scale,
                v_scale,
            )
            kw = {"pos_encoding_mode": spec.pos_encoding_mode}
            if spec.use_window:
                kw["window_left"] = kv_len // 3
            if spec.use_logits_soft_cap:
                kw["logits_soft_cap"] = 1.5
            if spec.pos_encoding_mode == "ROPE_LLAMA" and kv_len == 127:
                kw.update(rope_scale=2.0, rope_theta=5e5)
            _check_fp8(q, k, v, k_ref, v_ref, spec.kv_layout, k_scale, v_scale, **kw)


@pytest.mark.gpu
def test_decode_fp8_scales_as_cpu_tensors_with_q_scale_and_sm_scale():
    """k_scale/v_scale as 0-d and one-element CPU tensors (no device sync) and as floats, with q_scale and sm_scale:
    all fold into the logit scale (k_scale) or the output (v_scale), as FlashInfer applies them."""
    q, k, v, k_ref, v_ref = _fp8_inputs(5000, 32, 8, 128, torch.bfloat16, torch.float8_e4m3fn, "NHD", 0.3, 2.5)
    for k_scale, v_scale in (
        (torch.tensor(0.3), torch.tensor([2.5])),
        (torch.tensor([0.3], dtype=torch.float64), 2.5),
        (0.3, torch.tensor(2.5, dtype=torch.float16)),
    ):
        _check_fp8(q, k, v, k_ref, v_ref, "NHD", k_scale, v_scale, q_scale=0.5, sm_scale=0.1)


@pytest.mark.gpu
def test_decode_fp8_bad_input_raises_clear_errors():
    for what, args, kw, exc, match in _fp8_bad_cases(lambda *s, dt: torch.randn(s, device="cuda").to(dt)):
        with pytest.raises(exc, match=match):
            flashinfer.single_decode_with_kv_cache(*args, **kw)
    torch.cuda.synchronize()  # nothing illegal was launched


def _fp8_bad_cases(make):
    """(what, args, kwargs, exception, message) of fp8 inputs that must be refused; make(*shape, dt=dtype) makes a
    device tensor of random values in that dtype."""
    bf, e4, e5 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
    q, k = make(8, 128, dt=bf), make(10, 2, 128, dt=e4)
    yield "fp8 q", (make(8, 128, dt=e4), k, k), {}, NotImplementedError, "q torch.float8_e4m3fn with KV"
    yield "mixed fp8 formats", (q, k, make(10, 2, 128, dt=e5)), {}, TypeError, "share one dtype"
    yield "fp8 k, 16-bit v", (q, k, make(10, 2, 128, dt=bf)), {}, TypeError, "share one dtype"
    yield "float32 q", (make(8, 128, dt=torch.float32), k, k), {}, TypeError, "float16"
    yield "device k_scale", (q, k, k), {"k_scale": make(1, dt=torch.float32)}, TypeError, "k_scale is a tensor on cuda"
    yield "device v_scale", (q, k, k), {"v_scale": make(dt=torch.float32)}, TypeError, "v_scale is a tensor on cuda"
    yield "two-element scale", (q, k, k), {"k_scale": torch.ones(2)}, TypeError, "one-element"
    odd = make(10, 2, 136, dt=e4)[
        :, :, :128
    ]  # head stride 136 bytes: 16-byte loads of fp8 rows need 16-element strides
    yield "fp8 row stride", (q, odd, odd), {}, ValueError, "multiple of 16 elements"


# ------------------------------------------------------------------- GPU: use_tensor_cores=True (prefill kernel)


def _assert_close_tc(o, ref, pos, what="o"):
    """The prefill kernel rounds RoPE-rotated q/k back to 16 bits in shared memory (as FlashInfer does): one more
    input rounding than the float64 reference, so twice the dtype tolerance there."""
    if pos != "ROPE_LLAMA":
        return assert_close(o, ref, what=what)
    atol, rtol = TOLERANCES[o.dtype]
    assert not torch.isnan(o).any(), f"{what}: NaN"
    torch.testing.assert_close(o.double(), ref.double(), atol=2 * atol, rtol=2 * rtol)


def _check_tc(q, k, v, k_nhd, v_nhd, layout, pos="NONE", q_scale=None, k_scale=None, v_scale=None, **kw):
    head_dim = q.shape[1]
    o, l = _decode_into_poisoned(
        q,
        k,
        v,
        kv_layout=layout,
        pos_encoding_mode=pos,
        use_tensor_cores=True,
        q_scale=q_scale,
        k_scale=k_scale,
        v_scale=v_scale,
        **kw,
    )
    sm = kw.get("sm_scale") or 1.0 / head_dim**0.5
    sm *= (q_scale or 1.0) * (k_scale or 1.0)
    ref_kw = {n: kw[n] for n in ("window_left", "rope_scale", "rope_theta") if n in kw}
    ref_o, ref_lse = attention(
        q[None],
        k_nhd,
        v_nhd,
        sm_scale=sm,
        pos_encoding_mode=pos,
        logits_soft_cap=kw.get("logits_soft_cap") or 0.0,
        v_scale=v_scale or 1.0,
        **ref_kw,
    )
    _assert_close_tc(o, ref_o[0], pos)
    assert not torch.isnan(l).any(), "lse: NaN (unwritten)"
    tol = TOLERANCES[q.dtype] if pos == "ROPE_LLAMA" else LSE_TOL
    torch.testing.assert_close(l.double(), ref_lse[0], atol=tol[0], rtol=tol[1])
    # Without out/lse and without return_lse: fresh tensors, the same values.
    o2 = flashinfer.single_decode_with_kv_cache(
        q,
        k,
        v,
        kv_layout=layout,
        pos_encoding_mode=pos,
        use_tensor_cores=True,
        q_scale=q_scale,
        k_scale=k_scale,
        v_scale=v_scale,
        **kw,
    )
    assert o2.shape == o.shape and o2.dtype == o.dtype
    torch.testing.assert_close(o2, o, atol=0, rtol=0)


# prefill_single specs these need: window/soft cap off at every head_dim/dtype/pos (and d128 bf16 with both):
# all inside `--preset test` (SINGLE_SPECS of test_prefill.py).
@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,head_dim",
    [(torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 256)],
    ids=["bf16-d128", "f16-d64", "bf16-d256"],
)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("pos", ["NONE", "ROPE_LLAMA", "ALIBI"])
def test_decode_tensor_cores_matrix(dtype, head_dim, layout, pos):
    for num_kv_heads, group, kv_len in ((4, 1, 1), (2, 4, 127), (1, 8, 5000), (2, 8, 33001)):
        q, k, v, k_nhd, v_nhd = _inputs(kv_len, num_kv_heads * group, num_kv_heads, head_dim, dtype, layout, scale=2.0)
        kw = {"rope_scale": 2.0, "rope_theta": 5e5} if pos == "ROPE_LLAMA" and kv_len == 5000 else {}
        _check_tc(q, k, v, k_nhd, v_nhd, layout, pos, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("window_left,soft_cap", [(0, None), (300, None), (-1, 1.5), (1000, 30.0)])
def test_decode_tensor_cores_window_and_soft_cap(layout, window_left, soft_cap):
    for pos, group, kv_len in (("NONE", 4, 4096), ("ALIBI", 8, 777), ("ROPE_LLAMA", 1, 20000)):
        q, k, v, k_nhd, v_nhd = _inputs(kv_len, 2 * group, 2, 128, torch.bfloat16, layout, scale=2.0)
        _check_tc(q, k, v, k_nhd, v_nhd, layout, pos, window_left=window_left, logits_soft_cap=soft_cap)


@pytest.mark.gpu
def test_decode_tensor_cores_scales_and_views():
    q, k, v, k_nhd, v_nhd = _inputs(3000, 16, 4, 128, torch.float16, "NHD")
    _check_tc(q, k, v, k_nhd, v_nhd, "NHD", q_scale=0.5, k_scale=1.5, v_scale=0.25, sm_scale=0.07)
    # strided q (rows 384 elements apart, and rows at an odd offset: copied, not refused), strided k/v views
    q_big = torch.randn(16, 3 * 128, device="cuda", dtype=torch.float16)
    k_big = torch.randn(3000, 4, 256, device="cuda", dtype=torch.float16)
    k_view, v_view = k_big[:, :, :128], k_big[:, :, 128:]
    _check_tc(q_big[:, 128:256], k_view, v_view, k_view, v_view, "NHD", v_scale=2.0)
    _check_tc(
        q_big.view(-1)[4 : 4 + 16 * 128].view(16, 128),
        k_view.transpose(0, 1),
        v_view.transpose(0, 1),
        k_view,
        v_view,
        "HND",
    )


@pytest.mark.gpu
def test_decode_tensor_cores_torch_compile():
    q, k, v, k_nhd, v_nhd = _inputs(3000, 16, 4, 128, torch.bfloat16, "HND")

    def f(q, k, v):
        o, lse = flashinfer.single_decode_with_kv_cache(
            q, k, v, kv_layout="HND", use_tensor_cores=True, v_scale=0.5, return_lse=True
        )
        return o * 2, lse

    o, lse = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    ref, ref_lse = attention(q[None], k_nhd, v_nhd)
    assert_close(o, ref[0])
    torch.testing.assert_close(lse.double(), ref_lse[0], atol=LSE_TOL[0], rtol=LSE_TOL[1])


@pytest.mark.gpu
def test_decode_tensor_cores_bad_input_raises_the_same_errors():
    for what, args, kw, exc, match in _bad_cases():
        with pytest.raises(exc, match=match):
            flashinfer.single_decode_with_kv_cache(*args, use_tensor_cores=True, **kw)
    torch.cuda.synchronize()


def _bad_cases():
    c = "cuda"
    bf = torch.bfloat16
    q = lambda *s, dt=bf, dev=c: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    yield (
        "cpu tensors",
        (q(8, 128, dev="cpu"), q(10, 2, 128, dev="cpu"), q(10, 2, 128, dev="cpu")),
        {},
        ValueError,
        "CUDA",
    )
    yield "q on cpu", (q(8, 128, dev="cpu"), q(10, 2, 128), q(10, 2, 128)), {}, ValueError, "CUDA"
    yield "mixed dtypes", (q(8, 128, dt=torch.float16), q(10, 2, 128), q(10, 2, 128)), {}, TypeError, "dtype"
    yield (
        "float32",
        (q(8, 128, dt=torch.float32), q(10, 2, 128, dt=torch.float32), q(10, 2, 128, dt=torch.float32)),
        {},
        TypeError,
        "float16",
    )
    yield "head_dim 96", (q(8, 96), q(10, 2, 96), q(10, 2, 96)), {}, ValueError, "head_dim 96"
    yield "q rank", (q(1, 8, 128), q(10, 2, 128), q(10, 2, 128)), {}, ValueError, "2 dimensions"
    yield "k rank", (q(8, 128), q(10, 256), q(10, 256)), {}, ValueError, "3 dimensions"
    yield "k/v shapes", (q(8, 128), q(10, 2, 128), q(11, 2, 128)), {}, ValueError, "same shape"
    yield "kv head_dim", (q(8, 128), q(10, 2, 64), q(10, 2, 64)), {}, ValueError, "head_dim"
    yield "groups", (q(6, 128), q(10, 4, 128), q(10, 4, 128)), {}, ValueError, "multiple"
    yield "kv_len 0", (q(8, 128), q(0, 2, 128), q(0, 2, 128)), {}, ValueError, "kv_len is 0"
    yield "layout", (q(8, 128), q(10, 2, 128), q(10, 2, 128)), {"kv_layout": "NDH"}, ValueError, "kv_layout"
    yield (
        "pos mode",
        (q(8, 128), q(10, 2, 128), q(10, 2, 128)),
        {"pos_encoding_mode": "ROPE"},
        ValueError,
        "pos_encoding_mode",
    )
    yield "window", (q(8, 128), q(10, 2, 128), q(10, 2, 128)), {"window_left": -2}, ValueError, "window_left"
    yield (
        "soft cap",
        (q(8, 128), q(10, 2, 128), q(10, 2, 128)),
        {"logits_soft_cap": -1.0},
        ValueError,
        "logits_soft_cap",
    )
    yield (
        "cuda scale",
        (q(8, 128), q(10, 2, 128), q(10, 2, 128)),
        {"k_scale": torch.ones(1, device=c)},
        TypeError,
        "k_scale",
    )
    unaligned = q(10, 2, 136)[:, :, 4:132]
    yield "unaligned k", (q(8, 128), unaligned, unaligned), {}, ValueError, "16-byte"
    odd_stride = q(10, 2, 129)[:, :, :128]
    yield "odd stride", (q(8, 128), odd_stride, odd_stride), {}, ValueError, "multiple of 8"
    col = q(128, 2, 10).permute(2, 1, 0)
    yield "last dim strided", (q(8, 128), col, col), {}, ValueError, "last dimension"
    yield "bad out", (q(8, 128), q(10, 2, 128), q(10, 2, 128)), {"out": q(8, 64)}, ValueError, "out must be"
    if torch.cuda.device_count() > 1:
        yield "two devices", (q(8, 128), q(10, 2, 128, dev="cuda:1"), q(10, 2, 128)), {}, ValueError, "one device"


@pytest.mark.gpu
def test_decode_bad_input_raises_clear_errors():
    for what, args, kw, exc, match in _bad_cases():
        with pytest.raises(exc, match=match):
            flashinfer.single_decode_with_kv_cache(*args, **kw)
    torch.cuda.synchronize()  # nothing illegal was launched


# ----------------------------------------------------------------------------------------------- CPU


def test_spec_names_are_complete_and_unique():
    specs = SingleDecodeSpec.expand()
    names = {s.name() for s in specs}
    # head_dim x q x kv (bf16, f16, e4m3, e5m2) x o x layout x pos x window x soft cap
    assert len(names) == len(specs) == 3 * 2 * 4 * 2 * 2 * 3 * 2 * 2
    s = SingleDecodeSpec(128, "bf16", "bf16", "bf16", "NHD", "NONE", False, False)
    assert s.name() == "decode_single_q-bf16_kv-bf16_o-bf16_d128_nhd_pos-none_window-off_softcap-off"
    assert SingleDecodeSpec.from_json(s.to_json()) == s


def test_supported_matrix_excludes_mixed_dtypes():
    assert len(SUPPORTED) == 3 * 2 * 2 * 3 * 2 * 2
    bad = SingleDecodeSpec(128, "bf16", "f16", "bf16")
    assert "kv dtype" in bad.unsupported_reason()


def test_fp8_is_a_value_of_the_kv_dtype_axis():
    """fp8 KV caches are the dtype_kv values e4m3/e5m2 (with a 16-bit q = o), named in the spec (its cache key);
    an fp8 q, or an fp8 KV in a family that does not read it, is unsupported with a reason."""
    fp8 = [s for s in SingleDecodeSpec.expand(dtype_kv=("e4m3", "e5m2")) if s.unsupported_reason() is None]
    assert len(fp8) == 3 * 2 * 2 * 2 * 3 * 2 * 2 and all(s.dtype_q == s.dtype_o for s in fp8)
    s = SingleDecodeSpec(128, "bf16", "e4m3", "bf16", "HND", "NONE", False, False)
    assert s.name() == "decode_single_q-bf16_kv-e4m3_o-bf16_d128_hnd_pos-none_window-off_softcap-off"
    assert SingleDecodeSpec.from_json(s.to_json()) == s and s.render_vars()["dtype_kv"] == "__nv_fp8_e4m3"
    assert SingleDecodeSpec(64, "f16", "e5m2", "f16").render_vars()["dtype_kv"] == "__nv_fp8_e5m2"
    assert "q dtype e4m3" in SingleDecodeSpec(128, "e4m3", "e4m3", "bf16").unsupported_reason()
    assert "output dtype" in SingleDecodeSpec(128, "bf16", "e4m3", "f16").unsupported_reason()
    assert {s.name() for s in FP8_SPECS} <= {s.name() for s in fp8} and len(set(FP8_SPECS)) == len(FP8_SPECS)
    from flashinfer.prefill import SinglePrefillSpec

    assert SinglePrefillSpec(128, "bf16", "e4m3", "bf16").unsupported_reason() is None  # (prefill reads fp8 too)


def test_fp8_inputs_are_validated_before_any_launch(monkeypatch):
    """The fp8 errors (fp8 q, mixed KV dtypes, device scales, strides) on fake CUDA tensors: raised
    in Python before any module is loaded."""
    from fake_cuda import cuda, fake_cuda

    with fake_cuda(monkeypatch) as rec:
        for what, args, kw, exc, match in _fp8_bad_cases(lambda *s, dt: cuda(torch.randn(s).to(dt))):
            with pytest.raises(exc, match=match):
                flashinfer.single_decode_with_kv_cache(*args, **kw)
        assert rec.loaded == [] and rec.calls == []
        # fp8 KV is refused by the paths that do not read it, naming those that do
        k = cuda(torch.randn(8, 2, 16, 2, 128).to(torch.float8_e4m3fn))
        with pytest.raises(TypeError, match="fp8 KV caches are read by single_decode_with_kv_cache"):
            flashinfer.page.unpack_paged_kv_cache(k, "NHD")
        assert rec.loaded == []


def test_fp8_launch_folds_k_scale_into_the_logit_scale_and_v_scale_into_the_output(monkeypatch):
    """FlashInfer's scales: sm_scale * q_scale * k_scale reaches the kernel as its logit scale, v_scale as its
    output scale (applied in the kernel); 0-d / one-element CPU tensors are read without a device sync."""
    from fake_cuda import cuda, fake_cuda

    with fake_cuda(monkeypatch) as rec:
        q = cuda(torch.randn(16, 128).to(torch.float16))
        k = cuda(torch.randn(300, 4, 128).to(torch.float8_e5m2))
        flashinfer.single_decode_with_kv_cache(
            q, k, k, kv_layout="NHD", q_scale=0.5, k_scale=torch.tensor(0.25), v_scale=torch.tensor([3.0]), sm_scale=0.2
        )
        ((_, kw),) = rec.launches("flashinfer_single_decode")
        assert kw["_spec"] == SingleDecodeSpec(128, "f16", "e5m2", "f16", "NHD", "NONE", False, False)
        assert kw["sm_scale"] == pytest.approx(0.2 * 0.5 * 0.25) and kw["v_scale"] == pytest.approx(3.0)


def test_cpu_tensors_are_refused_before_any_build():
    q = torch.randn(8, 128, dtype=torch.bfloat16)
    k = torch.randn(10, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.single_decode_with_kv_cache(q, k, k)
    with pytest.raises(TypeError, match="torch.Tensor"):
        flashinfer.single_decode_with_kv_cache([1.0], k, k)


def test_decode_module_builds_and_exports_its_launcher(tmp_path, monkeypatch):
    """A real nvcc build of one decode module (no launch: this machine may have no GPU)."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = SingleDecodeSpec(64, "f16", "f16", "f16", "HND", "ROPE_LLAMA", True, True)
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    assert mod.key == report.key and mod.path.exists()
    assert mod.fn("flashinfer_single_decode") is not None
    assert "invalid argument" in mod.error_string(1)
    log = report.log_path.read_text() if report.log_path and report.log_path.exists() else ""
    assert "spill" not in log or "0 bytes spill stores" in log
    # Modules must not share state through GNU "unique" symbols (function-local statics of inline
    # functions): one module's cached per-device setup would then be skipped by another module.
    nm = shutil.which("nm")
    if nm:
        dyn = subprocess.run([nm, "-D", "--defined-only", str(mod.path)], capture_output=True, text=True).stdout
        kinds = {line.split()[1] for line in dyn.splitlines() if len(line.split()) == 3}
        assert "u" not in kinds, [line for line in dyn.splitlines() if " u " in line]


# Each spec compiles every query-head tile (1, 2, 4, 8 heads) of its kernel: the tensor-core tiles (d64/d128
# without RoPE), the CUDA-core tiles (RoPE, d256) and the paged batch kernel, which shares the tile loop.
# fp8 KV (e4m3/e5m2): the tensor-core tiles' fp8 fragments (every head tile at d128 and d64, whose warps take two
# m16 key tiles), the CUDA-core tiles with RoPE and at d256, in the single and the paged batch kernels (d128: below).
_NO_SPILL_SPECS = [
    SingleDecodeSpec(128, "bf16", "bf16", "bf16", "NHD", "NONE", False, False),
    SingleDecodeSpec(64, "f16", "f16", "f16", "HND", "ROPE_LLAMA", True, True),
    SingleDecodeSpec(256, "bf16", "bf16", "bf16", "NHD", "ALIBI", True, True),
    SingleDecodeSpec(128, "bf16", "e4m3", "bf16", "NHD", "NONE", False, False),
    SingleDecodeSpec(64, "f16", "e5m2", "f16", "HND", "ROPE_LLAMA", True, True),
]


def _batch_specs():
    from flashinfer.decode import BatchDecodePagedSpec

    return [
        BatchDecodePagedSpec(head_dim=256, kv_layout="NHD", pos_encoding_mode="NONE", use_logits_soft_cap=True),
        BatchDecodePagedSpec(head_dim=128, kv_layout="HND", pos_encoding_mode="ROPE_LLAMA"),
        BatchDecodePagedSpec(64, "bf16", "e4m3", "bf16", "NHD", "NONE", False),
        BatchDecodePagedSpec(256, "f16", "e5m2", "f16", "HND", "ALIBI", True),
    ]


def _mma_16816(c, a, b):
    """mma.sync m16n8k16 on per-lane fragments (PTX layouts; lane = 4g + t): a[lane] = 4 pairs (row g cols 2t..,
    row g+8 cols 2t.., row g cols 2t+8.., row g+8 cols 2t+8..), b[lane] = 2 pairs (rows 2t.. col g, rows 2t+8..
    col g), c[lane] = (row g cols 2t, 2t+1, row g+8 cols 2t, 2t+1), accumulated in place."""
    am, bm = np.zeros((16, 16), np.int64), np.zeros((16, 8), np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for h in range(2):
            am[g, 2 * t + h], am[g + 8, 2 * t + h] = a[lane][0][h], a[lane][1][h]
            am[g, 2 * t + 8 + h], am[g + 8, 2 * t + 8 + h] = a[lane][2][h], a[lane][3][h]
            bm[2 * t + h, g], bm[2 * t + 8 + h, g] = b[lane][0][h], b[lane][1][h]
    d = am @ bm
    for lane in range(32):
        g, t = divmod(lane, 4)
        for r, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][r] += d[row, col]


def _movmatrix_trans(x):
    """movmatrix.m8n8.trans.b16 on per-lane pairs (lane 4r + c: row r, columns 2c, 2c+1)."""
    m = np.zeros((8, 8), np.int64)
    for lane in range(32):
        m[lane // 4, 2 * (lane % 4) : 2 * (lane % 4) + 2] = x[lane]
    return [tuple(m.T[lane // 4, 2 * (lane % 4) : 2 * (lane % 4) + 2]) for lane in range(32)]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_tensor_core_tile_fragments_emulated(head_dim):
    """The fp8 tensor-core decode tile's fragment bookkeeping (decode.cuh, the MMA && FP8 branch), emulated on one
    warp's 16 keys with the PTX layouts of m16n8k16 and movmatrix: S^T = K Q^T lands as (key g, heads 2t, 2t+1),
    (key g+8, ...), and O^T = V^T P^T, P^T's B fragment made by movmatrix from the C layout and V's A fragments
    by byte permutes, lands at the dims the kernel stores. Bytes stand for their own values (layout, not fp8
    decoding: that conversion is exact)."""
    rng = np.random.default_rng(head_dim)
    d = head_dim
    k, v = rng.integers(0, 256, (16, d)), rng.integers(0, 256, (16, d))
    q, p = rng.integers(-8, 8, (8, d)), rng.integers(0, 5, (16, 8))  # p: P^T[key][head]
    ks_steps, m_tiles, vw = d // 16, d // 16, d // 32

    def word(row, w):  # 32-bit word w of a ring row (ring_words), as its 4 bytes
        return list(row[4 * w : 4 * w + 4])

    def byte_perm(x, y, sel):
        return [(x + y)[(sel >> (4 * i)) & 7] for i in range(4)]

    def cvt(b):  # fp8x4_to_half2x2: (bytes 0, 1), (bytes 2, 3)
        return (b[0], b[1]), (b[2], b[3])

    qb = [
        [
            ((q[g, c0], q[g, c0 + 1]), (q[g, c0 + 2], q[g, c0 + 3]))
            for c0 in (64 * (ks // 4) + 16 * t + 4 * (ks % 4) for ks in range(ks_steps))
        ]
        for g, t in (divmod(lane, 4) for lane in range(32))
    ]
    st = [[0] * 4 for _ in range(32)]
    for s4 in range(ks_steps // 4):
        for i in range(4):
            a = []
            for lane in range(32):
                g, t = divmod(lane, 4)
                lo0, hi0 = cvt(word(k[g], 4 * (4 * s4 + t) + i))
                lo8, hi8 = cvt(word(k[g + 8], 4 * (4 * s4 + t) + i))
                a.append((lo0, lo8, hi0, hi8))
            _mma_16816(st, a, [qb[lane][4 * s4 + i] for lane in range(32)])
    s = k @ q.T
    for lane in range(32):
        g, t = divmod(lane, 4)
        assert st[lane] == [s[g, 2 * t], s[g, 2 * t + 1], s[g + 8, 2 * t], s[g + 8, 2 * t + 1]], lane

    c_p = [
        [p[g, 2 * t], p[g, 2 * t + 1], p[g + 8, 2 * t], p[g + 8, 2 * t + 1]]
        for g, t in (divmod(x, 4) for x in range(32))
    ]
    p0 = _movmatrix_trans([(x[0], x[1]) for x in c_p])
    p1 = _movmatrix_trans([(x[2], x[3]) for x in c_p])
    o = [[[0] * 4 for _ in range(m_tiles)] for _ in range(32)]
    for j in range(vw):
        for half, sel in ((0, 0x5140), (1, 0x7362)):
            a = []
            for lane in range(32):
                g, t = divmod(lane, 4)
                va, vb, vc, vd = (word(v[2 * t + e], g * vw + j) for e in (0, 1, 8, 9))
                a0, a1 = cvt(byte_perm(va, vb, sel))
                a2, a3 = cvt(byte_perm(vc, vd, sel))
                a.append((a0, a1, a2, a3))
            _mma_16816([o[lane][2 * j + half] for lane in range(32)], a, [(p0[x], p1[x]) for x in range(32)])
    out = np.full((8, d), -1, np.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(2):
            for mt in range(m_tiles):
                out[2 * t + i, g * (d // 8) + 2 * mt] = o[lane][mt][i]
                out[2 * t + i, g * (d // 8) + 2 * mt + 1] = o[lane][mt][2 + i]
    np.testing.assert_array_equal(out, p.T @ v)


def test_fp8_decode_tiles_run_on_tensor_cores(tmp_path, monkeypatch):
    """Every query-head tile (1, 2, 4 and 8 heads) of the fp8 d128 paged batch decode module (the serving shape)
    keeps to registers, and (where a cuobjdump is at hand) computes on tensor cores with the scores transposed:
    m16n8k16 products for S^T = K Q^T and O^T = V^T P^T with a movmatrix between them, and no m16n8k8 (the
    16-bit tiles' P.V)."""
    from pathlib import Path

    from flashinfer import jit
    from flashinfer.decode import BatchDecodePagedSpec

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = BatchDecodePagedSpec(128, "bf16", "e4m3", "bf16", "NHD", "NONE", False)
    report = jit.ensure_built(spec)
    assert_register_only(report)
    sass = sass_of(next(Path(report.entry_dir).glob("*.so")))
    if sass is None:
        return
    tiles = {name: body for name, body in sass_functions(sass).items() if "batch_decode_paged_kernel" in name}
    assert sorted(int(name.split("ILi128ELi")[1].split("E")[0]) for name in tiles) == [1, 2, 4, 8], list(tiles)
    for name, body in tiles.items():
        assert "HMMA.16816.F32" in body and "MOVM.16.MT88" in body, name
        assert "HMMA.1688.F32" not in body, name


@pytest.mark.parametrize("spec", _NO_SPILL_SPECS + _batch_specs(), ids=lambda s: s.name())
def test_decode_kernels_keep_to_registers(spec, tmp_path, monkeypatch, capsys):
    """ptxas's report (kept in the build log) shows no stack frame and no spills for any kernel of the module:
    the tile loops are sized to their register budget (4 CTAs per SM for most tiles). `cache list` names the
    entry by its spec (fp8 KV: kv-e4m3 / kv-e5m2)."""
    import json

    from flashinfer import cli, jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    assert_register_only(jit.ensure_built(spec))
    capsys.readouterr()
    assert cli.main(["cache", "list", "--json", "--family", spec.family]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["family"], r["valid"]) for r in rows] == [(spec.name(), spec.family, True)]

"""torch.compile can trace the public APIs (CPU test: dynamo runs on fake CUDA tensors, nothing launches).

The GPU tests compile and run these too; this catches, on every CI run and without a GPU, Python in the call
path that the installed torch's dynamo cannot trace. (Dynamo's abilities differ between torch versions: torch
2.11's could not trace ``Enum.__members__``, which the layout parser once used; 2.14's can.)"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensorMode

import flashinfer

BF16 = torch.bfloat16


def _traced_ops(fn, shapes):
    torch._dynamo.reset()
    with FakeTensorMode():
        args = [torch.empty(*s, dtype=BF16, device="cuda") for s in shapes]
        graph, _ = torch._dynamo.export(fn, assume_static_by_default=True)(*args)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function" and "flashinfer" in str(n.target)]


DECODE = [(32, 128), (3000, 8, 128), (3000, 8, 128)]
PREFILL = [(300, 32, 128), (3000, 8, 128), (3000, 8, 128)]


@pytest.mark.parametrize(
    "kwargs,op",
    [
        ({}, "flashinfer.single_decode.default"),
        ({"return_lse": True, "pos_encoding_mode": "ALIBI", "kv_layout": "nhd"}, "flashinfer.single_decode.default"),
        ({"use_tensor_cores": True}, "flashinfer.single_prefill.default"),
        (
            {"use_tensor_cores": True, "pos_encoding_mode": "ROPE_LLAMA", "return_lse": True},
            "flashinfer.single_prefill.default",
        ),
    ],
)
def test_single_decode_traces_into_one_custom_op(kwargs, op):
    assert _traced_ops(lambda q, k, v: flashinfer.single_decode_with_kv_cache(q, k, v, **kwargs), DECODE) == [op]


def test_single_prefill_traces_into_one_custom_op():
    ops = _traced_ops(lambda q, k, v: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True), PREFILL)
    assert ops == ["flashinfer.single_prefill.default"]


def _traced_ops_typed(fn, specs):
    """As _traced_ops, for arguments of mixed dtypes: specs = [(shape, dtype), ...]."""
    torch._dynamo.reset()
    with FakeTensorMode():
        args = [torch.empty(*s, dtype=d, device="cuda") for s, d in specs]
        graph, _ = torch._dynamo.export(fn, assume_static_by_default=True)(*args)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function" and "flashinfer" in str(n.target)]


X, W = ((16, 4096), BF16), ((4096,), BF16)


@pytest.mark.parametrize(
    "fn,specs,ops",
    [
        (lambda x, w: flashinfer.rmsnorm(x, w), [X, W], ["flashinfer.rmsnorm.default"]),
        (
            lambda x, w: flashinfer.norm.gemma_rmsnorm(x, w, 1e-5, enable_pdl=False),
            [X, W],
            ["flashinfer.rmsnorm.default"],
        ),
        (lambda x, r, w: flashinfer.fused_add_rmsnorm(x, r, w), [X, X, W], ["flashinfer.fused_add_rmsnorm.default"]),
        (
            lambda x, r, w: flashinfer.gemma_fused_add_rmsnorm(x, r, w),
            [X, X, W],
            ["flashinfer.fused_add_rmsnorm.default"],
        ),
        (lambda x: flashinfer.silu_and_mul(x), [X], ["flashinfer.silu_and_mul.default"]),
        (lambda x: flashinfer.activation.gelu_and_mul(x), [((2, 3, 256), BF16)], ["flashinfer.gelu_and_mul.default"]),
        (lambda x: flashinfer.gelu_tanh_and_mul(x), [X], ["flashinfer.gelu_tanh_and_mul.default"]),
        (
            lambda p, q, k, c: flashinfer.apply_rope_with_cos_sin_cache_inplace(p, q, k, 128, c),
            [((16,), torch.int64), ((16, 4096), BF16), ((16, 1024), BF16), ((4096, 128), torch.float32)],
            ["flashinfer.rope_cos_sin_cache_inplace.default"],
        ),
        (
            lambda p, q, k, c: flashinfer.rope.apply_rope_with_cos_sin_cache(p, q, k, 128, c, is_neox=False),
            [((16,), torch.int64), ((16, 4096), BF16), ((16, 1024), BF16), ((4096, 64), torch.float32)],
            ["flashinfer.rope_cos_sin_cache.default"],
        ),
        (
            lambda q, k, p: flashinfer.apply_rope_pos_ids(q, k, p, rotary_dim=64),
            [((16, 32, 128), BF16), ((16, 8, 128), BF16), ((16,), torch.int32)],
            ["flashinfer.rope.default"],
        ),
        (
            lambda q, k, i, o: flashinfer.apply_llama31_rope_inplace(q, k, i, o, interleave=True),
            [((16, 32, 128), BF16), ((16, 8, 128), BF16), ((3,), torch.int32), ((2,), torch.int32)],
            ["flashinfer.rope_inplace.default"],
        ),
    ],
)
def test_per_token_ops_trace_into_one_custom_op(fn, specs, ops):
    assert _traced_ops_typed(fn, specs) == ops


P = ((4, 1000), torch.float32)


@pytest.mark.parametrize(
    "fn,op",
    [
        (
            lambda x: flashinfer.sampling.top_k_top_p_sampling_from_logits(x, 50, 0.9, seed=1, offset=2),
            "flashinfer.top_k_top_p_sampling_from_logits.default",
        ),
        (
            lambda x: flashinfer.sampling.top_k_top_p_sampling_from_probs(
                x, 5, 0.5, filter_apply_order="joint", seed=1, offset=2
            ),
            "flashinfer.top_k_top_p_sampling_from_probs.default",
        ),
        (
            lambda x: flashinfer.sampling.top_p_sampling_from_probs(x, 0.7, seed=3, offset=4),
            "flashinfer.top_p_sampling_from_probs.default",
        ),
        (
            lambda x: flashinfer.sampling.sampling_from_logits(x, seed=3, offset=4),
            "flashinfer.sampling_from_logits.default",
        ),
        (lambda x: flashinfer.sampling.top_k_mask_logits(x, 10), "flashinfer.top_k_mask_logits.default"),
        (lambda x: flashinfer.sampling.top_p_renorm_probs(x, 0.5), "flashinfer.top_p_renorm_probs.default"),
        (lambda x: flashinfer.sampling.softmax(x, 0.7, enable_pdl=False), "flashinfer.softmax.default"),
    ],
)
def test_sampling_ops_trace_into_one_custom_op(fn, op, monkeypatch):
    """One custom op per call, and tracing loads no module (the vocabulary check is in the ops' bodies)."""

    def no_module(dtype):
        raise AssertionError(f"tracing loaded the sampling module ({dtype})")

    monkeypatch.setattr(flashinfer.sampling, "_module", no_module)
    assert _traced_ops_typed(fn, [P]) == [op]


# make_fx (non-strict export's tracer) runs the Python of the call under fake-tensor and proxy dispatch modes without
# dynamo: utils.tracing() must route the ops through their custom ops there too (the eager path would launch on
# fake pointers).
R = ((16, 4096), BF16), ((16, 1024), BF16), ((16,), torch.int64), ((4096, 128), torch.float32)


@pytest.mark.parametrize(
    "fn,specs,op",
    [
        (lambda x, w: flashinfer.rmsnorm(x, w), [X, W], "flashinfer.rmsnorm.default"),
        (lambda x, r, w: flashinfer.fused_add_rmsnorm(x, r, w), [X, X, W], "flashinfer.fused_add_rmsnorm.default"),
        (lambda x: flashinfer.silu_and_mul(x), [X], "flashinfer.silu_and_mul.default"),
        (
            lambda q, k, p, c: flashinfer.apply_rope_with_cos_sin_cache_inplace(p, q, k, 128, c),
            list(R),
            "flashinfer.rope_cos_sin_cache_inplace.default",
        ),
        (
            lambda q, k, v: flashinfer.single_decode_with_kv_cache(q, k, v),
            [((32, 128), BF16), ((300, 8, 128), BF16), ((300, 8, 128), BF16)],
            "flashinfer.single_decode.default",
        ),
    ],
)
def test_make_fx_records_the_custom_op(fn, specs, op):
    from torch.fx.experimental.proxy_tensor import make_fx

    with FakeTensorMode():
        args = [torch.empty(*s, dtype=d, device="cuda") for s, d in specs]
    graph = make_fx(fn, tracing_mode="fake")(*args)
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function" and "flashinfer" in str(n.target)]
    assert ops == [op]


def test_eager_calls_launch_without_the_custom_op(monkeypatch):
    """Outside tracing the ops launch directly (the dispatcher costs microseconds per call) and still validate."""
    from flashinfer import norm, utils

    assert not utils.tracing()
    launched = []

    class Module:
        module = None
        max_hidden = 8192

        def rmsnorm(self, *args):
            launched.append(args)
            return 0

    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through the custom op")

    monkeypatch.setattr(norm, "_rmsnorm_op", refuse)
    monkeypatch.setattr(norm, "_module_for", lambda dtype, hidden: Module())
    monkeypatch.setattr(norm, "resolve_pdl_at", lambda enable_pdl, index: True)
    monkeypatch.setattr(norm, "current_stream_at", lambda index: 0)
    # CPU tensors that report a CUDA device: the real validation runs, then the (patched) launcher.
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    x, w = torch.randn(4, 256, dtype=BF16), torch.randn(256, dtype=BF16)
    out = flashinfer.rmsnorm(x, w)
    assert len(launched) == 1 and launched[0][0] == x.data_ptr() and launched[0][1] == out.data_ptr()
    assert launched[0][7:10] == (4, 1, 256)  # rows, inner, hidden
    with pytest.raises(TypeError, match="weight dtype"):
        flashinfer.rmsnorm(x, w.half())
    assert len(launched) == 1

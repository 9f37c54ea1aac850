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


@pytest.mark.parametrize("kwargs,op", [
    ({}, "flashinfer.single_decode.default"),
    ({"return_lse": True, "pos_encoding_mode": "ALIBI", "kv_layout": "nhd"}, "flashinfer.single_decode.default"),
    ({"use_tensor_cores": True}, "flashinfer.single_prefill.default"),
    ({"use_tensor_cores": True, "pos_encoding_mode": "ROPE_LLAMA", "return_lse": True}, "flashinfer.single_prefill.default"),
])
def test_single_decode_traces_into_one_custom_op(kwargs, op):
    assert _traced_ops(lambda q, k, v: flashinfer.single_decode_with_kv_cache(q, k, v, **kwargs), DECODE) == [op]


def test_single_prefill_traces_into_one_custom_op():
    ops = _traced_ops(lambda q, k, v: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True), PREFILL)
    assert ops == ["flashinfer.single_prefill.default"]

"""RMSNorm (flashinfer.norm): rmsnorm, fused_add_rmsnorm, gemma_rmsnorm, gemma_fused_add_rmsnorm against a float64
reference, over dtypes, hidden sizes (vector and element-wise paths), odd row counts, strided and 3-D inputs,
out= aliasing, eps, PDL, CUDA graphs, streams and devices; on the CPU, validation and a real module build."""

from __future__ import annotations

import pytest
import torch

import flashinfer
from _jit_checks import assert_no_unique_symbols, assert_register_only
from flashinfer.norm import NormSpec
from reference import assert_close, poisoned
from reference import rmsnorm as rmsnorm_ref

DTYPES = [torch.float16, torch.bfloat16]
GEMMA = [False, True]


def _weight(hidden, dtype, device="cuda"):
    return torch.randn(hidden, dtype=dtype, device=device)


def _norm(gemma):
    return (flashinfer.gemma_rmsnorm if gemma else flashinfer.rmsnorm), (1.0 if gemma else 0.0)


def _fused(gemma):
    return (flashinfer.gemma_fused_add_rmsnorm if gemma else flashinfer.fused_add_rmsnorm), (1.0 if gemma else 0.0)


def _check_fused(x, r, w, eps, gemma, enable_pdl=None):
    """Runs the fused add in place on (x, r) and checks both against the float64 reference."""
    fn, bias = _fused(gemma)
    total = x.double() + r.double()
    ref_out = rmsnorm_ref(total, w, eps, bias)
    assert fn(x, r, w, eps, enable_pdl=enable_pdl) is None
    assert_close(r, total, what="residual (input + residual)")
    assert_close(x, ref_out, what="input (normalized sum)")


# ---------------------------------------------------------------------------------------------------- GPU


# Hidden sizes of every kernel shape: warp per row (<= 32 and <= 128 chunks), CTA with 4 and 8 chunks a
# thread, the largest; Llama/Mixtral 4096, Qwen 5120, 70B 8192, 405B 16384.
VEC_HIDDEN = [8, 64, 256, 264, 1024, 1032, 4096, 5120, 8192, 16384, 16392, 32768]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", VEC_HIDDEN)
@pytest.mark.parametrize("gemma", GEMMA)
def test_rmsnorm_matches_reference(dtype, hidden, gemma):
    fn, bias = _norm(gemma)
    w = _weight(hidden, dtype)
    # The launch shapes by batch size: one chunk a thread while the whole grid is resident (few rows), two, then
    # 4 or 8 (bandwidth-bound; 2085 rows, odd: a last CTA of several rows that is only partly filled).
    for rows in (1, 3, 127, 300, 2085):
        x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
        out = poisoned((rows, hidden), dtype)
        assert fn(x, w, out=out) is out
        assert_close(out, rmsnorm_ref(x, w, 1e-6, bias), what=f"rows={rows}")
        y = fn(x, w)  # allocated output: same values
        assert y.shape == x.shape and y.dtype == dtype
        torch.testing.assert_close(y, out, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1032, 4096, 8192, 32768])
@pytest.mark.parametrize("gemma", GEMMA)
def test_fused_add_rmsnorm_matches_reference(dtype, hidden, gemma):
    w = _weight(hidden, dtype)
    for rows in (1, 3, 127, 300, 2085):  # every launch shape (see test_rmsnorm_matches_reference)
        x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
        r = torch.randn(rows, hidden, dtype=dtype, device="cuda")
        _check_fused(x, r, w, 1e-6, gemma)


# Not multiples of 8 (FlashInfer's own tests use 111 and 500): the element-wise path, warp and CTA shapes.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 7, 111, 255, 500, 2050, 8191])
def test_hidden_sizes_not_multiple_of_8(dtype, hidden):
    w = _weight(hidden, dtype)
    for rows in (1, 19):
        x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
        out = poisoned((rows, hidden), dtype)
        flashinfer.rmsnorm(x, w, out=out)
        assert_close(out, rmsnorm_ref(x, w), what="rmsnorm")
        gout = flashinfer.gemma_rmsnorm(x, w)
        assert_close(gout, rmsnorm_ref(x, w, 1e-6, 1.0), what="gemma_rmsnorm")
        r = torch.randn_like(x)
        _check_fused(x.clone(), r, w, 1e-6, False)


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", GEMMA)
def test_strided_rows(gemma):
    """Column slices (row stride > hidden), a misaligned slice (element-wise path) and a strided residual."""
    fn, bias = _norm(gemma)
    hidden, rows = 4096, 37
    w = _weight(hidden, torch.bfloat16)
    big = torch.randn(rows, 2 * hidden + 8, dtype=torch.bfloat16, device="cuda")
    for x in (big[:, :hidden], big[:, 8 : 8 + hidden], big[:, 1 : 1 + hidden], big[::2, :hidden]):
        assert not x.is_contiguous()
        out = poisoned(x.shape, x.dtype)
        fn(x, w, out=out)
        assert_close(out, rmsnorm_ref(x, w, 1e-6, bias), what=f"offset {x.storage_offset()}")
    # A strided output: only its rows are written.
    out_big = poisoned((rows, 2 * hidden), torch.bfloat16)
    fn(big[:, :hidden], w, out=out_big[:, hidden:])
    assert_close(out_big[:, hidden:], rmsnorm_ref(big[:, :hidden], w, 1e-6, bias))
    assert torch.isnan(out_big[:, :hidden]).all()
    # Fused add on strided input and residual (both updated through their strides).
    xb = torch.randn(rows, 3 * hidden, dtype=torch.bfloat16, device="cuda")
    rb = torch.randn(rows, 2 * hidden, dtype=torch.bfloat16, device="cuda")
    x, r = xb[:, hidden : 2 * hidden], rb[:, :hidden]
    untouched_x, untouched_r = xb[:, :hidden].clone(), rb[:, hidden:].clone()
    _check_fused(x, r, w, 1e-6, gemma)
    assert torch.equal(xb[:, :hidden], untouched_x) and torch.equal(rb[:, hidden:], untouched_r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 512])
def test_qk_norm_3d(dtype, head_dim):
    """(batch, heads, head_dim) inputs, contiguous and as a head slice of a wider tensor (QK-norm)."""
    w = _weight(head_dim, dtype)
    for batch, heads in ((1, 7), (19, 4), (99, 16)):
        full = torch.randn(batch, 2 * heads, head_dim, dtype=dtype, device="cuda")
        for x in (full[:, :heads], full[:, :heads].contiguous()):
            out = poisoned(x.shape, dtype)
            flashinfer.rmsnorm(x, w, out=out)
            assert_close(out, rmsnorm_ref(x, w), what=f"batch={batch} heads={heads}")
            r = torch.randn_like(x)
            _check_fused(x.clone(), r, w, 1e-6, False)


@pytest.mark.gpu
def test_out_may_alias_input():
    for hidden in (128, 4096, 500):
        x = torch.randn(33, hidden, dtype=torch.float16, device="cuda")
        w = _weight(hidden, torch.float16)
        ref = rmsnorm_ref(x, w)
        assert flashinfer.rmsnorm(x, w, out=x) is x
        assert_close(x, ref, what=f"in place, hidden {hidden}")


@pytest.mark.gpu
def test_eps_is_used():
    """eps comparable to the mean square (~1) changes the result by sqrt(1 + eps): checked for each eps."""
    x = torch.randn(5, 2048, dtype=torch.float16, device="cuda")
    w = _weight(2048, torch.float16)
    outs = []
    for eps in (1e-6, 0.5, 4.0):
        y = flashinfer.rmsnorm(x, w, eps=eps)
        assert_close(y, rmsnorm_ref(x, w, eps), what=f"eps={eps}")
        outs.append(y)
        _check_fused(x.clone(), torch.randn_like(x), w, eps, True)
    assert not torch.allclose(outs[0].float(), outs[2].float(), atol=0.1, rtol=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("enable_pdl", [None, True, False])
def test_enable_pdl(enable_pdl):
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    w = _weight(4096, torch.bfloat16)
    y = flashinfer.rmsnorm(x, w, enable_pdl=enable_pdl)
    assert_close(y, rmsnorm_ref(x, w))
    # Back-to-back dependent launches: each must see the previous one's result.
    z = flashinfer.gemma_rmsnorm(y, w, enable_pdl=enable_pdl)
    r = torch.randn_like(x)
    r_ref = r.double() + z.double()
    flashinfer.fused_add_rmsnorm(z, r, w, enable_pdl=enable_pdl)
    assert_close(r, r_ref)
    assert_close(z, rmsnorm_ref(r_ref, w))


@pytest.mark.gpu
def test_zero_rows():
    w = _weight(4096, torch.float16)
    x = torch.empty(0, 4096, dtype=torch.float16, device="cuda")
    assert flashinfer.rmsnorm(x, w).shape == (0, 4096)
    flashinfer.fused_add_rmsnorm(x, x.clone(), w)


@pytest.mark.gpu
def test_rows_beyond_int32_elements():
    """rows * hidden > 2**31: element offsets are 64-bit (spot-checks rows around the boundary)."""
    hidden = 4096
    rows = (2**31) // hidden + 3
    if torch.cuda.mem_get_info()[0] < 3 * rows * hidden * 2:
        pytest.skip("needs ~13 GB of free GPU memory")
    x = torch.randn(rows, hidden, dtype=torch.float16, device="cuda")
    w = _weight(hidden, torch.float16)
    y = flashinfer.rmsnorm(x, w)
    for r in (0, rows // 2, (2**31) // hidden - 1, (2**31) // hidden, rows - 1):
        assert_close(y[r : r + 1], rmsnorm_ref(x[r : r + 1], w), what=f"row {r}")
    del y
    res = torch.randn_like(x[-4:])
    xs = x[-4:]
    _check_fused(xs, res, w, 1e-6, False)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    hidden = 8192
    x = torch.randn(16, hidden, dtype=torch.bfloat16, device="cuda")
    r = torch.randn_like(x)
    w = _weight(hidden, torch.bfloat16)
    out = torch.empty_like(x)
    flashinfer.rmsnorm(x, w, out=out)  # load the module outside the capture
    xs, rs = x.clone(), r.clone()
    flashinfer.fused_add_rmsnorm(xs, rs, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        flashinfer.rmsnorm(x, w, out=out)
        flashinfer.fused_add_rmsnorm(x, r, w)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
        x0, r0 = x.clone(), r.clone()
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert_close(out, rmsnorm_ref(x0, w), what="rmsnorm in graph")
        assert_close(r, x0.double() + r0.double(), what="residual in graph")
        assert_close(x, rmsnorm_ref(x0.double() + r0.double(), w), what="fused in graph")


@pytest.mark.gpu
def test_runs_on_current_stream_of_tensor_device():
    x = torch.randn(256, 4096, dtype=torch.bfloat16, device="cuda")
    w = _weight(4096, torch.bfloat16)
    src = torch.randn_like(x)
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # a launch on another stream would read the stale input
        x.copy_(src)
        flashinfer.rmsnorm(x, w, out=out)
    side.synchronize()
    assert_close(out, rmsnorm_ref(src, w))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = torch.randn(7, 4096, dtype=torch.float16, device=dev)
    r = torch.randn_like(x)
    w = torch.randn(4096, dtype=torch.float16, device=dev)
    y = flashinfer.rmsnorm(x, w)
    assert y.device == dev
    assert_close(y, rmsnorm_ref(x, w))
    _check_fused(x, r, w, 1e-6, True)
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_torch_compile_traces_the_custom_ops():
    hidden = 2048
    w = _weight(hidden, torch.bfloat16)

    def f(x, r, w):
        y = flashinfer.rmsnorm(x, w)
        flashinfer.gemma_fused_add_rmsnorm(x, r, w)
        return y * 2, x, r

    x = torch.randn(9, hidden, dtype=torch.bfloat16, device="cuda")
    r = torch.randn_like(x)
    x0, r0 = x.clone(), r.clone()
    y, x1, r1 = torch.compile(f, backend="aot_eager", fullgraph=True)(x, r, w)
    assert_close(y, 2 * rmsnorm_ref(x0, w))
    total = x0.double() + r0.double()
    assert_close(r, total, what="residual mutated through the compiled graph")
    assert_close(x, rmsnorm_ref(total, w, 1e-6, 1.0), what="input mutated through the compiled graph")


@pytest.mark.gpu
def test_limits_checked_at_launch_raise_clear_errors():
    with pytest.raises(ValueError, match="exceeds the largest supported, 32768"):
        flashinfer.rmsnorm(torch.randn(1, 32776, dtype=torch.float16, device="cuda"), _weight(32776, torch.float16))
    with pytest.raises(ValueError, match="max_hidden_unaligned"):  # element-wise path limit (8192)
        flashinfer.rmsnorm(torch.randn(1, 9001, dtype=torch.float16, device="cuda"), _weight(9001, torch.float16))


# ---------------------------------------------------------------------------------------------------- CPU


def test_cpu_tensors_are_refused_before_any_build():
    x = torch.randn(4, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.rmsnorm(x, x[0])
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.fused_add_rmsnorm(x, x.clone(), x[0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        flashinfer.gemma_rmsnorm([1.0], x[0])


def test_bad_input_raises_clear_errors(fake_cuda):
    x = torch.empty(4, 256, dtype=torch.float16, device="cuda")
    w = torch.empty(256, dtype=torch.float16, device="cuda")
    cases = [
        (lambda: flashinfer.rmsnorm(x, w.bfloat16()), TypeError, "weight dtype"),
        (lambda: flashinfer.rmsnorm(x, w[:128]), ValueError, "hidden size 256"),
        (lambda: flashinfer.rmsnorm(x.float(), w.float()), TypeError, "float16"),
        (lambda: flashinfer.rmsnorm(x[0], w), ValueError, "2-D"),
        (lambda: flashinfer.rmsnorm(x, w, out=x[:, :128]), ValueError, "out must be"),
        (lambda: flashinfer.rmsnorm(x, w, out=x.t().contiguous().t()), ValueError, "last dimension"),
        (lambda: flashinfer.fused_add_rmsnorm(x, x[:2], w), ValueError, "residual must match"),
        (lambda: flashinfer.fused_add_rmsnorm(x.t().contiguous().t(), x, w), ValueError, "in place"),
        (lambda: flashinfer.rmsnorm(x, w, enable_pdl="yes"), TypeError, "enable_pdl"),
        (lambda: flashinfer.rmsnorm(x, w, eps=float("nan")), ValueError, "eps must be finite"),
        (lambda: flashinfer.gemma_rmsnorm(x[:, :0], w[:0]), ValueError, "hidden size is 0"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_module_paths_match_flashinfer():
    import flashinfer.norm as norm

    for name in ("rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm"):
        assert getattr(norm, name) is getattr(flashinfer, name)


def test_norm_spec_names():
    specs = NormSpec.expand()
    assert [s.name() for s in specs] == ["norm_bf16", "norm_f16"]
    assert NormSpec.from_json(specs[1].to_json()) == specs[1]


def test_norm_module_builds(tmp_path, monkeypatch):
    """A real nvcc build of the f16 module: its launchers, constants and error text; no spills, no GNU unique
    symbols (no launch: this machine may have no GPU)."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = NormSpec("f16")
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    assert mod.fn("flashinfer_rmsnorm") is not None and mod.fn("flashinfer_fused_add_rmsnorm") is not None
    assert mod.constants["max_hidden"] == 32768 and mod.constants["max_hidden_unaligned"] == 8192
    assert "max_hidden_unaligned" in mod.error_string(1001)
    assert_register_only(report, kernels=16)  # 8 shapes x (rmsnorm, fused add)
    assert_no_unique_symbols(mod.path)

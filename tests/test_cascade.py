"""flashinfer.cascade: the state merges against a float64 reference (with -inf states on either side and masks), and
cascade attention against float64 attention computed without any merging (each query's KV of every level laid end
to end, attended once). On the CPU: page-table handling, the fallback's cost model, validation, spec naming and one
real build of the merge module."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import flashinfer
from flashinfer import cascade
from flashinfer.cascade import CascadeSharedSpec, MergeStateSpec, _check_levels, _concatenated_table, _decode_table
from reference import LSE_TOL, assert_close, attention, poisoned

NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------ merge references


def _merge_ref(vs, ss):
    """float64 merge of states vs [..., n, H, D], ss [..., n, H] along dim -3 / -2 (-inf: empty, its v unread)."""
    vs, ss = vs.double(), ss.double()
    empty = torch.isinf(ss) & (ss < 0)
    vs = torch.where(empty[..., None], torch.zeros_like(vs), vs)
    m = ss.max(dim=-2, keepdim=True).values
    w = torch.where(empty, torch.zeros_like(ss), torch.exp2(ss - m.nan_to_num(0.0)))
    d = w.sum(dim=-2)
    o = (w[..., None] * vs).sum(dim=-3) / torch.where(d > 0, d, torch.ones_like(d))[..., None]
    s = torch.where(
        d > 0,
        m.squeeze(-2).nan_to_num(0.0) + torch.log2(torch.where(d > 0, d, torch.ones_like(d))),
        torch.full_like(d, NEG_INF),
    )
    return o, s


def _lse_close(got, ref):
    finite = torch.isfinite(ref)
    assert not torch.isnan(got).any(), "lse: NaN"
    assert torch.equal(torch.isinf(got), ~finite), "lse: -inf where the reference is finite, or the reverse"
    torch.testing.assert_close(got[finite].double(), ref[finite], atol=LSE_TOL[0], rtol=LSE_TOL[1])


def _states(shape, dtype, p_inf=0.15):
    """Random v (in dtype) and lse in a realistic range, a fraction of the lse -inf (empty states, their v NaN:
    an empty state's values must never be read, as FlashInfer's own merges leave NaN there)."""
    v = torch.randn(*shape, device="cuda").to(dtype)
    s = torch.randn(*shape[:-1], device="cuda") * 4 + 10
    s[torch.rand_like(s) < p_inf] = NEG_INF
    v[torch.isinf(s)] = float("nan")
    return v, s


def _set_state(v, s, idx, lse):
    """State idx of (v, s) non-empty: s[idx] = lse and fresh finite values."""
    s[idx] = lse
    v[idx] = torch.randn(v[idx].shape, device=v.device).to(v.dtype)


def _bits(v):
    """v's 16-bit patterns (NaN compares equal to itself)."""
    return v.contiguous().view(torch.int16)


# One row; odd head counts; head_dim 8 to 2048 (rows within a warp or across warps); a grid of many blocks.
MERGE_SHAPES = [(1, 1, 8), (37, 3, 72), (9, 7, 64), (500, 32, 128), (64, 8, 256), (4100, 5, 256), (3, 2, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_merge_state(dtype, shape):
    va, sa = _states(shape, dtype)
    vb, sb = _states(shape, dtype)
    sa[0, 0], sb[0, 0] = NEG_INF, NEG_INF  # both empty
    if shape[0] > 1:
        sa[1, 0] = sb[1, -1] = NEG_INF
        _set_state(vb, sb, (1, 0), 3.0)  # only b
        _set_state(va, sa, (1, -1), 7.0)  # only a
    v, s = flashinfer.merge_state(va, sa, vb, sb)
    ref_v, ref_s = _merge_ref(torch.stack([va, vb], -3), torch.stack([sa, sb], -2))
    assert_close(v, ref_v, what="v")
    _lse_close(s, ref_s)
    # An empty side gives the other exactly; both empty give v = 0, s = -inf.
    only_a, only_b = torch.isinf(sb) & ~torch.isinf(sa), torch.isinf(sa) & ~torch.isinf(sb)
    assert torch.equal(v[only_a], va[only_a]) and torch.equal(s[only_a], sa[only_a])
    assert torch.equal(v[only_b], vb[only_b]) and torch.equal(s[only_b], sb[only_b])
    # v_a as a view with evenly spaced rows (flat addressing) and s_b transposed (by position and head): the same.
    seq, heads, d = shape
    va_view = torch.empty(seq, heads, 2 * d, device="cuda", dtype=dtype)[:, :, d:]
    va_view.copy_(va)
    sb_t = torch.empty(heads, seq, device="cuda").t()
    sb_t.copy_(sb)
    v2, s2 = flashinfer.merge_state(va_view, sa, vb, sb_t)
    assert torch.equal(_bits(v2), _bits(v)) and torch.equal(s2, s), "strided inputs merge differently"
    both = torch.isinf(sa) & torch.isinf(sb)
    assert (v[both] == 0).all() and (s[both] == NEG_INF).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "shape", [(300, 6, 128), (1, 1, 64), (77, 5, 96), (40, 3, 256), (9, 2, 2048)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("s_layout", ["contiguous", "transposed"])
def test_merge_state_in_place_with_mask_and_views(dtype, shape, s_layout):
    """In place, with and without a mask: v a view into a wider buffer (rows evenly spaced), s contiguous (every
    tensor addressed by its flat row) or transposed (by position and head), v_other strided. head_dim 96 and 2048
    put a row's threads in more than one warp (the block waits for every read of s before any write)."""
    seq, heads, d = shape
    big = torch.randn(seq, heads, 2 * d, device="cuda").to(dtype)
    v = big[:, :, d:]
    s = (
        torch.empty(seq, heads, device="cuda")
        if s_layout == "contiguous"
        else torch.empty(heads, seq, device="cuda").t()
    )
    s.copy_(torch.randn(seq, heads, device="cuda") * 3 + 8)
    s[torch.rand_like(s) < 0.2] = NEG_INF
    v[torch.isinf(s)] = float("nan")
    vo_big = torch.randn(seq, 2 * heads, d, device="cuda").to(dtype)
    v_other = vo_big[:, ::2]
    s_other = torch.randn(seq, heads, device="cuda") * 3 + 8
    s_other[torch.rand_like(s_other) < 0.2] = NEG_INF
    v_other[torch.isinf(s_other)] = float("nan")
    s[0, 0] = s_other[0, 0] = NEG_INF  # both empty
    mask = torch.rand(seq, device="cuda") < 0.7
    mask[0] = True
    v0, s0 = v.clone(), s.clone()
    untouched = big[:, :, :d].clone()
    flashinfer.merge_state_in_place(v, s, v_other, s_other, mask=mask)
    ref_v, ref_s = _merge_ref(torch.stack([v0, v_other], -3), torch.stack([s0, s_other], -2))
    assert_close(v[mask], ref_v[mask], what="merged rows")
    _lse_close(s[mask], ref_s[mask])
    assert torch.equal(_bits(v[~mask]), _bits(v0[~mask])) and torch.equal(s[~mask], s0[~mask]), (
        "masked-off rows changed"
    )
    assert torch.equal(big[:, :, :d], untouched), "wrote outside the view"
    # No mask: every row; s_other in float16 is converted.
    v1, s1 = v.clone(), s.clone()
    flashinfer.merge_state_in_place(v, s, v_other, s_other.half())
    ref_v, ref_s = _merge_ref(torch.stack([v1, v_other], -3), torch.stack([s1, s_other.half().float()], -2))
    assert_close(v, ref_v)
    _lse_close(s, ref_s)


@pytest.mark.gpu
def test_merge_state_offsets_beyond_int32():
    """v_a's second position lies 2^31 elements past its first (64-bit offsets): out of place and in place."""
    seq, heads, d = 2, 3, 64
    storage = torch.empty(2**31 + heads * d, dtype=torch.bfloat16, device="cuda")
    va = storage.as_strided((seq, heads, d), (2**31, d, 1))
    va_vals, sa = _states((seq, heads, d), torch.bfloat16)
    va.copy_(va_vals)
    vb, sb = _states((seq, heads, d), torch.bfloat16)
    ref_v, ref_s = _merge_ref(torch.stack([va_vals, vb], -3), torch.stack([sa, sb], -2))
    v, s = flashinfer.merge_state(va, sa, vb, sb)
    assert_close(v, ref_v)
    _lse_close(s, ref_s)
    flashinfer.merge_state_in_place(va, sa, vb, sb)
    assert_close(va, ref_v)
    _lse_close(sa, ref_s)
    del storage, va
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "shape", [(5, 0, 2, 64), (1, 1, 4, 128), (300, 8, 32, 128), (7, 13, 3, 40)], ids=lambda s: "x".join(map(str, s))
)
def test_merge_states(dtype, shape):
    v, s = _states(shape, dtype, p_inf=0.3)
    if shape[1]:
        s[0, :, 0] = NEG_INF  # a row with every state empty
        s[-1, :, -1] = NEG_INF
        _set_state(v, s, (-1, shape[1] // 2, -1), 2.0)  # ... but one
    vo, so = flashinfer.merge_states(v, s)
    assert vo.shape == (shape[0], shape[2], shape[3]) and so.shape == (shape[0], shape[2])
    if shape[1] == 0:
        assert (vo == 0).all() and (so == NEG_INF).all()
        return
    ref_v, ref_s = _merge_ref(v, s)
    assert_close(vo, ref_v)
    _lse_close(so, ref_s)
    assert torch.equal(vo[-1, -1], v[-1, shape[1] // 2, -1]), "a single non-empty state must come out exactly"
    # merge_states on a non-contiguous v (a slice of the state axis) agrees
    if shape[1] > 2:
        vo2, so2 = flashinfer.merge_states(v[:, 1:], s[:, 1:])
        ref_v2, ref_s2 = _merge_ref(v[:, 1:], s[:, 1:])
        assert_close(vo2, ref_v2)
        _lse_close(so2, ref_s2)


@pytest.mark.gpu
def test_merge_ops_trace_under_torch_compile_and_follow_the_stream():
    va, sa = _states((64, 4, 128), torch.bfloat16)
    vb, sb = _states((64, 4, 128), torch.bfloat16)

    def f(va, sa, vb, sb):
        v, s = flashinfer.merge_state(va, sa, vb, sb)
        v2, s2 = flashinfer.merge_states(torch.stack([va, vb], 1), torch.stack([sa, sb], 1))
        return v, s, v2, s2

    v, s, v2, s2 = torch.compile(f, backend="aot_eager", fullgraph=True)(va, sa, vb, sb)
    ref_v, ref_s = _merge_ref(torch.stack([va, vb], -3), torch.stack([sa, sb], -2))
    assert_close(v, ref_v)
    assert_close(v2, ref_v)
    _lse_close(s, ref_s)
    _lse_close(s2, ref_s)
    # In place on a side stream, right after the inputs were produced there.
    st = torch.cuda.Stream()
    with torch.cuda.stream(st):
        x = va.clone()
        xs = sa.clone()
        flashinfer.merge_state_in_place(x, xs, vb, sb)
    st.synchronize()
    assert_close(x, ref_v)


# ------------------------------------------------------------------------------------ cascade page tables


class Levels:
    """A random paged cache and the page tables of a cascade batch: level l holds requests (query count, KV
    tokens); every level covers the same queries in order. An fp8 ``dtype`` stores random values / scale rounded to
    fp8 (as an engine does), and the reference takes those same fp8 values dequantised (``.double() * scale``), so
    that quantisation error is never mistaken for kernel error."""

    def __init__(
        self,
        levels,
        page_size,
        hkv,
        d,
        dtype,
        layout,
        form="single",
        spare=3,
        full_pages_above=False,
        k_scale=1.0,
        v_scale=1.0,
    ):
        self.page_size, self.layout = page_size, layout
        self.k_scale, self.v_scale = k_scale, v_scale
        tables = []
        pages_total = 0
        for l, reqs in enumerate(levels):
            qo = [0] + list(itertools.accumulate(q for q, _ in reqs))
            lens = [n for _, n in reqs]
            if full_pages_above and l < len(levels) - 1:
                lens = [-(-n // page_size) * page_size for n in lens]
            pages = [-(-n // page_size) for n in lens]
            kv = [0] + list(itertools.accumulate(pages))
            last = [n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)]
            tables.append((qo, kv, last, lens))
            pages_total += kv[-1]
        num_pages = pages_total + spare
        perm = torch.randperm(num_pages).to(torch.int32)
        at = 0
        self.qo, self.kv, self.idx, self.last, self.lens = [], [], [], [], []
        for qo, kv, last, lens in tables:
            self.qo.append(torch.tensor(qo, dtype=torch.int32))
            self.kv.append(torch.tensor(kv, dtype=torch.int32))
            self.idx.append(perm[at : at + kv[-1]].clone())
            self.last.append(torch.tensor(last, dtype=torch.int32))
            self.lens.append(lens)
            at += kv[-1]
        shape = (num_pages, page_size, hkv, d) if layout == "NHD" else (num_pages, hkv, page_size, d)
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raw = torch.randn(num_pages, 2, *shape[1:], device="cuda")
            raw[:, 0] /= k_scale
            raw[:, 1] /= v_scale
            if form == "single":
                self.cache = raw.to(dtype)
                self.k, self.v = self.cache[:, 0], self.cache[:, 1]
            else:
                self.k, self.v = raw[:, 0].to(dtype), raw[:, 1].to(dtype)
                self.cache = (self.k, self.v)
        elif form == "single":
            self.cache = torch.randn(num_pages, 2, *shape[1:], device="cuda").to(dtype)
            self.k, self.v = self.cache[:, 0], self.cache[:, 1]
        else:
            self.k = torch.randn(shape, device="cuda").to(dtype)
            self.v = torch.randn(shape, device="cuda").to(dtype)
            self.cache = (self.k, self.v)
        self.total_q = int(self.qo[0][-1])

    def plan_args(self, device_indices=True):
        idx = [i.cuda() for i in self.idx] if device_indices else self.idx
        return self.qo, self.kv, idx, self.last

    def gather(self, t, level, req):
        n = self.lens[level][req]
        ids = self.idx[level][self.kv[level][req] : self.kv[level][req + 1]].long().to(t.device)
        x = _take_pages(t, ids)
        if self.layout == "HND":
            x = x.transpose(1, 2)
        return x.reshape(-1, x.shape[-2], x.shape[-1])[:n]

    def reference(self, q, causal=False, **kw):
        """Each request of the last level: its queries against the KV of every level laid end to end, attended
        once in float64. causal (FlashInfer's: the last level only): every key of the earlier levels is visible,
        the last level's aligned bottom-right to its own keys (with more queries than those, the first rows see
        the earlier levels only)."""
        outs, lses = [], []
        qo_last = self.qo[-1].tolist()
        for j in range(len(qo_last) - 1):
            a, b = qo_last[j], qo_last[j + 1]
            if a == b:
                continue
            ks, vs = [], []
            for l in range(len(self.qo)):
                req = int(torch.searchsorted(self.qo[l], torch.tensor(a, dtype=torch.int32), right=True)) - 1
                ks.append(self.gather(self.k, l, req).double() * self.k_scale)
                vs.append(self.gather(self.v, l, req).double() * self.v_scale)
            mask = None
            if causal:
                n_prev, kv_last, qo_len = sum(x.shape[0] for x in ks[:-1]), ks[-1].shape[0], b - a
                rows = torch.arange(qo_len, device=q.device)[:, None]
                cols = torch.arange(n_prev + kv_last, device=q.device)[None, :]
                mask = (cols < n_prev) | (cols - n_prev <= rows + kv_last - qo_len)
            o, s = attention(q[a:b], torch.cat(ks), torch.cat(vs), mask=mask, **kw)
            outs.append(o)
            lses.append(s)
        return torch.cat(outs), torch.cat(lses)


def _take_pages(t, ids):
    """t[ids] (pages of a cache), an fp8 cache gathered through its bytes (as uint8: indexing need not
    support the fp8 dtypes) and returned as float64."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8)[ids].view(t.dtype).double()
    return t[ids]


def _workspace(mb=128, device="cuda"):
    return torch.empty(mb << 20, dtype=torch.uint8, device=device)


def _graph_wrapper(bufs):
    """A two-level CUDA-graph wrapper (NHD) over the fixed buffers bufs = [qo_indptr, kv_indptr, kv_indices,
    last_page_len] (each a list of the two levels' tensors)."""
    return flashinfer.MultiLevelCascadeAttentionWrapper(
        2,
        _workspace(),
        "NHD",
        use_cuda_graph=True,
        qo_indptr_buf_arr=bufs[0],
        paged_kv_indptr_buf_arr=bufs[1],
        paged_kv_indices_buf_arr=bufs[2],
        paged_kv_last_page_len_buf_arr=bufs[3],
    )


def _check(w, lv, q, causal=False, run_kw=None, **kw):
    out = poisoned(q.shape, q.dtype)
    lse = poisoned(q.shape[:2], torch.float32)
    o, s = w.run(q, lv.cache, out=out, lse=lse, return_lse=True, **(run_kw or {}))
    assert o is out and s is lse
    ref_o, ref_s = lv.reference(q, causal=causal, **kw)
    assert_close(o, ref_o, what="o")
    _lse_close(s, ref_s)
    return o


def _check_on_callers_stream(w, lv, q):
    """run() on a stream of the caller's, with q produced on it just before (levels side by side fork from it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = q.flip(0) * 0.5
        out = torch.full_like(q, float("nan"))
        o2 = w.run(q2, lv.cache, out=out)
    torch.cuda.current_stream().wait_stream(s)
    assert o2 is out
    assert_close(o2, lv.reference(q2)[0], what="o on a caller's stream")


# (dtype, head_dim, num_qo_heads, num_kv_heads, layout, cache form): GQA groups 1, 4, 8, every head_dim, both
# layouts and dtypes, both cache forms (specs chosen within the test preset, see flashinfer/cli.py).
CASES = [
    (torch.bfloat16, 64, 8, 8, "NHD", "single"),
    (torch.float16, 128, 32, 8, "NHD", "tuple"),
    (torch.bfloat16, 256, 16, 2, "NHD", "single"),
    (torch.bfloat16, 128, 32, 4, "HND", "tuple"),
    (torch.bfloat16, 128, 8, 8, "HND", "single"),
]
_case_id = lambda c: f"{str(c[0])[6:]}-d{c[1]}-{c[2]}q{c[3]}kv-{c[4]}-{c[5]}"  # noqa: E731


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_two_levels(case, mode):
    dtype, d, hq, hkv, layout, form = case
    if mode == "decode":
        # One query per request; a 3000-token prefix (its KV split across the GPU) ending mid-page; unique lengths
        # across page edges, and one request with no unique tokens.
        unique = [1, 17, 0, 300, 16, 33, 5]
        levels = [[(len(unique), 3000)], [(1, n) for n in unique]]
    else:
        # Causal append: each request's unique KV ends with its queries.
        qo = [5, 1, 20, 3]
        levels = [[(sum(qo), 700)], [(q, n) for q, n in zip(qo, [5, 40, 37, 3])]]
    lv = Levels(levels, 16, hkv, d, dtype, layout, form)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), layout)
    w._fallback = "never"
    w.plan(*lv.plan_args(), hq, hkv, d, 16, causal=mode == "prefill", q_data_type=dtype)
    st = w.plan_stats()
    assert st["path"] == "cascade"
    assert st["kernels"][-1][0] == ("batch_decode" if mode == "decode" else "batch_prefill")
    q = torch.randn(lv.total_q, hq, d, device="cuda").to(dtype)
    _check(w, lv, q, causal=mode == "prefill")
    # Without lse, and a second run reusing the plan (a next layer).
    q2 = torch.randn_like(q)
    o2 = w.run(q2, lv.cache)
    assert_close(o2, lv.reference(q2, causal=mode == "prefill")[0])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_three_levels_with_empty_requests_and_levels(mode):
    if mode == "decode":
        # 7 queries: a shared prefix, two groups (the second without group pages), unique tokens (one request without).
        levels = [[(7, 1000)], [(3, 250), (4, 0)], [(1, n) for n in [40, 0, 16, 1, 90, 7, 33]]]
    else:
        levels = [[(30, 513)], [(12, 64), (18, 100)], [(4, 10), (8, 8), (1, 1), (17, 40)]]
    lv = Levels(levels, 16, 4, 128, torch.bfloat16, "NHD")
    q = torch.randn(lv.total_q, 16, 128, device="cuda").to(torch.bfloat16)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(3, _workspace(), "NHD")
    w._fallback = "never"
    w.plan(*lv.plan_args(device_indices=False), 16, 4, 128, 16, causal=mode == "prefill", q_data_type=torch.bfloat16)
    _check(w, lv, q, causal=mode == "prefill")
    # A whole level empty (skipped), then no shared prefix at all (level 0 empty: it still writes the base state).
    for empty in (1, 0):
        spec = [list(r) for r in levels]
        spec[empty] = [(qn, 0) for qn, _ in levels[empty]]
        lv2 = Levels(spec, 16, 4, 128, torch.bfloat16, "NHD")
        w.plan(*lv2.plan_args(), 16, 4, 128, 16, causal=mode == "prefill", q_data_type=torch.bfloat16)
        _check(w, lv2, q, causal=mode == "prefill")


def _on_hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("page_size,layout,prefix", [(16, "NHD", 33000), (1, "HND", 2500), (16, "HND", 40)])
def test_shared_level_on_wgmma_and_on_batch_prefill(dtype, page_size, layout, prefix):
    """A shared level of every query runs on the Hopper wgmma kernel (paged KV, split across the GPU; a prefix
    ending mid-page; page_size 1; a prefix shorter than one KV tile), or on batch prefill (by default where that runs
    it on fa3_ws: pages of 16 here, 64 query rows in a 128-row tile): all match."""
    unique = [1, 0, 300, 16, 33, 5, 70, 2]
    lv = Levels([[(len(unique), prefix)], [(1, n) for n in unique]], page_size, 4, 128, dtype, layout)
    q = torch.randn(len(unique), 32, 128, device="cuda").to(dtype)
    runs = (
        (True, False, "always"),
        (True, False, "never"),
        (False, False, "always"),
        (True, True, "auto"),
        (True, True, "always"),
    )
    for wgmma, fa3_ws, overlap in runs:
        w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), layout)
        w._fallback = "never"
        w._shared_level_wgmma, w._shared_level_fa3_ws = wgmma, fa3_ws
        w._overlap_levels = overlap
        w.plan(*lv.plan_args(), 32, 4, 128, page_size, q_data_type=dtype)
        st = w.plan_stats()
        on_ws = wgmma and fa3_ws and _on_hopper() and page_size == 16
        on_wgmma = wgmma and _on_hopper() and not on_ws
        assert st["kernels"][0][0] == ("shared_prefix_wgmma" if on_wgmma else "batch_prefill")
        # a shared level on the wgmma kernel or on fa3_ws runs concurrently with the decode level on a side stream,
        # or before it ("auto": as the cost model says); fa3_ws then leaves decode_sms SMs to the decode level
        if overlap == "auto":
            assert not st["overlap_levels"] or on_wgmma or on_ws, st
        else:
            assert st["overlap_levels"] == ((on_wgmma or on_ws) and overlap == "always"), st
        assert (st["decode_sms"] > 0) == (on_ws and st["overlap_levels"]), st
        _check(w, lv, q)
        if st["overlap_levels"]:
            _check_on_callers_stream(w, lv, q)
    # a prefill-shaped batch: more query tiles, fewer chunks
    qo = [40, 1, 200, 3]
    lv = Levels([[(sum(qo), 1500)], [(n, n + 7) for n in qo]], page_size, 4, 128, dtype, layout)
    q = torch.randn(sum(qo), 32, 128, device="cuda").to(dtype)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), layout)
    w.plan(*lv.plan_args(), 32, 4, 128, page_size, causal=True, q_data_type=dtype)
    _check(w, lv, q, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("num_qo_heads,decode_sms", [(32, 8), (64, 40), (32, 100)])
def test_decode_level_beside_fa3_ws_on_the_tma_kernel(dtype, layout, num_qo_heads, decode_sms):
    """Beside a shared level on fa3_ws, a decode level of 8 KV heads runs on the TMA decode kernel with a grid of the
    SMs left to it (launched first, on the side stream): results match the reference, on the caller's stream too;
    with _decode_level_tma off it runs on the cp.async kernel as before."""
    # 17 requests: 68 query rows a KV head at 32 q heads, so that the shared level goes to fa3_ws (_ws_auto_tiles)
    unique = [1, 0, 300, 16, 33, 5, 70, 2, 1000, 17, 64, 15, 3, 129, 48, 7, 250]
    lv = Levels([[(len(unique), 33000)], [(1, n) for n in unique]], 16, 8, 128, dtype, layout)
    q = torch.randn(len(unique), num_qo_heads, 128, device="cuda").to(dtype)
    for tma in (True, False):
        w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), layout)
        w._fallback, w._overlap_levels, w._ws_decode_sms, w._decode_level_tma = "never", "always", decode_sms, tma
        w.plan(*lv.plan_args(), num_qo_heads, 8, 128, 16, q_data_type=dtype)
        st = w.plan_stats()
        assert st["overlap_levels"] == _on_hopper(), st
        assert st.get("decode_tma", False) == (tma and _on_hopper()), st
        _check(w, lv, q)
        _check_on_callers_stream(w, lv, q)


@pytest.mark.gpu
def test_decode_last_level_on_prefill_kernel_and_options():
    """The last level on batch prefill (FlashInfer's route) gives the same result; sm_scale and the logits soft cap
    (position-free options) apply to every level."""
    unique = [3, 0, 100, 16]
    lv = Levels([[(4, 2000)], [(1, n) for n in unique]], 16, 2, 128, torch.bfloat16, "NHD")
    q = torch.randn(4, 8, 128, device="cuda").to(torch.bfloat16)
    for on_decode in (True, False):
        w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), "NHD")
        w._fallback = "never"
        w._last_level_decode = on_decode
        w.plan(*lv.plan_args(), 8, 2, 128, 16, sm_scale=0.05, logits_soft_cap=8.0, q_data_type=torch.bfloat16)
        assert w.plan_stats()["kernels"][-1][0] == ("batch_decode" if on_decode else "batch_prefill")
        _check(w, lv, q, sm_scale=0.05, logits_soft_cap=8.0)


@pytest.mark.gpu
def test_short_prefix_falls_back_to_plain_decode():
    unique = [100, 1, 2000, 40, 16, 17, 300, 5]
    # A 16-token prefix (one full page) for 8 queries: plain decode over the concatenated tables is cheaper.
    lv = Levels([[(8, 16)], [(1, n) for n in unique]], 16, 8, 128, torch.bfloat16, "NHD")
    q = torch.randn(8, 32, 128, device="cuda").to(torch.bfloat16)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), "NHD")
    w.plan(*lv.plan_args(), 32, 8, 128, 16, q_data_type=torch.bfloat16)
    st = w.plan_stats()
    assert st["path"] == "plain_decode" and "short shared prefix" in st["reason"], st
    _check(w, lv, q)
    # A partial shared page cannot be concatenated: the cascade runs and says why.
    lv2 = Levels([[(8, 10)], [(1, n) for n in unique]], 16, 8, 128, torch.bfloat16, "NHD")
    w.plan(*lv2.plan_args(), 32, 8, 128, 16, q_data_type=torch.bfloat16)
    st = w.plan_stats()
    assert st["path"] == "cascade" and "do not concatenate" in st["reason"], st
    _check(w, lv2, q)
    # A long prefix: the cascade.
    lv3 = Levels([[(8, 8192)], [(1, n) for n in unique]], 16, 8, 128, torch.bfloat16, "NHD")
    w.plan(*lv3.plan_args(), 32, 8, 128, 16, q_data_type=torch.bfloat16)
    assert w.plan_stats()["path"] == "cascade"
    _check(w, lv3, q)


@pytest.mark.gpu
def test_cuda_graph_replays_after_replans():
    batch, hq, hkv, d, ps = 6, 32, 8, 128, 16
    max_pages = 3000
    bufs = [
        [torch.zeros(n, dtype=torch.int32, device="cuda") for _ in range(2)]
        for n in (batch + 1, batch + 1, max_pages, batch)
    ]
    bufs[0][0] = torch.zeros(2, dtype=torch.int32, device="cuda")  # level 0: one request
    bufs[1][0] = torch.zeros(2, dtype=torch.int32, device="cuda")
    bufs[3][0] = torch.zeros(1, dtype=torch.int32, device="cuda")
    w = _graph_wrapper(bufs)
    plans = [
        (5000, [1, 17, 400, 0, 33, 2]),
        (40, [700, 700, 700, 700, 700, 700]),
        (0, [5, 0, 0, 9, 1, 64]),
        (12000, [0, 0, 0, 0, 0, 0]),
        (333, [16, 32, 1, 1000, 77, 3]),
    ]
    caches = []
    for prefix, unique in plans:
        caches.append(Levels([[(batch, prefix)], [(1, n) for n in unique]], ps, hkv, d, torch.bfloat16, "NHD", spare=0))
    num_pages = max(c.k.shape[0] for c in caches)
    cache = torch.randn(num_pages, 2, ps, hkv, d, device="cuda").to(torch.bfloat16)
    q = torch.randn(batch, hq, d, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, device="cuda")
    lv = caches[0]
    w.plan(*lv.plan_args(), hq, hkv, d, ps, q_data_type=torch.bfloat16)
    assert w.plan_stats()["kernels"][-1][0] == "batch_decode"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w.run(q, cache, out=out, lse=lse, return_lse=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, cache, out=out, lse=lse, return_lse=True)
    for i, lv in enumerate(caches):
        lv.cache = cache  # one cache for every plan (page ids index it)
        lv.k, lv.v = cache[:, 0], cache[:, 1]
        w.plan(*lv.plan_args(device_indices=i % 2 == 0), hq, hkv, d, ps, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        ref_o, ref_s = lv.reference(q)
        assert_close(out, ref_o, what=f"replay {i}")
        _lse_close(lse, ref_s)
    with pytest.raises(ValueError, match="batch size"):
        small = Levels([[(batch - 1, 64)], [(1, 5)] * (batch - 1)], ps, hkv, d, torch.bfloat16, "NHD")
        w.plan(*small.plan_args(), hq, hkv, d, ps, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="first plan"):
        w.plan(*caches[0].plan_args(), hq, hkv, 64, ps, q_data_type=torch.bfloat16)
    # A non-graph wrapper refuses capture.
    w2 = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), "NHD")
    w2.plan(*caches[0].plan_args(), hq, hkv, d, ps, q_data_type=torch.bfloat16)
    with pytest.raises(RuntimeError, match="use_cuda_graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            w2.run(q, cache)


@pytest.mark.gpu
def test_flashinfer_doc_example_runs_unchanged():
    """FlashInfer's MultiLevelCascadeAttentionWrapper docstring example, as written, then checked."""
    import torch

    import flashinfer

    num_layers = 32
    num_qo_heads = 64
    num_kv_heads = 8
    head_dim = 128
    page_size = 16
    # allocate 128MB workspace buffer
    workspace_buffer = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace_buffer, "NHD")
    batch_size = 7
    shared_kv_num_pages = 512
    unique_kv_num_pages = 128
    total_num_pages = shared_kv_num_pages + unique_kv_num_pages
    shared_kv_page_indices = torch.arange(shared_kv_num_pages).int().to("cuda:0")
    shared_kv_page_indptr = torch.tensor([0, shared_kv_num_pages], dtype=torch.int32, device="cuda:0")
    unique_kv_page_indices = torch.arange(shared_kv_num_pages, total_num_pages).int().to("cuda:0")
    unique_kv_page_indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32, device="cuda:0")
    shared_kv_last_page_len = torch.tensor([page_size], dtype=torch.int32, device="cuda:0")
    # 1 <= kv_last_page_len <= page_size
    unique_kv_last_page_len = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32, device="cuda:0")
    kv_cache_at_layer = [
        torch.randn(total_num_pages, 2, page_size, num_kv_heads, head_dim, dtype=torch.float16, device="cuda:0")
        for _ in range(num_layers)
    ]
    qo_indptr_arr = [
        torch.tensor([0, batch_size], dtype=torch.int32, device="cuda:0"),  # top-level for shared KV-Cache
        torch.arange(batch_size + 1, dtype=torch.int32, device="cuda:0"),  # bottom-level for unique KV-Cache
    ]
    # create auxiliary data structures for batch decode attention
    wrapper.plan(
        qo_indptr_arr,
        [shared_kv_page_indptr, unique_kv_page_indptr],
        [shared_kv_page_indices, unique_kv_page_indices],
        [shared_kv_last_page_len, unique_kv_last_page_len],
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
    )
    outputs = []
    qs = []
    for i in range(num_layers):
        q = torch.randn(batch_size, num_qo_heads, head_dim).half().to("cuda:0")
        qs.append(q)
        # compute batch decode attention, reuse auxiliary data structures for all layers
        o = wrapper.run(q, kv_cache_at_layer[i])
        outputs.append(o)
    assert outputs[0].shape == torch.Size([7, 64, 128])
    assert wrapper.plan_stats()["path"] == "cascade"
    # check two layers against attention over each request's pages (shared, then unique)
    for layer in (0, num_layers - 1):
        k, v = kv_cache_at_layer[layer][:, 0], kv_cache_at_layer[layer][:, 1]
        shared_k = k[:shared_kv_num_pages].reshape(-1, num_kv_heads, head_dim)
        shared_v = v[:shared_kv_num_pages].reshape(-1, num_kv_heads, head_dim)
        ip, last = unique_kv_page_indptr.tolist(), unique_kv_last_page_len.tolist()
        for r in range(batch_size):
            n = (ip[r + 1] - ip[r] - 1) * page_size + last[r]
            pages = slice(shared_kv_num_pages + ip[r], shared_kv_num_pages + ip[r + 1])
            uk = k[pages].reshape(-1, num_kv_heads, head_dim)[:n]
            uv = v[pages].reshape(-1, num_kv_heads, head_dim)[:n]
            ref, _ = attention(qs[layer][r : r + 1], torch.cat([shared_k, uk]), torch.cat([shared_v, uv]))
            assert_close(outputs[layer][r : r + 1], ref)


@pytest.mark.gpu
@pytest.mark.parametrize("layout,dtype", [("NHD", torch.float16), ("HND", torch.bfloat16)], ids=["NHD-f16", "HND-bf16"])
def test_legacy_shared_prefix_wrappers(layout, dtype):
    """FlashInfer's BatchDecode/BatchPrefillWithSharedPrefixPagedKVCacheWrapper examples (one layer), checked."""
    num_qo_heads, num_kv_heads, head_dim, page_size, max_num_pages = 64, 16, 128, 16, 128
    ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    shared_prefix_len = 8192
    indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32, device="cuda:0")
    indices = torch.randperm(max_num_pages).int().to("cuda:0")
    last = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32, device="cuda:0")
    shape = (
        (max_num_pages, 2, page_size, num_kv_heads, head_dim)
        if layout == "NHD"
        else (max_num_pages, 2, num_kv_heads, page_size, head_dim)
    )
    sshape = (
        (shared_prefix_len, num_kv_heads, head_dim) if layout == "NHD" else (num_kv_heads, shared_prefix_len, head_dim)
    )
    cache = torch.randn(shape, dtype=dtype, device="cuda:0")
    k_shared = torch.randn(sshape, dtype=dtype, device="cuda:0")
    v_shared = torch.randn(sshape, dtype=dtype, device="cuda:0")
    ks_nhd = k_shared if layout == "NHD" else k_shared.transpose(0, 1)
    vs_nhd = v_shared if layout == "NHD" else v_shared.transpose(0, 1)

    def unique_kv(r):
        ids = indices[indptr[r] : indptr[r + 1]].long()
        n = (int(indptr[r + 1] - indptr[r]) - 1) * page_size + int(last[r])
        k, v = cache[ids, 0], cache[ids, 1]
        if layout == "HND":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return k.reshape(-1, num_kv_heads, head_dim)[:n], v.reshape(-1, num_kv_heads, head_dim)[:n]

    dec = flashinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws, layout)
    dec.begin_forward(indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, data_type=dtype)
    q = torch.randn(7, num_qo_heads, head_dim).to(dtype).to("cuda:0")
    o = dec.forward(q, k_shared, v_shared, cache)
    assert o.shape == torch.Size([7, 64, 128])
    for r in range(7):
        uk, uv = unique_kv(r)
        ref, _ = attention(q[r : r + 1], torch.cat([ks_nhd, uk]), torch.cat([vs_nhd, uv]))
        assert_close(o[r : r + 1], ref)
    dec.end_forward()

    nnz_qo = 100
    qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, nnz_qo], dtype=torch.int32, device="cuda:0")
    pre = flashinfer.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws, layout)
    pre.begin_forward(qo_indptr, indptr, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size)
    q = torch.randn(nnz_qo, num_qo_heads, head_dim).to(dtype).to("cuda:0")
    for causal in (True, False):
        o = pre.forward(q, k_shared, v_shared, cache, causal=causal)
        assert o.shape == torch.Size([100, 64, 128])
        qi = qo_indptr.tolist()
        for r in range(7):
            uk, uv = unique_kv(r)
            ref, _ = attention(q[qi[r] : qi[r + 1]], torch.cat([ks_nhd, uk]), torch.cat([vs_nhd, uv]), causal=causal)
            assert_close(o[qi[r] : qi[r + 1]], ref)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cascade_on_second_device_while_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    with torch.cuda.device(dev):
        lv = Levels([[(5, 900)], [(1, n) for n in [3, 0, 50, 16, 700]]], 16, 2, 128, torch.bfloat16, "NHD")
    lv.cache = lv.cache.to(dev)
    lv.k, lv.v = lv.cache[:, 0], lv.cache[:, 1]
    q = torch.randn(5, 8, 128, device=dev).to(torch.bfloat16)
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(32, dev), "NHD")
    w._fallback = "never"
    qo, kv, idx, last = lv.plan_args(device_indices=False)
    w.plan(qo, kv, [i.to(dev) for i in idx], last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    o, s = w.run(q, lv.cache, return_lse=True)
    assert o.device == dev and torch.cuda.current_device() == 0
    ref_o, ref_s = lv.reference(q)
    assert_close(o, ref_o.to(dev))
    v2, s2 = flashinfer.merge_state(o, s, o, s)
    assert_close(v2, o.double())


@pytest.mark.gpu
def test_causal_last_level_with_more_queries_than_unique_keys():
    """Accepted, as in FlashInfer: causal applies to the last level, aligned bottom-right, so its first
    qo_len - kv_len rows see no unique key (the shared level's keys only)."""
    lv = Levels([[(8, 100)], [(8, 5)]], 16, 2, 64, torch.bfloat16, "NHD")
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(16), "NHD")
    w._fallback = "never"
    w.plan(*lv.plan_args(), 8, 2, 64, 16, causal=True, q_data_type=torch.bfloat16)
    _check(w, lv, torch.randn(8, 8, 64, device="cuda").to(torch.bfloat16), causal=True)


@pytest.mark.gpu
def test_run_and_plan_bad_input():
    lv = Levels([[(3, 100)], [(1, 5), (1, 6), (1, 7)]], 16, 2, 64, torch.bfloat16, "NHD")
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(16), "NHD")
    w._fallback = "never"
    q = torch.randn(3, 8, 64, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q, lv.cache)
    w.plan(*lv.plan_args(), 8, 2, 64, 16, q_data_type=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        w.run(q.half(), lv.cache)
    with pytest.raises(ValueError, match="total_q"):
        w.run(q[:2], lv.cache)
    with pytest.raises(ValueError, match="out"):
        w.run(q, lv.cache, out=torch.empty(3, 8, 32, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="num_qo_heads"):
        w.plan(*lv.plan_args(), 6, 4, 64, 16, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        v = torch.randn(4, 2, 64, device="cuda").to(torch.bfloat16)[:, :, ::2]  # last stride 2
        flashinfer.merge_state_in_place(
            v, torch.zeros(4, 2, device="cuda"), v.contiguous(), torch.zeros(4, 2, device="cuda")
        )
    with pytest.raises(TypeError, match="float32"):
        v = torch.randn(4, 2, 64, device="cuda").to(torch.bfloat16)
        flashinfer.merge_state_in_place(v, torch.zeros(4, 2, device="cuda").half(), v, torch.zeros(4, 2, device="cuda"))
    with pytest.raises(ValueError, match="shape"):
        v = torch.randn(4, 2, 64, device="cuda").to(torch.bfloat16)
        flashinfer.merge_state(v, torch.zeros(4, 3, device="cuda"), v, torch.zeros(4, 2, device="cuda"))
    with pytest.raises(ValueError, match="mask"):
        v = torch.randn(4, 2, 64, device="cuda").to(torch.bfloat16)
        s = torch.zeros(4, 2, device="cuda")
        flashinfer.merge_state_in_place(v, s, v.clone(), s.clone(), mask=torch.ones(5, dtype=torch.bool, device="cuda"))


# ------------------------------------------------------------------------------------------------ fp8 KV caches

# (q dtype, fp8 KV dtype, k_scale, v_scale, cache form): e4m3 with bf16 q and e5m2 with f16 q, the pairs of the batch
# kernels' fp8 tests (their modules are in tests/prewarm_test.toml), scales on both sides of 1.
FP8_CASES = [
    (torch.bfloat16, torch.float8_e4m3fn, 0.5, 1.75, "single"),
    (torch.float16, torch.float8_e5m2, 1.25, 0.375, "tuple"),
]
_fp8_id = lambda c: f"{str(c[0])[6:]}-{str(c[1])[6:]}"  # noqa: E731

# (levels, heads (qo, kv)) per (number of levels, mode): decode batches (one query per request; a prefix ending
# mid-page and long enough to split; requests without unique tokens, a group without pages) and causal prefill
# batches (each request's unique KV ends with its queries). GQA groups 8 and 4, head_dim 128.
FP8_LEVELS = {
    (2, "decode"): ([[(7, 3000)], [(1, n) for n in [1, 17, 0, 300, 16, 33, 5]]], (32, 4)),
    (3, "decode"): ([[(7, 1000)], [(3, 250), (4, 0)], [(1, n) for n in [40, 0, 16, 1, 90, 7, 33]]], (16, 4)),
    (2, "prefill"): ([[(29, 700)], [(5, 5), (1, 40), (20, 37), (3, 3)]], (32, 4)),
    (3, "prefill"): ([[(30, 513)], [(12, 64), (18, 100)], [(4, 10), (8, 8), (1, 1), (17, 40)]], (16, 4)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", FP8_CASES, ids=_fp8_id)
@pytest.mark.parametrize("num_levels,mode", sorted(FP8_LEVELS), ids=lambda x: str(x))
@pytest.mark.parametrize("page_size,layout", [(1, "HND"), (16, "NHD")])
def test_fp8_levels(case, num_levels, mode, page_size, layout):
    """An fp8 cache through every level: the shared level on the Hopper wgmma kernel (beside the decode level or
    before it) or on batch prefill, the others on batch prefill or decode, k_scale/v_scale applied once per level
    and the states merged; against float64 attention over the same fp8 values dequantised, with NaN-poisoned
    outputs; the scales also as one-element CPU tensors."""
    q_dtype, kv_dtype, k_scale, v_scale, form = case
    levels, (hq, hkv) = FP8_LEVELS[(num_levels, mode)]
    causal = mode == "prefill"
    lv = Levels(levels, page_size, hkv, 128, kv_dtype, layout, form, k_scale=k_scale, v_scale=v_scale)
    q = torch.randn(lv.total_q, hq, 128, device="cuda").to(q_dtype)
    for wgmma, overlap in ((True, "always"), (True, "never"), (False, "auto")):
        w = flashinfer.MultiLevelCascadeAttentionWrapper(num_levels, _workspace(), layout)
        w._fallback, w._shared_level_wgmma_fp8, w._overlap_levels = "never", wgmma, overlap
        w.plan(*lv.plan_args(), hq, hkv, 128, page_size, causal=causal, q_data_type=q_dtype, kv_data_type=kv_dtype)
        st = w.plan_stats()
        assert st["path"] == "cascade" and st["kv_data_type"] == str(kv_dtype)[6:] and "fp8_kv" in st, st
        on_wgmma = wgmma and _on_hopper()
        assert st["kernels"][0] == ("shared_prefix_wgmma" if on_wgmma else "batch_prefill", 0), st
        assert st["kernels"][-1][0] == ("batch_decode" if mode == "decode" else "batch_prefill"), st
        assert st["overlap_levels"] == (on_wgmma and overlap == "always" and (num_levels, mode) == (2, "decode"))
        _check(w, lv, q, causal=causal, run_kw=dict(k_scale=k_scale, v_scale=v_scale))
    q2 = torch.randn_like(q)
    o2 = w.run(q2, lv.cache, k_scale=torch.tensor(k_scale), v_scale=torch.tensor([v_scale]))
    assert_close(o2, lv.reference(q2, causal=causal)[0], what="o, scales as CPU tensors")


@pytest.mark.gpu
@pytest.mark.parametrize("case", FP8_CASES, ids=_fp8_id)
def test_fp8_short_prefix_falls_back_to_plain_decode(case):
    """The plain-decode fallback (a one-page prefix) reads the fp8 cache with the same scales."""
    q_dtype, kv_dtype, k_scale, v_scale, form = case
    unique = [100, 1, 2000, 40, 16, 17, 300, 5]
    lv = Levels(
        [[(8, 16)], [(1, n) for n in unique]], 16, 8, 128, kv_dtype, "NHD", form, k_scale=k_scale, v_scale=v_scale
    )
    w = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(), "NHD")
    w.plan(*lv.plan_args(), 32, 8, 128, 16, q_data_type=q_dtype, kv_data_type=kv_dtype)
    st = w.plan_stats()
    assert st["path"] == "plain_decode" and st["kernels"][0][0] == "batch_decode", st
    _check(w, lv, torch.randn(8, 32, 128, device="cuda").to(q_dtype), run_kw=dict(k_scale=k_scale, v_scale=v_scale))


@pytest.mark.gpu
@pytest.mark.parametrize("case", FP8_CASES, ids=_fp8_id)
def test_fp8_cuda_graph_replays_after_replans(case):
    """Graph mode with an fp8 cache (GQA 32/8): run() with its scales captured once, replayed after re-plans with
    new prefixes and unique lengths (an empty prefix, requests without unique tokens)."""
    q_dtype, kv_dtype, k_scale, v_scale, _ = case
    batch, hq, hkv, d, ps, max_pages = 6, 32, 8, 128, 16, 1200
    bufs = [
        [torch.zeros(n, dtype=torch.int32, device="cuda") for n in sizes]
        for sizes in ((2, batch + 1), (2, batch + 1), (max_pages, max_pages), (1, batch))
    ]
    w = _graph_wrapper(bufs)
    plans = [(5000, [1, 17, 400, 0, 33, 2]), (0, [5, 0, 0, 9, 1, 64]), (40, [700] * 6), (9000, [0] * 6)]
    raw = torch.randn(max_pages, 2, ps, hkv, d, device="cuda")
    raw[:, 0] /= k_scale
    raw[:, 1] /= v_scale
    cache = raw.to(kv_dtype)
    caches = []
    for prefix, unique in plans:
        lv = Levels([[(batch, prefix)], [(1, n) for n in unique]], ps, hkv, d, kv_dtype, "NHD", spare=0)
        assert lv.k.shape[0] <= max_pages
        lv.cache, lv.k, lv.v = cache, cache[:, 0], cache[:, 1]  # one cache for every plan (page ids index it)
        lv.k_scale, lv.v_scale = k_scale, v_scale
        caches.append(lv)
    q = torch.randn(batch, hq, d, device="cuda").to(q_dtype)
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, device="cuda")

    def run():
        w.run(q, cache, out=out, lse=lse, return_lse=True, k_scale=k_scale, v_scale=v_scale)

    w.plan(*caches[0].plan_args(), hq, hkv, d, ps, q_data_type=q_dtype, kv_data_type=kv_dtype)
    assert w.plan_stats()["kernels"] == [("batch_prefill", 0), ("batch_decode", 1)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for i, lv in enumerate(caches):
        w.plan(*lv.plan_args(device_indices=i % 2 == 0), hq, hkv, d, ps, q_data_type=q_dtype, kv_data_type=kv_dtype)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        ref_o, ref_s = lv.reference(q)
        assert_close(out, ref_o, what=f"replay {i}")
        _lse_close(lse, ref_s)
    with pytest.raises(ValueError, match="first plan"):  # the kernels (their KV dtype) are fixed by the first plan
        w.plan(*caches[0].plan_args(), hq, hkv, d, ps, q_data_type=q_dtype, kv_data_type=q_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_fp8_legacy_shared_prefix_wrappers(layout):
    """The legacy wrappers with fp8 caches (shared prefix and unique pages) and their scales: decode with
    data_type e5m2 (q float16, as FlashInfer plans it), prefill/append with a bf16 q against e4m3 caches."""
    hq, hkv, d, ps, max_num_pages, shared_len = 32, 8, 128, 16, 128, 3000
    ws = _workspace()
    indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32, device="cuda")
    indices = torch.randperm(max_num_pages).int().cuda()
    last = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32, device="cuda")
    shape = (max_num_pages, 2, ps, hkv, d) if layout == "NHD" else (max_num_pages, 2, hkv, ps, d)
    sshape = (shared_len, hkv, d) if layout == "NHD" else (hkv, shared_len, d)

    def fp8(shape_, scale, dtype):
        x = (torch.randn(shape_, device="cuda") / scale).to(dtype)
        return x, x.double() * scale

    for q_dtype, kv_dtype, k_scale, v_scale in (
        (torch.float16, torch.float8_e5m2, 1.25, 0.375),
        (torch.bfloat16, torch.float8_e4m3fn, 0.5, 1.75),
    ):
        raw = torch.randn(shape, device="cuda")
        raw[:, 0] /= k_scale
        raw[:, 1] /= v_scale
        cache = raw.to(kv_dtype)
        k_shared, ks_ref = fp8(sshape, k_scale, kv_dtype)
        v_shared, vs_ref = fp8(sshape, v_scale, kv_dtype)
        if layout == "HND":
            ks_ref, vs_ref = ks_ref.transpose(0, 1), vs_ref.transpose(0, 1)

        def unique_kv(r):
            ids = indices[indptr[r] : indptr[r + 1]].long()
            n = (int(indptr[r + 1] - indptr[r]) - 1) * ps + int(last[r])
            pages = _take_pages(cache, ids)
            k, v = pages[:, 0] * k_scale, pages[:, 1] * v_scale
            if layout == "HND":
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            return k.reshape(-1, hkv, d)[:n], v.reshape(-1, hkv, d)[:n]

        scales = dict(k_scale=k_scale, v_scale=v_scale)
        if q_dtype == torch.float16:
            dec = flashinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws, layout)
            dec.begin_forward(indptr, indices, last, hq, hkv, d, ps, data_type=kv_dtype)
            q = torch.randn(7, hq, d, device="cuda").to(q_dtype)
            o = dec.forward(q, k_shared, v_shared, cache, **scales)
            for r in range(7):
                uk, uv = unique_kv(r)
                ref, _ = attention(q[r : r + 1], torch.cat([ks_ref, uk]), torch.cat([vs_ref, uv]))
                assert_close(o[r : r + 1], ref, what=f"decode request {r}")
        qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, 100], dtype=torch.int32, device="cuda")
        pre = flashinfer.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws, layout)
        pre.begin_forward(qo_indptr, indptr, indices, last, hq, hkv, d, ps)
        q = torch.randn(100, hq, d, device="cuda").to(q_dtype)
        for causal in (True, False):
            o = pre.forward(q, k_shared, v_shared, cache, causal=causal, **scales)
            qi = qo_indptr.tolist()
            for r in range(7):
                uk, uv = unique_kv(r)
                ref, _ = attention(
                    q[qi[r] : qi[r + 1]], torch.cat([ks_ref, uk]), torch.cat([vs_ref, uv]), causal=causal
                )
                assert_close(o[qi[r] : qi[r + 1]], ref, what=f"prefill request {r}, causal={causal}")


# ------------------------------------------------------------------------------------------------------ CPU


def _cpu_levels(levels, page_size=16, full_pages_above=False):
    tables = []
    base = 0
    for l, reqs in enumerate(levels):
        lens = [n for _, n in reqs]
        if full_pages_above and l < len(levels) - 1:
            lens = [-(-n // page_size) * page_size for n in lens]
        pages = [-(-n // page_size) for n in lens]
        qo = [0] + list(itertools.accumulate(q for q, _ in reqs))
        kv = [0] + list(itertools.accumulate(pages))
        last = [n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)]
        tables.append(
            (
                torch.tensor(qo, dtype=torch.int32),
                torch.tensor(kv, dtype=torch.int32),
                torch.arange(base, base + kv[-1], dtype=torch.int32) * 3 + 1,
                torch.tensor(last, dtype=torch.int32),
            )
        )
        base += kv[-1]
    return [list(x) for x in zip(*tables)]


def test_check_levels_rejects_bad_tables():
    qo, kv, idx, last = _cpu_levels([[(3, 40)], [(1, 5), (1, 0), (1, 17)]])
    levels = _check_levels(2, qo, kv, idx, last, 16)
    assert [lv.kv_lens for lv in levels] == [[40], [5, 0, 17]] and levels[1].qo_lens == [1, 1, 1]
    with pytest.raises(ValueError, match="list of 2"):
        _check_levels(2, qo[:1], kv, idx, last, 16)
    with pytest.raises(ValueError, match=r"qo_indptr_arr\[0\]\[-1\]"):
        _check_levels(2, [torch.tensor([0, 2], dtype=torch.int32), qo[1]], kv, idx, last, 16)
    with pytest.raises(ValueError, match="never decrease"):
        _check_levels(2, qo, [kv[0], torch.tensor([0, 2, 1, 3], dtype=torch.int32)], idx, last, 16)
    with pytest.raises(ValueError, match="last_page_len"):
        _check_levels(2, qo, kv, idx, [last[0], torch.tensor([5, 0, 17], dtype=torch.int32)], 16)
    with pytest.raises(ValueError, match="page ids"):
        _check_levels(2, qo, kv, [idx[0], idx[1][:1]], last, 16)
    with pytest.raises(TypeError, match="int32"):
        _check_levels(2, qo, kv, [idx[0], idx[1].long()], last, 16)
    with pytest.raises(ValueError, match="describes"):
        _check_levels(2, qo, [kv[0], kv[1][:-1]], idx, last, 16)


@pytest.mark.parametrize(
    "batch,prefix,unique,pays",
    [
        (64, 32768, 1024, False),  # compute-bound shared level longer than the decode level: in turn
        (256, 32768, 1024, False),
        (8, 32768, 1024, False),  # memory-bound shared level longer than the decode level: in turn
        (8, 32768, 4096, False),
        (8, 4096, 1024, True),  # shared level shorter than the decode level
        (64, 4096, 1024, True),
        (64, 262144, 256, False),
        (8, 32768, 16, False),  # negligible decode level
    ],
)
def test_overlap_of_shared_and_decode_levels_pays_where_measured(batch, prefix, unique, pays):
    qo, kv, idx, last = _cpu_levels([[(batch, prefix)], [(1, unique)] * batch])
    shared, own = _check_levels(2, qo, kv, idx, last, 16)
    assert cascade._overlap_pays(shared, own, 32, 8, 128, 2) is pays


@pytest.mark.parametrize(
    "batch,prefix,unique,decode_sms",
    [
        (64, 32768, 1024, 65),  # levels of about equal SM time: about half the SMs each
        (64, 131072, 1024, 25),  # a longer shared level keeps more
        (64, 32768, 4096, 66),  # at most half the SMs to the decode level
        (8, 32768, 1024, 0),  # memory-bound shared level (measured slower side by side): in turn
        (8, 32768, 16, 0),  # negligible decode level
    ],
)
def test_decode_level_share_beside_fa3_ws(batch, prefix, unique, decode_sms):
    qo, kv, idx, last = _cpu_levels([[(batch, prefix)], [(1, unique)] * batch])
    shared, own = _check_levels(2, qo, kv, idx, last, 16)
    assert cascade._ws_decode_share(shared, own, 32, 8, 128, 2, 132) == decode_sms


def test_decode_table_pads_requests_without_pages():
    qo, kv, idx, last = _cpu_levels([[(4, 40)], [(1, 5), (1, 0), (1, 17), (1, 0)]])
    lv = _check_levels(2, qo, kv, idx, last, 16)[1]
    indptr, indices, lastp, has = _decode_table(lv)
    assert has.tolist() == [True, False, True, False]
    assert indptr.tolist() == [0, 1, 2, 4, 5] and lastp.tolist() == [5, 1, 1, 1]
    own = lv.indices.tolist()
    assert indices.tolist() == [own[0], 0, own[1], own[2], 0]
    qo, kv, idx, last = _cpu_levels([[(2, 40)], [(1, 5), (1, 20)]])
    lv = _check_levels(2, qo, kv, idx, last, 16)[1]
    indptr, indices, lastp, has = _decode_table(lv)
    assert has is None and indices.tolist() == lv.indices.tolist() and lastp.tolist() == [5, 4]


def test_concatenated_table_lays_levels_end_to_end():
    # 5 queries: shared 32 tokens, groups of (2, 3) queries with 16 / 0 tokens, unique tokens (one without).
    spec = [[(5, 32)], [(2, 16), (3, 0)], [(1, 5), (1, 0), (1, 17), (1, 1), (1, 33)]]
    qo, kv, idx, last = _cpu_levels(spec)
    levels = _check_levels(3, qo, kv, idx, last, 16)
    indptr, indices, lastp = _concatenated_table(levels, 16, torch.device("cpu"))
    s, g, u = (lv.indices.tolist() for lv in levels)
    want = [s + g + u[0:1], s + g, s + u[1:3], s + u[3:4], s + u[4:7]]
    assert indptr.tolist() == [0] + list(itertools.accumulate(len(x) for x in want))
    assert indices.tolist() == sum(want, [])
    assert lastp.tolist() == [5, 16, 1, 1, 1]
    # A partial page above the last level, or a query without any page: no plain-decode table.
    qo, kv, idx, last = _cpu_levels([[(2, 20)], [(1, 5), (1, 3)]])
    assert _concatenated_table(_check_levels(2, qo, kv, idx, last, 16), 16, torch.device("cpu")) is None
    qo, kv, idx, last = _cpu_levels([[(2, 0)], [(1, 5), (1, 0)]])
    assert _concatenated_table(_check_levels(2, qo, kv, idx, last, 16), 16, torch.device("cpu")) is None


def test_fallback_cost_model():
    def estimate(batch, prefix, hq=32, hkv=8):
        qo, kv, idx, last = _cpu_levels([[(batch, prefix)], [(1, 1024)] * batch])
        return cascade._cascade_estimate(_check_levels(2, qo, kv, idx, last, 16), hq, hkv, 128, 2)

    plain, casc = estimate(64, 16)
    assert casc > plain  # the benchmark's short-prefix case falls back
    plain, casc = estimate(64, 32768)
    assert plain > 10 * casc
    plain, casc = estimate(8, 4096)
    assert plain > casc

    # the break-even prefix grows as the batch shrinks
    def breakeven(batch):
        return next(p for p in itertools.count(16, 16) if estimate(batch, p)[0] > estimate(batch, p)[1])

    assert breakeven(64) < breakeven(8) < 4096


def test_merge_spec_and_family():
    from flashinfer._families import FAMILY_MODULES

    s = MergeStateSpec("f16")
    assert s.name() == "merge_state_o-f16" and MergeStateSpec.from_json(s.to_json()) == s
    assert FAMILY_MODULES["merge_state"] == "flashinfer.cascade"
    assert [x.dtype_o for x in MergeStateSpec.expand()] == ["bf16", "f16"]
    assert MergeStateSpec("f32").unsupported_reason() is not None
    preset = (Path(__file__).resolve().parent / "prewarm_test.toml").read_text()
    assert 'family = "merge_state"' in preset and 'family = "cascade_shared"' in preset
    shared = [x for x in CascadeSharedSpec.expand() if x.unsupported_reason() is None]
    assert [x.name() for x in shared] == [  # K/V in q's dtype or fp8
        f"cascade_shared_q-{q}_kv-{kv}_o-{q}_d128" for q in ("bf16", "f16") for kv in (q, "e4m3", "e5m2")
    ]
    assert all(x.needs_sm90a() for x in shared) and "128" in CascadeSharedSpec(64).unsupported_reason()
    assert FAMILY_MODULES["cascade_shared"] == "flashinfer.cascade"


def test_cpu_tensors_refused_before_any_build():
    v = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    s = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.merge_state(v, s, v, s)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.merge_state_in_place(v, s, v, s)
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.merge_states(v[:, None], s[:, None])
    with pytest.raises(ValueError, match="CUDA"):
        flashinfer.MultiLevelCascadeAttentionWrapper(2, torch.empty(1024, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_levels"):
        flashinfer.MultiLevelCascadeAttentionWrapper(0, torch.empty(1024, dtype=torch.uint8))


def test_merge_ops_are_registered_with_fake_implementations():
    for name in ("merge_state", "merge_state_in_place", "merge_states"):
        assert hasattr(torch.ops.flashinfer, name)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        v = torch.empty(5, 3, 2, 64, dtype=torch.bfloat16)
        s = torch.empty(5, 3, 2)
        vo, so = torch.ops.flashinfer.merge_states(v, s)
        assert vo.shape == (5, 2, 64) and so.shape == (5, 2) and so.dtype == torch.float32
        vo, so = torch.ops.flashinfer.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
        assert vo.shape == (5, 2, 64) and vo.dtype == torch.bfloat16


def test_merge_module_builds_without_spills(tmp_path, monkeypatch):
    """A real nvcc build of one merge module (no launch)."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = MergeStateSpec("bf16")
    report = jit.ensure_built(spec)
    assert report.status == "built"
    mod = jit.load(spec)
    assert mod.fn("flashinfer_merge_state") is not None and mod.fn("flashinfer_merge_states") is not None
    log = report.log_path.read_text()
    assert "spill" in log and all("0 bytes spill stores" in ln for ln in log.splitlines() if "spill stores" in ln)


class _FakeWrapper:
    """Stands in for the batch wrappers on the CPU: checks that plan()/run() are called with arguments the real
    classes accept (bound to their signatures), records them, and writes recognisable outputs."""

    real = None

    def __init__(self, *args, **kwargs):
        import inspect

        inspect.signature(self.real.__init__).bind(self, *args, **kwargs)
        self.plans, self.runs = [], []

    def plan(self, *args, **kwargs):
        import inspect

        bound = inspect.signature(self.real.plan).bind(self, *args, **kwargs)
        self.plans.append(bound.arguments)

    def run(self, q, paged_kv_cache, **kwargs):
        import inspect

        inspect.signature(self.real.run).bind(self, q, paged_kv_cache, **kwargs)
        self.runs.append(kwargs)
        out = kwargs.get("out") if kwargs.get("out") is not None else torch.empty_like(q)
        out.fill_(len(self.runs))
        lse = kwargs.get("lse") if kwargs.get("lse") is not None else torch.empty(q.shape[:2])
        if kwargs.get("return_lse"):
            lse.fill_(1.0)
        return (out, lse) if kwargs.get("return_lse") else out


def _cpu_wrapper(monkeypatch, num_levels):
    """A MultiLevelCascadeAttentionWrapper on the CPU with fake level wrappers and a recording merge."""
    from flashinfer import decode, prefill

    class FakePrefill(_FakeWrapper):
        real = prefill.BatchPrefillWithPagedKVCacheWrapper

    class FakeDecode(_FakeWrapper):
        real = decode.BatchDecodeWithPagedKVCacheWrapper

    merges = []
    monkeypatch.setattr(cascade, "BatchPrefillWithPagedKVCacheWrapper", FakePrefill)
    monkeypatch.setattr(cascade, "BatchDecodeWithPagedKVCacheWrapper", FakeDecode)
    monkeypatch.setattr(cascade, "_launch_pair", lambda *a: merges.append(a))
    w = object.__new__(cascade.MultiLevelCascadeAttentionWrapper)
    w._num_levels, w._kv_layout, w._use_cuda_graph, w._device = num_levels, "NHD", False, torch.device("cpu")
    w._bufs = [None] * 4
    w._decode_ws, w._prefill_ws = cascade.MultiLevelCascadeAttentionWrapper._split_workspace(
        torch.empty(1 << 20, dtype=torch.uint8)
    )
    w._prefill = [w._make_prefill(l) for l in range(num_levels)]
    w._shared, w._decode, w._plain, w._graph_mask, w._graph_path, w._graph_batch, w._plan = (
        {},
        None,
        None,
        None,
        None,
        None,
        None,
    )
    return w, merges


def test_plan_and_run_glue_on_the_cpu(monkeypatch):
    """plan()/run() drive the level wrappers with arguments their real signatures accept: prefill levels, the
    decode-shaped last level on batch decode (padded requests masked), empty levels skipped, the fallback."""
    w, merges = _cpu_wrapper(monkeypatch, 3)
    spec = [[(5, 300)], [(2, 64), (3, 0)], [(1, n) for n in [5, 0, 17, 1, 33]]]
    qo, kv, idx, last = _cpu_levels(spec)
    w._fallback = "never"
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, causal=True, sm_scale=0.1, logits_soft_cap=5.0, q_data_type="bfloat16")
    st = w.plan_stats()
    assert st["path"] == "cascade" and st["kernels"] == [
        ("batch_prefill", 0),
        ("batch_prefill", 1),
        ("batch_decode", 2),
    ]
    p0 = w._prefill[0].plans[-1]
    assert p0["causal"] is False and p0["sm_scale"] == 0.1 and p0["logits_soft_cap"] == 5.0
    assert p0["q_data_type"] == torch.bfloat16
    dec = w._decode.plans[-1]
    assert dec["indptr"].tolist() == [0, 1, 2, 4, 5, 8] and dec["last_page_len"].tolist() == [5, 1, 1, 1, 1]
    q = torch.randn(5, 8, 64).to(torch.bfloat16)
    o, lse = w.run(q, None, return_lse=True)
    assert len(merges) == 2
    assert merges[-1][-1].tolist() == [True, False, True, True, True]  # the padded request keeps its state
    assert merges[0][-1] is None and merges[-1][5] is lse  # the last merge writes the returned lse
    w.run(q, None)
    assert merges[-1][5] is None  # no lse asked: the last merge skips it
    # An empty middle level is skipped; a prefill-shaped last level runs on batch prefill, causal.
    spec = [[(5, 300)], [(2, 0), (3, 0)], [(1, 4), (4, 40)]]
    qo, kv, idx, last = _cpu_levels(spec)
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, causal=True, q_data_type="bfloat16")
    assert w.plan_stats()["kernels"] == [("batch_prefill", 0), ("batch_prefill", 2)]
    assert w._prefill[2].plans[-1]["causal"] is True
    # The fallback: a one-page prefix for a decode batch, with full pages above the last level.
    w._fallback = "auto"
    spec = [[(5, 16)], [(5, 32)], [(1, n) for n in [5, 0, 17, 1, 33]]]
    qo, kv, idx, last = _cpu_levels(spec)
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="bfloat16")
    st = w.plan_stats()
    assert st["path"] == "plain_decode" and "short shared prefix" in st["reason"]
    plain = w._plain.plans[-1]
    assert plain["indptr"].tolist() == [0, 4, 7, 12, 16, 22] and plain["last_page_len"].tolist() == [5, 16, 1, 1, 1]
    w.run(q, None)
    assert w._plain.runs
    # Positions matter with RoPE: no fallback.
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, pos_encoding_mode="ROPE_LLAMA", q_data_type="bfloat16")
    assert w.plan_stats()["path"] == "cascade" and "position" in w.plan_stats()["reason"]


def test_graph_mode_glue_on_the_cpu(monkeypatch):
    """Graph mode: every level planned every time (no skipping, no fallback), the caller's buffers filled, one mask
    buffer for the padded requests, the batch and the kernels fixed by the first plan."""
    w, merges = _cpu_wrapper(monkeypatch, 2)
    w._use_cuda_graph = True
    w._bufs = [[torch.zeros(n, dtype=torch.int32) for n in sizes] for sizes in ((2, 5), (2, 5), (64, 64), (1, 4))]
    w._prefill = [w._make_prefill(l) for l in range(2)]
    masks = []
    for unique in ([5, 0, 17, 1], [0, 0, 0, 0], [3, 3, 3, 3]):
        qo, kv, idx, last = _cpu_levels([[(4, 40)], [(1, n) for n in unique]])
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="bfloat16")
        st = w.plan_stats()
        assert st["path"] == "cascade" and st["kernels"] == [("batch_prefill", 0), ("batch_decode", 1)]
        assert w._bufs[1][1].tolist()[:5] == kv[1].tolist() and w._bufs[3][1].tolist() == last[1].tolist()
        masks.append(w._plan.steps[1].mask)
        w.run(torch.randn(4, 8, 64).to(torch.bfloat16), None)
        assert merges[-1][-1].tolist() == [n > 0 for n in unique]
    assert masks[0] is masks[1] is masks[2]  # one buffer: a captured merge reads it
    with pytest.raises(ValueError, match="batch size"):
        qo, kv, idx, last = _cpu_levels([[(3, 40)], [(1, 2)] * 3])
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="bfloat16")
    with pytest.raises(ValueError, match="first plan"):
        qo, kv, idx, last = _cpu_levels([[(4, 40)], [(1, 2)] * 4])
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="float16")


def test_shared_level_split_on_the_cpu(monkeypatch):
    """The Hopper shared level's KV split: one wave of CTAs (2 per SM here), chunks of whole 64-key tiles, never
    shorter than 512 keys, fewer when the workspace cannot hold the partial states."""

    class FakeModule:
        constants = {"query_tile": 128, "kv_tile": 64}

        def launcher(self, name):
            return None

    monkeypatch.setattr(cascade.jit, "load", lambda spec: FakeModule())
    monkeypatch.setattr(cascade, "_shared_occupancy", lambda spec, index: 2)
    monkeypatch.setattr(cascade, "num_sms", lambda index: 132)
    cpu = torch.device("cpu")

    def split(batch, prefix, group=4, kv_heads=8, ws_bytes=128 << 20):
        qo, kv, idx, last = _cpu_levels([[(batch, prefix)], [(1, 8)] * batch])
        lv = _check_levels(2, qo, kv, idx, last, 16)[0]
        shared = cascade._SharedLevel(torch.empty(ws_bytes, dtype=torch.uint8), "NHD")
        shared.plan(lv, group * kv_heads, kv_heads, 128, 16, torch.bfloat16, torch.bfloat16, None, cpu)
        pl = shared._plan
        assert pl["chunk_size"] % 64 == 0 and pl["chunks"] * pl["chunk_size"] >= prefix
        assert (pl["chunks"] - 1) * pl["chunk_size"] < prefix
        assert pl["pages"].tolist() == lv.indices.tolist() and pl["sm_scale"] == pytest.approx(128**-0.5)
        return pl["chunks"], pl["chunk_size"]

    assert split(64, 32768) == (16, 2048)  # 2 query tiles x 8 heads x 16 chunks = 256 CTAs of 264 slots
    assert split(8, 131072) == (33, 4032)
    assert split(64, 40) == (1, 64)
    assert split(64, 3000) == (6, 512)  # chunks of at least 512 keys
    assert split(1024, 32768) == (1, 32768)  # 32 query tiles x 8 heads fill the GPU alone
    chunks, _ = split(64, 32768, ws_bytes=8 << 20)  # 16 chunks' partial states need 17 MB
    assert chunks < 16 and chunks * 64 * 32 * 129 * 4 <= 8 << 20


def test_legacy_decode_wrapper_plans_q_and_kv_in_data_type(monkeypatch):
    """begin_forward(data_type=...) is the dtype of q and of the caches: the batch decode plan gets it as both
    (FlashInfer's plan lets data_type fill only a None q_data_type, whose default is float16, so passing it as
    data_type alone planned f16 q against bf16 caches: a TypeError on the GPU)."""
    from flashinfer import decode

    class FakeDecode(_FakeWrapper):
        real = decode.BatchDecodeWithPagedKVCacheWrapper

    monkeypatch.setattr(cascade, "BatchDecodeWithPagedKVCacheWrapper", FakeDecode)
    w = flashinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), "HND")
    indptr, last = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([5, 16], dtype=torch.int32)
    w.begin_forward(indptr, torch.arange(3, dtype=torch.int32), last, 8, 2, 64, 16, data_type=torch.bfloat16)
    p = w._batch_decode_wrapper.plans[-1]
    assert p["q_data_type"] == torch.bfloat16 and p["kv_data_type"] == torch.bfloat16
    assert p.get("data_type") is None


def test_fp8_dtype_rules_and_refusals(monkeypatch):
    """kv_data_type takes q's 16-bit dtype or fp8 (by dtype or name; None: q's); an fp8 q is NotImplementedError
    naming the combination, any other mix TypeError; the levels are planned with the KV dtype."""
    w, _ = _cpu_wrapper(monkeypatch, 2)
    w._fallback = "never"
    qo, kv, idx, last = _cpu_levels([[(3, 300)], [(1, 5), (1, 0), (1, 17)]])
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    with pytest.raises(NotImplementedError, match="q torch.float8_e4m3fn with KV torch.float8_e4m3fn"):
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type=e4)
    with pytest.raises(NotImplementedError, match="q torch.float8_e5m2 with KV torch.float8_e4m3fn"):
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="float8_e5m2", kv_data_type=e4)
    with pytest.raises(TypeError, match="the KV dtype must be q.s .* or fp8"):
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float16)
    with pytest.raises(TypeError, match="float32"):
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float32)
    for kv_data_type, want in (("e5m2", e5), ("torch.float8_e4m3fn", e4), (None, torch.float16)):
        w.plan(qo, kv, idx, last, 8, 2, 64, 16, kv_data_type=kv_data_type)
        assert w._prefill[0].plans[-1]["kv_data_type"] == want and w._decode.plans[-1]["kv_data_type"] == want
        assert w._prefill[0].plans[-1]["q_data_type"] == torch.float16  # FlashInfer's default q
        st = w.plan_stats()
        assert st["kv_data_type"] == str(want)[6:] and ("fp8_kv" in st) == (want != torch.float16)


def test_fp8_scales_reach_every_level_on_the_cpu(monkeypatch):
    """run()'s k_scale/v_scale go to every level (each folds k_scale into its logits and applies v_scale to its
    output before the merge: once per level, never again after it), and to the plain-decode fallback."""
    w, merges = _cpu_wrapper(monkeypatch, 3)
    w._fallback = "never"
    qo, kv, idx, last = _cpu_levels([[(5, 300)], [(2, 64), (3, 16)], [(1, n) for n in [5, 0, 17, 1, 33]]])
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="bfloat16", kv_data_type="e4m3")
    q = torch.randn(5, 8, 64).to(torch.bfloat16)
    o = w.run(q, None, k_scale=0.5, v_scale=torch.tensor(3.0))
    runs = [w._prefill[0].runs[-1], w._prefill[1].runs[-1], w._decode.runs[-1]]
    assert all(r["k_scale"] == 0.5 and r["v_scale"] == 3.0 for r in runs)
    assert len(merges) == 2 and merges[-1][4] is o  # merged in place, not scaled again
    w.run(q, None)
    assert w._decode.runs[-1]["k_scale"] == 1.0 and w._decode.runs[-1]["v_scale"] == 1.0
    with pytest.raises(TypeError, match="k_scale must be a number"):
        w.run(q, None, k_scale="2")
    w._fallback = "always"
    qo, kv, idx, last = _cpu_levels([[(5, 16)], [(5, 32)], [(1, n) for n in [5, 0, 17, 1, 33]]])
    w.plan(qo, kv, idx, last, 8, 2, 64, 16, q_data_type="bfloat16", kv_data_type="e5m2")
    assert w.plan_stats()["path"] == "plain_decode" and w._plain.plans[-1]["kv_data_type"] == torch.float8_e5m2
    w.run(q, None, k_scale=0.25, v_scale=2.0)
    assert w._plain.runs[-1]["k_scale"] == 0.25 and w._plain.runs[-1]["v_scale"] == 2.0


def test_fp8_plan_picks_the_fp8_kernels_on_a_fake_hopper(monkeypatch):
    """On a (fake) Hopper GPU an fp8 cache's shared level takes the wgmma kernel's fp8 module (launched with k_scale
    folded into the softmax scale and v_scale as its output scale), or with _shared_level_wgmma_fp8 off the fp8
    batch prefill module; the decode level the fp8 batch decode module, launched likewise. Every module the fp8
    GPU tests plan is in the test prewarm preset."""
    from fake_cuda import cuda, fake_cuda, workspace
    from flashinfer import cli
    from flashinfer._families import load_families
    from flashinfer.cli import matrix
    from flashinfer.utils import FP8_DTYPE_SHORT

    merges = []
    monkeypatch.setattr(cascade, "_launch_pair", lambda *a: merges.append(a))
    monkeypatch.setattr(cascade, "num_sms", lambda index: 132)
    monkeypatch.setattr(cascade, "current_stream_ptr", lambda device: 0)
    cascade._is_hopper.cache_clear()
    cascade._shared_occupancy.cache_clear()
    loaded = set()
    scale = 128**-0.5 * 0.5
    try:
        with fake_cuda(monkeypatch) as rec:
            qo, kv, idx, last = _cpu_levels([[(4, 3000)], [(1, n) for n in [5, 0, 17, 300]]])
            q = cuda(torch.randn(4, 32, 128).to(torch.bfloat16))
            num_pages = max(int(i.max()) for i in idx) + 1
            cache = cuda(torch.randn(num_pages, 2, 16, 4, 128).to(torch.float8_e4m3fn))
            for wgmma in (True, False):
                w = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD")
                w._fallback, w._overlap_levels, w._shared_level_wgmma_fp8 = "never", "never", wgmma
                rec.loaded.clear()
                w.plan(qo, kv, idx, last, 32, 4, 128, 16, q_data_type=torch.bfloat16, kv_data_type=torch.float8_e4m3fn)
                st = w.plan_stats()
                shared = "shared_prefix_wgmma" if wgmma else "batch_prefill"
                assert st["kernels"] == [(shared, 0), ("batch_decode", 1)] and "fp8_kv" in st, st
                got = {(s.family, s.dtype_kv) for s in rec.loaded}  # (the decode module: loaded once, then cached)
                assert ("cascade_shared" if wgmma else "prefill_batch", "e4m3") in got
                assert got <= {("cascade_shared" if wgmma else "prefill_batch", "e4m3"), ("decode_batch_paged", "e4m3")}
                loaded |= {s.name() for s in rec.loaded}  # (modules are cached: later plans do not load them again)
                rec.clear()
                w.run(q, cache, k_scale=0.5, v_scale=1.75)
                if wgmma:
                    ((_, pre),) = rec.launches("flashinfer_cascade_shared_prefill")
                    assert pre["sm_scale"] == pytest.approx(scale) and pre["v_scale"] == pytest.approx(1.75)
                    assert pre["num_chunks"] > 1 and pre["kv_len"] == 3000 and pre["qo_len"] == 4
                else:
                    ((_, pre),) = rec.launches("flashinfer_batch_prefill")
                    assert pre["args.sm_scale"] == pytest.approx(scale) and pre["args.v_scale"] == pytest.approx(1.75)
                ((_, dec),) = rec.launches("flashinfer_batch_decode_run")
                assert dec["args.sm_scale"] == pytest.approx(scale) and dec["args.v_scale"] == pytest.approx(1.75)
                assert pre["_spec"].dtype_kv == dec["_spec"].dtype_kv == "e4m3"
                assert len(merges) == (1 if wgmma else 2)
                # The shared level's fp8 module refuses a 16-bit cache (the planned kv_data_type).
                with pytest.raises(ValueError if wgmma else TypeError, match="kv_data_type"):
                    w.run(q, cuda(torch.randn(num_pages, 2, 16, 4, 128).to(torch.bfloat16)))
            # A 16-bit shared level on the wgmma kernel with scales: k_scale folded, v_scale applied after the kernel
            # (to its output, which the fake launch leaves at the 1.0 that fake device memory starts with).
            w._overlap_levels, w._shared_level_fa3_ws = "never", False
            w.plan(qo, kv, idx, last, 32, 4, 128, 16, q_data_type=torch.bfloat16)
            assert w.plan_stats()["kernels"][0] == ("shared_prefix_wgmma", 0)
            rec.clear()
            o = w.run(q, cuda(torch.randn(num_pages, 2, 16, 4, 128).to(torch.bfloat16)), k_scale=0.5, v_scale=1.75)
            ((_, pre),) = rec.launches("flashinfer_cascade_shared_prefill")
            assert pre["sm_scale"] == pytest.approx(scale) and pre["v_scale"] == 1.0 and pre["_spec"].dtype_kv == "bf16"
            assert (o.as_subclass(torch.Tensor).float() == 1.75).all()
            # The GPU tests' fp8 plans: the modules they load.
            for (q_dtype, kv_dtype, *_), ((n_levels, mode), (levels, (hq, hkv))), (
                ps,
                layout,
            ), wgmma in itertools.product(FP8_CASES, FP8_LEVELS.items(), [(1, "HND"), (16, "NHD")], (True, False)):
                qo, kv, idx, last = _cpu_levels(levels, ps)
                w = flashinfer.MultiLevelCascadeAttentionWrapper(n_levels, workspace(), layout)
                w._fallback, w._shared_level_wgmma_fp8 = "never", wgmma
                rec.loaded.clear()
                w.plan(
                    qo,
                    kv,
                    idx,
                    last,
                    hq,
                    hkv,
                    128,
                    ps,
                    causal=mode == "prefill",
                    q_data_type=q_dtype,
                    kv_data_type=kv_dtype,
                )
                assert w.plan_stats()["kernels"][0][0] == ("shared_prefix_wgmma" if wgmma else "batch_prefill")
                assert all(s.dtype_kv == FP8_DTYPE_SHORT[kv_dtype] for s in rec.loaded)
                loaded |= {s.name() for s in rec.loaded}
    finally:
        cascade._is_hopper.cache_clear()
        cascade._shared_occupancy.cache_clear()
    args = cli.build_parser().parse_args(["prewarm", "--preset", "test"])
    families = load_families()
    per_family, typed = matrix.resolve_selection(args, families)
    preset = {it.name for it in matrix.expand_matrix(per_family, families, typed) if it.reason is None}
    assert {n.split("_q-")[0] for n in loaded} == {"cascade_shared", "prefill_batch_paged", "decode_batch_paged"}
    assert not sorted(loaded - preset), sorted(loaded - preset)


def test_fp8_legacy_wrappers_plan_the_cache_dtype(monkeypatch):
    """BatchDecodeWithSharedPrefixPagedKVCacheWrapper: data_type fp8 plans an fp8 cache with a float16 q (FlashInfer's
    rule: data_type fills only a None q_data_type, whose default is float16). BatchPrefillWithSharedPrefix...: the
    schedule follows the unique cache's dtype. Both pass forward()'s k_scale/v_scale to the shared prefix and to the
    unique pages."""
    from fake_cuda import cuda
    from flashinfer import decode, prefill

    class FakeDecode(_FakeWrapper):
        real = decode.BatchDecodeWithPagedKVCacheWrapper

    class FakePrefill(_FakeWrapper):
        real = prefill.BatchPrefillWithPagedKVCacheWrapper

    shared_calls = []

    def fake_single_prefill(q, k, v, **kw):
        shared_calls.append(kw)
        return torch.zeros_like(q), torch.zeros(q.shape[:2])

    monkeypatch.setattr(cascade, "BatchDecodeWithPagedKVCacheWrapper", FakeDecode)
    monkeypatch.setattr(cascade, "BatchPrefillWithPagedKVCacheWrapper", FakePrefill)
    monkeypatch.setattr(cascade, "single_prefill_with_kv_cache", fake_single_prefill)
    monkeypatch.setattr(cascade, "merge_state_in_place", lambda *a: None)
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    indptr, last = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([5, 16], dtype=torch.int32)
    dec = flashinfer.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws, "NHD")
    dec.begin_forward(indptr, torch.arange(3, dtype=torch.int32), last, 8, 2, 64, 16, data_type="float8_e5m2")
    p = dec._batch_decode_wrapper.plans[-1]
    assert p["q_data_type"] == torch.float16 and p["kv_data_type"] == torch.float8_e5m2
    q = torch.randn(2, 8, 64).half()
    k_shared = torch.randn(40, 2, 64).to(torch.float8_e5m2)
    dec.forward(q, k_shared, k_shared, None, k_scale=0.5, v_scale=2.0)
    assert shared_calls[-1]["k_scale"] == 0.5 and shared_calls[-1]["v_scale"] == 2.0
    assert dec._batch_decode_wrapper.runs[-1]["k_scale"] == 0.5 and dec._batch_decode_wrapper.runs[-1]["v_scale"] == 2.0

    pre = flashinfer.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(ws, "NHD")
    pre.begin_forward(
        torch.tensor([0, 3, 5], dtype=torch.int32), indptr, torch.arange(3, dtype=torch.int32), last, 8, 2, 64, 16
    )
    q = torch.randn(5, 8, 64).to(torch.bfloat16)
    for kv_dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float8_e4m3fn):
        cache = cuda(torch.randn(4, 2, 16, 2, 64).to(kv_dtype))
        pre.forward(q, k_shared, k_shared, cache, causal=True, k_scale=0.25, v_scale=4.0)
        p = pre._batch_prefill_wrapper.plans[-1]
        assert p["kv_data_type"] == kv_dtype and p["q_data_type"] == torch.bfloat16 and p["causal"] is True
        assert pre._batch_prefill_wrapper.runs[-1]["k_scale"] == 0.25
        assert shared_calls[-1]["v_scale"] == 4.0 and shared_calls[-1]["causal"] is False
    assert len(pre._batch_prefill_wrapper.plans) == 3  # re-planned whenever the cache's dtype changes
    pre.forward(q, k_shared, k_shared, cache)
    assert len(pre._batch_prefill_wrapper.plans) == 4 and pre._batch_prefill_wrapper.runs[-1]["k_scale"] is None

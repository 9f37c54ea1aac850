"""flashinfer.sampling: sampling, filters, renormalisation, masking, softmax and chain speculative sampling.

Three kinds of checks:

* exact: a probability row's sample is a function of the row, the filters and one Philox draw
  (tests/sampling_reference.py); the GPU must return exactly the reference's tokens (and, on the CPU, the emulated
  device code must, for logit rows too);
* statistical, at fixed seeds: ~10^6 draws of small known distributions against the exact filtered and
  renormalised distribution (chi-square at a false-positive rate of ~3e-7 per test), and no draw ever outside the
  kept set;
* the transforms (renorm, mask, softmax) against float64 references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flashinfer
import sampling_reference as R
from flashinfer import sampling
from flashinfer.sampling import SamplingSpec

GPU = "cuda"
N_DRAWS = 1 << 20

# ----------------------------------------------------------------------------------------- helpers


def chi2_bound(df: int, z: float = 5.0) -> float:
    """Upper quantile of chi-square(df) at normal deviate z (Wilson-Hilferty; z = 5: p ~ 3e-7)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_distribution(samples: torch.Tensor, p: np.ndarray, what: str = "") -> None:
    """Every draw inside the support of p, and the counts consistent with p (chi-square, bins of expected count < 20
    merged)."""
    n = samples.numel()
    s = samples.long().cpu()
    assert int(s.min()) >= 0 and int(s.max()) < len(p), f"{what}: token out of range"
    counts = torch.bincount(s, minlength=len(p)).numpy()
    outside = int(counts[p == 0].sum())
    assert outside == 0, (
        f"{what}: {outside} draws outside the kept set, e.g. {np.nonzero((counts > 0) & (p == 0))[0][:5]}"
    )
    e = n * p
    big = e >= 20
    tail = (~big) & (p > 0)
    obs, exp = list(counts[big].astype(np.float64)), list(e[big])
    if tail.any():
        if e[tail].sum() >= 20 or not exp:
            obs.append(float(counts[tail].sum()))
            exp.append(float(e[tail].sum()))
        else:  # a thin tail: fold it into the smallest bin
            i = int(np.argmin(exp))
            obs[i] += float(counts[tail].sum())
            exp[i] += float(e[tail].sum())
    obs, exp = np.array(obs), np.array(exp)
    if len(exp) == 1:
        assert obs[0] == n, what
        return
    x2 = float(((obs - exp) ** 2 / exp).sum())
    assert x2 < chi2_bound(len(exp) - 1), (
        f"{what}: chi-square {x2:.1f} over {len(exp) - 1} dof (bound {chi2_bound(len(exp) - 1):.1f})"
    )


def draws(fn, row: torch.Tensor, *args, n: int = N_DRAWS, **kw) -> torch.Tensor:
    """n independent draws from one row (n outputs indexing it: each output position draws its own number)."""
    idx = torch.zeros(n, dtype=torch.int32, device=row.device)
    return fn(row.view(1, -1), *args, indices=idx, **kw)


def zipf_probs(vocab: int, gen: torch.Generator, zeros: float = 0.0, s: float = 1.1) -> torch.Tensor:
    """A Zipf-like distribution over a shuffled vocabulary, with a fraction of exact zeros."""
    p = torch.arange(1, vocab + 1, dtype=torch.float64) ** -s
    p = p[torch.randperm(vocab, generator=gen)]
    if zeros:
        p[torch.randperm(vocab, generator=gen)[: int(vocab * zeros)]] = 0
    return (p / p.sum()).float()


def exact_tokens(x: torch.Tensor, seed: int, offset: int, indices=None, **filters_per_row):
    """The reference (token, valid) of each output row; filter values scalar or per output row."""
    rows = x.float().cpu().numpy()
    idx = indices.cpu().tolist() if indices is not None else range(rows.shape[0])
    out = []
    for i, src in enumerate(idx):
        f = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in filters_per_row.items()}
        out.append(R.sample_row(rows[src], R.random64(seed, offset, i), **f))
    return [t for t, _ in out], [v for _, v in out]


# ----------------------------------------------------------------------------------------- CPU


def test_spec_names_axes_and_json():
    specs = SamplingSpec.expand()
    assert {s.name() for s in specs} == {"sampling_f32", "sampling_bf16", "sampling_f16"}
    for s in specs:
        assert SamplingSpec.from_json(s.to_json()) == s and s.unsupported_reason() is None
    assert SamplingSpec("f64").unsupported_reason()
    assert "sampling" in flashinfer.jit.spec.spec_families()
    from flashinfer._families import FAMILY_MODULES

    assert FAMILY_MODULES["sampling"] == "flashinfer.sampling"


def test_template_renders_every_launcher():
    from flashinfer.jit.templating import render

    text = "".join(render(SamplingSpec("bf16")).values())
    for launcher in SamplingSpec.launchers:
        assert f"{launcher.symbol}(" in text
    assert "using DType = __nv_bfloat16;" in text


def test_public_api_is_flashinfers():
    import inspect

    names = [
        "sampling_from_probs",
        "sampling_from_logits",
        "top_p_sampling_from_probs",
        "top_k_sampling_from_probs",
        "min_p_sampling_from_probs",
        "top_k_top_p_sampling_from_logits",
        "top_k_top_p_sampling_from_probs",
        "top_p_renorm_probs",
        "top_k_renorm_probs",
        "top_k_mask_logits",
        "softmax",
        "chain_speculative_sampling",
    ]
    for n in names:
        assert getattr(flashinfer, n) is getattr(sampling, n)
    assert sampling.top_p_renorm_prob is sampling.top_p_renorm_probs
    assert sampling.top_k_renorm_prob is sampling.top_k_renorm_probs
    sig = inspect.signature(sampling.top_k_top_p_sampling_from_logits)
    assert list(sig.parameters) == [
        "logits",
        "top_k",
        "top_p",
        "indices",
        "filter_apply_order",
        "deterministic",
        "generator",
        "check_nan",
        "seed",
        "offset",
    ]
    assert sig.parameters["filter_apply_order"].default == "top_k_first"
    sig = inspect.signature(sampling.top_p_sampling_from_probs)
    assert list(sig.parameters) == [
        "probs",
        "top_p",
        "indices",
        "deterministic",
        "generator",
        "check_nan",
        "seed",
        "offset",
        "return_valid",
    ]
    sig = inspect.signature(sampling.chain_speculative_sampling)
    assert list(sig.parameters)[:5] == [
        "draft_probs",
        "draft_token_ids",
        "target_probs",
        "maybe_output_accepted_token_num",
        "maybe_output_emitted_draft_token_num",
    ]
    assert list(inspect.signature(sampling.softmax).parameters) == ["logits", "temperature", "enable_pdl"]


def test_cpu_inputs_are_refused():
    x = torch.rand(2, 10)
    with pytest.raises(ValueError, match="CUDA"):
        sampling.sampling_from_probs(x)
    with pytest.raises(ValueError, match="CUDA"):
        sampling.top_k_top_p_sampling_from_logits(x, 3, 0.5)
    with pytest.raises(ValueError, match="CUDA"):
        sampling.softmax(x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sampling.top_k_mask_logits([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="filter_apply_order"):
        sampling.top_k_top_p_sampling_from_probs(x, 3, 0.5, filter_apply_order="both")


def test_parameter_validation_on_the_host():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="0-dimensional"):
        sampling._param(torch.tensor(0.5), "top_p", 4, cpu, False)
    with pytest.raises(ValueError, match="got a 2D tensor"):
        sampling._param(torch.ones(4, 2), "top_p", 4, cpu, False)
    with pytest.raises(ValueError, match="batch size mismatch"):
        sampling._param(torch.ones(3), "top_p", 4, cpu, False)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        sampling._param(1.5, "top_p", 4, cpu, False, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        sampling._param(float("nan"), "min_p", 4, cpu, False, 0.0, 1.0)
    with pytest.raises(TypeError, match="int"):
        sampling._param(2.5, "top_k", 4, cpu, True)
    with pytest.raises(TypeError, match="int"):
        sampling._param(True, "top_k", 4, cpu, True)
    t, v = sampling._param(torch.tensor([1, 2, 3, 4], dtype=torch.int64), "top_k", 4, cpu, True)
    assert t.dtype == torch.int32 and v == 0
    assert sampling._param(7, "top_k", 4, cpu, True) == (None, 7)
    assert sampling._param(2**40, "top_k", 4, cpu, True) == (None, 2**31 - 1)


def test_seed_and_offset_validation_on_the_host():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="together"):
        sampling._seed_offset(None, 1, None, cpu, 4, 4)
    with pytest.raises(ValueError, match="not both"):
        sampling._seed_offset(torch.Generator(), 1, 2, cpu, 4, 4)
    with pytest.raises(ValueError, match="both be tensors"):
        sampling._seed_offset(None, torch.tensor([1]), 2, cpu, 4, 4)
    with pytest.raises(ValueError, match="int64"):
        sampling._seed_offset(None, torch.tensor([1], dtype=torch.int32), torch.tensor([1]), cpu, 4, 4)
    with pytest.raises(ValueError, match="length"):
        sampling._seed_offset(None, torch.tensor([1, 2]), torch.tensor([1]), cpu, 4, 4)
    assert sampling._seed_offset(None, -1, 5, cpu, 4, 4) == (None, 2**64 - 1, None, 5)
    s, sv, o, ov = sampling._seed_offset(None, torch.tensor([3]), torch.tensor([1, 2, 3, 4]), cpu, 4, 4)
    assert s.numel() == 1 and o.numel() == 4 and sv == ov == 0


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_sampling_module_builds(tmp_path, monkeypatch, dtype):
    """A real nvcc build (no launch), without spills: the streamed kernels sit at the 128 registers of two CTAs an SM,
    and a 16-bit row's unrolled appends once spilled 400-624 bytes there (ptxas, CUDA 13.0)."""
    from flashinfer import jit

    monkeypatch.setenv("FLASHINFER_JIT_CACHE", str(tmp_path / "cache"))
    spec = SamplingSpec(dtype)
    report = jit.ensure_built(spec)
    assert report.status == "built"
    log = report.log_path.read_text()
    assert "spill" in log and all("0 bytes spill stores" in ln for ln in log.splitlines() if "spill stores" in ln)
    module = jit.load(spec)
    for launcher in spec.launchers:
        assert module.launcher(launcher.symbol) is not None
    c = module.constants
    assert c["max_vocab"] == 1 << 20
    assert {c["filter_top_k"], c["filter_top_p"], c["filter_min_p"]} == {1, 2, 4}
    assert sorted(c[f"op_{n}"] for n in ("softmax", "top_p_renorm", "top_k_renorm", "top_k_mask")) == [0, 1, 2, 3]


# ---------------------------------------------------------------- CPU: the device code, emulated

emu_unavailable = None
try:
    import _sampling_emu as emu

    emu_unavailable = emu.available()
except Exception as e:  # pragma: no cover
    emu_unavailable = str(e)
needs_emu = pytest.mark.skipif(emu_unavailable is not None, reason=f"sampling emulator: {emu_unavailable}")


def test_reference_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10 (counter 0, key 0).
    assert R.philox4x32_10(0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@needs_emu
def test_emulated_helpers_agree_with_the_reference():
    for args in [(0, 0, 0, 0), (123, 456, 7, 0), (2**63 + 5, 2**40 + 3, 99, 3), (2**64 - 1, 2**64 - 1, 2**32 - 1, 9)]:
        assert tuple(emu.philox(*args)) == R.philox4x32_10(*args)
    vals = [0.0, -0.0, 1e-45, 1e-38, 0.3, 1.0, 3.0e38, float("inf"), float("-inf"), float("nan"), -2.0, -1e-30]
    lib = emu.lib()
    assert [lib.emu_logit_key(v) for v in vals] == R.logit_keys(np.array(vals, dtype=np.float32)).tolist()
    assert [lib.emu_prob_key(v) for v in vals] == R.prob_keys(np.array(vals, dtype=np.float32)).tolist()
    finite = sorted(v for v in vals if v == v and v != float("-inf"))
    keys = R.logit_keys(np.array(finite, dtype=np.float32)).tolist()
    assert keys == sorted(keys) and len(set(keys)) == len(keys) - 1  # (-0 and +0 share a key)
    ws = np.array([0, 1e-45, 1e-30, 0.5, 0.999, 1.0, 1.7], dtype=np.float32)
    for ref in (0, -20, 3):
        got = [lib.emu_fixed_weight(float(w), ref) for w in ws if w < 2.0 ** (ref + 1)]
        assert got == R.fixed_weights(ws[ws < 2.0 ** (ref + 1)], ref).tolist()
    for frac, total in [(0.0, 10), (0.5, 3), (0.9, 2**57 + 1), (1.0, 7), (0.3, 1)]:
        assert lib.emu_mass_target(frac, total) == R.mass_target(frac, total)


@needs_emu
def test_emulated_row_select_shortcuts_are_exact():
    # The branch-free forms row_select_kernel uses against the functions they stand for: logit keys, the fast round's
    # last-bin weights (float scaling instead of fixed_weight's shifts), and Divider's fast path (the reciprocal once
    # per row, seeded an ulp off as rcp.approx may be) against the correctly rounded quotient.
    lib = emu.lib()
    assert lib.emu_check_logit_key_flat(1, 1_000_000) == 0
    assert lib.emu_check_last_weight(2, 1_000_000) == 0
    assert lib.emu_check_divider(3, 1_000_000) == 0


def _emu_case(rng, vocab, kind, dtype):
    pad = int(rng.integers(0, 4))
    if kind == "probs":
        buf = torch.from_numpy(rng.random((2, vocab + pad)).astype(np.float32)) ** 4
        buf[:, rng.random(vocab + pad) < 0.2] = 0
        buf[1, rng.integers(0, vocab + pad)] = float("nan")
    elif kind == "ties":
        buf = torch.from_numpy(rng.integers(1, 4, (2, vocab + pad)).astype(np.float32))
    elif kind == "sorted":
        buf = torch.linspace(-4, 4, vocab + pad).repeat(2, 1)
    else:
        buf = torch.from_numpy(rng.standard_normal((2, vocab + pad)).astype(np.float32)) * 3
        buf[1, rng.random(vocab + pad) < 0.3] = float("-inf")
    return buf.to(dtype)[:, pad : pad + vocab]


@needs_emu
@pytest.mark.parametrize("case", range(24))
def test_emulated_sampler_matches_the_exact_definition(case):
    """The device code, run on the CPU: every token equals the reference's, whatever the cluster size, caching or
    route (single-pass top-k, radix rounds, rank-0 or distributed sampling)."""
    rng = np.random.default_rng(1000 + case)
    vocab = [3, 100, 1000, 5000, 40000][case % 5]
    logits = case % 2 == 1
    dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3] if logits else torch.float32
    kind = ["logits", "sorted", "ties"][case % 3] if logits else ["probs", "ties", "sorted"][case % 3]
    x = _emu_case(rng, vocab, kind, dtype)
    filt = ["none", "k", "p", "kp_first", "kp_joint", "minp"][case % 6]
    if logits and filt in ("p", "minp"):
        filt = "kp_joint"
    k = int(rng.choice([1, 7, 50, 128, 300]))
    p = float(rng.choice([0.0, 0.3, 0.9]))
    bits = {"none": 0, "k": 1, "p": 2, "kp_first": 3, "kp_joint": 3, "minp": 4}[filt]
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    cluster = int(rng.choice([0, 1, 2, 8]))
    cached = int(rng.choice([-1, 0, 1]))
    samples, valid = emu.sample(
        x,
        logits=logits,
        filters=bits,
        top_k_first=filt != "kp_joint",
        top_k=k,
        top_p=p,
        min_p=0.2,
        seed=seed,
        offset=offset,
        cluster=cluster,
        cached=cached,
        sched_seed=case,
    )
    for b in range(x.size(0)):
        kw = {"top_k_first": filt != "kp_joint"}
        if filt in ("k", "kp_first", "kp_joint"):
            kw["top_k"] = k
        if filt in ("p", "kp_first", "kp_joint"):
            kw["top_p"] = p
        if filt == "minp":
            kw["min_p"] = 0.2
        row = x[b].float()
        w = emu.weights(row, logits) if logits else None
        want = R.sample_row(row.numpy(), R.random64(seed, offset, b), logits=logits, weights_fx=w, **kw)
        assert (int(samples[b]), bool(valid[b])) == want, (b, filt, k, p, cluster, cached)


@needs_emu
def test_emulated_indices_and_per_row_parameters():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((3, 700)).astype(np.float32))
    idx = torch.tensor([2, 0, 2, 5, -1, 1], dtype=torch.int64)  # 5 and -1: outside the rows
    k = torch.tensor([3, 0, 700, 10, 10, 1], dtype=torch.int32)
    p = torch.tensor([0.5, 1.0, 0.2, 0.9, 0.9, 0.0], dtype=torch.float32)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16], dtype=torch.int64)
    samples, valid = emu.sample(x, logits=False, filters=3, top_k=k, top_p=p, indices=idx, seed_arr=seeds, offset=9)
    assert samples.dtype == torch.int64
    for i, src in enumerate(idx.tolist()):
        if not 0 <= src < 3:
            assert (int(samples[i]), bool(valid[i])) == (0, False)
            continue
        want = R.sample_row(x[src].numpy(), R.random64(int(seeds[i]), 9, i), top_k=int(k[i]), top_p=float(p[i]))
        assert (int(samples[i]), bool(valid[i])) == want


@needs_emu
@pytest.mark.parametrize("case", range(8))
def test_emulated_row_transforms_match_references(case):
    rng = np.random.default_rng(2000 + case)
    vocab = [7, 333, 2000, 5000][case % 4]
    dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
    pad = case % 3
    cluster, cached = [(0, -1), (1, 0), (4, 1), (16, 0)][case % 4]
    logits = torch.from_numpy(rng.standard_normal((2, vocab + pad)).astype(np.float32) * 4)
    logits[1, rng.random(vocab + pad) < 0.3] = float("-inf")
    logits = logits.to(dtype)[:, pad:]
    probs = torch.softmax(logits.float(), -1).to(dtype)
    k = int(rng.choice([1, 5, 100, 129, 5000]))
    # mask: exact
    out = emu.row_op(logits, emu.OP_TOP_K_MASK, top_k=k, cluster=cluster, cached=cached)
    for b in range(2):
        row = logits[b].float()
        valid = int(((row > float("-inf")) & ~row.isnan()).sum())
        mask = torch.from_numpy(R.kept_mask(row.numpy(), logits=True, weights_fx=emu.weights(row, True), top_k=k))
        want = torch.where(mask, row, torch.tensor(float("-inf"))) if 0 < k < valid else row
        assert torch.equal(out[b].float(), want)
    # renorm: the kept set exactly, the values to the dtype's rounding
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    for op, kw, filters in (
        (emu.OP_TOP_K_RENORM, {"top_k": k}, {"top_k": k}),
        (emu.OP_TOP_P_RENORM, {"top_p": 0.8}, {"top_p": 0.8}),
    ):
        x = probs if op == emu.OP_TOP_K_RENORM else probs.float()
        out = emu.row_op(x, op, cluster=cluster, cached=cached, **kw)
        for b in range(2):
            row = x[b].float().numpy()
            mask = R.kept_mask(row, **filters)
            want = np.where(mask, row.astype(np.float64), 0.0)
            want = want / want.sum()
            got = out[b].double().numpy()
            assert np.array_equal(got > 0, want > 0)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 1e-3)
    # softmax with a temperature
    out = emu.row_op(logits, emu.OP_SOFTMAX, temperature=0.7, cluster=cluster, cached=cached)
    want = torch.softmax(logits.double() / 0.7, -1)
    torch.testing.assert_close(out.double(), want, atol=2e-7, rtol=2e-6)


@needs_emu
@pytest.mark.parametrize("cluster,cached", [(1, 1), (4, 0), (16, 1)])
def test_emulated_top_p_renorm_threshold_inside_a_tie(cluster, cached):
    """More than kGatherCap elements share the top-p threshold's key: the radix search narrows to that single key
    without gathering, and the kept mass comes from its last bin (not from a pass over the row)."""
    rng = np.random.default_rng(7)
    vocab, ties = 4000, 1500
    row = np.concatenate([rng.uniform(2.0, 3.0, 100), np.full(ties, 0.4), rng.uniform(0.0, 0.02, vocab - 100 - ties)])
    rng.shuffle(row)
    probs = torch.from_numpy((row / row.sum()).astype(np.float32))[None, :].repeat(2, 1)
    for top_p in (0.5, 0.9):
        out = emu.row_op(probs, emu.OP_TOP_P_RENORM, top_p=top_p, cluster=cluster, cached=cached)
        x = probs[0].numpy()
        mask = R.kept_mask(x, top_p=top_p)
        assert mask.sum() == 100 + ties  # the threshold is the tied key
        want = np.where(mask, x.astype(np.float64), 0.0)
        want = want / want.sum()
        for b in range(2):
            got = out[b].double().numpy()
            assert np.array_equal(got > 0, want > 0)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


@needs_emu
@pytest.mark.parametrize("cluster,cached", [(1, 1), (2, 0), (4, 1)])
def test_emulated_bin_masses_carry_into_their_high_word(cluster, cached):
    """A histogram bin's mass is two 32-bit words updated by separate atomics: 40 ties at the maximum whose fixed-point
    weights have low words of 0x85f00000 wrap the low word every second add, so a lost carry would be off by 2^32
    (1/128 of the maximum's weight) and fail the renormalised values."""
    row = np.full(3000, 1e-5, dtype=np.float32)
    row[:40] = 0.0123
    row[40:400] = np.linspace(0.001, 0.012, 360, dtype=np.float32)
    np.random.default_rng(0).shuffle(row)
    probs = torch.from_numpy(np.stack([row, row[::-1].copy()]))
    for top_p in (0.2, 0.5, 0.9):
        out = emu.row_op(probs, emu.OP_TOP_P_RENORM, top_p=top_p, cluster=cluster, cached=cached).double().numpy()
        for b in range(2):
            x = probs[b].numpy()
            want = np.where(R.kept_mask(x, top_p=top_p), x.astype(np.float64), 0.0)
            assert np.array_equal(out[b] > 0, want > 0)
            np.testing.assert_allclose(out[b], want / want.sum(), rtol=2e-6, atol=1e-12)


def _select_case_row(kind: str, vocab: int, rng) -> np.ndarray:
    if kind == "softmax":
        x = rng.standard_normal(vocab) * 2
        return np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    if kind == "ties":  # two values: the threshold inside a tie
        return np.where(np.arange(vocab) % 7 == 0, 3.0, 1.0) / vocab
    if kind == "equal":  # one key: more than kSelCap elements in the chosen bin, then rounds down to the key
        return np.full(vocab, 0.25)
    if kind == "dense":  # all within 2^-10 of each other: a second (fast) cluster round
        return 1.0 + rng.random(vocab) * 2.0**-10
    if kind == "tail":  # the threshold below the 16-octave window: the last bin, exact masses from then on
        p = np.full(vocab, 2.0**-60) * (1 + rng.random(vocab))
        p[:3] = [1.0, 0.5, 0.25]
        return p
    if kind == "special":  # zeros, negatives, NaN, inf, denormals
        p = rng.random(vocab)
        p[::5] = 0
        p[1::11] = -1
        p[2::13] = np.nan
        p[3::17] = np.inf
        p[4::19] = 1e-40
        return p
    wide = 2.0 ** (-rng.integers(0, 40, vocab).astype(np.float64)) * (1 + rng.random(vocab))
    if kind == "tiny":  # the largest probability near 2^-100 (fixed-point scale beyond a float; slow divisions)
        return wide * 2.0**-100
    if kind == "huge":  # probabilities up to 2^101: the scale below 1, subnormal scaled weights
        return wide * 2.0**100
    if kind == "top":  # three near 2^127 (a kept mass whose reciprocal is subnormal: slow divisions), the sum finite
        p = wide * 2.0**80
        p[:3] = [1.4 * 2.0**126, 2.0**126, 2.0**125]
        return p
    return wide  # "wide"


@needs_emu
@pytest.mark.parametrize(
    "kind", ["softmax", "ties", "equal", "dense", "tail", "special", "wide", "tiny", "huge", "top"]
)
def test_emulated_row_select_is_the_radix_rounds(kind):
    """row_select_kernel (the row transforms over cached slices) returns bit for bit what row_op_kernel's radix
    rounds return, for top-k (0, 1, 2, vocab - 1, vocab, random) and top-p (0, 1e-8, 0.5, 0.999999, 1, NaN), per-row
    parameters, every cluster size, 32- and 16-bit rows; and the top-p kept set is the reference's."""
    rng = np.random.default_rng(len(kind))
    vocab = 3001
    for cluster, dtype in ((1, torch.float32), (2, torch.bfloat16), (4, torch.float32), (16, torch.float16)):
        row = _select_case_row(kind, vocab, rng)
        probs = torch.from_numpy(np.stack([row, row[::-1].copy()]).astype(np.float32)).to(dtype)
        logits = (
            probs.clone() if kind in ("special", "wide", "dense", "huge", "top") else torch.log(probs.float()).to(dtype)
        )
        ks = [0, 1, 2, vocab - 1, vocab, int(rng.integers(1, vocab)), 100, 2500]
        ps = [0.0, 1e-8, 0.5, 0.999999, 1.0, float("nan"), float(rng.random()), 0.9]
        for op in (emu.OP_TOP_K_MASK, emu.OP_TOP_K_RENORM, emu.OP_TOP_P_RENORM):
            x = logits if op == emu.OP_TOP_K_MASK else (probs.float() if op == emu.OP_TOP_P_RENORM else probs)
            values = ps if op == emu.OP_TOP_P_RENORM else ks
            for i in range(0, len(values), 2):
                if op == emu.OP_TOP_P_RENORM:
                    kw = {"top_p": torch.tensor(values[i : i + 2], dtype=torch.float32)}
                else:
                    kw = {"top_k": torch.tensor(values[i : i + 2], dtype=torch.int32)}
                old = emu.row_op(x, op, cluster=cluster, cached=1, radix=True, **kw)
                new = emu.row_op(x, op, cluster=cluster, cached=1, sched_seed=i + 5, **kw)
                bits = torch.int32 if new.element_size() == 4 else torch.int16
                assert torch.equal(new.view(bits), old.view(bits)), (kind, cluster, op, values[i : i + 2])
                if op == emu.OP_TOP_P_RENORM:
                    for b in range(2):
                        xb = x[b].numpy()
                        kept = R.kept_mask(xb, top_p=values[i + b]) & (xb > 0)
                        assert np.array_equal(new[b].numpy() > 0, kept), (kind, cluster, values[i + b])


# The rows compute-sanitizer's memcheck flagged: a 16-byte vector covering a row's last (or first) element reaches
# past the tensor when the vocabulary is not a multiple of the vector width. The emulator fails a launch that reads
# any byte outside the input tensor (emu::global_readable), as memcheck does for bytes outside an exact allocation;
# the bytes around the rows hold large values, so a read of them that leaked into the result changes it.
_EDGE_ROWS = [
    # dtype, vocab, offset of element 0 in its row buffer, row stride (elements), rows gathered through indices
    (torch.float32, 3, 0, 3, False),  # the memcheck report: rows of 12 bytes
    (torch.float32, 3, 1, 5, True),
    (torch.float32, 1030, 2, 1033, False),  # several CTAs per row
    (torch.float16, 5, 0, 5, False),
    (torch.bfloat16, 13, 0, 13, False),
    (torch.float16, 13, 3, 17, True),
    (torch.bfloat16, 5, 1, 7, True),
    (torch.bfloat16, 2049, 5, 2059, False),
]


def _edge_rows(rng, dtype, vocab, start, stride, logits):
    rows = 3
    buf = torch.full((rows, stride), 1e3 if logits else 60.0)
    if logits:
        x = torch.from_numpy(rng.standard_normal((rows, vocab)).astype(np.float32)) * 3
        x[0, rng.random(vocab) < 0.3] = float("-inf")
    else:
        x = torch.from_numpy(rng.random((rows, vocab)).astype(np.float32)) ** 2
        x[0, rng.random(vocab) < 0.3] = 0
    x[1, -1] = x[1].max() + 1  # the row's mass at its ends
    x[2, 0] = x[2].max() + 1
    buf[:, start : start + vocab] = x
    return buf.to(dtype)[:, start : start + vocab]


@needs_emu
@pytest.mark.parametrize("dtype,vocab,start,stride,gathered", _EDGE_ROWS)
def test_emulated_reads_stay_inside_the_rows(dtype, vocab, start, stride, gathered):
    """No vector load reaches outside the input tensor (the last row's tail, the first row's head), cached or
    streamed, on every route, and the elements around a row stay neutral: the tokens are the reference's."""
    rng = np.random.default_rng(vocab * 7 + stride)
    for logits in (False, True):
        x = _edge_rows(rng, dtype, vocab, start, stride, logits)
        idx = torch.tensor([2, 0, 2, 1], dtype=torch.int64) if gathered else None
        src = idx.tolist() if gathered else range(x.size(0))
        for filters, kw in ((0, {}), (1, {"top_k": 2}), (2, {"top_p": 0.7})):
            for cluster, cached in ((0, 0), (0, 1), (2, 0), (2, 1)):
                run = {"logits": logits, "filters": filters, "indices": idx, "cluster": cluster, "cached": cached}
                samples, valid = emu.sample(x, seed=3, offset=vocab, **run, **kw)
                for i, b in enumerate(src):
                    row = x[b].float()
                    w = emu.weights(row, logits) if logits else None
                    want = R.sample_row(row.numpy(), R.random64(3, vocab, i), logits=logits, weights_fx=w, **kw)
                    assert (int(samples[i]), bool(valid[i])) == want, (logits, filters, cluster, cached, i)
    if gathered:
        return
    for cluster, cached in ((0, 0), (0, 1), (2, 0), (2, 1)):
        logits = _edge_rows(rng, dtype, vocab, start, stride, True)
        out = emu.row_op(logits, emu.OP_SOFTMAX, cluster=cluster, cached=cached)
        torch.testing.assert_close(out.double(), torch.softmax(logits.double(), -1), atol=2e-7, rtol=2e-6)
        out = emu.row_op(logits, emu.OP_TOP_K_MASK, top_k=2, cluster=cluster, cached=cached)
        for b in range(logits.size(0)):
            row = logits[b].float()
            mask = R.kept_mask(row.numpy(), logits=True, weights_fx=emu.weights(row, True), top_k=2)
            want = torch.where(torch.from_numpy(mask), row, torch.tensor(float("-inf"))) if vocab > 2 else row
            assert torch.equal(out[b].float(), want), (cluster, cached, b)
        probs = _edge_rows(rng, dtype, vocab, start, stride, False)
        for op, kw in ((emu.OP_TOP_K_RENORM, {"top_k": 2}), (emu.OP_TOP_P_RENORM, {"top_p": 0.7})):
            out = emu.row_op(probs, op, cluster=cluster, cached=cached, **kw)
            for b in range(probs.size(0)):
                row = probs[b].float().numpy()
                want = np.where(R.kept_mask(row, **kw), row.astype(np.float64), 0.0)
                got = out[b].double().numpy()
                assert np.array_equal(got > 0, want > 0), (op, cluster, cached, b)
                np.testing.assert_allclose(got, want / want.sum(), rtol=8e-3, atol=1e-8)


@needs_emu
@pytest.mark.parametrize("vocab", [3, 5])
def test_emulated_chain_speculative_reads_stay_inside_the_target(vocab):
    rng = np.random.default_rng(vocab)
    dp = rng.random((2, 2, vocab)).astype(np.float32)
    dp /= dp.sum(-1, keepdims=True)
    tp = rng.random((2, 3, vocab)).astype(np.float32)
    tp /= tp.sum(-1, keepdims=True)
    ids = rng.integers(0, vocab, (2, 2)).astype(np.int32)
    for seed in range(4):
        out, acc, emi = emu.chain(torch.from_numpy(dp), torch.from_numpy(ids), torch.from_numpy(tp), seed=seed)
        want = _chain_reference(dp, ids, tp, seed, 0)
        assert (out.tolist(), acc.tolist(), emi.tolist()) == tuple(w.tolist() for w in want)


def _chain_reference(dp, ids, tp, seed, offset):
    """Chain speculative sampling by its definition, with the kernels' draws."""
    b, n, vocab = dp.shape
    out = np.full((b, n + 1), -1, dtype=np.int64)
    acc, emi = np.zeros(b, dtype=np.int64), np.zeros(b, dtype=np.int64)
    for r in range(b):

        def accept(i, draw):
            d = int(ids[r, i])
            u = R.uniform(R.philox4x32_10(seed, offset, r, draw)[0])
            return np.float32(u * np.float32(dp[r, i, d])) < np.float32(tp[r, i, d])

        pos = n
        for i in range(n):
            if not accept(i, i):
                pos = i
                break
            out[r, i] = int(ids[r, i])
        acc[r] = pos + sum(accept(i, n + i) for i in range(pos, n))
        emi[r] = pos
        t = tp[r, pos].astype(np.float32)
        d = dp[r, pos].astype(np.float32) if pos < n else np.zeros(vocab, dtype=np.float32)
        diff = (t - d).astype(np.float32)
        w = np.where(diff > 0, R.fixed_weights(np.minimum(np.maximum(diff, 0), 1), 0), np.uint64(0))
        r64 = R.random64(seed, offset, r, 2 * n)
        tok = R.inverse_cdf(w, r64)
        if tok < 0:
            tok = R.inverse_cdf(np.where(t > 0, R.fixed_weights(np.maximum(t, 0), 0), np.uint64(0)), r64)
        out[r, pos] = tok
    return out, acc, emi


@needs_emu
def test_emulated_chain_speculative_sampling_matches_its_definition():
    rng = np.random.default_rng(3)
    for b, n, vocab in ((3, 4, 50), (2, 1, 3000)):
        dp = rng.random((b, n, vocab)).astype(np.float32) ** 3
        dp /= dp.sum(-1, keepdims=True)
        tp = rng.random((b, n + 1, vocab)).astype(np.float32) ** 3
        tp /= tp.sum(-1, keepdims=True)
        tp[0, :n] = dp[0]  # identical distributions: everything accepted
        ids = rng.integers(0, vocab, (b, n)).astype(np.int32)
        out, acc, emi = emu.chain(torch.from_numpy(dp), torch.from_numpy(ids), torch.from_numpy(tp), seed=77, offset=5)
        want = _chain_reference(dp, ids, tp, 77, 5)
        assert out.tolist() == want[0].tolist()
        assert acc.tolist() == want[1].tolist() and emi.tolist() == want[2].tolist()
        assert int(emi[0]) == n


@needs_emu
def test_emulated_top_k_route_gathers_few_candidates():
    """The single-pass top-k route: its bound never exceeds the k-th largest key, and about k candidates reach rank 0
    whatever the cluster size, even for sorted rows."""
    torch.manual_seed(0)
    vocab = 20000
    for row in (torch.randn(vocab), torch.linspace(-3, 3, vocab), torch.randint(0, 5000, (vocab,)).float()):
        keys = np.sort(R.logit_keys(row.numpy()))[::-1]
        for k, cluster in ((1, 16), (50, 1), (50, 4), (128, 16)):
            r = emu.topk_probe(row, k, logits=True, cluster=cluster, cached=0)
            assert r["ok"] and r["theta"] <= keys[k - 1]
            assert r["max_key"] == keys[0] and r["num_valid"] == vocab
            assert k <= r["n"] <= 2 * k + 40, (k, cluster, r["n"])


# ----------------------------------------------------------------------------------------- GPU: exact


def _prob_rows(kind: str, batch: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "softmax":
        x = torch.softmax(torch.randn(batch, vocab, generator=gen) * 3, -1)
    elif kind == "ties":
        x = torch.randint(1, 6, (batch, vocab), generator=gen).float()
    else:  # "zeros": a heavy tail with exact zeros
        x = torch.rand(batch, vocab, generator=gen) ** 4 * (torch.rand(batch, vocab, generator=gen) < 0.5)
        x[:, 0] = 0.5
    return x / x.sum(-1, keepdim=True)


_FILTERS = ["plain", "top_k", "top_p", "min_p", "kp_first", "kp_joint"]


def _call(filt, x, k, p, m, **kw):
    if filt == "plain":
        return sampling.sampling_from_probs(x, **kw)
    if filt == "top_k":
        return sampling.top_k_sampling_from_probs(x, k, **kw)
    if filt == "top_p":
        return sampling.top_p_sampling_from_probs(x, p, **kw)
    if filt == "min_p":
        return sampling.min_p_sampling_from_probs(x, m, **kw)
    order = "top_k_first" if filt == "kp_first" else "joint"
    return sampling.top_k_top_p_sampling_from_probs(x, k, p, filter_apply_order=order, **kw)


def _ref_filters(filt, k, p, m):
    return {
        "plain": {},
        "top_k": {"top_k": k},
        "top_p": {"top_p": p},
        "min_p": {"min_p": m},
        "kp_first": {"top_k": k, "top_p": p, "top_k_first": True},
        "kp_joint": {"top_k": k, "top_p": p, "top_k_first": False},
    }[filt]


@pytest.mark.gpu
@pytest.mark.parametrize("filt", _FILTERS)
@pytest.mark.parametrize("vocab,batch", [(1, 3), (7, 40), (1000, 300), (128256, 5), (300000, 3)])
@pytest.mark.parametrize("kind", ["softmax", "ties", "zeros"])
def test_probs_samples_are_exactly_the_definitions(filt, vocab, batch, kind):
    """Probability rows: every token is the reference's (weights are exact integers, no approximate math), for
    scalar and per-row parameters, aligned and misaligned rows, every launch plan (1 to 300 rows; 300000 entries
    exceed the shared-memory slices)."""
    gen = torch.Generator().manual_seed(vocab * 31 + batch + len(kind))
    x = _prob_rows(kind, batch, vocab, gen)
    k = [int(v) for v in torch.randint(1, 300, (batch,), generator=gen)]
    k[0] = 50
    p = [float(v) for v in torch.rand(batch, generator=gen)]
    p[0] = 0.9
    m = [float(v) for v in torch.rand(batch, generator=gen) * 0.5]
    seed, offset = 1234 + vocab, 77
    # scalar parameters, contiguous rows
    got, valid = _call(filt, x.to(GPU), k[0], p[0], m[0], seed=seed, offset=offset, return_valid=True)
    want, want_valid = exact_tokens(x, seed, offset, **_ref_filters(filt, k[0], p[0], m[0]))
    assert got.tolist() == want and valid.tolist() == want_valid
    # per-row parameters, rows starting 4 bytes past a 16-byte boundary
    buf = torch.zeros(batch, vocab + 3, device=GPU)
    buf[:, 1 : vocab + 1] = x.to(GPU)
    view = buf[:, 1 : vocab + 1]
    kt = torch.tensor(k, device=GPU)
    pt = torch.tensor(p, device=GPU)
    mt = torch.tensor(m, device=GPU)
    got = _call(filt, view, kt, pt, mt, seed=seed + 1, offset=offset)
    want, _ = exact_tokens(x, seed + 1, offset, **_ref_filters(filt, k, p, m))
    assert got.tolist() == want


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_probs_are_read_natively(dtype):
    gen = torch.Generator().manual_seed(4)
    x = _prob_rows("softmax", 17, 5000, gen).to(dtype)
    got = sampling.top_k_top_p_sampling_from_probs(x.to(GPU), 40, 0.8, seed=5, offset=6)
    want, _ = exact_tokens(x.float(), 5, 6, top_k=40, top_p=0.8)
    assert got.tolist() == want


@pytest.mark.gpu
def test_indices_and_output_dtype():
    gen = torch.Generator().manual_seed(8)
    x = _prob_rows("softmax", 4, 999, gen)
    for dtype in (torch.int32, torch.int64):
        idx = torch.tensor([3, 3, 0, 9, -2, 1], dtype=dtype, device=GPU)  # 9 and -2: no such row
        got, valid = sampling.top_k_sampling_from_probs(x.to(GPU), 20, indices=idx, seed=3, offset=4, return_valid=True)
        assert got.dtype == dtype
        assert valid.tolist() == [True, True, True, False, False, True]
        assert got[3].item() == 0 and got[4].item() == 0
        for i, src in enumerate(idx.tolist()):
            if 0 <= src < 4:
                assert got[i].item() == R.sample_row(x[src].numpy(), R.random64(3, 4, i), top_k=20)[0]
    assert sampling.sampling_from_probs(x.to(GPU), seed=1, offset=2).dtype == torch.int32


@pytest.mark.gpu
def test_rows_without_mass():
    x = torch.rand(4, 300, device=GPU)
    x[1] = 0
    x[2] = float("nan")
    x[3, :150] = float("nan")  # half NaN: the NaNs carry no mass
    got, valid = sampling.top_p_sampling_from_probs(x, 0.9, seed=1, offset=0, return_valid=True)
    assert valid.tolist() == [True, False, False, True]
    assert got[1].item() == 0 and got[2].item() == 0 and got[3].item() >= 150
    with pytest.raises(ValueError, match="NaN"):
        sampling.top_p_sampling_from_probs(x, 0.9, check_nan=True)
    logits = torch.full((2, 100), float("-inf"), device=GPU)
    logits[1, 7] = 1.0
    assert sampling.top_k_top_p_sampling_from_logits(logits, 5, 0.5, seed=1, offset=1).tolist() == [0, 7]
    logits[1, 9] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sampling.sampling_from_logits(logits, check_nan=True)


# ----------------------------------------------------------------------------------------- GPU: statistics


@pytest.mark.gpu
@pytest.mark.parametrize("filt", _FILTERS)
@pytest.mark.parametrize("vocab", [16, 1024])
def test_probs_draws_follow_the_filtered_distribution(filt, vocab):
    gen = torch.Generator().manual_seed(vocab + len(filt))
    x = zipf_probs(vocab, gen, zeros=0.1)
    k, p, m = (5 if vocab == 16 else 37), 0.6, 0.05
    s = draws(lambda r, **kw: _call(filt, r, k, p, m, **kw), x.to(GPU), seed=99, offset=0)
    target = R.filtered_distribution(x.numpy(), **_ref_filters(filt, k, p, m))
    assert_distribution(s, target, f"{filt} vocab {vocab}")


@pytest.mark.gpu
def test_ties_at_the_boundary_are_all_kept():
    x = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05], dtype=torch.float32)
    # top-k 3: 0.3, 0.2 and the four 0.1s; top-p 0.55: the head up to the 0.1s (0.3 + 0.2 < 0.55), all four of them
    for fn, args, expect in (
        (sampling.top_k_sampling_from_probs, (3,), [0, 1, 2, 3, 4, 5]),
        (sampling.top_p_sampling_from_probs, (0.55,), [0, 1, 2, 3, 4, 5]),
        (sampling.min_p_sampling_from_probs, (1 / 3 - 1e-3,), [0, 1, 2, 3, 4, 5]),  # pivot 0.0997
        (sampling.min_p_sampling_from_probs, (1 / 3 + 1e-3,), [0, 1]),  # pivot 0.1003
        (sampling.top_p_sampling_from_probs, (0.45,), [0, 1]),
    ):
        s = draws(fn, x.to(GPU), *args, seed=5, offset=5, n=1 << 18)
        target = np.zeros(8)
        target[expect] = x.numpy()[expect]
        assert_distribution(s, target / target.sum(), f"{fn.__name__}{args}")


@pytest.mark.gpu
def test_all_mass_on_one_token_and_exact_zeros():
    x = torch.zeros(1000)
    x[417] = 1.0
    for fn, args in (
        (sampling.sampling_from_probs, ()),
        (sampling.top_p_sampling_from_probs, (0.9,)),
        (sampling.top_k_sampling_from_probs, (10,)),
        (sampling.min_p_sampling_from_probs, (0.5,)),
    ):
        assert set(draws(fn, x.to(GPU), *args, seed=1, offset=1, n=4096).tolist()) == {417}
    logits = torch.full((1000,), -1e4)
    logits[5] = 0.0
    assert set(draws(sampling.sampling_from_logits, logits.to(GPU), seed=2, offset=0, n=4096).tolist()) == {5}


def _gapped_logits(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Logits whose softmax has no two cumulative masses (in descending order) within 1e-4 of each other at the
    filters' boundaries used below: distinct, well-separated values."""
    z = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    return z.float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["top_k_first", "joint"])
@pytest.mark.parametrize("vocab", [64, 1000])
def test_logits_draws_follow_the_filtered_distribution(dtype, order, vocab):
    gen = torch.Generator().manual_seed(vocab + len(order))
    logits = _gapped_logits(vocab, gen).to(dtype)
    row = logits.float().numpy()
    k = 20 if vocab == 64 else 100
    # a top_p halfway between two consecutive head masses of the filtered distribution (robust to rounding)
    base = (
        R.filtered_distribution(row, logits=True, top_k=k)
        if order == "top_k_first"
        else R.filtered_distribution(row, logits=True)
    )
    cum = np.cumsum(np.sort(base)[::-1])
    j = int(np.searchsorted(cum, 0.7))
    top_p = float((cum[j - 1] + cum[j]) / 2) if j > 0 else float(cum[0] / 2)
    s = draws(
        sampling.top_k_top_p_sampling_from_logits, logits.to(GPU), k, top_p, filter_apply_order=order, seed=17, offset=3
    )
    target = R.filtered_distribution(row, logits=True, top_k=k, top_p=top_p, top_k_first=order == "top_k_first")
    assert_distribution(s, target, f"{order} {dtype} vocab {vocab}")
    s = draws(sampling.sampling_from_logits, logits.to(GPU), seed=18, offset=3)
    assert_distribution(s, R.filtered_distribution(row, logits=True), f"sampling_from_logits {dtype}")


@pytest.mark.gpu
def test_batch_positions_draw_independently():
    """Outputs of one distribution at different positions are independent draws: pairs of consecutive outputs are
    distributed as the product distribution."""
    x = torch.tensor([0.5, 0.3, 0.2])
    s = draws(sampling.sampling_from_probs, x.to(GPU), seed=3, offset=9, n=1 << 20).cpu().long()
    pairs = (s[0::2] * 3 + s[1::2]).to(GPU)
    target = np.outer(x.numpy(), x.numpy()).ravel()
    assert_distribution(pairs, target / target.sum(), "pairs")


# ----------------------------------------------------------------------------------------- GPU: determinism


@pytest.mark.gpu
def test_same_seed_same_tokens_and_generators_advance():
    torch.manual_seed(0)
    logits = torch.randn(64, 32000, device=GPU)
    a = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, seed=7, offset=8)
    b = sampling.top_k_top_p_sampling_from_logits(
        logits, 50, 0.9, seed=torch.tensor([7], device=GPU), offset=torch.tensor([8], device=GPU)
    )
    assert torch.equal(a, b)
    c = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, seed=7, offset=12)
    assert not torch.equal(a, c)
    g1 = torch.Generator(GPU).manual_seed(5)
    g2 = torch.Generator(GPU).manual_seed(5)
    s1 = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, generator=g1)
    s2 = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, generator=g2)
    assert torch.equal(s1, s2)
    assert g1.get_state().view(torch.int64)[1].item() == 64 * 32  # FlashInfer's increment: 32 per row
    assert not torch.equal(s1, sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, generator=g1))
    torch.cuda.manual_seed(3)
    d1 = sampling.sampling_from_logits(logits)
    torch.cuda.manual_seed(3)
    assert torch.equal(d1, sampling.sampling_from_logits(logits))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [5000, 128256])
def test_tokens_do_not_depend_on_the_batch_they_come_in(vocab):
    """A row's token is a function of the row, its parameters and (seed, offset, position): the same in a batch of 3
    and of 300 (different launch plans), and in the probability and logit entry points of equal content."""
    torch.manual_seed(1)
    logits = torch.randn(300, vocab, device=GPU) * 2
    for fn, args in (
        (sampling.top_k_top_p_sampling_from_logits, (40, 0.8)),
        (sampling.top_k_top_p_sampling_from_logits, (300, 0.8)),
        (sampling.sampling_from_logits, ()),
    ):
        big = fn(logits, *args, seed=11, offset=4)
        small = fn(logits[:3].clone(), *args, seed=11, offset=4)
        assert torch.equal(big[:3], small)
    probs = torch.softmax(logits, -1)
    big = sampling.top_p_sampling_from_probs(probs, 0.7, seed=2, offset=2)
    assert torch.equal(big[:3], sampling.top_p_sampling_from_probs(probs[:3].clone(), 0.7, seed=2, offset=2))


# ----------------------------------------------------------------------------------------- GPU: transforms


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,batch", [(7, 3), (1000, 37), (128256, 8), (300000, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_mask_and_renorm_match_references(vocab, batch, dtype):
    torch.manual_seed(vocab + batch)
    logits = (torch.randn(batch, vocab) * 4).to(dtype)
    logits[0, : vocab // 3] = float("-inf")
    k = torch.randint(1, 200, (batch,), dtype=torch.int32)
    k[-1] = vocab  # no filter: a copy
    out = sampling.top_k_mask_logits(logits.to(GPU), k.to(GPU))
    assert out.dtype == dtype and out.shape == logits.shape
    for b in range(batch):
        row = logits[b].float()
        valid = int((row > float("-inf")).sum())
        if 0 < int(k[b]) < valid:
            mask = torch.from_numpy(R.kept_mask(row.numpy(), logits=True, top_k=int(k[b])))
            want = torch.where(mask, row, torch.tensor(float("-inf")))
        else:
            want = row
        assert torch.equal(out[b].float().cpu(), want), b
    probs = torch.softmax(logits.float(), -1).to(dtype)
    out = sampling.top_k_renorm_probs(probs.to(GPU), 33)
    assert out.dtype == dtype
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    for b in range(batch):
        row = probs[b].float().numpy()
        mask = R.kept_mask(row, top_k=33)
        want = np.where(mask, row.astype(np.float64), 0.0)
        got = out[b].double().cpu().numpy()
        assert np.array_equal(got > 0, want > 0), b
        np.testing.assert_allclose(got, want / want.sum(), rtol=tol, atol=tol * 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,batch", [(7, 3), (1000, 37), (128256, 8), (300000, 2)])
def test_top_p_renorm_matches_reference(vocab, batch):
    gen = torch.Generator().manual_seed(vocab)
    probs = _prob_rows("zeros", batch, vocab, gen)
    top_p = torch.rand(batch, generator=gen)
    top_p[0] = 1.0
    for p in (0.9, top_p):
        out = sampling.top_p_renorm_probs(probs.to(GPU), p.to(GPU) if isinstance(p, torch.Tensor) else p)
        assert out.dtype == torch.float32
        for b in range(batch):
            pb = float(p[b]) if isinstance(p, torch.Tensor) else p
            row = probs[b].numpy()
            mask = R.kept_mask(row, top_p=pb)
            want = np.where(mask, row.astype(np.float64), 0.0)
            got = out[b].double().cpu().numpy()
            assert np.array_equal(got > 0, want > 0), b
            np.testing.assert_allclose(got, want / want.sum(), rtol=2e-6, atol=1e-12)
    half = sampling.top_p_renorm_probs(probs.to(GPU).half(), 0.5)
    assert half.dtype == torch.float32  # (as FlashInfer: converted to float32)


@pytest.mark.gpu
def test_renorm_and_mask_at_the_benchmark_size_match_references():
    # benchmarks/bench_sampling.py's case: batch 256 of 128,256 float32 (clusters of 8 CTAs, slices cached), where the
    # radix rounds find both thresholds in one round (top-k of randn * 2 logits: a bin of a few entries; top-p 0.9 of
    # their softmax: a bin of ~130, with ~17% of the row in the last bin).
    torch.manual_seed(256)
    logits = torch.randn(256, 128256) * 2
    probs = torch.softmax(logits, -1)
    masked = sampling.top_k_mask_logits(logits.to(GPU), 50).cpu()
    renormed = sampling.top_p_renorm_probs(probs.to(GPU), 0.9).double().cpu().numpy()
    for b in range(256):
        row = logits[b]
        mask = torch.from_numpy(R.kept_mask(row.numpy(), logits=True, top_k=50))
        assert torch.equal(masked[b], torch.where(mask, row, torch.tensor(float("-inf")))), b
        pr = probs[b].numpy()
        want = np.where(R.kept_mask(pr, top_p=0.9), pr.astype(np.float64), 0.0)
        assert np.array_equal(renormed[b] > 0, want > 0), b
        np.testing.assert_allclose(renormed[b], want / want.sum(), rtol=2e-6, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,batch", [(7, 3), (3001, 37), (128256, 256), (256000, 40)])
def test_row_select_matches_the_radix_kernel(monkeypatch, vocab, batch):
    """The default row transforms (row_select_kernel where slices fit shared memory, scalar top-k streamed from 128
    rows) and the streamed top-k route at every batch against the radix kernel kept for comparison
    (sampling._ROW_KERNEL = "radix"), bit for bit: random rows and the adversarial ones of
    test_emulated_row_select_is_the_radix_rounds, scalar and per-row parameters."""
    rng = np.random.default_rng(vocab + batch)
    kinds = ["softmax", "ties", "equal", "dense", "tail", "special", "wide", "tiny", "huge", "top"]
    probs = np.stack(
        [_select_case_row(kinds[b % len(kinds)] if b < 2 * len(kinds) else "softmax", vocab, rng) for b in range(batch)]
    )
    probs = torch.from_numpy(probs.astype(np.float32)).to(GPU)
    logits = torch.where(probs > 0, torch.log(probs.clamp(min=1e-38)), probs)
    k_rows = torch.from_numpy(rng.integers(0, vocab + 2, batch).astype(np.int32)).to(GPU)
    p_rows = torch.from_numpy(rng.random(batch).astype(np.float32)).to(GPU)
    calls = [
        (sampling.top_k_mask_logits, logits, 50),
        (sampling.top_k_mask_logits, logits, k_rows),
        (sampling.top_k_renorm_probs, probs, 50),
        (sampling.top_k_renorm_probs, probs, k_rows),
        (sampling.top_p_renorm_probs, probs, 0.9),
        (sampling.top_p_renorm_probs, probs, p_rows),
    ]
    for fn, x, param in calls:
        monkeypatch.setattr(sampling, "_ROW_KERNEL", "radix")
        old = fn(x, param)
        for route in ("select", "stream"):  # (the streamed top-k route where it applies: scalar k = 50)
            monkeypatch.setattr(sampling, "_ROW_KERNEL", route)
            new = fn(x, param)
            diff = (new.view(torch.int32) != old.view(torch.int32)).any(-1).nonzero().flatten().tolist()
            assert not diff, (fn.__name__, route, "rows", diff[:10])


def _into_poisoned_block(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """fn(x, *args) with its output in a block the caching allocator handed out filled with NaN just before: an
    element the kernel does not write stays NaN."""
    poison = torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
    ptr = poison.data_ptr()
    del poison
    out = fn(x, *args)
    assert out.data_ptr() == ptr  # (else the check below would prove nothing)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,batch", [(7, 1), (1000, 3), (128256, 64), (300001, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 37, 128, 129])
def test_top_k_transforms_on_streamed_rows(vocab, batch, dtype, k, monkeypatch):
    """Scalar top-k <= 128 on the streamed route (the default from 128 rows, forced here at every batch) reads each
    row once and writes it without reading it again (the neutral value, then the kept candidates over it); k = 129
    stays on the cached slices. Rows start off the 16-byte grid (a column slice),
    ties at the threshold reach past the candidate buffers (the route falls back to reading the row again), rows with
    fewer valid entries than k are copied: every result equal to the radix kernel's bit for bit and to the
    reference's kept set, with no element left unwritten."""
    rng = np.random.default_rng(vocab * 3 + k)
    wide = torch.from_numpy((rng.standard_normal((batch, vocab + 1)) * 3).astype(np.float32))
    if batch > 1:
        wide[1, : (vocab + 1) // 2] = 2.5  # ties at the top of the row: more than any candidate buffer
    if batch > 2:
        wide[2, 1 + min(vocab, 5) :] = float("-inf")  # five valid logits
    logits = wide.to(dtype).to(GPU)[:, 1:]  # rows 2 or 4 bytes past the 16-byte grid
    probs = torch.zeros_like(wide, dtype=dtype, device=GPU)
    probs[:, 1:] = torch.softmax(logits.float(), -1).to(dtype)
    probs = probs[:, 1:]
    for fn, x in ((sampling.top_k_mask_logits, logits), (sampling.top_k_renorm_probs, probs)):
        monkeypatch.setattr(sampling, "_ROW_KERNEL", "radix")
        old = fn(x, k)
        monkeypatch.setattr(sampling, "_ROW_KERNEL", "stream")
        new = _into_poisoned_block(fn, x, k)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        diff = (new.view(bits) != old.view(bits)).any(-1).nonzero().flatten().tolist()
        assert not diff, (fn.__name__, "rows", diff[:10])
        for b in range(batch):
            row = x[b].float().cpu()
            is_mask = fn is sampling.top_k_mask_logits
            valid = int((row > float("-inf") if is_mask else row > 0).sum())
            if k < valid:
                keep = torch.from_numpy(R.kept_mask(row.numpy(), logits=is_mask, top_k=k))
            else:  # no filter: the mask copies, the renorm keeps every entry with mass
                keep = torch.ones_like(row, dtype=torch.bool)
            got = new[b].float().cpu()
            if is_mask:
                assert torch.equal(got, torch.where(keep, row, torch.tensor(float("-inf")))), b
            else:
                assert torch.equal(got > 0, keep & (row > 0)), b
                want = torch.where(keep, row.double(), torch.tensor(0.0, dtype=torch.float64))
                tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
                torch.testing.assert_close(got.double(), want / want.sum(), rtol=tol, atol=tol * 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab,batch", [(1, 2), (111, 99), (128256, 4), (300000, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softmax_matches_torch(vocab, batch, dtype):
    torch.manual_seed(vocab)
    logits = (torch.randn(batch, vocab, device=GPU) * 5).to(dtype)
    if vocab > 1:
        logits[0, ::3] = float("-inf")
    for temperature in (None, 0.5, torch.rand(batch, device=GPU) + 0.1):
        out = sampling.softmax(logits, temperature)
        t = (
            1.0
            if temperature is None
            else (temperature[:, None].double() if isinstance(temperature, torch.Tensor) else temperature)
        )
        want = torch.softmax(logits.double() / t, -1)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.isnan(sampling.softmax(torch.full((1, 9), float("-inf"), device=GPU))).all()
    out = sampling.softmax(logits, 2.0, enable_pdl=False)
    torch.testing.assert_close(out.double(), torch.softmax(logits.double() / 2, -1), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GPU: speculative


@pytest.mark.gpu
@pytest.mark.parametrize("b,n,vocab", [(1, 1, 7), (5, 3, 1000), (3, 5, 32000)])
def test_chain_speculative_sampling_is_its_definition(b, n, vocab):
    rng = np.random.default_rng(b * n + vocab)
    dp = rng.random((b, n, vocab)).astype(np.float32) ** 3
    dp /= dp.sum(-1, keepdims=True)
    tp = rng.random((b, n + 1, vocab)).astype(np.float32) ** 3
    tp /= tp.sum(-1, keepdims=True)
    tp[0, :n] = dp[0]
    ids = rng.integers(0, vocab, (b, n))
    acc0 = torch.full((b,), 10, dtype=torch.int32, device=GPU)
    emi0 = torch.full((b,), 20, dtype=torch.int64, device=GPU)
    out, acc, emi = sampling.chain_speculative_sampling(
        torch.from_numpy(dp).to(GPU),
        torch.from_numpy(ids).to(GPU),
        torch.from_numpy(tp).to(GPU),
        acc0,
        emi0,
        seed=21,
        offset=8,
    )
    want = _chain_reference(dp, ids, tp, 21, 8)
    assert out.dtype == torch.int32 and out.tolist() == want[0].tolist()
    assert acc is acc0 and emi is emi0  # added to in place
    assert (acc - 10).tolist() == want[1].tolist() and (emi - 20).tolist() == want[2].tolist()
    assert (emi - 20 + 1 == (out != -1).sum(1)).all()


@pytest.mark.gpu
def test_speculative_tokens_follow_the_target_distribution():
    """The defining property: the first output token is distributed as the target model's first distribution, and
    draft token d is emitted with probability min(1, p(d) / q(d))."""
    vocab, n = 12, 2
    gen = torch.Generator().manual_seed(0)
    q = zipf_probs(vocab, gen)
    p = zipf_probs(vocab, gen, s=0.7)
    trials = 1 << 18
    ids = torch.multinomial(q, trials, replacement=True, generator=gen).view(trials, 1).repeat(1, n)
    dp = q.expand(trials, n, vocab).contiguous()
    tp = p.expand(trials, n + 1, vocab).contiguous()
    out, acc, emi = sampling.chain_speculative_sampling(dp.to(GPU), ids.to(GPU), tp.to(GPU), seed=4, offset=0)
    assert_distribution(out[:, 0], p.double().numpy(), "first token")
    accept = torch.minimum(torch.ones(vocab), p / q)
    first_ok = (emi >= 1).float().mean().item()
    expected = float((q * accept).sum())
    assert abs(first_ok - expected) < 5 * math.sqrt(expected * (1 - expected) / trials)


# ----------------------------------------------------------------------------------------- GPU: runtime


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_numbers_from_seed_tensors():
    torch.manual_seed(0)
    logits = torch.randn(8, 32000, device=GPU)
    seed = torch.tensor([123], dtype=torch.int64, device=GPU)
    offset = torch.tensor([0], dtype=torch.int64, device=GPU)
    sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, seed=seed, offset=offset)  # builds/loads outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, seed=seed, offset=offset)
    seen = set()
    for off in (0, 4, 8, 12):
        offset.fill_(off)
        graph.replay()
        want = sampling.top_k_top_p_sampling_from_logits(logits, 50, 0.9, seed=123, offset=off)
        assert torch.equal(out, want)
        seen.add(tuple(out.tolist()))
    assert len(seen) > 1


@pytest.mark.gpu
def test_runs_on_the_current_stream_of_the_tensors_device():
    x = torch.zeros(4, 50000, device=GPU)
    src = torch.zeros_like(x)
    src[:, 123] = 1.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # a launch on another stream would see zeros
        x.copy_(src)
        got = sampling.top_k_top_p_sampling_from_probs(x, 10, 0.5, seed=1, offset=1)
        masked = sampling.top_k_mask_logits(x, 1)
    side.synchronize()
    assert got.tolist() == [123] * 4
    assert (masked[:, 123] == 1).all() and torch.isinf(masked[:, :123]).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = torch.zeros(3, 1000, device=dev)
    x[:, 9] = 1
    assert sampling.top_k_top_p_sampling_from_probs(x, 5, 0.9, seed=1, offset=1).tolist() == [9] * 3
    assert sampling.top_p_renorm_probs(x, 0.5).device == dev
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_custom_ops_trace_through_their_fakes():
    torch.manual_seed(0)
    logits = torch.randn(4, 500, device=GPU)
    probs = torch.softmax(logits, -1)
    ops = [
        (sampling._TOP_K_TOP_P_LOGITS.op, (logits, None, None, 20, None, 0.9, True, None, 5, None, 6)),
        (sampling._SAMPLING_FROM_PROBS.op, (probs, None, None, 1, None, 2)),
        (sampling._TOP_K_MASK.op, (logits, None, 7)),
        (sampling._TOP_P_RENORM.op, (probs, None, 0.5)),
        (sampling._SOFTMAX.op, (logits, None, 0.7, False)),
    ]
    for op, args in ops:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    @torch.compile(backend="eager")
    def f(x, s, o):
        return sampling.top_k_top_p_sampling_from_logits(x, 20, 0.9, seed=s, offset=o)

    s = torch.tensor([5], device=GPU)
    o = torch.tensor([6], device=GPU)
    assert torch.equal(f(logits, s, o), sampling.top_k_top_p_sampling_from_logits(logits, 20, 0.9, seed=5, offset=6))


@pytest.mark.gpu
def test_bad_input_raises():
    x = torch.rand(4, 100, device=GPU)
    with pytest.raises(ValueError, match="0-dimensional"):
        sampling.top_p_sampling_from_probs(x, torch.tensor(0.5, device=GPU))
    with pytest.raises(ValueError, match="got a 2D tensor"):
        sampling.top_k_renorm_probs(x, torch.ones(4, 100, dtype=torch.int32, device=GPU))
    with pytest.raises(ValueError, match="batch size mismatch"):
        sampling.min_p_sampling_from_probs(x, torch.ones(3, device=GPU))
    with pytest.raises(ValueError, match="rows are on"):
        sampling.top_p_sampling_from_probs(x, torch.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        sampling.sampling_from_probs(x[0])
    with pytest.raises(TypeError, match="dtype"):
        sampling.sampling_from_probs(x.int())
    with pytest.raises(TypeError, match="int32 or torch.int64"):
        sampling.sampling_from_probs(x, indices=torch.zeros(2, device=GPU))
    with pytest.raises(ValueError, match="together"):
        sampling.sampling_from_probs(x, seed=1)
    with pytest.raises(ValueError, match="not both"):
        sampling.sampling_from_probs(x, generator=torch.Generator(GPU), seed=1, offset=1)
    with pytest.raises(ValueError, match="generator is on"):
        sampling.sampling_from_probs(x, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        sampling.top_p_sampling_from_probs(x, 1.5)
    with pytest.raises(ValueError, match="at most"):
        sampling.sampling_from_logits(torch.zeros(1, (1 << 20) + 1, device=GPU))
    with pytest.raises(ValueError, match="positive"):
        sampling.softmax(x, 0.0)
    with pytest.raises(ValueError, match="temperature tensor"):
        sampling.softmax(x, torch.ones(3, device=GPU))
    with pytest.raises(ValueError, match="target_probs"):
        sampling.chain_speculative_sampling(
            torch.rand(2, 3, 10, device=GPU),
            torch.zeros(2, 3, dtype=torch.int32, device=GPU),
            torch.rand(2, 3, 10, device=GPU),
        )
    assert sampling.top_k_sampling_from_probs(x[:0], 3).shape == (0,)
    assert sampling.top_k_mask_logits(x[:0], 3).shape == (0, 100)

"""The transformers attention backend (flashinfer.integrations.transformers).

CPU: registration, version and error paths, the mask builder, and whole models run through the backend with a
float64 reference standing in for the kernels (checks the plumbing: layouts, GQA, causal alignment, sliding
window, soft cap, padding masks, cache handling). GPU: the real kernels against transformers' SDPA backend on
Llama- and Mistral-style models with trained-like random weights (greedy tokens, prefill logits).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install '.[transformers]')"
)

import flashinfer.integrations.transformers as fi_tf  # noqa: E402
from reference import attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import hf_common  # noqa: E402

NAME = fi_tf.DEFAULT_NAME


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fi_tf.register()
    yield
    fi_tf.unregister()


# ------------------------------------------------------------------------------- a reference for the kernels


class _ReferenceKernels:
    """Stands in for single_prefill/single_decode with the same arguments (the ones the backend passes), computed
    by tests/reference.py in float64; records which path each call took."""

    def __init__(self):
        self.calls = []

    def prefill(
        self,
        q,
        k,
        v,
        custom_mask=None,
        causal=False,
        kv_layout="NHD",
        sm_scale=None,
        window_left=-1,
        logits_soft_cap=None,
        out=None,
    ):
        assert kv_layout == "HND" and out is not None and out.is_contiguous()
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        self.calls.append(
            (
                "mask" if custom_mask is not None else "causal" if causal else "full",
                q.shape[0],
                k.shape[0],
                window_left,
                logits_soft_cap,
            )
        )
        o, _ = attention(
            q,
            k,
            v,
            causal=causal,
            sm_scale=sm_scale,
            window_left=window_left,
            logits_soft_cap=logits_soft_cap or 0.0,
            mask=custom_mask,
        )
        return out.copy_(o)

    def decode(self, q, k, v, kv_layout="NHD", window_left=-1, logits_soft_cap=None, sm_scale=None, out=None):
        assert kv_layout == "HND" and out is not None and out.is_contiguous()
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        self.calls.append(("decode", 1, k.shape[0], window_left, logits_soft_cap))
        o, _ = attention(
            q[None], k, v, sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap or 0.0
        )
        return out.copy_(o[0])


@pytest.fixture
def ref_kernels(monkeypatch):
    r = _ReferenceKernels()
    monkeypatch.setattr(fi_tf, "_prefill", r.prefill)
    monkeypatch.setattr(fi_tf, "_decode", r.decode)
    return r


# ------------------------------------------------------------------------------------ registration, versions


def test_register_makes_models_loadable():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert fi_tf.is_registered(NAME)
    assert AttentionInterface._global_mapping[NAME] is fi_tf.flashinfer_attention_forward
    assert AttentionMaskInterface._global_mapping[NAME] is fi_tf.flashinfer_attention_mask
    model = hf_common.random_model(
        hf_common.make_config("llama", "tiny"), torch.bfloat16, "cpu", attn_implementation=NAME
    )
    assert model.config._attn_implementation == NAME
    assert fi_tf.register(NAME) == NAME  # idempotent


def test_register_other_name_and_unregister():
    assert fi_tf.register("fi_attention_test") == "fi_attention_test"
    assert fi_tf.is_registered("fi_attention_test")
    fi_tf.unregister("fi_attention_test")
    assert not fi_tf.is_registered("fi_attention_test")
    assert fi_tf.is_registered(NAME)


@pytest.mark.parametrize("name", ["", "sdpa", "flashinfer", "flash_attention_2", "paged|x", "eager"])
def test_register_rejects_names(name):
    with pytest.raises(ValueError):
        fi_tf.register(name)


@pytest.mark.parametrize("version", ["4.57.6", "6.0.0"])
def test_register_rejects_unsupported_versions(monkeypatch, version):
    # (sys.modules' entry: transformers' lazy module may have been replaced since this file imported it)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ImportError, match=r">=5\.0,<6"):
        fi_tf.register("fi_attention_other")


def test_register_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"flashinfer\[transformers\]"):
        fi_tf.register("fi_attention_other")


def test_version_parsing():
    assert fi_tf._version_tuple("5.17.0") == (5, 17)
    assert fi_tf._version_tuple("5.0.0.dev0") == (5, 0)
    assert fi_tf._version_tuple("6rc1") == (6, 0)


def test_pyproject_declares_the_extra():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extra = data["project"]["optional-dependencies"]["transformers"]
    assert any(d.replace(" ", "").startswith("transformers>=5.0,<6") for d in extra)
    assert not any(d.lower().startswith("transformers") for d in data["project"]["dependencies"])


# ------------------------------------------------------------------------------------------------ error paths


class _Layer(torch.nn.Module):
    is_causal = True
    layer_idx = 3


def _qkv(batch=1, heads=4, kv_heads=2, q_len=5, kv_len=9, d=64, dtype=torch.bfloat16, device="cpu"):
    return (
        torch.randn(batch, heads, q_len, d, dtype=dtype, device=device),
        torch.randn(batch, kv_heads, kv_len, d, dtype=dtype, device=device),
        torch.randn(batch, kv_heads, kv_len, d, dtype=dtype, device=device),
    )


@pytest.mark.parametrize(
    "case,exc,match",
    [
        (dict(dropout=0.1), NotImplementedError, "dropout"),
        (dict(output_attentions=True), NotImplementedError, "output_attentions"),
        (dict(s_aux=torch.zeros(4)), NotImplementedError, "s_aux"),
        (dict(position_bias=torch.zeros(1)), NotImplementedError, "position_bias"),
        (dict(dtype=torch.float32), TypeError, "float16/bfloat16"),
        (dict(d=80), NotImplementedError, "head_dim 80"),
        (dict(kv_heads=3, heads=4), ValueError, "multiple"),
        (dict(mask=torch.zeros(1, 1, 5, 9)), NotImplementedError, "additive"),
        (dict(mask=torch.ones(1, 4, 5, 9, dtype=torch.bool)), NotImplementedError, "per-head"),
        (dict(mask=torch.ones(1, 1, 5, 8, dtype=torch.bool)), NotImplementedError, "shape"),
        (dict(sliding_window=0), ValueError, "sliding_window"),
    ],
)
def test_unsupported_inputs_raise(case, exc, match):
    shape = {k: case.pop(k) for k in ("dtype", "d", "kv_heads", "heads") if k in case}
    q, k, v = _qkv(**shape)
    mask = case.pop("mask", None)
    with pytest.raises(exc, match=match) as info:
        fi_tf.flashinfer_attention_forward(_Layer(), q, k, v, mask, **case)
    assert "layer 3" in str(info.value) or exc is ValueError


def test_value_head_dim_must_match():
    q, k, _ = _qkv()
    v = torch.randn(1, 2, 9, 128, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="head dims"):
        fi_tf.flashinfer_attention_forward(_Layer(), q, k, v, None)


def test_cpu_tensors_reach_the_kernel_and_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="CUDA"):
        fi_tf.flashinfer_attention_forward(_Layer(), q, k, v, None)


def test_training_model_refused(ref_kernels):
    model = hf_common.random_model(
        hf_common.make_config("llama", "tiny", attention_dropout=0.1), torch.bfloat16, "cpu", attn_implementation=NAME
    )
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(torch.randint(3, 500, (1, 8)))


# ----------------------------------------------------------------------------------------------- the mask builder


def test_kernel_pattern():
    p = fi_tf.kernel_causal_pattern(3, 5, None, "cpu")
    assert p.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    w = fi_tf.kernel_causal_pattern(3, 5, 2, "cpu")
    assert w.tolist() == [
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def _mask(batch, q_len, kv_len, q_offset=0, kv_offset=0, attention_mask=None, **kw):
    import inspect

    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if "q_length" not in inspect.signature(sdpa_mask).parameters:  # before 5.x's q_length/q_offset arguments
        pytest.skip("this transformers' mask builders take cache_position (covered by the whole-model tests)")

    return fi_tf.flashinfer_attention_mask(
        batch_size=batch,
        q_length=q_len,
        kv_length=kv_len,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=kw.pop("mask_function", causal_mask_function),
        attention_mask=attention_mask,
        device="cpu",
        **kw,
    )


def test_mask_builder_returns_none_for_the_kernels_pattern():
    from transformers.masking_utils import sliding_window_causal_mask_function

    assert _mask(2, 7, 7) is None  # prefill
    assert _mask(2, 1, 20, q_offset=19) is None  # decode
    assert _mask(1, 4, 20, q_offset=16, attention_mask=torch.ones(1, 20, dtype=torch.bool)) is None  # chunk
    # Mistral's sliding-window cache: the last window-1 tokens plus the new ones, offset accordingly.
    assert (
        _mask(1, 1, 8, q_offset=30, kv_offset=23, local_size=8, mask_function=sliding_window_causal_mask_function(8))
        is None
    )
    assert _mask(1, 12, 12, local_size=8, mask_function=sliding_window_causal_mask_function(8)) is None


def test_mask_builder_returns_the_mask_otherwise():
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :3] = False  # left padding
    m = _mask(2, 7, 7, attention_mask=pad)
    assert m is not None and m.dtype == torch.bool and tuple(m.shape) == (2, 1, 7, 7)
    assert not m[1, 0, :, :3].any() and m[0, 0].tolist() == fi_tf.kernel_causal_pattern(7, 7, None, "cpu").tolist()
    # A static cache: keys past the written ones (kv_len 16 > 7 + 0) are not bottom-right aligned.
    m = _mask(1, 7, 16)
    assert m is not None and not m[0, 0, :, 7:].any()


# --------------------------------------------------------------------------- whole models on the CPU reference


def _generate(model, ids, attention_mask, n):
    return model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )


def test_greedy_comparison_accepts_near_ties_only():
    # step 1's reference logits: token 0 on top, tokens 1 and 2 tied 0.03 below it (torch.topk(row, 2) may name either),
    # token 3 far below; the tolerance is 2% of the top logit (0.144)
    row = torch.tensor([7.21875, 7.1875, 7.1875, 6.0])
    logits = torch.stack([torch.tensor([9.0, 0.0, 0.0, 0.0]), row])
    for ours in (1, 2):
        m = hf_common.compare_greedy([0, ours], [0, 0], logits)
        assert m.ok and m.diverged_at == 1 and m.gap == pytest.approx(0.03125), m.describe()
    m = hf_common.compare_greedy([0, 3], [0, 0], logits)
    assert not m.ok and m.gap == pytest.approx(1.21875)
    assert not hf_common.compare_greedy([1, 0], [0, 0], logits).ok  # 9 below the top: no tie
    assert hf_common.compare_greedy([0, 0], [0, 0], logits).diverged_at is None


def _compare(model, ids, n, attention_mask=None):
    """Our greedy tokens and logits vs SDPA's on the same model; returns (ours, sdpa) generate outputs."""
    attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        model.set_attn_implementation(NAME)
        ours = _generate(model, ids, attention_mask, n)
        try:
            model.set_attn_implementation("sdpa")
        except ValueError:  # newer transformers (5.24) refuse SDPA for some architectures (Gemma-2): eager is theirs
            model.set_attn_implementation("eager")
        ref = _generate(model, ids, attention_mask, n)
        model.set_attn_implementation(NAME)
    for b in range(ids.shape[0]):
        got = ours.sequences[b, ids.shape[1] :].tolist()
        want = ref.sequences[b, ids.shape[1] :].tolist()
        m = hf_common.compare_greedy(got, want, torch.stack([s[b].float() for s in ref.logits]))
        assert m.ok, f"sequence {b}: {m.describe()}"
    return ours, ref


@pytest.mark.parametrize("arch", hf_common.ARCHS)
def test_cpu_model_generates_like_sdpa(ref_kernels, arch):
    cfg = hf_common.make_config(arch, "tiny", sliding_window=16 if arch == "mistral" else None)
    model = hf_common.random_model(cfg, torch.bfloat16, "cpu", attn_implementation=NAME)
    ids = torch.randint(3, cfg.vocab_size, (2, 40))
    ours, ref = _compare(model, ids, 12)
    kinds = {c[0] for c in ref_kernels.calls}
    assert kinds == {"causal", "decode"}, kinds  # no padding: the fast paths, never a mask
    window = 15 if arch == "mistral" else -1
    assert all(c[3] == window for c in ref_kernels.calls)
    if arch == "mistral":  # the sliding-window cache hands over the last window - 1 keys plus the new one
        assert max(c[2] for c in ref_kernels.calls if c[0] == "decode") == 16
    # Prefill logits: the reference kernels are exact, so ours are at least as close as bf16 SDPA's.
    torch.testing.assert_close(ours.logits[0].float(), ref.logits[0].float(), atol=0.15, rtol=0.02)


def test_cpu_left_padded_batch_runs_custom_masks(ref_kernels):
    cfg = hf_common.make_config("llama", "tiny")
    model = hf_common.random_model(cfg, torch.bfloat16, "cpu", attn_implementation=NAME)
    ids = torch.randint(3, cfg.vocab_size, (3, 24))
    pad = torch.ones_like(ids)
    pad[1, :5] = 0
    pad[2, :11] = 0
    ids[pad == 0] = 0
    _compare(model, ids, 8, attention_mask=pad)
    assert {c[0] for c in ref_kernels.calls} == {"mask"}


def test_cpu_gemma2_soft_cap_and_hybrid_window(ref_kernels):
    cfg = transformers.Gemma2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=8,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=None,
        query_pre_attn_scalar=64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=NAME).eval()
    ids = torch.randint(3, 512, (1, 20))
    _compare(model, ids, 6)
    caps = {c[4] for c in ref_kernels.calls}
    windows = {c[3] for c in ref_kernels.calls}
    assert caps == {20.0} and windows == {-1, 7}, (caps, windows)


# --------------------------------------------------------------------------------------------- GPU: real kernels


def _prefill_logit_errors(model, ids):
    """Max and mean |logits - float32 reference| over the prompt, for our backend and for bf16 SDPA."""
    ref32 = copy.deepcopy(model).float()
    ref32.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = ref32(ids).logits.float()
        del ref32
        model.set_attn_implementation("sdpa")
        sdpa = model(ids).logits.float()
        model.set_attn_implementation(NAME)
        ours = model(ids).logits.float()
    assert torch.isfinite(ours).all()
    err = lambda x: ((x - exact).abs().max().item(), (x - exact).abs().mean().item())  # noqa: E731
    return err(ours), err(sdpa)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", hf_common.ARCHS)
def test_gpu_model_matches_sdpa(arch):
    cfg = hf_common.make_config(arch, "small", sliding_window=64 if arch == "mistral" else None)
    model = hf_common.random_model(cfg, torch.bfloat16, "cuda", attn_implementation=NAME)
    prompts = hf_common.random_prompts(4, cfg.vocab_size, 30, 300, seed=1)
    prompts[0] = prompts[0][:1]  # a one-token prompt: prefill of length 1
    (ours_max, ours_mean), (sdpa_max, sdpa_mean) = _prefill_logit_errors(
        model, torch.tensor([prompts[1]], device="cuda")
    )
    print(
        f"\n{arch} prefill logits vs float32: ours max {ours_max:.4g} mean {ours_mean:.4g}; "
        f"sdpa max {sdpa_max:.4g} mean {sdpa_mean:.4g}"
    )
    assert ours_max <= 2 * sdpa_max + 1e-2 and ours_mean <= 2 * sdpa_mean + 1e-3

    reports = []
    for p in prompts:
        model.set_attn_implementation("sdpa")
        want, want_logits = hf_common.hf_greedy(model, p, 48)
        model.set_attn_implementation(NAME)
        got, _ = hf_common.hf_greedy(model, p, 48)
        m = hf_common.compare_greedy(got, want, want_logits)
        reports.append(f"prompt of {len(p)}: {m.describe()}")
        assert m.ok, reports[-1]
    print("\n".join(reports))


@pytest.mark.gpu
def test_gpu_left_padded_batch_matches_sdpa():
    cfg = hf_common.make_config("mistral", "small", sliding_window=32)
    model = hf_common.random_model(cfg, torch.bfloat16, "cuda", attn_implementation=NAME)
    ids = torch.randint(3, cfg.vocab_size, (3, 80), device="cuda")
    pad = torch.ones_like(ids)
    pad[1, :17] = 0
    pad[2, :50] = 0
    ids[pad == 0] = 0
    _compare(model, ids, 24, attention_mask=pad)


@pytest.mark.gpu
def test_gpu_gemma2_soft_cap():
    cfg = transformers.Gemma2Config(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        sliding_window=64,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=256,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation=NAME
        ).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 150), device="cuda")
    (ours_max, ours_mean), (sdpa_max, sdpa_mean) = _prefill_logit_errors(model, ids)
    assert ours_max <= 2 * sdpa_max + 1e-2 and ours_mean <= 2 * sdpa_mean + 1e-3
    _compare(model, ids, 24)

"""Shared by the transformers examples, benchmark and tests: small random models with trained-like weights, and
the greedy-output comparison that tolerates divergence only after a near-tie.

Random models need no download. Their weights are the model's own random init, then sharpened so that they
behave like a trained model's in the ways the comparison depends on: the query/key projections are scaled up so
that attention is peaked rather than uniform (attention then decides the next token), and the LM head is scaled
up so that the next-token distribution is peaked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import torch

# name -> (config class name, architecture arguments). "small" fits a quick GPU test; "bench" is an
# 8B-like attention geometry (32 query heads, 8 KV heads, head_dim 128, hidden 4096) with fewer layers.
_SIZES: Dict[str, dict] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=8192,
    ),
    "bench": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
    ),
}
ARCHS = ("llama", "mistral")
QK_GAIN = 2.5  # attention logits' spread: about 2 instead of about 0.3 with the default init
LOGIT_GAIN = 8.0  # next-token logits' spread: a few units instead of well below one


def make_config(
    arch: str = "llama",
    size: str = "small",
    sliding_window: Optional[int] = None,
    max_position_embeddings: int = 4096,
    **overrides,
):
    """A transformers config of a Llama-style (``arch="llama"``) or Mistral-style (``"mistral"``: sliding-window
    attention, ``sliding_window`` tokens, default 64) decoder of the given size (``tiny``, ``small``, ``bench``)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in _SIZES:
        raise ValueError(f"size must be one of {list(_SIZES)}, got {size!r}")
    kw = dict(
        _SIZES[size],
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=sliding_window or 64, **kw)
    if sliding_window is not None:
        raise ValueError("sliding_window is for arch='mistral'")
    return transformers.LlamaConfig(**kw)


def random_model(config, dtype: torch.dtype, device, seed: int = 0, attn_implementation: str = "sdpa"):
    """The config's model with its random init made trained-like (see the module doc), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_GAIN)
            layer.self_attn.k_proj.weight.mul_(QK_GAIN)
        model.lm_head.weight.mul_(LOGIT_GAIN)
    return model.eval()


def load_model(model_dir: str, dtype: torch.dtype, device, attn_implementation: str = "sdpa"):
    """A local checkpoint directory (``config.json`` + safetensors), in eval mode; nothing is downloaded."""
    import transformers

    return (
        transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        .to(device)
        .eval()
    )


def random_prompts(n: int, vocab_size: int, min_len: int, max_len: int, seed: int = 0) -> List[List[int]]:
    """n prompts of random token ids (3 .. vocab-1: clear of pad/bos/eos) and lengths in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (L,), generator=g).tolist() for L in lens]


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int):
    """transformers' own greedy generation of one prompt (no stopping at EOS).

    Returns
    -------
    (tokens, logits)
        ``max_new_tokens`` ints, and float32 ``[max_new_tokens, vocab]``: the logits each token was chosen from.
    """
    device = model.device
    ids = torch.tensor([list(prompt)], device=device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logits = torch.stack([s[0].float() for s in out.logits])
    return tokens, logits


@dataclasses.dataclass
class GreedyMatch:
    """How one generated sequence compares with the reference's."""

    tokens: int  # tokens compared
    diverged_at: Optional[int]  # first differing step, None if identical
    near_tie: bool  # our token's reference logit at that step was within the tie tolerance of the reference's top one
    gap: float  # the reference's top logit minus its logit of our token at that step (0 when identical)
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.diverged_at is None or self.near_tie

    def describe(self) -> str:
        if self.diverged_at is None:
            return f"identical ({self.tokens} tokens)"
        kind = "after a near-tie" if self.near_tie else "NOT at a near-tie"
        return (
            f"diverged at token {self.diverged_at}/{self.tokens} {kind}: reference top minus our token {self.gap:.4g}, "
            f"tolerance {self.tolerance:.4g}"
        )


def tie_tolerance(logits_row: torch.Tensor, rel: float = 0.02) -> float:
    """Two logits closer than this are a near-tie: ``rel`` of the top logit's magnitude (0.02 is about five bf16
    units in the last place, the rounding of a bf16 LM head alone), at least 1e-3."""
    return max(rel * float(logits_row.abs().max()), 1e-3)


def compare_greedy(ours: Sequence[int], ref: Sequence[int], ref_logits: torch.Tensor, rel: float = 0.02) -> GreedyMatch:
    """Compares our greedy tokens with the reference's; a divergence passes only where the reference's logit of our
    token was within :func:`tie_tolerance` of its top logit. (Not "our token is one of the reference's top two":
    torch.topk orders tied logits arbitrarily, so a token tied for second place, 0.031 below the top with a tolerance
    of 0.144, failed that test under transformers 5.24.)"""
    n = min(len(ours), len(ref))
    for t in range(n):
        if ours[t] != ref[t]:
            row = ref_logits[t]
            gap = float(row.max() - row[int(ours[t])])
            tol = tie_tolerance(row, rel)
            return GreedyMatch(n, t, gap <= tol, gap, tol)
    if len(ours) != len(ref):
        return GreedyMatch(n, n, False, float("inf"), 0.0)
    return GreedyMatch(n, None, False, 0.0, 0.0)


# ------------------------------------------------------------------ teacher-forced check against a float32 model

# Bound on the relative error ||h - h_ref|| / ||h_ref|| of one final hidden state (after the final norm) computed
# in bf16/fp16 against the float32 model's. Each bf16 rounding of an activation is a relative error up to 2^-9;
# a decoder rounds every layer's q/k/v, attention output, projections, MLP and residual sums, and the sharpened
# attention of the random models (QK_GAIN) amplifies these from layer to layer. Measured on the CPU for the
# "small" model (4 layers), prompts up to 512 and 48 new tokens: transformers' own bf16 SDPA run against its
# float32 run, 1.2% after layer 1 growing to 3.8% (median) / 7.0% (max) after layer 4; our engine in bf16 (float32
# attention stand-ins) likewise, max 6.8%. The bound is about twice that (our GPU kernels also round the softmax
# probabilities to bf16 before P.V). Real bugs are far above it: on the same model and prompts, a softmax scale
# 10% off gives up to 0.46, log2(e) too large 1.0, a decode step missing its own new key 0.79 (float32 runs).
# fp16 keeps 3 more bits (errors 8x smaller); float32 differs from the reference only in summation order.
HIDDEN_REL_TOL = {torch.bfloat16: 0.15, torch.float16: 0.02, torch.float32: 1e-3}
# A divergence from the reference's argmax passes where the reference's float32 logit gap is within this many
# standard deviations of the gap noise that the step's measured hidden-state error causes (see check_sequence).
NEAR_TIE_SIGMAS = 5.0


def float32_reference(model):
    """A float32 copy of ``model`` on transformers' SDPA backend (the check's reference)."""
    import copy

    ref = copy.deepcopy(model).float().eval()
    ref.set_attn_implementation("sdpa")
    return ref


@torch.no_grad()
def teacher_forced_hidden(ref_model, prompt: Sequence[int], output: Sequence[int]) -> torch.Tensor:
    """The reference's final hidden states (after the final norm), float32 ``[len(output), hidden]``: row t is the
    state output token t is chosen from, given the prompt and our output tokens before t."""
    ids = torch.tensor([list(prompt) + list(output[:-1])], device=ref_model.device)
    h = ref_model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    return h[len(prompt) - 1 :].float()


@dataclasses.dataclass
class SequenceCheck:
    """Our greedy tokens and hidden states against the float32 reference's, step by step (teacher forced)."""

    tokens: int
    hidden_rel_err: float  # largest ||h - h_ref|| / ||h_ref|| over the steps
    hidden_tol: float
    other_choices: List[tuple]  # (step, gap, bound) where our token is not the reference's argmax
    bad_choices: List[tuple]  # those of them with gap > bound

    @property
    def identical(self) -> bool:
        return not self.other_choices

    @property
    def ok(self) -> bool:
        return self.hidden_rel_err <= self.hidden_tol and not self.bad_choices

    def describe(self) -> str:
        parts = [
            f"hidden-state error {self.hidden_rel_err:.3g} (bound {self.hidden_tol:.3g})"
            + ("" if self.hidden_rel_err <= self.hidden_tol else " EXCEEDED")
        ]
        if self.other_choices:
            worst = max(self.other_choices, key=lambda c: c[1] / c[2] if c[2] else float("inf"))
            parts.append(
                f"{len(self.other_choices)}/{self.tokens} tokens not the reference's argmax "
                f"({len(self.bad_choices)} beyond the near-tie bound; worst at token {worst[0]}: "
                f"reference logit gap {worst[1]:.4g}, bound {worst[2]:.4g})"
            )
        else:
            parts.append(f"all {self.tokens} tokens the reference's argmax")
        return ", ".join(parts)


@torch.no_grad()
def check_sequence(
    tokens: Sequence[int], hidden: torch.Tensor, ref_hidden: torch.Tensor, lm_head_f32: torch.Tensor, hidden_tol: float
) -> SequenceCheck:
    """Checks our greedy output against the float32 reference (see :func:`teacher_forced_hidden`).

    Two conditions, at every step t (teacher forced: the reference scores our tokens, so every step is checked,
    not only those before a first divergence):

    - our hidden state ``hidden[t]`` is within ``hidden_tol`` (relative, 2-norm) of the reference's ``h = ref_hidden[t]``;
    - where our token y is not the reference's argmax a, the reference's float32 logit gap is a near-tie:
      ``(W_a - W_y) . h <= NEAR_TIE_SIGMAS * ||W_a - W_y|| * ||e|| / sqrt(hidden_size)``, ``e`` our step's
      hidden-state error (its norm capped at ``hidden_tol * ||h||``). ``e`` moves that gap by ``(W_a - W_y) . e``, whose standard deviation is
      ``||W_a - W_y|| * ||e|| / sqrt(hidden_size)`` when the LM head rows have no preferred direction relative to
      rounding noise (exactly so for a random LM head). A larger gap cannot be flipped by noise of that size; it
      takes an error aimed at the decision, e.g. a wrong row of logits or a token given to the wrong request.
    """
    h_ref = ref_hidden.float()
    h = hidden.float().to(h_ref.device)
    n = len(tokens)
    assert h.shape[0] == n and h_ref.shape[0] == n, (h.shape, h_ref.shape, n)
    ref_norm = h_ref.norm(dim=-1)
    err = (h - h_ref).norm(dim=-1)
    rel = (err / ref_norm.clamp_min(1e-30)).max().item() if n else 0.0
    logits = h_ref @ lm_head_f32.T
    best = logits.argmax(-1)
    ours = torch.tensor(list(tokens), device=logits.device)
    other, bad = [], []
    for t in (best != ours).nonzero().flatten().tolist():
        a, y = int(best[t]), int(ours[t])
        gap = float(logits[t, a] - logits[t, y])
        noise = min(float(err[t]), hidden_tol * float(ref_norm[t]))  # at most the noise the first condition allows
        bound = NEAR_TIE_SIGMAS * float((lm_head_f32[a] - lm_head_f32[y]).norm()) * noise / math.sqrt(h.shape[-1])
        other.append((t, gap, bound))
        if gap > bound:
            bad.append((t, gap, bound))
    return SequenceCheck(n, rel, hidden_tol, other, bad)

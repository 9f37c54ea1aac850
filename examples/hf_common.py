"""Shared by the transformers examples, benchmark and tests: small random models with trained-like weights, and
the greedy-output comparison that tolerates divergence only after a near-tie.

Random models need no download. Their weights are the model's own random init, then sharpened so that they
behave like a trained model's in the ways the comparison depends on: the query/key projections are scaled up so
that attention is peaked rather than uniform (attention then decides the next token), and the LM head is scaled
up so that the next-token distribution is peaked.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

# name -> (config class name, architecture arguments). "small" fits a quick GPU test; "bench" is an
# 8B-like attention geometry (32 query heads, 8 KV heads, head_dim 128, hidden 4096) with fewer layers.
_SIZES: Dict[str, dict] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=512),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, vocab_size=8192),
    "bench": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000),
}
ARCHS = ("llama", "mistral")
QK_GAIN = 2.5  # attention logits' spread: about 2 instead of about 0.3 with the default init
LOGIT_GAIN = 8.0  # next-token logits' spread: a few units instead of well below one


def make_config(arch: str = "llama", size: str = "small", sliding_window: Optional[int] = None,
                max_position_embeddings: int = 4096, **overrides):
    """A transformers config of a Llama-style (``arch="llama"``) or Mistral-style (``"mistral"``: sliding-window
    attention, ``sliding_window`` tokens, default 64) decoder of the given size (``tiny``, ``small``, ``bench``)."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if size not in _SIZES:
        raise ValueError(f"size must be one of {list(_SIZES)}, got {size!r}")
    kw = dict(_SIZES[size], max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
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
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=attn_implementation)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(QK_GAIN)
            layer.self_attn.k_proj.weight.mul_(QK_GAIN)
        model.lm_head.weight.mul_(LOGIT_GAIN)
    return model.eval()


def load_model(model_dir: str, dtype: torch.dtype, device, attn_implementation: str = "sdpa"):
    """A local checkpoint directory (``config.json`` + safetensors), in eval mode; nothing is downloaded."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True).to(device).eval()


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
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logits = torch.stack([s[0].float() for s in out.logits])
    return tokens, logits


@dataclasses.dataclass
class GreedyMatch:
    """How one generated sequence compares with the reference's."""

    tokens: int  # tokens compared
    diverged_at: Optional[int]  # first differing step, None if identical
    near_tie: bool  # the reference's top two logits at that step were within the tie tolerance
    gap: float  # the reference's top-1 minus top-2 logit at that step (0 when identical)
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.diverged_at is None or self.near_tie

    def describe(self) -> str:
        if self.diverged_at is None:
            return f"identical ({self.tokens} tokens)"
        kind = "after a near-tie" if self.near_tie else "NOT at a near-tie"
        return (f"diverged at token {self.diverged_at}/{self.tokens} {kind}: reference top-2 gap {self.gap:.4g}, "
                f"tolerance {self.tolerance:.4g}")


def tie_tolerance(logits_row: torch.Tensor, rel: float = 0.02) -> float:
    """Two logits closer than this are a near-tie: ``rel`` of the top logit's magnitude (0.02 is about five bf16
    units in the last place, the rounding of a bf16 LM head alone), at least 1e-3."""
    return max(rel * float(logits_row.abs().max()), 1e-3)


def compare_greedy(ours: Sequence[int], ref: Sequence[int], ref_logits: torch.Tensor, rel: float = 0.02) -> GreedyMatch:
    """Compares our greedy tokens with the reference's; a divergence passes only where the reference's own top two
    logits were within :func:`tie_tolerance` of each other and our token is one of those two."""
    n = min(len(ours), len(ref))
    for t in range(n):
        if ours[t] != ref[t]:
            row = ref_logits[t]
            top2 = torch.topk(row, 2)
            gap = float(top2.values[0] - top2.values[1])
            tol = tie_tolerance(row, rel)
            near = gap <= tol and int(ours[t]) in top2.indices.tolist()
            return GreedyMatch(n, t, near, gap, tol)
    if len(ours) != len(ref):
        return GreedyMatch(n, n, False, float("inf"), 0.0)
    return GreedyMatch(n, None, False, 0.0, 0.0)

"""A small continuous-batching engine on a paged KV cache, driving a transformers model's weights with this
library's kernels. Used by ``generate_paged.py`` (the command-line example) and ``tp_decode.py``.

Pieces:

- :class:`ModelRunner` runs a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3) from a transformers model's own
  modules (embeddings, norms, projections, MLPs, rotary embedding and ``apply_rotary_pos_emb`` of its modeling
  file) over a flat batch of tokens; attention is a callback, so that the engine decides where K/V live.
- :class:`PagePool` hands out pages of one KV cache tensor per layer, ``[num_pages, 2, page_size, kv_heads,
  head_dim]`` (FlashInfer's NHD layout); page 0 is a scratch page for the padding slots of a CUDA graph.
- :class:`Engine` schedules: requests arrive over time; each step admits the arrived ones that fit (pages, batch
  slots, a prefill token budget) and prefills them together (``BatchPrefillWithPagedKVCacheWrapper``, their
  K/V written by ``append_paged_kv_cache``), then runs one decode step for every running request
  (``CUDAGraphBatchDecodeWithPagedKVCacheWrapper`` inside a CUDA graph of the whole model step, one graph per
  padded batch size), then retires the finished ones and frees their pages.
- ``ops``: the kernels come from a namespace with FlashInfer's names. ``flashinfer`` itself on a GPU; on the CPU,
  :class:`TorchPagedOps`, plain-PyTorch stand-ins with the same signatures, so that the scheduling, page tables
  and model plumbing can be run and checked without a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
WORKSPACE_BYTES = 128 << 20


# ------------------------------------------------------------------------------------------------- the model


class ModelRunner:
    """A transformers decoder's forward over a flat token batch, attention supplied by the caller.

    ``head_slice`` (``(first_kv_head, num_kv_heads)``) restricts the attention to a contiguous group of KV heads and
    their query heads (tensor parallelism): q/k/v projections produce only those heads, and the caller gathers
    the heads of every rank before the output projection (``gather`` callback).
    """

    def __init__(self, model, head_slice: Optional[Tuple[int, int]] = None,
                 gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"model_type {config.model_type!r} is not wired into this engine "
                                      f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.model = model
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_qo_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.sm_scale = float(attn.scaling)
        layer_types = set(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        if len(layer_types) > 1:
            raise NotImplementedError(f"mixed attention layer types {sorted(layer_types)} are not supported here")
        if layer_types == {"full_attention"}:
            window = None
        self.sliding_window = window  # transformers' convention: a query sees its last `window` keys
        self.window_left = window - 1 if window else -1
        self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        group = self.num_qo_heads // self.num_kv_heads
        first_kv, self.local_kv_heads = head_slice if head_slice else (0, self.num_kv_heads)
        self.local_qo_heads = self.local_kv_heads * group
        self._q_rows = slice(first_kv * group * self.head_dim, (first_kv + self.local_kv_heads) * group * self.head_dim)
        self._kv_rows = slice(first_kv * self.head_dim, (first_kv + self.local_kv_heads) * self.head_dim)
        self.gather = gather
        self.dtype = model.lm_head.weight.dtype
        self.device = model.lm_head.weight.device
        self.vocab_size = model.lm_head.weight.shape[0]
        # The LM head runs in float32 (from the bf16/fp16 hidden state): rounding the logits to bf16 would make
        # ties (bf16's ulp is 0.125 at |logit| 16..32) and the greedy choice among them arbitrary.
        self.lm_head_f32 = model.lm_head.weight.detach().float()
        self.lm_head_bias_f32 = None if model.lm_head.bias is None else model.lm_head.bias.detach().float()

    def _proj(self, linear: torch.nn.Linear, x: torch.Tensor, rows: slice) -> torch.Tensor:
        if self.local_kv_heads == self.num_kv_heads:
            return linear(x)
        bias = linear.bias[rows] if linear.bias is not None else None
        return torch.nn.functional.linear(x, linear.weight[rows], bias)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` (after the final norm) of ``tokens [n]`` at ``positions [n]`` (int64).
        ``attend(layer, q [n, Hq, D], k [n, Hkv, D], v [n, Hkv, D]) -> o [n, Hq, D]`` stores k/v and attends."""
        n = tokens.shape[0]
        x = self.model.model.embed_tokens(tokens)
        cos, sin = self.model.model.rotary_emb(x[None], positions[None])
        cos, sin = cos[0], sin[0]  # [n, D]: apply_rotary_pos_emb's unsqueeze_dim=1 broadcasts over heads
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._proj(attn.q_proj, h, self._q_rows).view(n, self.local_qo_heads, self.head_dim)
            k = self._proj(attn.k_proj, h, self._kv_rows).view(n, self.local_kv_heads, self.head_dim)
            v = self._proj(attn.v_proj, h, self._kv_rows).view(n, self.local_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.apply_rope(q, k, cos, sin, unsqueeze_dim=1)
            o = attend(i, q, k, v)
            if self.gather is not None:
                o = self.gather(o)
            x = x + attn.o_proj(o.reshape(n, self.num_qo_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.model.norm(x)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 ``[n, vocab]`` logits of hidden states ``[n, hidden]`` (LM head in float32)."""
        return torch.nn.functional.linear(hidden.float(), self.lm_head_f32, self.lm_head_bias_f32)


# ---------------------------------------------------------------------------------- plain-PyTorch stand-ins


def _pages_of(indptr: Sequence[int], indices: Sequence[int], last: Sequence[int], r: int, page_size: int):
    pages = list(indices[indptr[r]:indptr[r + 1]])
    return pages, (len(pages) - 1) * page_size + last[r]


def _gather_kv(cache: torch.Tensor, pages: List[int], kv_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    kv = cache[torch.tensor(pages, dtype=torch.long, device=cache.device)]  # [P, 2, page, H, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:kv_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:kv_len]
    return k, v


def _attend(q, k, v, sm_scale: float, window_left: int) -> torch.Tensor:
    """Causal (bottom-right) attention of q [L, Hq, D] over k/v [kv, Hkv, D] in float32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), k) * sm_scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0], device=q.device)[:, None]
    kv_pos = torch.arange(k.shape[0], device=q.device)[None, :]
    allowed = kv_pos <= q_pos
    if window_left >= 0:
        allowed &= kv_pos >= q_pos - window_left
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)


class _TorchPrefillWrapper:
    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        assert kv_layout == "NHD"

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads,
             head_dim_qk, page_size, causal=False, sm_scale=None, window_left=-1, q_data_type=None,
             kv_data_type=None):
        assert causal
        self._plan = (qo_indptr.tolist(), paged_kv_indptr.tolist(), paged_kv_indices.tolist(),
                      paged_kv_last_page_len.tolist(), page_size, sm_scale, window_left)

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor:
        qo, indptr, indices, last, page_size, scale, window_left = self._plan
        out = torch.empty_like(q)
        for r in range(len(qo) - 1):
            k, v = _gather_kv(paged_kv_cache, *_pages_of(indptr, indices, last, r, page_size))
            out[qo[r]:qo[r + 1]] = _attend(q[qo[r]:qo[r + 1]], k, v, scale, window_left)
        return out


class _TorchDecodeWrapper:
    def __init__(self, workspace_buffer, indptr_buffer, indices_buffer, last_page_len_buffer, kv_layout="NHD"):
        assert kv_layout == "NHD"

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, window_left=-1,
             q_data_type=None, kv_data_type=None, sm_scale=None):
        self._plan = (indptr.tolist(), indices.tolist(), last_page_len.tolist(), page_size, sm_scale, window_left)

    def run(self, q: torch.Tensor, paged_kv_cache: torch.Tensor) -> torch.Tensor:
        indptr, indices, last, page_size, scale, window_left = self._plan
        out = torch.empty_like(q)
        for r in range(q.shape[0]):
            k, v = _gather_kv(paged_kv_cache, *_pages_of(indptr, indices, last, r, page_size))
            out[r] = _attend(q[r:r + 1], k, v, scale, window_left)[0]
        return out


class TorchPagedOps:
    """FlashInfer's names used by the engine, in plain PyTorch (any device; for CPU runs and checks)."""

    BatchPrefillWithPagedKVCacheWrapper = _TorchPrefillWrapper
    CUDAGraphBatchDecodeWithPagedKVCacheWrapper = _TorchDecodeWrapper

    @staticmethod
    def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices,
                              kv_indptr, kv_last_page_len, kv_layout="NHD"):
        page_size = paged_kv_cache.shape[2]
        pos = positions.long()
        page = kv_indices.long()[kv_indptr.long()[batch_indices.long()] + pos // page_size]
        paged_kv_cache[page, 0, pos % page_size] = append_key
        paged_kv_cache[page, 1, pos % page_size] = append_value

    @staticmethod
    def get_batch_indices_positions(append_indptr, seq_lens, nnz):
        import flashinfer  # pure PyTorch: no kernel

        return flashinfer.get_batch_indices_positions(append_indptr, seq_lens, nnz)


# ------------------------------------------------------------------------------------------------ the engine


class PagePool:
    """Free list of page ids 1 .. num_pages-1 (page 0: the scratch page of padding slots)."""

    def __init__(self, num_pages: int) -> None:
        self.free = collections.deque(range(1, num_pages))
        self.num_pages = num_pages

    def alloc(self, n: int) -> List[int]:
        if n > len(self.free):
            raise RuntimeError(f"out of KV pages: need {n}, {len(self.free)} free")
        return [self.free.popleft() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self.free.extend(pages)


@dataclasses.dataclass
class Request:
    rid: int
    prompt: List[int]
    max_new_tokens: int
    arrival_step: int = 0
    output: List[int] = dataclasses.field(default_factory=list)
    pages: List[int] = dataclasses.field(default_factory=list)
    seq_len: int = 0  # tokens whose K/V are in the cache
    admitted_step: int = -1
    finished_step: int = -1
    # With Engine.record_hidden: the final hidden state (after the final norm) each output token was chosen from.
    hidden: List[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


def _csr(lists: Sequence[Sequence[int]]) -> Tuple[List[int], List[int]]:
    indptr, flat = [0], []
    for x in lists:
        flat.extend(x)
        indptr.append(len(flat))
    return indptr, flat


def _i32(values: Sequence[int], device="cpu") -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=device)


class DecodeBatch:
    """Decode of a fixed (padded) batch size: fixed input buffers, a graph-mode decode wrapper over fixed page-table
    buffers, and, with ``use_graph``, a CUDA graph of the whole model step that ``run()`` replays."""

    def __init__(self, engine: "Engine", size: int, use_graph: bool, pool=None) -> None:
        self.engine, self.size = engine, size
        dev = engine.device
        self.tokens = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions32 = torch.zeros(size, dtype=torch.int32, device=dev)
        self.batch_indices = torch.arange(size, dtype=torch.int32, device=dev)
        self.indptr = torch.zeros(size + 1, dtype=torch.int32, device=dev)
        self.indices = torch.zeros(engine.pool.num_pages, dtype=torch.int32, device=dev)
        self.last = torch.ones(size, dtype=torch.int32, device=dev)
        workspace = torch.empty(WORKSPACE_BYTES if dev.type == "cuda" else 0, dtype=torch.uint8, device=dev)
        self.wrapper = engine.ops.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(workspace, self.indptr, self.indices,
                                                                               self.last, "NHD")
        self.graph = None
        self.hidden = self.logits = None
        # Every slot on the scratch page, for the warm-up and capture.
        self.load([0] * size, [0] * size, [[0]] * size, [1] * size)
        if use_graph:
            self._capture(pool)

    def load(self, tokens: Sequence[int], positions: Sequence[int], pages: Sequence[Sequence[int]],
             last: Sequence[int]) -> None:
        """Inputs of this step (already padded to ``size``) into the fixed buffers, and the wrapper's plan."""
        e = self.engine
        indptr, flat = _csr(pages)
        h_indptr, h_indices, h_last = _i32(indptr), _i32(flat), _i32(last)
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.long)
        self.positions.copy_(pos, non_blocking=True)
        self.positions32.copy_(pos.to(torch.int32), non_blocking=True)
        self.indptr.copy_(h_indptr, non_blocking=True)
        self.indices[: len(flat)].copy_(h_indices, non_blocking=True)
        self.last.copy_(h_last, non_blocking=True)
        self.wrapper.plan(h_indptr, h_indices, h_last, e.runner.local_qo_heads, e.runner.local_kv_heads,
                          e.runner.head_dim, e.page_size, window_left=e.runner.window_left, q_data_type=e.dtype,
                          kv_data_type=e.dtype, sm_scale=e.runner.sm_scale)

    def _step(self) -> torch.Tensor:
        e = self.engine

        def attend(layer: int, q, k, v):
            cache = e.kv_cache[layer]
            e.ops.append_paged_kv_cache(k, v, self.batch_indices, self.positions32, cache, self.indices, self.indptr,
                                        self.last)
            return self.wrapper.run(q, cache)

        hidden = e.runner.forward(self.tokens, self.positions, attend)
        return hidden, e.runner.logits(hidden)

    def _capture(self, pool) -> None:
        dev = self.engine.device
        with torch.cuda.device(dev):  # graph capture works on the current device; it may not be ours (cuda:0)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up: loads every module, settles the allocator
                self._step()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.hidden, self.logits = self._step()

    def run(self, n: int, eager: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[n, hidden]`` and float32 logits ``[n, vocab]`` of the first ``n`` slots."""
        if self.graph is not None and not eager:
            with torch.cuda.device(self.engine.device):  # replay on our device's stream, whatever is current
                self.graph.replay()
            return self.hidden[:n], self.logits[:n]
        hidden, logits = self._step()
        return hidden[:n], logits[:n]


class Engine:
    """Continuous batching over a paged KV cache (see the module doc).

    Parameters
    ----------
    runner : ModelRunner
    ops : module or class
        ``flashinfer`` or :class:`TorchPagedOps`.
    max_batch : int
        Most requests running at once (decode batch); CUDA graphs are captured for 1, 2, 4, ... up to it.
    page_size, num_pages : int
        KV cache geometry (page 0 is scratch).
    max_prefill_tokens : int
        Prompt tokens admitted per step at most (one prompt always fits).
    use_graph : bool
        Capture the decode step in CUDA graphs (CUDA only).
    """

    def __init__(self, runner: ModelRunner, ops, max_batch: int, page_size: int, num_pages: int,
                 max_prefill_tokens: int = 8192, use_graph: bool = True) -> None:
        self.runner, self.ops = runner, ops
        self.device, self.dtype = runner.device, runner.dtype
        self.max_batch, self.page_size, self.max_prefill_tokens = max_batch, page_size, max_prefill_tokens
        self.pool = PagePool(num_pages)
        self.kv_cache = [torch.zeros(num_pages, 2, page_size, runner.local_kv_heads, runner.head_dim,
                                     dtype=self.dtype, device=self.device) for _ in runner.layers]
        workspace = torch.empty(WORKSPACE_BYTES if self.device.type == "cuda" else 0, dtype=torch.uint8,
                                device=self.device)
        self.prefill_wrapper = ops.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        use_graph = use_graph and self.device.type == "cuda"
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max(1, math.ceil(math.log2(max_batch)) + 1))})
        pool = None
        if use_graph:
            with torch.cuda.device(self.device):
                pool = torch.cuda.graph_pool_handle()
        self.decoders: Dict[int, DecodeBatch] = {}
        for s in sorted(self.sizes, reverse=True):  # largest first: the smaller graphs reuse its memory
            self.decoders[s] = DecodeBatch(self, s, use_graph, pool)
        self.waiting: collections.deque = collections.deque()
        self.running: List[Request] = []
        self.finished: List[Request] = []
        self.step_count = 0
        self.stats = collections.defaultdict(float)
        self.decode_times: Dict[int, List[float]] = collections.defaultdict(list)  # batch -> step seconds
        # Called before each decode step's launch with the batch size (profiling); while ``eager_decode`` is set,
        # steps run without their graphs (the profiler's kernel view) and are left out of ``decode_times``.
        self.on_decode_step: Optional[Callable[["Engine", int], None]] = None
        self.eager_decode = False
        # Keep each output token's hidden state in Request.hidden (for checking against a reference model).
        self.record_hidden = False

    # -- scheduling

    def submit(self, requests: Sequence[Request]) -> None:
        self.waiting.extend(sorted(requests, key=lambda r: (r.arrival_step, r.rid)))

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> None:
        """Admit and prefill arrived requests, one decode step for all running ones, retire the finished."""
        admitted, budget = [], self.max_prefill_tokens
        while (self.waiting and self.waiting[0].arrival_step <= self.step_count
               and len(self.running) + len(admitted) < self.max_batch):
            r = self.waiting[0]
            if admitted and len(r.prompt) > budget:
                break
            # Room for the prompt and the request's whole output, so that decode never runs out of pages.
            if self.pages_for(len(r.prompt) + r.max_new_tokens) > len(self.pool.free) - self._reserved_pages():
                break
            self.waiting.popleft()
            r.pages = self.pool.alloc(self.pages_for(len(r.prompt)))
            r.admitted_step = self.step_count
            admitted.append(r)
            budget -= len(r.prompt)
        if admitted:
            self._prefill(admitted)
            self.running.extend(admitted)
        self._retire()
        if self.running:
            self._decode(self.running)
        self._retire()
        self.step_count += 1

    def _reserved_pages(self) -> int:
        """Pages the running requests will still take before they finish."""
        return sum(self.pages_for(len(r.prompt) + r.max_new_tokens) - len(r.pages) for r in self.running)

    def _retire(self) -> None:
        still = []
        for r in self.running:
            if r.done:
                self.pool.release(r.pages)
                r.pages = []
                r.finished_step = self.step_count
                self.finished.append(r)
            else:
                still.append(r)
        self.running = still

    # -- model steps

    def _prefill(self, reqs: List[Request]) -> None:
        t0 = time.perf_counter()
        dev, ps = self.device, self.page_size
        qo_indptr, tokens = _csr([r.prompt for r in reqs])
        positions = [p for r in reqs for p in range(len(r.prompt))]
        kv_indptr, indices = _csr([r.pages for r in reqs])
        last = [len(r.prompt) - (len(r.pages) - 1) * ps for r in reqs]
        nnz = len(tokens)
        qo_d, kv_indptr_d, indices_d, last_d = (_i32(x, dev) for x in (qo_indptr, kv_indptr, indices, last))
        seq_lens_d = _i32([len(r.prompt) for r in reqs], dev)
        batch_indices, append_pos = self.ops.get_batch_indices_positions(qo_d, seq_lens_d, nnz)
        rn = self.runner
        self.prefill_wrapper.plan(_i32(qo_indptr), _i32(kv_indptr), indices_d, _i32(last), rn.local_qo_heads,
                                  rn.local_kv_heads, rn.head_dim, ps, causal=True, sm_scale=rn.sm_scale,
                                  window_left=rn.window_left, q_data_type=self.dtype, kv_data_type=self.dtype)

        def attend(layer: int, q, k, v):
            cache = self.kv_cache[layer]
            self.ops.append_paged_kv_cache(k, v, batch_indices, append_pos, cache, indices_d, kv_indptr_d, last_d)
            return self.prefill_wrapper.run(q, cache)

        hidden = rn.forward(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev), attend)
        last_rows = torch.tensor(qo_indptr[1:], device=dev) - 1
        last_hidden = hidden[last_rows]
        next_tokens = rn.logits(last_hidden).argmax(-1).tolist()
        for i, (r, t) in enumerate(zip(reqs, next_tokens)):
            r.seq_len = len(r.prompt)
            r.output.append(int(t))
            if self.record_hidden:
                r.hidden.append(last_hidden[i])
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["prefill_tokens"] += nnz
        self.stats["prefill_steps"] += 1

    def _decode(self, reqs: List[Request]) -> None:
        t0 = time.perf_counter()
        n = len(reqs)
        size = next(s for s in self.sizes if s >= n)
        for r in reqs:  # the new token's K/V needs a slot
            if r.seq_len + 1 > len(r.pages) * self.page_size:
                r.pages.extend(self.pool.alloc(1))
        pad = size - n
        tokens = [r.output[-1] for r in reqs] + [0] * pad
        positions = [r.seq_len for r in reqs] + [0] * pad
        pages = [r.pages for r in reqs] + [[0]] * pad
        last = [r.seq_len + 1 - (len(r.pages) - 1) * self.page_size for r in reqs] + [1] * pad
        dec = self.decoders[size]
        dec.load(tokens, positions, pages, last)
        if self.on_decode_step is not None:
            self.on_decode_step(self, n)
        eager = self.eager_decode
        hidden, logits = dec.run(n, eager=eager)
        if self.record_hidden:
            hidden = hidden.clone()  # the graph's output buffer is overwritten by the next replay
        next_tokens = logits.argmax(-1).tolist()  # (the one host sync of the step)
        for i, (r, t) in enumerate(zip(reqs, next_tokens)):
            r.seq_len += 1
            r.output.append(int(t))
            if self.record_hidden:
                r.hidden.append(hidden[i])
        dt = time.perf_counter() - t0
        if not eager:
            self.decode_times[n].append(dt)
        self.stats["decode_s"] += dt
        self.stats["decode_tokens"] += n
        self.stats["decode_steps"] += 1

import torch, flashinfer, math
torch.manual_seed(0)
for dtype in (torch.bfloat16,):
    for causal in (False, True):
        L, H, D = 256, 2, 128
        q = torch.randn(L, H, D, device="cuda", dtype=dtype)
        k = torch.randn(L, H, D, device="cuda", dtype=dtype)
        v = torch.randn(L, H, D, device="cuda", dtype=dtype)
        try:
            o = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=causal, backend="fa3")
            torch.cuda.synchronize()
        except Exception as e:
            print("ERR", e); continue
        s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(D)
        if causal:
            s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool, device="cuda"), 1), float("-inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float())
        err = (o.float() - ref).abs()
        print("causal", causal, "max err", err.max().item(), "nan", torch.isnan(o).sum().item())
        bad = err > 0.05
        print(" bad rows (first 20):", bad.any(-1).any(-1).nonzero().flatten()[:20].tolist())
        print(" bad cols:", bad.any(0).any(0).nonzero().flatten()[:40].tolist())
        # diagnostics: S only (v = identity-ish) to isolate QK vs PV
        v2 = torch.zeros_like(v); v2[:D, :, :] = torch.eye(D, device="cuda", dtype=dtype)[:, None, :]
        o2 = flashinfer.single_prefill_with_kv_cache(q, k, v2, causal=causal, backend="fa3")
        p = s.softmax(-1)  # [h, q, k]
        ref2 = torch.einsum("hqk,khd->qhd", p, v2.float())
        print(" P-probe max err", (o2.float() - ref2).abs().max().item())

#!/usr/bin/env python3
"""Compare the device code (SASS) the templates generate at two revisions, kernel by kernel.

A refactoring of the device headers that must not change behaviour or speed is best proved by the machine
code itself: this renders a representative set of specs of every kernel family with the current checkout's
Python specs (template variables and launchers are the same at both revisions) against the templates of
--base and of the working tree, compiles each to a cubin exactly as the JIT does (nvcc device flags of the
spec, its arch; no -lineinfo), disassembles both with cuobjdump and reports, per kernel:

  identical                     the same instructions, registers and encodings
  identical but for offsets     only the kernel-parameter offsets (c[0x0][...]) or branch targets differ
  commuted compares             as above, and compares written the other way round (a < b vs b > a)
  same multiset                 the same instructions (compares commuted as above), in another order or with
                                other registers
  equivalent ALU forms          as above but for the form ptxas chose for an add, shift or multiply-add (IADD3,
                                VIADD or IMAD.IADD; SHF or IMAD.SHL; LEA or IMAD), the direction of compares
                                and the number of register moves (MOV, IMAD.MOV.U32, CS2R, ...) and NOPs
  differs (-n +m: ...)          n instructions gone, m new (opcode and modifiers, registers ignored), and the
                                mnemonics whose counts changed

with the registers, stack and spills of both. Runs on a machine without a GPU (nvcc and cuobjdump only;
cuobjdump comes with the CUDA toolkit, or `pip install nvidia-cuda-cuobjdump`: pass --cuobjdump).

    python scripts/codegen_diff.py --base HEAD~3                 # every representative spec
    python scripts/codegen_diff.py --base main --only sd1 fa3a   # some of them
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flashinfer.activation import ActivationSpec  # noqa: E402
from flashinfer.cascade import CascadeSharedSpec, MergeStateSpec  # noqa: E402
from flashinfer.decode import BatchDecodePagedSpec as BD  # noqa: E402
from flashinfer.decode import SingleDecodeSpec as SD  # noqa: E402
from flashinfer.jit import env  # noqa: E402
from flashinfer.norm import NormSpec  # noqa: E402
from flashinfer.page import PageAppendSpec  # noqa: E402
from flashinfer.prefill import BatchPrefillSpec as BP  # noqa: E402
from flashinfer.prefill import SinglePrefillSpec as SP  # noqa: E402
from flashinfer.rope import RopeSpec  # noqa: E402
from flashinfer.sampling import SamplingSpec  # noqa: E402

F16 = {"dtype_q": "f16", "dtype_kv": "f16", "dtype_o": "f16"}
# Every family, every decode head tile (a decode module holds the 1-, 2-, 4- and 8-head tiles), the tensor-core
# and CUDA-core decode paths, every position encoding, mask, window, soft cap, fp16 QK, both KV storages, fa3;
# and one of each op family (merge_state, cascade_shared, sampling; rope, norm, activation in bf16 and f16).
SPECS = {
    "sd1": SD(head_dim=128, kv_layout="NHD", pos_encoding_mode="NONE"),
    "sd2": SD(
        head_dim=64, **F16, kv_layout="HND", pos_encoding_mode="ROPE_LLAMA", use_window=True, use_logits_soft_cap=True
    ),
    "sd3": SD(head_dim=256, pos_encoding_mode="ALIBI", use_window=True, use_logits_soft_cap=True),
    "sd4": SD(head_dim=64, pos_encoding_mode="ALIBI", use_logits_soft_cap=True),
    "bd1": BD(head_dim=128, kv_layout="NHD", pos_encoding_mode="NONE"),
    "bd2": BD(head_dim=128, kv_layout="HND", pos_encoding_mode="ROPE_LLAMA"),
    "bd3": BD(head_dim=256, pos_encoding_mode="NONE", use_logits_soft_cap=True),
    "bd4": BD(head_dim=64, **F16, kv_layout="HND", pos_encoding_mode="ALIBI"),
    # fp8 KV caches: the CUDA-core (1-, 2-head tiles, RoPE, d256) and tensor-core (4-, 8-head) fp8 paths.
    "sd5": SD(head_dim=128, dtype_kv="e4m3"),
    "sd6": SD(head_dim=64, dtype_kv="e5m2", pos_encoding_mode="ROPE_LLAMA", use_logits_soft_cap=True),
    "bd5": BD(head_dim=128, dtype_kv="e4m3"),
    "bd6": BD(head_dim=256, dtype_kv="e5m2", kv_layout="HND", pos_encoding_mode="ALIBI"),
    "sp1": SP(head_dim=128, mask_mode="causal"),
    "sp2": SP(
        head_dim=64,
        **F16,
        mask_mode="custom",
        pos_encoding_mode="ROPE_LLAMA",
        use_window=True,
        use_logits_soft_cap=True,
        use_fp16_qk_reduction=True,
    ),
    "sp3": SP(head_dim=256, pos_encoding_mode="ALIBI"),
    "sp4": SP(head_dim=128, **F16, use_fp16_qk_reduction=True),
    "fa3a": SP(head_dim=128, backend="fa3"),
    "fa3b": SP(head_dim=128, **F16, mask_mode="causal", backend="fa3"),
    "fa3f": SP(head_dim=128, dtype_kv="e4m3", mask_mode="causal", backend="fa3"),
    "ws1": SP(head_dim=128, mask_mode="causal", backend="fa3_ws"),
    "ws2": SP(head_dim=128, **F16, backend="fa3_ws"),
    "wse4": SP(head_dim=128, dtype_kv="e4m3", mask_mode="causal", backend="fa3_ws"),
    "wse5": SP(head_dim=128, dtype_q="f16", dtype_kv="e5m2", dtype_o="f16", backend="fa3_ws"),
    "fa3c": SP(head_dim=128, dtype_kv="e4m3", backend="fa3"),
    "br1": BP(kv_storage="ragged", head_dim=128, mask_mode="causal"),
    "wsr": BP(kv_storage="ragged", head_dim=128, mask_mode="causal", backend="fa3_ws"),
    "wsp": BP(kv_storage="paged", head_dim=128, mask_mode="causal", backend="fa3_ws"),
    "br2": BP(kv_storage="ragged", head_dim=64, **F16, mask_mode="custom", pos_encoding_mode="ALIBI", use_window=True),
    "bp1": BP(kv_storage="paged", head_dim=128, pos_encoding_mode="ROPE_LLAMA"),
    "bp2": BP(kv_storage="paged", head_dim=256, mask_mode="causal", use_logits_soft_cap=True),
    "bp3": BP(kv_storage="paged", head_dim=64, **F16, mask_mode="custom", use_window=True, use_fp16_qk_reduction=True),
    "fp8a": SP(head_dim=128, dtype_kv="e4m3", mask_mode="causal"),
    "fp8b": BP(kv_storage="paged", head_dim=128, dtype_kv="e5m2", mask_mode="causal"),
    "pa1": PageAppendSpec(head_dim=128, dtype_kv="bf16"),
    "pa2": PageAppendSpec(head_dim=64, dtype_kv="f16"),
    "ms1": MergeStateSpec(),
    "cs1": CascadeSharedSpec(),
    "cs2": CascadeSharedSpec(**F16),
    "cs3": CascadeSharedSpec(dtype_kv="e4m3"),
    "rp1": RopeSpec(),
    "rp2": RopeSpec(dtype="f16"),
    "nm1": NormSpec(),
    "nm2": NormSpec(dtype="f16"),
    "ac1": ActivationSpec(),
    "ac2": ActivationSpec(dtype="f16"),
    "sa1": SamplingSpec(),
}


def render(templates: Path, spec) -> str:
    import jinja2

    # The options of flashinfer.jit.templating.jinja_env, over another templates/ tree.
    e = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return e.get_template(spec.template).render(**spec.template_vars())


def compile_sass(templates: Path, spec, out: Path, tag: str, cuobjdump: str) -> tuple[str, str]:
    cu = out / f"{tag}.cu"
    cu.write_text(render(templates, spec))
    flags = [f for f in env.nvcc_flags(spec) if f not in ("-lineinfo", "--resource-usage")]
    cubin = out / f"{tag}.cubin"
    r = subprocess.run(
        [
            str(env.find_cuda_home() / "bin" / "nvcc"),
            "-cubin",
            *flags,
            "-I",
            str(templates / "include"),
            "-Xptxas",
            "-v",
            "-o",
            str(cubin),
            str(cu),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(f"{tag}: nvcc failed\n{r.stderr[-3000:]}")
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    return sass, res


def kernels(sass: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*/\* 0x[0-9a-f]+ \*/", line)
        if cur is not None and m:
            out[cur].append(m.group(1).rstrip(" ;"))
    return out


def resources(res: str) -> dict[str, str]:
    out, cur = {}, None
    for line in res.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
        elif cur and "REG:" in line:
            out[cur] = " ".join(x for x in line.split() if x.split(":")[0] in ("REG", "STACK", "LOCAL"))
    return out


def without_offsets(ins: list[str]) -> list[str]:
    ins = [re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][.]", i) for i in ins]
    return [re.sub(r"\b(BRA|CALL\.REL\.NOINC|BSSY|BRX)(\s+\S+,)?\s+(`\(\S+\)\s*)?0x[0-9a-f]+", r"\1 .", i) for i in ins]


_SWAP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "EQ": "EQ", "NE": "NE"}


def commuted(i: str) -> str:
    m = re.match(r"(@!?U?P\w+ )?(U?ISETP)\.(LT|GT|LE|GE|EQ|NE)((?:\.\w+)*) (U?P\w+), (U?P\w+), ([^,]+), ([^,]+)(.*)", i)
    if not m:
        return i
    pred, op, cmp, mods, d1, d2, a, b, rest = m.groups()
    if a > b:
        a, b, cmp = b, a, _SWAP[cmp]
    return f"{pred or ''}{op}.{cmp}{mods} {d1}, {d2}, {a}, {b}{rest}"


def opcodes(ins: list[str]) -> collections.Counter:
    return collections.Counter(re.sub(r"\bU?R\d+\b|\bU?P\d\b|0x[0-9a-f]+|c\[0x0\]\[\.\]|\.reuse", "_", i) for i in ins)


def mnemonics(ins: list[str]) -> collections.Counter:
    return collections.Counter(i.split()[1] if i.startswith("@") else i.split()[0] for i in ins)


# Instructions ptxas picks among to balance its pipes: the same operation (an add, a move, a shift, a multiply-add
# by a constant) in another form. Moves and NOPs are register-allocation and scheduling artefacts.
_ALU_FORMS = {
    "IADD3": "add",
    "VIADD": "add",
    "IMAD.IADD": "add",
    "IMAD.MOV": "add",
    "MOV": "move",
    "IMAD.MOV.U32": "move",
    "IMAD.U32": "move",
    "HFMA2.MMA": "move",
    "CS2R": "move",
    "UMOV": "move",
    "SHF.L.U32": "shift",
    "IMAD.SHL.U32": "shift",
    "LEA": "mad",
    "IMAD": "mad",
    "NOP": "move",
}


def alu_classes(ins: list[str]) -> collections.Counter:
    counts = collections.Counter()
    for op, n in mnemonics([commuted(i) for i in ins]).items():
        op = re.sub(r"^(U?ISETP)\.(LT|GT|LE|GE)", r"\1.ORD", op)  # compare direction: see commuted()
        counts[_ALU_FORMS.get(op, op)] += n
    counts.pop("move", None)
    return counts


def verdict(before: list[str], after: list[str]) -> str:
    if before == after:
        return "identical"
    b, a = without_offsets(before), without_offsets(after)
    if b == a:
        return "identical but for offsets"
    if [commuted(i) for i in b] == [commuted(i) for i in a]:
        return "commuted compares"
    ob, oa = opcodes([commuted(i) for i in b]), opcodes([commuted(i) for i in a])
    if ob == oa:
        return "same multiset"
    if alu_classes(b) == alu_classes(a):
        return "equivalent ALU forms"
    gone, new = mnemonics(b) - mnemonics(a), mnemonics(a) - mnemonics(b)
    delta = " ".join([f"-{n} {op}" for op, n in gone.most_common(6)] + [f"+{n} {op}" for op, n in new.most_common(6)])
    return f"differs (-{sum((ob - oa).values())} +{sum((oa - ob).values())}: {delta})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose templates/ is the reference")
    ap.add_argument("--only", nargs="*", default=None, help=f"spec ids, of {', '.join(SPECS)}")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or str(env.find_cuda_home() / "bin" / "cuobjdump"))
    ap.add_argument("--keep", default=None, help="directory to keep the rendered sources and cubins in")
    args = ap.parse_args()
    if not Path(args.cuobjdump).is_file():
        ap.error(f"no cuobjdump at {args.cuobjdump} (pip install nvidia-cuda-cuobjdump, then pass --cuobjdump)")
    ids = args.only or list(SPECS)
    unknown = [i for i in ids if i not in SPECS]
    if unknown:
        ap.error(f"unknown spec ids {unknown}; known: {', '.join(SPECS)}")
    work = Path(args.keep or tempfile.mkdtemp(prefix="codegen_diff_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", args.base, "templates"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(base)
    totals = collections.Counter()
    for sid in ids:
        spec = SPECS[sid]
        sass_b, res_b = compile_sass(base / "templates", spec, work, f"{sid}_base", args.cuobjdump)
        sass_a, res_a = compile_sass(REPO / "templates", spec, work, f"{sid}_tree", args.cuobjdump)
        kb, ka = kernels(sass_b), kernels(sass_a)
        rb, ra = resources(res_b), resources(res_a)
        # A module whose one kernel changed its template signature (a new parameter): compared under the tree's name.
        only_b, only_a = set(kb) - set(ka), set(ka) - set(kb)
        if len(only_b) == 1 and len(only_a) == 1:
            (old,), (new,) = only_b, only_a
            print(f"  renamed: {old} -> {new}")
            kb[new] = kb.pop(old)
            rb[new] = rb.pop(old, None)
        print(f"{sid} {spec.name()}")
        for k in sorted(set(kb) | set(ka)):
            v = verdict(kb[k], ka[k]) if k in kb and k in ka else ("only in base" if k in kb else "only in tree")
            totals[v.split(" (")[0]] += 1
            res = rb.get(k) if rb.get(k) == ra.get(k) else f"{rb.get(k)} -> {ra.get(k)}"
            print(f"  {v}\n      {len(kb.get(k, []))}->{len(ka.get(k, []))} instrs  {res}  {k}")
    print("kernels: " + ", ".join(f"{n} {v}" for v, n in totals.most_common()))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

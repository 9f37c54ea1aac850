#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, initcheck and synccheck over a representative subset of every kernel
# family's GPU tests (issue 10): small shapes covering every code path (split-KV and not, paged page size 1 and
# 16, ragged, masks, fa2 and fa3, CUDA-graph mode, cascade levels, invalid page ids), one pytest process per
# tool and family, all of them side by side (racecheck on a GPU of its own when there are two). Prints which
# tests each tool ran and a per-family table of findings; exits 1 on any finding or failing test, 0 when every family is clean.
#
#   scripts/sanitize.sh                 all four tools
#   scripts/sanitize.sh memcheck        some of them
#   SANITIZE_COLLECT_ONLY=1 scripts/sanitize.sh   print the selection and stop (no GPU needed)
#   SANITIZE_FAMILIES="sampling" scripts/sanitize.sh   only the families named
#
# Needs a GPU, compute-sanitizer (from $CUDA_HOME/bin or PATH) and, for a run that fits one device call
# (< 8 min on an H200), the tests' modules prebuilt in FLASHINFER_JIT_CACHE (python -m flashinfer prewarm
# --preset test): a missing module is built under the sanitizer, which is slow but still correct.
# Logs: $SANITIZE_OUT (default /tmp/flashinfer-sanitize)/<tool>.log.
#
# Each family lists a test file and two pytest -k expressions: the memcheck set (wider: out-of-bounds and
# misaligned accesses are where shapes matter) and the set of the slower tools (racecheck costs ~10 s a test;
# initcheck and synccheck share its set). The expressions were chosen by reading the test files; keep them
# matching when tests are renamed: an expression, or any one of its or-branches, that selects nothing is reported
# as an error (a renamed parametrisation once dropped every 16-bit fa3_ws test from both sets unnoticed), and
# SANITIZE_COLLECT_ONLY=1 then exits 1 (tests/test_lint.py runs it on every CI run).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
OUT=${SANITIZE_OUT:-/tmp/flashinfer-sanitize}
mkdir -p "$OUT"
SAN=${COMPUTE_SANITIZER:-}
if [[ -z "$SAN" ]]; then
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "$(command -v compute-sanitizer 2>/dev/null)"; do
    [[ -n "$c" && -x "$c" ]] && { SAN=$c; break; }
  done
fi
[[ -n "$SAN" || -n "${SANITIZE_COLLECT_ONLY:-}" ]] || { echo "sanitize: compute-sanitizer not found (set COMPUTE_SANITIZER or CUDA_HOME)" >&2; exit 2; }

TOOLS=("$@")
[[ ${#TOOLS[@]} -gt 0 ]] || TOOLS=(memcheck racecheck initcheck synccheck)

# family | test file | memcheck -k | racecheck/initcheck/synccheck -k
FAMILIES=(
  "decode|tests/test_decode.py|(test_decode_matrix and (q-f16_kv-f16_o-f16_d128_nhd_pos-none_window-off_softcap-off-1024] or q-bf16_kv-bf16_o-bf16_d64_hnd_pos-ropellama_window-on_softcap-off-1] or q-f16_kv-f16_o-f16_d256_nhd_pos-alibi_window-off_softcap-on-1024] or q-bf16_kv-bf16_o-bf16_d128_nhd_pos-ropellama_window-on_softcap-on-33001])) or test_decode_window_edges[255] or test_decode_strided_views[100-HND] or test_decode_fp8_matrix or test_decode_fp8_scales_as_cpu_tensors_with_q_scale_and_sm_scale|test_decode_matrix and (q-f16_kv-f16_o-f16_d128_nhd_pos-none_window-off_softcap-off-1024] or q-bf16_kv-bf16_o-bf16_d128_nhd_pos-ropellama_window-on_softcap-on-33001]) or (test_decode_fp8_matrix and (q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none or q-f16_kv-e5m2_o-f16_d64_hnd))"
  "batch_decode|tests/test_batch_decode.py|test_batch_decode_mixed_lengths[NHD-tuple-1-7] or test_batch_decode_mixed_lengths[HND-single-16-257] or test_batch_decode_mixed_lengths[NHD-single-64-64] or test_batch_decode_window[15-ROPE_LLAMA] or test_batch_decode_tensor_cores_matrix[NHD-float16-128-NONE] or test_batch_decode_tensor_cores_window_and_soft_cap[ALIBI--1-1.5-HND] or test_graph_mode_replays_after_replan or test_requests_without_keys_give_zero_and_minus_inf or test_split_control_pdl_and_lse_without_return_lse or test_batch_decode_fp8_matrix or test_batch_decode_fp8_window_and_options or test_fp8_graph_mode_replays_after_replan or test_batch_decode_tma_matrix[True-32-8-NHD-tuple-16-bf16-128] or test_batch_decode_tma_matrix[True-48-16-HND-tuple-64-f16-64] or test_batch_decode_tma_window_soft_cap[True-15-30.0]|test_batch_decode_mixed_lengths[NHD-tuple-1-7] or test_batch_decode_mixed_lengths[HND-single-16-257] or test_batch_decode_tensor_cores_matrix[NHD-float16-128-NONE] or test_graph_mode_replays_after_replan[32-8-True-False] or test_requests_without_keys_give_zero_and_minus_inf[32-8-True-False] or test_batch_decode_tma_matrix[True-32-8-NHD-tuple-16-bf16-128] or (test_batch_decode_fp8_matrix and q-bf16_kv-e4m3_o-bf16_d128_nhd_pos-none) or test_fp8_graph_mode_replays_after_replan[e5m2]"
  "prefill_single|tests/test_prefill.py|test_single_prefill_fa3[17-17-4-causal-dtype0] or test_single_prefill_fa3[300-4096-4-none-dtype1] or test_single_prefill_fa3_ws[q127-kv129-4-causal-bf16-d128] or test_single_prefill_fa3_ws[q127-kv129-4-causal-bf16-d64] or test_single_prefill_fa3_ws[q1000-kv127-8-none-f16-d128] or test_single_prefill_fa3_ws[q1000-kv127-8-none-f16-d64] or test_single_prefill_fa3_ws_fp8[q127-kv129-4-causal-bf16-e4m3] or test_single_prefill_fa3_ws_fp8[q1000-kv127-8-none-f16-e5m2] or test_single_prefill_fa3_ws_many_items_per_cta[causal-d128] or test_single_prefill_fa3_ws_views_empty_kv_and_stream or test_single_prefill_split_kv_long[128] or test_single_prefill_window_edges[causal-63] or test_single_prefill_packed_mask_and_return_lse_alias or test_single_prefill_lengths_groups_masks[none-1-0-17] or test_single_prefill_strided_views[HND] or test_decode_with_tensor_cores_matches_reference[4] or (test_single_prefill_fp8 and (d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa2] or d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa3] or q-f16_kv-e5m2_o-f16_d64_mask-none))|test_single_prefill_fa3[17-17-4-causal-dtype0] or test_single_prefill_fa3[300-4096-4-none-dtype1] or test_single_prefill_fa3_ws[q127-kv129-4-causal-bf16-d128] or test_single_prefill_fa3_ws_views_empty_kv_and_stream or test_single_prefill_fa3_ws_fp8[q127-kv129-4-causal-bf16-e4m3] or test_single_prefill_split_kv_long[64] or test_single_prefill_packed_mask_and_return_lse_alias or test_single_prefill_fp8[prefill_single_q-bf16_kv-e4m3_o-bf16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa3] or test_single_prefill_fp8[prefill_single_q-f16_kv-e5m2_o-f16_d128_mask-causal_pos-none_window-off_softcap-off_fp16qk-off_fa2]"
  "prefill_batch|tests/test_prefill.py|test_batch_prefill_matrix[NHD-none-0-ragged-0] or test_batch_prefill_matrix[NHD-causal-1-paged-1] or test_batch_prefill_matrix[HND-custom-2-paged-16] or test_batch_prefill_matrix[HND-causal-2-ragged-0] or test_batch_prefill_options_and_split_kv or test_batch_prefill_cuda_graph_replays_new_plans or test_batch_prefill_causal_with_more_queries_than_keys or test_batch_prefill_split_control_pdl_scales_and_lse or test_batch_prefill_fp8[causal-1-paged-16] or test_batch_prefill_fp8[none-2-ragged-0] or test_batch_prefill_fa3_ws_ragged[mixed-4-causal-NHD-bf16-split_300-d128] or test_batch_prefill_fa3_ws_ragged[mixed-4-causal-NHD-bf16-split_auto-d64] or test_batch_prefill_fa3_ws_ragged[tiles-8-none-HND-f16-split_off-d128] or test_batch_prefill_fa3_ws_views_scales_pdl_stream_and_empty or test_batch_prefill_fa3_ws_paged[mixed-16-split_auto-4-causal-NHD] or test_batch_prefill_fa3_ws_paged[tiles-1-split_off-1-none-HND] or test_batch_prefill_fa3_ws_paged[longer_kv-256-split_5pages-4-causal-NHD] or test_batch_prefill_fa3_ws_paged_d64[mixed-16-causal-NHD] or test_batch_prefill_fa3_ws_paged_tuple_cache_scales_pdl_and_refusals or test_decode_with_tensor_cores_fp8[bf16-e4m3]|test_batch_prefill_matrix[NHD-causal-1-paged-16] or test_batch_prefill_matrix[HND-custom-2-ragged-0] or test_batch_prefill_options_and_split_kv[NONE] or test_batch_prefill_cuda_graph_replays_new_plans or test_batch_prefill_causal_with_more_queries_than_keys[4-paged] or test_batch_prefill_fp8[causal-1-paged-16] or test_batch_prefill_fa3_ws_ragged[mixed-4-causal-NHD-bf16-split_300-d128] or test_batch_prefill_fa3_ws_paged[mixed-5-split_auto-4-causal-NHD]"
  "page_append|tests/test_page.py|test_append_lands_where_the_page_table_says[torch.float16-1-single-NHD] or test_append_lands_where_the_page_table_says[torch.bfloat16-16-tuple-HND] or test_append_skips_entries_outside_the_page_table or test_append_fp8_then_decode_reads_it|test_append_lands_where_the_page_table_says[torch.float16-16-single-NHD] or test_append_skips_entries_outside_the_page_table or test_append_fp8_then_decode_reads_it[torch.float8_e5m2]"
  "cascade|tests/test_cascade.py|test_merge_state[37x3x72-bf16] or test_merge_state_in_place_with_mask_and_views[transposed-300x6x128-bf16] or test_merge_state_in_place_with_mask_and_views[contiguous-77x5x96-f16] or test_merge_states[1x1x4x128-f16] or test_merge_state_in_place_with_mask_and_views[transposed-9x2x2048-f16] or test_two_levels[decode-float16-d128-32q8kv-NHD-tuple] or (test_two_levels and prefill-bfloat16-d128-32q4kv-HND-tuple) or test_shared_level_on_wgmma_and_on_batch_prefill[1-HND-2500-bf16] or test_cuda_graph_replays_after_replans|test_merge_states[1x1x4x128-f16] or test_merge_state_in_place_with_mask_and_views[contiguous-77x5x96-f16] or test_merge_state_in_place_with_mask_and_views[contiguous-40x3x256-bf16] or test_two_levels[decode-float16-d128-32q8kv-NHD-tuple] or test_shared_level_on_wgmma_and_on_batch_prefill[16-HND-40-f16]"
  "rope|tests/test_rope.py|test_pos_ids_matches_reference[False-False-128-128-dtype0] or test_every_kernel_form_with_cos_sin_cache[forms2-hs128-rot128-neox1-n1-ip1] or test_every_kernel_form_with_cos_sin_cache[forms2-hs128-rot64-neox0-n4096-ip0] or test_every_kernel_form_with_cos_sin_cache[forms2-hs64-rot40-neox1-n7-ip0] or test_cos_sin_cache_matches_reference[True-hs256-rot128-neox1-n1024-dtype1] or test_ragged_indptr_offsets[idtype0-True-True-dtype1] or test_cuda_graph_capture_and_replay|test_pos_ids_matches_reference[False-False-128-128-dtype0] or test_cos_sin_cache_matches_reference[True-hs64-rot64-neox1-n1024-dtype0] or test_every_kernel_form_with_cos_sin_cache[forms2-hs128-rot128-neox1-n4096-ip1]"
  "norm|tests/test_norm.py|test_rmsnorm_matches_reference[False-64-dtype0] or test_fused_add_rmsnorm_matches_reference[False-1032-dtype1] or test_hidden_sizes_not_multiple_of_8[7-dtype0] or test_qk_norm_3d[128-dtype1] or test_cuda_graph_capture_and_replay|test_rmsnorm_matches_reference[False-64-dtype0] or test_fused_add_rmsnorm_matches_reference[False-1032-dtype1]"
  "activation|tests/test_activation.py|test_matches_reference[8-silu-dtype0] or test_matches_reference[8-gelu-dtype1] or test_sizes_not_multiple_of_8[1-silu-dtype0] or test_large_batch_takes_the_full_gpu_path or test_cuda_graph_capture_and_replay|test_matches_reference[8-silu-dtype0] or test_sizes_not_multiple_of_8[1-silu-dtype0]"
  "input_checks|tests/test_input_checks.py|test_paged_prefill_device_page_ids_out_of_cache_read_as_zero_keys or test_batch_decode_device_page_ids_out_of_cache_read_as_zero_keys or test_cascade_device_page_ids_out_of_cache_read_as_zero_keys|test_paged_prefill_device_page_ids_out_of_cache_read_as_zero_keys[True-16] or test_batch_decode_device_page_ids_out_of_cache_read_as_zero_keys[True-False]"
  # sampling may not exist yet: one parameter set of each of its first GPU tests (see pick_first below)
  "sampling|tests/test_sampling.py|@first:6|@first:3"
)

# -------------------------------------------------------------------------------------------- selection
# Node ids per family and tool set, collected once (on the CPU side of the run): $OUT/select.<set>.<family>.
collect() {  # family file expr set
  local fam=$1 file=$2 expr=$3 set=$4 dst="$OUT/select.$4.$1"
  if [[ ! -f "$file" ]]; then
    echo "# $file absent" >"$dst"
    return
  fi
  if [[ "$expr" == @first:* ]]; then
    "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu "$file" 2>/dev/null | grep '::' |
      awk -F'[' -v n="${expr#@first:}" '!seen[$1]++ && c < n { print; c++ }' >"$dst"
  else
    "$PY" -m pytest -q --collect-only -p no:cacheprovider -m gpu "$file" -k "$expr" 2>/dev/null | grep '::' >"$dst"
    local dead
    dead=$("$PY" - "$expr" "$dst" <<'EOF'
import re
import sys

# Each or-branch of a pytest -k expression (and/or/not/parentheses over substrings, as pytest reads it) must
# select at least one of the collected node ids: a parametrisation renamed under the expression drops its tests
# silently otherwise (the rest of the family still selects something).
expr, dst = sys.argv[1], sys.argv[2]
ids = [ln.strip() for ln in open(dst) if ln.strip() and not ln.startswith("#")]
toks = re.findall(r"\(|\)|[^\s()]+", expr)
pos = 0


def parse_or():
    global pos
    alts = parse_and()
    while pos < len(toks) and toks[pos] == "or":
        pos += 1
        alts = alts + parse_and()
    return alts


def parse_and():  # -> list of conjunctions (lists of (negated, word))
    global pos
    alts = parse_not()
    while pos < len(toks) and toks[pos] == "and":
        pos += 1
        right = parse_not()
        alts = [a + b for a in alts for b in right]
    return alts


def parse_not():
    global pos
    tok = toks[pos]
    pos += 1
    if tok == "not":
        inner = parse_not()
        if len(inner) != 1 or len(inner[0]) != 1:
            sys.exit(f"sanitize: only a single word may be negated in -k '{expr}'")
        (neg, word), = inner[0]
        return [[(not neg, word)]]
    if tok == "(":
        alts = parse_or()
        pos += 1  # ")"
        return alts
    return [[(False, tok)]]


def keywords(node):
    path, _, name = node.rpartition("::")
    return [name.lower()] + [p.lower() for p in path.split("/")]


def holds(conj, node):
    kws = keywords(node)
    return all(any(w.lower() in k for k in kws) != neg for neg, w in conj)


for conj in parse_or():
    if not any(holds(conj, n) for n in ids):
        text = " and ".join(("not " if neg else "") + w for neg, w in conj)
        print(f"# TERM SELECTS NOTHING: {text}")
EOF
)
    [[ -z "$dead" ]] || echo "$dead" >>"$dst"
  fi
  grep -qv '^#' "$dst" || echo "# NOTHING SELECTED by -k '$expr' in $file" >>"$dst"
}
rm -f "$OUT"/select.* "$OUT"/*.log "$OUT"/*.rc "$OUT"/*.tests  # a reused $SANITIZE_OUT: only this run's files
for f in "${FAMILIES[@]}"; do
  IFS='|' read -r fam file mexpr rexpr <<<"$f"
  # SANITIZE_FAMILIES="sampling cascade": only those families (e.g. to re-check a fix)
  if [[ -n "${SANITIZE_FAMILIES:-}" && " $SANITIZE_FAMILIES " != *" $fam "* ]]; then continue; fi
  collect "$fam" "$file" "$mexpr" full &
  collect "$fam" "$file" "$rexpr" lite &
done
wait

selection() {  # set -> node ids of every family
  cat "$OUT"/select."$1".* | grep -v '^#' || true
}

if [[ -n "${SANITIZE_COLLECT_ONLY:-}" ]]; then
  for s in full lite; do
    for f in "$OUT"/select."$s".*; do
      echo "== $s ${f##*.}: $(grep -vc '^#' "$f") tests"
      sed 's/^/   /' "$f"
    done
  done
  # (an expression, or one of its or-branches, that selects nothing: exit 1, as the full run reports it)
  ! cat "$OUT"/select.* | grep -q -e '^# NOTHING SELECTED' -e '^# TERM SELECTS NOTHING'
  exit $?
fi

# -------------------------------------------------------------------------------------------- tools
# One process per family: a kernel fault poisons its CUDA context, which would end every later test of the
# process (the last run lost 43 of memcheck's tests so); a family's fault now ends that family only.
# No caching allocator under memcheck: an overrun then leaves its own allocation instead of landing in a
# neighbour's block of the same pool, where memcheck cannot see it.
# CUDA-graph tests keep the caching allocator (a capture cannot cudaMalloc: their tensors come from the graph's
# pool) and run in a process of their own.
run_family() {  # tool set selection-file extra-args... ; log: $OUT/<tool>.<family>.log; exit 1 on any finding
  local tool=$1 set=$2 sel=$3 rc=0 nocache part
  shift 3
  local log="$OUT/$tool.${sel##*.}.log"
  : >"$log"
  for part in plain graph; do
    if [[ $part == graph ]]; then
      mapfile -t nodes < <(grep -v '^#' "$sel" | grep -i 'graph' || true)
      nocache=0
    else
      mapfile -t nodes < <(grep -v '^#' "$sel" | grep -vi 'graph' || true)
      nocache=$([[ $tool == memcheck ]] && echo 1 || echo 0)
    fi
    [[ ${#nodes[@]} -gt 0 ]] || continue
    echo "## family ${sel##*.} ($part)" >>"$log"
    PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=$nocache \
      "$SAN" --tool "$tool" --error-exitcode 1 --report-api-errors no --print-limit 50 "$@" \
      "$PY" -m pytest -v -rA -p no:cacheprovider -m gpu "${nodes[@]}" >>"$log" 2>&1 || rc=1
  done
  return $rc
}

run_tool() {  # tool
  local tool=$1 set=lite extra=()
  case $tool in
    memcheck) set=full; extra=(--leak-check no) ;;
    racecheck) extra=(--racecheck-report hazard) ;;
    initcheck) ;;  # (--track-unused-memory is a flag without a value here: "no" was read as the program)
    synccheck) ;;
    *) echo "sanitize: unknown tool $tool" >&2; return 2 ;;
  esac
  mapfile -t nodes < <(selection "$set")
  {
    echo "## $tool ran ${#nodes[@]} tests:"
    printf '##   %s\n' "${nodes[@]}"
  } >"$OUT/$tool.tests"
  # Families run side by side (each process is bound by the sanitizer's CPU work, ~10 s a test under racecheck):
  # the run then takes its slowest family's time, not the sum (measured on an H200 x2 host, 2026-11-30:
  # racecheck batch_decode 230 s, prefill_batch and prefill_single ~190 s each, the rest under 60 s).
  # SANITIZE_SERIAL=1 runs them one after another (e.g. on a host with little memory: each process holds a
  # CUDA context and torch).
  local sel pids=()
  for sel in "$OUT"/select."$set".*; do
    run_family "$tool" "$set" "$sel" "${extra[@]}" &
    pids+=($!)
    [[ -n "${SANITIZE_SERIAL:-}" ]] && wait "${pids[-1]}"
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  : >"$OUT/$tool.log"
  for sel in "$OUT"/select."$set".*; do
    cat "$OUT/$tool.${sel##*.}.log" >>"$OUT/$tool.log" 2>/dev/null
    rm -f "$OUT/$tool.${sel##*.}.log"
  done
  echo $rc >"$OUT/$tool.rc"
}

start=$(date +%s)
# With two GPUs or more visible (and CUDA_VISIBLE_DEVICES unset), racecheck (the slow one: ~10 s a test) gets the
# last GPU to itself and the other tools share the first: the whole run then takes racecheck's time.
NGPU=0
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
for t in "${TOOLS[@]}"; do
  if [[ $NGPU -ge 2 ]]; then
    dev=0
    [[ $t == racecheck ]] && dev=$((NGPU - 1))
    CUDA_VISIBLE_DEVICES=$dev run_tool "$t" &
  else
    run_tool "$t" &
  fi
done
wait
echo "sanitize: ${TOOLS[*]} in $(( $(date +%s) - start )) s (logs in $OUT)"

# -------------------------------------------------------------------------------------------- report
"$PY" - "$OUT" "${TOOLS[@]}" <<'EOF'
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
tools = sys.argv[2:]
families = {}  # node id -> family
missing = []
for sel in sorted(out.glob("select.*.*")):
    _, _, fam = sel.name.split(".", 2)
    for line in sel.read_text().splitlines():
        if line.startswith(("# NOTHING SELECTED", "# TERM SELECTS NOTHING")):
            missing.append(f"{fam}: {line[2:]}")
        elif line and not line.startswith("#"):
            families[line.strip()] = fam
fams = sorted(set(families.values()) | {m.split(":")[0] for m in missing})
# A report starts with "========= <text>" (details are indented further); summaries and banners are not reports.
header = re.compile(r"(?<!=)========= (?! )(?!ERROR SUMMARY|RACECHECK SUMMARY|COMPUTE-SANITIZER|Target application)")
node_re = re.compile(r"^(tests/\S+::\S+)")
summary_re = re.compile(r"^(PASSED|FAILED|ERROR) (tests/\S+::\S+)")
table = {f: {t: [0, 0, 0] for t in tools} for f in fams}  # findings, tests run, tests failed
bad = False
for t in tools:
    print(open(out / f"{t}.tests").read() if (out / f"{t}.tests").exists() else f"## {t}: no test list")
    log = out / f"{t}.log"
    if not log.exists():
        print(f"## {t}: no log")
        bad = True
        continue
    cur = None
    reports = []
    for raw in log.read_text(errors="replace").splitlines():
        m = node_re.match(raw)
        if m:  # -v: "tests/x.py::test_y[id] " is printed as the test starts
            cur = m.group(1)
        m = summary_re.match(raw)
        if m and m.group(2) in families:  # -rA's short summary: one line per test with its outcome
            table[families[m.group(2)]][t][1] += 1
            table[families[m.group(2)]][t][2] += m.group(1) != "PASSED"
        h = header.search(raw)
        if h:
            fam = families.get(cur, "(outside a test)")
            table.setdefault(fam, {x: [0, 0, 0] for x in tools})[t][0] += 1
            reports.append(f"  [{fam}] {cur}: {raw[h.end():].strip()}")
    rc = (out / f"{t}.rc").read_text().strip() if (out / f"{t}.rc").exists() else "?"
    summary = [l.strip() for l in log.read_text(errors="replace").splitlines() if "SUMMARY" in l]
    print(f"## {t}: exit {rc}; {summary[-1] if summary else 'no sanitizer summary'}")
    for r in reports[:40]:
        print(r)
    if rc != "0" or reports:
        bad = True
print()
w = max(len(f) for f in table) if table else 8
print("family".ljust(w) + "".join(f"  {t:>22}" for t in tools))
for fam in sorted(table):
    cells = []
    for t in tools:
        n, ran, failed = table[fam][t]
        # A family whose tests all skipped (no GPU visible, a missing module...) proved nothing: not clean.
        cells.append(f"  {f'{n} findings, {ran} tests' + (f' ({failed} failed)' if failed else '') + ('' if ran else ' (NONE RAN)'):>22}")
        bad |= bool(n or failed or not ran)
    print(fam.ljust(w) + "".join(cells))
for m in missing:
    if "test_sampling.py" not in m:
        print("selection error:", m)
        bad = True
print("\nsanitize:", "FINDINGS (see above and the logs)" if bad else "clean")
sys.exit(1 if bad else 0)
EOF

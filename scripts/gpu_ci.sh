#!/usr/bin/env bash
# The one script GPU runners run (self-hosted CI, or a lent H100/H200 box with no network).
#
#   scripts/gpu_ci.sh [reference] [prewarm] [test] [sanitize] [before] [bench]
#       (default: reference prewarm test bench, in the order given)
#   reference: unpack the real FlashInfer bundle (.bench/fi, see shared/tools/flashinfer-reference) into
#              /tmp/fi_ref_site, for the benchmarks' reference columns (skipped when .bench/fi is absent), and
#              start building its sampling module in the background (minutes; the bench step waits for it)
#   sanitize:  scripts/sanitize.sh (compute-sanitizer over a subset of every family's GPU tests)
#   before:    the benchmarks of an older tree (BEFORE_TREE, default .bench/before: e.g. `git archive <rev>`)
#              in this same run, with their own JIT cache: before/after speeds measured side by side
#
# Uses the python3 on PATH as is (torch with CUDA, nvcc, ninja, jinja2, filelock, pytest): nothing is
# downloaded. The checkout is put on PYTHONPATH (set FI_PIP_INSTALL=1 to `pip install --no-build-isolation
# --no-deps -e .` instead). Logs go to $OUT when set (else .devout/gpu_ci/):
#   summary.txt (environment: nvidia-smi, versions, doctor; then one line per step) prewarm.log prewarm.json
#   pytest_gpu.log bench.log (all benchmarks, in order) RESULTS.md
# (6 files, within the 8 that a lent GPU machine returns).
# Env knobs: PYTHON (default python3), PYTEST_ARGS (extra pytest args, e.g. "-k decode -x"),
#   PREWARM_ARGS (default "--config tests/prewarm_test.toml", the modules the GPU tests load), BENCH (benchmark scripts to run, space-separated; default every
#   benchmarks/bench_*.py), JOBS (prewarm workers, default nproc), TORCH_CUDA_ARCH_LIST
#   (default 9.0), MAX_JOBS (default 16), FLASHINFER_JIT_CACHE (default /tmp/fi_jit_cache).
# Exit status: non-zero if any step failed; the benchmarks still run after failed tests.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
LOG_DIR=${OUT:-$REPO/.devout/gpu_ci}
mkdir -p "$LOG_DIR"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export FLASHINFER_JIT_CACHE=${FLASHINFER_JIT_CACHE:-/tmp/fi_jit_cache}
export PYTHONUNBUFFERED=1
JOBS=${JOBS:-$(nproc)}
PREWARM_ARGS=${PREWARM_ARGS:---config tests/prewarm_test.toml}
PYTEST_ARGS=${PYTEST_ARGS:-}

if [ $# -eq 0 ]; then STEPS=(reference prewarm test bench); else STEPS=("$@"); fi
for s in "${STEPS[@]}"; do
  case $s in reference|prewarm|test|sanitize|before|bench) ;;
    *) echo "usage: $0 [reference] [prewarm] [test] [sanitize] [before] [bench]  (unknown step '$s')" >&2; exit 2 ;;
  esac
done
BEFORE_TREE=${BEFORE_TREE:-$REPO/.bench/before}

if [ "${FI_PIP_INSTALL:-0}" = 1 ]; then
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e "$REPO" >"$LOG_DIR/pip_install.log" 2>&1 \
    || { echo "pip install failed; see $LOG_DIR/pip_install.log" >&2; exit 1; }
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

T0=$(date +%s)
SUMMARY="$LOG_DIR/summary.txt"
note() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=0

# ---------------------------------------------------------------- environment
{
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) repo $REPO @ $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi || echo "nvidia-smi not available"
  echo "== nvcc: $(command -v nvcc || echo 'not on PATH')"
  nvcc --version 2>/dev/null | tail -n 2
  echo "== TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS FLASHINFER_JIT_CACHE=$FLASHINFER_JIT_CACHE JOBS=$JOBS CUDA_HOME=${CUDA_HOME:-(unset)}"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda, "| GPUs", torch.cuda.device_count())'
  "$PYTHON" -m flashinfer doctor
} 2>&1 | tee "$SUMMARY"
echo "== steps" >>"$SUMMARY"

run_step() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  local t=$(date +%s)
  echo "== [$name] $*"
  "$@" 2>&1 | tee "$LOG_DIR/$log"
  local rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t ))
  if [ "$rc" -eq 0 ]; then note "$name: ok in ${dt}s (log $log)"; else note "$name: FAILED (exit $rc) in ${dt}s (log $log)"; FAILED=1; fi
  return 0
}

for s in "${STEPS[@]}"; do
  case $s in
    reference)
      if [ -d "$REPO/.bench/fi" ] && [ -f "$REPO/.bench/install.sh" ]; then
        run_step reference reference.log bash "$REPO/.bench/install.sh" "$REPO/.bench/fi"
        cat "$LOG_DIR/reference.log" >>"$SUMMARY" && rm -f "$LOG_DIR/reference.log"
        # The reference's sampling and topk modules take minutes each to JIT-build (more than bench_sampling's
        # budget): build them now, side by side in the background, while prewarm and the tests run; the bench
        # step waits for them.
        for part in sample rows; do
          (cd /tmp && PYTHONPATH="${FI_REF_SITE:-/tmp/fi_ref_site}:$REPO/benchmarks" FLASHINFER_CUDA_ARCH_LIST=9.0 \
            FLASHINFER_WORKSPACE_BASE="${FI_REF_WS:-/tmp/fi_ref_ws}" "$PYTHON" "$REPO/benchmarks/bench_sampling.py" \
            --flashinfer-reference --warm-only=$part >"$LOG_DIR/reference_warm_$part.log" 2>&1) &
          REF_WARM="${REF_WARM:-} $!"
        done
      else
        note "reference: skipped (.bench/fi absent: reference columns stay empty)"
      fi
      ;;
    sanitize)
      if [ -f "$REPO/scripts/sanitize.sh" ]; then
        run_step sanitize sanitize.log bash "$REPO/scripts/sanitize.sh"
      else
        note "sanitize: FAILED: scripts/sanitize.sh not found"; FAILED=1
      fi
      ;;
    before)
      # The same benchmarks from the older tree, run now, on this GPU: the "before" column of a redesign.
      if [ -d "$BEFORE_TREE/benchmarks" ]; then
        : >"$LOG_DIR/before.log"; mkdir -p "$LOG_DIR/before"
        for b in ${BEFORE_BENCH:-bench_decode.py bench_batch_decode.py bench_prefill.py}; do
          (cd "$BEFORE_TREE" && OUT="$LOG_DIR/before" FLASHINFER_JIT_CACHE=/tmp/fi_jit_cache_before \
             PYTHONPATH="$BEFORE_TREE" run_step "before $b" before.part.log "$PYTHON" "benchmarks/$b")
          cat "$LOG_DIR/before.part.log" >>"$LOG_DIR/before.log"; rm -f "$LOG_DIR/before.part.log"
        done
      else
        note "before: FAILED: no benchmarks in $BEFORE_TREE"; FAILED=1
      fi
      ;;
    prewarm)
      # shellcheck disable=SC2086
      run_step prewarm prewarm.log "$PYTHON" -m flashinfer prewarm $PREWARM_ARGS --jobs "$JOBS" --json "$LOG_DIR/prewarm.json"
      # The transformers integration tests and examples load a few modules of their own.
      if [ -f "$REPO/examples/prewarm_transformers.jsonl" ]; then
        run_step prewarm-examples prewarm_examples.log "$PYTHON" -m flashinfer prewarm \
          --config "$REPO/examples/prewarm_transformers.jsonl" --jobs "$JOBS"
        cat "$LOG_DIR/prewarm_examples.log" >>"$LOG_DIR/prewarm.log" && rm -f "$LOG_DIR/prewarm_examples.log"
      fi
      ;;
    test)
      # shellcheck disable=SC2086
      run_step test pytest_gpu.log "$PYTHON" -m pytest -m gpu -q -rs $PYTEST_ARGS
      tail -n 1 "$LOG_DIR/pytest_gpu.log" | sed 's/^/  pytest: /' | tee -a "$SUMMARY"
      ;;
    bench)
      if [ -n "${REF_WARM:-}" ]; then
        for pid in $REF_WARM; do
          wait "$pid" && note "reference warm-up $pid: ok" || note "reference warm-up $pid: failed (logs reference_warm_*.log)"
        done
        cat "$LOG_DIR"/reference_warm_*.log >>"$SUMMARY" 2>/dev/null && rm -f "$LOG_DIR"/reference_warm_*.log
        REF_WARM=
      fi
      BENCHES=${BENCH:-$(ls "$REPO"/benchmarks/bench_*.py 2>/dev/null)}
      if [ -z "$BENCHES" ]; then note "bench: FAILED: no benchmarks/bench_*.py found"; FAILED=1; fi
      # All benchmarks log into one file: the device tool returns at most 8 files.
      : >"$LOG_DIR/bench.log"
      for b in $BENCHES; do
        [ -f "$b" ] || b="$REPO/$b"
        if [ -f "$b" ]; then
          OUT="$LOG_DIR" run_step "bench $(basename "$b" .py)" bench.part.log "$PYTHON" "$b"
          cat "$LOG_DIR/bench.part.log" >>"$LOG_DIR/bench.log"
          rm -f "$LOG_DIR/bench.part.log"
        else
          note "bench: FAILED: $b not found"; FAILED=1
        fi
      done
      ;;
  esac
done

note "total: $(( $(date +%s) - T0 ))s, steps: ${STEPS[*]}, $([ $FAILED -eq 0 ] && echo 'all ok' || echo 'SOME FAILED')"
exit $FAILED

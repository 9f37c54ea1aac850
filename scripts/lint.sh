#!/usr/bin/env bash
# Lint and formatting: ruff (Python, configured in pyproject.toml) and clang-format (the CUDA headers under
# templates/include/, configured in .clang-format; the templates/*.cu.jinja files are Jinja, not C++).
#
#   scripts/lint.sh          check only (what .ci/run runs): ruff check, ruff format --check,
#                            clang-format --dry-run --Werror; exit 1 if any of them finds something
#   scripts/lint.sh --fix    apply ruff's safe fixes, ruff format and clang-format -i, then check again
#                            (what is left needs a hand: the check prints it)
#
# Tools: ruff and clang-format as pinned by the `lint` extra (pip install -e ".[lint]"), taken from $RUFF and
# $CLANG_FORMAT when set, else from PATH, else from the directory of the python3 on PATH.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FIX=0
case "${1:-}" in
  --fix) FIX=1 ;;
  "") ;;
  -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--fix]  (unknown argument '$1')" >&2; exit 2 ;;
esac

find_tool() {  # name, override -> path on stdout, or nothing
  local name=$1 override=$2
  if [ -n "$override" ]; then echo "$override"; return; fi
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  local py_dir
  py_dir=$(dirname "$(command -v python3 2>/dev/null || echo /nonexistent/python3)")
  if [ -x "$py_dir/$name" ]; then echo "$py_dir/$name"; fi
}
RUFF=$(find_tool ruff "${RUFF:-}")
CLANG_FORMAT=$(find_tool clang-format "${CLANG_FORMAT:-}")
missing=""
[ -n "$RUFF" ] || missing="$missing ruff"
[ -n "$CLANG_FORMAT" ] || missing="$missing clang-format"
if [ -n "$missing" ]; then
  echo "lint: not found:$missing. Install the pinned tools: pip install -e \".[lint]\" (or set RUFF / CLANG_FORMAT)" >&2
  exit 2
fi
echo "lint: $("$RUFF" --version), $("$CLANG_FORMAT" --version | head -n 1)"

# The CUDA headers (NUL-separated: names are passed to clang-format as they are).
mapfile -d '' HEADERS < <(find templates/include -type f \( -name '*.cuh' -o -name '*.h' \) -print0 2>/dev/null | sort -z)

if [ "$FIX" = 1 ]; then
  echo "lint: fixing (ruff check --fix, ruff format, clang-format -i on ${#HEADERS[@]} headers)"
  "$RUFF" check --fix --quiet . || true  # what it cannot fix is reported by the check below
  "$RUFF" format --quiet .
  if [ "${#HEADERS[@]}" -gt 0 ]; then "$CLANG_FORMAT" -i --style=file "${HEADERS[@]}"; fi
fi

FAILED=()
echo "lint: ruff check"
"$RUFF" check . || FAILED+=("ruff check")
echo "lint: ruff format --check"
"$RUFF" format --check . || FAILED+=("ruff format (run scripts/lint.sh --fix)")
echo "lint: clang-format --dry-run --Werror (${#HEADERS[@]} headers under templates/include/)"
if [ "${#HEADERS[@]}" -gt 0 ]; then
  "$CLANG_FORMAT" --dry-run --Werror --style=file "${HEADERS[@]}" || FAILED+=("clang-format (run scripts/lint.sh --fix)")
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'lint: FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "lint: all clean"

#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that the transformers tests, examples and benchmark need on a
# GPU machine without network access: manylinux x86_64 / CPython 3.12 builds, no dependencies resolved.
#
# The GPU image already ships transformers' dependencies (huggingface_hub, tokenizers, safetensors, regex, pyyaml,
# tqdm, typer, numpy, packaging); by default only transformers itself is fetched, pinned to the tested version.
# WHEELS_EXTRA="name==version ..." adds more (e.g. when an image lacks one).
#
# Use on the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  "transformers==5.17.0"   # pure Python; needs huggingface-hub>=1.5,<2 tokenizers>=0.23.1,<0.24 safetensors>=0.8
)
# shellcheck disable=SC2206
WHEELS+=(${WHEELS_EXTRA:-})

PIP=(python3 -m pip)
if [ -x /work/main/.venv/bin/python ] && ! python3 -m pip --version >/dev/null 2>&1; then
  PIP=(/work/main/.venv/bin/python -m pip)
fi

mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$w"
done
ls -l .whl

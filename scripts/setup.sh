#!/usr/bin/env bash
# Create or refresh .venv in the repo root with pinned, tested versions.
#   LBOPT_KEEP_TORCH=1  keep the torch already in .venv (e.g. your CUDA build) instead of
#                       installing the pinned CPU wheel torch==2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${LBOPT_TORCH_PIN:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

# Compiled torch extensions (DeepSpeed's CPU communication op) live inside this virtualenv, so two
# environments never rebuild, or wait on the build lock of, each other's ops. The recipes, the main
# job and the tests use the same folder (recipes/startup.py: <sys.prefix>/torch_extensions).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}

build_ops() {  # compile DeepSpeed's CPU communication op once, here, so no launch ever compiles it
  local so="$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so"
  [ -f "$so" ] && return 0
  local lock="$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock"
  if [ -e "$lock" ]; then
    echo "[setup] $lock exists: another process is compiling the op, or a killed one left the lock." >&2
    echo "[setup] If no compiler is running (ps aux | grep cc1plus), remove it: rm $lock" >&2
    return 1
  fi
  echo "[setup] compiling DeepSpeed's CPU communication op into $TORCH_EXTENSIONS_DIR (once; 1-5 minutes)"
  DS_ACCELERATOR=cpu python -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)
" >/dev/null || { echo "[setup] building the op failed; DeepSpeed launches will try again (and may wait on it)" >&2; return 1; }
}

stamp=.venv/.lbopt-setup
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16) keep=${LBOPT_KEEP_TORCH:-0}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"
  build_ops
  exit $?
fi

echo "[setup] installing into .venv (a few minutes on a fresh machine)"
python -m pip install -q --upgrade pip
if [ "${LBOPT_KEEP_TORCH:-0}" = 1 ]; then
  python -c "import torch" 2>/dev/null || { echo "[setup] LBOPT_KEEP_TORCH=1 but .venv has no torch: pip install your torch build into .venv first" >&2; exit 1; }
else
  python -m pip install -q "$TORCH_PIN"
fi
# Never let another package replace the torch chosen above (an unpinned torch pulls GBs of CUDA).
constraints=$(mktemp)
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
python -m pip install -q -c "$constraints" -r requirements.lock
python -m pip install -q -c "$constraints" -e .
rm -f "$constraints"
echo "$want" > "$stamp"
build_ops
echo "[setup] done: $(python -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| transformers", transformers.__version__)' 2>/dev/null)"

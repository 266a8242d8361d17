#!/usr/bin/env bash
# README command two: set up .venv, then run the whole test suite (offline, CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}  # built by setup.sh
python -m ruff check . || exit 1
# Tests marked slow (multi-launch recipe runs, torch.compile; ~4 min together) run with LBOPT_SLOW_TESTS=1.
if [[ ${LBOPT_SLOW_TESTS:-0} == 1 ]]; then
  python -m pytest "$@"
else
  python -m pytest -m "not slow" "$@"
fi
rc=$?
if [ $rc -eq 5 ]; then
  echo "ERROR: pytest collected no tests (exit code 5); refusing to report success" >&2
  exit 1
fi
exit $rc

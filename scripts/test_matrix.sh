#!/usr/bin/env bash
# Run the test suite once per transformers release, each in its own fresh virtual environment.
#
#   scripts/test_matrix.sh                       # every tested release (DEFAULT_VERSIONS below), whole suite
#   scripts/test_matrix.sh 5.24.0                # one release
#   PYTEST_ARGS="tests/integration -x" scripts/test_matrix.sh 5.23.0 5.24.0
#
# The tested range is TESTED_TRANSFORMERS in hf_moe_offload/_compat.py (one pin per minor release here; the suite's
# tests/test_compat.py checks that they agree). Each environment lives in $MATRIX_DIR/<version> and is rebuilt on
# every run: the CPU torch wheel (TORCH, 2.13.0) first, then the project with its test extras and
# transformers==<version>, torch pinned on the same command line so that pip never swaps it. Exit status: non-zero
# when any release fails; a summary line per release at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
DEFAULT_VERSIONS="5.23.0 5.24.0"
MATRIX_DIR="${MATRIX_DIR:-${TMPDIR:-/tmp}/hf_moe_offload-matrix}"
TORCH="${TORCH:-2.13.0}"
read -r -a PYTEST <<<"${PYTEST_ARGS:-}"
export HF_HUB_OFFLINE=1
if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"; fi

versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then read -r -a versions <<<"$DEFAULT_VERSIONS"; fi
summary=()
status=0
for v in "${versions[@]}"; do
    venv="$MATRIX_DIR/$v"
    echo "=== transformers $v in $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    if ! "$venv/bin/pip" install -q "torch==$TORCH" ||
        ! "$venv/bin/pip" install -q -e ".[test,bench]" "transformers==$v" "torch==$TORCH"; then
        summary+=("transformers $v: install failed")
        status=1
        continue
    fi
    start=$SECONDS
    if "$venv/bin/python" -m pytest "${PYTEST[@]}"; then
        summary+=("transformers $v: passed in $((SECONDS - start)) s")
    else
        summary+=("transformers $v: FAILED")
        status=1
    fi
done
printf '%s\n' "${summary[@]}"
exit $status

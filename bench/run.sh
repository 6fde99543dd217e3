#!/usr/bin/env bash
# run.sh — what `make bench` runs once the project's venv is installed:
# the LiteLLM proxy's venv (cached), then bench/run.py against throwaway
# PostgreSQL and Redis (scripts/with-services.sh). Prints the table and writes
# bench/results/latest.md and latest.json. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_STARTED_AT=${BENCH_STARTED_AT:-$(date +%s.%N)}
export BENCH_STARTED_AT

for tool in taskset; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is missing (util-linux)" >&2; exit 1; }
done
[[ -x .venv/bin/python ]] || { echo "bench: .venv missing: run 'make bench'" >&2; exit 1; }

PYTHON=${PYTHON:-python3} bench/install-litellm.sh

export LITELLM_LOCAL_MODEL_COST_MAP=True
exec scripts/with-services.sh .venv/bin/python -m bench.run

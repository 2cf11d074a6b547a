#!/usr/bin/env bash
# The project's test command (README, CI): lint, format, a type check of src/, Snakemake lint, a dry
# run of the demo, then every test, the end-to-end demo run included. Run from the repository root.
# Arguments go to pytest: `bash tests/check.sh -m unit` is the tier developers run on every change
# (README), `-m "not system"` leaves out the demo DAG, the rerun matrix, real SLURM and vLLM through
# Snakemake.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "ruff check"
ruff check .
step "ruff format --check"
ruff format --check src scripts tests bench
step "mypy"
mypy
step "snakefmt --check"
snakefmt --check Snakefile workflow
step "snakemake --lint"
lint=$(snakemake --lint 2>&1) || { echo "$lint"; exit 1; }
echo "$lint"
grep -q "Congratulations, your workflow is in a good condition" <<<"$lint"
step "snakemake -n (the demo)"
snakemake -n --quiet rules
step "pytest"
# In SHARDWISE_TEST_WORKERS processes (default 2; 0: in this one), a test module in one process: its
# module fixtures are built once, the SLURM tests share one cluster; modules start in the order of
# tests/conftest.py (xdist_order: the longest first), not by their number of tests.
python -m pytest -n "${SHARDWISE_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"

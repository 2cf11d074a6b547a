#!/usr/bin/env bash
# The slurm-marked tests N times in a row (default 3) while a CPU hog keeps every core busy (one
# Python busy loop per core): the suite must stay green on a loaded machine (issue 15). Prints each
# round's result and wall time; exits non-zero if any round failed.
#   bash tests/slurm/under-load.sh [rounds] [extra pytest args]
set -u
rounds=${1:-3}
shift || true
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
hogs=()
for _ in $(seq "$(nproc)"); do
    python3 -c 'while True: pass' &
    hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
failed=0
for round in $(seq "$rounds"); do
    start=$(date +%s)
    "$py" -m pytest -m slurm -q -p no:cacheprovider --durations=10 tests/test_slurm.py "$@" \
        >"/tmp/under-load-$round.log" 2>&1
    rc=$?
    end=$(date +%s)
    echo "round $round: rc=$rc, $((end - start)) s, load $(cut -d' ' -f1-3 /proc/loadavg)," \
        "$(tail -1 "/tmp/under-load-$round.log")"
    [ $rc -eq 0 ] || failed=1
done
exit $failed

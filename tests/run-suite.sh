#!/usr/bin/env bash
# The whole suite as two pytest processes side by side: the Ray tier (one local cluster shared
# in file order, as before) and everything that starts no Ray (`-m "not ray"`).
#
# Why two processes: the Ray tier mostly waits (cluster and worker starts, Train controllers,
# HTTP servers coming up) and keeps this 2-core machine's CPUs busy about a third of the time;
# the tier without Ray is CPU-bound for ~5 minutes. Run one after the other they add up; run
# together the second fills the first one's waits. Only one Ray workload runs at a time, as on
# a developer's machine: the tier without Ray never starts a cluster (tests/conftest.py fails
# any test that does without the `ray` marker).
#
# The Ray tier streams to the terminal; the other tier's output is printed when both are done.
# Exit status: non-zero when either tier failed.
#
# usage: tests/run-suite.sh PYTHON [pytest args for both tiers...]
set -uo pipefail
python="${1:?usage: tests/run-suite.sh PYTHON [pytest args...]}"
shift
log="$(mktemp -t instalign-no-ray-tier.XXXXXX)"
"$python" -m pytest -q -m "not ray" -p no:cacheprovider --durations=10 "$@" >"$log" 2>&1 &
no_ray=$!
trap 'kill "$no_ray" 2>/dev/null; rm -f "$log"' EXIT
trap 'exit 130' INT TERM
"$python" -m pytest -q -m ray --durations=25 "$@"
ray_status=$?
wait "$no_ray"
no_ray_status=$?
echo
echo "--- tests that start no Ray (run alongside the Ray tier above) ---"
cat "$log"
echo "Ray tier: exit $ray_status; tests without Ray: exit $no_ray_status"
# pytest's 5 is "no test selected": fine for one tier (arguments that pick tests of the other
# tier only), a failure when neither ran anything.
if [ "$ray_status" -eq 5 ] && [ "$no_ray_status" -eq 5 ]; then exit 5; fi
for status in "$ray_status" "$no_ray_status"; do
    [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit 1
done

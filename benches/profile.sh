#!/usr/bin/env bash
# Profiles the hsmgate server under one benches/run.sh round of one
# operation: starts the round, waits until wrk is loading that operation,
# then `perf record`s the server process for PERF_SECONDS.
#
#   benches/profile.sh OUT                      # encrypt, default [audit]
#   OP=sign-rsa-2048 AUDIT_FSYNC=batched benches/profile.sh OUT
#   CALL_GRAPH=dwarf,16384 benches/profile.sh OUT   # callers through libc/asm
#
# Writes OUT.data (perf), OUT.bench (the round's report) and OUT.flat (the
# hottest symbols). Other benches/run.sh knobs pass through (AUDIT_*,
# HSMGATE_LOG, NO_BUILD, BIN_DIR, PIN_SERVER, PIN_WRK). Needs `perf`
# (Debian: linux-perf) and a release build.
set -euo pipefail
OUT=${1:?usage: benches/profile.sh OUT}
OP=${OP:-encrypt}
PERF_SECONDS=${PERF_SECONDS:-8}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (Debian: linux-perf)" >&2; exit 1; }

OPS=$OP ROUNDS=1 WRK_DURATION=$((PERF_SECONDS + 6))s "$REPO/benches/run.sh" >"$OUT.bench" 2>&1 &
bench=$!
pid=
for _ in $(seq 1 600); do
    if grep -q "round 1/1: $OP " "$OUT.bench" 2>/dev/null; then
        pid=$(pgrep -f "hsmgate serve --config" | head -n1 || true)
        [[ -n $pid ]] && break
    fi
    kill -0 "$bench" 2>/dev/null || { cat "$OUT.bench" >&2; exit 1; }
    sleep 0.5
done
[[ -n $pid ]] || { echo "profile.sh: the $OP round never started" >&2; exit 1; }
sleep 3 # past wrk's ramp-up
perf record -F 499 --call-graph "${CALL_GRAPH:-fp}" -p "$pid" -o "$OUT.data" -- sleep "$PERF_SECONDS" >/dev/null 2>&1
wait "$bench"
perf report -i "$OUT.data" --no-children --sort comm,sym --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | sed -n '1,40p' >"$OUT.flat"
grep -E "^\| $OP (req/s|p99)" "$OUT.bench"
echo "profile: $OUT.data; hottest symbols: $OUT.flat"

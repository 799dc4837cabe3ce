#!/usr/bin/env bash
# Crash-safety soak (issue 6): SIGKILL the server at seeded random moments
# while clients create keys, encrypt and create users, CYCLES times, and
# check after every kill that nothing acknowledged was lost and that the
# audit chain verifies (tests/crash_loop.rs does the work; `cargo test`
# runs the same test with 5 cycles).
#
#   benches/soak_crash.sh                 # 100 cycles, a fresh seed
#   CYCLES=500 SEED=1234 benches/soak_crash.sh
#
# Prints the seed first (replay a failure with SEED=<it>) and a summary line
# last: cycles, keys and users acknowledged, lost (always 0, or the test
# fails naming the lost key), torn audit lines cut. A debug build is enough:
# the figures are counts, not speeds. Record the summary line in
# docs/SECURITY.md ("Attack-and-fault results").
set -euo pipefail

CYCLES=${CYCLES:-100}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

export HSMGATE_CRASH_CYCLES=$CYCLES
if [[ -n "${SEED:-}" ]]; then
    export HSMGATE_CRASH_SEED=$SEED
fi
cargo test --test crash_loop -- --nocapture

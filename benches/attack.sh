#!/usr/bin/env bash
# The attack-and-fault harness: one command that floods a real hsmgate
# server on loopback and prints a markdown table of what it cost (see
# benches/attack/attack.rs for what each scenario does, docs/SECURITY.md and
# docs/BENCHMARKS.md for the figures).
#
#   benches/attack.sh                          # full size (several minutes)
#   ATTEMPTS=20000 MEM_FLOOD=20000 KEEPALIVE=2000 ROUNDS=1 DURATION=3 \
#       benches/attack.sh                      # smoke run
#   PIN=1 SCENARIOS=a benches/attack.sh        # goal a with the attacker on a
#                                              # CPU of its own (see PIN below)
#
# Only 127.0.0.0/8 traffic: 127.0.0.0/24 is the app network (127.0.0.1 also
# the admin network), 127.1.0.0 and up the untrusted sources.
#
# Knobs (environment):
#   ATTEMPTS=1000000   a: admin-login attempts from outside
#   SOURCES=10000      a, b: distinct untrusted source addresses
#   ROUNDS=3           with/without rounds, interleaved; medians reported
#   DURATION=10        seconds per measured load run (and per flood in b)
#   CONNS=16           allowed client's keep-alive connections (encrypt 1 KiB)
#   FLOOD_CONC=128     concurrent attacker connections
#   HALF_OPEN=1000     c: half-open connections from one allowed source
#   SLOW_RETRY_MS=1000 c: how long a refused half-open connection waits to retry
#   KEEPALIVE=10000    d: kept-alive TLS connections for the memory figure
#   MEM_FLOOD=1000000  d: distinct untrusted sources for the memory figure
#   KA_CYCLES=3        d: times the KEEPALIVE connections are opened and closed
#   SCENARIOS="a b c d"
#   PIN=1              run each flood (a, b, d) in a process of its own pinned
#                      to ATTACKER_CPUS, and pin the harness (the allowed
#                      client), hsmgate and the bare accept loop to
#                      SERVER_CPUS, in the runs with and without the flood
#                      alike; unset: everything shares all CPUs, the attacker
#                      inside the harness process (the published figures)
#   ATTACKER_CPUS      with PIN=1: CPU list as for taskset -c ("1", "2-3");
#                      default: the last CPU this shell may use
#   SERVER_CPUS        with PIN=1: default: every other CPU this shell may use
#   PROFILE=release    cargo profile to build and run (dev: a quick smoke run)
#   NO_BUILD=1         skip `cargo build`
#   HSMGATE_LOG=info   passed to the server (its log stays in a temp dir)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PROFILE=${PROFILE:-release}
say() { printf '== %s\n' "$*" >&2; }

command -v cargo >/dev/null || {
    printf 'attack.sh: cargo is needed (https://rustup.rs)\n' >&2
    exit 1
}

# 10,000 kept-alive connections plus the floods need file descriptors in
# the server and in the harness, each (both inherit this shell's limit).
want=$((${KEEPALIVE:-10000} + ${HALF_OPEN:-1000} + ${FLOOD_CONC:-128} + 4096))
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt $want ]]; then
    ulimit -Hn "$want" 2>/dev/null || say "cannot raise the hard open-file limit above $hard (needs CAP_SYS_RESOURCE)"
fi
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
say "open-file limit $(ulimit -n)"

if [[ -z ${NO_BUILD:-} ]]; then
    say "cargo build --profile $PROFILE --bin hsmgate --example attack"
    cargo build --profile "$PROFILE" --bin hsmgate --example attack
fi
dir=target/$PROFILE
[[ $PROFILE == dev ]] && dir=target/debug

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores  load: $(cut -d' ' -f1-3 /proc/loadavg)  profile: $PROFILE"
pin=
[[ -n ${PIN:-} && ${PIN} != 0 ]] && pin="PIN=$PIN ${ATTACKER_CPUS:+ATTACKER_CPUS=$ATTACKER_CPUS }${SERVER_CPUS:+SERVER_CPUS=$SERVER_CPUS }"
echo "command: ${pin}ATTEMPTS=${ATTEMPTS:-1000000} SOURCES=${SOURCES:-10000} ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} CONNS=${CONNS:-16} FLOOD_CONC=${FLOOD_CONC:-128} HALF_OPEN=${HALF_OPEN:-1000} KEEPALIVE=${KEEPALIVE:-10000} MEM_FLOOD=${MEM_FLOOD:-1000000} SCENARIOS=\"${SCENARIOS:-a b c d}\" benches/attack.sh"
HSMGATE=$REPO/$dir/hsmgate exec "$REPO/$dir/examples/attack"

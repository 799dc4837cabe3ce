#!/usr/bin/env bash
# Engine ops/s beside raw aws-lc-rs and SoftHSM2 (PKCS#11), one run:
#
#   benches/engine.sh
#
# Installs Debian's softhsm2 (and opensc, for pkcs11-tool when poking at the
# token by hand) if the PKCS#11 module is missing, creates a throwaway token
# with its own SOFTHSM2_CONF in a temp dir, then runs
# `cargo bench --bench engine` (benches/engine.rs) against it. Everything it
# creates is removed on exit. Without root or apt the SoftHSM2 rows just say
# "skipped" and the raw/engine rows still run.
#
# Knobs (environment): BENCH_ROUNDS (5), BENCH_MS (300),
#   SOFTHSM2_MODULE (/usr/lib/softhsm/libsofthsm2.so), KEEP=1 (keep temp dir),
#   CARGO_BENCH_FLAGS (extra `cargo bench` flags, e.g. "--profile dev")
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

say() { printf '== %s\n' "$*" >&2; }

export SOFTHSM2_MODULE=${SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

if [[ ! -e $SOFTHSM2_MODULE ]] || ! command -v softhsm2-util >/dev/null; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        say "installing softhsm2 opensc"
        apt-get update -qq && apt-get install -y -qq softhsm2 opensc >/dev/null
    else
        say "softhsm2 missing and cannot install it (need root and apt-get): SoftHSM2 rows will be skipped"
    fi
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/hsmgate-enginebench.XXXXXX")
cleanup() {
    if [[ ${KEEP:-0} == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

if command -v softhsm2-util >/dev/null && [[ -e $SOFTHSM2_MODULE ]]; then
    mkdir -p "$TMP/tokens"
    cat >"$TMP/softhsm2.conf" <<EOF
directories.tokendir = $TMP/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
    export SOFTHSM2_CONF=$TMP/softhsm2.conf
    export SOFTHSM2_TOKEN_LABEL=hsmgate-bench
    export SOFTHSM2_PIN=1234
    say "initialising SoftHSM2 token $SOFTHSM2_TOKEN_LABEL in $TMP/tokens"
    softhsm2-util --init-token --free --label "$SOFTHSM2_TOKEN_LABEL" \
        --so-pin 5678 --pin "$SOFTHSM2_PIN" >/dev/null
fi

say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
say "cargo bench ${CARGO_BENCH_FLAGS:-} --bench engine"
cargo bench ${CARGO_BENCH_FLAGS:-} --bench engine

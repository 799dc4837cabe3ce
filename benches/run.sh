#!/usr/bin/env bash
# Transit encrypt (1 KiB) through hsmgate over TLS, beside a bare hyper TLS
# "hello" server on the same stack, measured with wrk on loopback in one run.
#
#   benches/run.sh
#
# Rounds are interleaved A/B, B/A, A/B, ... so slow drift (other builds on
# the machine, thermal, page cache) hits both targets alike; the report gives
# medians and the encrypt/hello ratio. Read the ratio, not the absolute
# numbers: wrk, hsmgate and hello_tls all share the machine's cores.
#
# Knobs (environment):
#   ROUNDS=3  WRK_THREADS=1  WRK_CONNS=64  WRK_DURATION=10s  WARMUP=2s
#   HSMGATE_LOG   passed through to hsmgate (default "info": one access-log
#                 line per request, written to a file)
#   KEEP=1        keep the temp dir (data dir, server logs, raw wrk output)
#   NO_BUILD=1    skip `cargo build` (use the existing release binaries)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-64}
WRK_DURATION=${WRK_DURATION:-10s}
WARMUP=${WARMUP:-2s}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# --- tools --------------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
    say "installing ${need_pkgs[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# --- build --------------------------------------------------------------
if [[ -z ${NO_BUILD:-} ]]; then
    say "cargo build --release --bin hsmgate --examples"
    cargo build --release --bin hsmgate --examples
fi
HSMGATE=$REPO/target/release/hsmgate
HELLO=$REPO/target/release/examples/hello_tls
[[ -x $HSMGATE && -x $HELLO ]] || die "missing $HSMGATE or $HELLO"

# --- scratch space and cleanup -----------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/hsmgate-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n ${KEEP:-} ]]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
TAKEN=" "
# Sets FREE_PORT to the first port >= $1 that is free and not already handed
# out by this script (a variable, not stdout: $(...) would lose TAKEN).
free_port() {
    local p=$1
    while [[ $TAKEN == *" $p "* ]] || port_busy "$p"; do p=$((p + 1)); done
    TAKEN+="$p "
    FREE_PORT=$p
}

# Waits for a server's "listening" line on its stdout file.
wait_listening() {
    local out=$1 pid=$2 what=$3 i
    for i in $(seq 1 300); do
        grep -q 'listening' "$out" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited early; see its log in $TMP (KEEP=1)"
        sleep 0.1
    done
    die "$what did not start listening within 30 s"
}

# --- hsmgate ----------------------------------------------------------
# A copy of the shipped config and policies. Two changes, both about what is
# measured, not how it is served: the rate limits are raised far above what
# one loopback client can send (the bench measures the cost of the fence's
# checks, not its refusals; the shipped transit limit is 500/s per source),
# and if a listener port is taken (another run, someone's test) the listener
# moves to a free port.
CONFIG=$TMP/hsmgate.toml
mkdir -p "$TMP/policies"
cp "$REPO"/policies/*.toml "$TMP/policies/"
sed -i -E \
    -e 's/^(transit|principal|key) = \{ rate = [0-9]+, per = "second", burst = [0-9]+ \}/\1 = { rate = 1000000, per = "second", burst = 1000000 }/' \
    "$TMP/policies/rate-limits.toml"
grep -q 'transit = { rate = 1000000' "$TMP/policies/rate-limits.toml" \
    || die "could not raise the transit rate limit in the bench copy of policies/rate-limits.toml"
sed -e "s#^policies_dir = .*#policies_dir = \"$TMP/policies\"#" "$REPO/config/hsmgate.toml" >"$CONFIG"
ports=$(sed -n 's/^address = "127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$CONFIG")
[[ -n $ports ]] || die "no 127.0.0.1 listener address found in $CONFIG"
for p in $ports; do
    if port_busy "$p"; then
        free_port $((p + 1000))
        sed -i "s#^address = \"127.0.0.1:$p\"#address = \"127.0.0.1:$FREE_PORT\"#" "$CONFIG"
    else
        TAKEN+="$p "
    fi
done
DATA=$TMP/data
say "hsmgate serve --config $CONFIG --data-dir $DATA"
HSMGATE_LOG=${HSMGATE_LOG:-info} "$HSMGATE" serve --config "$CONFIG" --data-dir "$DATA" \
    >"$TMP/hsmgate.out" 2>"$TMP/hsmgate.log" &
PIDS+=($!)
wait_listening "$TMP/hsmgate.out" "${PIDS[-1]}" hsmgate
GATE_PID=${PIDS[-1]}
API=$(sed -n 's/^hsmgate: listening api \(https:[^ ]*\).*/\1/p' "$TMP/hsmgate.out" | head -n1)
[[ -n $API ]] || die "no 'listening api' line from hsmgate"

CACERT=$DATA/tls/cert.pem
# api METHOD PATH [TOKEN] [BODY] -> response body on stdout; fails on non-2xx.
api() {
    local method=$1 path=$2 token=${3:-} body=${4:-}
    local args=(-sS --fail-with-body --cacert "$CACERT" -X "$method" -H 'Content-Type: application/json')
    [[ -n $token ]] && args+=(-H "X-Vault-Token: $token")
    [[ -n $body ]] && args+=(--data-binary "$body")
    curl "${args[@]}" "$API$path" || die "$method $path failed"
}

ADMIN_PW=bench-admin-password-$RANDOM$RANDOM
say "init, admin login, crypto user, transit key"
api POST /v1/hsm/init "" "$(jq -nc --arg p "$ADMIN_PW" --rawfile t "$DATA/init-token" \
    '{admin_password: $p, init_token: ($t | rtrimstr("\n"))}')" >/dev/null
ADMIN_TOKEN=$(api POST /v1/hsm/login "" "$(jq -nc --arg p "$ADMIN_PW" '{username: "admin", password: $p}')" \
    | jq -er .auth.client_token)
api POST /v1/hsm/users "$ADMIN_TOKEN" \
    '{"username":"bench","password":"bench-password-1","role":"crypto-user"}' >/dev/null
BENCH_TOKEN=$(api POST /v1/hsm/login "" '{"username":"bench","password":"bench-password-1"}' \
    | jq -er .auth.client_token)
api POST /v1/transit/keys/bench "$BENCH_TOKEN" '{"type":"aes256-gcm96"}' >/dev/null
# One encrypt by hand, so a broken setup fails here and not as wrk non-2xx.
api POST /v1/transit/encrypt/bench "$BENCH_TOKEN" "$(head -c 1024 /dev/urandom | base64 -w0 | jq -Rc '{plaintext: .}')" \
    | jq -er '.data.ciphertext | select(startswith("vault:v1:"))' >/dev/null \
    || die "the check encrypt did not answer a vault:v1: ciphertext"

# --- hello ------------------------------------------------------------
free_port 8443
HELLO_PORT=$FREE_PORT
"$HELLO" "127.0.0.1:$HELLO_PORT" >"$TMP/hello.out" 2>"$TMP/hello.log" &
PIDS+=($!)
wait_listening "$TMP/hello.out" "${PIDS[-1]}" hello_tls
HELLO_URL=https://127.0.0.1:$HELLO_PORT

# --- measure ----------------------------------------------------------
export VAULT_TOKEN=$BENCH_TOKEN TRANSIT_KEY=bench
WRK_ARGS=(-t"$WRK_THREADS" -c"$WRK_CONNS" --latency)

run_wrk() { # name duration -> raw output file
    local name=$1 dur=$2 out=$TMP/wrk-$1-$3.txt
    case $name in
        hello) wrk "${WRK_ARGS[@]}" -d"$dur" "$HELLO_URL/" >"$out" ;;
        encrypt) wrk "${WRK_ARGS[@]}" -d"$dur" -s "$REPO/benches/transit.lua" "$API" >"$out" ;;
    esac
    if grep -q 'Non-2xx' "$out"; then
        cat "$out" >&2
        die "$name answered non-2xx responses (see above)"
    fi
    echo "$out"
}

# p99 from wrk's latency distribution, in ms.
p99_ms() {
    awk '$1 == "99%" {
        v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
        if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000;
        printf "%.2f", v }' "$1"
}
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$1"; }
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

say "warm-up ($WARMUP each)"
run_wrk hello "$WARMUP" warmup >/dev/null
run_wrk encrypt "$WARMUP" warmup >/dev/null

declare -a H_RPS H_P99 E_RPS E_P99 R_RPS
for r in $(seq 1 "$ROUNDS"); do
    if ((r % 2)); then order=(hello encrypt); else order=(encrypt hello); fi
    for name in "${order[@]}"; do
        say "round $r/$ROUNDS: $name (wrk ${WRK_ARGS[*]} -d$WRK_DURATION)"
        out=$(run_wrk "$name" "$WRK_DURATION" "$r")
        if [[ $name == hello ]]; then
            H_RPS[r]=$(rps "$out"); H_P99[r]=$(p99_ms "$out")
        else
            E_RPS[r]=$(rps "$out"); E_P99[r]=$(p99_ms "$out")
        fi
    done
    R_RPS[r]=$(awk -v e="${E_RPS[r]}" -v h="${H_RPS[r]}" 'BEGIN { printf "%.3f", e / h }')
done
kill -0 "$GATE_PID" 2>/dev/null || die "hsmgate died during the run"

# --- report -----------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
mh_rps=$(median "${H_RPS[@]}"); me_rps=$(median "${E_RPS[@]}")
mh_p99=$(median "${H_P99[@]}"); me_p99=$(median "${E_P99[@]}")
hdr="| | $(for r in $(seq 1 "$ROUNDS"); do printf 'round %s | ' "$r"; done)median |"
sep="|---|$(for r in $(seq 1 "$ROUNDS"); do printf -- '---:|'; done)---:|"
row() { local label=$1 med=$2; shift 2; printf '| %s | ' "$label"; printf '%s | ' "$@"; printf '**%s** |\n' "$med"; }

echo
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores"
echo "wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}') ${WRK_ARGS[*]} -d$WRK_DURATION, keep-alive, HTTP/1.1 over TLS 1.3 on loopback; HSMGATE_LOG=${HSMGATE_LOG:-info}"
echo
echo "$hdr"
echo "$sep"
row "hello_tls req/s" "$mh_rps" "${H_RPS[@]}"
row "transit encrypt 1 KiB req/s" "$me_rps" "${E_RPS[@]}"
row "ratio encrypt/hello (req/s)" "$(median "${R_RPS[@]}")" "${R_RPS[@]}"
row "hello_tls p99 ms" "$mh_p99" "${H_P99[@]}"
row "transit encrypt p99 ms" "$me_p99" "${E_P99[@]}"
echo
echo "ratio of medians, encrypt/hello: req/s $(ratio "$me_rps" "$mh_rps"), p99 $(ratio "$me_p99" "$mh_p99")"

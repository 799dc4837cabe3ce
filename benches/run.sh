#!/usr/bin/env bash
# Side-by-side HTTP benchmarks of hsmgate on loopback, measured with wrk in
# one run. Three modes (BENCH=...):
#
#   benches/run.sh                 # BENCH=ops: hello_tls ceiling vs Transit ops
#   BENCH=fence benches/run.sh     # the fence's cost: realistic vs empty policy set
#   BENCH=peer benches/run.sh      # hsmgate vs nginx (fence + TLS) in front of
#                                  # hsmgate's unfenced engine (see docs/BENCHMARKS.md)
#
# Rounds are interleaved (the order of the targets is reversed every other
# round) so slow drift (other builds on the machine, thermal, page cache)
# hits every target alike; the report gives per-round figures, medians and
# ratios computed per round. Read the ratios, not the absolute numbers: wrk
# and the servers share the machine's cores.
#
# Knobs (environment):
#   ROUNDS=3  WRK_THREADS=1  WRK_CONNS=64  WRK_DURATION=10s  WARMUP=2s
#   OPS="encrypt decrypt hmac sign-ed25519 sign-ecdsa-p256 sign-rsa-2048 batch-encrypt"
#                 the Transit operations measured (BENCH=fence default: encrypt)
#   HSMGATE_LOG   passed through to hsmgate (default "info": one access-log
#                 line per request, written to a file)
#   WITH_UNFENCED=1  BENCH=peer: also measure the unfenced bench listener
#                 directly (plain HTTP, no fence: the engine's own ceiling)
#   AUDIT_FSYNC=every | batched   AUDIT_KEY_USE=all | per_minute | off
#                 the servers' [audit] settings (default every / all: one
#                 durable record per operation; see docs/OPERATIONS.md)
#   ECHO=1        BENCH=ops: also measure "echo", the hello server sent the
#                 exact encrypt request and answering with its body (the same
#                 bytes each way as encrypt, none of the work), and report
#                 encrypt / echo (needs "encrypt" in OPS)
#   PIN_SERVER=1 PIN_WRK=0   CPU lists (taskset -c) for the servers (hsmgate,
#                 hello_tls) and for wrk: with both set, each side has its own
#                 cores, so req/s per server core can be read off directly
#                 (e.g. against the raw per-core figures of benches/engine.sh).
#                 BENCH=ops and fence only.
#   KEEP=1        keep the temp dir (data dirs, configs, logs, raw wrk output)
#   NO_BUILD=1    skip `cargo build` (use the existing release binaries)
#   BIN_DIR       where hsmgate and examples/hello_tls are (default
#                 target/release; target/debug for a smoke test of the script)
set -euo pipefail

BENCH=${BENCH:-ops}
ROUNDS=${ROUNDS:-3}
AUDIT_FSYNC=${AUDIT_FSYNC:-every}
AUDIT_KEY_USE=${AUDIT_KEY_USE:-all}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-64}
WRK_DURATION=${WRK_DURATION:-10s}
WARMUP=${WARMUP:-2s}
case $BENCH in
    ops | peer) OPS=${OPS:-encrypt decrypt hmac sign-ed25519 sign-ecdsa-p256 sign-rsa-2048 batch-encrypt} ;;
    fence) OPS=${OPS:-encrypt} ;;
    *)
        printf 'run.sh: unknown BENCH=%s (ops, fence, peer)\n' "$BENCH" >&2
        exit 2
        ;;
esac

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
BIN_DIR=${BIN_DIR:-$REPO/target/release}
HSMGATE=$BIN_DIR/hsmgate
HELLO=$BIN_DIR/examples/hello_tls
[[ -x $HSMGATE && -x $HELLO ]] || die "missing $HSMGATE or $HELLO"

# --- CPU pinning (PIN_SERVER, PIN_WRK) ----------------------------------
ON_SERVER_CPUS=()
ON_WRK_CPUS=()
if [[ -n ${PIN_SERVER:-} ]]; then ON_SERVER_CPUS=(taskset -c "$PIN_SERVER"); fi
if [[ -n ${PIN_WRK:-} ]]; then ON_WRK_CPUS=(taskset -c "$PIN_WRK"); fi

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
    for i in $(seq 1 600); do
        grep -q 'listening' "$out" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || die "$what exited early; see its log in $TMP (KEEP=1)"
        sleep 0.1
    done
    die "$what did not start listening within 60 s"
}

# --- policy sets ------------------------------------------------------
# cidr_file FIRST_OCTETS COUNT FILE: COUNT disjoint, non-adjacent /28s
# (every other /27) from the /8 or /10 at FIRST_OCTETS, so neither the trie
# nor a range merge can fold them into a few entries.
cidr_file() {
    local base=$1 count=$2 file=$3
    awk -v base="$base" -v n="$count" 'BEGIN {
        split(base, o, ".");
        start = ((o[1] * 256 + o[2]) * 256 + o[3]) * 256 + o[4];
        print "# generated by benches/run.sh: " n " non-adjacent /28s";
        for (i = 0; i < n; i++) {
            a = start + i * 32;
            printf "%d.%d.%d.%d/28\n", int(a / 16777216) % 256, int(a / 65536) % 256, int(a / 256) % 256, a % 256;
        } }' >"$file"
}

# The realistic set: what a production deployment looks like, with the
# limits raised so that one loopback client is measured, not throttled.
#  - security groups: apps = loopback + a 100,000-CIDR prefix list file +
#    inline subnets; admins, break-glass, monitoring as shipped; route-class
#    groups on the API listener (transit, login, health);
#  - a global deny list from a 100,000-CIDR threat-feed file;
#  - rate limits: every quota declared, 200k/s (burst 400k), the shipped
#    login limits (setup needs two logins);
#  - access policies: the shipped example policies plus the bench user's
#    (grants per operation on bench*, explicit denies), so ACLs are enforced;
#  - auth: a crypto user's session token.
write_realistic() {
    local dir=$1
    mkdir -p "$dir/policies"
    cidr_file 10.0.0.0 100000 "$dir/policies/app-nets.txt"
    cidr_file 100.64.0.0 100000 "$dir/policies/threats.txt"
    cat >"$dir/policies/security-groups.toml" <<'TOML'
[prefix_list.app-nets]
description = "application subnets (generated, 100k CIDRs)"
file = "app-nets.txt"

[prefix_list.threats]
description = "imported threat feed (generated, 100k CIDRs)"
file = "threats.txt"

[deny_list.threat-feed]
description = "known-bad sources"
rules = [
  { prefix_list = "threats", description = "imported feed" },
  { source = "192.0.2.0/24", description = "TEST-NET-1" },
]

[group.apps]
description = "application networks"
rules = [
  { prefix_list = "app-nets", description = "app subnets" },
  { source = "172.16.0.0/12", ports = "8000-9999", description = "legacy DC" },
  { source = "fd00:1234::/32", description = "app IPv6" },
  { source = "127.0.0.1/32", description = "apps on this host" },
  { source = "::1/128", description = "apps on this host (IPv6)" },
]

[group.admins]
description = "administrator jump hosts"
rules = [
  { source = "10.255.0.0/28", description = "jump hosts" },
  { source = "127.0.0.1/32", description = "administrators on this host" },
]

[group.break-glass]
description = "this host's console"
rules = [{ source = "127.0.0.1/32" }, { source = "::1/128" }]

[group.monitoring]
description = "Prometheus"
rules = [{ source = "10.254.0.0/24" }, { source = "127.0.0.1/32" }]
TOML
    cat >"$dir/policies/rate-limits.toml" <<'TOML'
[rate_limits]
ipv4_prefix = 32
ipv6_prefix = 64
sweep_interval_seconds = 60
login_user = { rate = 20, per = "minute", burst = 5 }
principal = { rate = 200000, per = "second", burst = 400000 }
key = { rate = 200000, per = "second", burst = 400000 }

[rate_limits.source]
transit = { rate = 200000, per = "second", burst = 400000 }
login = { rate = 60, per = "minute", burst = 10 }
admin = { rate = 20, per = "second", burst = 40 }
health = { rate = 20, per = "second", burst = 40 }

[rate_limits.password_hashing]
max_concurrent = 2
max_wait_ms = 2000

[rate_limits.connections]
per_source = 256
total = 8192
idle_timeout_seconds = 60
TOML
    grep -v '^\s*#' "$REPO/config/examples/policies/acl.toml" | grep -v '^\s*$' >"$dir/policies/acl.toml"
    cat >>"$dir/policies/acl.toml" <<'TOML'

[[policy]]
name = "bench-app"
description = "the benchmark's crypto user"
[[policy.path]]
path = "transit/keys/bench*"
capabilities = ["create", "read", "update"]
[[policy.path]]
path = "transit/encrypt/bench*"
capabilities = ["update"]
[[policy.path]]
path = "transit/decrypt/bench*"
capabilities = ["update"]
[[policy.path]]
path = "transit/hmac/bench*"
capabilities = ["update"]
[[policy.path]]
path = "transit/sign/bench*"
capabilities = ["update"]
[[policy.path]]
path = "transit/verify/+"
capabilities = ["update"]
[[policy.path]]
path = "transit/export/*"
capabilities = ["deny"]
[[policy.path]]
path = "transit/backup/*"
capabilities = ["deny"]
[[policy.path]]
path = "transit/encrypt/bench-frozen"
capabilities = ["deny"]

[[user_policy]]
user = "bench"
policies = ["bench-app", "billing-app"]
TOML
    write_main "$dir" 'deny_lists = ["threat-feed"]' '["apps", "admins"]' '["admins"]' \
        'transit_groups = ["apps"]
login_groups = ["apps", "admins"]
health_groups = ["apps", "admins", "monitoring"]' '["break-glass"]' '["monitoring"]'
}

# The empty set: one group admitting loopback, no prefix lists, no deny
# lists, no route-class groups, no access policies, every quota at the
# validator's maximum (1,000,000/s; the limiters themselves cannot be
# switched off, so their lookups stay in the measured path).
write_open() {
    local dir=$1
    mkdir -p "$dir/policies"
    cat >"$dir/policies/security-groups.toml" <<'TOML'
[group.all]
rules = [{ source = "127.0.0.1/32" }]
TOML
    cat >"$dir/policies/rate-limits.toml" <<'TOML'
[rate_limits]
login_user = { rate = 1000000, per = "second", burst = 1000000 }
principal = { rate = 1000000, per = "second", burst = 1000000 }
key = { rate = 1000000, per = "second", burst = 1000000 }

[rate_limits.source]
transit = { rate = 1000000, per = "second", burst = 1000000 }
login = { rate = 1000000, per = "second", burst = 1000000 }
admin = { rate = 1000000, per = "second", burst = 1000000 }
health = { rate = 1000000, per = "second", burst = 1000000 }

[rate_limits.connections]
per_source = 1000000
total = 10000000
TOML
    write_main "$dir" '' '["all"]' '["all"]' '' '["all"]' '["all"]'
}

# write_main DIR TOPLEVEL API_GROUPS API_ADMIN API_EXTRA BG_GROUPS METRICS_GROUPS
# Everything that is not the fence (engine, audit, limits, TLS) is the
# shipped default in both sets.
write_main() {
    local dir=$1 top=$2 groups=$3 admin=$4 extra=$5 bg=$6 mon=$7
    local api_port bg_port m_port
    free_port 18200; api_port=$FREE_PORT
    free_port 18210; bg_port=$FREE_PORT
    free_port 19464; m_port=$FREE_PORT
    cat >"$dir/hsmgate.toml" <<TOML
policies_dir = "$dir/policies"
$top

[engine]
data_dir = "$dir/data"
zeroize_after_failures = 3
login_guard_reserve = 1

[[listener]]
name = "api"
address = "127.0.0.1:$api_port"
security_groups = $groups
admin_groups = $admin
$extra

[[listener]]
name = "break-glass"
address = "127.0.0.1:$bg_port"
security_groups = $bg
admin_groups = $bg
channel = "break-glass"

[audit]
fsync = "$AUDIT_FSYNC"
key_use = "$AUDIT_KEY_USE"

[metrics]
enabled = true
address = "127.0.0.1:$m_port"
security_groups = $mon
$BENCH_MAIN_EXTRA
TOML
}
BENCH_MAIN_EXTRA=""

# api CACERT BASE METHOD PATH [TOKEN] [BODY] -> response body; fails on non-2xx.
api() {
    local cacert=$1 base=$2 method=$3 path=$4 token=${5:-} body=${6:-}
    local args=(-sS --fail-with-body --cacert "$cacert" -X "$method" -H 'Content-Type: application/json')
    [[ -n $token ]] && args+=(-H "X-Vault-Token: $token")
    [[ -n $body ]] && args+=(--data-binary "$body")
    curl "${args[@]}" "$base$path" || die "$method $path failed"
}

# Key name and wrk OP for each measured operation.
op_key() {
    case $1 in
        encrypt | decrypt | hmac | batch-encrypt) echo bench ;;
        sign-ed25519) echo bench-ed25519 ;;
        sign-ecdsa-p256) echo bench-p256 ;;
        sign-rsa-2048) echo bench-rsa2048 ;;
        *) die "unknown op $1" ;;
    esac
}
op_lua() { case $1 in sign-*) echo sign ;; *) echo "$1" ;; esac; }

# start_gate NAME PROFILE: starts hsmgate with the policy set PROFILE
# (realistic | open) in $TMP/NAME, initialises it, creates the crypto user
# and keys. Sets GATE_URL[NAME], GATE_TOKEN[NAME], GATE_CT[NAME] (a
# ciphertext for decrypt), GATE_PID[NAME].
declare -A GATE_URL GATE_TOKEN GATE_CT GATE_PID PEER_URL
start_gate() {
    local name=$1 profile=$2 dir=$TMP/$1
    mkdir -p "$dir"
    "write_$profile" "$dir"
    "$HSMGATE" check --config "$dir/hsmgate.toml" >"$dir/check.out" 2>&1 \
        || { cat "$dir/check.out" >&2; die "hsmgate check refused the $profile config"; }
    say "hsmgate ($name: $profile policy set) serve --config $dir/hsmgate.toml"
    HSMGATE_LOG=${HSMGATE_LOG:-info} "${ON_SERVER_CPUS[@]}" "$HSMGATE" serve --config "$dir/hsmgate.toml" --data-dir "$dir/data" \
        >"$dir/hsmgate.out" 2>"$dir/hsmgate.log" &
    PIDS+=($!)
    GATE_PID[$name]=$!
    wait_listening "$dir/hsmgate.out" "$!" "hsmgate ($name)"
    local url
    url=$(sed -n 's/^hsmgate: listening api \(https:[^ ]*\).*/\1/p' "$dir/hsmgate.out" | head -n1)
    [[ -n $url ]] || die "no 'listening api' line from hsmgate ($name)"
    GATE_URL[$name]=$url
    local ca=$dir/data/tls/cert.pem pw admin tok
    pw=bench-admin-password-$RANDOM$RANDOM
    say "$name: init, admin login, crypto user, keys"
    api "$ca" "$url" POST /v1/hsm/init "" "$(jq -nc --arg p "$pw" --rawfile t "$dir/data/init-token" \
        '{admin_password: $p, init_token: ($t | rtrimstr("\n"))}')" >/dev/null
    admin=$(api "$ca" "$url" POST /v1/hsm/login "" "$(jq -nc --arg p "$pw" '{username: "admin", password: $p}')" \
        | jq -er .auth.client_token)
    api "$ca" "$url" POST /v1/hsm/users "$admin" \
        '{"username":"bench","password":"bench-password-1","role":"crypto-user"}' >/dev/null
    tok=$(api "$ca" "$url" POST /v1/hsm/login "" '{"username":"bench","password":"bench-password-1"}' \
        | jq -er .auth.client_token)
    GATE_TOKEN[$name]=$tok
    api "$ca" "$url" POST /v1/transit/keys/bench "$tok" '{"type":"aes256-gcm96"}' >/dev/null
    local op k
    for op in $OPS; do
        k=$(op_key "$op")
        case $op in
            sign-ed25519) api "$ca" "$url" POST "/v1/transit/keys/$k" "$tok" '{"type":"ed25519"}' >/dev/null ;;
            sign-ecdsa-p256) api "$ca" "$url" POST "/v1/transit/keys/$k" "$tok" '{"type":"ecdsa-p256"}' >/dev/null ;;
            sign-rsa-2048) api "$ca" "$url" POST "/v1/transit/keys/$k" "$tok" '{"type":"rsa-2048"}' >/dev/null ;;
        esac
    done
    # One encrypt by hand: a broken setup fails here, not as wrk non-2xx;
    # its ciphertext is what OP=decrypt sends.
    GATE_CT[$name]=$(api "$ca" "$url" POST /v1/transit/encrypt/bench "$tok" \
        "$(head -c 1024 /dev/urandom | base64 -w0 | jq -Rc '{plaintext: .}')" \
        | jq -er '.data.ciphertext | select(startswith("vault:v1:"))') \
        || die "the check encrypt ($name) did not answer a vault:v1: ciphertext"
}

# --- targets ------------------------------------------------------------
# A target is "label" with T_URL, and for Transit ops T_OP, T_KEY, T_TOKEN,
# T_CT (empty T_OP: plain GET /, the hello server).
declare -A T_URL T_OP T_KEY T_TOKEN T_CT
TARGETS=()
add_target() { # label url [op gate]
    local label=$1
    TARGETS+=("$label")
    T_URL[$label]=$2
    T_OP[$label]=${3:-}
    if [[ -n ${3:-} ]]; then
        T_KEY[$label]=$(op_key "$3")
        T_TOKEN[$label]=${GATE_TOKEN[$4]}
        T_CT[$label]=${GATE_CT[$4]}
    fi
}

WRK_ARGS=(-t"$WRK_THREADS" -c"$WRK_CONNS" --latency)
run_wrk() { # label duration tag -> raw output file
    local label=$1 dur=$2 out=$TMP/wrk-$1-$3.txt op=${T_OP[$1]}
    if [[ -z $op ]]; then
        "${ON_WRK_CPUS[@]}" wrk "${WRK_ARGS[@]}" -d"$dur" "${T_URL[$label]}/" >"$out"
    else
        OP=$(op_lua "$op") TRANSIT_KEY=${T_KEY[$label]} VAULT_TOKEN=${T_TOKEN[$label]} \
            CIPHERTEXT=${T_CT[$label]} \
            "${ON_WRK_CPUS[@]}" wrk "${WRK_ARGS[@]}" -d"$dur" -s "$REPO/benches/transit.lua" "${T_URL[$label]}" >"$out"
    fi
    if grep -q 'Non-2xx' "$out"; then
        cat "$out" >&2
        die "$label answered non-2xx responses (see above)"
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

declare -A RPS P99 # "label,round"
measure() {
    local label r order i
    say "warm-up ($WARMUP each)"
    for label in "${TARGETS[@]}"; do run_wrk "$label" "$WARMUP" warmup >/dev/null; done
    for r in $(seq 1 "$ROUNDS"); do
        order=()
        if ((r % 2)); then
            order=("${TARGETS[@]}")
        else
            for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[i]}"); done
        fi
        for label in "${order[@]}"; do
            say "round $r/$ROUNDS: $label (wrk ${WRK_ARGS[*]} -d$WRK_DURATION)"
            out=$(run_wrk "$label" "$WRK_DURATION" "$r")
            RPS[$label,$r]=$(rps "$out")
            P99[$label,$r]=$(p99_ms "$out")
        done
    done
}

# --- report -----------------------------------------------------------
header() {
    echo
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores  load before: $LOAD_BEFORE  after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "BENCH=$BENCH ROUNDS=$ROUNDS; wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}') ${WRK_ARGS[*]} -d$WRK_DURATION, keep-alive, HTTP/1.1 over TLS 1.3 on loopback; HSMGATE_LOG=${HSMGATE_LOG:-info}; audit fsync=$AUDIT_FSYNC key_use=$AUDIT_KEY_USE; servers on CPUs ${PIN_SERVER:-any}, wrk on ${PIN_WRK:-any}"
    echo
    printf '| | '; for r in $(seq 1 "$ROUNDS"); do printf 'round %s | ' "$r"; done; echo 'median |'
    printf '|---|'; for r in $(seq 1 "$ROUNDS"); do printf -- '---:|'; done; echo '---:|'
}
row() { # label values...: the median of the values last, bold
    local label=$1; shift
    printf '| %s | ' "$label"; printf '%s | ' "$@"; printf '**%s** |\n' "$(median "$@")"
}
vals() { local k=$1 label=$2 r; for r in $(seq 1 "$ROUNDS"); do eval "printf '%s ' \"\${$k[\$label,\$r]}\""; done; }
ratios() { # A B: per-round req/s A/B
    local r; for r in $(seq 1 "$ROUNDS"); do
        awk -v a="${RPS[$1,$r]}" -v b="${RPS[$2,$r]}" 'BEGIN { printf "%.3f ", a / b }'
    done
}
report_pairs() { # BASE then label pairs "label:base"
    local pair a b
    local -A shown=()
    for pair in "$@"; do
        a=${pair%%:*} b=${pair#*:}
        if [[ -z ${shown[$a]:-} ]]; then
            shown[$a]=1
            # shellcheck disable=SC2046
            row "$a req/s" $(vals RPS "$a")
            # shellcheck disable=SC2046
            row "$a p99 ms" $(vals P99 "$a")
        fi
        # shellcheck disable=SC2046
        if [[ $a != "$b" ]]; then row "ratio $a / $b (req/s)" $(ratios "$a" "$b"); fi
    done
}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

check_alive() {
    local n
    for n in "${!GATE_PID[@]}"; do kill -0 "${GATE_PID[$n]}" 2>/dev/null || die "hsmgate ($n) died during the run"; done
}

case $BENCH in
ops)
    start_gate gate realistic
    free_port 8443
    "${ON_SERVER_CPUS[@]}" "$HELLO" "127.0.0.1:$FREE_PORT" >"$TMP/hello.out" 2>"$TMP/hello.log" &
    PIDS+=($!)
    wait_listening "$TMP/hello.out" "$!" hello_tls
    add_target hello "https://127.0.0.1:$FREE_PORT"
    pairs=("hello:hello")
    if [[ -n ${ECHO:-} ]]; then
        [[ " $OPS " == *" encrypt "* ]] || die "ECHO=1 needs encrypt in OPS"
        add_target echo "https://127.0.0.1:$FREE_PORT" encrypt gate
        pairs+=("echo:hello")
    fi
    for op in $OPS; do
        add_target "$op" "${GATE_URL[gate]}" "$op" gate
        pairs+=("$op:hello")
        if [[ -n ${ECHO:-} && $op == encrypt ]]; then pairs+=("encrypt:echo"); fi
    done
    measure
    check_alive
    header
    report_pairs "${pairs[@]}"
    ;;
fence)
    start_gate fenced realistic
    start_gate open open
    pairs=()
    for op in $OPS; do
        add_target "$op-fenced" "${GATE_URL[fenced]}" "$op" fenced
        add_target "$op-open" "${GATE_URL[open]}" "$op" open
        pairs+=("$op-fenced:$op-open" "$op-open:$op-open")
    done
    measure
    check_alive
    header
    report_pairs "${pairs[@]}"
    ;;
peer)
    # shellcheck source=benches/peer.sh
    source "$REPO/benches/peer.sh"
    ;;
esac

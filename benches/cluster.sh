#!/usr/bin/env bash
# Cluster benchmarks (issue 7), one command on a fresh machine:
#
#   benches/cluster.sh                      # release build, full sizes
#   PROFILE=dev-o3 benches/cluster.sh       # dev profile with opt-level 3
#                                           # (much faster to build on 2 cores)
#   KEYS=1000 ROUNDS=1 WRK_DURATION=3s WRITES=50 benches/cluster.sh   # smoke
#
# It builds hsmgate, issues cluster certificates (`hsmgate cluster certs`),
# starts FOUR node processes on loopback — a cluster of one (node 9) and a
# cluster of three (nodes 1, 2, 3); cluster ports 127.0.60.<id>:8201, API
# listeners on 127.0.0.1 — forms both clusters through the HSM API (init on
# the founder, then POST /v1/hsm/cluster/nodes with each joining node's own
# init token), starts two gateways (`[upstream]`, docs/CLUSTER.md
# "Gateways"): g1 in front of the cluster of one, g3 in front of the three,
# and measures:
#
#  1. crypto: Transit encrypt (1 KiB, aes256-gcm96) and ecdsa-p256 sign
#     req/s and p99 through one node's API (the cluster of one, the leader
#     of three, a follower of three) and through each gateway (wrk keep-alive, WRK_CONNS
#     connections, like benches/run.sh); rounds interleaved, order reversed
#     every other round, medians and per-round ratios;
#  2. writes: create-key (POST /v1/transit/keys/:name) latency, one client,
#     sequential, one keep-alive connection (curl), WRITES creations per
#     target per round, on the cluster of one, the leader of three and a
#     follower of three (which forwards to the leader); p50 / p99 per round
#     and over all rounds;
#  3. rejoin: create KEYS keys on the three-node cluster (KEY_CONC
#     concurrent creations through the leader), zeroize a follower (its
#     officer's POST /v1/hsm/zeroize), then time POST /v1/hsm/cluster/nodes
#     (re-adding it with its new init token) and the time until the node
#     answers encrypt with the last key created. Measured once before the
#     KEYS creations (few keys) and once after.
#
# The node processes, wrk and curl share the machine's cores: compare
# figures of the same run (ratios), not absolute numbers across machines.
#
# Knobs (environment):
#   ROUNDS=3  WRK_THREADS=1  WRK_CONNS=64  WRK_DURATION=10s  WARMUP=2s
#   OPS="encrypt sign-ecdsa-p256"
#   WRITES=100     creations per target per round (x ROUNDS: 300 each)
#   KEYS=10000     keys in the cluster before the timed rejoin
#   KEY_CONC=16    concurrent creations while filling (curl --parallel)
#   FILL_VIA="1"   the nodes the filling creations go to, round-robin
#                  ("1 2": leader and follower, races between members)
#   PROFILE=release | dev-o3   build profile (dev-o3: `cargo build` with
#                  CARGO_PROFILE_DEV_OPT_LEVEL=3; binary in target/debug)
#   NO_BUILD=1     skip the build;  BIN=path/to/hsmgate  use that binary
#   HSMGATE_LOG    passed to the nodes (default "info")
#   KEEP=1         keep the temp dir (data dirs, configs, logs, raw output)
#   DEMO=1         measure nothing: start the nodes and gateways, print their
#                  URLs, a token and a curl line, and wait for Ctrl-C (the
#                  "three nodes and a gateway on one machine" of CLUSTER.md)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CONNS=${WRK_CONNS:-64}
WRK_DURATION=${WRK_DURATION:-10s}
WARMUP=${WARMUP:-2s}
OPS=${OPS:-encrypt sign-ecdsa-p256}
WRITES=${WRITES:-100}
KEYS=${KEYS:-10000}
KEY_CONC=${KEY_CONC:-16}
FILL_VIA=${FILL_VIA:-1}
PROFILE=${PROFILE:-release}
NET=127.0.60

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# --- tools --------------------------------------------------------------
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v curl >/dev/null || need_pkgs+=(curl)
if ((${#need_pkgs[@]})); then
    say "installing ${need_pkgs[*]}"
    apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
curl --help all 2>/dev/null | grep -q -- '--parallel-max' || die "curl >= 7.66 needed (--parallel)"

# --- build --------------------------------------------------------------
case $PROFILE in
    release) BUILD=(cargo build --release --bin hsmgate) DEFAULT_BIN=$REPO/target/release/hsmgate ;;
    dev-o3) BUILD=(env CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo build --bin hsmgate) DEFAULT_BIN=$REPO/target/debug/hsmgate ;;
    *) die "unknown PROFILE=$PROFILE (release, dev-o3)" ;;
esac
if [[ -z ${NO_BUILD:-} ]]; then
    say "${BUILD[*]}"
    "${BUILD[@]}"
fi
HSMGATE=${BIN:-$DEFAULT_BIN}
[[ -x $HSMGATE ]] || die "missing $HSMGATE"

# --- scratch space and cleanup -----------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/hsmgate-cluster-bench.XXXXXX")
declare -A PID
cleanup() {
    local n
    for n in "${!PID[@]}"; do kill "${PID[$n]}" 2>/dev/null || true; done
    for n in "${!PID[@]}"; do wait "${PID[$n]}" 2>/dev/null || true; done
    if [[ -n ${KEEP:-} ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
TAKEN=" "
free_port() { # first free port >= $1 on 127.0.0.1 not handed out yet -> FREE_PORT
    local p=$1
    while [[ $TAKEN == *" $p "* ]] || port_busy 127.0.0.1 "$p"; do p=$((p + 1)); done
    TAKEN+="$p "
    FREE_PORT=$p
}

# --- certificates and policies -----------------------------------------
say "hsmgate cluster certs --out-dir $TMP/certs --nodes 1,2,3,9"
"$HSMGATE" cluster certs --out-dir "$TMP/certs" --nodes 1,2,3,9 >"$TMP/certs.out"
mkdir -p "$TMP/policies"
cat >"$TMP/policies/security-groups.toml" <<TOML
[group.loopback]
rules = [{ source = "127.0.0.1/32" }]

[group.cluster]
description = "bench cluster members (they dial from their cluster address)"
rules = [{ source = "$NET.0/24" }]
TOML
# Limits raised so that one loopback client is measured, not throttled.
cat >"$TMP/policies/rate-limits.toml" <<'TOML'
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

# --- nodes ----------------------------------------------------------------
declare -A URL CA DIR
start_node() { # id: starts node <id>, sets URL[id], CA[id], DIR[id], PID[id]
    local id=$1 dir=$TMP/node-$1 api_port bg_port
    port_busy "$NET.$id" 8201 && die "$NET.$id:8201 is in use"
    free_port 18300; api_port=$FREE_PORT
    free_port 18400; bg_port=$FREE_PORT
    mkdir -p "$dir"
    cat >"$dir/hsmgate.toml" <<TOML
policies_dir = "$TMP/policies"

[engine]
data_dir = "$dir/data"
zeroize_after_failures = 3
login_guard_reserve = 1

[[listener]]
name = "api"
address = "127.0.0.1:$api_port"
security_groups = ["loopback"]
admin_groups = ["loopback"]
# The gateways (on loopback too) name their client in X-Forwarded-For.
trusted_proxy_groups = ["loopback"]
xff_hops = 1

[[listener]]
name = "break-glass"
address = "127.0.0.1:$bg_port"
security_groups = ["loopback"]
admin_groups = ["loopback"]
channel = "break-glass"

[audit]
fsync = "every"
key_use = "all"

[cluster]
node_id = $id
address = "$NET.$id:8201"
ca_file = "$TMP/certs/ca.pem"
cert_file = "$TMP/certs/node-$id.pem"
key_file = "$TMP/certs/node-$id-key.pem"
security_groups = ["cluster"]
TOML
    launch "$id" "$dir" "node $id"
}

launch() { # key dir what: checks and serves $dir/hsmgate.toml, sets URL/CA/DIR/PID[key]
    local key=$1 dir=$2 what=$3 i
    "$HSMGATE" check --config "$dir/hsmgate.toml" >"$dir/check.out" 2>&1 \
        || { cat "$dir/check.out" >&2; die "hsmgate check refused $what's config"; }
    HSMGATE_LOG=${HSMGATE_LOG:-info} "$HSMGATE" serve --config "$dir/hsmgate.toml" \
        >"$dir/hsmgate.out" 2>"$dir/hsmgate.log" &
    PID[$key]=$!
    for i in $(seq 1 600); do
        grep -q 'listening api' "$dir/hsmgate.out" 2>/dev/null && break
        kill -0 "${PID[$key]}" 2>/dev/null || die "$what exited early; see $dir/hsmgate.log (KEEP=1)"
        sleep 0.1
    done
    URL[$key]=$(sed -n 's/^hsmgate: listening api \(https:[^ ]*\).*/\1/p' "$dir/hsmgate.out" | head -n1)
    [[ -n ${URL[$key]} ]] || die "$what did not start listening within 60 s"
    CA[$key]=$dir/data/tls/cert.pem
    DIR[$key]=$dir
}

# call ID METHOD PATH [TOKEN] [BODY] -> body on stdout, HTTP status in CODE_FILE
CODE_FILE=$TMP/code
call() {
    local id=$1 method=$2 path=$3 token=${4:-} body=${5:-}
    local args=(-sS --cacert "${CA[$id]}" -X "$method" -H 'Content-Type: application/json'
        -o "$TMP/body" -w '%{http_code}')
    [[ -n $token ]] && args+=(-H "X-Vault-Token: $token")
    [[ -n $body ]] && args+=(--data-binary "$body")
    curl "${args[@]}" "${URL[$id]}$path" >"$CODE_FILE" 2>/dev/null || echo 000 >"$CODE_FILE"
    cat "$TMP/body" 2>/dev/null || true
}
code() { cat "$CODE_FILE"; }
# api: like call, but dies on a non-2xx answer.
api() {
    local out
    out=$(call "$@")
    [[ $(code) == 2* ]] || die "$2 $3 on node $1 answered $(code): $out"
    printf '%s' "$out"
}
init_token() { tr -d '\n' <"${DIR[$1]}/data/init-token"; }
login() { # id user password -> token
    api "$1" POST /v1/hsm/login "" "$(jq -nc --arg u "$2" --arg p "$3" '{username: $u, password: $p}')" \
        | jq -er .auth.client_token
}

ADMIN_PW=bench-admin-password-$RANDOM$RANDOM
APP_PW=bench-app-password-$RANDOM$RANDOM
declare -A CO TOK

found() { # id: init the founder, crypto user "bench", keys bench and bench-p256
    local id=$1
    api "$id" POST /v1/hsm/init "" "$(jq -nc --arg p "$ADMIN_PW" --arg t "$(init_token "$id")" \
        '{admin_password: $p, init_token: $t}')" >/dev/null
    CO[$id]=$(login "$id" admin "$ADMIN_PW")
    api "$id" POST /v1/hsm/users "${CO[$id]}" \
        "$(jq -nc --arg p "$APP_PW" '{username: "bench", password: $p, role: "crypto-user"}')" >/dev/null
    TOK[$id]=$(login "$id" bench "$APP_PW")
    api "$id" POST /v1/transit/keys/bench "${TOK[$id]}" '{"type":"aes256-gcm96"}' >/dev/null
    api "$id" POST /v1/transit/keys/bench-p256 "${TOK[$id]}" '{"type":"ecdsa-p256"}' >/dev/null
}

join() { # leader id -> prints the seconds POST /v1/hsm/cluster/nodes took
    local leader=$1 id=$2 t0 t1
    t0=$(now)
    api "$leader" POST /v1/hsm/cluster/nodes "${CO[$leader]}" \
        "$(jq -nc --argjson n "$id" --arg a "$NET.$id:8201" --arg t "$(init_token "$id")" \
            '{node_id: $n, address: $a, init_token: $t}')" >/dev/null
    t1=$(now)
    elapsed "$t0" "$t1"
}

say "starting nodes 9 (cluster of one) and 1, 2, 3 (cluster of three)"
for id in 9 1 2 3; do start_node "$id"; done
found 9
found 1
for id in 2 3; do join 1 "$id" >/dev/null; done
for id in 2 3; do TOK[$id]=$(login "$id" bench "$APP_PW"); done
status=$(api 1 GET /v1/hsm/cluster "${CO[1]}")
LEADER=$(jq -er .data.leader <<<"$status")
[[ $(jq '.data.voters | length' <<<"$status") == 3 ]] || die "three-node cluster not formed: $status"
[[ $LEADER == 1 ]] || die "expected node 1 (the founder) to lead, got $LEADER: $status"
FOLLOWER=2
VICTIM=3
TERM_START=$(jq -er .data.term <<<"$status")
say "cluster formed: leader 1, term $TERM_START, voters $(jq -c .data.voters <<<"$status")"
# The keys work through every member (read-your-writes).
for id in 9 1 2 3; do
    api "$id" POST /v1/transit/encrypt/bench "${TOK[$id]}" '{"plaintext":"aGk="}' >/dev/null
    api "$id" POST /v1/transit/sign/bench-p256 "${TOK[$id]}" '{"input":"aGk="}' >/dev/null
done

# --- gateways ------------------------------------------------------------
start_gateway() { # name node-ids...: a gateway ([upstream]) in front of them
    local name=$1 dir=$TMP/gateway-$1 api_port id nodes=""
    shift
    free_port 18500; api_port=$FREE_PORT
    mkdir -p "$dir"
    : >"$dir/nodes-ca.pem"
    for id in "$@"; do
        cat "${CA[$id]}" >>"$dir/nodes-ca.pem"
        nodes+="  { id = $id, address = \"${URL[$id]#https://}\" },"$'\n'
    done
    cat >"$dir/hsmgate.toml" <<TOML
policies_dir = "$TMP/policies"

[engine]
data_dir = "$dir/data"

[[listener]]
name = "api"
address = "127.0.0.1:$api_port"
security_groups = ["loopback"]
admin_groups = ["loopback"]

[audit]
fsync = "every"
key_use = "all"

[upstream]
ca_file = "$dir/nodes-ca.pem"
nodes = [
$nodes]
TOML
    launch "$name" "$dir" "gateway $name"
}
# Tokens after a cluster-key rotation (it ends every session).
refresh_tokens() {
    local id
    CO[1]=$(login 1 admin "$ADMIN_PW")
    for id in 1 2 3; do TOK[$id]=$(login "$id" bench "$APP_PW"); done
    TOK[g3]=${TOK[1]}
}
say "starting gateway g1 (in front of node 9) and g3 (in front of nodes 1, 2, 3)"
start_gateway g1 9
start_gateway g3 1 2 3
TOK[g1]=${TOK[9]}
TOK[g3]=${TOK[1]}
for g in g1 g3; do
    for i in $(seq 1 100); do
        [[ $(call "$g" POST /v1/transit/encrypt/bench "${TOK[$g]}" '{"plaintext":"aGk="}' >/dev/null; code) == 200 ]] && break
        ((i < 100)) || die "gateway $g never answered encrypt: $(code) $(cat "$TMP/body")"
        sleep 0.1
    done
done

if [[ -n ${DEMO:-} ]]; then
    cat >&2 <<EOF
== DEMO: a cluster of three (nodes 1, 2, 3) behind gateway g3, a cluster of one (node 9) behind g1
   gateway g3: ${URL[g3]}  (CA: ${CA[g3]})
   gateway g1: ${URL[g1]}  (CA: ${CA[g1]})
   nodes: 1 ${URL[1]}  2 ${URL[2]}  3 ${URL[3]}  9 ${URL[9]}
   app token (user bench, valid on every member): ${TOK[1]}
   try: curl -s --cacert ${CA[g3]} -H "X-Vault-Token: ${TOK[1]}" \\
          ${URL[g3]}/v1/transit/encrypt/bench -d '{"plaintext":"aGk="}'
   (the officer's password is in $TMP/admin-password)
   Ctrl-C stops everything.
EOF
    printf '%s\n' "$ADMIN_PW" >"$TMP/admin-password"
    wait
fi

check_alive() {
    local n
    for n in "${!PID[@]}"; do kill -0 "${PID[$n]}" 2>/dev/null || die "node $n died; see ${DIR[$n]}/hsmgate.log (KEEP=1)"; done
}

# --- helpers for figures ------------------------------------------------
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
pct() { # p file-of-numbers -> nearest-rank percentile
    sort -g "$2" | awk -v p="$1" '{ a[NR] = $1 } END { i = int(p * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.2f", a[i] }'
}
p99_ms() {
    awk '$1 == "99%" {
        v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
        if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000;
        printf "%.2f", v }' "$1"
}
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$1"; }
row() { # label values...: median last, bold
    local label=$1; shift
    printf '| %s | ' "$label"; printf '%s | ' "$@"; printf '**%s** |\n' "$(median "$@")"
}
header_rounds() { # first column title
    printf '| %s | ' "$1"; for r in $(seq 1 "$ROUNDS"); do printf 'round %s | ' "$r"; done; echo 'median |'
    printf '|---|'; for r in $(seq 1 "$ROUNDS"); do printf -- '---:|'; done; echo '---:|'
}
order_for_round() { # round labels... -> ORDER (reversed every other round)
    local r=$1 i; shift
    ORDER=()
    if ((r % 2)); then ORDER=("$@"); else for ((i = $#; i >= 1; i--)); do ORDER+=("${!i}"); done; fi
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
# Targets: label -> node id.
declare -A NODE_OF=([1-node]=9 [3-node-leader]=1 [3-node-follower]=$FOLLOWER [gw-1-node]=g1 [gw-3-node]=g3)
TARGETS=(1-node 3-node-leader 3-node-follower gw-1-node gw-3-node)

# --- 1. crypto throughput -------------------------------------------------
WRK_ARGS=(-t"$WRK_THREADS" -c"$WRK_CONNS" --latency)
run_wrk() { # target op duration tag -> raw output file
    local t=$1 op=$2 out=$TMP/wrk-$1-$2-$4.txt id=${NODE_OF[$1]} lua_op=encrypt key=bench
    [[ $op == sign-ecdsa-p256 ]] && { lua_op=sign; key=bench-p256; }
    [[ $op == encrypt || $op == sign-ecdsa-p256 ]] || die "unknown op $op (encrypt, sign-ecdsa-p256)"
    OP=$lua_op TRANSIT_KEY=$key VAULT_TOKEN=${TOK[$id]} \
        wrk "${WRK_ARGS[@]}" -d"$3" -s "$REPO/benches/transit.lua" "${URL[$id]}" >"$out"
    if grep -q 'Non-2xx' "$out"; then cat "$out" >&2; die "$t $op answered non-2xx responses"; fi
    echo "$out"
}
declare -A RPS P99
say "1. crypto: warm-up ($WARMUP each)"
for op in $OPS; do for t in "${TARGETS[@]}"; do run_wrk "$t" "$op" "$WARMUP" warmup >/dev/null; done; done
for r in $(seq 1 "$ROUNDS"); do
    order_for_round "$r" "${TARGETS[@]}"
    for op in $OPS; do
        for t in "${ORDER[@]}"; do
            say "round $r/$ROUNDS: $op via $t (wrk ${WRK_ARGS[*]} -d$WRK_DURATION)"
            out=$(run_wrk "$t" "$op" "$WRK_DURATION" "$r")
            RPS[$t,$op,$r]=$(rps "$out")
            P99[$t,$op,$r]=$(p99_ms "$out")
        done
    done
done
check_alive

# --- 2. write latency ------------------------------------------------------
# One curl process per (target, round): WRITES creations in sequence over
# one keep-alive connection (a status call first opens it and is dropped).
declare -A W50 W99 WALL
write_round() { # target round -> samples file (ms)
    local t=$1 r=$2 id=${NODE_OF[$1]} cfg=$TMP/writes-$1-$2.curl out=$TMP/writes-$1-$2.txt i
    {
        printf 'url = "%s/v1/hsm/status"\ncacert = "%s"\noutput = "/dev/null"\nwrite-out = "warmup %%{http_code} %%{time_total}\\n"\n' \
            "${URL[$id]}" "${CA[$id]}"
        for i in $(seq 1 "$WRITES"); do
            printf 'next\nurl = "%s/v1/transit/keys/w-%s-r%s-%s"\ncacert = "%s"\nheader = "X-Vault-Token: %s"\nheader = "Content-Type: application/json"\ndata = "{\\"type\\":\\"aes256-gcm96\\"}"\noutput = "/dev/null"\nwrite-out = "w %%{http_code} %%{time_total} %%{num_connects}\\n"\n' \
                "${URL[$id]}" "$t" "$r" "$i" "${CA[$id]}" "${TOK[$id]}"
        done
    } >"$cfg"
    curl -sS -K "$cfg" >"$out" || die "curl failed writing through $t"
    awk '$1 == "w" && $2 != 200 { bad++ } END { exit bad > 0 }' "$out" \
        || { grep -v ' 200 ' "$out" | head >&2; die "create-key through $t answered non-200 (above)"; }
    awk '$1 == "w" && $4 != 0 { n++ } END { if (n) printf "cluster.sh: note: %d new connections while writing\n", n > "/dev/stderr" }' "$out"
    awk '$1 == "w" { printf "%.3f\n", $3 * 1000 }' "$out" >"$TMP/writes-$t-$r.ms"
    echo "$TMP/writes-$t-$r.ms"
}
for r in $(seq 1 "$ROUNDS"); do
    order_for_round "$r" "${TARGETS[@]}"
    for t in "${ORDER[@]}"; do
        say "round $r/$ROUNDS: $WRITES sequential key creations via $t"
        f=$(write_round "$t" "$r")
        W50[$t,$r]=$(pct 0.50 "$f")
        W99[$t,$r]=$(pct 0.99 "$f")
        cat "$f" >>"$TMP/writes-$t-all.ms"
    done
done
check_alive

# --- 3. rejoin of a zeroized node ------------------------------------------
fill_keys() { # count: creates fill-1..count through the leader, KEY_CONC at a time
    local n=$1 cfg=$TMP/fill.curl out=$TMP/fill.txt i t0 t1 via id
    read -r -a via <<<"$FILL_VIA"
    for i in $(seq 1 "$n"); do
        if ((i > 1)); then echo next; fi
        id=${via[i % ${#via[@]}]}
        printf 'url = "%s/v1/transit/keys/fill-%s"\ncacert = "%s"\nheader = "X-Vault-Token: %s"\nheader = "Content-Type: application/json"\ndata = "{\\"type\\":\\"aes256-gcm96\\"}"\noutput = "/dev/null"\nwrite-out = "%%{http_code} %%{url_effective}\\n"\n' \
            "${URL[$id]}" "$i" "${CA[$id]}" "${TOK[$id]}"
    done >"$cfg"
    t0=$(now)
    curl -sS --no-progress-meter --parallel --parallel-max "$KEY_CONC" -K "$cfg" >"$out" 2>"$TMP/fill.err" || true
    t1=$(now)
    FILL_S=$(elapsed "$t0" "$t1")
    FILL_CODES=$(awk '{ c[$1]++ } END { for (k in c) printf "%s:%d ", k, c[k] }' "$out")
    # Anything but 200 (a write that lost a race answers 503: retry) is
    # retried one at a time through the leader, and counted.
    FILL_RETRIED=0
    local url
    while read -r url; do
        FILL_RETRIED=$((FILL_RETRIED + 1))
        local name=${url##*/} tries=0
        until [[ $(call 1 POST "/v1/transit/keys/$name" "${TOK[1]}" '{"type":"aes256-gcm96"}' >/dev/null; code) == 200 ]]; do
            tries=$((tries + 1))
            ((tries < 20)) || die "creating $name failed 20 times: $(code) $(cat "$TMP/body")"
            sleep 0.2
        done
    done < <(awk '$1 != 200 { print $2 }' "$out")
    LAST_KEY=fill-$n
}
count_keys() { # id -> number of keys the node lists
    call "$1" LIST /v1/transit/keys "${TOK[$1]}" | jq '.data.keys | length'
}
rejoin() { # label: zeroize VICTIM, re-add it, time it -> REJOIN_POST, REJOIN_READY
    local label=$1 co t0 t1 i
    co=$(login "$VICTIM" admin "$ADMIN_PW")
    api "$VICTIM" POST /v1/hsm/zeroize "$co" >/dev/null
    for i in $(seq 1 300); do
        [[ $(call "$VICTIM" GET /v1/hsm/status | jq -r .data.state) == zeroized && ! -e ${DIR[$VICTIM]}/data/raft.redb && -s ${DIR[$VICTIM]}/data/init-token ]] && break
        ((i < 300)) || die "node $VICTIM did not finish zeroizing"
        sleep 0.1
    done
    # The two others keep serving and writing meanwhile.
    api 1 POST "/v1/transit/encrypt/$LAST_KEY" "${TOK[1]}" '{"plaintext":"aGk="}' >/dev/null
    api "$FOLLOWER" POST "/v1/transit/keys/while-zeroized-$label" "${TOK[$FOLLOWER]}" '{"type":"aes256-gcm96"}' >/dev/null
    say "rejoin ($label): node $VICTIM zeroized; re-adding it"
    t0=$(now)
    REJOIN_POST=$(join 1 "$VICTIM")
    local tok=""
    for i in $(seq 1 6000); do
        [[ -z $tok ]] && tok=$(call "$VICTIM" POST /v1/hsm/login "" \
            "$(jq -nc --arg p "$APP_PW" '{username: "bench", password: $p}')" | jq -r '.auth.client_token // empty' 2>/dev/null || true)
        if [[ -n $tok ]]; then
            call "$VICTIM" POST "/v1/transit/encrypt/$LAST_KEY" "$tok" '{"plaintext":"aGk="}' >/dev/null
            [[ $(code) == 200 ]] && break
        fi
        ((i < 6000)) || die "node $VICTIM did not serve $LAST_KEY within 10 min of rejoining"
        sleep 0.1
    done
    t1=$(now)
    REJOIN_READY=$(elapsed "$t0" "$t1")
    # The rejoin rotated the cluster key: every older session ended.
    refresh_tokens
    TOK[$VICTIM]=$tok
    REJOIN_KEYS=$(count_keys "$VICTIM")
    local leader_keys
    leader_keys=$(count_keys 1)
    [[ $REJOIN_KEYS == "$leader_keys" ]] || die "rejoined node lists $REJOIN_KEYS keys, the leader $leader_keys"
}

LAST_KEY=bench
rejoin small
SMALL=("$REJOIN_KEYS" "$REJOIN_POST" "$REJOIN_READY")
say "3. filling the cluster with $KEYS keys ($KEY_CONC concurrent creations through node(s) $FILL_VIA)"
fill_keys "$KEYS"
say "filled in ${FILL_S}s (first-pass answers: $FILL_CODES; retried one at a time: $FILL_RETRIED)"
for id in 1 2 3; do
    api "$id" POST "/v1/transit/encrypt/$LAST_KEY" "${TOK[$id]}" '{"plaintext":"aGk="}' >/dev/null
done
rejoin full
FULL=("$REJOIN_KEYS" "$REJOIN_POST" "$REJOIN_READY")
check_alive
# A leader change mid-run (an election under load) would mislabel the
# leader/follower figures: say so in the report.
status=$(api 1 GET /v1/hsm/cluster "${CO[1]}")
TERM_END="leader $(jq -r .data.leader <<<"$status"), term $(jq -r .data.term <<<"$status")"

# --- report -------------------------------------------------------------
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores  load before: $LOAD_BEFORE  after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "benches/cluster.sh PROFILE=$PROFILE ROUNDS=$ROUNDS WRITES=$WRITES KEYS=$KEYS KEY_CONC=$KEY_CONC FILL_VIA=\"$FILL_VIA\"; wrk $(wrk -v 2>&1 | head -n1 | awk '{print $2}') ${WRK_ARGS[*]} -d$WRK_DURATION, keep-alive, HTTP/1.1 over TLS 1.3 on loopback; HSMGATE_LOG=${HSMGATE_LOG:-info}; audit fsync=every"
echo "three-node cluster: leader 1, term $TERM_START at the start; $TERM_END at the end"
echo
echo "Crypto operations through one node's API (1-node: a cluster of one; 3-node: the leader or a follower of three):"
echo
header_rounds ""
for op in $OPS; do
    for t in "${TARGETS[@]}"; do
        vals=(); for r in $(seq 1 "$ROUNDS"); do vals+=("${RPS[$t,$op,$r]}"); done
        row "$op via $t req/s" "${vals[@]}"
        vals=(); for r in $(seq 1 "$ROUNDS"); do vals+=("${P99[$t,$op,$r]}"); done
        row "$op via $t p99 ms" "${vals[@]}"
    done
    for pair in 3-node-leader/1-node 3-node-follower/1-node gw-1-node/1-node gw-3-node/gw-1-node gw-3-node/3-node-leader; do
        a=${pair%/*} b=${pair#*/}
        vals=(); for r in $(seq 1 "$ROUNDS"); do
            vals+=("$(awk -v a="${RPS[$a,$op,$r]}" -v b="${RPS[$b,$op,$r]}" 'BEGIN { printf "%.3f", a / b }')")
        done
        row "ratio $op $a / $b (req/s)" "${vals[@]}"
    done
done
echo
echo "Create-key latency, one sequential client on one keep-alive connection, $WRITES creations per target per round:"
echo
header_rounds ""
for t in "${TARGETS[@]}"; do
    vals=(); for r in $(seq 1 "$ROUNDS"); do vals+=("${W50[$t,$r]}"); done
    row "create via $t p50 ms" "${vals[@]}"
    vals=(); for r in $(seq 1 "$ROUNDS"); do vals+=("${W99[$t,$r]}"); done
    row "create via $t p99 ms" "${vals[@]}"
done
echo
echo "| over all rounds | creations | p50 ms | p99 ms | max ms |"
echo "|---|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
    f=$TMP/writes-$t-all.ms
    echo "| create via $t | $(wc -l <"$f") | $(pct 0.50 "$f") | $(pct 0.99 "$f") | $(pct 1 "$f") |"
done
echo
echo "Filling: $KEYS creations through node(s) $FILL_VIA, $KEY_CONC concurrent: ${FILL_S} s ($(awk -v n="$KEYS" -v s="$FILL_S" 'BEGIN { printf "%.0f", n / s }') keys/s); first-pass answers $FILL_CODES; retried: $FILL_RETRIED"
echo
echo "Rejoin of a zeroized follower (node $VICTIM), re-added through the leader:"
echo
echo "| keys in the cluster | POST /v1/hsm/cluster/nodes s | until it encrypts with the last key s |"
echo "|---:|---:|---:|"
echo "| ${SMALL[0]} | ${SMALL[1]} | ${SMALL[2]} |"
echo "| ${FULL[0]} | ${FULL[1]} | ${FULL[2]} |"

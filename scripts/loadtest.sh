#!/usr/bin/env bash
# Load test: toolgate (bundled policies: API-key auth, allowlist, JSON Schema, content filter,
# redacted audit to a file, metrics) and a bare hyper pass-through proxy in front of the same
# upstream, measured in one run with wrk. Prints throughput, p50/p99 latency and the proxy's CPU
# time per request, and toolgate's ratios to the bare proxy. Another target is the same call as
# an MCP `tools/call` (stateless revision 2026-07-28) to `/mcp`, compared with the plain
# HTTP path; another sends it to `kb.screened`, the same tool with every filter on (deny terms
# and patterns, and all nine PII/secret detectors, on the arguments and on the tool's answer).
# The bare proxy runs on the same per-core runtime as toolgate (the ratios); a second copy on
# tokio's default work-stealing runtime — the plain ~40-line proxy — is measured for reference.
#
# The targets take turns in short slices (2 s by default, the order reversed every other slice)
# and each one's CPU and requests are summed over its slices: a burst of other work on a shared
# machine then falls on every target alike instead of on one target's whole window.
#
#   scripts/loadtest.sh                 # 64 connections, 10 s per target in 5 slices
#   CONNS=64 DURATION=20 SLICES=10 scripts/loadtest.sh
#   AUDIT='{ file: null }' scripts/loadtest.sh    # what the audit file costs
#   ROUNDS=5 scripts/loadtest.sh        # five rounds, and the median of their ratios
#   SLICES=1 scripts/loadtest.sh        # each target for the whole DURATION, back to back
#   INSTRUCTIONS=1 scripts/loadtest.sh  # user-space instructions per request under callgrind:
#                                       # repeatable whatever else the machine is doing
#   TOOLGATE=/tmp/old/toolgate scripts/loadtest.sh   # another build of toolgate (an earlier
#                                       # commit's), against the same bare proxy and upstream
#   REDIS=1 scripts/loadtest.sh         # also a second toolgate with `state: redis://` (a local
#                                       # redis-server), against the memory one in the same run
#   TLS=1 scripts/loadtest.sh           # also a toolgate with TLS on its data plane (the test
#                                       # fixture certificate), against the plaintext one
#   TRACING=1 scripts/loadtest.sh       # also a toolgate exporting OTLP traces (to the bench
#                                       # upstream, which accepts anything), against one without
#
# Needs wrk (apt-get install wrk). Traffic stays on 127.0.0.1; every run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SLICES=${SLICES:-5}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
command -v wrk >/dev/null || { echo "loadtest: needs wrk (apt-get install wrk)" >&2; exit 1; }
INSTRUCTIONS=${INSTRUCTIONS:-}
wrap=()
if [ -n "$INSTRUCTIONS" ]; then
  command -v valgrind >/dev/null || { echo "loadtest: INSTRUCTIONS=1 needs valgrind" >&2; exit 1; }
  CONNS=8 THREADS=1
fi

cargo build --release --quiet --bin toolgate --example bench_upstream --example bare_proxy
bin=target/release
TOOLGATE=${TOOLGATE:-$bin/toolgate}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/policies"
for f in policies/*.yaml policies/*.cedar; do
  sed 's#http://127.0.0.1:9001#http://127.0.0.1:19100#g' "$f" > "$work/policies/$(basename "$f")"
done
# A load-test agent on the bundled policies, with limits high enough never to refuse but still
# checked on every call (budget reservation and rate allowance included).
bench_digest=$(printf %s bench-key | sha256sum | cut -d' ' -f1)
cat > "$work/policies/bench.yaml" <<YAML
agents:
  bench-bot:
    credentials: { api_key_sha256: [ "$bench_digest" ] }
    tools: [ kb.* ]
    limits: { calls_per_minute: 1000000000, tokens_per_hour: 1000000000000 }
tools:
  kb.screened:
    description: kb.search with every filter on, input and output (load test)
    upstream: { url: "http://127.0.0.1:19100/kb/search", method: POST }
    arguments:
      type: object
      required: [ query ]
      additionalProperties: false
      properties:
        query: { type: string, minLength: 1, maxLength: 500 }
        limit: { type: integer, minimum: 1, maximum: 20 }
    filters: { input: [ internal-terms, pii ], output: [ pii ] }
YAML
cat > "$work/toolgate.yaml" <<YAML
listen: 127.0.0.1:19102
admin: { listen: 127.0.0.1:19103 }
policies: $work/policies
audit: ${AUDIT:-{ file: $work/audit.jsonl \}}
YAML

"$bin/examples/bench_upstream" 127.0.0.1:19100 & pids+=($!)
[ -n "$INSTRUCTIONS" ] && wrap=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.%p")
REDIS=${REDIS:-}
if [ -n "$REDIS" ]; then
  command -v redis-server >/dev/null || { echo "loadtest: REDIS=1 needs redis-server" >&2; exit 1; }
  mkdir -p "$work/redis"
  redis-server --port 19105 --bind 127.0.0.1 --save "" --appendonly yes --dir "$work/redis" >/dev/null 2>&1 & pids+=($!); redis_pid=$!
  for _ in $(seq 1 50); do redis-cli -p 19105 ping >/dev/null 2>&1 && break; sleep 0.1; done
  sed -e 's#127.0.0.1:19102#127.0.0.1:19106#' -e 's#127.0.0.1:19103#127.0.0.1:19107#' -e "s#audit.jsonl#audit-redis.jsonl#" \
    "$work/toolgate.yaml" > "$work/toolgate-redis.yaml"
  # Its own approval store: a store is locked by the process that opened it.
  printf 'state: redis://127.0.0.1:19105/0\nredis: { timeout_ms: 5000 }\napprovals: { store: %s }\n' "$work/approvals-redis.redb" >> "$work/toolgate-redis.yaml"
  RUST_LOG=warn "${wrap[@]}" "$TOOLGATE" serve -c "$work/toolgate-redis.yaml" 2>"$work/toolgate-redis.log" & pids+=($!); tgr_pid=$!
fi
TLS=${TLS:-}
if [ -n "$TLS" ]; then
  sed -e 's#127.0.0.1:19102#127.0.0.1:19108#' -e 's#127.0.0.1:19103#127.0.0.1:19109#' -e "s#audit.jsonl#audit-tls.jsonl#" \
    "$work/toolgate.yaml" > "$work/toolgate-tls.yaml"
  printf 'tls: { cert_file: %s, key_file: %s }\napprovals: { store: %s }\n' "$PWD/tests/fixtures/tls/tool.pem" \
    "$PWD/tests/fixtures/tls/tool.key" "$work/approvals-tls.redb" >> "$work/toolgate-tls.yaml"
  RUST_LOG=warn "${wrap[@]}" "$TOOLGATE" serve -c "$work/toolgate-tls.yaml" 2>"$work/toolgate-tls.log" & pids+=($!); tgt_pid=$!
fi
TRACING=${TRACING:-}
if [ -n "$TRACING" ]; then
  sed -e 's#127.0.0.1:19102#127.0.0.1:19110#' -e 's#127.0.0.1:19103#127.0.0.1:19111#' -e "s#audit.jsonl#audit-traced.jsonl#" \
    "$work/toolgate.yaml" > "$work/toolgate-traced.yaml"
  printf 'telemetry: { otlp_endpoint: "http://127.0.0.1:19100/v1/traces" }\napprovals: { store: %s }\n' \
    "$work/approvals-traced.redb" >> "$work/toolgate-traced.yaml"
  RUST_LOG=error "${wrap[@]}" "$TOOLGATE" serve -c "$work/toolgate-traced.yaml" 2>"$work/toolgate-traced.log" & pids+=($!); tgo_pid=$!
fi
"${wrap[@]}" "$bin/examples/bare_proxy" 127.0.0.1:19101 http://127.0.0.1:19100 2>"$work/bare.log" & pids+=($!); bare_pid=$!
BARE_RUNTIME=work-stealing "$bin/examples/bare_proxy" 127.0.0.1:19104 http://127.0.0.1:19100 2>"$work/bare_ws.log" & pids+=($!); ws_pid=$!
RUST_LOG=warn "${wrap[@]}" "$TOOLGATE" serve -c "$work/toolgate.yaml" 2>"$work/toolgate.log" & pids+=($!); tg_pid=$!
for _ in $(seq 1 60); do
  curl -s -o /dev/null http://127.0.0.1:19101/ && curl -s -o /dev/null http://127.0.0.1:19104/ && curl -s -o /dev/null http://127.0.0.1:19103/healthz \
    && { [ -z "$REDIS" ] || curl -s -o /dev/null http://127.0.0.1:19107/healthz; } \
    && { [ -z "$TLS" ] || curl -s -o /dev/null http://127.0.0.1:19109/healthz; } \
    && { [ -z "$TRACING" ] || curl -s -o /dev/null http://127.0.0.1:19111/healthz; } && break
  sleep 0.5
done

# A ~300-byte kb.search call (the anchor's body size), as bench-bot.
query=$(printf 'customer cannot log in after resetting the password twice; the session expires immediately and the second factor prompt never appears on the mobile app, desktop works, cleared cookies already, %.0s' 1)
cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"query": "${query:0:270}", "limit": 5}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key"
LUA

cat > "$work/mcp.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "kb.search", "arguments": {"query": "${query:0:270}", "limit": 5}, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer bench-key"
LUA

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk=$(getconf CLK_TCK)

# instructions NAME PID URL [SCRIPT] -> user-space instructions per request (callgrind counts
# from a zeroed counter to a dump, around a fixed-length run)
instructions() {
  local pid=$2 url=$3 script=${4:-$work/post.lua}
  wrk -t1 -c"$CONNS" -d2s -s "$script" "$url" >/dev/null 2>&1   # warm-up
  callgrind_control -z "$pid" >/dev/null
  wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$script" "$url" > "$work/$1.txt"
  callgrind_control -d "$pid" >/dev/null
  local n; n=$(awk '/requests in/ {print $1}' "$work/$1.txt")
  local total; total=$(cat "$work"/callgrind."$pid".* | awk '/^summary:/ {s += $2} END {print s}')
  rm -f "$work"/callgrind."$pid".*
  echo $((total / n))
}

if [ -n "$INSTRUCTIONS" ]; then
  b=$(instructions bare "$bare_pid" "http://127.0.0.1:19101/v1/tools/kb.search")
  t=$(instructions toolgate "$tg_pid" "http://127.0.0.1:19102/v1/tools/kb.search")
  m=$(instructions mcp "$tg_pid" "http://127.0.0.1:19102/mcp" "$work/mcp.lua")
  f=$(instructions screened "$tg_pid" "http://127.0.0.1:19102/v1/tools/kb.screened")
  if [ -n "$REDIS" ]; then
    r=$(instructions redis "$tgr_pid" "http://127.0.0.1:19106/v1/tools/kb.search")
    printf 'toolgate, state: redis %24s (%.2fx the memory state)\n' "$r" "$(awk -v r="$r" -v t="$t" 'BEGIN { print r / t }')"
  fi
  if [ -n "$TLS" ]; then
    s=$(instructions tls "$tgt_pid" "https://127.0.0.1:19108/v1/tools/kb.search")
    printf 'toolgate, TLS data plane %22s (%.2fx plaintext)\n' "$s" "$(awk -v s="$s" -v t="$t" 'BEGIN { print s / t }')"
  fi
  if [ -n "$TRACING" ]; then
    o=$(instructions traced "$tgo_pid" "http://127.0.0.1:19110/v1/tools/kb.search")
    printf 'toolgate, traces exported %21s (%.2fx untraced)\n' "$o" "$(awk -v o="$o" -v t="$t" 'BEGIN { print o / t }')"
  fi
  printf '\n%-28s %24s\n' "proxy (callgrind, $CONNS conns)" "instructions / request"
  printf '%-28s %24s\n' "bare hyper pass-through" "$b" "toolgate (full pipeline)" "$t" "toolgate, MCP tools/call" "$m" \
    "toolgate, every filter" "$f"
  awk -v b="$b" -v t="$t" -v m="$m" -v f="$f" 'BEGIN {
    printf "ratios: toolgate %.2fx the bare proxy (every filter: %.2fx); MCP %.2fx the HTTP path\n", t / b, f / b, m / t }'
  echo "(user space only, and SHA-256 runs its portable code under valgrind: native SHA-NI is cheaper)"
  exit 0
fi

# The five targets: name, process whose CPU is read, URL, wrk script.
targets=("bare $bare_pid http://127.0.0.1:19101/v1/tools/kb.search $work/post.lua"
  "bare_ws $ws_pid http://127.0.0.1:19104/v1/tools/kb.search $work/post.lua"
  "toolgate $tg_pid http://127.0.0.1:19102/v1/tools/kb.search $work/post.lua"
  "mcp $tg_pid http://127.0.0.1:19102/mcp $work/mcp.lua"
  "screened $tg_pid http://127.0.0.1:19102/v1/tools/kb.screened $work/post.lua")
[ -n "$REDIS" ] && targets+=("redis $tgr_pid http://127.0.0.1:19106/v1/tools/kb.search $work/post.lua")
[ -n "$TLS" ] && targets+=("tls $tgt_pid https://127.0.0.1:19108/v1/tools/kb.search $work/post.lua")
[ -n "$TRACING" ] && targets+=("traced $tgo_pid http://127.0.0.1:19110/v1/tools/kb.search $work/post.lua")

# slice NAME PID URL SCRIPT SECONDS: one wrk run against one target; appends
# "cpu_ticks requests seconds p50_ms p99_ms" to NAME.acc.
slice() {
  local name=$1 pid=$2 url=$3 script=$4 secs=$5
  local before; before=$(ticks "$pid")
  local rbefore=0; [ "$name" = redis ] && rbefore=$(ticks "$redis_pid")
  wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" --latency -s "$script" "$url" > "$work/$name.slice"
  local after; after=$(ticks "$pid")
  [ "$name" = redis ] && echo $(( $(ticks "$redis_pid") - rbefore )) >> "$work/redis_server.ticks"
  if grep -q "Non-2xx" "$work/$name.slice"; then
    grep -H "Non-2xx" "$work/$name.slice" >&2
    echo "loadtest: $name had non-2xx responses, so these figures do not measure forwarded calls" >&2
    exit 1
  fi
  awk -v t=$((after - before)) -v secs="$secs" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    / 50%/ { p50 = ms($2) } / 99%/ { p99 = ms($2) } /requests in/ { n = $1 }
    END { printf "%d %d %d %.3f %.3f\n", t, n, secs, p50, p99 }' "$work/$name.slice" >> "$work/$name.acc"
}

# One round: each target's DURATION is cut into SLICES slices, and the targets take turns slice
# by slice (the order reversed every other slice), so a burst of other work on the machine falls
# on all of them rather than on one target's window. CPU and requests are summed per target over
# its slices; p50 and p99 are the median of its slices' figures. SLICES=1 runs the targets back
# to back for the whole DURATION each.
round() {
  local secs=$((DURATION / SLICES)); [ "$secs" -ge 1 ] || { echo "loadtest: DURATION must be at least SLICES seconds" >&2; exit 1; }
  rm -f "$work"/*.acc "$work/redis_server.ticks"
  for t in "${targets[@]}"; do
    set -- $t; wrk -t"$THREADS" -c"$CONNS" -d2s -s "$4" "$3" >/dev/null 2>&1   # warm-up
  done
  local last=$((${#targets[@]} - 1))
  for i in $(seq 1 "$SLICES"); do
    if [ $((i % 2)) -eq 1 ]; then order=$(seq 0 "$last"); else order=$(seq "$last" -1 0); fi
    for k in $order; do set -- ${targets[$k]}; slice "$1" "$2" "$3" "$4" "$secs"; done
  done
  # Every MCP answer must be a CallToolResult, not a JSON-RPC error (which is also HTTP 200).
  body=$(curl -s -X POST http://127.0.0.1:19102/mcp -H 'Content-Type: application/json' -H 'Authorization: Bearer bench-key' \
    -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"kb.search","arguments":{"query":"q"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}')
  case "$body" in *'"isError":false'*) ;; *) echo "loadtest: the MCP call did not succeed: $body" >&2; exit 1 ;; esac

  # figures NAME -> "req/s p50_ms p99_ms CPU_us/req"
  figures() {
    local p50 p99
    p50=$(awk '{ print $4 }' "$work/$1.acc" | median)
    p99=$(awk '{ print $5 }' "$work/$1.acc" | median)
    awk -v clk="$clk" -v p50="$p50" -v p99="$p99" '{ t += $1; n += $2; s += $3 }
      END { printf "%.0f %.2f %.2f %.1f\n", n / s, p50, p99, t / clk * 1e6 / n }' "$work/$1.acc"
  }
  read -r b_rps b_p50 b_p99 b_cpu < <(figures bare)
  read -r w_rps w_p50 w_p99 w_cpu < <(figures bare_ws)
  read -r t_rps t_p50 t_p99 t_cpu < <(figures toolgate)
  read -r m_rps m_p50 m_p99 m_cpu < <(figures mcp)
  read -r f_rps f_p50 f_p99 f_cpu < <(figures screened)

  printf '\n%-28s %10s %9s %9s %14s\n' "proxy ($CONNS conns, $SLICES x ${secs}s)" "req/s" "p50 ms" "p99 ms" "CPU us/req"
  printf '%-28s %10s %9s %9s %14s\n' "bare hyper pass-through" "$b_rps" "$b_p50" "$b_p99" "$b_cpu" \
    "bare, work-stealing runtime" "$w_rps" "$w_p50" "$w_p99" "$w_cpu" \
    "toolgate (full pipeline)" "$t_rps" "$t_p50" "$t_p99" "$t_cpu" \
    "toolgate, MCP tools/call" "$m_rps" "$m_p50" "$m_p99" "$m_cpu" \
    "toolgate, every filter" "$f_rps" "$f_p50" "$f_p99" "$f_cpu"
  awk -v br="$b_rps" -v tr="$t_rps" -v bc="$b_cpu" -v tc="$t_cpu" -v b50="$b_p50" -v t50="$t_p50" \
    -v fr="$f_rps" -v fc="$f_cpu" -v wr="$w_rps" -v wc="$w_cpu" -v mr="$m_rps" -v mc="$m_cpu" 'BEGIN {
    printf "ratios: CPU per request %.2fx the bare proxy, throughput %.0f%% of it, p50 %.2fx\n", tc / bc, 100 * tr / br, t50 / b50
    printf "every filter on: CPU per request %.2fx the bare proxy, throughput %.0f%% of it\n", fc / bc, 100 * fr / br
    printf "against the work-stealing bare proxy: CPU per request %.2fx, throughput %.0f%%\n", tc / wc, 100 * tr / wr
    printf "MCP vs plain HTTP path: CPU per request %.2fx, throughput %.0f%%\n", mc / tc, 100 * mr / tr
    printf "%.4f %.4f %.4f %.4f %.4f %.4f\n", tc / bc, tr / br, fc / bc, fr / br, tc / wc, tr / wr >> "'"$work/ratios"'" }'
  if [ -n "$REDIS" ]; then
    read -r r_rps r_p50 r_p99 r_cpu < <(figures redis)
    local rs_cpu; rs_cpu=$(awk -v clk="$clk" '{ t += $1 } END { print t }' "$work/redis_server.ticks")
    local r_n; r_n=$(awk '{ n += $2 } END { print n }' "$work/redis.acc")
    printf '%-28s %10s %9s %9s %14s\n' "toolgate, state: redis" "$r_rps" "$r_p50" "$r_p99" "$r_cpu"
    awk -v rc="$r_cpu" -v tc="$t_cpu" -v rr="$r_rps" -v tr="$t_rps" -v r99="$r_p99" -v t99="$t_p99" \
      -v rs="$rs_cpu" -v n="$r_n" -v clk="$clk" 'BEGIN {
      printf "state: redis against memory: CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms; redis-server %.1f us CPU per call besides\n", rc / tc, 100 * rr / tr, r99 - t99, rs / clk * 1e6 / n
      printf "%.4f %.4f %.3f\n", rc / tc, rr / tr, r99 - t99 >> "'"$work/redis_ratios"'" }'
  fi
  if [ -n "$TLS" ]; then
    read -r s_rps s_p50 s_p99 s_cpu < <(figures tls)
    printf '%-28s %10s %9s %9s %14s\n' "toolgate, TLS data plane" "$s_rps" "$s_p50" "$s_p99" "$s_cpu"
    awk -v sc="$s_cpu" -v tc="$t_cpu" -v sr="$s_rps" -v tr="$t_rps" -v s99="$s_p99" -v t99="$t_p99" 'BEGIN {
      printf "TLS against plaintext (kept-alive connections): CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms\n", sc / tc, 100 * sr / tr, s99 - t99
      printf "%.4f %.4f %.3f\n", sc / tc, sr / tr, s99 - t99 >> "'"$work/tls_ratios"'" }'
  fi
  if [ -n "$TRACING" ]; then
    read -r o_rps o_p50 o_p99 o_cpu < <(figures traced)
    printf '%-28s %10s %9s %9s %14s\n' "toolgate, traces exported" "$o_rps" "$o_p50" "$o_p99" "$o_cpu"
    awk -v oc="$o_cpu" -v tc="$t_cpu" -v or="$o_rps" -v tr="$t_rps" -v o99="$o_p99" -v t99="$t_p99" 'BEGIN {
      printf "traces on against off: CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms\n", oc / tc, 100 * or / tr, o99 - t99
      printf "%.4f %.4f %.3f\n", oc / tc, or / tr, o99 - t99 >> "'"$work/traced_ratios"'" }'
  fi
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# ROUNDS>1 repeats the round and ends with the median of the rounds' ratios: on a shared machine
# one round's baseline can be an outlier in either direction, and the median of several is not.
ROUNDS=${ROUNDS:-1}
for _ in $(seq 1 "$ROUNDS"); do round; done
if [ "$ROUNDS" -gt 1 ]; then
  cpu=$(awk '{ print $1 }' "$work/ratios" | median)
  thr=$(awk '{ print $2 }' "$work/ratios" | median)
  fcpu=$(awk '{ print $3 }' "$work/ratios" | median)
  fthr=$(awk '{ print $4 }' "$work/ratios" | median)
  wcpu=$(awk '{ print $5 }' "$work/ratios" | median)
  wthr=$(awk '{ print $6 }' "$work/ratios" | median)
  awk -v c="$cpu" -v t="$thr" -v fc="$fcpu" -v ft="$fthr" -v wc="$wcpu" -v wt="$wthr" -v n="$ROUNDS" 'BEGIN {
    printf "\nmedian over %d rounds: CPU per request %.2fx the bare proxy, throughput %.0f%% of it\n", n, c, 100 * t
    printf "every filter on, median over %d rounds: CPU per request %.2fx, throughput %.0f%%\n", n, fc, 100 * ft
    printf "against the work-stealing bare proxy, median over %d rounds: CPU per request %.2fx, throughput %.0f%%\n", n, wc, 100 * wt }'
  if [ -n "$REDIS" ]; then
    rc=$(awk '{ print $1 }' "$work/redis_ratios" | median)
    rt=$(awk '{ print $2 }' "$work/redis_ratios" | median)
    rp=$(awk '{ print $3 }' "$work/redis_ratios" | median)
    awk -v c="$rc" -v t="$rt" -v p="$rp" -v n="$ROUNDS" 'BEGIN {
      printf "state: redis against memory, median over %d rounds: CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms\n", n, c, 100 * t, p }'
  fi
  if [ -n "$TLS" ]; then
    sc=$(awk '{ print $1 }' "$work/tls_ratios" | median)
    st=$(awk '{ print $2 }' "$work/tls_ratios" | median)
    sp=$(awk '{ print $3 }' "$work/tls_ratios" | median)
    awk -v c="$sc" -v t="$st" -v p="$sp" -v n="$ROUNDS" 'BEGIN {
      printf "TLS against plaintext, median over %d rounds: CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms\n", n, c, 100 * t, p }'
  fi
  if [ -n "$TRACING" ]; then
    oc=$(awk '{ print $1 }' "$work/traced_ratios" | median)
    ot=$(awk '{ print $2 }' "$work/traced_ratios" | median)
    op=$(awk '{ print $3 }' "$work/traced_ratios" | median)
    awk -v c="$oc" -v t="$ot" -v p="$op" -v n="$ROUNDS" 'BEGIN {
      printf "traces on against off, median over %d rounds: CPU per call %.2fx, throughput %.0f%%, p99 %+.2f ms\n", n, c, 100 * t, p }'
  fi
fi
events=$( [ -f "$work/audit.jsonl" ] && wc -l < "$work/audit.jsonl" || echo 0)
ahead=$( [ -f "$work/audit.jsonl" ] && grep -c '"event":"call_forwarding"' "$work/audit.jsonl" || true)
echo "audit events written: $events, of which ${ahead:-0} call_forwarding (each forwarded call writes one before and one after; warm-up included)"

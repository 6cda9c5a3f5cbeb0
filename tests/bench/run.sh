#!/usr/bin/env bash
# API benchmark: the release server on the embedded store against a bare actix-web handler that
# returns JSON bodies of the same size, measured in the same run with the same load generator.
# Prints requests/s, p50 and p99 per scenario and each as a ratio of its baseline.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
cargo build --release -q -p integration-manager -p im-system-tests --bin integration-manager --bin bench-baseline
BIN=target/release/integration-manager
BASELINE=target/release/bench-baseline

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 1 200); do curl -sf "$1" >/dev/null && return 0; sleep 0.05; done; echo "not up: $1" >&2; exit 1; }

export IM_STORAGE__DATA_DIR="$WORK/data" IM_LOG__LEVEL=warn IM_SERVER__PORT=$(free_port)
START=$(date +%s%N)
$BIN serve >"$WORK/server.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$IM_SERVER__PORT/health/ready"
READY_MS=$(( ($(date +%s%N) - START) / 1000000 ))
SERVER_PID=${PIDS[0]}
IDLE_RSS=$(awk '/VmRSS/ {print $2}' /proc/$SERVER_PID/status)
API="http://127.0.0.1:$IM_SERVER__PORT/api/v1"

export BENCH_TOKEN=$($BIN token --tenant bench --user bench --roles member --ttl 3600)
AUTH="Authorization: Bearer $BENCH_TOKEN"
BODY='{"providerId":"github","name":"bench","description":"created by make bench","config":{"organization":"acme","repositories":["acme/api","acme/web"]}}'
for _ in $(seq 1 50); do curl -sf -X POST "$API/integrations" -H "$AUTH" -H 'Content-Type: application/json' -d "$BODY" >"$WORK/item.json"; done
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/item.json")
curl -sf "$API/integrations/$ID" -H "$AUTH" >"$WORK/item.json"
curl -sf "$API/integrations?limit=50" -H "$AUTH" >"$WORK/list.json"

BPORT=$(free_port)
$BASELINE "$BPORT" "$WORK/item.json" "$WORK/list.json" >/dev/null 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$BPORT/item"

# wrk prints latencies as 1.23ms / 456.00us / 1.02s: normalise to milliseconds.
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v+0 } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000 } else print v }'; }
run() { # name url [script]
  local out; out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency ${3:+-s "$3"} "$2")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
  p99=$(ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
  errors=$(awk '/Non-2xx/ {print $5}' <<<"$out"); errors=${errors:-0}
  echo "$1 $rps $p50 $p99 $errors"
}

echo "warming up..." >&2
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s tests/bench/get.lua "$API/integrations/$ID" >/dev/null
PEAK_RSS=0
sample_rss() { while kill -0 "$SERVER_PID" 2>/dev/null; do r=$(awk '/VmRSS/ {print $2}' /proc/$SERVER_PID/status 2>/dev/null || echo 0); [ "${r:-0}" -gt "$(cat "$WORK/peak" 2>/dev/null || echo 0)" ] && echo "$r" >"$WORK/peak"; sleep 0.2; done; }
sample_rss & PIDS+=($!)

RESULTS=()
RESULTS+=("$(run baseline-item "http://127.0.0.1:$BPORT/item")")
RESULTS+=("$(run get-by-id "$API/integrations/$ID" tests/bench/get.lua)")
RESULTS+=("$(run baseline-list "http://127.0.0.1:$BPORT/list")")
RESULTS+=("$(run list-50 "$API/integrations?limit=50" tests/bench/get.lua)")
RESULTS+=("$(run create "$API/integrations" tests/bench/post.lua)")
PEAK_RSS=$(cat "$WORK/peak" 2>/dev/null || echo 0)

printf '\n%-14s %10s %9s %9s %8s %10s\n' scenario "req/s" "p50 ms" "p99 ms" "non-2xx" "ratio"
base_item=$(awk '{print $2}' <<<"${RESULTS[0]}")
base_list=$(awk '{print $2}' <<<"${RESULTS[2]}")
for r in "${RESULTS[@]}"; do
  read -r name rps p50 p99 errors <<<"$r"
  case $name in
    get-by-id|create) base=$base_item ;;
    list-50) base=$base_list ;;
    *) base=$rps ;;
  esac
  printf '%-14s %10.0f %9.2f %9.2f %8s %9.2fx\n' "$name" "$rps" "$p50" "$p99" "$errors" "$(awk -v a="$rps" -v b="$base" 'BEGIN {print a/b}')"
done
echo
echo "connections: $CONNECTIONS, duration: $DURATION per scenario, wrk threads: $THREADS, cores: $(nproc)"
echo "item body: $(wc -c <"$WORK/item.json") bytes, list body: $(wc -c <"$WORK/list.json") bytes"
echo "create and get-by-id are compared with baseline-item; list-50 with baseline-list"
echo "cold start to ready: ${READY_MS} ms (embedded store, includes process start and catalog seed)"
echo "RSS: idle $((IDLE_RSS / 1024)) MB, peak under load $((PEAK_RSS / 1024)) MB"

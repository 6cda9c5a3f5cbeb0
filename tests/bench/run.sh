#!/usr/bin/env bash
# Benchmarks, each measured against a baseline in the same run (ratios, not absolute claims):
#  1. API on the embedded store: GET by id, list (50 items), create, against a bare actix-web
#     handler returning JSON bodies of the same size; the same API on the Cosmos DB backend
#     (bounded by the Node.js test server: reported, not tuned to).
#  2. Events: publish-with-confirms through the outbox relay against a bare lapin loop.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
AMQP_URL=${BENCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
cargo build --release -q -p integration-manager -p im-system-tests --bin integration-manager --bin bench-baseline --bin bench-events --bin bench-webhooks
BIN=target/release/integration-manager
BASELINE=target/release/bench-baseline

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 1 400); do curl -sf "$1" >/dev/null && return 0; sleep 0.05; done; echo "not up: $1" >&2; exit 1; }
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/,"",v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v); print v+0 } else if (v ~ /s$/) { sub(/s$/,"",v); print v*1000 } else print v }'; }
run() { # name url [script] -> "name rps p50 p99 non2xx"
  local out; out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency ${3:+-s "$3"} "$2")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
  p99=$(ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
  errors=$(awk '/Non-2xx/ {print $5}' <<<"$out"); errors=${errors:-0}
  echo "$1 $rps $p50 $p99 $errors"
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Starts the service with the given environment; sets API, SERVER_PID, READY_MS, BENCH_TOKEN, ID.
start_service() {
  local port; port=$(free_port)
  local start; start=$(date +%s%N)
  env "$@" IM_LOG__LEVEL=warn IM_SERVER__PORT="$port" $BIN serve >>"$WORK/server.log" 2>&1 & PIDS+=($!)
  SERVER_PID=$!
  wait_up "http://127.0.0.1:$port/health/ready"
  READY_MS=$(( ($(date +%s%N) - start) / 1000000 ))
  API="http://127.0.0.1:$port/api/v1"
  export BENCH_TOKEN; BENCH_TOKEN=$(env "$@" $BIN token --tenant "bench-$port" --user bench --roles member --ttl 3600)
  local body='{"providerId":"github","name":"bench","description":"created by make bench","config":{"organization":"acme","repositories":["acme/api","acme/web"]}}'
  for _ in $(seq 1 50); do curl -sf -X POST "$API/integrations" -H "Authorization: Bearer $BENCH_TOKEN" -H 'Content-Type: application/json' -d "$body" >"$WORK/item.json"; done
  ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/item.json")
  curl -sf "$API/integrations/$ID" -H "Authorization: Bearer $BENCH_TOKEN" >"$WORK/item.json"
  curl -sf "$API/integrations?limit=50" -H "Authorization: Bearer $BENCH_TOKEN" >"$WORK/list.json"
}

peak_rss() { # pid -> samples the peak RSS into $WORK/peak while the pid lives
  echo 0 >"$WORK/peak"
  while kill -0 "$1" 2>/dev/null; do r=$(rss_kb "$1"); [ "${r:-0}" -gt "$(cat "$WORK/peak")" ] && echo "$r" >"$WORK/peak"; sleep 0.2; done
}

RESULTS=()
# --- embedded store ------------------------------------------------------------------------
DATA="$WORK/data"
start_service IM_STORAGE__DATA_DIR="$DATA"
EMBEDDED_READY_MS=$READY_MS
IDLE_RSS=$(rss_kb "$SERVER_PID")
BPORT=$(free_port)
$BASELINE "$BPORT" "$WORK/item.json" "$WORK/list.json" >/dev/null 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$BPORT/item"
echo "warming up..." >&2
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s tests/bench/get.lua "$API/integrations/$ID" >/dev/null
peak_rss "$SERVER_PID" & PIDS+=($!)
RESULTS+=("$(run baseline-item "http://127.0.0.1:$BPORT/item")")
RESULTS+=("$(run get-by-id "$API/integrations/$ID" tests/bench/get.lua)")
RESULTS+=("$(run baseline-list "http://127.0.0.1:$BPORT/list")")
RESULTS+=("$(run list-50 "$API/integrations?limit=50" tests/bench/get.lua)")
RESULTS+=("$(run create "$API/integrations" tests/bench/post.lua)")
PEAK_RSS=$(cat "$WORK/peak")
ITEM_BYTES=$(wc -c <"$WORK/item.json"); LIST_BYTES=$(wc -c <"$WORK/list.json")
kill "$SERVER_PID"

# --- Cosmos DB backend (the Node.js test server) -------------------------------------------
COSMOS=""
if command -v node >/dev/null; then
  [ -d tests/cosmos-server/node_modules/@vercel/cosmosdb-server ] || (cd tests/cosmos-server && npm ci --no-audit --no-fund --silent)
  coproc LAUNCHER { COSMOS_LAUNCHER_EXIT_ON_STDIN_EOF=1 node tests/cosmos-server/launcher.js 0 2>/dev/null; }
  PIDS+=($LAUNCHER_PID)
  read -r _ CPORT <&"${LAUNCHER[0]}"
  start_service IM_STORAGE__DATA_DIR="$WORK/cosmos-data" IM_STORAGE__BACKEND=cosmos IM_COSMOS_DB__ENDPOINT="https://127.0.0.1:$CPORT/" \
    IM_COSMOS_DB__KEY="C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==" \
    IM_COSMOS_DB__EMULATOR=true IM_COSMOS_DB__AUTO_PROVISION=true IM_COSMOS_DB__REQUEST_TIMEOUT=30s
  RESULTS+=("$(run cosmos-get-by-id "$API/integrations/$ID" tests/bench/get.lua)")
  RESULTS+=("$(run cosmos-list-50 "$API/integrations?limit=50" tests/bench/get.lua)")
  RESULTS+=("$(run cosmos-create "$API/integrations" tests/bench/post.lua)")
  kill "$SERVER_PID"
  COSMOS=yes
fi

printf '\n%-18s %10s %9s %9s %8s %10s\n' scenario "req/s" "p50 ms" "p99 ms" "non-2xx" "ratio"
base_item=$(awk '{print $2}' <<<"${RESULTS[0]}")
base_list=$(awk '{print $2}' <<<"${RESULTS[2]}")
for r in "${RESULTS[@]}"; do
  read -r name rps p50 p99 errors <<<"$r"
  case $name in
    *get-by-id|*create) base=$base_item ;;
    *list-50) base=$base_list ;;
    *) base=$rps ;;
  esac
  printf '%-18s %10.0f %9.2f %9.2f %8s %9.2fx\n' "$name" "$rps" "$p50" "$p99" "$errors" "$(awk -v a="$rps" -v b="$base" 'BEGIN {print a/b}')"
done
echo
echo "connections: $CONNECTIONS, duration: $DURATION per scenario, wrk threads: $THREADS, cores: $(nproc)"
echo "item body: $ITEM_BYTES bytes, list body: $LIST_BYTES bytes; get-by-id and create are compared with baseline-item, list-50 with baseline-list"
[ -n "$COSMOS" ] && echo "cosmos-* rows: the same API on the Cosmos DB backend, served by the Node.js test server on loopback (it bounds these figures)"
echo "cold start to ready: ${EMBEDDED_READY_MS} ms (embedded store: process start, migrations, catalog seed)"
echo "RSS: idle $((IDLE_RSS / 1024)) MB, peak under load $((PEAK_RSS / 1024)) MB"

# --- events --------------------------------------------------------------------------------
if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  target/release/bench-events "$AMQP_URL" "${BENCH_EVENTS:-20000}"
else
  echo "events benchmark not run: RabbitMQ is not listening on 127.0.0.1:5672"
fi

# --- webhooks ------------------------------------------------------------------------------
target/release/bench-webhooks "$BIN" "${BENCH_WEBHOOK_EVENTS:-2000}" 1 embedded
target/release/bench-webhooks "$BIN" "${BENCH_WEBHOOK_EVENTS:-1000}" 10 embedded
if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  target/release/bench-webhooks "$BIN" "${BENCH_WEBHOOK_EVENTS:-1000}" 10 rabbitmq
fi

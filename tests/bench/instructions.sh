#!/usr/bin/env bash
# Instructions a request, counted by valgrind's callgrind: the API's GET by id, list of 50 and
# create, ours beside the plain implementation (tests/bench/plain.rs) and the bare handler
# (tests/bench/baseline.rs), each under the same wrk load. A count barely depends on how fast or
# busy the machine is: runs repeat within about a percent (the GETs and lists within 0.3%; a
# create's count moves a little with timing: how often the dispatcher parses again while a
# request waits for the writer, the writer's group sizes, when the checkpointer's passes fall),
# where timed runs on this machine class drift by tens of percent (docs/benchmarks.md, the
# forty-sixth machine's section).
#
# It measures user-space instructions only: the kernel's side (sockets, page cache, locks) and
# time spent waiting are not in it. It complements `make bench`, it does not replace it. The
# requests still in flight when wrk stops (up to BENCH_CONNECTIONS) add their instructions but
# are not counted as requests: at most that many requests' worth, about 0.4% of a create's count
# at the default load and less of the others'.
#
# Usage: tests/bench/instructions.sh [SCENARIO...]   (scenarios: bare-get get plain-get bare-list
#        list create plain-create; all by default; the bare handler answers the item and the list,
#        the plain implementation GET by id and create, ours all three)
# Needs valgrind (callgrind_control reaches the process through vgdb, which needs ptrace: as
# root, or with kernel.yama.ptrace_scope 0), wrk, curl and python3.
# Environment: BENCH_BIN, BENCH_PLAIN, BENCH_BASELINE (the binaries, target/release/* by
# default: build them first, as `make bench` does), BENCH_CONNECTIONS (16), BENCH_SECONDS (5),
# BENCH_CALLGRIND_DIR (keeps each scenario's callgrind file there, for callgrind_annotate).
# Relative paths are taken from the repository's root.
# Prints one line a scenario: requests counted, instructions a request, of them libc's memset
# (counted once a byte by callgrind: actix's header arrays, cleared at every parse, weigh far
# more here than they cost), the embedded store's writer thread and its checkpointer.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BENCH_BIN:-target/release/integration-manager}
PLAIN=${BENCH_PLAIN:-target/release/bench-plain}
BASELINE=${BENCH_BASELINE:-target/release/bench-baseline}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
SECONDS_RUN=${BENCH_SECONDS:-5}
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(bare-get get plain-get bare-list list create plain-create)
declare -A NAMED
for scenario in "${SCENARIOS[@]}"; do
  case $scenario in
    bare-get | get | plain-get | bare-list | list | create | plain-create) ;;
    *) echo "unknown scenario $scenario (bare-get get plain-get bare-list list create plain-create)" >&2; exit 2 ;;
  esac
  [ -z "${NAMED[$scenario]:-}" ] || { echo "scenario $scenario named twice" >&2; exit 2; }
  NAMED[$scenario]=1
done

for tool in valgrind callgrind_control callgrind_annotate wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "instructions.sh needs $tool" >&2; exit 1; }
done
for b in "$BIN" "$PLAIN" "$BASELINE"; do [ -x "$b" ] || { echo "no binary $b: build the release binaries first" >&2; exit 1; }; done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
fail() { echo "instructions.sh: $*" >&2; exit 1; }
# stop PID: stops a process this script started, and forgets it.
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local kept=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  PIDS=("${kept[@]}")
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { # url pid
  for _ in $(seq 1 1200); do
    curl -sf "$1" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  fail "not up: $1"
}

# The item, the list and the token: from a service run without valgrind, whose data directory
# each run of ours then starts from (a copy).
SEED_PORT=$(free_port)
IM_STORAGE__DATA_DIR="$WORK/seed" IM_LOG__LEVEL=warn IM_SERVER__PORT="$SEED_PORT" "$BIN" serve >"$WORK/seed.log" 2>&1 & SEED_PID=$!
PIDS+=("$SEED_PID")
wait_up "http://127.0.0.1:$SEED_PORT/health/ready" "$SEED_PID"
export BENCH_TOKEN
BENCH_TOKEN=$(IM_STORAGE__DATA_DIR="$WORK/seed" "$BIN" token --tenant bench --user bench --roles member --ttl 3600)
BODY='{"providerId":"github","name":"bench","description":"created by make bench","config":{"organization":"acme","repositories":["acme/api","acme/web"]}}'
for _ in $(seq 1 50); do
  curl -sf -X POST "http://127.0.0.1:$SEED_PORT/api/v1/integrations" -H "Authorization: Bearer $BENCH_TOKEN" \
    -H 'Content-Type: application/json' -d "$BODY" >"$WORK/item.json"
done
ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/item.json")
curl -sf "http://127.0.0.1:$SEED_PORT/api/v1/integrations/$ID" -H "Authorization: Bearer $BENCH_TOKEN" >"$WORK/item.json"
curl -sf "http://127.0.0.1:$SEED_PORT/api/v1/integrations?limit=50" -H "Authorization: Bearer $BENCH_TOKEN" >"$WORK/list.json"
stop "$SEED_PID"

# callgrind_annotate's count for FILE: the total, or with a function name its inclusive count.
count() {
  if [ $# -eq 1 ]; then
    callgrind_annotate "$1" | awk '/[0-9] \(100\.0%\)  PROGRAM TOTALS/ && !found { gsub(",", "", $1); print $1; found = 1 }'
  else
    callgrind_annotate --inclusive=yes --threshold=100 "$1" \
      | awk -v f="$2" 'index($0, f) && !found { gsub(",", "", $1); print $1; found = 1 } END { if (!found) print 0 }'
  fi
}

printf '%-14s %9s %12s %12s %12s %12s\n' scenario requests "Ir/request" "memset" "writer" "checkpoints"
for scenario in "${SCENARIOS[@]}"; do
  port=$(free_port)
  out="$WORK/callgrind.$scenario"
  vg=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out")
  case $scenario in
    bare-get | bare-list)
      "${vg[@]}" "$BASELINE" "$port" "$WORK/item.json" "$WORK/list.json" >"$WORK/$scenario.log" 2>&1 &
      ready="http://127.0.0.1:$port/item"; script=get.lua
      if [ "$scenario" = bare-get ]; then url=$ready; else url="http://127.0.0.1:$port/list"; fi ;;
    get | list | create)
      cp -r "$WORK/seed" "$WORK/data-$scenario"
      IM_STORAGE__DATA_DIR="$WORK/data-$scenario" IM_LOG__LEVEL=warn IM_SERVER__PORT="$port" "${vg[@]}" "$BIN" serve >"$WORK/$scenario.log" 2>&1 &
      ready="http://127.0.0.1:$port/health/ready"
      case $scenario in
        get) url="http://127.0.0.1:$port/api/v1/integrations/$ID"; script=get.lua ;;
        list) url="http://127.0.0.1:$port/api/v1/integrations?limit=50"; script=get.lua ;;
        create) url="http://127.0.0.1:$port/api/v1/integrations"; script=post.lua ;;
      esac ;;
    plain-get | plain-create)
      "${vg[@]}" "$PLAIN" "$port" "$WORK/plain-$scenario" "$WORK/item.json" "$BENCH_TOKEN" >"$WORK/$scenario.log" 2>&1 &
      ready="http://127.0.0.1:$port/ready"
      if [ "$scenario" = plain-get ]; then url="http://127.0.0.1:$port/items/$ID"; script=get.lua
      else url="http://127.0.0.1:$port/items"; script=post.lua; fi ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_up "$ready" "$pid"
  # Warmed up uncounted (caches, statements, the allocator's pages), then counted.
  wrk -t1 -c"$CONNECTIONS" -d3s -s "tests/bench/$script" "$url" >/dev/null
  callgrind_control -i on "$pid" >"$WORK/control.log" 2>&1 || fail "$scenario: callgrind_control could not reach the process: $(cat "$WORK/control.log")"
  result=$(wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_RUN}s" -s "tests/bench/$script" "$url")
  callgrind_control -i off "$pid" >"$WORK/control.log" 2>&1 || fail "$scenario: $(cat "$WORK/control.log")"
  callgrind_control -d "$pid" >"$WORK/control.log" 2>&1 || fail "$scenario: $(cat "$WORK/control.log")"
  stop "$pid"
  requests=$(awk '/requests in/ { print $1 }' <<<"$result")
  [ "${requests:-0}" -gt 0 ] || fail "$scenario: no request completed: $result"
  non2xx=$(awk '/Non-2xx/ { print $5 }' <<<"$result")
  [ -z "$non2xx" ] || fail "$scenario: $non2xx answers were not 2xx"
  ! grep -q 'Socket errors' <<<"$result" || fail "$scenario: wrk saw socket errors: $(grep 'Socket errors' <<<"$result")"
  file="$out.1" # the dump's (the file written at exit holds nothing counted)
  [ -s "$file" ] || fail "$scenario: callgrind wrote no dump ($file)"
  total=$(count "$file")
  [ -n "$total" ] || fail "$scenario: no total in $file (callgrind_annotate's format?)"
  memset=$(callgrind_annotate "$file" | awk '/:__memset_/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')
  writer=$(count "$file" "im_store_embedded::db::write_loop ")
  checkpoints=$(count "$file" "im_store_embedded::db::checkpoint_pass ")
  if [ -n "${BENCH_CALLGRIND_DIR:-}" ]; then mkdir -p "$BENCH_CALLGRIND_DIR"; cp "$file" "$BENCH_CALLGRIND_DIR/callgrind.$scenario"; fi
  awk -v s="$scenario" -v n="$requests" -v t="$total" -v m="$memset" -v w="$writer" -v c="$checkpoints" \
    'BEGIN { printf "%-14s %9d %12.0f %12.0f %12.0f %12.0f\n", s, n, t / n, m / n, w / n, c / n }'
done

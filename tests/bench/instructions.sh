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
source tests/bench/lib.sh

BIN=${BENCH_BIN:-target/release/integration-manager}
PLAIN=${BENCH_PLAIN:-target/release/bench-plain}
BASELINE=${BENCH_BASELINE:-target/release/bench-baseline}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
SECONDS_RUN=${BENCH_SECONDS:-5}
ALL=(bare-get get plain-get bare-list list create plain-create)
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=("${ALL[@]}")
declare -A NAMED
for scenario in "${SCENARIOS[@]}"; do
  [[ " ${ALL[*]} " == *" $scenario "* ]] || { echo "unknown scenario $scenario (${ALL[*]})" >&2; exit 2; }
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
WAIT_UP_TRIES=2400 # 120 s: a service starts slowly under valgrind

# The item, the list and the token: from a service run without valgrind, whose data directory
# each run of ours then starts from (a copy).
SEED_PORT=$(free_port)
IM_STORAGE__DATA_DIR="$WORK/seed" IM_LOG__LEVEL=warn IM_SERVER__PORT="$SEED_PORT" "$BIN" serve >"$WORK/seed.log" 2>&1 & SEED_PID=$!
PIDS+=("$SEED_PID")
WAIT_UP_LOG="$WORK/seed.log" wait_up "http://127.0.0.1:$SEED_PORT/health/ready" "$SEED_PID"
export BENCH_TOKEN
BENCH_TOKEN=$(IM_STORAGE__DATA_DIR="$WORK/seed" "$BIN" token --tenant bench --user bench --roles member --ttl 3600)
seed_items "http://127.0.0.1:$SEED_PORT/api/v1" "$BENCH_TOKEN" "$WORK"
stop "$SEED_PID"

# From callgrind_annotate's listing on stdin: the total (no name), or the first count of the
# function named (0 when absent).
count() {
  if [ $# -eq 0 ]; then
    awk '/[0-9] \(100\.0%\)  PROGRAM TOTALS/ && !found { gsub(",", "", $1); print $1; found = 1 }'
  else
    awk -v f="$1" 'index($0, f) && !found { gsub(",", "", $1); print $1; found = 1 } END { if (!found) print 0 }'
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
  WAIT_UP_LOG="$WORK/$scenario.log" wait_up "$ready" "$pid"
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
  callgrind_annotate "$file" >"$WORK/self.txt"
  callgrind_annotate --inclusive=yes --threshold=100 "$file" >"$WORK/inclusive.txt"
  total=$(count <"$WORK/self.txt")
  [ -n "$total" ] || fail "$scenario: no total in $file (callgrind_annotate's format?)"
  memset=$(awk '/:__memset_/ { gsub(",", "", $1); s += $1 } END { print s + 0 }' "$WORK/self.txt")
  writer=$(count "im_store_embedded::db::write_loop " <"$WORK/inclusive.txt")
  checkpoints=$(count "im_store_embedded::db::checkpoint_pass " <"$WORK/inclusive.txt")
  if [ -n "${BENCH_CALLGRIND_DIR:-}" ]; then mkdir -p "$BENCH_CALLGRIND_DIR"; cp "$file" "$BENCH_CALLGRIND_DIR/callgrind.$scenario"; fi
  awk -v s="$scenario" -v n="$requests" -v t="$total" -v m="$memset" -v w="$writer" -v c="$checkpoints" \
    'BEGIN { printf "%-14s %9d %12.0f %12.0f %12.0f %12.0f\n", s, n, t / n, m / n, w / n, c / n }'
done

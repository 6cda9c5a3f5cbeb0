# Helpers shared by the benchmark scripts (sourced, not run).

# A free TCP port on the loopback interface.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# url [pid]: waits until the url answers (WAIT_UP_TRIES times 50 ms, 600 by default), or until
# the process pid ends; on failure shows the end of WAIT_UP_LOG, when set, and exits.
wait_up() {
  for _ in $(seq 1 "${WAIT_UP_TRIES:-600}"); do
    curl -sf "$1" >/dev/null && return 0
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then break; fi
    sleep 0.05
  done
  echo "not up: $1" >&2
  if [ -n "${WAIT_UP_LOG:-}" ] && [ -f "$WAIT_UP_LOG" ]; then
    echo "--- the end of $WAIT_UP_LOG:" >&2
    tail -n 40 "$WAIT_UP_LOG" >&2
  fi
  exit 1
}

# api token dir: creates 50 integrations through the API at api (".../api/v1") with the bearer
# token; writes dir/item.json (the last one, as GET answers it) and dir/list.json (the first
# page of 50), and sets ID to the item's id.
seed_items() {
  local body='{"providerId":"github","name":"bench","description":"created by make bench","config":{"organization":"acme","repositories":["acme/api","acme/web"]}}'
  for _ in $(seq 1 50); do
    curl -sf -X POST "$1/integrations" -H "Authorization: Bearer $2" -H 'Content-Type: application/json' -d "$body" >"$3/item.json"
  done
  ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$3/item.json")
  curl -sf "$1/integrations/$ID" -H "Authorization: Bearer $2" >"$3/item.json"
  curl -sf "$1/integrations?limit=50" -H "Authorization: Bearer $2" >"$3/list.json"
}

#!/usr/bin/env bash
# Schema-driven fuzzing: schemathesis generates requests from the served OpenAPI document and
# checks every answer: no 5xx, no status the document does not list, every body as documented,
# and requests the document allows accepted. Runs the debug build on a temporary data directory
# with an admin token. Extra arguments go to `schemathesis run` (e.g. --max-examples 20).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v schemathesis >/dev/null 2>&1; then
  if [ -n "${CI:-}" ]; then
    echo "schemathesis is required (pip install schemathesis)" >&2
    exit 1
  fi
  pip install -q schemathesis
fi

work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cargo build -q -p integration-manager
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/debug/integration-manager"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export IM_STORAGE__DATA_DIR="$work/data" IM_SERVER__HOST=127.0.0.1 IM_SERVER__PORT="$port" IM_LOG__LEVEL=warn
# URLs: the document allows `http` where the destination policy does (`webhooks.allow_http`,
# stated in each URL field's description); this run allows it, so the patterns are exact.
export IM_WEBHOOKS__ALLOW_HTTP=true
# The callback URL of OAuth2 authorizations (the hooks start some for the callback).
export IM_OAUTH2__REDIRECT_URL="http://127.0.0.1:$port/api/v1/oauth2/callback"
"$bin" serve 2>"$work/server.log" &
server=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/health/live" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$("$bin" token --tenant fuzz --user fuzzer --roles member,admin)

checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,positive_data_acceptance
status=0
# tests/fuzz/hooks.py: a new Idempotency-Key for each generated request, as a client sends, and
# the ids of resources it creates first through the API (IM_FUZZ_URL, IM_FUZZ_TOKEN) where a
# request must name data the service holds.
export PYTHONPATH="$PWD/tests/fuzz${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=hooks
export IM_FUZZ_URL="http://127.0.0.1:$port" IM_FUZZ_TOKEN="$token"
schemathesis --config-file tests/fuzz/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" --url "http://127.0.0.1:$port" \
  --header "Authorization: Bearer $token" --checks "$checks" --max-examples "${FUZZ_EXAMPLES:-50}" \
  --seed "${FUZZ_SEED:-1}" --no-color "$@" || status=$?
if grep -q " ERROR " "$work/server.log"; then
  echo "the server logged errors:" >&2
  grep " ERROR " "$work/server.log" >&2
  status=1
fi
exit $status

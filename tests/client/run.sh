#!/usr/bin/env bash
# Contract test: a client generated from the committed OpenAPI document (openapi-python-client)
# runs a scenario through every resource of a running service and parses every answer into its
# generated types. The generated code is built here, never committed.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v openapi-python-client >/dev/null 2>&1; then
  if [ -n "${CI:-}" ]; then
    echo "openapi-python-client is required (pip install openapi-python-client)" >&2
    exit 1
  fi
  pip install -q openapi-python-client
fi

work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# Generate: no model skipped, no warning.
generated=$(cd "$work" && openapi-python-client generate --path "$OLDPWD/docs/openapi.json" --meta none 2>&1)
if echo "$generated" | grep -qiE "warning|skipp|unable|error"; then
  echo "the generator did not take the whole document:" >&2
  echo "$generated" >&2
  exit 1
fi
python3 -m compileall -q "$work/integration_manager_client"

cargo build -q -p integration-manager
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/debug/integration-manager"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export IM_STORAGE__DATA_DIR="$work/data" IM_SERVER__HOST=127.0.0.1 IM_SERVER__PORT="$port" IM_LOG__LEVEL=warn
"$bin" serve &
server=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/health/live" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$("$bin" token --tenant acme --user alice --roles member)
PYTHONPATH="$work" python3 tests/client/scenario.py "http://127.0.0.1:$port" "$token"

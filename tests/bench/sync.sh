#!/usr/bin/env bash
# The sync benchmark: inbound records/s of the sync engine (fake provider -> provider client ->
# engine -> embedded Shard Manager, per-record states) against a bare page-and-upsert loop over
# the same fakes in the same run, with the process's peak RSS.
# Prints: sync-inbound <ours rec/s> <baseline rec/s> <ratio> <peak RSS KB>
# Usage: tests/bench/sync.sh [RECORDS] [PAGE_SIZE]   (defaults 100000 and 500)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p im-system-tests --bin bench-sync
exec target/release/bench-sync "${1:-100000}" "${2:-500}"

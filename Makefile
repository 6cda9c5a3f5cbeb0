# Integration Manager: every target is a one-liner that mirrors CI.
.PHONY: run test lint fmt fmt-check bench bench-instructions openapi build chaos fuzz image

IMAGE ?= integration-manager:0.1.0

run:        ## build and serve on :3026 with the embedded store
	cargo run --release -p integration-manager -- serve

build:
	cargo build --workspace --all-targets

test:       ## the whole suite: every crate, a generated client against the document, the API suite again on Cosmos DB, the sync crash test of the real binary on Cosmos DB, the connection suite on the HTTP secret store (a Secret Management fake) on both stores, the webhook suite on RabbitMQ, then the broker restart alone
	cargo test --workspace && bash tests/client/run.sh && IM_TEST_BACKEND=cosmos cargo test -p im-system-tests --test api && IM_TEST_BACKEND=cosmos cargo test -p integration-manager --test cli -- a_killed_sync_run && IM_TEST_SECRETS=http cargo test -p im-system-tests --test api -- connections && IM_TEST_SECRETS=http IM_TEST_BACKEND=cosmos cargo test -p im-system-tests --test api -- connections && IM_TEST_EVENTS=rabbitmq cargo test -p im-system-tests --test api -- webhooks deliveries events --skip broker_restart && IM_TEST_EVENTS=rabbitmq cargo test -p im-system-tests --test api -- broker_restart

chaos:      ## long failure scenarios across three instances (receiver down, Secret Management down, kill -9, broker restart), on each store and on RabbitMQ; prints committed/delivered/lost/duplicated
	export IM_CHAOS_FULL=1 && cargo test -p integration-manager --test cli -- chaos --nocapture && cargo test -p im-system-tests --test api -- instances --nocapture && IM_TEST_BACKEND=cosmos cargo test -p im-system-tests --test api -- instances --nocapture && IM_TEST_BACKEND=cosmos IM_TEST_EVENTS=rabbitmq cargo test -p im-system-tests --test api -- instances --nocapture

lint:
	cargo clippy --workspace --all-targets -- -D warnings
	@# unsafe code is denied everywhere but in the three places that say why: the WAL index read in
	@# place, the writer's VFS that gathers a commit's WAL frames, and the binary's one call to its
	@# allocator (main.rs)
	@test "$$(grep -rl 'allow(unsafe_code)' --include='*.rs' crates apps tests | sort | tr '\n' ' ')" = 'apps/integration-manager/src/main.rs crates/im-store-embedded/src/gathered_wal.rs crates/im-store-embedded/src/wal_index.rs ' || { echo 'unsafe code allowed outside crates/im-store-embedded/src/{wal_index,gathered_wal}.rs and apps/integration-manager/src/main.rs' >&2; exit 1; }

fmt:
	cargo fmt --all

fmt-check:
	cargo fmt --all -- --check

image:      ## the container image (IMAGE=name:tag; needs Docker)
	command -v docker >/dev/null || { echo "make image needs Docker" >&2; exit 1; }; docker build -f deploy/Dockerfile -t $(IMAGE) .

openapi:    ## regenerate docs/openapi.json from the code
	cargo run -q -p integration-manager -- openapi > docs/openapi.json

fuzz:       ## schema-driven fuzzing of the served OpenAPI document (schemathesis): no 5xx, every answer as documented
	bash tests/fuzz/run.sh

bench:      ## API, events, webhook delivery and sync benchmarks against baselines (release build, wrk); writes docs/benchmarks.md
	bash tests/bench/run.sh

bench-instructions: ## instructions a request (valgrind's callgrind): ours, the plain implementation and the bare handler; SCENARIOS="get create" picks some
	cargo build --release -q -p integration-manager -p im-system-tests --bin integration-manager --bin bench-baseline --bin bench-plain
	bash tests/bench/instructions.sh $(SCENARIOS)

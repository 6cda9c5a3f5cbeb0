"""Schemathesis hooks of `make fuzz` (loaded through SCHEMATHESIS_HOOKS by tests/fuzz/run.sh)."""

import uuid

import schemathesis


@schemathesis.hook
def before_call(ctx, case, kwargs):
    # A client sends a new Idempotency-Key for each new request, as the header's description
    # says. Generated keys come from a small space (and the coverage phase sends fixed values),
    # so they would meet the documented, tested 422 for a key reused with another request on
    # most POSTs. Every phase sends requests through this hook.
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())

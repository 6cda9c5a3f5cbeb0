"""Schemathesis hooks of `make fuzz` (loaded through SCHEMATHESIS_HOOKS by tests/fuzz/run.sh)."""

import uuid

import schemathesis


@schemathesis.hook
def map_headers(ctx, headers):
    # A client sends a new Idempotency-Key for each new request, as the header's description
    # says; generated keys come from a small space and would meet the (documented, tested) 422
    # for a key reused with another request on most POSTs.
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    return headers

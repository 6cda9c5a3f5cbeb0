"""Schemathesis hooks of `make fuzz` (loaded through SCHEMATHESIS_HOOKS by tests/fuzz/run.sh).

The document gives the shape of every request; some values must also name data the service
holds, which a client takes from earlier answers. These hooks do what such a client does: they
create a few resources first, through the API (`fixtures()`, once, with the run's token from
IM_FUZZ_URL and IM_FUZZ_TOKEN), and put their ids where a request must name one:

- `fuzz-open`, a catalog provider with every auth mode, an open `configSchema` and one entity
  (`items`): `createIntegration` bodies without a `customDefinition` name it as `providerId`
  (with one, `custom`), as a client picks a provider from `GET /providers`; `updateIntegration`
  addresses the integration below, whose provider (`fuzz-open`) cannot change;
- an integration of `fuzz-open` with a bearer connection and a manual sync task: the `id` of
  the connection operations (not the deletes) is that integration, `connectionId` that
  connection; `createSyncTask`/`updateSyncTask` bodies name that integration, connection and
  entity; the sync task operations (not the delete) address that task;
- `fuzz-edit`, a second catalog provider: `updateProvider` addresses it, and its body's `id` is
  the path's (the id of a provider cannot change, as the operation says);
- provider bodies list their entities' names in `capabilities.syncEntities` (a rule between two
  fields of one body, stated in the field's description);
- `deleteConnection` deletes a connection made for it;
- an endpoint made before the integration, so its `integration.created` event makes a delivery:
  `retryDelivery` addresses that endpoint and delivery; `createWebhook` first deletes the run's
  other endpoints when the tenant nears its limit of 50 (a documented 409);
- the fixtures are made again when a request of the run deleted one;
- `oauth2Callback` gets a `state` this service issued: the hook starts an authorization first
  (`authorizeOAuth2Connection`), as the user's browser comes back with the state of the
  authorization URL it was sent to, with `error=access_denied` (the fixture provider's token
  endpoint is not reachable, so a code could not be exchanged).
"""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import schemathesis

_FIXTURES = None


def _call(method, path, body=None):
    url = os.environ["IM_FUZZ_URL"].rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", "Bearer " + os.environ["IM_FUZZ_TOKEN"])
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
            return answer.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as refused:
        return refused.code, None


def _provider(provider_id):
    return {
        "id": provider_id,
        "name": "Fuzz " + provider_id,
        "category": "fuzzing",
        "authModes": ["api_key", "bearer", "basic", "oauth2_client_credentials", "oauth2_authorization_code"],
        "apiKey": {"in": "header", "name": "X-Api-Key"},
        "authorizationUrl": "https://auth.example.com/authorize",
        "tokenUrl": "https://auth.example.com/token",
        "apiBaseUrl": "https://api.example.com",
        "docsUrl": "https://docs.example.com",
        "configSchema": {"type": "object"},
        "capabilities": {"webhooks": False, "syncEntities": ["items"]},
        "pagination": {"style": "none"},
        "entities": [
            {
                "name": "items",
                "idField": "id",
                "list": {"method": "GET", "path": "/items"},
                "get": {"method": "GET", "path": "/items/{id}"},
                "upsert": {"method": "PUT", "path": "/items/{id}"},
                "delete": {"method": "DELETE", "path": "/items/{id}"},
            }
        ],
    }


def _still_there(fixture):
    """Whether the fixtures still exist: the stateful phase follows links from their answers,
    some of them deletes."""
    task_status, _ = _call("GET", f"/api/v1/sync-tasks/{fixture['task']}")
    connection_status, _ = _call("GET", f"/api/v1/integrations/{fixture['integration']}/connections/{fixture['connection']}")
    return task_status == 200 and connection_status == 200


def fixtures(check=False):
    """The resources the hooks name, created through the API (again when one was deleted)."""
    global _FIXTURES
    if _FIXTURES is not None and (not check or _still_there(_FIXTURES)):
        return _FIXTURES
    for provider_id in ("fuzz-open", "fuzz-edit"):
        _call("POST", "/api/v1/providers", _provider(provider_id))
    # An endpoint first, so that the integration's `integration.created` makes a delivery.
    _, webhook = _call("POST", "/api/v1/webhooks", {"url": "https://fuzz.example.com/hook", "eventTypes": ["integration.created"]})
    _, integration = _call(
        "POST",
        "/api/v1/integrations",
        {"providerId": "fuzz-open", "name": "fuzz", "config": {}, "oauth2App": {"clientId": "fuzz", "clientSecret": "fuzz-secret-0123"}},
    )
    if integration is None:
        _, integration = _call("POST", "/api/v1/integrations", {"providerId": "fuzz-open", "name": "fuzz", "config": {}})
    integration_id = integration["id"]
    _, connection = _call(
        "POST",
        f"/api/v1/integrations/{integration_id}/connections",
        {"name": "fuzz", "authMode": "bearer", "credentials": {"token": "fuzz-token-0123456789"}},
    )
    _, task = _call(
        "POST",
        "/api/v1/sync-tasks",
        {
            "integrationId": integration_id,
            "connectionId": connection["id"],
            "entity": "items",
            "target": "items",
            "direction": "inbound",
            "schedule": {"manual": True},
            "fieldMapping": [{"provider": "/title", "platform": "/title"}],
        },
    )
    _FIXTURES = {"integration": integration_id, "connection": connection["id"], "task": task["id"], "webhook": None, "delivery": None}
    if webhook is not None:
        _FIXTURES["webhook"] = webhook["id"]
        for _ in range(50):  # the relay fans the event out within moments
            status, page = _call("GET", f"/api/v1/webhooks/{webhook['id']}/deliveries")
            items = (page or {}).get("items") or []
            if status == 200 and items:
                _FIXTURES["delivery"] = items[0]["id"]
                break
            time.sleep(0.1)
    return _FIXTURES


def _make_room_for_a_webhook():
    """A tenant has at most 50 endpoints (a documented 409): like a client that cleans up after
    itself, delete the run's endpoints (not the fixture's) when the tenant nears the limit."""
    status, page = _call("GET", "/api/v1/webhooks?limit=100")
    endpoints = (page or {}).get("items") or []
    if status != 200 or len(endpoints) < 40:
        return
    keep = (_FIXTURES or {}).get("webhook")
    for endpoint in endpoints:
        if endpoint["id"] != keep:
            _call("DELETE", f"/api/v1/webhooks/{endpoint['id']}")


@schemathesis.hook
def before_call(ctx, case, kwargs):
    # A client sends a new Idempotency-Key for each new request, as the header's description
    # says. Generated keys come from a small space (and the coverage phase sends fixed values),
    # so they would meet the documented, tested 422 for a key reused with another request on
    # most POSTs. Every phase sends requests through this hook.
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())
    operation = case.operation.definition.raw.get("operationId", "")
    if operation in CONNECTION_OPERATIONS + TASK_OPERATIONS + ("createSyncTask", "updateSyncTask", "updateIntegration"):
        fixtures(check=True)
    if operation == "createWebhook":
        _make_room_for_a_webhook()
    if operation == "deleteConnection" and isinstance(case.path_parameters, dict):
        # A connection to delete, made for this request.
        integration = fixtures()["integration"]
        status, made = _call(
            "POST",
            f"/api/v1/integrations/{integration}/connections",
            {"name": "fuzz delete", "authMode": "bearer", "credentials": {"token": "fuzz-token-0123456789"}},
        )
        if status == 201:
            case.path_parameters.update({"id": integration, "connectionId": made["id"]})
    # The examples and coverage phases build requests without `map_path_parameters` and
    # `map_body`: address and name the same data.
    if isinstance(case.path_parameters, dict):
        case.path_parameters = _adjust_path(operation, case.path_parameters)
    if isinstance(case.body, dict):
        case.body = _adjust_body(operation, case.body)
    if operation == "oauth2Callback" and isinstance(case.query, dict) and "state" in case.query:
        # The browser comes back with the state of an authorization this service started.
        status, started = _call(
            "POST", f"/api/v1/integrations/{fixtures()['integration']}/connections/oauth2/authorize", {"name": "fuzz"}
        )
        if status == 201:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(started["authorizationUrl"]).query)
            case.query["state"] = query["state"][0]
            # The fixture's provider has no reachable token endpoint (the exchange would be 503,
            # a dependency down): the user refused, so the callback judges the state and
            # records the refusal (409) without calling the provider.
            case.query["error"] = "access_denied"


CONNECTION_OPERATIONS = ("listConnections", "createConnection", "getConnection", "updateConnection", "testConnection",
                         "authorizeOAuth2Connection")
TASK_OPERATIONS = ("getSyncTask", "updateSyncTask", "runSyncTask", "pauseSyncTask", "resumeSyncTask", "cancelSyncTaskRun",
                   "resetSyncTask", "listSyncExecutions", "getSyncExecution", "listSyncConflicts", "resolveSyncConflict")


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    return _adjust_path(ctx.operation.definition.raw.get("operationId", "") if ctx.operation else "", path_parameters)


def _adjust_path(operation, path_parameters):
    if path_parameters is None:
        return path_parameters
    if operation in CONNECTION_OPERATIONS:
        path_parameters["id"] = fixtures()["integration"]
        if "connectionId" in path_parameters:
            path_parameters["connectionId"] = fixtures()["connection"]
    elif operation in TASK_OPERATIONS:
        path_parameters["id"] = fixtures()["task"]
    elif operation == "updateProvider":
        path_parameters["id"] = "fuzz-edit"
    elif operation == "updateIntegration":
        path_parameters["id"] = fixtures()["integration"]
    elif operation == "retryDelivery" and fixtures()["delivery"] is not None:
        path_parameters["id"] = fixtures()["webhook"]
        path_parameters["deliveryId"] = fixtures()["delivery"]
    return path_parameters


@schemathesis.hook
def map_body(ctx, body):
    return _adjust_body(ctx.operation.definition.raw.get("operationId", "") if ctx.operation else "", body)


def _adjust_body(operation, body):
    if not isinstance(body, dict):
        return body
    if operation == "createIntegration":
        fixtures()  # creates fuzz-open before the first body names it
        body["providerId"] = "custom" if body.get("customDefinition") is not None else "fuzz-open"
    elif operation == "updateIntegration":
        # The fixture integration: its provider cannot change, and it is no custom integration.
        body["providerId"] = "fuzz-open"
        body.pop("customDefinition", None)
    elif operation in ("createSyncTask", "updateSyncTask"):
        body["integrationId"] = fixtures()["integration"]
        body["connectionId"] = fixtures()["connection"]
        body["entity"] = "items"
    elif operation in ("createProvider", "updateProvider"):
        if operation == "updateProvider":
            body["id"] = "fuzz-edit"
        names = [e["name"] for e in body.get("entities") or [] if isinstance(e, dict) and isinstance(e.get("name"), str)]
        if names:
            capabilities = body.get("capabilities") if isinstance(body.get("capabilities"), dict) else {}
            listed = capabilities.get("syncEntities") if isinstance(capabilities.get("syncEntities"), list) else []
            capabilities["syncEntities"] = list(dict.fromkeys(listed + names))[:100]
            body["capabilities"] = capabilities
    return body

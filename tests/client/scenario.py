"""A client generated from docs/openapi.json (openapi-python-client) drives every resource of a
running service and parses every answer into its generated types. Run by tests/client/run.sh."""

import sys

from integration_manager_client import AuthenticatedClient
from integration_manager_client.api.integrations import (
    create_integration,
    delete_integration,
    get_integration,
    list_integrations,
    update_integration,
)
from integration_manager_client.api.operations import live, ready
from integration_manager_client.api.providers import get_provider, list_providers
from integration_manager_client.api.webhooks import (
    create_webhook,
    delete_webhook,
    get_delivery,
    get_webhook,
    list_deliveries,
    list_webhooks,
    recover_deliveries,
    retry_delivery,
    rotate_webhook_secret,
    test_webhook,
    update_webhook,
)
from integration_manager_client.models import (
    Delivery,
    Integration,
    IntegrationInput,
    ListResponseDelivery,
    ListResponseIntegration,
    ListResponseProvider,
    ListResponseWebhook,
    Provider,
    RecoverInput,
    RecoverReport,
    Webhook,
    WebhookInput,
)


def expect(value, kind, what):
    if not isinstance(value, kind):
        print(f"{what}: expected {kind.__name__}, got {value!r}", file=sys.stderr)
        sys.exit(1)
    return value


def main(base_url: str, token: str) -> None:
    client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)

    live.sync_detailed(client=client)
    ready.sync_detailed(client=client)

    providers = expect(list_providers.sync(client=client, limit=50), ListResponseProvider, "list providers")
    assert providers.items, "the catalog is seeded"
    expect(get_provider.sync("github", client=client), Provider, "get provider")

    created = expect(
        create_integration.sync(
            client=client,
            body=IntegrationInput.from_dict({"providerId": "github", "name": "Acme on GitHub", "config": {"organization": "acme"}}),
        ),
        Integration,
        "create integration",
    )
    # The README's custom integration, written through the generated model.
    custom = IntegrationInput.from_dict(
        {
            "providerId": "custom",
            "name": "Ticketing",
            "customDefinition": {
                "baseUrl": "https://api.example.com/v2",
                "auth": {"type": "api_key", "in": "header", "name": "X-Api-Key"},
                "defaultHeaders": {"Accept": "application/json"},
                "pagination": {"style": "cursor", "cursorParam": "cursor", "nextCursorPath": "meta.next", "limitParam": "limit", "pageSize": 100},
                "entities": [
                    {
                        "name": "ticket",
                        "idField": "id",
                        "updatedAtField": "updated_at",
                        "list": {"method": "GET", "path": "/tickets", "itemsPath": "data"},
                        "get": {"method": "GET", "path": "/tickets/{id}"},
                        "upsert": {"method": "PUT", "path": "/tickets/{id}"},
                        "delete": {"method": "DELETE", "path": "/tickets/{id}"},
                    }
                ],
            },
        }
    )
    custom_created = expect(create_integration.sync(client=client, body=custom), Integration, "create custom integration")
    assert custom_created.custom_definition is not None, "the definition round-trips"
    expect(get_integration.sync(created.id, client=client), Integration, "get integration")
    expect(list_integrations.sync(client=client, limit=10), ListResponseIntegration, "list integrations")
    renamed = IntegrationInput.from_dict({"providerId": "github", "name": "Renamed", "config": {"organization": "acme"}})
    updated = expect(update_integration.sync(created.id, client=client, body=renamed), Integration, "update integration")
    assert updated.name == "Renamed"

    hook = expect(
        create_webhook.sync(client=client, body=WebhookInput.from_dict({"url": "https://hooks.example.com/im", "eventTypes": ["integration.*"]})),
        Webhook,
        "create webhook",
    )
    assert hook.secret, "the secret is shown once"
    expect(get_webhook.sync(hook.id, client=client), Webhook, "get webhook")
    expect(list_webhooks.sync(client=client), ListResponseWebhook, "list webhooks")
    expect(
        update_webhook.sync(hook.id, client=client, body=WebhookInput.from_dict({"url": "https://hooks.example.com/im2"})),
        Webhook,
        "update webhook",
    )
    expect(rotate_webhook_secret.sync(hook.id, client=client), Webhook, "rotate secret")
    tested = expect(test_webhook.sync(hook.id, client=client), Delivery, "test webhook")
    expect(list_deliveries.sync(hook.id, client=client), ListResponseDelivery, "list deliveries")
    expect(get_delivery.sync(hook.id, tested.id, client=client), Delivery, "get delivery")
    expect(retry_delivery.sync(hook.id, tested.id, client=client), Delivery, "retry delivery")
    expect(
        recover_deliveries.sync(hook.id, client=client, body=RecoverInput.from_dict({"since": "2026-01-01T00:00:00Z"})),
        RecoverReport,
        "recover",
    )

    delete_webhook.sync_detailed(hook.id, client=client)
    delete_integration.sync_detailed(created.id, client=client)
    delete_integration.sync_detailed(custom_created.id, client=client)
    print("generated client scenario: every resource parsed into its generated types")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

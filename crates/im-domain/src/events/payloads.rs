//! The `data` of each event, one type per event, with exactly the fields of its schema in
//! `docs/events/`. Each is built from the aggregate it describes, so what an event carries is
//! decided here and not by how the aggregate happens to serialise.

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::common::{IntegrationId, JsonText, TenantId, UserId};
use crate::connection::{Connection, ConnectionId, ConnectionStatus};
use crate::custom::CustomApiDefinition;
use crate::error::DomainError;
use crate::events::EventData;
use crate::integration::{Integration, IntegrationStatus};
use crate::provider::{AuthMode, ProviderId};
use crate::webhooks::delivery::Delivery;
use crate::webhooks::endpoint::{Webhook, without_credentials};

/// `data` of `integration.created`, `integration.updated` and `integration.deleted`: the
/// integration as the API returns it (it holds no secret values, only references). It borrows
/// the integration: an event's data is written once, so nothing is copied to write it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationEventData<'a> {
    pub id: IntegrationId,
    pub tenant_id: &'a TenantId,
    pub provider_id: &'a ProviderId,
    pub name: &'a str,
    pub description: &'a str,
    pub status: IntegrationStatus,
    pub config: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_definition: Option<&'a CustomApiDefinition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2_app: Option<OAuth2AppData<'a>>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: &'a UserId,
    pub updated_by: &'a UserId,
}

impl IntegrationEventData<'_> {
    /// The event data of `integration`.
    ///
    /// # Errors
    /// `Unexpected` when it cannot be written (a defect).
    pub fn data(integration: &Integration) -> Result<EventData, DomainError> {
        EventData::of(&IntegrationEventData::from(integration)).map_err(|e| DomainError::Unexpected(e.into()))
    }

    /// The event data of `integration` and its JSON text ([`JsonText::encode`]), written once
    /// when they are the same text: when it has no OAuth app (whose data here leaves out where
    /// its secret is kept). The fields are the same, in the same order, otherwise.
    ///
    /// # Errors
    /// `Unexpected` when either cannot be written (a defect).
    pub fn with_text(integration: &Integration) -> Result<(EventData, JsonText<Integration>), DomainError> {
        let data = Self::data(integration)?;
        let text = match integration.oauth2_app {
            None => JsonText::stored(data.as_str().to_owned()),
            Some(_) => JsonText::encode(integration)?,
        };
        Ok((data, text))
    }
}

/// An integration's OAuth app as events show it: the client id and the hint, never the secret
/// or where it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2AppData<'a> {
    pub client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_hint: Option<&'a str>,
}

impl<'a> From<&'a Integration> for IntegrationEventData<'a> {
    fn from(i: &'a Integration) -> Self {
        Self {
            id: i.id,
            tenant_id: &i.tenant_id,
            provider_id: &i.provider_id,
            name: &i.name,
            description: &i.description,
            status: i.status,
            config: &i.config,
            custom_definition: i.custom_definition.as_ref(),
            oauth2_app: i
                .oauth2_app
                .as_ref()
                .map(|app| OAuth2AppData { client_id: &app.client_id, client_secret_hint: app.client_secret_hint.as_deref() }),
            created_at: i.created_at,
            updated_at: i.updated_at,
            created_by: &i.created_by,
            updated_by: &i.updated_by,
        }
    }
}

/// `data` of `integration.connection.created`, `.deleted` and `.failed`: the connection as the
/// API returns it (hints only, never a credential).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionEventData {
    pub id: ConnectionId,
    pub tenant_id: TenantId,
    pub integration_id: IntegrationId,
    pub name: String,
    pub auth_mode: AuthMode,
    pub status: ConnectionStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_four: Option<String>,
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub token_expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: UserId,
    pub updated_by: UserId,
}

impl From<&Connection> for ConnectionEventData {
    fn from(c: &Connection) -> Self {
        Self {
            id: c.id,
            tenant_id: c.tenant_id.clone(),
            integration_id: c.integration_id,
            name: c.name.clone(),
            auth_mode: c.auth_mode,
            status: c.status,
            status_reason: c.status_reason.clone(),
            last_four: c.hints.last_four.clone(),
            scopes: c.hints.scopes.clone(),
            token_expires_at: c.hints.token_expires_at,
            created_at: c.created_at,
            updated_at: c.updated_at,
            created_by: c.created_by.clone(),
            updated_by: c.updated_by.clone(),
        }
    }
}

/// `data` of `webhook.delivered` and `webhook.failed`: the outcome of a delivery and its last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryOutcomeData {
    pub delivery_id: String,
    pub webhook_id: String,
    pub message_id: String,
    pub event_type: String,
    pub status: &'static str,
    pub attempts: usize,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
}

impl From<&Delivery> for DeliveryOutcomeData {
    fn from(d: &Delivery) -> Self {
        let last = d.attempts.last();
        Self {
            delivery_id: d.id.to_string(),
            webhook_id: d.webhook_id.to_string(),
            message_id: d.message_id.clone(),
            event_type: d.event_type.clone(),
            status: d.status.as_str(),
            attempts: d.attempts.len(),
            last_status_code: last.and_then(|a| a.status_code),
            last_error: last.and_then(|a| a.error.clone()),
        }
    }
}

/// `data` of `webhook.endpoint.disabled`: which endpoint, where it pointed (without
/// credentials in the URL) and why the service disabled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDisabledData {
    pub webhook_id: String,
    pub url: String,
    pub reason: String,
}

impl EndpointDisabledData {
    pub fn new(webhook: &Webhook, reason: &str) -> Self {
        Self { webhook_id: webhook.id.to_string(), url: without_credentials(&webhook.url), reason: reason.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn integration() -> Integration {
        Integration {
            id: IntegrationId(Uuid::from_u128(7)),
            tenant_id: TenantId::new("acme").unwrap(),
            provider_id: ProviderId::new("github").unwrap(),
            name: "Repos".into(),
            description: "".into(),
            status: IntegrationStatus::Active,
            config: json!({"org": "acme", "token": {"secretRef": "s-1"}}).as_object().unwrap().clone(),
            custom_definition: None,
            oauth2_app: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(90),
            created_by: UserId::new("alice").unwrap(),
            updated_by: UserId::new("bob").unwrap(),
        }
    }

    #[test]
    fn integration_data_has_exactly_the_schema_fields() {
        let data = serde_json::to_value(IntegrationEventData::from(&integration())).unwrap();
        assert_eq!(
            data,
            json!({
                "id": Uuid::from_u128(7).to_string(),
                "tenantId": "acme",
                "providerId": "github",
                "name": "Repos",
                "description": "",
                "status": "active",
                "config": {"org": "acme", "token": {"secretRef": "s-1"}},
                "createdAt": "1970-01-01T00:00:00Z",
                "updatedAt": "1970-01-01T00:01:30Z",
                "createdBy": "alice",
                "updatedBy": "bob",
            })
        );
    }

    #[test]
    fn integration_data_serialises_like_the_stored_integration() {
        let i = integration();
        assert_eq!(serde_json::to_value(IntegrationEventData::from(&i)).unwrap(), serde_json::to_value(&i).unwrap());
    }

    #[test]
    fn an_integrations_data_and_text_are_each_what_they_would_be_written_alone() {
        let mut custom = integration();
        custom.custom_definition = Some(
            serde_json::from_value(json!({
                "baseUrl": "https://api.example.com/v2",
                "auth": {"type": "bearer"},
                "defaultHeaders": {"Accept": "application/json"},
                "pagination": {"style": "offset", "offsetParam": "offset", "limitParam": "limit", "pageSize": 100},
                "entities": [{"name": "ticket", "idField": "id", "list": {"method": "GET", "path": "/tickets", "itemsPath": "data"}}]
            }))
            .unwrap(),
        );
        let mut app = integration();
        app.oauth2_app = Some(crate::integration::IntegrationOAuth2App {
            client_id: "client-1".into(),
            client_secret: crate::secrets::SecretRef {
                secret_name: crate::secrets::SecretName::new(&TenantId::new("acme").unwrap(), "oauth2-app", "7"),
                version: "3".into(),
            },
            client_secret_hint: Some("…wxyz".into()),
        });
        for i in [integration(), custom, app] {
            let (data, text) = IntegrationEventData::with_text(&i).unwrap();
            assert_eq!(data.as_str(), serde_json::to_string(&IntegrationEventData::from(&i)).unwrap());
            assert_eq!(text.as_str(), JsonText::encode(&i).unwrap().as_str(), "the text is not the integration's own");
        }
    }
}

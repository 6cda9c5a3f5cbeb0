//! Integrations: a tenant's instance of a catalog provider or of its own custom API definition.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::common::{IntegrationId, TenantId, UserId, json_len, validate_text};
use crate::custom::CustomApiDefinition;
use crate::error::{DomainError, Violations};
use crate::provider::ProviderId;
use crate::secrets::SecretRef;
use crate::webhooks::endpoint::UrlPolicy;

/// Largest `config` accepted, in bytes of JSON.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Longest integration name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;

/// Lifecycle state of an integration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationStatus {
    Active,
    Inactive,
    /// Set by the service when the integration cannot work (for example its credentials were refused).
    Error,
}

impl IntegrationStatus {
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_value(Value::String(value.to_owned())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationStatus::Active => "active",
            IntegrationStatus::Inactive => "inactive",
            IntegrationStatus::Error => "error",
        }
    }
}

/// What a tenant states about an integration when it creates or replaces one.
#[derive(Debug, Clone, PartialEq)]
pub struct IntegrationSpec {
    pub provider_id: ProviderId,
    pub name: String,
    pub description: String,
    /// `None`: `active` for a new integration, unchanged for an update.
    pub status: Option<IntegrationStatus>,
    pub config: Map<String, Value>,
    pub custom_definition: Option<CustomApiDefinition>,
    /// The tenant's OAuth app at the provider; `None` on update keeps the current one.
    pub oauth2_app: Option<OAuth2AppSpec>,
}

/// Longest OAuth client id, in characters.
pub const MAX_CLIENT_ID_CHARS: usize = 256;
/// Longest OAuth client secret, in characters.
pub const MAX_CLIENT_SECRET_CHARS: usize = 1024;

/// The tenant's OAuth app as stated on an integration. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuth2AppSpec {
    pub client_id: String,
    /// `None`: keep the stored secret (only with the stored app's client id).
    pub client_secret: Option<String>,
}

impl std::fmt::Debug for OAuth2AppSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2AppSpec").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl OAuth2AppSpec {
    /// Checks the values, given the app stored now (`Some(None)` on create; `None` when not known
    /// yet, which lets an omitted secret pass).
    pub(crate) fn check(&self, v: &mut Violations, stored: Option<Option<&IntegrationOAuth2App>>) {
        let well_formed = |text: &str, max: usize| !text.is_empty() && text.chars().count() <= max && !text.chars().any(char::is_control);
        if !well_formed(&self.client_id, MAX_CLIENT_ID_CHARS) {
            v.invalid("oauth2App.clientId", format!("must be 1 to {MAX_CLIENT_ID_CHARS} characters without control characters"));
        }
        match &self.client_secret {
            Some(secret) if !well_formed(secret, MAX_CLIENT_SECRET_CHARS) => {
                v.invalid("oauth2App.clientSecret", format!("must be 1 to {MAX_CLIENT_SECRET_CHARS} characters without control characters"))
            }
            Some(_) => {}
            None if stored.is_none_or(|app| app.is_some_and(|app| app.client_id == self.client_id)) => {}
            None => v.invalid(
                "oauth2App.clientSecret",
                "is required for a new OAuth app or a changed clientId (omit it only to keep the stored app's secret)",
            ),
        }
    }
}

/// The tenant's OAuth app as the integration keeps it: the client id, and where the client
/// secret is in the secret store (with its last four characters when it is long enough).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationOAuth2App {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_hint: Option<String>,
    pub client_secret: SecretRef,
}

impl IntegrationSpec {
    /// Checks the rules that need no provider: text lengths, the custom definition, sizes.
    /// The provider-dependent rules (existence, config schema) are the service's.
    pub(crate) fn violations(&self, previous_status: Option<IntegrationStatus>, policy: &UrlPolicy) -> Violations {
        let mut v = Violations::new();
        v.check("name", validate_text(&self.name, 1, MAX_NAME_CHARS));
        v.check("description", validate_text(&self.description, 0, MAX_DESCRIPTION_CHARS));
        if self.status == Some(IntegrationStatus::Error) && previous_status != Some(IntegrationStatus::Error) {
            v.invalid("status", "'error' is set by the service; use 'active' or 'inactive'");
        }
        if json_len(&self.config) > MAX_CONFIG_BYTES {
            v.invalid("config", format!("must be at most {MAX_CONFIG_BYTES} bytes"));
        }
        match (&self.custom_definition, self.provider_id.is_custom()) {
            (Some(definition), true) => {
                if let Err(DomainError::Validation(nested)) = definition.validate_with(policy) {
                    v.extend_nested("customDefinition", nested);
                }
            }
            (None, true) => v.invalid("customDefinition", "is required when providerId is 'custom'"),
            (Some(_), false) => v.invalid("customDefinition", "is only allowed when providerId is 'custom'"),
            (None, false) => {}
        }
        v
    }
}

/// An integration as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Integration {
    pub id: IntegrationId,
    pub tenant_id: TenantId,
    pub provider_id: ProviderId,
    pub name: String,
    pub description: String,
    pub status: IntegrationStatus,
    pub config: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_definition: Option<CustomApiDefinition>,
    /// The tenant's OAuth app at the provider (authorization code connections use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2_app: Option<IntegrationOAuth2App>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub created_by: UserId,
    pub updated_by: UserId,
}

/// Filters of an integration listing; all given filters must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntegrationFilter {
    pub provider_id: Option<ProviderId>,
    pub status: Option<IntegrationStatus>,
}

impl IntegrationFilter {
    pub fn matches(&self, integration: &Integration) -> bool {
        self.provider_id.as_ref().is_none_or(|p| *p == integration.provider_id) && self.status.is_none_or(|s| s == integration.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::SecretName;

    fn fields(spec: &OAuth2AppSpec, stored: Option<Option<&IntegrationOAuth2App>>) -> Vec<String> {
        let mut v = Violations::new();
        spec.check(&mut v, stored);
        match v.into_error() {
            DomainError::Validation(found) => found.into_iter().map(|f| f.field).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn an_app_needs_its_secret_unless_the_stored_app_has_the_same_client_id() {
        let stored = IntegrationOAuth2App {
            client_id: "app-1".into(),
            client_secret_hint: None,
            client_secret: SecretRef {
                secret_name: SecretName::new(&TenantId::new("t1").unwrap(), "oauth2-app", "i"),
                version: "1".into(),
            },
        };
        let keep = OAuth2AppSpec { client_id: "app-1".into(), client_secret: None };
        let other = OAuth2AppSpec { client_id: "app-2".into(), client_secret: None };
        let given = OAuth2AppSpec { client_id: "app-2".into(), client_secret: Some("s3cret-value-0123".into()) };
        assert!(fields(&keep, Some(Some(&stored))).is_empty(), "the same client id keeps the stored secret");
        assert_eq!(fields(&other, Some(Some(&stored))), ["oauth2App.clientSecret"], "a changed client id needs a secret");
        assert_eq!(fields(&keep, Some(None)), ["oauth2App.clientSecret"], "a new app needs a secret");
        assert!(fields(&keep, None).is_empty(), "not known yet: left to the write");
        assert!(fields(&given, Some(None)).is_empty());
        let bad = OAuth2AppSpec { client_id: String::new(), client_secret: Some("tab\there".into()) };
        assert_eq!(fields(&bad, Some(None)), ["oauth2App.clientId", "oauth2App.clientSecret"]);
        assert!(!format!("{given:?}").contains("s3cret"), "Debug hides the secret");
    }
}

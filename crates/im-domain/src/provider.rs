//! The provider catalog: system-wide descriptions of the third-party tools tenants can connect.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::common::{json_len, validate_text, validate_url};
use std::collections::BTreeMap;

use crate::custom::{
    EntityDefinition, HttpMethod, Pagination, RequestTemplate, entity_violations, header_violations, pagination_violations,
};
use crate::error::{DomainError, FieldViolation, Violations};
use crate::schema::compile_config_schema;

/// The reserved provider id of tenant-defined custom API integrations.
pub const CUSTOM_PROVIDER_ID: &str = "custom";

fn validate_slug(value: &str, what: &str) -> Result<(), FieldViolation> {
    let ok = (2..=64).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FieldViolation::invalid(
            "",
            format!("{what} must be 2 to 64 characters of lowercase letters, digits and '-', starting with a letter or digit"),
        ))
    }
}

crate::common::checked_string!(
    /// A provider's id: a lowercase slug such as `github`; `custom` names custom API integrations.
    ProviderId,
    |v| validate_slug(v, "a provider id")
);
crate::common::checked_string!(
    /// A catalog category such as `source-control`: the catalog's partition key.
    Category,
    |v| validate_slug(v, "a category")
);

impl ProviderId {
    pub fn is_custom(&self) -> bool {
        self.0 == CUSTOM_PROVIDER_ID
    }
}

/// How a connection authenticates API calls; a provider lists the modes it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// An API key in a header or a query parameter (where: the provider's `apiKey`).
    ApiKey,
    /// `Authorization: Bearer <token>` with a token the user created (a personal access token).
    Bearer,
    /// HTTP basic authentication.
    Basic,
    /// OAuth 2.0 client credentials grant (needs a token URL).
    Oauth2ClientCredentials,
    /// OAuth 2.0 authorization code grant with PKCE (needs authorization and token URLs).
    Oauth2AuthorizationCode,
}

impl AuthMode {
    pub const ALL: [AuthMode; 5] =
        [AuthMode::ApiKey, AuthMode::Bearer, AuthMode::Basic, AuthMode::Oauth2ClientCredentials, AuthMode::Oauth2AuthorizationCode];

    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_value(Value::String(value.to_owned())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::ApiKey => "api_key",
            AuthMode::Bearer => "bearer",
            AuthMode::Basic => "basic",
            AuthMode::Oauth2ClientCredentials => "oauth2_client_credentials",
            AuthMode::Oauth2AuthorizationCode => "oauth2_authorization_code",
        }
    }

    pub fn is_oauth2(self) -> bool {
        matches!(self, AuthMode::Oauth2ClientCredentials | AuthMode::Oauth2AuthorizationCode)
    }
}

/// Where a provider expects an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyPlacement {
    #[serde(rename = "in")]
    pub location: crate::custom::ApiKeyLocation,
    /// The header or query parameter name.
    pub name: String,
    /// Text sent before the key in a header value (PagerDuty `Token token=`, Opsgenie `GenieKey `).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

impl ApiKeyPlacement {
    /// The header or parameter value that carries `key`.
    pub fn value(&self, key: &str) -> String {
        format!("{}{key}", self.prefix.as_deref().unwrap_or_default())
    }

    /// The problems of the placement, paths relative to it.
    pub(crate) fn violations(&self) -> Violations {
        let mut v = Violations::new();
        if self.name.is_empty() || self.name.len() > 100 || !self.name.chars().all(|c| c.is_ascii_graphic()) {
            v.invalid("name", "must be 1 to 100 visible ASCII characters");
        }
        match &self.prefix {
            Some(_) if self.location != crate::custom::ApiKeyLocation::Header => v.invalid("prefix", "is only used with in: header"),
            Some(prefix) if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(|c| c == ' ' || c.is_ascii_graphic()) => {
                v.invalid("prefix", "must be 1 to 64 visible ASCII characters or spaces")
            }
            _ => {}
        }
        v
    }
}

/// What a provider can do beyond plain API calls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capabilities {
    /// The provider can push events to us.
    #[serde(default)]
    pub webhooks: bool,
    /// Entities (snake_case names) that sync tasks can exchange with the provider.
    #[serde(default)]
    pub sync_entities: Vec<String>,
}

/// Everything a catalog administrator states about a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSpec {
    pub id: ProviderId,
    pub name: String,
    pub category: Category,
    pub description: String,
    /// The modes a connection to this provider may use (at least one, no duplicates).
    pub auth_modes: Vec<AuthMode>,
    /// Where the API key goes; required when `auth_modes` has `api_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeyPlacement>,
    pub authorization_url: Option<String>,
    pub token_url: Option<String>,
    pub default_scopes: Vec<String>,
    pub api_base_url: String,
    pub docs_url: String,
    /// JSON Schema of the settings an integration of this provider needs (its `config`).
    pub config_schema: Value,
    pub capabilities: Capabilities,
    /// The request a connection test sends, relative to `api_base_url` (GitHub: `GET /user`):
    /// a 2xx answer means the credentials work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationRequest>,
    /// Headers sent with every request to the provider's API (an API version); never `Authorization`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_headers: BTreeMap<String, String>,
    /// Query parameters sent with every request to the provider's API; `{name}` placeholders in a
    /// value take the integration's configuration value of that name (Trello's public `key`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_query: BTreeMap<String, String>,
    /// How the list requests of `entities` page; required when there are entities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination: Option<Pagination>,
    /// Entities sync tasks can read and write, in the custom-definition format; each is listed in
    /// `capabilities.syncEntities`. Path placeholders other than `{id}` (`{owner}`) are filled
    /// by the caller, from the integration's configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<EntityDefinition>,
}

/// The request that tells whether a connection's credentials work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerificationRequest {
    /// `GET` or `POST`.
    pub method: HttpMethod,
    /// Relative to the API base URL; `{placeholders}` are filled from the integration's config.
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    /// A JSON body for `POST` (a GraphQL query), at most 4096 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// What a 2xx answer's body must hold for the credentials to count as working, for APIs
    /// that answer 200 to refused credentials (Slack: `{"ok": false, "error": "invalid_auth"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<BodyExpectation>,
}

/// A value a JSON answer must hold: the value at `pointer` (RFC 6901, `/ok`) equals `equals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodyExpectation {
    pub pointer: String,
    pub equals: Value,
}

impl BodyExpectation {
    /// Whether `body` holds the expected value.
    pub fn holds(&self, body: Option<&Value>) -> bool {
        body.and_then(|b| b.pointer(&self.pointer)) == Some(&self.equals)
    }

    fn violations(&self) -> Violations {
        let mut v = Violations::new();
        if !self.pointer.starts_with('/') || self.pointer.len() > 256 || self.pointer.chars().any(char::is_control) {
            v.invalid("pointer", "must be a JSON pointer such as /ok, at most 256 characters");
        }
        if self.equals.is_array() || self.equals.is_object() || json_len(&self.equals) > 256 {
            v.invalid("equals", "must be a string, number, boolean or null of at most 256 bytes of JSON");
        }
        v
    }
}

impl VerificationRequest {
    /// The request as the provider client takes it.
    pub fn template(&self) -> RequestTemplate {
        RequestTemplate { method: self.method, path: self.path.clone(), query: self.query.clone(), items_path: None }
    }

    fn violations(&self) -> Violations {
        let mut v = self.template().violations(&[HttpMethod::Get, HttpMethod::Post], false, false);
        match &self.body {
            Some(_) if self.method != HttpMethod::Post => v.invalid("body", "is only sent with POST"),
            Some(body) if json_len(body) > 4096 => v.invalid("body", "must be at most 4096 bytes of JSON"),
            _ => {}
        }
        if let Some(expect) = &self.expect {
            v.extend_nested("expect", expect.violations().into_vec());
        }
        v
    }
}

/// Most entities a provider may list for sync.
pub const MAX_SYNC_ENTITIES: usize = 100;

impl ProviderSpec {
    /// Checks every rule at once.
    ///
    /// # Errors
    /// [`DomainError::Validation`] listing each offending field.
    pub fn validate(&self) -> Result<(), DomainError> {
        self.validate_with(false)
    }

    /// [`ProviderSpec::validate`], with `http` OAuth2 URLs (`authorizationUrl`, `tokenUrl`)
    /// allowed when `allow_http` (the destination policy of provider calls allows them).
    ///
    /// # Errors
    /// `Validation` listing every offending field.
    pub fn validate_with(&self, allow_http: bool) -> Result<(), DomainError> {
        let mut v = Violations::new();
        if self.id.is_custom() {
            v.invalid("id", format!("'{CUSTOM_PROVIDER_ID}' is reserved for custom API integrations"));
        }
        v.check("name", validate_text(&self.name, 1, 100));
        v.check("description", validate_text(&self.description, 0, 1000));
        if self.auth_modes.is_empty() {
            v.invalid("authModes", "must list at least one mode");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, mode) in self.auth_modes.iter().enumerate() {
            if !seen.insert(*mode) {
                v.invalid(format!("authModes[{i}]"), format!("'{}' is listed twice", mode.as_str()));
            }
        }
        let supports = |mode| self.auth_modes.contains(&mode);
        match (&self.api_key, supports(AuthMode::ApiKey)) {
            (None, true) => v.invalid("apiKey", "is required when authModes has api_key"),
            (Some(placement), true) => v.extend_nested("apiKey", placement.violations().into_vec()),
            (Some(_), false) => v.invalid("apiKey", "is only allowed when authModes has api_key"),
            (None, false) => {}
        }
        let code = supports(AuthMode::Oauth2AuthorizationCode);
        match (code, &self.authorization_url) {
            (true, None) => v.invalid("authorizationUrl", "is required when authModes has oauth2_authorization_code"),
            (true, Some(url)) => {
                v.check("authorizationUrl", validate_url(url, allow_http));
            }
            (false, Some(_)) => v.invalid("authorizationUrl", "is only allowed when authModes has oauth2_authorization_code"),
            (false, None) => {}
        }
        let needs_token_url = self.auth_modes.iter().any(|m| m.is_oauth2());
        match (&self.token_url, needs_token_url) {
            (None, true) => v.invalid("tokenUrl", "is required when authModes has an oauth2 mode"),
            (Some(url), true) => {
                v.check("tokenUrl", validate_url(url, allow_http));
            }
            (Some(_), false) => v.invalid("tokenUrl", "is only allowed when authModes has an oauth2 mode"),
            (None, false) => {}
        }
        if self.default_scopes.len() > 100 {
            v.invalid("defaultScopes", "must have at most 100 scopes");
        }
        for (i, scope) in self.default_scopes.iter().enumerate() {
            if !crate::connection::is_scope(scope) {
                v.invalid(format!("defaultScopes[{i}]"), "must be 1 to 200 characters without spaces");
            }
        }
        v.check("apiBaseUrl", validate_url(&self.api_base_url, false));
        v.check("docsUrl", validate_url(&self.docs_url, false));
        if let Err(violations) = compile_config_schema(&self.config_schema) {
            v.extend_nested("configSchema", violations);
        }
        if self.capabilities.sync_entities.len() > MAX_SYNC_ENTITIES {
            v.invalid("capabilities.syncEntities", format!("must have at most {MAX_SYNC_ENTITIES} entities"));
        }
        for (i, entity) in self.capabilities.sync_entities.iter().enumerate() {
            if !is_entity_name(entity) {
                v.invalid(format!("capabilities.syncEntities[{i}]"), "must be a snake_case name of 1 to 64 characters");
            }
        }
        if let Some(verification) = &self.verification {
            v.extend_nested("verification", verification.violations().into_vec());
        }
        header_violations(&self.default_headers, &mut v);
        default_query_violations(&self.default_query, &mut v);
        if let Some(pagination) = &self.pagination {
            pagination_violations(pagination, &mut v);
        } else if !self.entities.is_empty() {
            v.invalid("pagination", "is required when the provider describes entities");
        }
        if self.entities.len() > MAX_SYNC_ENTITIES {
            v.invalid("entities", format!("must describe at most {MAX_SYNC_ENTITIES} entities"));
        }
        entity_violations(&self.entities, &mut v);
        for (i, entity) in self.entities.iter().enumerate() {
            if !self.capabilities.sync_entities.contains(&entity.name) {
                v.invalid(format!("entities[{i}].name"), "must be listed in capabilities.syncEntities");
            }
        }
        v.finish(|| ())
    }
}

/// The problems of a provider's default query, each under `defaultQuery`.
fn default_query_violations(query: &BTreeMap<String, String>, v: &mut Violations) {
    if query.len() > 20 {
        v.invalid("defaultQuery", "must have at most 20 parameters");
    }
    for (name, value) in query {
        let placeholders_ok = crate::custom::placeholders(value).is_ok();
        if !crate::custom::is_param_name(name) || value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control) {
            v.invalid(format!("defaultQuery.{name}"), "must be a parameter name with a value of 1 to 1024 characters");
        } else if !placeholders_ok {
            v.invalid(format!("defaultQuery.{name}"), "placeholders must be configuration names like {apiKey}");
        }
    }
}

/// `snake_case`, 1 to 64 characters, starting with a letter.
pub fn is_entity_name(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A catalog entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provider {
    #[serde(flatten)]
    pub spec: ProviderSpec,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Provider {
    pub fn id(&self) -> &ProviderId {
        &self.spec.id
    }
}

/// Filters of a catalog listing; all given filters must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderFilter {
    pub category: Option<Category>,
    pub auth_mode: Option<AuthMode>,
    /// Case-insensitive text searched in the id, name and description.
    pub query: Option<String>,
}

impl ProviderFilter {
    /// Whether a provider matches; stores may use this to filter, and tests to check them.
    pub fn matches(&self, provider: &ProviderSpec) -> bool {
        self.category.as_ref().is_none_or(|c| *c == provider.category)
            && self.auth_mode.is_none_or(|m| provider.auth_modes.contains(&m))
            && self.query.as_ref().is_none_or(|q| {
                let q = q.to_lowercase();
                provider.id.as_str().contains(&q)
                    || provider.name.to_lowercase().contains(&q)
                    || provider.description.to_lowercase().contains(&q)
            })
    }
}

/// The outcome of seeding the catalog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Providers written because they had never been seeded.
    pub inserted: usize,
    /// Providers left alone because they were seeded before (and may have been edited or deleted since).
    pub skipped: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn spec() -> ProviderSpec {
        ProviderSpec {
            id: ProviderId::new("github").unwrap(),
            name: "GitHub".into(),
            category: Category::new("source-control").unwrap(),
            description: "Code hosting".into(),
            auth_modes: vec![AuthMode::Oauth2AuthorizationCode, AuthMode::Bearer],
            api_key: None,
            authorization_url: Some("https://github.com/login/oauth/authorize".into()),
            token_url: Some("https://github.com/login/oauth/access_token".into()),
            default_scopes: vec!["repo".into()],
            api_base_url: "https://api.github.com".into(),
            docs_url: "https://docs.github.com/en/rest".into(),
            config_schema: json!({"type": "object", "properties": {"organization": {"type": "string"}}}),
            capabilities: Capabilities { webhooks: true, sync_entities: vec!["issue".into()] },
            verification: Some(VerificationRequest {
                method: HttpMethod::Get,
                path: "/user".into(),
                query: BTreeMap::new(),
                body: None,
                expect: None,
            }),
            default_headers: BTreeMap::from([("X-GitHub-Api-Version".into(), "2022-11-28".into())]),
            default_query: BTreeMap::new(),
            pagination: Some(Pagination::Link { limit_param: Some("per_page".into()), page_size: Some(100) }),
            entities: vec![
                serde_json::from_value(json!({
                    "name": "issue", "idField": "number", "updatedAtField": "updated_at",
                    "list": {"method": "GET", "path": "/repos/{owner}/{repo}/issues", "query": {"state": "all"}},
                    "get": {"method": "GET", "path": "/repos/{owner}/{repo}/issues/{id}"}
                }))
                .unwrap(),
            ],
        }
    }

    #[test]
    fn valid_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn every_violation_is_listed() {
        let mut s = spec();
        s.name = String::new();
        s.authorization_url = None;
        s.api_base_url = "http://insecure".into();
        s.config_schema = json!({"type": 12});
        s.capabilities.sync_entities = vec!["Bad Name".into()];
        let Err(DomainError::Validation(v)) = s.validate() else { panic!("expected validation error") };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        for f in ["name", "authorizationUrl", "apiBaseUrl", "configSchema", "capabilities.syncEntities[0]"] {
            assert!(fields.iter().any(|x| x.starts_with(f)), "{f} missing in {fields:?}");
        }
    }

    #[test]
    fn verification_pagination_and_entities_are_checked() {
        let mut s = spec();
        s.verification.as_mut().unwrap().method = HttpMethod::Delete;
        s.verification.as_mut().unwrap().body = Some(json!({"query": "{ viewer { id } }"}));
        s.default_headers.insert("Authorization".into(), "x".into());
        s.entities[0].list.path = "repos".into();
        s.entities.push(s.entities[0].clone());
        s.entities[1].name = "pull_request".into();
        let Err(DomainError::Validation(v)) = s.validate() else { panic!("expected validation error") };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        for f in ["verification.method", "verification.body", "defaultHeaders.Authorization", "entities[0].list.path", "entities[1].name"] {
            assert!(fields.contains(&f), "{f} missing in {fields:?}");
        }
        let mut s = spec();
        s.pagination = None;
        let Err(DomainError::Validation(v)) = s.validate() else { panic!("expected validation error") };
        assert_eq!(v[0].field, "pagination");
        s.entities.clear();
        s.verification = None;
        s.validate().unwrap();
    }

    #[test]
    fn key_prefixes_default_queries_and_body_expectations_are_checked() {
        let mut s = spec();
        s.auth_modes.push(AuthMode::ApiKey);
        s.api_key = Some(ApiKeyPlacement {
            location: crate::custom::ApiKeyLocation::Header,
            name: "Authorization".into(),
            prefix: Some("Token token=".into()),
        });
        s.default_query = BTreeMap::from([("key".into(), "{apiKey}".into())]);
        s.verification.as_mut().unwrap().expect = Some(BodyExpectation { pointer: "/ok".into(), equals: json!(true) });
        s.validate().unwrap();
        assert_eq!(s.api_key.as_ref().unwrap().value("k3y"), "Token token=k3y");

        s.api_key.as_mut().unwrap().location = crate::custom::ApiKeyLocation::Query;
        s.default_query.insert("bad".into(), "{unclosed".into());
        s.verification.as_mut().unwrap().expect = Some(BodyExpectation { pointer: "ok".into(), equals: json!({"a": 1}) });
        let Err(DomainError::Validation(v)) = s.validate() else { panic!("expected validation error") };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["apiKey.prefix", "verification.expect.pointer", "verification.expect.equals", "defaultQuery.bad"]);

        let expect = BodyExpectation { pointer: "/ok".into(), equals: json!(true) };
        assert!(expect.holds(Some(&json!({"ok": true, "user": "u"}))));
        assert!(!expect.holds(Some(&json!({"ok": false, "error": "invalid_auth"}))));
        assert!(!expect.holds(Some(&json!({"ok": "true"}))));
        assert!(!expect.holds(None));
    }

    #[test]
    fn slugs() {
        assert!(ProviderId::new("azure-devops").is_ok());
        assert!(ProviderId::new("Azure").is_err());
        assert!(ProviderId::new("-x").is_err());
        assert!(ProviderId::new("x").is_err());
    }

    #[test]
    fn custom_is_reserved() {
        let mut s = spec();
        s.id = ProviderId::new("custom").unwrap();
        assert!(s.validate().is_err());
    }

    #[test]
    fn filter_matches() {
        let s = spec();
        assert!(ProviderFilter { query: Some("HUB".into()), ..Default::default() }.matches(&s));
        assert!(!ProviderFilter { auth_mode: Some(AuthMode::ApiKey), ..Default::default() }.matches(&s));
        assert!(
            ProviderFilter { auth_mode: Some(AuthMode::Bearer), ..Default::default() }.matches(&s),
            "a filter matches any supported mode"
        );
    }
}

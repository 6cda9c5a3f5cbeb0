//! Testing a connection: one verification request through the [`ProviderClient`], with the
//! connection's credentials, summed up as a [`ConnectionTestOutcome`].
//!
//! A catalog provider is tested with its own verification request (GitHub: `GET /user`); a
//! custom definition with its first entity's list request asking for the smallest page.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::Value;

use crate::auth::Caller;
use crate::common::{Clock, IntegrationId};
use crate::custom::{CustomApiDefinition, Pagination};
use crate::error::DomainError;
use crate::provider::{BodyExpectation, ProviderSpec};
use crate::provider_client::{ApiTarget, CredentialSource, ProviderClient, ProviderRequest};

/// What a connection test sends, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub target: ApiTarget,
    pub request: ProviderRequest,
    /// What a 2xx answer's body must also hold (Slack's `/ok` must be `true`).
    pub expect: Option<BodyExpectation>,
}

/// The outcome of a connection test, as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionTestOutcome {
    /// The provider accepted the credentials (a 2xx answer).
    pub ok: bool,
    /// The provider's last HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// Why the test failed; never a credential or an internal address.
    pub error: Option<String>,
}

/// Tests a connection of an integration for a caller: what `POST
/// /api/v1/integrations/{id}/connections/{connectionId}/test` needs. The connection service
/// implements it: it checks the caller's role, reads the integration (in the caller's tenant)
/// and its catalog provider or custom definition, builds the [`Verification`], runs
/// [`test_connection`] with the connection's [`CredentialSource`], and sets the connection's
/// status from the outcome. Its future need not be `Send`: it runs on the worker that serves
/// the request.
#[async_trait(?Send)]
pub trait ConnectionTester: Send + Sync {
    /// # Errors
    /// - MUST return [`DomainError::NotFound`] for an integration or connection the caller's
    ///   tenant does not have.
    /// - MUST return [`DomainError::Forbidden`] when the caller may not change the connection.
    /// - A failed test is an `Ok` outcome with `ok: false`, never an error.
    async fn test(&self, caller: &Caller, integration: &IntegrationId, connection: &str) -> Result<ConnectionTestOutcome, DomainError>;
}

/// Fills the `{name}` placeholders of `template` (a base URL such as
/// `https://{subdomain}.zendesk.com/api/v2`, a default query value) with the integration's
/// configuration values of the same name; `field` names the template in errors.
pub(crate) fn fill_from_config(template: &str, config: &Value, field: &str) -> Result<String, DomainError> {
    crate::common::fill_placeholders(template, |name| {
        config
            .get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
            .ok_or_else(|| {
                DomainError::invalid(format!("config.{name}"), "is needed to reach the provider's API: letters, digits, '-', '_' or '.'")
            })
    })
    .map_err(|e| e.unwrap_or_else(|| DomainError::invalid(field, "has an unbalanced '{'")))
}

impl Verification {
    /// The catalog provider's verification request, against its API base URL with
    /// placeholders filled from the integration's `config`.
    ///
    /// # Errors
    /// [`DomainError::Conflict`] when the provider has no verification request;
    /// [`DomainError::Validation`] when `config` lacks a value the base URL needs.
    pub fn for_provider(spec: &ProviderSpec, config: &Value) -> Result<Self, DomainError> {
        let Some(verification) = &spec.verification else {
            return Err(DomainError::Conflict(format!("provider '{}' has no verification request", spec.id)));
        };
        // Path placeholders take the configuration's text values of the same name (the client
        // encodes each as one path segment).
        let path_params = config
            .as_object()
            .map(|c| c.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect())
            .unwrap_or_default();
        let extra_query = spec
            .default_query
            .iter()
            .map(|(name, value)| Ok((name.clone(), fill_from_config(value, config, &format!("defaultQuery.{name}"))?)))
            .collect::<Result<_, DomainError>>()?;
        Ok(Self {
            target: ApiTarget {
                base_url: fill_from_config(&spec.api_base_url, config, "apiBaseUrl")?,
                default_headers: spec.default_headers.clone(),
                pagination: spec.pagination.clone().unwrap_or(Pagination::None),
            },
            request: ProviderRequest { template: verification.template(), path_params, extra_query, body: verification.body.clone() },
            expect: verification.expect.clone(),
        })
    }

    /// A custom definition's first entity's list request, asking for one record where the
    /// pagination has a size parameter (and for the first page or offset).
    ///
    /// # Errors
    /// [`DomainError::Conflict`] when the definition has no entity (a valid one always has).
    pub fn for_custom(definition: &CustomApiDefinition) -> Result<Self, DomainError> {
        let Some(entity) = definition.entities.first() else {
            return Err(DomainError::Conflict("the custom definition has no entity to list".into()));
        };
        let mut extra_query = BTreeMap::new();
        match &definition.pagination {
            Pagination::Cursor { limit_param: Some(limit), .. } | Pagination::Link { limit_param: Some(limit), .. } => {
                extra_query.insert(limit.clone(), "1".to_owned());
            }
            Pagination::Page { page_param, start_page, limit_param, .. } => {
                extra_query.insert(page_param.clone(), start_page.to_string());
                if let Some(limit) = limit_param {
                    extra_query.insert(limit.clone(), "1".to_owned());
                }
            }
            Pagination::Offset { offset_param, limit_param, .. } => {
                extra_query.insert(offset_param.clone(), "0".to_owned());
                extra_query.insert(limit_param.clone(), "1".to_owned());
            }
            Pagination::Cursor { limit_param: None, .. } | Pagination::Link { limit_param: None, .. } | Pagination::None => {}
        }
        Ok(Self {
            target: ApiTarget {
                base_url: definition.base_url.clone(),
                default_headers: definition.default_headers.clone(),
                pagination: definition.pagination.clone(),
            },
            request: ProviderRequest { template: entity.list.clone(), path_params: BTreeMap::new(), extra_query, body: None },
            expect: None,
        })
    }
}

/// Sends the verification request with the connection's credentials; never fails: every
/// failure is an outcome with its reason.
pub async fn test_connection(
    client: &dyn ProviderClient,
    connection: &str,
    verification: &Verification,
    credentials: &dyn CredentialSource,
    clock: &dyn Clock,
) -> ConnectionTestOutcome {
    let started = clock.now();
    let result = client.send(connection, &verification.target, &verification.request, credentials).await;
    let elapsed = || u64::try_from((clock.now() - started).whole_milliseconds()).unwrap_or(0);
    match result {
        Ok(answer) => {
            let latency_ms = u64::try_from(answer.latency.as_millis()).unwrap_or(u64::MAX);
            let status = answer.status;
            let error = match status {
                200..=299 => verification
                    .expect
                    .as_ref()
                    .filter(|e| !e.holds(answer.body.as_ref()))
                    .map(|e| format!("the provider answered {status} but refused the credentials ({} is not {})", e.pointer, e.equals)),
                401 | 403 => Some(format!("the provider refused the credentials ({status})")),
                _ => Some(format!("the provider answered {status} to the verification request")),
            };
            ConnectionTestOutcome { ok: error.is_none(), status: Some(status), latency_ms, error }
        }
        Err(e) => {
            let error = match e {
                DomainError::Validation(v) => {
                    format!("the provider cannot be called: {}", v.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
                }
                DomainError::Unavailable { reason, .. } => format!("the provider could not be reached: {reason}"),
                DomainError::Conflict(reason) => format!("the connection cannot authenticate: {reason}"),
                other => format!("the verification request failed: {other}"),
            };
            ConnectionTestOutcome { ok: false, status: None, latency_ms: elapsed(), error: Some(error) }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use serde_json::json;
    use time::OffsetDateTime;

    use super::*;
    use crate::custom::HttpMethod;
    use crate::provider_client::{AuthMaterial, MockCredentialSource, PageToken, ProviderPage, ProviderResponse};
    use crate::services::block_on;

    /// A client that records what it was asked and answers from a script.
    struct Scripted {
        answer: Mutex<Option<Result<ProviderResponse, DomainError>>>,
        asked: Mutex<Vec<(String, ApiTarget, ProviderRequest)>>,
    }

    impl Scripted {
        fn new(answer: Result<ProviderResponse, DomainError>) -> Self {
            Self { answer: Mutex::new(Some(answer)), asked: Mutex::new(Vec::new()) }
        }
    }

    #[async_trait]
    impl ProviderClient for Scripted {
        async fn send(
            &self,
            connection: &str,
            target: &ApiTarget,
            request: &ProviderRequest,
            credentials: &dyn CredentialSource,
        ) -> Result<ProviderResponse, DomainError> {
            credentials.current().await?;
            self.asked.lock().unwrap().push((connection.to_owned(), target.clone(), request.clone()));
            self.answer.lock().unwrap().take().expect("one request")
        }

        async fn list_page(
            &self,
            _: &str,
            _: &ApiTarget,
            _: &ProviderRequest,
            _: Option<&PageToken>,
            _: Option<u32>,
            _: &dyn CredentialSource,
        ) -> Result<ProviderPage, DomainError> {
            panic!("a connection test sends one request")
        }
    }

    struct Ticking(Mutex<OffsetDateTime>);

    impl Clock for Ticking {
        fn now(&self) -> OffsetDateTime {
            let mut t = self.0.lock().unwrap();
            *t += time::Duration::milliseconds(25);
            *t
        }
    }

    fn clock() -> Ticking {
        Ticking(Mutex::new(OffsetDateTime::UNIX_EPOCH))
    }

    fn credentials() -> MockCredentialSource {
        let mut source = MockCredentialSource::new();
        source.expect_current().returning(|| Ok(AuthMaterial::Bearer("t".into())));
        source
    }

    fn github() -> ProviderSpec {
        serde_json::from_value(json!({
            "id": "github", "name": "GitHub", "category": "source-control", "description": "",
            "authModes": ["oauth2_authorization_code"], "authorizationUrl": "https://github.com/login/oauth/authorize",
            "tokenUrl": "https://github.com/login/oauth/access_token", "defaultScopes": [],
            "apiBaseUrl": "https://api.github.com", "docsUrl": "https://docs.github.com/en/rest",
            "configSchema": {"type": "object"}, "capabilities": {"webhooks": true, "syncEntities": []},
            "verification": {"method": "GET", "path": "/user"}
        }))
        .unwrap()
    }

    fn answer(status: u16) -> Result<ProviderResponse, DomainError> {
        Ok(ProviderResponse { status, body: None, latency: Duration::from_millis(42) })
    }

    #[test]
    fn a_catalog_provider_is_tested_with_its_verification_request() {
        let client = Scripted::new(answer(200));
        let v = Verification::for_provider(&github(), &json!({"organization": "acme"})).unwrap();
        let outcome = block_on(test_connection(&client, "conn-1", &v, &credentials(), &clock()));
        assert_eq!(outcome, ConnectionTestOutcome { ok: true, status: Some(200), latency_ms: 42, error: None });
        let asked = client.asked.lock().unwrap();
        assert_eq!(asked[0].0, "conn-1");
        assert_eq!(asked[0].1.base_url, "https://api.github.com");
        assert_eq!((asked[0].2.template.method, asked[0].2.template.path.as_str()), (HttpMethod::Get, "/user"));
    }

    #[test]
    fn base_url_placeholders_come_from_the_configuration() {
        let mut zendesk = github();
        zendesk.api_base_url = "https://{subdomain}.zendesk.com/api/v2".into();
        let v = Verification::for_provider(&zendesk, &json!({"subdomain": "acme"})).unwrap();
        assert_eq!(v.target.base_url, "https://acme.zendesk.com/api/v2");
        for config in [json!({}), json!({"subdomain": "evil.com/x?"}), json!({"subdomain": 3})] {
            let Err(DomainError::Validation(problems)) = Verification::for_provider(&zendesk, &config) else { panic!("{config}") };
            assert_eq!(problems[0].field, "config.subdomain");
        }
        let mut none = github();
        none.verification = None;
        assert!(matches!(Verification::for_provider(&none, &json!({})), Err(DomainError::Conflict(_))));
    }

    #[test]
    fn default_query_values_come_from_the_configuration() {
        let mut trello = github();
        trello.default_query = BTreeMap::from([("key".into(), "{apiKey}".into())]);
        let v = Verification::for_provider(&trello, &json!({"apiKey": "0123abcd"})).unwrap();
        assert_eq!(v.request.extra_query, BTreeMap::from([("key".into(), "0123abcd".into())]));
        let Err(DomainError::Validation(problems)) = Verification::for_provider(&trello, &json!({})) else { panic!() };
        assert_eq!(problems[0].field, "config.apiKey");
    }

    #[test]
    fn a_2xx_whose_body_refuses_the_credentials_is_a_failed_test() {
        let mut slack = github();
        slack.verification.as_mut().unwrap().expect = Some(BodyExpectation { pointer: "/ok".into(), equals: json!(true) });
        let v = Verification::for_provider(&slack, &json!({})).unwrap();
        let with_body = |body: Value| Ok(ProviderResponse { status: 200, body: Some(body), latency: Duration::from_millis(5) });
        let refused = block_on(test_connection(
            &Scripted::new(with_body(json!({"ok": false, "error": "invalid_auth"}))),
            "c",
            &v,
            &credentials(),
            &clock(),
        ));
        assert!(!refused.ok);
        assert_eq!(refused.status, Some(200));
        assert!(refused.error.as_deref().unwrap().contains("/ok is not true"), "{refused:?}");
        let accepted = block_on(test_connection(&Scripted::new(with_body(json!({"ok": true}))), "c", &v, &credentials(), &clock()));
        assert!(accepted.ok && accepted.error.is_none(), "{accepted:?}");
        let no_body = block_on(test_connection(&Scripted::new(answer(200)), "c", &v, &credentials(), &clock()));
        assert!(!no_body.ok, "an answer without the value does not pass");
    }

    #[test]
    fn a_custom_definition_lists_its_first_entity_with_the_smallest_page() {
        let definition: CustomApiDefinition = serde_json::from_value(json!({
            "baseUrl": "https://api.example.com/v2",
            "auth": {"type": "bearer"},
            "defaultHeaders": {"Accept": "application/json"},
            "pagination": {"style": "offset", "offsetParam": "offset", "limitParam": "limit", "pageSize": 100},
            "entities": [
                {"name": "ticket", "idField": "id", "list": {"method": "GET", "path": "/tickets", "itemsPath": "data"}},
                {"name": "user", "idField": "id", "list": {"method": "GET", "path": "/users"}}
            ]
        }))
        .unwrap();
        let v = Verification::for_custom(&definition).unwrap();
        assert_eq!(v.request.template.path, "/tickets");
        assert_eq!(v.request.extra_query, BTreeMap::from([("limit".into(), "1".into()), ("offset".into(), "0".into())]));
        assert_eq!(v.target.default_headers["Accept"], "application/json");
    }

    #[test]
    fn failures_are_outcomes_with_their_reason() {
        let v = Verification::for_provider(&github(), &json!({})).unwrap();
        let cases: Vec<(Result<ProviderResponse, DomainError>, Option<u16>, &str)> = vec![
            (answer(401), Some(401), "refused the credentials (401)"),
            (answer(404), Some(404), "answered 404"),
            (Err(DomainError::unavailable("timed out")), None, "could not be reached: timed out"),
            (Err(DomainError::invalid("baseUrl", "destination refused: loopback address")), None, "destination refused"),
            (Err(DomainError::Conflict("refresh_failed".into())), None, "cannot authenticate: refresh_failed"),
        ];
        for (result, status, text) in cases {
            let outcome = block_on(test_connection(&Scripted::new(result), "c", &v, &credentials(), &clock()));
            assert!(!outcome.ok);
            assert_eq!(outcome.status, status);
            let error = outcome.error.unwrap();
            assert!(error.contains(text), "{error}");
            if status.is_none() {
                assert_eq!(outcome.latency_ms, 25, "measured with the clock");
            }
        }
        // Credentials that cannot be had at all: the source's error, no request.
        let mut source = MockCredentialSource::new();
        source.expect_current().returning(|| Err(DomainError::Conflict("pending_authorization".into())));
        let client = Scripted::new(answer(200));
        let outcome = block_on(test_connection(&client, "c", &v, &source, &clock()));
        assert!(!outcome.ok && outcome.error.unwrap().contains("pending_authorization"));
        assert!(client.asked.lock().unwrap().is_empty());
    }
}

//! The Secret Management adapter against a fake of the service that keeps secrets (the
//! secret store conformance suite), and against a local mock of it: request shape, error
//! mapping, timeouts and retries.

use std::collections::BTreeMap;
use std::time::Duration;

use im_domain::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use im_domain::{DomainError, TenantId};
use im_secrets_http::{HttpSecretSettings, HttpSecretStore};
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn store(server: &MockServer) -> HttpSecretStore {
    HttpSecretStore::new(HttpSecretSettings::for_tests(server.uri())).unwrap()
}

fn name() -> SecretName {
    SecretName::new(&TenantId::new("acme").unwrap(), "webhook", "0192f3c4")
}

#[tokio::test]
async fn passes_the_secret_store_contract_against_a_fake_service() {
    let (_, server) = im_testkit::secret_management::SecretManagement::start().await;
    im_testkit::secrets::contract(&store(&server)).await;
}

#[tokio::test]
async fn put_sends_value_and_metadata_with_the_service_token() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/secrets/integration-manager/acme/webhook/0192f3c4"))
        .and(header("authorization", "Bearer service-token"))
        .and(body_json(json!({"value": {"secret": "whsec_x"}, "metadata": {"kind": "webhook"}})))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"name": "integration-manager/acme/webhook/0192f3c4", "version": "7"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let metadata = BTreeMap::from([("kind".to_owned(), "webhook".to_owned())]);
    let reference = store(&server).put(&name(), &SecretValue(json!({"secret": "whsec_x"})), &metadata).await.unwrap();
    assert_eq!(reference, SecretRef { secret_name: name(), version: "7".into() });
}

#[tokio::test]
async fn get_reads_the_version_and_maps_404() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/secrets/integration-manager/acme/webhook/0192f3c4"))
        .and(query_param("version", "7"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "n", "version": "7", "value": {"secret": "whsec_x"}})))
        .mount(&server)
        .await;
    let found = store(&server).get(&SecretRef { secret_name: name(), version: "7".into() }).await.unwrap();
    assert_eq!(found.0["secret"], "whsec_x");
    let missing = store(&server).get(&SecretRef { secret_name: name(), version: "8".into() }).await;
    assert!(matches!(missing, Err(DomainError::NotFound { .. })), "{missing:?}");
}

#[tokio::test]
async fn server_errors_are_retried_then_unavailable() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(503)).expect(3).mount(&server).await;
    let result = store(&server).get(&SecretRef { secret_name: name(), version: "1".into() }).await;
    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{result:?}");
}

#[tokio::test]
async fn a_transient_error_then_success_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE")).respond_with(ResponseTemplate::new(502)).up_to_n_times(1).mount(&server).await;
    Mock::given(method("DELETE")).respond_with(ResponseTemplate::new(204)).expect(1).mount(&server).await;
    store(&server).delete(&name()).await.unwrap();
}

#[tokio::test]
async fn timeouts_are_unavailable() {
    let server = MockServer::start().await;
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2))).mount(&server).await;
    let started = std::time::Instant::now();
    let result = store(&server).get(&SecretRef { secret_name: name(), version: "1".into() }).await;
    assert!(matches!(result, Err(DomainError::Unavailable { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "three attempts of 300 ms, not the server's delay");
}

#[tokio::test]
async fn refused_tokens_are_a_configuration_error_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("PUT")).respond_with(ResponseTemplate::new(401)).expect(1).mount(&server).await;
    let result = store(&server).put(&name(), &SecretValue(json!("s")), &BTreeMap::new()).await;
    match result {
        Err(DomainError::Unexpected(e)) => assert!(e.to_string().contains("secrets.token"), "{e}"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn deleting_a_missing_secret_succeeds() {
    let server = MockServer::start().await;
    Mock::given(method("DELETE")).respond_with(ResponseTemplate::new(404)).mount(&server).await;
    store(&server).delete(&name()).await.unwrap();
}

/// Readiness follows the requests: a failed one (retries exhausted) makes the service not
/// ready, a later success ready again; no URL or error text in what callers see.
#[tokio::test]
async fn health_reports_the_outcome_of_the_last_request() {
    use im_domain::ports::HealthCheck as _;
    let server = MockServer::start().await;
    let store = store(&server);
    assert!(store.check().await.ready, "ready before any request");
    Mock::given(method("GET")).respond_with(ResponseTemplate::new(503)).up_to_n_times(3).mount(&server).await;
    let reference = SecretRef { secret_name: name(), version: "1".into() };
    assert!(store.get(&reference).await.is_err());
    let down = store.check().await;
    assert!(!down.ready && !down.critical, "{down:?}");
    assert!(!down.detail.contains(&server.uri()) && !down.detail.contains("503"), "{}", down.detail);
    assert!(down.diagnostic.contains("503"), "the logs get the reason: {}", down.diagnostic);
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"name": "n", "version": "1", "value": {}})))
        .mount(&server)
        .await;
    store.get(&reference).await.unwrap();
    assert!(store.check().await.ready, "ready again after a success");
}

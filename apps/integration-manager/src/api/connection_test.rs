//! `POST /api/v1/integrations/{id}/connections/{connectionId}/test`: sends the provider's
//! verification request with the connection's credentials and answers the outcome.
//!
//! The handler reaches the connection model through the domain's [`ConnectionTester`]
//! (`ConnectionTests`: the connection service and the provider client), kept in `AppState`.

use actix_web::{HttpResponse, web};
use im_domain::services::connection_test::{ConnectionTestOutcome, ConnectionTester};
use im_domain::{Caller, IntegrationId};
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::Authenticated;
use super::problem::{ApiError, ApiResult};
use crate::state::AppState;

/// The outcome of a connection test. A failed test is still a `200` answer with `ok: false`;
/// the connection's status follows the outcome.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ConnectionTestResult)]
pub struct ConnectionTestView {
    /// The provider accepted the credentials (a 2xx answer to the verification request).
    ok: bool,
    /// The provider's HTTP status; `null` when no answer came (unreachable, refused destination,
    /// credentials that cannot be had).
    #[schema(minimum = 100, maximum = 599)]
    status: Option<u16>,
    /// Time to the provider's answer, retries included.
    latency_ms: u64,
    /// Why the test failed; never a credential.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<ConnectionTestOutcome> for ConnectionTestView {
    fn from(o: ConnectionTestOutcome) -> Self {
        Self { ok: o.ok, status: o.status, latency_ms: o.latency_ms, error: o.error }
    }
}

/// What the route answers for `caller`, given the path's raw ids.
///
/// # Errors
/// 404 for an id that is not one (or the tester's `NotFound`), and the tester's other errors.
pub async fn answer(tester: &dyn ConnectionTester, caller: &Caller, id: &str, connection_id: &str) -> ApiResult<HttpResponse> {
    let integration = IntegrationId::parse(id).ok_or_else(|| ApiError::NotFound(format!("integration '{id}' was not found")))?;
    let outcome = tester.test(caller, &integration, connection_id).await?;
    Ok(HttpResponse::Ok().json(ConnectionTestView::from(outcome)))
}

/// Test a connection.
#[utoipa::path(post, operation_id = "testConnection", path = "/api/v1/integrations/{id}/connections/{connectionId}/test", tag = "connections",
    params(
        ("id" = String, Path, description = "Integration id"),
        ("connectionId" = String, Path, description = "Connection id"),
    ),
    responses(
        (status = 200, description = "The outcome; `ok` is false when the provider refused or could not be reached", body = ConnectionTestView),
    ),
    security(("bearer" = [])))]
pub async fn test(state: web::Data<AppState>, caller: Authenticated, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let (id, connection_id) = path.into_inner();
    answer(state.connection_tests.as_ref(), &caller.0, &id, &connection_id).await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use actix_web::body::MessageBody as _;
    use async_trait::async_trait;
    use im_domain::{DomainError, Role, TenantId, UserId};
    use serde_json::{Value, json};

    use super::*;

    struct Fake {
        outcome: Mutex<Option<Result<ConnectionTestOutcome, DomainError>>>,
        asked: Mutex<Vec<(String, String)>>,
    }

    #[async_trait(?Send)]
    impl ConnectionTester for Fake {
        async fn test(&self, _: &Caller, integration: &IntegrationId, connection: &str) -> Result<ConnectionTestOutcome, DomainError> {
            self.asked.lock().unwrap().push((integration.to_string(), connection.to_owned()));
            self.outcome.lock().unwrap().take().expect("one test")
        }
    }

    fn fake(outcome: Result<ConnectionTestOutcome, DomainError>) -> Fake {
        Fake { outcome: Mutex::new(Some(outcome)), asked: Mutex::new(Vec::new()) }
    }

    fn caller() -> Caller {
        Caller::new(TenantId::new("acme").unwrap(), UserId::new("ann").unwrap(), vec![Role::Member])
    }

    const ID: &str = "0190b6d4-52f3-7c3e-9d43-7b1a2a4f6c11";

    async fn body(response: HttpResponse) -> Value {
        serde_json::from_slice(&response.into_body().try_into_bytes().unwrap()).unwrap()
    }

    #[actix_web::test]
    async fn the_outcome_is_the_answer() {
        let tester = fake(Ok(ConnectionTestOutcome { ok: true, status: Some(200), latency_ms: 12, error: None }));
        let response = answer(&tester, &caller(), ID, "conn-1").await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(body(response).await, json!({"ok": true, "status": 200, "latencyMs": 12}));
        assert_eq!(tester.asked.lock().unwrap()[0], (ID.to_owned(), "conn-1".to_owned()));

        let failed = ConnectionTestOutcome {
            ok: false,
            status: None,
            latency_ms: 5003,
            error: Some("the provider could not be reached: timed out".into()),
        };
        let response = answer(&fake(Ok(failed)), &caller(), ID, "conn-1").await.unwrap();
        assert_eq!(
            body(response).await,
            json!({"ok": false, "status": null, "latencyMs": 5003, "error": "the provider could not be reached: timed out"})
        );
    }

    #[actix_web::test]
    async fn unknown_ids_are_404() {
        let tester = fake(Err(DomainError::not_found("connection", "conn-9")));
        assert!(matches!(answer(&tester, &caller(), "not-a-uuid", "c").await, Err(ApiError::NotFound(_))));
        assert!(tester.asked.lock().unwrap().is_empty());
        let err = answer(&tester, &caller(), ID, "conn-9").await.unwrap_err();
        assert_eq!(actix_web::ResponseError::status_code(&err), 404);
    }
}

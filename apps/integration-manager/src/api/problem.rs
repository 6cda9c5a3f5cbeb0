//! Errors as RFC 9457 problem details (`application/problem+json`). One table maps every
//! domain error to an HTTP status; 500s are opaque to the client and logged in full.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use im_domain::auth::AuthError;
use im_domain::{DomainError, FieldViolation};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// One offending field of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemField {
    /// JSON path of the field in the request (`config.organization`, `customDefinition.entities[0].name`).
    pub field: String,
    /// `unknown_field`, `required`, `invalid_type` or `invalid_value`.
    pub code: &'static str,
    pub message: String,
}

/// RFC 9457 problem details.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Every offending field, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemField>,
}

/// Every error the HTTP layer answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    /// The body is not JSON, or not the JSON object expected.
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("payload too large")]
    PayloadTooLarge(usize),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("bad header: {0}")]
    BadHeader(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Domain(e) => match e {
                DomainError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found", "Not Found"),
                DomainError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
                DomainError::PreconditionFailed => (StatusCode::PRECONDITION_FAILED, "precondition-failed", "Precondition Failed"),
                DomainError::Validation(v) if v.iter().any(|v| v.kind.is_structural()) => {
                    (StatusCode::BAD_REQUEST, "invalid-request", "Invalid Request")
                }
                DomainError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation-failed", "Validation Failed"),
                DomainError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
                DomainError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too-many-requests", "Too Many Requests"),
                DomainError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service Unavailable"),
                DomainError::Unexpected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal Server Error"),
            },
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed-request", "Malformed Request"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported Media Type"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload Too Large"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not Found"),
            ApiError::BadHeader(_) => (StatusCode::BAD_REQUEST, "invalid-header", "Invalid Header"),
        }
    }

    fn detail(&self) -> String {
        match self {
            ApiError::Domain(DomainError::Unexpected(_)) => {
                "An unexpected error occurred; the request id identifies it in the service's logs.".into()
            }
            ApiError::Domain(DomainError::Validation(v)) => format!("{} field(s) are invalid", v.len()),
            ApiError::Domain(e) => e.to_string(),
            ApiError::Unauthorized(e) => e.to_string(),
            ApiError::Malformed(m) => m.clone(),
            ApiError::UnsupportedMediaType => "The body must be JSON (Content-Type: application/json)".into(),
            ApiError::PayloadTooLarge(limit) => format!("The body must be at most {limit} bytes"),
            ApiError::NotFound(what) => what.clone(),
            ApiError::BadHeader(m) => m.clone(),
        }
    }

    fn fields(&self) -> Vec<ProblemField> {
        match self {
            ApiError::Domain(DomainError::Validation(violations)) => violations.iter().map(field).collect(),
            _ => Vec::new(),
        }
    }
}

fn field(v: &FieldViolation) -> ProblemField {
    ProblemField { field: v.field.clone(), code: v.kind.code(), message: v.message.clone() }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, kind, title) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = ?self, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let problem = Problem {
            kind: format!("urn:integration-manager:problem:{kind}"),
            title,
            status: status.as_u16(),
            detail: self.detail(),
            errors: self.fields(),
        };
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        match self {
            ApiError::Unauthorized(e) => {
                let error = if matches!(e, AuthError::Missing) { "Bearer" } else { "Bearer error=\"invalid_token\"" };
                response.insert_header((header::WWW_AUTHENTICATE, error));
            }
            ApiError::Domain(DomainError::Unavailable { retry_after, .. }) => {
                let secs = retry_after.map_or(5, |d| d.as_secs().max(1));
                response.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            ApiError::Domain(DomainError::TooManyRequests { retry_after, .. }) => {
                response.insert_header((header::RETRY_AFTER, retry_after.as_secs().max(1).to_string()));
            }
            _ => {}
        }
        response.body(serde_json::to_vec(&problem).unwrap_or_default())
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

//! Extractors: the authenticated caller, JSON bodies with clear errors, `If-Match`.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage as _, HttpRequest, web};
use futures_util::StreamExt as _;
use im_domain::auth::AuthError;
use im_domain::{Caller, ETag};
use serde_json::Value;
use utoipa::IntoParams;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::{ObjectBuilder, Required, Type};

use super::problem::ApiError;
use crate::state::AppState;

/// The authenticated caller of a `/api/v1` request.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Caller);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        // Authenticated already in front of the handler (rate limits, idempotency keys).
        if let Some(done) = req.extensions().get::<Authenticated>().cloned() {
            return Box::pin(std::future::ready(Ok(done)));
        }
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer(req.headers());
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::Domain(anyhow::anyhow!("application state is missing").into()))?;
            verify(&state, token?).await.map(Authenticated)
        })
    }
}

/// The caller named by the `Authorization` header.
///
/// # Errors
/// 401 without a valid bearer token; 503 when the keys to check it cannot be had.
pub async fn authenticate(state: &AppState, headers: &header::HeaderMap) -> Result<Caller, ApiError> {
    verify(state, bearer(headers)?).await
}

fn bearer(headers: &header::HeaderMap) -> Result<String, ApiError> {
    // `from_utf8` checks an ASCII text many bytes at a time, where `HeaderValue::to_str` looks at
    // each byte (5% of the instructions of a GET went there); a token that is not ASCII fails
    // its verification all the same.
    let token = headers.get(header::AUTHORIZATION).map(|v| {
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer ")))
            .map(|t| t.trim().to_owned())
    });
    match token {
        None => Err(AuthError::Missing.into()),
        Some(None) => Err(AuthError::Invalid("the Authorization header must be 'Bearer <token>'".into()).into()),
        Some(Some(token)) if token.is_empty() => Err(AuthError::Missing.into()),
        Some(Some(token)) => Ok(token),
    }
}

async fn verify(state: &AppState, token: String) -> Result<Caller, ApiError> {
    let caller = state.authenticator.authenticate(&token).await.map_err(|e| match e {
        // The keys cannot be had: the caller may well be right, so 503, not 401.
        AuthError::Unavailable(reason) => ApiError::Domain(im_domain::DomainError::Unavailable { reason, retry_after: None }),
        other => ApiError::Unauthorized(other),
    })?;
    tracing::Span::current().record("tenant_id", caller.tenant_id.as_str());
    Ok(caller)
}

/// A JSON body, refused with 415 (not JSON), 413 (over the limit) or 400 (malformed).
#[derive(Debug)]
pub struct JsonBody(pub Value);

impl FromRequest for JsonBody {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    /// Read here rather than by `web::Json`, which copies every body into a buffer of 8 KiB
    /// (past the allocator's per-thread cache): a body that arrives in one chunk, as small ones
    /// do, is parsed where it is; a longer one is gathered in a buffer of its own length.
    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req.app_data::<web::Data<AppState>>().map_or(1024 * 1024, |s| s.body_limit);
        // As `web::Json` judges it: `application/json` or any `+json` type, nothing else.
        let json = matches!(req.mime_type(), Ok(Some(mime)) if mime.subtype() == actix_web::mime::JSON || mime.suffix() == Some(actix_web::mime::JSON));
        if !json {
            return Box::pin(std::future::ready(Err(ApiError::UnsupportedMediaType)));
        }
        let length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if length.is_some_and(|length| length > limit) {
            return Box::pin(std::future::ready(Err(ApiError::PayloadTooLarge(limit))));
        }
        let mut payload = payload.take();
        Box::pin(async move {
            let (mut first, mut gathered) = (None::<web::Bytes>, web::BytesMut::new());
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| ApiError::Malformed(format!("the body could not be read: {e}")))?;
                let read = first.as_ref().map_or(0, web::Bytes::len) + gathered.len() + chunk.len();
                if read > limit {
                    return Err(ApiError::PayloadTooLarge(limit));
                }
                if first.is_none() && gathered.is_empty() {
                    first = Some(chunk);
                    continue;
                }
                if let Some(earlier) = first.take() {
                    gathered.reserve(length.unwrap_or(read).clamp(read, limit));
                    gathered.extend_from_slice(&earlier);
                }
                gathered.extend_from_slice(&chunk);
            }
            let body = first.as_deref().unwrap_or(&gathered);
            serde_json::from_slice(body).map(JsonBody).map_err(|e| ApiError::Malformed(format!("the body is not valid JSON: {e}")))
        })
    }
}

/// Formats a concurrency token as a strong HTTP entity tag.
pub fn etag_header(etag: &ETag) -> (header::HeaderName, String) {
    // Pushed, not `format!`ted: it is on every read (a formatter costs several times more).
    let mut quoted = String::with_capacity(etag.as_str().len() + 2);
    quoted.push('"');
    quoted.push_str(etag.as_str());
    quoted.push('"');
    (header::ETAG, quoted)
}

fn parse_entity_tag(raw: &str) -> Option<&str> {
    let raw = raw.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    raw.strip_prefix('"')?.strip_suffix('"').filter(|t| !t.contains('"'))
}

/// `If-Match`: the version a write is conditional on. Absent, empty or `*` is no condition (the
/// resource must merely exist); anything but one entity tag is refused with 400.
#[derive(Debug)]
pub struct IfMatch {
    tag: Option<ETag>,
}

/// Documents the header: optional, `*` or one entity tag.
impl IntoParams for IfMatch {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let schema = ObjectBuilder::new().schema_type(Type::String).pattern(Some(r#"^(\*|(W/)?"[!#-~]*")$"#));
        vec![
            ParameterBuilder::new()
                .name("If-Match")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some("The ETag read before; a stale one is refused with 412"))
                .schema(Some(schema))
                .build(),
        ]
    }
}

impl IfMatch {
    /// The version named, if any.
    pub fn tag(&self) -> Option<&ETag> {
        self.tag.as_ref()
    }
}

impl FromRequest for IfMatch {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(if_match(req).map(|tag| IfMatch { tag }))
    }
}

/// A write to one resource: its caller, and the version it is conditional on (`If-Match`).
#[derive(Debug)]
pub struct Write {
    pub caller: Caller,
    pub if_match: IfMatch,
}

impl Write {
    /// The version named by `If-Match`, if any.
    pub fn tag(&self) -> Option<&ETag> {
        self.if_match.tag()
    }
}

impl FromRequest for Write {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let caller = Authenticated::from_request(req, payload);
        let if_match = if_match(req);
        Box::pin(async move { Ok(Write { caller: caller.await?.0, if_match: IfMatch { tag: if_match? } }) })
    }
}

fn if_match(req: &HttpRequest) -> Result<Option<ETag>, ApiError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().map_err(|_| ApiError::BadHeader("If-Match is not ASCII".into()))?.trim();
    if text == "*" || text.is_empty() {
        // No condition: the resource must merely exist (an empty list of entity tags is none).
        return Ok(None);
    }
    parse_entity_tag(text)
        .map(|t| Some(ETag::new(t)))
        .ok_or_else(|| ApiError::BadHeader("If-Match must be one entity tag in double quotes, as given in ETag".into()))
}

/// The answer to a read when `If-None-Match` names the current version: 304 with its `ETag`.
pub fn unchanged(req: &HttpRequest, current: &ETag) -> Option<actix_web::HttpResponse> {
    not_modified(req, current).then(|| actix_web::HttpResponse::NotModified().insert_header(etag_header(current)).finish())
}

/// The start of a 201 answer: `Location` names the new resource.
pub fn created(location: String) -> actix_web::HttpResponseBuilder {
    let mut builder = actix_web::HttpResponse::Created();
    builder.insert_header((header::LOCATION, location));
    builder
}

/// Whether `If-None-Match` names the current version (the GET can answer 304).
pub fn not_modified(req: &HttpRequest, current: &ETag) -> bool {
    req.headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == "*" || parse_entity_tag(t) == Some(current.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags() {
        assert_eq!(parse_entity_tag("\"abc\""), Some("abc"));
        assert_eq!(parse_entity_tag("W/\"abc\""), Some("abc"));
        assert_eq!(parse_entity_tag("abc"), None);
        assert_eq!(parse_entity_tag("\"a\"b\""), None);
    }
}

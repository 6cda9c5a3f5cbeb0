//! The HTTP API: routes, DTOs, extractors, problem details. Handlers convert DTOs to domain
//! values, call a service and map the result; no business rule lives here.

pub mod admin;
pub mod body;
pub mod connection_test;
pub mod connections;
pub mod custom;
pub mod deliveries;
pub mod extract;
pub mod gate;
pub mod health;
pub mod integrations;
pub mod oauth2;
pub mod openapi;
pub mod problem;
pub mod providers;
pub mod request_id;
pub mod schemas;
pub mod sync_tasks;
pub mod webhooks;

use std::collections::HashMap;

use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use im_domain::{FieldViolation, PageRequest, ViolationKind};
use serde::Serialize;
use utoipa::ToSchema;

use problem::ApiError;

/// A resource of `/api/v1`, carrying its route template for the request metrics.
macro_rules! resource {
    ($path:literal) => {
        web::resource($path).app_data(crate::metrics::Route(concat!("/api/v1", $path)))
    };
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    api_routes(cfg);
    operation_routes(cfg);
}

/// The operations endpoints, which every role serves.
pub fn operation_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health/live", web::get().to(health::live))
        .route("/health/ready", web::get().to(health::ready))
        .route("/metrics", web::get().to(health::metrics));
}

/// The API and its document (the `api` and `all` roles).
pub fn api_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .wrap(actix_web::middleware::from_fn(gate::middleware))
            .service(resource!("/integrations").route(web::get().to(integrations::list)).route(web::post().to(integrations::create)))
            .service(
                resource!("/integrations/{id}")
                    .route(web::get().to(integrations::get))
                    .route(web::put().to(integrations::update))
                    .route(web::delete().to(integrations::delete)),
            )
            .service(
                resource!("/integrations/{id}/connections")
                    .route(web::get().to(connections::list))
                    .route(web::post().to(connections::create)),
            )
            .service(
                resource!("/integrations/{id}/connections/{connection}")
                    .route(web::get().to(connections::get))
                    .route(web::put().to(connections::update))
                    .route(web::delete().to(connections::delete)),
            )
            .service(resource!("/integrations/{id}/connections/{connection}/test").route(web::post().to(connection_test::test)))
            .service(resource!("/integrations/{id}/connections/oauth2/authorize").route(web::post().to(oauth2::authorize)))
            .service(resource!("/oauth2/callback").route(web::get().to(oauth2::callback)))
            .service(resource!("/webhooks").route(web::get().to(webhooks::list)).route(web::post().to(webhooks::create)))
            .service(
                resource!("/webhooks/{id}")
                    .route(web::get().to(webhooks::get))
                    .route(web::put().to(webhooks::update))
                    .route(web::delete().to(webhooks::delete)),
            )
            .service(resource!("/webhooks/{id}/rotate-secret").route(web::post().to(webhooks::rotate_secret)))
            .service(resource!("/webhooks/{id}/deliveries").route(web::get().to(deliveries::list)))
            .service(resource!("/webhooks/{id}/deliveries/{delivery}").route(web::get().to(deliveries::get)))
            .service(resource!("/webhooks/{id}/deliveries/{delivery}/retry").route(web::post().to(deliveries::retry)))
            .service(resource!("/webhooks/{id}/recover").route(web::post().to(deliveries::recover)))
            .service(resource!("/webhooks/{id}/test").route(web::post().to(deliveries::test)))
            .service(resource!("/admin/outbox/dead-letters").route(web::get().to(admin::list_dead_letters)))
            .service(resource!("/admin/outbox/dead-letters/{id}/requeue").route(web::post().to(admin::requeue_dead_letter)))
            .service(resource!("/sync-tasks").route(web::get().to(sync_tasks::list)).route(web::post().to(sync_tasks::create)))
            .service(
                resource!("/sync-tasks/{id}")
                    .route(web::get().to(sync_tasks::get))
                    .route(web::put().to(sync_tasks::update))
                    .route(web::delete().to(sync_tasks::delete)),
            )
            .service(resource!("/sync-tasks/{id}/run").route(web::post().to(sync_tasks::run)))
            .service(resource!("/sync-tasks/{id}/pause").route(web::post().to(sync_tasks::pause)))
            .service(resource!("/sync-tasks/{id}/resume").route(web::post().to(sync_tasks::resume)))
            .service(resource!("/sync-tasks/{id}/cancel").route(web::post().to(sync_tasks::cancel)))
            .service(resource!("/sync-tasks/{id}/reset").route(web::post().to(sync_tasks::reset)))
            .service(resource!("/sync-tasks/{id}/executions").route(web::get().to(sync_tasks::executions)))
            .service(resource!("/sync-tasks/{id}/executions/{execution}").route(web::get().to(sync_tasks::execution)))
            .service(resource!("/sync-tasks/{id}/conflicts").route(web::get().to(sync_tasks::conflicts)))
            .service(resource!("/sync-tasks/{id}/conflicts/{conflict}/resolve").route(web::post().to(sync_tasks::resolve)))
            .service(resource!("/providers").route(web::get().to(providers::list)).route(web::post().to(providers::create)))
            .service(
                resource!("/providers/{id}")
                    .route(web::get().to(providers::get))
                    .route(web::put().to(providers::update))
                    .route(web::delete().to(providers::delete)),
            ),
    )
    .route("/openapi.json", web::get().to(openapi::serve));
}

/// Answer of routes that do not exist.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())))
}

/// A page of a listing.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse<T: ToSchema> {
    pub items: Vec<T>,
    /// Pass as `continuationToken` to read the next page; `null` on the last page.
    pub continuation_token: Option<String>,
}

/// The paging parameters of every listing, as the document states them.
pub struct Paging;

impl utoipa::IntoParams for Paging {
    fn into_params(_: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ObjectBuilder, Required, Type};
        let limit = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)).maximum(Some(200));
        vec![
            ParameterBuilder::new()
                .name("limit")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some("Page size, 1 to 200 (default 50)"))
                .schema(Some(limit))
                .build(),
            ParameterBuilder::new()
                .name("continuationToken")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(
                    "The `continuationToken` of the previous page, as it was given: opaque and bound to this listing. \
                     Any other value is refused with 400 naming `continuationToken`.",
                ))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                .build(),
        ]
    }
}

/// A page of items already written as JSON, answered as a [`ListResponse`] without decoding them.
pub fn json_list(items: &[String], continuation: Option<&str>) -> HttpResponse {
    let mut list = JsonList::with_capacity(items.iter().map(|s| s.len() + 1).sum());
    for item in items {
        list.push(item);
    }
    list.finish(continuation)
}

/// The body of a list answer, written item by item into one buffer:
/// `{"items":[...],"continuationToken":...}`.
pub struct JsonList {
    body: String,
    items: usize,
}

impl JsonList {
    /// Room for items of `bytes` in all (commas included).
    pub fn with_capacity(bytes: usize) -> Self {
        let mut body = String::with_capacity(bytes + 64);
        body.push_str(r#"{"items":["#);
        Self { body, items: 0 }
    }

    /// Appends an item, a JSON value's text.
    pub fn push(&mut self, item: &str) {
        if self.items > 0 {
            self.body.push(',');
        }
        self.body.push_str(item);
        self.items += 1;
    }

    /// The answer, with the continuation token of the next page.
    pub fn finish(mut self, continuation: Option<&str>) -> HttpResponse {
        self.body.push_str(r#"],"continuationToken":"#);
        match continuation {
            Some(token) => self.body.push_str(&serde_json::Value::from(token).to_string()),
            None => self.body.push_str("null"),
        }
        self.body.push('}');
        HttpResponse::Ok().content_type(ContentType::json()).body(self.body)
    }
}

/// Query-string parameters, each checked with an error naming it.
pub struct QueryParams {
    params: HashMap<String, String>,
    violations: im_domain::Violations,
}

impl QueryParams {
    /// # Errors
    /// [`ApiError::Malformed`] for a query string that cannot be decoded.
    pub fn parse(req: &HttpRequest) -> Result<Self, ApiError> {
        let params = web::Query::<HashMap<String, String>>::from_query(req.query_string())
            .map_err(|e| ApiError::Malformed(format!("the query string cannot be decoded: {e}")))?
            .into_inner();
        Ok(Self { params, violations: im_domain::Violations::new() })
    }

    /// An optional parameter parsed by `parse`.
    pub fn get<T>(&mut self, name: &str, parse: impl FnOnce(&str) -> Result<T, FieldViolation>) -> Option<T> {
        let raw = self.params.get(name)?;
        self.violations.check(name, parse(raw))
    }

    /// `limit` and `continuationToken`.
    pub fn page(&mut self) -> Option<PageRequest> {
        let limit = self.get("limit", |raw| {
            // `955.0` is a whole number too (JSON Schema's `integer`).
            let whole = || raw.parse::<f64>().ok().filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f));
            raw.parse::<u32>()
                .ok()
                .or_else(|| whole().map(|f| f as u32))
                .ok_or_else(|| FieldViolation::new("", ViolationKind::WrongType, "must be a whole number"))
        });
        let continuation = self.params.get("continuationToken").cloned();
        match PageRequest::new(limit, continuation) {
            Ok(page) => Some(page),
            Err(im_domain::DomainError::Validation(v)) => {
                v.into_iter().for_each(|v| self.violations.push(v));
                None
            }
            Err(_) => None,
        }
    }

    /// # Errors
    /// Every invalid parameter.
    pub fn finish(self) -> Result<(), ApiError> {
        self.violations.finish(|| ()).map_err(ApiError::from)
    }
}

/// A timestamp as RFC 3339 text, as every resource shows it.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

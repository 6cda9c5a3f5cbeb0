//! The OpenAPI document, generated from the handlers and DTOs. `docs/openapi.json` is the same
//! document, committed; a test fails when they drift (`integration-manager openapi` prints it).

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{deliveries, health, integrations, problem, providers, webhooks};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Integration Manager",
        description = "Tenant integrations with third-party tools, the provider catalog, webhooks and sync. Errors are RFC 9457 problem details.",
        license(name = "Apache-2.0")
    ),
    paths(
        integrations::list, integrations::create, integrations::get, integrations::update, integrations::delete,
        providers::list, providers::create, providers::get, providers::update, providers::delete,
        webhooks::list, webhooks::create, webhooks::get, webhooks::update, webhooks::delete, webhooks::rotate_secret,
        deliveries::list, deliveries::get, deliveries::retry, deliveries::recover, deliveries::test,
        health::live, health::ready,
    ),
    components(schemas(
        problem::Problem, problem::ProblemField, integrations::IntegrationInput, integrations::IntegrationView, providers::ProviderInput,
        providers::ProviderView, webhooks::WebhookInput, webhooks::WebhookView, deliveries::DeliveryView, deliveries::RecoverInput,
        deliveries::RecoverReport,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "integrations", description = "A tenant's integrations"),
        (name = "providers", description = "The global provider catalog"),
        (name = "webhooks", description = "A tenant's webhook endpoints and their signing secrets"),
        (name = "operations", description = "Health"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON, with a trailing newline (as committed).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut text = doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

pub async fn serve() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(document())
}

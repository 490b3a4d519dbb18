//! The OpenAPI document, generated from the handlers' annotations and the types they answer
//! with. `docs/openapi.json` is a checked-in copy a test keeps equal.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dinghook API",
        description = "Read and replay events and deliveries, look at apps and routes, and act on DingTalk through dinghook. Every request but this document needs `Authorization: Bearer <token>`; every error is application/problem+json with a stable `code`.",
        version = "1"
    ),
    paths(
        super::events::list,
        super::events::show,
        super::events::replay_one,
        super::events::replay_many,
        super::events::discard_many,
        super::apps::list,
        super::apps::show,
        super::actions::submit,
        super::actions::show,
        super::routes::list,
        super::routes::pause,
        super::routes::resume,
        super::routes::deliveries,
        super::routes::delivery,
        super::routes::replay_one,
        super::routes::replay_many,
    ),
    modifiers(&Bearer),
    tags(
        (name = "events", description = "Events as stored, newest first; replay"),
        (name = "apps", description = "Each app's health"),
        (name = "actions", description = "Acting on DingTalk: durable, idempotent, within QPS and quota"),
        (name = "routes", description = "Routes, their backlogs, pause and resume"),
        (name = "deliveries", description = "Deliveries of events to routes; replay"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as JSON, pretty-printed (what `docs/openapi.json` holds).
pub fn json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `GET /api/v1/openapi.json`.
pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}

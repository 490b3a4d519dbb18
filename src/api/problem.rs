//! Errors as `application/problem+json` (RFC 9457), each with a stable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The content type of every error the API answers.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One error answer: what a handler returns. Small (the document's fixed parts are made when
/// it is written); serialized as a [`ProblemDocument`].
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: u16,
    /// Stable: clients match on it.
    pub code: &'static str,
    /// For people; may change.
    pub detail: String,
    /// The field at fault, for `invalid_request` and `invalid_action`.
    pub field: Option<String>,
}

/// The problem document (RFC 9457) every error is answered with. `type` is
/// `urn:dinghook:problem:<code>`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProblemDocument {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable: `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `payload_too_large`, `unsupported_media_type`, `invalid_json`, `invalid_request`,
    /// `invalid_action`, `missing_idempotency_key`, `idempotency_conflict`, `unknown_app`,
    /// `unknown_route`, `no_dingtalk_client`, `rate_limited`, `store_unavailable`.
    pub code: String,
    /// The field at fault, for `invalid_request` and `invalid_action`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status: status.as_u16(),
            code,
            detail: detail.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    pub fn unauthorized() -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is required: Authorization: Bearer <token>",
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn invalid(field: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail).with_field(field)
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    pub fn document(&self) -> ProblemDocument {
        ProblemDocument {
            kind: format!("urn:dinghook:problem:{}", self.code),
            title: self
                .status()
                .canonical_reason()
                .unwrap_or("Error")
                .to_owned(),
            status: self.status,
            detail: self.detail.clone(),
            code: self.code.to_owned(),
            field: self.field.clone(),
        }
    }
}

impl From<crate::store::StoreError> for Problem {
    /// The store is down or slow: 503, so the caller tries again; the detail says what, never
    /// a connection string (the store's errors carry none).
    fn from(e: crate::store::StoreError) -> Problem {
        tracing::warn!(error = %e, "API request failed in the store");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the store could not answer: {e}"),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self.document()).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dinghook\""),
            );
        }
        response
    }
}

/// The result every API handler returns.
pub type ApiResult<T> = Result<T, Problem>;

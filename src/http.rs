//! What every HTTP route shares, whichever room it belongs to: a request id (taken from
//! `x-request-id` or made), a `request` span with the method, path and client address, and a
//! JSON 404 for routes that do not exist.

use std::net::{IpAddr, SocketAddr};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::forwarded::TrustedProxies;

/// `routes` with JSON 404s, request ids and the request span around them. When served over a
/// socket with [`ConnectInfo`], the span names the client (see [`client_addr`]).
pub fn wrap(routes: Router, trusted: TrustedProxies) -> Router {
    layers(routes.fallback(not_found), trusted)
}

/// [`wrap`] without the JSON 404: for routes that answer unknown paths themselves (the HTTP
/// API's problem documents).
pub fn layers(routes: Router, trusted: TrustedProxies) -> Router {
    routes
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(move |req: &Request<Body>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                // The path only: the query carries nothing secret, but nothing useful either.
                let span = tracing::info_span!(
                    "request",
                    id,
                    method = %req.method(),
                    path = %req.uri().path(),
                    client = tracing::field::Empty,
                );
                if let Some(client) = client_addr(&trusted, req) {
                    span.record("client", tracing::field::display(client));
                }
                span
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The client's address for the logs: the TCP peer, or, when the peer is a trusted proxy, the
/// address its `X-Forwarded-For` names ([`TrustedProxies::client_addr`]). `None` without a
/// peer (a router driven without a socket).
pub fn client_addr<B>(trusted: &TrustedProxies, req: &Request<B>) -> Option<IpAddr> {
    let ConnectInfo(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>()?;
    // A value that is not visible ASCII becomes an entry no address parses from, so the walk
    // stops there as at any other garbage.
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"));
    Some(trusted.client_addr(peer.ip(), forwarded))
}

async fn not_found() -> Response {
    let body = json!({ "error": { "code": "not_found", "message": "no such route" } });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn the_client_address_comes_from_the_peer_and_trusted_forwarding() {
        let trusted = TrustedProxies::parse(&["127.0.0.1/32"]).unwrap();
        let request = |peer: &str, forwarded: &[&[u8]]| {
            let mut req = Request::new(());
            for value in forwarded {
                req.headers_mut().append(
                    "x-forwarded-for",
                    header::HeaderValue::from_bytes(value).unwrap(),
                );
            }
            req.extensions_mut()
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
            req
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let req = request(
            "127.0.0.1:5000",
            &[b"198.51.100.1", b"203.0.113.7, 127.0.0.1"],
        );
        assert_eq!(client_addr(&trusted, &req), Some(ip("203.0.113.7")));
        let req = request("127.0.0.2:5000", &[b"203.0.113.7"]);
        assert_eq!(client_addr(&trusted, &req), Some(ip("127.0.0.2")));
        // Not ASCII: garbage, so the peer.
        let req = request("127.0.0.1:5000", &[b"203.0.113.7\xff"]);
        assert_eq!(client_addr(&trusted, &req), Some(ip("127.0.0.1")));
        assert_eq!(client_addr(&trusted, &Request::new(())), None);
    }
}

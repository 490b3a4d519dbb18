//! The constant-200 ceiling: the least an axum server on this machine can do per request.
//! It reads the body and answers a fixed JSON body, nothing else. `scripts/bench.sh` measures
//! it with the same load generator (`--plain`) right before dinghook, so dinghook's numbers
//! can be read as a fraction of what the machine, the HTTP stack and the load generator allow.
//!
//!   cargo run --release --example ceiling -- --listen 127.0.0.1:18099

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::Router;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18099")]
    listen: String,
}

/// Same shape and size as dinghook's encrypted `success` reply.
const REPLY: &str = r#"{"msg_signature":"0000000000000000000000000000000000000000","timeStamp":"1700000000000","nonce":"0000000000000000","encrypt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#;

async fn constant(_body: Bytes) -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(CONTENT_TYPE, "application/json")], REPLY)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let app = Router::new().fallback(constant);
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("constant-200 server on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}

//! `fake-dingtalk`: a fake DingTalk API (both base URLs) with in-memory state, for trying a
//! DingTalk client without a DingTalk account. Scripted through its `/_fake/` admin routes.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "fake-dingtalk",
    version,
    about = "A fake DingTalk API (both base URLs) with in-memory state, scripted through its /_fake/ admin routes"
)]
struct Cli {
    /// Address to listen on; port 0 takes a free port (the log says which).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match fake_dingtalk::run(cli.listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-dingtalk: fake DingTalk on {}: {e}", cli.listen);
            ExitCode::FAILURE
        }
    }
}

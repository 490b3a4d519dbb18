//! `dinghook act`: queue an action from the shell, through the same validation, store and
//! idempotency as `POST /api/v1/apps/{app}/actions`. The running server's workers run it.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use super::ConfigArg;
use crate::api::actions::{submit_action, Submitted};
use crate::api::ApiApp;
use crate::app::StoreCallCounter;
use crate::config::DEFAULT_APP;
use crate::dingtalk::Client;

#[derive(Args)]
pub struct ActArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The app whose client runs it (default: `default`, or the only app).
    #[arg(long)]
    app: Option<String>,
    /// The action: work_notification, status_bar, recall, group_message, todo_update, war_room, robot_reply.
    action: String,
    /// The action's fields as JSON, with DingTalk's own names (`type` is added).
    #[arg(long)]
    json: String,
    /// Makes a repeat safe: the same key with the same body is the same action. Default: a
    /// new one, printed.
    #[arg(long)]
    idempotency_key: Option<String>,
}

pub async fn act(args: ActArgs) -> Result<()> {
    let config = args.config.load()?;
    let specs = config.validated_apps()?;
    let spec = match &args.app {
        Some(name) => specs.iter().find(|s| &s.name == name),
        None => specs
            .iter()
            .find(|s| s.name == DEFAULT_APP)
            .or_else(|| (specs.len() == 1).then(|| &specs[0])),
    }
    .with_context(|| match &args.app {
        Some(name) => format!("no app is called {name:?}"),
        None => "several apps are configured: name one with --app".to_owned(),
    })?;
    let mut body: Value = serde_json::from_str(&args.json).context("--json is not JSON")?;
    let Some(fields) = body.as_object_mut() else {
        bail!("--json must be a JSON object");
    };
    fields.insert("type".into(), Value::String(args.action.clone()));
    let key = args
        .idempotency_key
        .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4().simple()));
    let store = crate::store::open(&config.store).await?;
    let app_store = crate::store::scoped::for_app(Arc::clone(&store), &spec.name);
    let client = if spec.dingtalk_enabled() {
        let counter = Arc::new(StoreCallCounter(Arc::clone(&app_store)));
        Some(Client::new(spec.dingtalk.clone(), counter)?)
    } else {
        None
    };
    let app = ApiApp {
        name: spec.name.clone(),
        callback_path: spec.callback.path.clone(),
        client,
        store: app_store,
        qps: spec.dingtalk.qps,
        recovery: false,
        quota_reserve: spec.handlers.notify_quota_reserve,
        cipher: None,
    };
    let submitted = submit_action(&store, &app, "cli", &key, body).await;
    store.close().await;
    match submitted {
        Ok(Submitted::Queued(id)) => {
            println!(
                "{}",
                serde_json::json!({"id": id, "state": "queued", "idempotency_key": key})
            );
            Ok(())
        }
        Ok(Submitted::Existing(view)) => {
            println!("{}", serde_json::to_string(&*view)?);
            Ok(())
        }
        Err(problem) => bail!("{} ({})", problem.detail, problem.code),
    }
}

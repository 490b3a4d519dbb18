//! `dinghook routes …` and `dinghook deliveries …`: the routes as configured with their
//! backlogs, pausing and resuming them, and the deliveries, listed, shown and sent again.

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::{parse_since, parse_state, printable, ConfigArg};
use crate::config::Config;
use crate::store::{DeliveryQuery, DeliveryReplay, StoredDelivery};
use crate::time::now_millis;

#[derive(Subcommand)]
pub enum RoutesCommand {
    /// Each configured route: kind, destination (password hidden), apps, event types,
    /// deliveries waiting, running and dead, the oldest waiting one's age, and whether it is
    /// paused.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending to a route (its deliveries wait; every replica stops within a poll
    /// interval).
    Pause {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
        #[arg(long, default_value = "paused by hand")]
        reason: String,
    },
    /// Send to a paused route again (after a 410 Gone, a circuit breaker or a pause by hand).
    Resume {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
    },
}

#[derive(Subcommand)]
pub enum DeliveriesCommand {
    /// Deliveries, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        route: Option<String>,
        /// pending, running, retry, done or dead.
        #[arg(long)]
        state: Option<String>,
        /// Only the deliveries of this event (its id in `events list`).
        #[arg(long)]
        event: Option<i64>,
        /// Created since TIME: epoch ms, RFC 3339 or a duration ago (`2h`).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// One delivery.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        id: i64,
    },
    /// Send deliveries again (back to pending, attempts reset): by id, by state (with
    /// `--route`, one route's), created since a time, or an event's to every route it matches
    /// now (or `--route`).
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// Delivery ids.
        ids: Vec<i64>,
        #[arg(long, conflicts_with_all = ["ids", "since", "event"])]
        state: Option<String>,
        #[arg(long, conflicts_with_all = ["ids", "event"])]
        since: Option<String>,
        /// An event id (as `events list` shows).
        #[arg(long, conflicts_with = "ids")]
        event: Option<i64>,
        #[arg(long)]
        route: Option<String>,
    },
}

fn delivery_json(d: &StoredDelivery) -> serde_json::Value {
    serde_json::to_value(d).unwrap_or_default()
}

pub async fn routes(command: RoutesCommand) -> Result<()> {
    match command {
        RoutesCommand::List { config, json } => {
            let config = config.load()?;
            let apps = config.validated_apps()?;
            let routes = config.routes_for(&apps)?;
            let store = crate::store::open(&config.store).await?;
            let d = store.deliveries();
            let backlogs = d.route_backlogs(now_millis()).await?;
            let pauses = d.route_pauses().await?;
            for spec in &routes.specs {
                let backlog = backlogs.iter().find(|b| b.route == spec.name);
                let pause = pauses.iter().find(|p| p.route == spec.name);
                let row = serde_json::json!({
                    "name": spec.name,
                    "kind": spec.target.kind(),
                    "url": spec.shown_url,
                    "apps": spec.apps,
                    "events": spec.event_patterns,
                    "pending": backlog.map_or(0, |b| b.pending),
                    "retry": backlog.map_or(0, |b| b.retry),
                    "running": backlog.map_or(0, |b| b.running),
                    "dead": backlog.map_or(0, |b| b.dead),
                    "oldest_due_age_ms": backlog.and_then(|b| b.oldest_due_age_ms),
                    "paused": pause.map(|p| &p.reason),
                });
                if json {
                    println!("{row}");
                } else {
                    println!(
                        "{:<16} {:<5} waiting {:>6}  retry {:>6}  dead {:>6}  {}{}",
                        spec.name,
                        spec.target.kind(),
                        backlog.map_or(0, |b| b.pending),
                        backlog.map_or(0, |b| b.retry),
                        backlog.map_or(0, |b| b.dead),
                        spec.shown_url,
                        pause.map_or(String::new(), |p| format!(
                            "  PAUSED: {}",
                            printable(&p.reason)
                        )),
                    );
                }
            }
            store.close().await;
            Ok(())
        }
        RoutesCommand::Pause {
            config,
            name,
            reason,
        } => {
            let store = open(&config).await?;
            store
                .deliveries()
                .pause_route(&name, &reason, now_millis())
                .await?;
            println!("route {name} paused");
            store.close().await;
            Ok(())
        }
        RoutesCommand::Resume { config, name } => {
            let store = open(&config).await?;
            let was = store.deliveries().resume_route(&name).await?;
            store.close().await;
            if !was {
                bail!("route {name:?} is not paused");
            }
            println!("route {name} resumed");
            Ok(())
        }
    }
}

async fn open(config: &ConfigArg) -> Result<std::sync::Arc<dyn crate::store::Store>> {
    let config =
        Config::load_for_store(config.config.as_deref()).context("invalid configuration")?;
    Ok(crate::store::open(&config.store).await?)
}

pub async fn deliveries(command: DeliveriesCommand) -> Result<()> {
    match command {
        DeliveriesCommand::List {
            config,
            route,
            state,
            event,
            since,
            limit,
            json,
        } => {
            let store = open(&config).await?;
            let query = DeliveryQuery {
                route,
                state: state.as_deref().map(parse_state).transpose()?,
                event_id: event,
                since: since.as_deref().map(parse_since).transpose()?,
                limit: Some(limit),
            };
            for d in store.deliveries().list_deliveries(&query).await? {
                if json {
                    println!("{}", delivery_json(&d));
                } else {
                    println!(
                        "{:>8}  {:<16} {:<8} {:>3}  event {:>8}  {}",
                        d.id,
                        d.route,
                        d.state.as_str(),
                        d.attempts,
                        d.event_id,
                        d.last_error.as_deref().map(printable).unwrap_or_default()
                    );
                }
            }
            store.close().await;
            Ok(())
        }
        DeliveriesCommand::Show { config, id } => {
            let store = open(&config).await?;
            let found = store.deliveries().get_delivery(id).await?;
            store.close().await;
            match found {
                Some(d) => {
                    println!("{}", serde_json::to_string_pretty(&delivery_json(&d))?);
                    Ok(())
                }
                None => bail!("no delivery {id}"),
            }
        }
        DeliveriesCommand::Replay {
            config,
            ids,
            state,
            since,
            event,
            route,
        } => {
            let now = now_millis();
            if let Some(event_id) = event {
                // The routes that take the event now, from the configuration.
                let config = config.load()?;
                let apps = config.validated_apps()?;
                let routes = config.routes_for(&apps)?;
                let store = crate::store::open(&config.store).await?;
                let Some(stored) = store.get(event_id).await? else {
                    bail!("no event {event_id}");
                };
                let names = match route {
                    Some(name) if routes.get(&name).is_some() => vec![name],
                    Some(name) => bail!("no route named {name:?} is configured"),
                    None => routes.matching(&stored.app, &stored.event_type),
                };
                if names.is_empty() {
                    bail!(
                        "no configured route takes event {event_id} ({} of app {})",
                        stored.event_type,
                        stored.app
                    );
                }
                let n = store
                    .deliveries()
                    .redeliver(event_id, &stored.app, &names, now)
                    .await?;
                store.close().await;
                println!(
                    "{n} deliveries of event {event_id} to send: {}",
                    names.join(" ")
                );
                return Ok(());
            }
            let which = match (state, since) {
                (Some(state), _) => {
                    let state = parse_state(&state)?;
                    match route {
                        Some(route) => DeliveryReplay::RouteState { route, state },
                        None => DeliveryReplay::State(state),
                    }
                }
                (None, Some(since)) => DeliveryReplay::Since {
                    since: parse_since(&since)?,
                    route,
                },
                (None, None) if !ids.is_empty() => DeliveryReplay::Ids(ids),
                (None, None) => {
                    bail!("name deliveries: ids, --state dead [--route R], --since T or --event ID")
                }
            };
            let store = open(&config).await?;
            let n = store.deliveries().replay_deliveries(&which, now).await?;
            store.close().await;
            println!("{n} deliveries to send again");
            Ok(())
        }
    }
}

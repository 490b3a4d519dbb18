//! Handlers: the code that runs for each event type, registered in code.
//!
//! ```no_run
//! # async fn demo(config: dinghook::config::Config) -> Result<(), dinghook::app::AppError> {
//! use dinghook::handler::{HandlerError, Registrations};
//! let app = dinghook::app::Application::builder(config)
//!     .on_chat_update_title(|rename, _ctx| async move {
//!         println!("group renamed to {}", rename.title);
//!         Ok::<(), HandlerError>(())
//!     })
//!     .on_cool_app_install(|install, _ctx| async move {
//!         println!("installed in {}", install.open_conversation_id);
//!         Ok(())
//!     })
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::dingtalk::Client;
use crate::event::{self, ChatUpdateTitle, CheckRecord, CoolAppChange, Event, TodoTaskChange};
use crate::store::{Store, StoreError, StoredEvent};

/// How a handler failed, which decides what happens to the event. `Clone`, so one failure
/// shared by several events (a batched lookup) reaches each of them unchanged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (network, throttling, a store hiccup): `retry` per schedule.
    #[error("{0}")]
    Transient(String),
    /// Will never succeed (bad data, a forbidden call): straight to `dead`.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        HandlerError::Transient(message.to_string())
    }
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        HandlerError::Permanent(message.to_string())
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        HandlerError::Transient(e.to_string())
    }
}

/// What a handler gets besides the event: the store, the DingTalk client, and the stored row
/// it came from.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<dyn Store>,
    /// The row: id, de-duplication key, attempt number (1 on the first run).
    pub record: Arc<StoredEvent>,
    /// `None` when no app key is configured.
    pub client: Option<Client>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Context {
    /// The DingTalk client, or a permanent failure explaining how to configure it.
    pub fn dingtalk(&self) -> Result<&Client, HandlerError> {
        self.client.as_ref().ok_or_else(|| {
            HandlerError::permanent(
                "no DingTalk client: set DINGHOOK_APP_KEY and DINGHOOK_APP_SECRET",
            )
        })
    }
}

impl From<crate::dingtalk::Error> for HandlerError {
    /// Permanent DingTalk errors (bad parameters, missing permissions) kill the event; the
    /// rest (network, throttling, quota, time-outs) are retried on the schedule.
    fn from(e: crate::dingtalk::Error) -> Self {
        if e.is_permanent() {
            HandlerError::Permanent(e.to_string())
        } else {
            HandlerError::Transient(e.to_string())
        }
    }
}

/// Runs for one event type.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, event: Event, ctx: Context) -> Result<(), HandlerError>;
}

/// Any `async fn(Event, Context) -> Result<(), HandlerError>` is a handler.
#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Event, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, event: Event, ctx: Context) -> Result<(), HandlerError> {
        self(event, ctx).await
    }
}

/// A registration problem, reported when the application is built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("two handlers are registered for event type {0:?}; register one (it may call both)")]
    Duplicate(String),
}

/// The handlers by event type. Built by [`RegistryBuilder`].
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    pub fn get(&self, event_type: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(event_type).cloned()
    }
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

/// Collects handler registrations; duplicates are an error at [`RegistryBuilder::build`].
#[derive(Default)]
pub struct RegistryBuilder {
    entries: Vec<(String, Arc<dyn Handler>)>,
}

/// Wraps a typed closure into a handler for one variant.
macro_rules! typed {
    ($f:ident, $variant:path, $ty:ty) => {
        move |event: Event, ctx: Context| {
            let call = match event {
                $variant(value) => Ok($f(value, ctx)),
                other => Err(other.event_type().to_owned()),
            };
            async move {
                match call {
                    Ok(fut) => fut.await,
                    Err(t) => Err(HandlerError::permanent(format!(
                        "handler for {} received a {t} event",
                        stringify!($ty)
                    ))),
                }
            }
        }
    };
}

macro_rules! typed_registrations {
    ($($(#[$doc:meta])* $method:ident => $const:path, $variant:path, $ty:ty;)*) => {
        /// Handler registration, shared by [`RegistryBuilder`] and the application builder:
        /// [`Registrations::on`] for any event type, and one typed method per known type.
        pub trait Registrations: Sized {
            /// Registers `handler` for `event_type` (any type, known or not).
            fn on(self, event_type: &str, handler: impl Handler) -> Self;

            $(
                $(#[$doc])*
                fn $method<F, Fut>(self, f: F) -> Self
                where
                    F: Fn($ty, Context) -> Fut + Send + Sync + 'static,
                    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
                {
                    self.on($const, typed!(f, $variant, $ty))
                }
            )*
        }
    };
}

typed_registrations! {
    /// `chat_update_title`.
    on_chat_update_title => event::CHAT_UPDATE_TITLE, Event::ChatUpdateTitle, ChatUpdateTitle;
    /// `im_cool_app_install`.
    on_cool_app_install => event::COOL_APP_INSTALL, Event::CoolAppInstall, CoolAppChange;
    /// `im_cool_app_uninstall`.
    on_cool_app_uninstall => event::COOL_APP_UNINSTALL, Event::CoolAppUninstall, CoolAppChange;
    /// `attendance_check_record`, with all records of the push.
    on_attendance_check_record => event::ATTENDANCE_CHECK_RECORD, Event::AttendanceCheckRecord, Vec<CheckRecord>;
    /// `todo_task_create`.
    on_todo_task_create => event::TODO_TASK_CREATE, Event::TodoTaskCreate, TodoTaskChange;
    /// `todo_task_update`.
    on_todo_task_update => event::TODO_TASK_UPDATE, Event::TodoTaskUpdate, TodoTaskChange;
    /// `todo_task_delete`.
    on_todo_task_delete => event::TODO_TASK_DELETE, Event::TodoTaskDelete, TodoTaskChange;
}

impl Registrations for RegistryBuilder {
    fn on(mut self, event_type: &str, handler: impl Handler) -> Self {
        self.entries
            .push((event_type.to_owned(), Arc::new(handler)));
        self
    }
}

impl RegistryBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every registration of `other`.
    pub fn merge(mut self, other: RegistryBuilder) -> Self {
        self.entries.extend(other.entries);
        self
    }

    pub fn build(self) -> Result<Registry, RegistryError> {
        let mut handlers = HashMap::new();
        for (event_type, handler) in self.entries {
            if handlers.insert(event_type.clone(), handler).is_some() {
                return Err(RegistryError::Duplicate(event_type));
            }
        }
        Ok(Registry { handlers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_handlers_for_one_type_are_refused() {
        let err = RegistryBuilder::new()
            .on_chat_update_title(|_, _| async { Ok(()) })
            .on("chat_update_title", |_, _| async { Ok(()) })
            .build()
            .err();
        assert_eq!(
            err,
            Some(RegistryError::Duplicate("chat_update_title".into()))
        );
    }

    #[test]
    fn distinct_types_register() {
        let registry = RegistryBuilder::new()
            .on_chat_update_title(|_, _| async { Ok(()) })
            .on_cool_app_install(|_, _| async { Ok(()) })
            .on("user_add_org", |_, _| async { Ok(()) })
            .build()
            .unwrap();
        let mut types: Vec<_> = registry.event_types().collect();
        types.sort_unstable();
        assert_eq!(
            types,
            ["chat_update_title", "im_cool_app_install", "user_add_org"]
        );
    }
}

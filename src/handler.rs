//! The extension API: handlers, the code that runs for each event type.
//!
//! Any number of handlers may run for one event type, built-in ones and a program's own. Each
//! has a name, and the dispatcher records which of an event's handlers succeeded: when one
//! fails, the retry (or a replay of the dead event) runs only the handlers that have not
//! succeeded yet. Name a handler with [`Registrations::named`] so that record survives
//! changes to the registration order; an unnamed one is called `<event type>#<n>`, counting
//! that type's unnamed registrations from 1.
//!
//! ```no_run
//! # async fn demo(config: dinghook::config::Config) -> Result<(), dinghook::app::AppError> {
//! use dinghook::handler::{HandlerError, Registrations};
//! let app = dinghook::app::Application::builder(config)
//!     .named("crm.rename")
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
use crate::event::{
    self, AttendanceLookup, ChatUpdateTitle, CheckRecord, CoolAppChange, Event, RobotMessage,
    SendResultCheck, TodoTaskChange,
};
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
    #[error("two handlers are named {0:?}; handler names must be unique")]
    Duplicate(String),
}

/// One registered handler.
#[derive(Clone)]
pub struct Registered {
    /// Unique among all registrations; recorded with each event's outcome.
    pub name: Arc<str>,
    pub handler: Arc<dyn Handler>,
    /// Runs only for this app's events; `None`: every app's (a program's own handlers).
    pub app: Option<Arc<str>>,
}

impl Registered {
    /// Whether it runs for an event of `app`.
    pub fn serves(&self, app: &str) -> bool {
        self.app.as_deref().is_none_or(|a| a == app)
    }
}

/// The handlers by event type, each type's in registration order. Built by
/// [`RegistryBuilder`].
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Vec<Registered>>,
}

impl Registry {
    /// The handlers for `event_type` (empty when none is registered), of every app.
    pub fn get(&self, event_type: &str) -> &[Registered] {
        self.handlers.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// The handlers that run for an `event_type` event of `app`.
    pub fn for_event<'a>(
        &'a self,
        event_type: &str,
        app: &'a str,
    ) -> impl Iterator<Item = &'a Registered> + 'a {
        self.get(event_type).iter().filter(move |r| r.serves(app))
    }
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

/// Collects handler registrations; two with one name are an error at
/// [`RegistryBuilder::build`].
#[derive(Clone, Default)]
pub struct RegistryBuilder {
    entries: Vec<Entry>,
    /// The name [`Registrations::named`] gave the next registration.
    next_name: Option<String>,
    /// Unnamed registrations so far, per event type (for `<type>#<n>`).
    unnamed: HashMap<String, usize>,
}

/// One registration, before [`RegistryBuilder::build`].
#[derive(Clone)]
struct Entry {
    name: String,
    event_type: String,
    handler: Arc<dyn Handler>,
    /// The app it is limited to (see [`RegistryBuilder::for_app`]).
    app: Option<Arc<str>>,
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
        /// [`Registrations::on`] for any event type, one typed method per known type, and
        /// [`Registrations::named`] to name the next one.
        pub trait Registrations: Sized {
            /// Registers `handler` for `event_type` (any type, known or not), beside any
            /// other handlers of that type.
            fn on(self, event_type: &str, handler: impl Handler) -> Self;

            /// Names the next registration (instead of `<event type>#<n>`).
            fn named(self, name: &str) -> Self;

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
    /// `robot_message`: a message to the app's robot (Stream or its HTTP endpoint).
    on_robot_message => event::ROBOT_MESSAGE, Event::RobotMessage, RobotMessage;
    /// Internal `dinghook_attendance_lookup`.
    on_attendance_lookup => event::ATTENDANCE_LOOKUP, Event::AttendanceLookup, AttendanceLookup;
    /// Internal `dinghook_send_result_check`.
    on_send_result_check => event::SEND_RESULT_CHECK, Event::SendResultCheck, SendResultCheck;
}

impl Registrations for RegistryBuilder {
    fn on(mut self, event_type: &str, handler: impl Handler) -> Self {
        let name = self.next_name.take().unwrap_or_else(|| {
            let n = self.unnamed.entry(event_type.to_owned()).or_insert(0);
            *n += 1;
            format!("{event_type}#{n}")
        });
        self.entries.push(Entry {
            name,
            event_type: event_type.to_owned(),
            handler: Arc::new(handler),
            app: None,
        });
        self
    }

    fn named(mut self, name: &str) -> Self {
        self.next_name = Some(name.to_owned());
        self
    }
}

impl RegistryBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every registration of `other` after this builder's. Their names are kept as they
    /// are (an unnamed one of `other` keeps the number it got there).
    pub fn merge(mut self, other: RegistryBuilder) -> Self {
        self.entries.extend(other.entries);
        self
    }

    /// Limits every registration so far to the events of `app`, and names them
    /// `<name>@<app>` unless `app` is `unscoped_app` (so one app's built-in handlers keep the
    /// names they had before apps existed, and each other app's are its own).
    pub fn for_app(mut self, app: &str, unscoped_app: &str) -> Self {
        let tag: Arc<str> = app.into();
        for entry in &mut self.entries {
            if app != unscoped_app {
                entry.name = format!("{}@{app}", entry.name);
            }
            entry.app = Some(Arc::clone(&tag));
        }
        self
    }

    pub fn build(self) -> Result<Registry, RegistryError> {
        let mut names = std::collections::HashSet::new();
        let mut handlers: HashMap<String, Vec<Registered>> = HashMap::new();
        for Entry {
            name,
            event_type,
            handler,
            app,
        } in self.entries
        {
            if !names.insert(name.clone()) {
                return Err(RegistryError::Duplicate(name));
            }
            handlers.entry(event_type).or_default().push(Registered {
                name: name.into(),
                handler,
                app,
            });
        }
        Ok(Registry { handlers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_handlers_for_one_type_run_in_registration_order() {
        let registry = RegistryBuilder::new()
            .on_chat_update_title(|_, _| async { Ok(()) })
            .named("audit")
            .on("chat_update_title", |_, _| async { Ok(()) })
            .on("chat_update_title", |_, _| async { Ok(()) })
            .on_cool_app_install(|_, _| async { Ok(()) })
            .build()
            .unwrap();
        let names: Vec<&str> = registry
            .get("chat_update_title")
            .iter()
            .map(|r| &*r.name)
            .collect();
        assert_eq!(
            names,
            ["chat_update_title#1", "audit", "chat_update_title#2"]
        );
        assert_eq!(
            &*registry.get("im_cool_app_install")[0].name,
            "im_cool_app_install#1"
        );
        assert!(registry.get("user_add_org").is_empty());
    }

    #[test]
    fn two_handlers_with_one_name_are_refused() {
        let err = RegistryBuilder::new()
            .named("x")
            .on_chat_update_title(|_, _| async { Ok(()) })
            .named("x")
            .on("user_add_org", |_, _| async { Ok(()) })
            .build()
            .err();
        assert_eq!(err, Some(RegistryError::Duplicate("x".into())));
    }

    #[test]
    fn merged_builders_keep_their_names() {
        let builtin = RegistryBuilder::new()
            .named("builtin.chat")
            .on_chat_update_title(|_, _| async { Ok(()) });
        let own = RegistryBuilder::new().on_chat_update_title(|_, _| async { Ok(()) });
        let registry = builtin.merge(own).build().unwrap();
        let names: Vec<&str> = registry
            .get("chat_update_title")
            .iter()
            .map(|r| &*r.name)
            .collect();
        assert_eq!(names, ["builtin.chat", "chat_update_title#1"]);
    }
}

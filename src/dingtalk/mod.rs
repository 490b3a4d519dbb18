//! The one client for every outbound DingTalk call.
//!
//! [`Client`] owns the access token (cached, refreshed ahead of expiry, one fetch in flight),
//! a QPS limiter shared by all calls, the monthly call counter (persisted through
//! [`CallCounter`], so restarts and replicas share it) and the retry policy for DingTalk's
//! throttling and system-busy answers. Each API family lives in its own module and adds typed
//! methods to [`Client`]. Tests and scripts point the client's base URLs at the fake DingTalk, a
//! separate crate (`crates/fake-dingtalk`) that shares no code with this one.

mod attendance;
mod callback;
mod client;
mod config;
mod error;
mod group;
mod lenient;
mod limits;
mod message;
mod quota;
mod robot;
mod todo;
mod token;
mod user;

pub use attendance::{
    AttendanceCheckResult, AttendanceListRequest, AttendanceListResult, AttendanceRecord,
    AttendanceUpdateData,
};
pub use callback::{FailedCallback, FailedCallbackPage};
pub use client::{Client, ClientStats};
pub use config::{ClientConfig, Secret, DEFAULT_API_URL, DEFAULT_OAPI_URL};
pub use error::Error;
pub use group::{CreateSceneGroup, SceneGroupCreated, SceneGroupInfo, SceneGroupManagementOptions};
pub use message::{
    ActionCard, ActionCardButton, ForbiddenEntry, Link, Markdown, OaBody, OaForm, OaHead,
    OaMessage, OaRich, OaStatusBar, SendProgress, SendResult, Text, WorkMessage, WorkNotification,
};
pub use quota::{current_month, month_of, CallCounter, CounterError, MemoryCounter, QuotaStatus};
pub use robot::{
    RobotGroupMessage, RobotOtoMessage, RobotOtoSent, OTO_SEND_PATH, SESSION_GONE_ERRCODE,
    SESSION_WEBHOOK_LABEL,
};
pub use todo::{
    TodoDetailUrl, TodoTask, TodoTaskUpdate, WorkRecord, WorkRecordForm, WorkRecordPage,
};
pub use user::{UserByUnionId, UserDetail};

/// Result type of every client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

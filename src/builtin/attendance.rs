//! `attendance_check_record`: look up what a check-in counted as, keep it, and tell the user.
//!
//! The event only says that someone punched (who, when, where); whether it was on or off duty,
//! late or early, is in DingTalk's attendance results (`attendance/list`). So the event is a
//! trigger: each user punch schedules an internal lookup event (`dinghook_attendance_lookup`)
//! for its user and work date. Punches of one user whose check times fall into the same
//! `coalesce_window` share the lookup's de-duplication key, so a burst of punches (or of
//! re-deliveries) makes one lookup.
//!
//! Lookups running at the same time share their API calls: each asks the handler's
//! [`Batcher`] for its user's day, and one `attendance/list` call (paged by 50 records)
//! answers up to `batch_size` users of one work date. Each lookup event still keeps its own
//! bookkeeping: it stores its user's records in the `attendance` collection (key
//! `user:date`), is retried on its own, and, per `notify`, sends its user one work
//! notification.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{notify, schedule_internal, HandlersConfig};
use crate::batch::{BatchError, Batcher, LoadFuture};
use crate::dingtalk::{
    AttendanceListRequest, AttendanceRecord, Client, Markdown, Text, WorkMessage,
};
use crate::event::{AttendanceLookup, CheckRecord, Event, Punch};
use crate::handler::{Context, HandlerError, Registrations, RegistryBuilder};
use crate::store::Inserted;
use crate::template::Template;
use crate::time::{duration_str, now_millis, UtcOffset};

/// The internal event type of a coalesced lookup.
/// Where the looked-up days are kept, keyed `user:yyyy-MM-dd`.
pub const COLLECTION: &str = "attendance";
/// DingTalk's most users per `attendance/list` call, and its largest page.
pub const MAX_BATCH_SIZE: usize = 50;
/// Pages of one `attendance/list` batch before it is given up as a runaway (50 users with a
/// few shifts each fit in well under ten).
const MAX_PAGES: u32 = 40;

/// Which lookups end in a work notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyMode {
    /// Only when a punch of the window is not Normal (late, early, outside, missed …).
    Abnormal,
    /// After every looked-up punch.
    All,
    /// Never (the lookup is still made and stored).
    Off,
}

/// The work notification's `msgtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    Markdown,
    Text,
}

/// `[handlers.attendance]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttendanceConfig {
    #[serde(deserialize_with = "crate::setting::switch")]
    pub enabled: bool,
    /// `abnormal`, `all` or `off`.
    pub notify: NotifyMode,
    /// Also look up records DingTalk replays itself (`checkByUser: false`, after a
    /// re-scheduling); they are not something the user just did, so by default they are not.
    #[serde(deserialize_with = "crate::setting::switch")]
    pub include_system_replays: bool,
    /// Punches of one user whose check times fall into the same window of this length share
    /// one lookup. The lookup runs one window after the window ends, so late pushes of the
    /// same window still find it pending.
    #[serde(with = "duration_str")]
    pub coalesce_window: Duration,
    /// Lookups running at the same time share `attendance/list` calls: a call is made as soon
    /// as this many distinct users of one work date wait (at most 50, DingTalk's limit) …
    #[serde(deserialize_with = "crate::setting::number")]
    pub batch_size: usize,
    /// … or once the first of them has waited this long.
    #[serde(with = "duration_str")]
    pub batch_linger: Duration,
    /// The organisation's UTC offset: it decides the work date of a check time and how times
    /// are shown. DingTalk's China data centre works in +08:00.
    pub utc_offset: UtcOffset,
    /// `markdown` or `text`.
    pub format: MessageFormat,
    /// The markdown title (shown in the conversation list). Same placeholders as `message`.
    pub title: Template,
    /// Placeholders: see [`MESSAGE_FIELDS`].
    pub message: Template,
}

/// Placeholders of `title` and `message`. The single-punch fields describe the window's most
/// notable punch (the first abnormal one, else the latest); `{summary}` lists them all.
pub const MESSAGE_FIELDS: &[&str] = &[
    "user_id",
    "work_date",
    "check_type",
    "check_type_label",
    "time",
    "time_result",
    "time_result_label",
    "location_result",
    "location_result_label",
    "summary",
    "corp_id",
];

impl Default for AttendanceConfig {
    fn default() -> Self {
        AttendanceConfig {
            enabled: true,
            notify: NotifyMode::Abnormal,
            include_system_replays: false,
            coalesce_window: Duration::from_secs(30),
            batch_size: MAX_BATCH_SIZE,
            batch_linger: Duration::from_millis(50),
            utc_offset: UtcOffset::CHINA,
            format: MessageFormat::Markdown,
            title: Template::from_default("考勤打卡 {work_date}"),
            message: Template::from_default("#### 考勤打卡 {work_date}\n\n{summary}"),
        }
    }
}

impl AttendanceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(format!(
                "handlers.attendance.batch_size: {} is not in 1..={MAX_BATCH_SIZE} (attendance/list takes at most {MAX_BATCH_SIZE} users)",
                self.batch_size
            ));
        }
        self.title
            .check(MESSAGE_FIELDS)
            .map_err(|e| format!("handlers.attendance.title: {e}"))?;
        self.message
            .check(MESSAGE_FIELDS)
            .map_err(|e| format!("handlers.attendance.message: {e}"))
    }

    /// The window in ms, at least 1 (a zero window means: every check time on its own).
    fn window_ms(&self) -> i64 {
        crate::time::millis(self.coalesce_window).max(1)
    }
}

pub fn register(builder: RegistryBuilder, config: &HandlersConfig) -> RegistryBuilder {
    if !config.attendance.enabled {
        return builder;
    }
    let settings = Arc::new(config.clone());
    let on_lookup = Arc::clone(&settings);
    // One batcher for all lookups of this registration, so concurrent lookups share calls.
    let days = Arc::new(day_batcher(&config.attendance));
    builder
        .named("builtin.attendance.check_record")
        .on_attendance_check_record(move |records, ctx| {
            let settings = Arc::clone(&settings);
            async move { schedule_lookups(records, ctx, &settings.attendance).await }
        })
        .named("builtin.attendance.lookup")
        .on_attendance_lookup(move |request, ctx| {
            let settings = Arc::clone(&on_lookup);
            let days = Arc::clone(&days);
            async move { lookup(request, ctx, &settings, &days).await }
        })
}

/// Days of users, batched: the group is the work date (`yyyy-MM-dd`), the keys are user ids,
/// each value is that user's `attendance/list` records of the day. The load runs with the
/// DingTalk client of the lookup that opened the batch (the process has one).
type DayBatcher = Batcher<Client, String, String, Vec<AttendanceRecord>, HandlerError>;

fn day_batcher(config: &AttendanceConfig) -> DayBatcher {
    Batcher::new(
        config.batch_linger,
        config.batch_size.clamp(1, MAX_BATCH_SIZE),
        |client: Client, work_date: String, users: Vec<String>| {
            Box::pin(async move { list_day(&client, &work_date, users).await })
                as LoadFuture<String, Vec<AttendanceRecord>, HandlerError>
        },
    )
}

/// One work date of up to 50 users: `attendance/list` from and to the day, paged by 50
/// records until `hasMore` is false, split by user. A failure of any page fails the batch.
async fn list_day(
    client: &Client,
    work_date: &str,
    users: Vec<String>,
) -> Result<HashMap<String, Vec<AttendanceRecord>>, HandlerError> {
    let day = format!("{work_date} 00:00:00");
    let asked: HashSet<&str> = users.iter().map(String::as_str).collect();
    let mut by_user: HashMap<String, Vec<AttendanceRecord>> = HashMap::new();
    // A record that moved into the next page while we paged is seen twice; keep it once.
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut query = AttendanceListRequest {
        work_date_from: day.clone(),
        work_date_to: day,
        user_id_list: users.clone(),
        offset: 0,
        limit: MAX_BATCH_SIZE as u32,
    };
    for page_number in 1..=MAX_PAGES {
        let page = client.attendance_list(&query).await?;
        let more = page.has_more && !page.records.is_empty();
        for record in page.records {
            let Some(user) = record
                .user_id
                .clone()
                .filter(|u| asked.contains(u.as_str()))
            else {
                tracing::debug!(user = ?record.user_id, "attendance/list record of a user not asked for; ignored");
                continue;
            };
            if let Some(id) = &record.id {
                if !seen.insert((user.clone(), id.clone())) {
                    continue;
                }
            }
            by_user.entry(user).or_default().push(record);
        }
        if !more {
            tracing::debug!(
                work_date,
                users = users.len(),
                pages = page_number,
                "attendance/list batch answered"
            );
            return Ok(by_user);
        }
        query.offset = query.offset.saturating_add(query.limit);
    }
    Err(HandlerError::permanent(format!(
        "attendance/list for {work_date} still had more records after {MAX_PAGES} pages of {MAX_BATCH_SIZE}"
    )))
}

/// The trigger: one lookup per user, work date and window. Public, so a program that turns
/// this built-in off can wrap it in its own handler.
pub async fn schedule_lookups(
    records: Vec<CheckRecord>,
    ctx: Context,
    config: &AttendanceConfig,
) -> Result<(), HandlerError> {
    let window = config.window_ms();
    let mut lookups: Vec<AttendanceLookup> = Vec::new();
    for record in records {
        if !record.check_by_user && !config.include_system_replays {
            tracing::debug!(user = %record.user_id, "system replay of a check-in; not looked up");
            continue;
        }
        // The row's arrival time, not the clock: a retry of this event must compute the
        // same window, or it would schedule a second lookup.
        let at = record.check_time.unwrap_or(ctx.record.received_at);
        let window_start = at.div_euclid(window).saturating_mul(window);
        let work_date = config.utc_offset.date(at);
        let punch = Punch {
            check_time: at,
            location_result: record.location_result.clone(),
            location_method: record.location_method.clone(),
            address: record.address.clone(),
            check_by_user: record.check_by_user,
        };
        match lookups.iter_mut().find(|l| {
            l.user_id == record.user_id
                && l.work_date == work_date
                && l.window_start == window_start
        }) {
            Some(lookup) => lookup.punches.push(punch),
            None => lookups.push(AttendanceLookup {
                user_id: record.user_id.clone(),
                work_date,
                window_start,
                window_end: window_start.saturating_add(window),
                corp_id: record.corp_id.clone(),
                punches: vec![punch],
            }),
        }
    }
    for lookup in lookups {
        let key = format!(
            "attendance-lookup:{}:{}:{}",
            lookup.user_id,
            lookup.work_date,
            lookup.window_start / window
        );
        // One window after the window ends: DingTalk pushes a punch shortly after it is
        // made, so by then the window's later punches have arrived (and were coalesced) and
        // are in DingTalk's data. Old punches (failed-push recovery) are looked up at once.
        let due = now_millis().max(lookup.window_end.saturating_add(window));
        match schedule_internal(&ctx, key.clone(), &Event::AttendanceLookup(lookup), due).await? {
            Inserted::Stored { .. } => {
                tracing::debug!(lookup = %key, due, "attendance lookup scheduled");
            }
            Inserted::Duplicate { .. } => {
                tracing::debug!(lookup = %key, "check-in coalesced into a pending lookup");
            }
        }
    }
    Ok(())
}

/// The lookup: read the day, keep it, notify per `notify`.
async fn lookup(
    request: AttendanceLookup,
    ctx: Context,
    config: &HandlersConfig,
    days: &DayBatcher,
) -> Result<(), HandlerError> {
    let settings = &config.attendance;
    let data = day_data(&ctx, &request, days).await?;
    let offset = settings.utc_offset;
    let items = concerned(&data.records, &request);
    let abnormal = items.iter().any(Item::is_abnormal);
    let send = match settings.notify {
        NotifyMode::Off => false,
        NotifyMode::All => !items.is_empty(),
        NotifyMode::Abnormal => abnormal,
    };
    if !send {
        tracing::debug!(user = %request.user_id, date = %request.work_date, abnormal, "attendance looked up; no notification");
        return Ok(());
    }
    let fields = MessageFields::new(&request, &items, offset);
    let pairs = fields.pairs();
    let text = settings.message.render_with(&pairs);
    let msg = match settings.format {
        MessageFormat::Markdown => WorkMessage::Markdown {
            markdown: Markdown {
                title: settings.title.render_with(&pairs),
                text,
            },
        },
        MessageFormat::Text => WorkMessage::Text {
            text: Text { content: text },
        },
    };
    notify::send(
        &ctx,
        config,
        "attendance",
        "notify",
        vec![request.user_id.clone()],
        msg,
    )
    .await?;
    Ok(())
}

/// What a lookup keeps of its user's day (the document's `data`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DayData {
    /// The user's `attendance/list` records of the day (DingTalk's camelCase fields), one per
    /// planned check: punched or not, with `timeResult` and `locationResult`. No default: a
    /// document of an older shape does not read as an empty day.
    records: Vec<AttendanceRecord>,
}

/// The day's data: what this lookup event already read (a retry must not call again nor
/// decide on different data), else the user's records from a batched `attendance/list`,
/// stored before they are used.
async fn day_data(
    ctx: &Context,
    request: &AttendanceLookup,
    days: &DayBatcher,
) -> Result<DayData, HandlerError> {
    let key = format!("{}:{}", request.user_id, request.work_date);
    let event_key = &ctx.record.dedup_key;
    if let Some(doc) = ctx.store.get_document(COLLECTION, &key).await? {
        if doc.body.get("lookup_event").and_then(Value::as_str) == Some(event_key.as_str()) {
            if let Some(Ok(data)) = doc
                .body
                .get("data")
                .map(|d| serde_json::from_value::<DayData>(d.clone()))
            {
                return Ok(data);
            }
        }
    }
    let client = ctx.dingtalk()?.clone();
    let records = days
        .load(client, request.work_date.clone(), request.user_id.clone())
        .await
        .map_err(|e| match e {
            BatchError::Load(e) => e,
            BatchError::Dropped => {
                HandlerError::transient("the attendance/list batch ended without an answer")
            }
        })?
        .unwrap_or_default();
    let data = DayData { records };
    let stored = serde_json::to_value(&data)
        .map_err(|e| HandlerError::permanent(format!("attendance records: {e}")))?;
    let body = json!({
        "user_id": request.user_id,
        "work_date": request.work_date,
        "corp_id": request.corp_id,
        "lookup_event": event_key,
        "looked_up_at": now_millis(),
        "source": "attendance/list",
        "data": stored,
    });
    ctx.store
        .put_document(COLLECTION, &key, &body, now_millis())
        .await?;
    Ok(data)
}

/// One result the notification talks about.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    check_type: Option<String>,
    /// The punch (epoch ms); none for a missed check.
    time: Option<i64>,
    /// The planned time, for ordering and for missed checks.
    planned: Option<i64>,
    time_result: Option<String>,
    location_result: Option<String>,
}

impl Item {
    fn is_abnormal(&self) -> bool {
        let off = |v: &Option<String>| {
            v.as_deref()
                .is_some_and(|r| !r.is_empty() && !r.eq_ignore_ascii_case("Normal"))
        };
        off(&self.time_result) || off(&self.location_result)
    }

    fn sort_key(&self) -> i64 {
        self.time.or(self.planned).unwrap_or(i64::MAX)
    }
}

/// The results that concern this window: those whose punch lies in it (a second of slack
/// below, as DingTalk shows times to the second), and checks missed (`NotSigned`) whose
/// planned time has passed by the window's end. If DingTalk's results show none of the
/// window's punches (a repeated punch that did not count, or data not updated yet), the
/// event's own punches stand in, with what the event knows (the location result).
fn concerned(records: &[AttendanceRecord], request: &AttendanceLookup) -> Vec<Item> {
    let low = request.window_start.saturating_sub(1000);
    let high = request.window_end;
    let mut items: Vec<Item> = records
        .iter()
        .filter_map(|r| {
            let time = r.user_check_time;
            let planned = r.base_check_time;
            let punched_here = time.is_some_and(|t| t >= low && t < high);
            let missed = r
                .time_result
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("NotSigned"))
                && planned.is_some_and(|p| p < high);
            (punched_here || missed).then(|| Item {
                check_type: r.check_type.clone(),
                // attendance/list gives a missed check its planned time as `userCheckTime`;
                // that is no punch.
                time: if missed { None } else { time },
                planned,
                time_result: r.time_result.clone(),
                location_result: r.location_result.clone(),
            })
        })
        .collect();
    if !items.iter().any(|i| i.time.is_some()) {
        items.extend(request.punches.iter().map(|p| Item {
            check_type: None,
            time: Some(p.check_time),
            planned: None,
            time_result: None,
            location_result: p.location_result.clone(),
        }));
    }
    items.sort_by_key(Item::sort_key);
    items
}

/// The template's values.
struct MessageFields {
    user_id: String,
    work_date: String,
    corp_id: String,
    check_type: String,
    check_type_label: String,
    time: String,
    time_result: String,
    time_result_label: String,
    location_result: String,
    location_result_label: String,
    summary: String,
}

impl MessageFields {
    fn new(request: &AttendanceLookup, items: &[Item], offset: UtcOffset) -> Self {
        let main = items
            .iter()
            .find(|i| i.is_abnormal())
            .or_else(|| items.last());
        let text = |v: Option<&String>| v.cloned().unwrap_or_default();
        let time_of = |i: &Item| {
            i.time
                .or(i.planned)
                .map(|t| offset.clock(t))
                .unwrap_or_default()
        };
        let summary = items
            .iter()
            .map(|i| summary_line(i, offset))
            .collect::<Vec<_>>()
            .join("\n");
        MessageFields {
            user_id: request.user_id.clone(),
            work_date: request.work_date.clone(),
            corp_id: request.corp_id.clone().unwrap_or_default(),
            check_type: text(main.and_then(|m| m.check_type.as_ref())),
            check_type_label: check_type_label(main.and_then(|m| m.check_type.as_deref()))
                .to_owned(),
            time: main.map(time_of).unwrap_or_default(),
            time_result: text(main.and_then(|m| m.time_result.as_ref())),
            time_result_label: main
                .and_then(|m| m.time_result.as_deref())
                .map(result_label)
                .unwrap_or_default(),
            location_result: text(main.and_then(|m| m.location_result.as_ref())),
            location_result_label: main
                .and_then(|m| m.location_result.as_deref())
                .map(result_label)
                .unwrap_or_default(),
            summary,
        }
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        vec![
            ("user_id", &self.user_id),
            ("work_date", &self.work_date),
            ("corp_id", &self.corp_id),
            ("check_type", &self.check_type),
            ("check_type_label", &self.check_type_label),
            ("time", &self.time),
            ("time_result", &self.time_result),
            ("time_result_label", &self.time_result_label),
            ("location_result", &self.location_result),
            ("location_result_label", &self.location_result_label),
            ("summary", &self.summary),
        ]
    }
}

/// `- 上班 09:05 迟到 (Late) · 外勤 (Outside)`; a markdown list item that reads as plain text.
fn summary_line(item: &Item, offset: UtcOffset) -> String {
    let mut line = format!("- {}", check_type_label(item.check_type.as_deref()));
    if let Some(t) = item.time {
        line.push(' ');
        line.push_str(&offset.clock(t));
    } else if let Some(p) = item.planned {
        line.push_str(&format!(" ({})", offset.clock(p)));
    }
    match item.time_result.as_deref() {
        Some(r) if !r.is_empty() => line.push_str(&format!(" {} ({r})", result_label(r))),
        _ => line.push_str(" 已记录"),
    }
    if let Some(l) = item.location_result.as_deref() {
        let missed = item
            .time_result
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(l));
        if !l.is_empty() && !l.eq_ignore_ascii_case("Normal") && !missed {
            line.push_str(&format!(" · {} ({l})", result_label(l)));
        }
    }
    line
}

fn check_type_label(check_type: Option<&str>) -> &'static str {
    match check_type {
        Some("OnDuty") => "上班",
        Some("OffDuty") => "下班",
        _ => "打卡",
    }
}

/// DingTalk's result codes in the words its app uses; unknown codes stay as they are.
fn result_label(result: &str) -> String {
    match result {
        "Normal" => "正常",
        "Early" => "早退",
        "Late" => "迟到",
        "SeriousLate" => "严重迟到",
        "Absenteeism" => "旷工迟到",
        "NotSigned" => "缺卡",
        "Outside" => "外勤",
        other => other,
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `attendance/list` record; like DingTalk, a missed check (no `user`) carries its
    /// planned time as `userCheckTime`.
    fn result(
        check_type: &str,
        user: Option<&str>,
        plan: &str,
        time: &str,
        loc: &str,
    ) -> AttendanceRecord {
        let china = UtcOffset::CHINA;
        let planned = china.parse_time(plan);
        AttendanceRecord {
            user_id: Some("u1".into()),
            check_type: Some(check_type.into()),
            time_result: Some(time.into()),
            location_result: Some(loc.into()),
            user_check_time: user.and_then(|u| china.parse_time(u)).or(planned),
            base_check_time: planned,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_windows_results_and_missed_checks_concern_it() {
        let china = UtcOffset::CHINA;
        let start = china.parse_time("2024-05-06 18:02:00").unwrap();
        let request = AttendanceLookup {
            user_id: "u1".into(),
            work_date: "2024-05-06".into(),
            window_start: start,
            window_end: start + 30_000,
            corp_id: None,
            punches: vec![],
        };
        let records = vec![
            result(
                "OnDuty",
                None,
                "2024-05-06 09:00:00",
                "NotSigned",
                "NotSigned",
            ),
            result(
                "OffDuty",
                Some("2024-05-06 18:02:10"),
                "2024-05-06 18:00:00",
                "Normal",
                "Normal",
            ),
            result(
                "OnDuty",
                Some("2024-05-06 08:59:00"),
                "2024-05-06 09:00:00",
                "Late",
                "Normal",
            ),
        ];
        let items = concerned(&records, &request);
        assert_eq!(items.len(), 2, "{items:?}");
        assert!(items[0].is_abnormal() && items[0].time.is_none());
        assert!(!items[1].is_abnormal());
        let fields = MessageFields::new(&request, &items, china);
        assert_eq!(fields.time_result, "NotSigned");
        assert_eq!(fields.time, "09:00");
        assert_eq!(
            fields.summary,
            "- 上班 (09:00) 缺卡 (NotSigned)\n- 下班 18:02 正常 (Normal)"
        );
    }

    #[test]
    fn without_a_result_the_events_punch_stands_in() {
        let china = UtcOffset::CHINA;
        let at = china.parse_time("2024-05-06 12:00:00").unwrap();
        let request = AttendanceLookup {
            user_id: "u1".into(),
            work_date: "2024-05-06".into(),
            window_start: at,
            window_end: at + 30_000,
            corp_id: None,
            punches: vec![Punch {
                check_time: at,
                location_result: Some("Outside".into()),
                location_method: None,
                address: None,
                check_by_user: true,
            }],
        };
        let items = concerned(&[], &request);
        assert_eq!(items.len(), 1);
        assert!(items[0].is_abnormal());
        assert_eq!(
            summary_line(&items[0], china),
            "- 打卡 12:00 已记录 · 外勤 (Outside)"
        );
    }

    #[test]
    fn kept_records_read_back_the_same_and_older_documents_do_not_read_as_empty() {
        let data: DayData = serde_json::from_value(json!({"records": [
            {"id": 260694657296_i64, "userId": "u1", "workDate": 1666195200000_i64,
             "checkType": "OnDuty", "timeResult": "NotSigned", "locationResult": "NotSigned",
             "userCheckTime": 1666227600000_i64, "baseCheckTime": "1666227600000",
             "planId": 437360727696_i64, "sourceType": "SYSTEM", "userAddress": "HQ"}]}))
        .unwrap();
        let record = &data.records[0];
        assert_eq!(record.id.as_deref(), Some("260694657296"));
        assert_eq!(record.base_check_time, Some(1_666_227_600_000));
        assert_eq!(record.extra["userAddress"], "HQ");
        let kept = serde_json::to_value(&data).unwrap();
        assert_eq!(kept["records"][0]["timeResult"], "NotSigned");
        let again: DayData = serde_json::from_value(kept).unwrap();
        assert_eq!(again.records, data.records);
        // The getupdatedata shape of earlier versions: looked up afresh, not taken as no data.
        let older = json!({"attendance_result_list": [], "check_record_list": []});
        assert!(serde_json::from_value::<DayData>(older).is_err());
    }

    #[test]
    fn batch_size_beyond_dingtalks_limit_is_refused() {
        let mut config = AttendanceConfig::default();
        for bad in [0, 51] {
            config.batch_size = bad;
            let err = config.validate().unwrap_err();
            assert!(err.contains("handlers.attendance.batch_size"), "{err}");
        }
        config.batch_size = 1;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn the_shipped_config_documents_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dinghook.toml");
        let file: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let section = file["handlers"]["attendance"].clone();
        let shipped: AttendanceConfig = section.try_into().unwrap();
        assert_eq!(shipped, AttendanceConfig::default());
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let mut config = AttendanceConfig::default();
        assert!(config.validate().is_ok());
        config.message = Template::parse("{user} late").unwrap();
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("handlers.attendance.message") && err.contains("user"),
            "{err}"
        );
    }
}

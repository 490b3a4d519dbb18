//! The HTTP API over real HTTP, on its own listener, against the fake DingTalk: tokens and
//! scopes, problem+json errors, events (pages, show, replay), apps, routes and deliveries,
//! actions end to end (idempotency, dead letters, the quota reserve, the war room), the
//! OpenAPI document and `dinghook act`. On SQLite, and on PostgreSQL when
//! `DINGHOOK_TEST_PG_URL` is set.

mod support;

use std::time::Duration;

use fake_dingtalk::FakeDingTalk;
use serde_json::{json, Value};
use support::stores::fresh_postgres_database;
use support::{seal, sender, TestApp};

use dinghook::api::{Scope, TokenConfig};
use dinghook::routes::config::RouteConfig;
use dinghook::secret::Secret;
use dinghook::store::EventState;

/// Every scope, every app (`DINGHOOK_API_TOKEN`).
const ADMIN: &str = "admin-token-0123456789abcdef";
/// `read` on the default app only.
const READER: &str = "reader-token-0123456789abcdef";
/// `act` and `read` on app `ops` only.
const OPS_ACTOR: &str = "ops-actor-token-0123456789abcdef";

fn sha(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn ops_app(fake_url: &str) -> std::collections::BTreeMap<String, figment::value::Value> {
    toml::from_str(&format!(
        r#"
[ops]
token = "ops-token-aaaa"
aes_key = "zyxwvutsrqponmlkjihgfedcba9876543210ABCDEFG"
owner_key = "dingopsowner"
app_key = "dingopsapp"
app_secret = "ops-secret"
agent_id = 777
oapi_url = "{fake_url}"
api_url = "{fake_url}"
"#
    ))
    .unwrap()
}

struct Api {
    app: TestApp,
    fake: FakeDingTalk,
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn start(
        pg: Option<String>,
        customize: impl FnOnce(&mut dinghook::config::Config),
    ) -> Api {
        let (fake, fake_url) = FakeDingTalk::spawn().await.unwrap();
        let url = fake_url.clone();
        let app = TestApp::spawn_builtin_on(
            &fake_url,
            move |config| {
                if let Some(pg) = pg {
                    config.store.url = pg;
                }
                config.api.listen = "127.0.0.1:0".into();
                config.api.token = Secret::new(ADMIN);
                config.api.tokens = vec![
                    TokenConfig {
                        name: "reader".into(),
                        sha256: Some(sha(READER)),
                        token_file: None,
                        scopes: vec![Scope::Read],
                        apps: vec!["default".into()],
                    },
                    TokenConfig {
                        name: "ops-actor".into(),
                        sha256: Some(sha(OPS_ACTOR)),
                        token_file: None,
                        scopes: vec![Scope::Act, Scope::Read],
                        apps: vec!["ops".into()],
                    },
                ];
                config.apps = ops_app(&url);
                customize(config);
            },
            |store| store,
        )
        .await;
        let base = format!("http://{}", app.api_addr.expect("the API listens"));
        Api {
            app,
            fake,
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request.send().await.unwrap()).await
    }

    async fn post(&self, path: &str, token: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send().await.unwrap()).await
    }

    /// Waits until action `id` is `done` or `dead`, and returns it.
    async fn settled(&self, id: i64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, action) = self
                .get(&format!("/api/v1/actions/{id}"), Some(ADMIN))
                .await;
            assert_eq!(status, 200, "{action}");
            if action["state"] == "done" || action["state"] == "dead" {
                return action;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "action {id} stuck: {action}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Status and JSON body; an error must be problem+json.
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(content_type, "application/problem+json", "{status} {body}");
        assert_eq!(body["status"], status, "{body}");
        let code = body["code"].as_str().expect("a code");
        assert_eq!(body["type"], format!("urn:dinghook:problem:{code}"));
        assert!(
            body["title"].is_string() && body["detail"].is_string(),
            "{body}"
        );
    }
    (status, body)
}

fn assert_problem(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
}

fn text_notification(users: &[&str], content: &str) -> Value {
    json!({
        "type": "work_notification",
        "userid_list": users,
        "msg": {"msgtype": "text", "text": {"content": content}}
    })
}

async fn post_events(api: &Api, n: usize, event_type: &str) {
    let cipher = sender();
    for i in 0..n {
        let msg = json!({"EventType": event_type, "eventId": format!("evt-{event_type}-{i}"), "CorpId": "dingcorp"})
            .to_string();
        let response = api.app.post_sealed(&seal(&cipher, &msg)).await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn tokens_scopes_and_errors_are_problems() {
    let api = Api::start(None, |_| {}).await;
    // The public port has no API.
    let public = reqwest::get(api.app.url("/api/v1/events")).await.unwrap();
    assert_eq!(public.status(), 404);

    for token in [None, Some("wrong-token-0123456789abcdef")] {
        let missing = api.get("/api/v1/events", token).await;
        assert_problem(&missing, 401, "unauthorized");
    }
    let raw = api
        .http
        .get(format!("{}/api/v1/events", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw.headers()["www-authenticate"],
        "Bearer realm=\"dinghook\""
    );

    // The reader reads its app, not another's, and cannot act.
    assert_eq!(api.get("/api/v1/events", Some(READER)).await.0, 200);
    assert_problem(
        &api.get("/api/v1/events?app=ops", Some(READER)).await,
        403,
        "forbidden",
    );
    assert_problem(
        &api.get("/api/v1/apps/ops", Some(READER)).await,
        403,
        "forbidden",
    );
    let acting = api
        .post(
            "/api/v1/apps/default/actions",
            READER,
            Some("k1"),
            &text_notification(&["alice"], "hi"),
        )
        .await;
    assert_problem(&acting, 403, "forbidden");
    // The ops actor may act on ops only; admin scope is needed to pause a route.
    let elsewhere = api
        .post(
            "/api/v1/apps/default/actions",
            OPS_ACTOR,
            Some("k1"),
            &text_notification(&["alice"], "hi"),
        )
        .await;
    assert_problem(&elsewhere, 403, "forbidden");

    // Every kind of bad request is a problem with a stable code.
    assert_problem(
        &api.get("/api/v1/nothing", Some(ADMIN)).await,
        404,
        "not_found",
    );
    assert_problem(
        &api.get("/api/v1/events/abc", Some(ADMIN)).await,
        404,
        "not_found",
    );
    assert_problem(
        &api.get("/api/v1/events/999999", Some(ADMIN)).await,
        404,
        "not_found",
    );
    assert_problem(
        &api.get("/api/v1/apps/nope", Some(ADMIN)).await,
        404,
        "unknown_app",
    );
    assert_problem(
        &api.get("/api/v1/events?state=sleeping", Some(ADMIN)).await,
        422,
        "invalid_request",
    );
    assert_problem(
        &api.get("/api/v1/events?colour=red", Some(ADMIN)).await,
        422,
        "invalid_request",
    );
    assert_problem(
        &api.get("/api/v1/events?limit=0", Some(ADMIN)).await,
        422,
        "invalid_request",
    );
    assert_problem(
        &api.get("/api/v1/events?cursor=zzz", Some(ADMIN)).await,
        422,
        "invalid_request",
    );
    let wrong_method = api
        .http
        .delete(format!("{}/api/v1/events", api.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_problem(&answer(wrong_method).await, 405, "method_not_allowed");
    let actions = format!("{}/api/v1/apps/default/actions", api.base);
    let as_text = api
        .http
        .post(&actions)
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "k")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(&answer(as_text).await, 415, "unsupported_media_type");
    let not_json = api
        .http
        .post(&actions)
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "k")
        .header("content-type", "application/json")
        .body("{\"type\": ")
        .send()
        .await
        .unwrap();
    assert_problem(&answer(not_json).await, 400, "invalid_json");
    let huge = api
        .http
        .post(&actions)
        .bearer_auth(ADMIN)
        .header("Idempotency-Key", "k")
        .header("content-type", "application/json")
        .body(format!("{{\"x\": \"{}\"}}", "a".repeat(300 * 1024)))
        .send()
        .await
        .unwrap();
    assert_problem(&answer(huge).await, 413, "payload_too_large");
    let no_key = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            None,
            &text_notification(&["a"], "x"),
        )
        .await;
    assert_problem(&no_key, 400, "missing_idempotency_key");
    let unknown_type = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("k"),
            &json!({"type": "fax"}),
        )
        .await;
    assert_problem(&unknown_type, 422, "invalid_action");
    assert_eq!(unknown_type.1["field"], "type");
    let unknown_field = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("k"),
            &json!({"type": "recall", "task_id": 1, "colour": "red"}),
        )
        .await;
    assert_problem(&unknown_field, 422, "invalid_action");
    let no_app = api
        .post(
            "/api/v1/apps/nope/actions",
            ADMIN,
            Some("k"),
            &text_notification(&["a"], "x"),
        )
        .await;
    assert_problem(&no_app, 404, "unknown_app");
    // Nothing of the above was stored.
    assert_eq!(api.app.store.count().await.unwrap(), 0);

    // The document is public and lists every route.
    let (status, document) = api.get("/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/events",
        "/api/v1/events/{id}",
        "/api/v1/events/{id}/replay",
        "/api/v1/events/replay",
        "/api/v1/apps",
        "/api/v1/apps/{app}",
        "/api/v1/apps/{app}/actions",
        "/api/v1/actions/{id}",
        "/api/v1/routes",
        "/api/v1/routes/{name}/pause",
        "/api/v1/routes/{name}/resume",
        "/api/v1/deliveries",
        "/api/v1/deliveries/{id}",
        "/api/v1/deliveries/{id}/replay",
        "/api/v1/deliveries/replay",
    ] {
        assert!(document["paths"].get(path).is_some(), "{path} missing");
    }
    api.app.stop().await;
}

#[test]
fn the_checked_in_openapi_document_is_the_generated_one() {
    let generated = dinghook::api::openapi::json();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    if std::env::var_os("DINGHOOK_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, format!("{generated}\n")).unwrap();
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(
        checked_in.trim_end(),
        generated,
        "docs/openapi.json is stale: run DINGHOOK_UPDATE_OPENAPI=1 cargo test --test api the_checked_in"
    );
}

async fn events_pages_and_replay(pg: Option<String>) {
    let api = Api::start(pg, |_| {}).await;
    post_events(&api, 5, "crm_custom_a").await;
    post_events(&api, 2, "crm_custom_b").await;
    let all = api.app.store.count().await.unwrap();
    assert_eq!(all, 7);

    // Pages of three, newest first, each id once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/events?limit=3&cursor={c}"),
            None => "/api/v1/events?limit=3".to_owned(),
        };
        let (status, page) = api.get(&path, Some(READER)).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|e| e["id"].as_i64().unwrap()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, no repeats");
    assert_eq!(seen.len(), 7);

    let (_, typed) = api
        .get("/api/v1/events?type=crm_custom_b", Some(ADMIN))
        .await;
    let typed = typed["items"].as_array().unwrap().clone();
    assert_eq!(typed.len(), 2);
    assert_eq!(typed[0]["app"], "default");
    assert_eq!(typed[0]["dedup_key"], "event:evt-crm_custom_b-1");
    // Since the older of the two: both (and only events received since).
    let since = typed[1]["received_at"].as_i64().unwrap();
    let (_, recent) = api
        .get(
            &format!("/api/v1/events?since={since}&limit=500"),
            Some(ADMIN),
        )
        .await;
    let recent = recent["items"].as_array().unwrap().clone();
    assert!(recent.len() >= 2, "{recent:?}");
    assert!(recent
        .iter()
        .all(|e| e["received_at"].as_i64().unwrap() >= since));
    let (_, future) = api
        .get("/api/v1/events?since=2100-01-01T00:00:00Z", Some(ADMIN))
        .await;
    assert_eq!(future["items"].as_array().unwrap().len(), 0);
    let (_, ops_only) = api.get("/api/v1/events?app=ops", Some(ADMIN)).await;
    assert_eq!(ops_only["items"].as_array().unwrap().len(), 0);

    // One event with its payload; once it has run, replay puts it back.
    let id = typed[0]["id"].as_i64().unwrap();
    let done = api
        .app
        .wait_for_state("event:evt-crm_custom_b-1", EventState::Done)
        .await;
    assert_eq!(done.id, id);
    let (status, shown) = api.get(&format!("/api/v1/events/{id}"), Some(READER)).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["payload"]["eventId"], "evt-crm_custom_b-1");
    assert_eq!(shown["state"], "done");
    assert_eq!(shown["runs"].as_array().unwrap().len(), 1, "{shown}");
    assert!(shown["deliveries"].as_array().unwrap().is_empty());
    // The reader may not replay.
    assert_problem(
        &api.post(
            &format!("/api/v1/events/{id}/replay"),
            READER,
            None,
            &json!({}),
        )
        .await,
        403,
        "forbidden",
    );
    let (status, replayed) = api
        .post(
            &format!("/api/v1/events/{id}/replay"),
            ADMIN,
            None,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], 1);
    api.app
        .wait_for_state("event:evt-crm_custom_b-1", EventState::Done)
        .await;
    // Both runs are shown, oldest first: the first, and the replay's (counted from 1 again).
    let (_, shown) = api.get(&format!("/api/v1/events/{id}"), Some(READER)).await;
    let runs = shown["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{shown}");
    for run in runs {
        assert_eq!(
            (run["attempt"].as_i64(), run["outcome"].as_str()),
            (Some(1), Some("done"))
        );
        assert!(
            run["finished_at"].as_i64() >= run["started_at"].as_i64(),
            "{run}"
        );
        assert!(run["worker"].is_string(), "{run}");
        assert!(run["error"].is_null(), "{run}");
    }
    assert!(runs[0]["finished_at"].as_i64() <= runs[1]["started_at"].as_i64());

    // A filter replay: every done event of one type.
    for i in 0..5 {
        api.app
            .wait_for_state(&format!("event:evt-crm_custom_a-{i}"), EventState::Done)
            .await;
    }
    let (status, many) = api
        .post(
            "/api/v1/events/replay",
            ADMIN,
            None,
            &json!({"state": "done", "type": "crm_custom_a"}),
        )
        .await;
    assert_eq!(status, 200, "{many}");
    assert_eq!(many["replayed"], 5);
    assert_problem(
        &api.post("/api/v1/events/replay", ADMIN, None, &json!({}))
            .await,
        422,
        "invalid_request",
    );
    assert_problem(
        &api.post(
            "/api/v1/events/replay",
            ADMIN,
            None,
            &json!({"ids": [1], "state": "dead"}),
        )
        .await,
        422,
        "invalid_request",
    );
    // Writes are audited by token name, never the token.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = api.app.store.list_documents("audit", 100).await.unwrap();
    assert!(audit.len() >= 3, "{audit:?}");
    let text = serde_json::to_string(&audit.iter().map(|d| &d.body).collect::<Vec<_>>()).unwrap();
    assert!(text.contains("\"token\":\"api.token\""), "{text}");
    assert!(text.contains("\"token\":\"reader\""), "{text}");
    assert!(!text.contains(ADMIN) && !text.contains(READER));
    api.app.stop().await;
}

#[tokio::test]
async fn events_are_paged_shown_and_replayed_on_sqlite() {
    events_pages_and_replay(None).await;
}

#[tokio::test]
async fn events_are_paged_shown_and_replayed_on_postgres() {
    let Some(url) = fresh_postgres_database().await else {
        return;
    };
    events_pages_and_replay(Some(url)).await;
}

async fn actions_end_to_end(pg: Option<String>) {
    let api = Api::start(pg, |_| {}).await;
    api.fake.add_user(json!({"userid": "alice", "unionid": "union-alice", "name": "Alice", "mobile": "13800000001", "active": true}));
    api.fake.add_user(json!({"userid": "bob", "unionid": "union-bob", "name": "Bob", "mobile": "13800000002", "active": true}));

    // A work notification: queued, run once, its task id recorded.
    let body = text_notification(&["alice"], "disk full on db-1");
    let (status, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-42-notify"),
            &body,
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["state"], "queued");
    let id = queued["id"].as_i64().unwrap();
    let done = api.settled(id).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["type"], "work_notification");
    assert_eq!(done["requested_by"], "api.token");
    assert!(done["result"]["task_id"].as_i64().unwrap() > 0, "{done}");
    let sends = api
        .fake
        .calls_to("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].body.as_ref().unwrap()["agent_id"], 4242);

    // The same key and body: the same action, nothing sent again.
    let (status, again) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-42-notify"),
            &body,
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], id);
    assert_eq!(again["state"], "done");
    // The same key, another body: refused.
    let conflict = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-42-notify"),
            &text_notification(&["alice"], "another text"),
        )
        .await;
    assert_problem(&conflict, 409, "idempotency_conflict");
    // Keys are per app: ops may use the same one.
    let (status, on_ops) = api
        .post(
            "/api/v1/apps/ops/actions",
            OPS_ACTOR,
            Some("incident-42-notify"),
            &body,
        )
        .await;
    assert_eq!(status, 202, "{on_ops}");
    let ops_done = api.settled(on_ops["id"].as_i64().unwrap()).await;
    assert_eq!(ops_done["app"], "ops");
    assert_eq!(
        api.fake
            .calls_to("/topapi/message/corpconversation/asyncsend_v2")
            .len(),
        2
    );
    // The reader cannot see ops's action; ops's actor cannot see default's.
    assert_problem(
        &api.get(&format!("/api/v1/actions/{}", on_ops["id"]), Some(READER))
            .await,
        404,
        "not_found",
    );
    assert_problem(
        &api.get(&format!("/api/v1/actions/{id}"), Some(OPS_ACTOR))
            .await,
        404,
        "not_found",
    );

    // A war room: members by user id and by mobile, DingTalk's uuid from the key; then a
    // message into it.
    api.fake.add_scene_template("tpl-incident");
    let war_room = json!({
        "type": "war_room", "title": "INC-42 db-1 disk full", "template_id": "tpl-incident",
        "owner_user_id": "alice", "user_ids": ["alice"], "mobiles": ["13800000002"]
    });
    let (status, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-42-room"),
            &war_room,
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let room = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(room["state"], "done", "{room}");
    let cid = room["result"]["open_conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(room["result"]["user_ids"], json!(["alice", "bob"]));
    let created = api.fake.calls_to("/v1.0/im/sceneGroup/create");
    assert_eq!(created.len(), 1);
    let uuid = created[0].body.as_ref().unwrap()["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(uuid.len(), 32);
    let message = json!({
        "type": "group_message", "open_conversation_id": cid, "robot_code": "dingrobot",
        "msg_key": "sampleText", "msg_param": {"content": "war room open; @alice owns it"}
    });
    let (status, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-42-post"),
            &message,
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let posted = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(posted["state"], "done", "{posted}");
    assert!(
        posted["result"]["process_query_key"].is_string(),
        "{posted}"
    );

    // DingTalk refuses (a template it does not know): dead, with DingTalk's reason.
    let bad_room = json!({
        "type": "war_room", "title": "INC-43", "template_id": "tpl-unknown", "owner_user_id": "alice"
    });
    let (_, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("incident-43-room"),
            &bad_room,
        )
        .await;
    let dead = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(dead["state"], "dead", "{dead}");
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .contains("groupTemplate.notFound"),
        "{dead}"
    );
    assert_eq!(dead["result"], Value::Null);
    // The action's event shows the run that killed it, with DingTalk's reason.
    let (_, event) = api
        .get(&format!("/api/v1/events/{}", dead["id"]), Some(ADMIN))
        .await;
    let last = event["runs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "dead", "{event}");
    assert_eq!(last["error"], dead["error"], "{event}");
    // No route takes `dinghook.action.*` here: no completion is stored.
    for kind in ["done", "dead"] {
        let (_, told) = api
            .get(
                &format!("/api/v1/events?type=dinghook.action.{kind}"),
                Some(ADMIN),
            )
            .await;
        assert_eq!(told["items"], json!([]), "{told}");
    }
    api.app.stop().await;
}

#[tokio::test]
async fn actions_run_once_each_on_sqlite() {
    actions_end_to_end(None).await;
}

#[tokio::test]
async fn actions_run_once_each_on_postgres() {
    let Some(url) = fresh_postgres_database().await else {
        return;
    };
    actions_end_to_end(Some(url)).await;
}

#[tokio::test]
async fn notifications_wait_for_the_quota_reserve_but_other_actions_run() {
    let api = Api::start(None, |config| {
        config.dingtalk.monthly_quota = 1_000;
        config.handlers.notify_quota_reserve = 2_000;
    })
    .await;
    api.fake
        .add_user(json!({"userid": "alice", "unionid": "union-alice", "active": true}));
    let (status, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("n1"),
            &text_notification(&["alice"], "over the reserve"),
        )
        .await;
    assert_eq!(status, 202);
    let refused = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(refused["state"], "dead", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("notification reserve"),
        "{refused}"
    );
    assert!(api
        .fake
        .calls_to("/topapi/message/corpconversation/asyncsend_v2")
        .is_empty());
    // A to-do update is bookkeeping: it runs.
    api.fake.add_todo_task(
        "union-alice",
        json!({"id": "task-1", "subject": "fix db-1", "done": false}),
    );
    let (_, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("t1"),
            &json!({"type": "todo_update", "union_id": "union-alice", "task_id": "task-1", "done": true}),
        )
        .await;
    let updated = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(updated["state"], "done", "{updated}");
    api.app.stop().await;
}

#[tokio::test]
async fn apps_show_their_health_on_sqlite() {
    apps_show_their_health(None).await;
}

#[tokio::test]
async fn apps_show_their_health_on_postgres() {
    let Some(url) = fresh_postgres_database().await else {
        return;
    };
    apps_show_their_health(Some(url)).await;
}

async fn apps_show_their_health(pg: Option<String>) {
    let api = Api::start(pg, |_| {}).await;
    post_events(&api, 2, "crm_custom_a").await;
    // A forged callback is counted against the app.
    let forged = api
        .app
        .post_raw(
            "signature=0000&timestamp=1&nonce=abc",
            json!({"encrypt": "AAAA"}).to_string(),
        )
        .await;
    assert!(forged.status().is_client_error());
    let (status, apps) = api.get("/api/v1/apps", Some(ADMIN)).await;
    assert_eq!(status, 200, "{apps}");
    let items = apps["items"].as_array().unwrap();
    assert_eq!(
        items
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["default", "ops"]
    );
    let default = &items[0];
    assert_eq!(default["callback_path"], "/dingtalk/callback");
    assert_eq!(default["dingtalk"], true);
    assert!(default["last_event_received_at"].as_i64().unwrap() > 0);
    let queued: u64 = default["queue"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(queued, 2, "{default}");
    let refusals: u64 = default["callback_errors_last_hour"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(refusals, 1, "{default}");
    assert_eq!(default["quota"]["limit"], 5_000);
    assert_eq!(items[1]["last_event_received_at"], Value::Null);
    // The reader sees its own app only.
    let (_, mine) = api.get("/api/v1/apps", Some(READER)).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    api.app.stop().await;
}

#[tokio::test]
async fn routes_and_deliveries_are_listed_paused_and_replayed_on_sqlite() {
    routes_and_deliveries(None).await;
}

#[tokio::test]
async fn routes_and_deliveries_are_listed_paused_and_replayed_on_postgres() {
    let Some(url) = fresh_postgres_database().await else {
        return;
    };
    routes_and_deliveries(Some(url)).await;
}

async fn routes_and_deliveries(pg: Option<String>) {
    // A receiver that takes everything.
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = got.clone();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let api = Api::start(pg, move |config| {
        config.routes = vec![RouteConfig {
            name: "crm".into(),
            apps: Vec::new(),
            events: Vec::new(),
            url: hook,
            secret: Some(Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")),
            secrets: Vec::new(),
            secret_file: None,
            headers: Default::default(),
            timeout: Duration::from_secs(2),
            concurrency: 4,
            rate: 0,
            retry_schedule: vec![Duration::from_millis(100); 3],
            subject: None,
            exchange: None,
            routing_key: None,
            stream: None,
            maxlen: None,
        }];
    })
    .await;
    post_events(&api, 3, "crm_custom_a").await;
    support::wait_until("three deliveries", || {
        got.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;
    let (status, deliveries) = api.get("/api/v1/deliveries?route=crm", Some(READER)).await;
    assert_eq!(status, 200, "{deliveries}");
    let items = deliveries["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let id = items[0]["id"].as_i64().unwrap();
    let (_, one) = api
        .get(&format!("/api/v1/deliveries/{id}"), Some(READER))
        .await;
    assert_eq!(one["route"], "crm");
    let (_, event) = api
        .get(&format!("/api/v1/events/{}", one["event_id"]), Some(READER))
        .await;
    assert_eq!(event["deliveries"][0]["id"], id);
    assert_problem(
        &api.get("/api/v1/deliveries?route=nope", Some(READER)).await,
        404,
        "unknown_route",
    );

    // Pausing takes the admin scope.
    assert_problem(
        &api.post("/api/v1/routes/crm/pause", READER, None, &json!({}))
            .await,
        403,
        "forbidden",
    );
    let (status, paused) = api
        .post("/api/v1/routes/crm/pause", ADMIN, None, &json!({}))
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["changed"], true);
    let (_, routes) = api.get("/api/v1/routes", Some(READER)).await;
    assert_eq!(routes["items"][0]["name"], "crm");
    assert!(routes["items"][0]["paused"]
        .as_str()
        .unwrap()
        .contains("api.token"));
    assert!(!routes["items"][0]["destination"]
        .as_str()
        .unwrap()
        .contains("whsec"));
    // A pause is seen within the poll interval (every replica reads it from the store).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A replay while paused waits; after resume it is delivered again.
    let (_, replayed) = api
        .post(
            &format!("/api/v1/deliveries/{id}/replay"),
            ADMIN,
            None,
            &json!({}),
        )
        .await;
    assert_eq!(replayed["replayed"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.load(std::sync::atomic::Ordering::SeqCst), 3);
    let (status, resumed) = api
        .post("/api/v1/routes/crm/resume", ADMIN, None, &json!({}))
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["changed"], true);
    support::wait_until("the replayed delivery", || {
        got.load(std::sync::atomic::Ordering::SeqCst) == 4
    })
    .await;
    let (_, all_done) = api
        .post(
            "/api/v1/deliveries/replay",
            ADMIN,
            None,
            &json!({"route": "crm", "state": "done"}),
        )
        .await;
    assert_eq!(all_done["replayed"], 3);
    support::wait_until("three more", || {
        got.load(std::sync::atomic::Ordering::SeqCst) == 7
    })
    .await;
    api.app.stop().await;
}

#[tokio::test]
async fn dinghook_act_queues_through_the_same_path() {
    let api = Api::start(None, |_| {}).await;
    api.fake
        .add_user(json!({"userid": "alice", "unionid": "union-alice", "active": true}));
    let db = format!("sqlite://{}", api.app.db_path.display());
    let act = |key: &str, content: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dinghook"))
            .args([
                "act",
                "work_notification",
                "--json",
                &json!({"userid_list": ["alice"], "msg": {"msgtype": "text", "text": {"content": content}}}).to_string(),
                "--idempotency-key",
                key,
            ])
            .env_clear()
            .env("DINGHOOK_STORE_URL", &db)
            .env("DINGHOOK_TOKEN", support::TOKEN)
            .env("DINGHOOK_AES_KEY", support::AES_KEY)
            .env("DINGHOOK_OWNER_KEY", support::OWNER_KEY)
            .env("DINGHOOK_APP_KEY", "dingtestapp")
            .env("DINGHOOK_APP_SECRET", "test-app-secret")
            .env("DINGHOOK_AGENT_ID", "4242")
            .output()
            .unwrap()
    };
    let first = act("cli-1", "from the shell");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let printed: Value = serde_json::from_slice(&first.stdout).unwrap();
    let id = printed["id"].as_i64().unwrap();
    let done = api.settled(id).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["requested_by"], "cli");
    let again = act("cli-1", "from the shell");
    let printed: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(printed["id"], id);
    let conflict = act("cli-1", "another text");
    assert!(!conflict.status.success());
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("idempotency_conflict"));
    assert_eq!(
        api.fake
            .calls_to("/topapi/message/corpconversation/asyncsend_v2")
            .len(),
        1
    );
    api.app.stop().await;
}

/// A real `dinghook serve` SIGKILLed while it runs actions at the app's QPS, then started
/// again: every action runs, none is lost; only a call in flight at the kill may repeat (at most
/// the workers' runs in hand), and no second ever holds more calls than the QPS.
#[tokio::test]
async fn a_sigkill_while_acting_loses_no_action() {
    const ACTIONS: usize = 300;
    const QPS: usize = 100;
    let (fake, fake_url) = FakeDingTalk::spawn().await.unwrap();
    fake.add_user(json!({"userid": "alice", "unionid": "union-alice", "active": true}));
    fake.set_qps_limit(Some(QPS as u32));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data").join("dinghook.db");
    let [port, api_port] = support::free_ports::<2>();
    let api_listen = format!("127.0.0.1:{api_port}");
    let qps = QPS.to_string();
    let env = [
        ("DINGHOOK_API_LISTEN", api_listen.as_str()),
        ("DINGHOOK_API_TOKEN", ADMIN),
        ("DINGHOOK_APP_KEY", "dingkilltest"),
        ("DINGHOOK_APP_SECRET", "kill-secret"),
        ("DINGHOOK_AGENT_ID", "4242"),
        ("DINGHOOK_DINGTALK_OAPI_URL", fake_url.as_str()),
        ("DINGHOOK_DINGTALK_API_URL", fake_url.as_str()),
        ("DINGHOOK_DINGTALK_QPS", qps.as_str()),
        ("DINGHOOK_RECOVERY", "off"),
        ("DINGHOOK_LEASE", "2s"),
        ("DINGHOOK_HANDLER_TIMEOUT", "1s"),
        ("DINGHOOK_POLL_INTERVAL", "50ms"),
    ];
    let mut server = support::ServerProcess::start(&db, port, &env).await;
    let http = reqwest::Client::new();
    let base = format!("http://{api_listen}");
    for i in 0..ACTIONS {
        let response = http
            .post(format!("{base}/api/v1/apps/default/actions"))
            .bearer_auth(ADMIN)
            .header("Idempotency-Key", format!("kill-{i}"))
            .json(&text_notification(&["alice"], &format!("kill #{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let send_path = "/topapi/message/corpconversation/asyncsend_v2";
    support::wait_until("a third sent", || {
        fake.calls_to(send_path).len() >= ACTIONS / 3
    })
    .await;
    server.kill().await;
    let at_kill = fake.calls_to(send_path).len();
    assert!(
        at_kill < ACTIONS,
        "all sent before the kill: make the test slower"
    );
    let _server = support::ServerProcess::start(&db, port, &env).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let texts: std::collections::HashSet<String> = fake
            .calls_to(send_path)
            .iter()
            .filter_map(|c| {
                c.body.as_ref()?["msg"]["text"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        if texts.len() == ACTIONS {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {ACTIONS} sent",
            texts.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = fake.calls_to(send_path);
    let repeats = calls.len() - ACTIONS;
    // Runs in hand at the kill: at most the 4 workers' batches of 16 (in practice a few).
    assert!(repeats <= 64, "{repeats} repeated");
    let mut times: Vec<f64> = calls.iter().map(|c| c.at_ms).collect();
    times.sort_by(f64::total_cmp);
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + 1000.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    // Each process keeps to the QPS; the two may share the second around the restart.
    let refused = calls.len() - fake.sent_messages().len();
    eprintln!("at kill {at_kill}, repeats {repeats}, busiest second {busiest}, refused {refused}");
    assert!(busiest <= 2 * QPS, "{busiest} calls in one second");
}

/// Each token has its own request budget: over it, 429 with `Retry-After` and a problem
/// document; another token is not held back.
#[tokio::test]
async fn a_token_over_its_request_budget_gets_429() {
    let api = Api::start(None, |config| config.api.requests_per_second = 5).await;
    let mut limited = 0;
    let mut retry_after = None;
    for _ in 0..20 {
        let response = api
            .http
            .get(format!("{}/api/v1/events", api.base))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            limited += 1;
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_problem(&answer(response).await, 429, "rate_limited");
        }
    }
    assert!(limited >= 10, "{limited} of 20 limited");
    assert_eq!(retry_after.as_deref(), Some("1"));
    // The admin token has its own budget.
    assert_eq!(api.get("/api/v1/events", Some(ADMIN)).await.0, 200);
    // A second later the reader may again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(api.get("/api/v1/events", Some(READER)).await.0, 200);
    api.app.stop().await;
}

/// A route that takes `dinghook.action.*` is told when each action ends: done with DingTalk's
/// result, dead with the reason; signed like every delivery (checked with the Standard
/// Webhooks library) and shaped as `docs/envelope.schema.json` says (checked with a JSON
/// Schema validator). A route for DingTalk's types is not told; neither is any route when
/// no route takes the type (nothing extra is stored).
#[tokio::test]
async fn action_completions_go_to_the_routes_that_take_them() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    type Got = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>;
    let (got, other): (Got, Got) = Default::default();
    let mut hooks = Vec::new();
    for sink in [got.clone(), other.clone()] {
        let receiver = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    sink.lock().unwrap().push((headers, body));
                    async { "ok" }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        hooks.push(format!("http://{}/hook", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, receiver).await });
    }
    let route = |name: &str, url: &str, events: &[&str]| RouteConfig {
        name: name.into(),
        apps: Vec::new(),
        events: events.iter().map(|e| e.to_string()).collect(),
        url: url.into(),
        secret: Some(Secret::new(SECRET)),
        secrets: Vec::new(),
        secret_file: None,
        headers: Default::default(),
        timeout: Duration::from_secs(2),
        concurrency: 4,
        rate: 0,
        retry_schedule: vec![Duration::from_millis(100); 3],
        subject: None,
        exchange: None,
        routing_key: None,
        stream: None,
        maxlen: None,
    };
    let routes = vec![
        route("outcomes", &hooks[0], &["dinghook.action.*"]),
        route("crm", &hooks[1], &["chat_*"]),
    ];
    let api = Api::start(None, move |config| config.routes = routes).await;

    let (_, sent) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("told-1"),
            &text_notification(&["manager01"], "hello"),
        )
        .await;
    let done = api.settled(sent["id"].as_i64().unwrap()).await;
    assert_eq!(done["state"], "done", "{done}");
    let bad_room = json!({
        "type": "war_room", "title": "INC-9", "template_id": "tpl-unknown", "owner_user_id": "alice"
    });
    let (_, queued) = api
        .post(
            "/api/v1/apps/default/actions",
            ADMIN,
            Some("told-2"),
            &bad_room,
        )
        .await;
    let dead = api.settled(queued["id"].as_i64().unwrap()).await;
    assert_eq!(dead["state"], "dead", "{dead}");

    support::wait_until("two completions delivered", || {
        got.lock().unwrap().len() >= 2
    })
    .await;
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string("docs/envelope.schema.json").unwrap())
            .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let webhook = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut told = std::collections::BTreeMap::new();
    for (headers, body) in got.lock().unwrap().iter() {
        webhook.verify(body, headers).expect("signed");
        let envelope: Value = serde_json::from_slice(body).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&envelope)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {envelope}");
        assert_eq!(envelope["source"], "internal");
        told.insert(envelope["type"].as_str().unwrap().to_owned(), envelope);
    }
    let done_told = &told["dinghook.action.done"]["data"];
    assert_eq!(done_told["action_id"], done["id"]);
    assert_eq!(done_told["idempotency_key"], "told-1");
    assert_eq!(done_told["action_type"], "work_notification");
    assert_eq!(done_told["state"], "done");
    assert_eq!(done_told["result"], done["result"]);
    assert!(done_told["result"]["task_id"].is_number(), "{done_told}");
    assert_eq!(done_told["requested_by"], "api.token");
    let dead_told = &told["dinghook.action.dead"]["data"];
    assert_eq!(dead_told["action_id"], dead["id"]);
    assert_eq!(dead_told["idempotency_key"], "told-2");
    assert_eq!(dead_told["error"], dead["error"]);
    assert_eq!(dead_told["result"], Value::Null);

    // Replaying the done action runs nothing new and tells nothing new (the same key).
    let (status, _) = api
        .post(
            &format!("/api/v1/events/{}/replay", done["id"]),
            ADMIN,
            None,
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let again = api.settled(done["id"].as_i64().unwrap()).await;
    assert_eq!(again["state"], "done");
    let (_, completions) = api
        .get("/api/v1/events?type=dinghook.action.done", Some(ADMIN))
        .await;
    assert_eq!(
        completions["items"].as_array().unwrap().len(),
        1,
        "{completions}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 2);
    assert!(other.lock().unwrap().is_empty(), "crm takes chat_* only");
    api.app.stop().await;
}

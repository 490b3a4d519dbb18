//! The operator console (`/console` on the API listener): over plain HTTP, what a browser
//! without a session, with a stolen form, with a read-only token or with another app's token
//! can do (nothing it should); then in a real browser (Debian's chromium through
//! chromedriver, driven by fantoccini): sign in, find a dead event by its eventId, open it,
//! replay it and see it done, pause and resume a route, and the overview's numbers equal the
//! API's. Without chromium or chromedriver the browser test prints SKIPPED and passes.
//! `DINGHOOK_CONSOLE_SCREENSHOTS=1` saves each page into `docs/console/`.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dinghook::api::{Scope, TokenConfig};
use dinghook::handler::{HandlerError, Registrations, RegistryBuilder};
use dinghook::routes::config::RouteConfig;
use dinghook::secret::Secret;
use dinghook::store::{EventState, Inserted, NewEvent, Source};
use serde_json::Value;
use support::{TestApp, AES_KEY, TOKEN};

/// Every scope, every app.
const ADMIN: &str = "console-admin-token-0123456789";
/// `read` only, every app.
const READER: &str = "console-reader-token-0123456789";
/// `read` and `replay`, app `ops` only.
const OPS: &str = "console-ops-token-0123456789ab";

fn sha(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn rename(id: &str) -> String {
    format!(r#"{{"EventType":"chat_update_title","eventId":"{id}","title":"t-{id}","chatId":"c"}}"#)
}

struct Console {
    app: TestApp,
    base: String,
    /// While set, the handler fails for good (the events go dead).
    failing: Arc<AtomicBool>,
    /// Deliveries the route's receiver took.
    delivered: Arc<AtomicUsize>,
    http: reqwest::Client,
}

impl Console {
    async fn start() -> Console {
        let failing = Arc::new(AtomicBool::new(true));
        let fail = Arc::clone(&failing);
        let handlers = RegistryBuilder::new().on_chat_update_title(move |_, _| {
            let fail = fail.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(HandlerError::permanent("the CRM answered 500: <b>down</b>"))
                } else {
                    Ok(())
                }
            }
        });
        let delivered = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&delivered);
        let receiver = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, receiver).await });
        let app = TestApp::spawn_with_handlers(
            move |config| {
                config.api.listen = "127.0.0.1:0".into();
                config.api.token = Secret::new(ADMIN);
                config.api.public_url = "https://hooks.example.com/".into();
                config.api.tokens = vec![
                    TokenConfig {
                        name: "reader".into(),
                        sha256: Some(sha(READER)),
                        token_file: None,
                        scopes: vec![Scope::Read],
                        apps: vec!["*".into()],
                    },
                    TokenConfig {
                        name: "ops-team".into(),
                        sha256: Some(sha(OPS)),
                        token_file: None,
                        scopes: vec![Scope::Read, Scope::Replay],
                        apps: vec!["ops".into()],
                    },
                ];
                config.apps = toml::from_str(
                    r#"
[ops]
token = "ops-token-aaaa"
aes_key = "zyxwvutsrqponmlkjihgfedcba9876543210ABCDEFG"
owner_key = "dingopsowner"
"#,
                )
                .unwrap();
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
                    retry_schedule: vec![Duration::from_millis(50); 2],
                    subject: None,
                    exchange: None,
                    routing_key: None,
                    stream: None,
                    maxlen: None,
                }];
            },
            handlers,
        )
        .await;
        let base = format!("http://{}", app.api_addr.expect("the API listens"));
        Console {
            app,
            base,
            failing,
            delivered,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    /// Three events that go dead and two that are done.
    async fn with_events(&self) {
        for id in ["evt-dead-1", "evt-dead-2", "evt-dead-3"] {
            assert_eq!(self.app.post_event(&rename(id)).await.status(), 200);
        }
        for id in ["evt-dead-1", "evt-dead-2", "evt-dead-3"] {
            self.app
                .wait_for_state(&format!("event:{id}"), EventState::Dead)
                .await;
        }
        self.failing.store(false, Ordering::SeqCst);
        for id in ["evt-ok-1", "evt-ok-2"] {
            assert_eq!(self.app.post_event(&rename(id)).await.status(), 200);
            self.app
                .wait_for_state(&format!("event:{id}"), EventState::Done)
                .await;
        }
        self.failing.store(true, Ordering::SeqCst);
        support::wait_until("five deliveries", || {
            self.delivered.load(Ordering::SeqCst) == 5
        })
        .await;
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    /// The page's text (asserting 200).
    async fn page(&self, path: &str, cookie: &str) -> String {
        let response = self.get(path, Some(cookie)).await;
        assert_eq!(response.status(), 200, "{path}");
        response.text().await.unwrap()
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish(),
            );
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        request.send().await.unwrap()
    }

    /// Signs in with `token`; returns the `Cookie` header value.
    async fn sign_in(&self, token: &str) -> String {
        let response = self
            .post(
                "/console/sign-in",
                None,
                &[("token", token), ("next", "/console/events")],
                &[],
            )
            .await;
        assert_eq!(response.status(), 303);
        assert_eq!(response.headers()["location"], "/console/events");
        let set = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        set.split(';').next().unwrap().to_owned()
    }

    async fn api(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn event_id(&self, key: &str) -> i64 {
        self.app
            .store
            .find_by_dedup_key(key)
            .await
            .unwrap()
            .unwrap()
            .id
    }
}

/// The CSRF token of a page's forms.
fn csrf(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token");
    html[at + 19..at + 19 + 64].to_owned()
}

#[tokio::test]
async fn no_page_or_action_without_a_session() {
    let console = Console::start().await;
    // The public port has no console.
    let public = reqwest::get(console.app.url("/console/")).await.unwrap();
    assert_eq!(public.status(), 404);

    for path in [
        "/console",
        "/console/",
        "/console/events",
        "/console/events/1",
        "/console/routes",
        "/console/dead",
        "/console/apps",
        "/console/actions",
        "/console/actions/1",
        "/console/nope",
    ] {
        let response = console.get(path, None).await;
        assert_eq!(response.status(), 303, "{path}");
        let to = response.headers()["location"].to_str().unwrap();
        assert!(to.starts_with("/console/sign-in?next="), "{path}: {to}");
    }
    // A made-up or expired cookie is no session.
    let forged = format!("dinghook_console={}", "ab".repeat(32));
    assert_eq!(
        console.get("/console/events", Some(&forged)).await.status(),
        303
    );
    for path in [
        "/console/events/1/replay",
        "/console/routes/crm/pause",
        "/console/events/replay-selected",
        "/console/actions/1/retry",
        "/console/apps/default/check",
        "/console/sign-out",
    ] {
        let response = console
            .post(path, Some(&forged), &[("csrf", "x")], &[])
            .await;
        assert_eq!(response.status(), 401, "{path}");
    }

    // The sign-in page: strict headers, no inline script, the asset cached for good.
    let response = console.get("/console/sign-in", None).await;
    assert_eq!(response.status(), 200);
    let h = response.headers().clone();
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert_eq!(h["cache-control"], "no-store");
    let html = response.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
    let css = html
        .split("href=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(css.starts_with("/console/assets/console-") && css.ends_with(".css"));
    let asset = console.get(css, None).await;
    assert_eq!(asset.status(), 200);
    assert_eq!(
        asset.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(
        console
            .get("/console/assets/console-0000.css", None)
            .await
            .status(),
        404
    );

    // A wrong token: 401, no cookie; a sign-in from another site: 403.
    let wrong = console
        .post(
            "/console/sign-in",
            None,
            &[("token", "not-a-token-0123456789")],
            &[],
        )
        .await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let cross = console
        .post(
            "/console/sign-in",
            None,
            &[("token", ADMIN)],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(cross.status(), 403);
    assert!(cross.headers().get("set-cookie").is_none());
    // An open redirect is not offered.
    let response = console
        .post(
            "/console/sign-in",
            None,
            &[("token", ADMIN), ("next", "https://evil.example/")],
            &[],
        )
        .await;
    assert_eq!(response.headers()["location"], "/console/");
    let set = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    for part in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP from no proxy: {set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let id = cookie.split('=').nth(1).unwrap();
    assert_eq!(id.len(), 64);
    // The store keeps neither the session id nor the token.
    let sessions = console
        .app
        .store
        .list_documents("console_session", 10)
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1);
    let stored = serde_json::to_string(&sessions).unwrap();
    assert!(!stored.contains(id) && !stored.contains(ADMIN) && !stored.contains(&sha(ADMIN)));
    assert!(stored.contains("\"token\":\"api.token\""));

    // Signed in, then out: the cookie is worth nothing after.
    let html = console.page("/console/", &cookie).await;
    assert!(html.contains("api.token"));
    let token = csrf(&html);
    let out = console
        .post("/console/sign-out", Some(&cookie), &[("csrf", &token)], &[])
        .await;
    assert_eq!(out.status(), 303);
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(console.get("/console/", Some(&cookie)).await.status(), 303);
    console.app.stop().await;
}

#[tokio::test]
async fn forms_from_elsewhere_and_read_only_tokens_are_refused() {
    let console = Console::start().await;
    console.with_events().await;
    let dead = console.event_id("event:evt-dead-1").await;
    let replay = format!("/console/events/{dead}/replay");

    let cookie = console.sign_in(ADMIN).await;
    let html = console
        .page(&format!("/console/events/{dead}"), &cookie)
        .await;
    assert!(html.contains("id=\"replay\""), "the admin may replay");
    // The error text is escaped, the payload shown as text.
    assert!(html.contains("down") && !html.contains("<b>down</b>"));
    assert!(html.contains("evt-dead-1"));
    for secret in [
        ADMIN,
        TOKEN,
        AES_KEY,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ] {
        assert!(!html.contains(secret), "a secret in the page");
    }
    let token = csrf(&html);
    // No CSRF token, a wrong one, a right one from another site: 403, nothing replayed.
    for (form, extra) in [
        (vec![], vec![]),
        (vec![("csrf", "0".repeat(64))], vec![]),
        (
            vec![("csrf", token.clone())],
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            vec![("csrf", token.clone())],
            vec![("origin", "http://evil.example")],
        ),
    ] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = console.post(&replay, Some(&cookie), &form, &extra).await;
        assert_eq!(response.status(), 403, "{form:?} {extra:?}");
    }
    let still = console.app.store.get(dead).await.unwrap().unwrap();
    assert_eq!(still.state, EventState::Dead);
    // The right token from our own page: replayed (and audited under the token's name).
    let response = console
        .post(
            &replay,
            Some(&cookie),
            &[("csrf", &token)],
            &[("origin", &console.base)],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert!(response.headers()["location"]
        .to_str()
        .unwrap()
        .contains("notice=replayed&n=1"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = console.app.store.list_documents("audit", 20).await.unwrap();
    let text = serde_json::to_string(&audit).unwrap();
    assert!(
        text.contains(&replay) && text.contains("\"token\":\"api.token\""),
        "{text}"
    );
    assert!(
        text.contains("\"status\":403"),
        "refusals are audited too: {text}"
    );

    // A read-only token: no replay or pause button, and its POSTs are 403.
    let reader = console.sign_in(READER).await;
    let list = console.page("/console/events?state=dead", &reader).await;
    assert!(list.contains("evt-dead-2"));
    assert!(!list.contains("replay-selected") && !list.contains("replay-matching"));
    let other = console.event_id("event:evt-dead-2").await;
    let html = console
        .page(&format!("/console/events/{other}"), &reader)
        .await;
    assert!(!html.contains("id=\"replay\""));
    let routes = console.page("/console/routes", &reader).await;
    assert!(routes.contains("crm") && !routes.contains("class=\"pause\""));
    let token = csrf(&html);
    for path in [
        format!("/console/events/{other}/replay"),
        "/console/routes/crm/pause".to_owned(),
    ] {
        let response = console
            .post(&path, Some(&reader), &[("csrf", &token)], &[])
            .await;
        assert_eq!(response.status(), 403, "{path}");
    }
    let response = console
        .post(
            "/console/events/replay",
            Some(&reader),
            &[("csrf", &token), ("state", "dead")],
            &[],
        )
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        console.app.store.get(other).await.unwrap().unwrap().state,
        EventState::Dead
    );

    // A token of app ops only sees none of the default app's events.
    let ops = console.sign_in(OPS).await;
    let list = console.page("/console/events", &ops).await;
    assert!(!list.contains("evt-"), "another app's events are invisible");
    let search = console.page("/console/events?q=evt-dead-2", &ops).await;
    assert!(search.contains("id=\"no-events\""));
    let hidden = console
        .get(&format!("/console/events/{other}"), Some(&ops))
        .await;
    assert_eq!(hidden.status(), 404);
    let token = csrf(&list);
    let response = console
        .post(
            &format!("/console/events/{other}/replay"),
            Some(&ops),
            &[("csrf", &token)],
            &[],
        )
        .await;
    assert_eq!(response.status(), 404);
    let response = console
        .post(
            "/console/events/replay-selected",
            Some(&ops),
            &[("csrf", &token), ("id", &other.to_string())],
            &[],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert!(response.headers()["location"]
        .to_str()
        .unwrap()
        .contains("n=0"));
    assert!(!console
        .page("/console/", &ops)
        .await
        .contains("id=\"app-default\""));

    // The replay by filter says how many first (the first one failed again: three), then
    // replays them.
    console
        .app
        .wait_for_state("event:evt-dead-1", EventState::Dead)
        .await;
    let admin = console.sign_in(ADMIN).await;
    let confirm = console
        .page(
            "/console/events/replay?state=dead&type=chat_update_title",
            &admin,
        )
        .await;
    assert!(
        confirm.contains("Send 3 event(s) back to pending?"),
        "{confirm}"
    );
    console.failing.store(false, Ordering::SeqCst);
    let token = csrf(&confirm);
    let response = console
        .post(
            "/console/events/replay",
            Some(&admin),
            &[
                ("csrf", &token),
                ("state", "dead"),
                ("type", "chat_update_title"),
            ],
            &[],
        )
        .await;
    assert_eq!(response.status(), 303);
    assert!(response.headers()["location"]
        .to_str()
        .unwrap()
        .contains("n=3"));
    for id in ["evt-dead-1", "evt-dead-2", "evt-dead-3"] {
        console
            .app
            .wait_for_state(&format!("event:{id}"), EventState::Done)
            .await;
    }
    // In Chinese, by the browser's language.
    let zh = console
        .http
        .get(console.url("/console/sign-in"))
        .header("accept-language", "zh-CN,zh;q=0.9")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(zh.contains("lang=\"zh-CN\"") && zh.contains("登录"));
    console.app.stop().await;
}

/// Stores an action of the default app directly (no DingTalk needed), not due before
/// `due_at`, and returns its id.
async fn store_action(console: &Console, key: &str, due_at: i64) -> i64 {
    let payload = serde_json::json!({
        "action": {
            "type": "robot_reply",
            "session_webhook": "https://oapi.dingtalk.com/robot/sendBySession?session=SECRETHOOK",
            "msgtype": "text",
            "text": {"content": format!("hello {key}")},
        },
        "idempotency_key": key,
        "requested_by": "crm-system",
    });
    let event = NewEvent {
        app: "default".into(),
        dedup_key: format!("action:{key}"),
        event_type: "dinghook_action".into(),
        corp_id: None,
        payload: payload.to_string(),
        source: Source::Api,
        received_at: dinghook::time::now_millis(),
        routes: Vec::new(),
    };
    match console.app.store.schedule(event, due_at).await.unwrap() {
        Inserted::Stored { id } => id,
        Inserted::Duplicate { id } => panic!("{key} stored twice ({id})"),
    }
}

#[tokio::test]
async fn the_outbox_lists_shows_and_retries_actions() {
    let console = Console::start().await;
    // Far in the future: the dispatcher leaves them alone; the test claims and ends them.
    let later = dinghook::time::now_millis() + 86_400_000;
    let dead = store_action(&console, "k-dead", later).await;
    let done = store_action(&console, "k-done", later).await;
    let store = &console.app.store;
    let claimed = store.claim("test", 10, 60_000, later).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert!(store
        .mark_dead(dead, "test", "DingTalk said 400: <i>bad</i>", &[], later)
        .await
        .unwrap());
    assert!(store.mark_done(done, "test", later).await.unwrap());
    store
        .put_document(
            "effect",
            "action:k-done/action",
            &serde_json::json!({"task_id": 424242}),
            later,
        )
        .await
        .unwrap();
    let queued = store_action(&console, "k-queued", later + 1).await;

    let admin = console.sign_in(ADMIN).await;
    let list = console.page("/console/actions", &admin).await;
    for key in [
        "k-dead",
        "k-done",
        "k-queued",
        "crm-system",
        "424242",
        "said 400",
    ] {
        assert!(list.contains(key), "{key} in the list");
    }
    assert!(!list.contains("SECRETHOOK") && !list.contains("<i>bad"));
    // Newest first.
    let at = |id: i64| list.find(&format!("id=\"action-{id}\"")).unwrap();
    assert!(at(queued) < at(done) && at(done) < at(dead));
    let only = console.page("/console/actions?state=queued", &admin).await;
    assert!(only.contains("k-queued") && !only.contains("k-dead") && !only.contains("k-done"));
    let only = console.page("/console/actions?state=dead", &admin).await;
    assert!(only.contains("k-dead") && !only.contains("k-queued"));

    // An action's page: the request as the API shows it, the error; retry when dead.
    let page = console
        .page(&format!("/console/actions/{dead}"), &admin)
        .await;
    assert!(
        page.contains("[set]") && !page.contains("SECRETHOOK"),
        "{page}"
    );
    assert!(page.contains("hello k-dead") && page.contains("id=\"retry\""));
    let page_done = console
        .page(&format!("/console/actions/{done}"), &admin)
        .await;
    assert!(page_done.contains("424242") && !page_done.contains("id=\"retry\""));
    // Its event links to it.
    let event = console
        .page(&format!("/console/events/{dead}"), &admin)
        .await;
    assert!(event.contains(&format!("href=\"/console/actions/{dead}\"")));
    assert!(!event.contains("SECRETHOOK"));

    // A read-only token sees it, may not retry it.
    let reader = console.sign_in(READER).await;
    let html = console
        .page(&format!("/console/actions/{dead}"), &reader)
        .await;
    assert!(!html.contains("id=\"retry\""));
    let token = csrf(&html);
    let retry = format!("/console/actions/{dead}/retry");
    let response = console
        .post(&retry, Some(&reader), &[("csrf", &token)], &[])
        .await;
    assert_eq!(response.status(), 403);
    // Another app's token sees none of it.
    let ops = console.sign_in(OPS).await;
    assert!(!console
        .page("/console/actions", &ops)
        .await
        .contains("k-dead"));
    assert_eq!(
        console
            .get(&format!("/console/actions/{dead}"), Some(&ops))
            .await
            .status(),
        404
    );
    // No CSRF token: 403; a done action: 409; the dead one: back in the queue, audited.
    let token = csrf(&page);
    let response = console.post(&retry, Some(&admin), &[], &[]).await;
    assert_eq!(response.status(), 403);
    let response = console
        .post(
            &format!("/console/actions/{done}/retry"),
            Some(&admin),
            &[("csrf", &token)],
            &[],
        )
        .await;
    assert_eq!(response.status(), 409);
    let response = console
        .post(&retry, Some(&admin), &[("csrf", &token)], &[])
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        format!("/console/actions/{dead}?notice=retried&n=1").as_str()
    );
    assert_ne!(
        store.get(dead).await.unwrap().unwrap().state,
        EventState::Dead,
        "back in the queue"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit = serde_json::to_string(&store.list_documents("audit", 50).await.unwrap()).unwrap();
    assert!(audit.contains(&retry), "{audit}");
    console.app.stop().await;
}

#[tokio::test]
async fn the_apps_page_shows_the_callback_url_and_checks_it() {
    let console = Console::start().await;
    let admin = console.sign_in(ADMIN).await;
    let html = console.page("/console/apps", &admin).await;
    let path = &console.app.callback_path;
    assert!(
        html.contains(&format!("https://hooks.example.com{path}")),
        "{html}"
    );
    assert!(!html.contains("id=\"no-public-url\""));
    assert!(html.contains("/console/apps/default/check"));
    let token = csrf(&html);
    // DingTalk's check, sealed with the app's keys, through the public listener: success.
    let response = console
        .post(
            "/console/apps/default/check",
            Some(&admin),
            &[("csrf", &token)],
            &[],
        )
        .await;
    assert_eq!(response.status(), 200);
    let checked = response.text().await.unwrap();
    assert!(checked.contains("data-success=\"true\""), "{checked}");
    assert!(checked.contains("<dd id=\"check-status\">200</dd>"));
    let response = console
        .post(
            "/console/apps/ops/check",
            Some(&admin),
            &[("csrf", &token)],
            &[],
        )
        .await;
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("data-success=\"true\""));
    for secret in [
        ADMIN,
        TOKEN,
        AES_KEY,
        "ops-token-aaaa",
        "zyxwvutsrqponmlkjihgfedcba9876543210ABCDEFG",
    ] {
        assert!(
            !checked.contains(secret) && !html.contains(secret),
            "a secret in the page"
        );
    }
    // Not stored: a check is answered, never kept.
    assert_eq!(console.app.store.count().await.unwrap(), 0);
    // A reader has no button and may not; another app's token may not check this one.
    let reader = console.sign_in(READER).await;
    let html = console.page("/console/apps", &reader).await;
    assert!(!html.contains("/check\""));
    let response = console
        .post(
            "/console/apps/default/check",
            Some(&reader),
            &[("csrf", &csrf(&html))],
            &[],
        )
        .await;
    assert_eq!(response.status(), 403);
    let ops = console.sign_in(OPS).await;
    let html = console.page("/console/apps", &ops).await;
    let response = console
        .post(
            "/console/apps/default/check",
            Some(&ops),
            &[("csrf", &csrf(&html))],
            &[],
        )
        .await;
    assert_eq!(response.status(), 403);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let audit =
        serde_json::to_string(&console.app.store.list_documents("audit", 50).await.unwrap())
            .unwrap();
    assert!(audit.contains("/console/apps/default/check"), "{audit}");
    console.app.stop().await;
}

#[tokio::test]
async fn dead_letters_are_discarded_by_group_after_a_count() {
    let console = Console::start().await;
    console.with_events().await;
    let dead: Vec<i64> = [
        console.event_id("event:evt-dead-1").await,
        console.event_id("event:evt-dead-2").await,
        console.event_id("event:evt-dead-3").await,
    ]
    .to_vec();
    let done = console.event_id("event:evt-ok-1").await;
    let ids: Vec<String> = dead.iter().chain([&done]).map(|i| i.to_string()).collect();

    // A reader has no discard button, and may not.
    let reader = console.sign_in(READER).await;
    let html = console.page("/console/dead", &reader).await;
    assert!(!html.contains("discard-group"));
    let mut form = vec![("csrf", csrf(&html))];
    form.extend(ids.iter().map(|i| ("id", i.clone())));
    let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = console
        .post("/console/dead/discard", Some(&reader), &refs, &[])
        .await;
    assert_eq!(response.status(), 403);
    let api = console
        .http
        .post(console.url("/api/v1/events/discard"))
        .bearer_auth(READER)
        .json(&serde_json::json!({"ids": dead}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 403);

    // The admin: a count first (the done one is not counted), then the discard.
    let admin = console.sign_in(ADMIN).await;
    let html = console.page("/console/dead", &admin).await;
    assert!(html.contains("discard-group"));
    let mut form = vec![
        ("csrf", csrf(&html)),
        ("reason", "permanent: the CRM answered 500".into()),
    ];
    form.extend(ids.iter().map(|i| ("id", i.clone())));
    let refs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = console
        .post("/console/dead/discard", Some(&admin), &refs, &[])
        .await;
    assert_eq!(response.status(), 200);
    let confirm = response.text().await.unwrap();
    assert!(
        confirm.contains("Delete 3 dead event(s) for good"),
        "{confirm}"
    );
    assert_eq!(
        console.app.store.get(dead[0]).await.unwrap().unwrap().state,
        EventState::Dead
    );
    let mut confirmed = refs.clone();
    confirmed.push(("confirmed", "1"));
    let response = console
        .post("/console/dead/discard", Some(&admin), &confirmed, &[])
        .await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "/console/dead?notice=discarded&n=3"
    );
    for id in &dead {
        assert!(console.app.store.get(*id).await.unwrap().is_none());
    }
    assert!(console.app.store.get(done).await.unwrap().is_some());
    let audit = console.app.store.list_documents("audit", 50).await.unwrap();
    let record = audit
        .iter()
        .find(|d| d.body["action"] == "discard")
        .expect("an audit record of the discard");
    assert_eq!(record.body["token"], "api.token");
    assert_eq!(record.body["discarded"], 3);
    assert_eq!(record.body["reason"], "permanent: the CRM answered 500");
    let mut kept: Vec<i64> = serde_json::from_value(record.body["ids"].clone()).unwrap();
    kept.sort_unstable();
    assert_eq!(kept, dead);
    // Through the API: nothing dead among these now.
    let api: Value = console
        .http
        .post(console.url("/api/v1/events/discard"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"ids": [done, dead[0]], "reason": "again"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(api["discarded"], 0);
    console.app.stop().await;
}

// --- the browser ------------------------------------------------------------------------

/// chromium and chromedriver, when both are installed.
fn browser() -> Result<(String, String), String> {
    let find = |names: &[&str]| {
        names
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
            .map(|p| p.display().to_string())
    };
    let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])
        .ok_or("no chromium (apt-get install chromium)")?;
    let driver = find(&["/usr/bin/chromedriver"])
        .ok_or("no chromedriver (apt-get install chromium-driver)")?;
    Ok((chromium, driver))
}

/// chromedriver on a free port, killed when dropped.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn shot(client: &fantoccini::Client, name: &str) {
    if std::env::var("DINGHOOK_CONSOLE_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let png = client.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn text_of(client: &fantoccini::Client, css: &str) -> String {
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Says yes to the confirmation the page's script asks (waiting for it to be shown).
async fn accept(client: &fantoccini::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = client.accept_alert().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no confirmation was asked: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the browser is on a page whose URL contains `needle`.
async fn wait_url(client: &fantoccini::Client, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let url = client.current_url().await.unwrap();
        if url.as_str().contains(needle) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "still at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the element `css` shows `expected`.
async fn wait_text(client: &fantoccini::Client, css: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(element) = client.find(fantoccini::Locator::Css(css)).await {
            if element.text().await.ok().as_deref() == Some(expected) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{css} never showed {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn in_a_browser_find_replay_pause_and_the_overview() {
    use fantoccini::Locator::Css;
    let (chromium, driver_bin) = match browser() {
        Ok(found) => found,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let port = support::free_port();
    let driver = match std::process::Command::new(&driver_bin)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(child) => Driver(child),
        Err(e) => {
            println!("SKIPPED: chromedriver does not start: {e}");
            return;
        }
    };
    let console = Console::start().await;
    console.with_events().await;

    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.path().display()),
                "--window-size=1280,900", "--lang=en-US",
            ],
        }),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let mut client = None;
    for _ in 0..100 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match fantoccini::ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&webdriver)
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let Some(c) = client else {
        println!("SKIPPED: chromedriver at {webdriver} gave no session");
        return;
    };

    // Sign in: any page leads to the form, and back.
    c.goto(&console.url("/console/events")).await.unwrap();
    c.wait().for_element(Css("#token")).await.unwrap();
    shot(&c, "sign-in").await;
    c.find(Css("#token"))
        .await
        .unwrap()
        .send_keys(ADMIN)
        .await
        .unwrap();
    c.find(Css("#sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait().for_element(Css("#f-q")).await.unwrap();
    assert!(c
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/console/events"));
    shot(&c, "events").await;

    // Find the dead event by its eventId, open it, replay it, see it done.
    c.find(Css("#f-q"))
        .await
        .unwrap()
        .send_keys("evt-dead-1")
        .await
        .unwrap();
    c.find(Css("#f-go")).await.unwrap().click().await.unwrap();
    wait_url(&c, "q=evt-dead-1").await;
    let rows = c.find_all(Css("table.events tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 1);
    c.find(Css("a.event-link"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&c, "/console/events/").await;
    assert_eq!(text_of(&c, "#event-key").await, "event:evt-dead-1");
    let state = c.find(Css("#state-now")).await.unwrap();
    assert_eq!(
        state.attr("data-state").await.unwrap().as_deref(),
        Some("dead")
    );
    shot(&c, "event").await;
    console.failing.store(false, Ordering::SeqCst);
    c.find(Css("#replay")).await.unwrap().click().await.unwrap();
    // The confirmation dialog.
    accept(&c).await;
    wait_url(&c, "notice=replayed").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        c.wait().for_element(Css("#state-now")).await.unwrap();
        let now = c
            .find(Css("#state-now"))
            .await
            .unwrap()
            .attr("data-state")
            .await
            .unwrap();
        if now.as_deref() == Some("done") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.refresh().await.unwrap();
    }
    assert!(text_of(&c, "#notice").await.contains("1 event(s)"));

    // Dead letters, grouped by reason.
    c.goto(&console.url("/console/dead")).await.unwrap();
    assert!(text_of(&c, "section.group h2")
        .await
        .contains("CRM answered 500"));
    shot(&c, "dead-letters").await;

    // The outbox: an action queued for tomorrow, its page with the request (no webhook).
    let action = store_action(
        &console,
        "browser-1",
        dinghook::time::now_millis() + 86_400_000,
    )
    .await;
    c.goto(&console.url("/console/actions")).await.unwrap();
    assert_eq!(
        text_of(&c, &format!("#action-{action} [data-state]")).await,
        "queued"
    );
    shot(&c, "actions").await;
    c.find(Css(&format!("#action-{action} a.action-link")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(text_of(&c, "#action-key").await, "browser-1");
    assert!(text_of(&c, "#action-request").await.contains("[set]"));
    shot(&c, "action").await;

    // The apps page: the callback URL, and DingTalk's check through the public listener.
    c.goto(&console.url("/console/apps")).await.unwrap();
    c.find(Css("#cfg-default button.check"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Css("#check-result[data-success=true]"))
        .await
        .unwrap();
    shot(&c, "apps").await;

    // Pause the route, see it paused (here and in the API), resume it.
    c.goto(&console.url("/console/routes")).await.unwrap();
    c.find(Css("#r-crm button.pause"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    accept(&c).await;
    wait_url(&c, "notice=paused").await;
    c.wait()
        .for_element(Css("#r-crm [data-route-state=paused]"))
        .await
        .unwrap();
    let routes = console.api("/api/v1/routes").await;
    assert!(routes["items"][0]["paused"]
        .as_str()
        .unwrap()
        .contains("api.token"));
    shot(&c, "routes").await;
    c.find(Css("#r-crm button.resume"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_url(&c, "notice=resumed").await;
    c.wait()
        .for_element(Css("#r-crm button.pause"))
        .await
        .unwrap();
    assert_eq!(
        console.api("/api/v1/routes").await["items"][0]["paused"],
        Value::Null
    );

    // The overview's numbers are the API's.
    console
        .app
        .wait_for_state("event:evt-dead-1", EventState::Done)
        .await;
    c.goto(&console.url("/console/")).await.unwrap();
    let apps = console.api("/api/v1/apps").await;
    for app in apps["items"].as_array().unwrap() {
        let name = app["name"].as_str().unwrap();
        for state in ["pending", "running", "retry", "done"] {
            let shown = text_of(&c, &format!("#app-{name} [data-figure={state}]")).await;
            // An app without events has no figures in the API: 0 on the page.
            let api = app["queue"][state].as_u64().unwrap_or(0);
            assert_eq!(shown, api.to_string(), "{name} {state}");
        }
        let dead = text_of(&c, &format!("#app-{name} [data-figure=dead]")).await;
        assert_eq!(dead, app["dead_letters"].to_string(), "{name} dead");
    }
    assert_eq!(text_of(&c, "#app-default [data-figure=dead]").await, "2");
    shot(&c, "overview").await;

    // The language switch.
    c.find(Css("#lang-switch"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "h1", "概览").await;
    shot(&c, "overview-zh").await;
    c.find(Css("#lang-switch"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "h1", "Overview").await;

    // A phone's width.
    if std::env::var("DINGHOOK_CONSOLE_SCREENSHOTS").as_deref() == Ok("1") {
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&console.url("/console/events?state=dead"))
            .await
            .unwrap();
        shot(&c, "events-phone").await;
    }
    c.close().await.unwrap();
    drop(driver);
    console.app.stop().await;
}

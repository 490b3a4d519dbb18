//! The fake DingTalk on its own, over real HTTP with plain requests: the `/_fake` admin routes
//! (what curl scripts and other processes use), the protocol checks it applies, and a few
//! DingTalk endpoints. No DingTalk client involved.

use std::time::{Duration, Instant};

use fake_dingtalk::{FakeDingTalk, FakeSendResult, FaultSpec};
use serde_json::{json, Value};

const APP_KEY: &str = "dingfakeappkey";
const APP_SECRET: &str = "fake-app-secret";

async fn post(http: &reqwest::Client, url: String, body: &str) -> (u16, Value) {
    // No Content-Type on purpose: `curl -d` does not send a JSON one either.
    let response = http.post(url).body(body.to_owned()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

async fn raw_token(http: &reqwest::Client, base: &str) -> String {
    let url = format!("{base}/gettoken?appkey={APP_KEY}&appsecret={APP_SECRET}");
    let answer = get_json(http, url).await;
    answer["access_token"].as_str().unwrap().to_owned()
}

/// An old-API call with the token in the query: (HTTP status, body).
async fn old_api(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    body: Value,
) -> Value {
    http.post(format!("{base}{path}?access_token={token}"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A new-API call with the token in DingTalk's header: (HTTP status, body).
async fn new_api(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http
        .request(method, url)
        .header("x-acs-dingtalk-access-token", token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn admin_routes_script_the_fake_over_http() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let admin = |route: &str| format!("{base}/_fake{route}");

    // Credentials, required from now on.
    let (status, body) = post(
        &http,
        admin("/credentials"),
        &json!({"app_key": APP_KEY, "app_secret": APP_SECRET}).to_string(),
    )
    .await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    let wrong = get_json(&http, format!("{base}/gettoken?appkey=x&appsecret=y")).await;
    assert_eq!(wrong["errcode"], 40089);
    let token = raw_token(&http, &base).await;

    // A user, then a fault on the path: the first call fails, the second is answered.
    let (status, _) = post(
        &http,
        admin("/users"),
        r#"[{"userid": "alice", "unionid": "u-a", "mobile": "1380", "name": "Alice"}]"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &http,
        admin("/faults"),
        r#"{"path": "/topapi/v2/user/get", "errcode": 90018, "times": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let user = json!({"userid": "alice"});
    let path = "/topapi/v2/user/get";
    let first = old_api(&http, &base, &token, path, user.clone()).await;
    assert_eq!(first["errcode"], 90018);
    let second = old_api(&http, &base, &token, path, user.clone()).await;
    assert_eq!(second["errcode"], 0);
    assert_eq!(second["result"]["name"], "Alice");

    let calls = get_json(&http, admin("/calls?path=/topapi/v2/user/get")).await;
    let calls = calls.as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["answer_code"], "90018");
    assert_eq!(calls[1]["answer_code"], "0");
    assert_eq!(calls[1]["status"], 200);
    assert_eq!(calls[1]["method"], "POST");
    assert_eq!(calls[1]["body"], user);
    assert_eq!(calls[1]["query"]["access_token"], token.as_str());
    assert!(calls[1]["at_ms"].as_f64().unwrap() >= calls[0]["at_ms"].as_f64().unwrap());
    assert_eq!(
        fake.calls_to(path).len(),
        2,
        "the Rust handle sees the same calls"
    );

    let state = get_json(&http, admin("/state")).await;
    assert_eq!(state["token_fetches"], 2, "the refused gettoken counts too");
    assert_eq!(state["tokens_issued"], 1);
    assert_eq!(state["quota_used"], 1, "the throttled call was not served");

    // Failed pushes, in pages of one; reading a page removes it.
    let (status, _) = post(
        &http,
        admin("/failed-callbacks"),
        r#"{"entries": [{"call_back_tag": "a"}, {"call_back_tag": "b"}], "page_size": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let page = get_json(
        &http,
        format!("{base}/call_back/get_call_back_failed_result?access_token={token}"),
    )
    .await;
    assert_eq!(page["failed_list"], json!([{"call_back_tag": "a"}]));
    assert_eq!(page["has_more"], true);
    assert_eq!(
        get_json(&http, admin("/state")).await["failed_callbacks_left"],
        1
    );

    // The token expires from outside: old API 42001, new API InvalidAuthentication.
    post(&http, admin("/token/expire"), "").await;
    let expired = old_api(&http, &base, &token, path, user.clone()).await;
    assert_eq!(expired["errcode"], 42001);
    let (status, answer) = new_api(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1.0/im/sceneGroups/query"),
        &token,
        Some(json!({"openConversationId": "cid"})),
    )
    .await;
    assert_eq!(
        (status, &answer["code"]),
        (400, &json!("InvalidAuthentication"))
    );
    post(&http, admin("/token/ttl"), r#"{"secs": 60}"#).await;
    let fresh = get_json(
        &http,
        format!("{base}/gettoken?appkey={APP_KEY}&appsecret={APP_SECRET}"),
    )
    .await;
    assert_eq!(fresh["expires_in"], 60);
    let token = fresh["access_token"].as_str().unwrap().to_owned();

    // Quota: refused once used up, free again when lifted.
    post(&http, admin("/quota"), r#"{"limit": 3, "used": 3}"#).await;
    let refused = old_api(&http, &base, &token, path, user.clone()).await;
    assert_eq!(refused["errcode"], 90020);
    post(&http, admin("/quota"), r#"{"limit": null}"#).await;
    assert_eq!(
        old_api(&http, &base, &token, path, user.clone()).await["errcode"],
        0
    );

    // QPS cap over HTTP.
    post(&http, admin("/qps"), r#"{"limit": 1}"#).await;
    let codes = [
        old_api(&http, &base, &token, path, user.clone()).await["errcode"].clone(),
        old_api(&http, &base, &token, path, user.clone()).await["errcode"].clone(),
    ];
    assert_eq!(codes, [json!(0), json!(90018)]);
    post(&http, admin("/qps"), r#"{"limit": null}"#).await;

    // A per-IP ban.
    post(&http, admin("/ban"), r#"{"wait": 3}"#).await;
    let banned = old_api(&http, &base, &token, path, user.clone()).await;
    assert_eq!(
        (&banned["status"], &banned["wait"]),
        (&json!(1111), &json!(3))
    );

    // A delayed answer, then none.
    post(
        &http,
        admin("/delay"),
        r#"{"ms": 300, "path": "/topapi/v2/user/get"}"#,
    )
    .await;
    let started = Instant::now();
    old_api(&http, &base, &token, path, user.clone()).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    post(
        &http,
        admin("/delay"),
        r#"{"ms": 0, "path": "/topapi/v2/user/get"}"#,
    )
    .await;

    // Send results for a task, set over HTTP; unset, every recipient is unread.
    let sent = old_api(
        &http,
        &base,
        &token,
        "/topapi/message/corpconversation/asyncsend_v2",
        json!({"agent_id": 1, "userid_list": "alice,bob",
               "msg": {"msgtype": "text", "text": {"content": "x"}}}),
    )
    .await;
    let task = sent["task_id"].as_i64().unwrap();
    let result_path = "/topapi/message/corpconversation/getsendresult";
    let ask = json!({"agent_id": 1, "task_id": task});
    let default = old_api(&http, &base, &token, result_path, ask.clone()).await;
    assert_eq!(
        default["send_result"]["unread_user_id_list"],
        json!(["alice", "bob"])
    );
    post(
        &http,
        admin(&format!("/send-results/{task}")),
        r#"{"read_user_id_list": ["alice"], "forbidden_user_id_list": ["bob"]}"#,
    )
    .await;
    let set = old_api(&http, &base, &token, result_path, ask).await;
    assert_eq!(set["send_result"]["read_user_id_list"], json!(["alice"]));
    assert_eq!(set["send_result"]["forbidden_user_id_list"], json!(["bob"]));
    assert_eq!(fake.sent_messages()[0].task_id, task);
    let state = get_json(&http, admin("/state")).await;
    assert_eq!(state["sent_messages"][0]["task_id"], task);

    // Bad JSON is a 400 that says why; reset forgets everything.
    let (status, body) = post(&http, admin("/faults"), "{not json").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("bad JSON"));
    let (status, _) = post(&http, admin("/reset"), "").await;
    assert_eq!(status, 200);
    assert_eq!(get_json(&http, admin("/calls")).await, json!([]));
    assert!(fake.sent_messages().is_empty());
    // The credentials went too: any non-empty pair is accepted again.
    let any = get_json(&http, format!("{base}/gettoken?appkey=x&appsecret=y")).await;
    assert_eq!(any["errcode"], 0);
    let token = any["access_token"].as_str().unwrap().to_owned();
    let gone = old_api(&http, &base, &token, path, user).await;
    assert_eq!(gone["errcode"], 33012, "users are forgotten");
}

#[tokio::test]
async fn faults_from_rust_and_over_http_are_consumed_in_order() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    fake.add_user(json!({"userid": "alice"}));
    fake.fail_next(FaultSpec::http_status(502));
    post(
        &http,
        format!("{base}/_fake/faults"),
        r#"[{"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"}, {"errcode": -1}]"#,
    )
    .await;
    let path = "/topapi/v2/user/get";
    let mut answers = Vec::new();
    for _ in 0..4 {
        let response = http
            .post(format!("{base}{path}?access_token={token}"))
            .json(&json!({"userid": "alice"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        answers.push((status, body.get("code").or(body.get("errcode")).cloned()));
    }
    assert_eq!(
        answers,
        [
            (502, None),
            (
                403,
                Some(json!("Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"))
            ),
            (200, Some(json!(-1))),
            (200, Some(json!(0))),
        ]
    );
    // Faults without a path leave gettoken alone.
    fake.fail_next(FaultSpec::errcode(-1));
    assert!(!raw_token(&http, &base).await.is_empty());
    fake.clear_faults();
}

#[tokio::test]
async fn fake_checks_where_the_token_goes_and_what_the_body_looks_like() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;

    // Old API without a token, new API with the token in the query instead of the header.
    let answer: Value = http
        .post(format!("{base}/topapi/v2/user/get"))
        .json(&json!({"userid": "alice"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["errcode"], 40014);
    let response = http
        .post(format!(
            "{base}/v1.0/im/sceneGroups/query?access_token={token}"
        ))
        .json(&json!({"openConversationId": "cid"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "InvalidAuthentication");

    // Wrong method, unknown path.
    let response = http
        .get(format!("{base}/topapi/v2/user/get?access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let response = http
        .post(format!("{base}/topapi/nope?access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);

    // msgParam must be a JSON string, not an object.
    let response = http
        .post(format!("{base}/v1.0/robot/groupMessages/send"))
        .header("x-acs-dingtalk-access-token", &token)
        .json(
            &json!({"robotCode": "r", "openConversationId": "cid", "msgKey": "sampleText",
                      "msgParam": {"content": "x"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "invalidParameter.msgParam.invalid");

    // userid_list must be a comma-separated string, not a JSON list.
    let answer: Value = http
        .post(format!(
            "{base}/topapi/message/corpconversation/asyncsend_v2?access_token={token}"
        ))
        .json(&json!({"agent_id": 1, "userid_list": ["a", "b"],
                      "msg": {"msgtype": "text", "text": {"content": "x"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["errcode"], 40035);
    assert!(fake.sent_messages().is_empty());

    // Asking for a token while it is valid returns the same one, as DingTalk does.
    assert_eq!(raw_token(&http, &base).await, token);
}

#[tokio::test]
async fn fake_throttles_above_its_qps_and_bans_on_request() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    fake.add_user(json!({"userid": "alice"}));
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    fake.set_qps_limit(Some(5));
    let mut codes = Vec::new();
    for _ in 0..8 {
        let answer: Value = http
            .post(format!("{base}/topapi/v2/user/get?access_token={token}"))
            .json(&json!({"userid": "alice"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        codes.push(answer["errcode"].as_i64().unwrap());
    }
    assert_eq!(codes, [0, 0, 0, 0, 0, 90018, 90018, 90018]);
    assert_eq!(fake.quota_used(), 5, "throttled calls are not served");

    fake.set_qps_limit(None);
    fake.ban_next(7, 1);
    let response = http
        .post(format!("{base}/topapi/v2/user/get?access_token={token}"))
        .json(&json!({"userid": "alice"}))
        .send()
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], 1111);
    assert_eq!(answer["wait"], 7);
}

#[tokio::test]
async fn groups_robot_messages_and_todos() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    post(
        &http,
        format!("{base}/_fake/groups"),
        r#"{"openConversationId": "cid1", "title": "研发群", "coolAppCode": "COOL-1"}"#,
    )
    .await;
    post(
        &http,
        format!("{base}/_fake/groups"),
        r#"{"openConversationId": "cid-template", "title": "模板群"}"#,
    )
    .await;
    let query = format!("{base}/v1.0/im/sceneGroups/query");
    let ask = |body: Value| {
        new_api(
            &http,
            reqwest::Method::POST,
            query.clone(),
            &token,
            Some(body),
        )
    };
    let (status, group) = ask(json!({"openConversationId": "cid1", "coolAppCode": "COOL-1"})).await;
    assert_eq!(status, 200);
    assert_eq!(group["title"], "研发群");
    assert!(group.get("coolAppCode").is_none(), "{group}");
    // A template group needs no coolAppCode.
    let (status, group) = ask(json!({"openConversationId": "cid-template"})).await;
    assert_eq!((status, &group["title"]), (200, &json!("模板群")));
    // DingTalk's refusals: a cool-app group without its coolAppCode (or with another one), a
    // group the app cannot see, no group at all.
    for (body, code) in [
        (
            json!({"openConversationId": "cid1"}),
            "groupPermissionDenied",
        ),
        (
            json!({"openConversationId": "cid1", "coolAppCode": "COOL-2"}),
            "groupPermissionDenied",
        ),
        (
            json!({"openConversationId": "nope"}),
            "groupPermissionDenied",
        ),
        (json!({"coolAppCode": "COOL-1"}), "paramBlank"),
        (json!({"openConversationId": ""}), "paramBlank"),
    ] {
        let (status, refused) = ask(body.clone()).await;
        assert_eq!((status, &refused["code"]), (400, &json!(code)), "{body}");
    }

    // A robot message to a cool-app group must carry its coolAppCode.
    let send = format!("{base}/v1.0/robot/groupMessages/send");
    let message = |cool: Option<&str>| {
        let mut body = json!({"robotCode": "r", "openConversationId": "cid1",
                              "msgKey": "sampleText", "msgParam": "{\"content\":\"hi\"}"});
        if let Some(cool) = cool {
            body["coolAppCode"] = json!(cool);
        }
        body
    };
    let post_new = |body: Value| {
        new_api(
            &http,
            reqwest::Method::POST,
            send.clone(),
            &token,
            Some(body),
        )
    };
    let (status, refused) = post_new(message(None)).await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("invalidParameter.robotCode.coolApp"))
    );
    let (status, sent) = post_new(message(Some("COOL-1"))).await;
    assert_eq!(status, 200);
    assert!(sent["processQueryKey"].is_string());
    assert_eq!(fake.robot_messages().len(), 1);
    // A missing field gets the code DingTalk's page lists for it.
    for (field, code) in [
        ("robotCode", "invalidParameter.robotCode.missing"),
        ("openConversationId", "miss.openConversationId"),
        ("msgKey", "invalidParameter.msgKey.empty"),
        ("msgParam", "invalidParameter.msgParam.invalid"),
    ] {
        let mut body = message(Some("COOL-1"));
        body.as_object_mut().unwrap().remove(field);
        let (status, refused) = post_new(body).await;
        assert_eq!((status, &refused["code"]), (400, &json!(code)), "{field}");
    }
    let mut long = message(Some("COOL-1"));
    long["msgParam"] = json!(json!({"content": "长".repeat(5_001)}).to_string());
    let (status, refused) = post_new(long).await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("invalidParameter.msgParam.tooLong"))
    );
    let (status, refused) = post_new(json!("not an object")).await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("invalidParameter.msgBody.invalid"))
    );
    assert_eq!(fake.robot_messages().len(), 1, "no refused message is kept");

    // A one-to-one robot message: the same checks, plus userIds (1 to 20); a user DingTalk
    // does not know is listed back, not refused.
    fake.add_user(json!({"userid": "oto-user"}));
    let oto = format!("{base}/v1.0/robot/oToMessages/batchSend");
    let oto_message = |users: Value| {
        json!({"robotCode": "r", "userIds": users, "msgKey": "sampleText",
               "msgParam": "{\"content\":\"hi\"}"})
    };
    let post_oto = |body: Value| {
        new_api(
            &http,
            reqwest::Method::POST,
            oto.clone(),
            &token,
            Some(body),
        )
    };
    let (status, sent) = post_oto(oto_message(json!(["oto-user", "stranger"]))).await;
    assert_eq!(status, 200, "{sent}");
    assert!(sent["processQueryKey"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert_eq!(sent["invalidStaffIdList"], json!(["stranger"]));
    assert_eq!(sent["flowControlledStaffIdList"], json!([]));
    assert_eq!(fake.robot_oto_messages().len(), 1);
    let (status, sent) = post_oto(oto_message(json!(["stranger"]))).await;
    assert_eq!(
        (status, &sent["invalidStaffIdList"]),
        (200, &json!(["stranger"]))
    );
    assert_eq!(fake.robot_oto_messages().len(), 1, "nobody got it");
    let many: Vec<String> = (0..21).map(|i| format!("u{i}")).collect();
    for (body, code) in [
        (oto_message(json!([])), "invalidParameter.userIds.empty"),
        (
            oto_message(json!("oto-user")),
            "invalidParameter.userIds.empty",
        ),
        (oto_message(json!(many)), "invalidParameter.userIds.tooMany"),
        (json!("not an object"), "invalidParameter.msgBody.invalid"),
    ] {
        let (status, refused) = post_oto(body.clone()).await;
        assert_eq!((status, &refused["code"]), (400, &json!(code)), "{body}");
    }
    for (field, code) in [
        ("robotCode", "invalidParameter.robotCode.missing"),
        ("userIds", "invalidParameter.userIds.empty"),
        ("msgKey", "invalidParameter.msgKey.empty"),
        ("msgParam", "invalidParameter.msgParam.invalid"),
    ] {
        let mut body = oto_message(json!(["oto-user"]));
        body.as_object_mut().unwrap().remove(field);
        let (status, refused) = post_oto(body).await;
        assert_eq!((status, &refused["code"]), (400, &json!(code)), "{field}");
    }
    let mut long = oto_message(json!(["oto-user"]));
    long["msgParam"] = json!(json!({"content": "长".repeat(5_001)}).to_string());
    let (status, refused) = post_oto(long).await;
    assert_eq!(
        (status, &refused["code"]),
        (400, &json!("invalidParameter.msgParam.tooLong"))
    );
    assert_eq!(
        fake.robot_oto_messages().len(),
        1,
        "no refused message is kept"
    );

    // A to-do task: read, updated, read again; unknown fields are refused.
    post(
        &http,
        format!("{base}/_fake/todos"),
        r#"{"union_id": "un 1", "task": {"id": "t1", "subject": "Report", "done": false}}"#,
    )
    .await;
    let task_url = format!("{base}/v1.0/todo/users/un%201/tasks/t1");
    let (status, task) = new_api(&http, reqwest::Method::GET, task_url.clone(), &token, None).await;
    assert_eq!((status, &task["subject"]), (200, &json!("Report")));
    let (status, _) = new_api(
        &http,
        reqwest::Method::PUT,
        task_url.clone(),
        &token,
        Some(json!({"done": true})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(fake.todo_task("un 1", "t1").unwrap()["done"], true);
    let (status, bad) = new_api(
        &http,
        reqwest::Method::PUT,
        task_url,
        &token,
        Some(json!({"color": "red"})),
    )
    .await;
    assert_eq!(
        (status, &bad["code"]),
        (400, &json!("todo.taskUpdate.paramError"))
    );
    let (status, _) = new_api(
        &http,
        reqwest::Method::GET,
        format!("{base}/v1.0/todo/users/un1/tasks/none"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let calls = fake.calls_to("/v1.0/todo/users/un%201/tasks/t1");
    assert_eq!(calls[0].token_header.as_deref(), Some(token.as_str()));
}

#[tokio::test]
async fn scene_groups_are_created_from_registered_templates_once_per_uuid() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    post(
        &http,
        format!("{base}/_fake/users"),
        r#"[{"userid": "alice"}, {"userid": "bob"}, {"userid": "carol"}]"#,
    )
    .await;
    // Templates: an id, or an object with `template_id`; one or a list.
    let (status, _) = post(&http, format!("{base}/_fake/templates"), r#""tpl-1""#).await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &http,
        format!("{base}/_fake/templates"),
        r#"[{"template_id": "tpl-2"}, "tpl-3"]"#,
    )
    .await;
    assert_eq!(status, 200);
    let create = format!("{base}/v1.0/im/sceneGroup/create");
    let ask = |body: Value| {
        new_api(
            &http,
            reqwest::Method::POST,
            create.clone(),
            &token,
            Some(body),
        )
    };
    let war_room = json!({
        "title": "INC-7 支付失败", "template_id": "tpl-1", "owner_user_id": "alice",
        "user_ids": ["bob", "carol"], "subadmin_ids": ["bob"], "uuid": "inc-7",
        "management_options": {"show_history_type": 1}
    });
    let (status, first) = ask(war_room.clone()).await;
    assert_eq!(status, 200, "{first}");
    let cid = first["open_conversation_id"].as_str().unwrap().to_owned();
    assert!(cid.starts_with("cid"), "{first}");
    assert!(first["chat_id"].as_str().unwrap().starts_with("chat"));
    // The same uuid: the same group, none made.
    let (status, again) = ask(war_room.clone()).await;
    assert_eq!((status, &again), (200, &first));
    // Another uuid (or none): another group.
    let mut other = war_room.clone();
    other["uuid"] = json!("inc-8");
    let (status, second) = ask(other).await;
    assert_eq!(status, 200);
    assert_ne!(
        second["open_conversation_id"],
        first["open_conversation_id"]
    );
    let created = fake.created_scene_groups();
    assert_eq!(created.len(), 2);
    assert_eq!(created[0].creates, 2);
    assert_eq!(created[0].user_ids, ["bob", "carol"]);
    assert_eq!(
        created[0].management_options,
        Some(json!({"show_history_type": 1}))
    );

    // sceneGroups/query sees it (no coolAppCode needed); the state lists it.
    let (status, group) = new_api(
        &http,
        reqwest::Method::POST,
        format!("{base}/v1.0/im/sceneGroups/query"),
        &token,
        Some(json!({"openConversationId": cid})),
    )
    .await;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["title"], "INC-7 支付失败");
    assert_eq!(group["templateId"], "tpl-1");
    assert_eq!(group["ownerUserId"], "alice");
    assert_eq!(group["status"], 1);
    let state = get_json(&http, format!("{base}/_fake/state")).await;
    assert_eq!(state["scene_templates"], json!(["tpl-1", "tpl-2", "tpl-3"]));
    assert_eq!(
        state["scene_groups"][0]["open_conversation_id"],
        cid.as_str()
    );
    assert_eq!(state["scene_groups"][0]["uuid"], "inc-7");
    assert_eq!(state["scene_groups"][0]["subadmin_ids"], json!(["bob"]));

    // DingTalk's refusals, each HTTP 400 with its code; nothing made.
    let with = |change: Value| {
        let mut body = json!({"title": "t", "template_id": "tpl-2", "owner_user_id": "alice"});
        if let (Some(body), Value::Object(change)) = (body.as_object_mut(), change) {
            for (key, value) in change {
                if value.is_null() {
                    body.remove(&key);
                } else {
                    body.insert(key, value);
                }
            }
        }
        body
    };
    let many: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    for (body, code) in [
        (json!("not an object"), "parameter.invalid"),
        (with(json!({"title": null})), "parameter.invalid"),
        (with(json!({"title": "  "})), "parameter.invalid"),
        (with(json!({"template_id": null})), "parameter.invalid"),
        (with(json!({"owner_user_id": ""})), "parameter.invalid"),
        (with(json!({"title": "一".repeat(31)})), "parameter.invalid"),
        // The old API's comma string is not the new API's array.
        (with(json!({"user_ids": "bob,carol"})), "parameter.invalid"),
        (with(json!({"subadmin_ids": [1]})), "parameter.invalid"),
        (with(json!({"uuid": 7})), "parameter.invalid"),
        (with(json!({"uuid": "x".repeat(65)})), "parameter.invalid"),
        (
            with(json!({"management_options": {"searchable": "yes"}})),
            "parameter.invalid",
        ),
        (with(json!({"user_ids": many})), "member.exceed"),
        (
            with(json!({"template_id": "tpl-nope"})),
            "groupTemplate.notFound",
        ),
        (with(json!({"owner_user_id": "mallory"})), "member.notFound"),
        (
            with(json!({"user_ids": ["bob", "mallory"]})),
            "member.notFound",
        ),
        (
            with(json!({"subadmin_ids": ["mallory"]})),
            "member.notFound",
        ),
    ] {
        let (status, answer) = ask(body.clone()).await;
        assert_eq!(
            (status, answer["code"].as_str()),
            (400, Some(code)),
            "{body}"
        );
        assert!(answer["requestid"].is_string(), "{answer}");
    }
    // A title of exactly 30 characters is fine; so is a body without any optional field.
    let (status, _) = ask(with(json!({"title": "一".repeat(30)}))).await;
    assert_eq!(status, 200);
    assert_eq!(fake.created_scene_groups().len(), 3);

    // The token goes in the header, as for every new-API call; GET is not the method.
    let response = http
        .post(create.clone())
        .json(&war_room)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "InvalidAuthentication");
    let (status, _) = new_api(&http, reqwest::Method::GET, create.clone(), &token, None).await;
    assert_eq!(status, 405);

    // A reset forgets templates and groups.
    post(&http, format!("{base}/_fake/reset"), "").await;
    assert!(fake.created_scene_groups().is_empty());
    let token = raw_token(&http, &base).await;
    post(
        &http,
        format!("{base}/_fake/users"),
        r#"{"userid": "alice"}"#,
    )
    .await;
    let (status, answer) = new_api(
        &http,
        reqwest::Method::POST,
        create.clone(),
        &token,
        Some(with(json!({"template_id": "tpl-1"}))),
    )
    .await;
    assert_eq!(
        (status, &answer["code"]),
        (400, &json!("groupTemplate.notFound"))
    );
}

#[tokio::test]
async fn attendance_list_pages_and_checks_work_dates_at_plus_eight() {
    let (_fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    // 2024-05-06 and 2024-05-07, 00:00 at +08:00.
    let (monday, tuesday) = (1_714_924_800_000_i64, 1_715_011_200_000_i64);
    let users: Vec<String> = (0..3).map(|i| format!("u{i}")).collect();
    let (status, _) = post(
        &http,
        format!("{base}/_fake/attendance/list/users"),
        &json!({"user_ids": users, "records": [
            {"workDate": monday, "checkType": "OnDuty", "timeResult": "Late"},
            {"workDate": tuesday, "checkType": "OnDuty", "timeResult": "Normal"}]})
        .to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let list = |from: &str, to: &str, offset: i64, limit: i64| {
        json!({"workDateFrom": from, "workDateTo": to, "userIdList": users,
               "offset": offset, "limit": limit})
    };
    let path = "/attendance/list";
    let day = "2024-05-06 00:00:00";
    let first = old_api(&http, &base, &token, path, list(day, day, 0, 2)).await;
    assert_eq!(first["errcode"], 0, "{first}");
    assert_eq!(first["recordresult"].as_array().unwrap().len(), 2);
    assert_eq!(first["hasMore"], true);
    let rest = old_api(&http, &base, &token, path, list(day, day, 2, 2)).await;
    assert_eq!(rest["recordresult"].as_array().unwrap().len(), 1);
    assert_eq!(rest["hasMore"], false);
    assert!(rest["recordresult"][0]["id"].is_i64(), "copies get ids");
    let both = old_api(
        &http,
        &base,
        &token,
        path,
        list(day, "2024-05-07 09:30:00", 0, 50),
    )
    .await;
    assert_eq!(both["recordresult"].as_array().unwrap().len(), 6);

    for (what, from, to) in [
        ("8 days", day, "2024-05-14 00:00:00"),
        ("reversed", day, "2024-05-05 00:00:00"),
        ("no time", "2024-05-06", day),
        ("no such day", "2024-02-30 00:00:00", day),
    ] {
        let answer = old_api(&http, &base, &token, path, list(from, to, 0, 50)).await;
        assert_eq!(answer["errcode"], 40035, "{what}: {answer}");
    }
    let answer = old_api(&http, &base, &token, path, list(day, day, 0, 51)).await;
    assert_eq!(answer["errcode"], 40035, "limit 51");
}

#[tokio::test]
async fn rust_handle_sets_send_results_and_work_records() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    fake.set_work_records(
        "alice",
        vec![json!({"record_id": "r1", "title": "A", "status": 0})],
    );
    let path = "/topapi/workrecord/getbyuserid";
    let ask = json!({"userid": "alice", "offset": 0, "limit": 10, "status": 0});
    let pending = old_api(&http, &base, &token, path, ask.clone()).await;
    assert_eq!(pending["records"]["list"][0]["record_id"], "r1");
    let done = old_api(
        &http,
        &base,
        &token,
        "/topapi/workrecord/update",
        json!({"userid": "alice", "record_id": "r1"}),
    )
    .await;
    assert_eq!(done["errcode"], 0);
    assert_eq!(fake.work_records("alice")[0]["status"], 1);
    assert_eq!(
        old_api(&http, &base, &token, path, ask).await["records"]["list"],
        json!([])
    );

    fake.set_send_result(
        1001,
        FakeSendResult {
            read_user_id_list: vec!["alice".into()],
            ..FakeSendResult::default()
        },
    );
    let sent = old_api(
        &http,
        &base,
        &token,
        "/topapi/message/corpconversation/asyncsend_v2",
        json!({"agent_id": 1, "userid_list": "alice",
               "msg": {"msgtype": "text", "text": {"content": "x"}}}),
    )
    .await;
    assert_eq!(sent["task_id"], 1001);
    let result = old_api(
        &http,
        &base,
        &token,
        "/topapi/message/corpconversation/getsendresult",
        json!({"agent_id": 1, "task_id": 1001}),
    )
    .await;
    assert_eq!(result["send_result"]["read_user_id_list"], json!(["alice"]));
}

#[tokio::test]
async fn status_bar_waits_for_the_send_to_finish() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    let send = |msg: Value| {
        old_api(
            &http,
            &base,
            &token,
            "/topapi/message/corpconversation/asyncsend_v2",
            json!({"agent_id": 1, "userid_list": "alice", "msg": msg}),
        )
    };
    let oa = json!({"msgtype": "oa", "oa": {"message_url": "https://x", "head": {"text": "h"},
                    "body": {"title": "t"}, "status_bar": {"status_value": "待办"}}});
    let task = send(oa).await["task_id"].as_i64().unwrap();
    let text = send(json!({"msgtype": "text", "text": {"content": "x"}})).await["task_id"]
        .as_i64()
        .unwrap();
    let bar = |task_id: i64| {
        old_api(
            &http,
            &base,
            &token,
            "/topapi/message/corpconversation/status_bar/update",
            json!({"agent_id": 1, "task_id": task_id, "status_value": "已完成"}),
        )
    };
    let progress = |task_id: i64| {
        old_api(
            &http,
            &base,
            &token,
            "/topapi/message/corpconversation/getsendprogress",
            json!({"agent_id": 1, "task_id": task_id}),
        )
    };

    // Still being sent (set over HTTP): getsendprogress says so, the status bar answers 41052.
    let (status, _) = post(
        &http,
        format!("{base}/_fake/send-progress/{task}"),
        r#"{"progress_in_percent": 40, "status": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let running = progress(task).await;
    assert_eq!(
        running["progress"],
        json!({"progress_in_percent": 40, "status": 1})
    );
    let refused = bar(task).await;
    assert_eq!(refused["errcode"], 41052, "{refused}");
    assert_eq!(refused["errmsg"], "本次发送人数过多,不再返回发送结果");

    // Done: the update goes through.
    fake.set_send_progress(task, 100, 2);
    assert_eq!(bar(task).await["errcode"], 0);
    let sent = fake.sent_messages();
    let changed = sent.iter().find(|m| m.task_id == task).unwrap();
    assert_eq!(
        changed.status_bar.as_ref().unwrap()["status_value"],
        "已完成"
    );

    // Only OA messages have a status bar: a parameter error, not 41052.
    assert_eq!(bar(text).await["errcode"], 40035);
}

#[tokio::test]
async fn html_ban_pages_dates_and_parameter_codes() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let token = raw_token(&http, &base).await;
    fake.add_user(json!({"userid": "alice"}));

    // The per-IP ban as an HTML page, scripted over HTTP.
    let (status, _) = post(&http, format!("{base}/_fake/ban"), r#"{"html": true}"#).await;
    assert_eq!(status, 200);
    let response = http
        .post(format!("{base}/topapi/v2/user/get?access_token={token}"))
        .json(&json!({"userid": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = response.text().await.unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(serde_json::from_str::<Value>(&page).is_err());
    let calls = fake.calls_to("/topapi/v2/user/get");
    assert_eq!(calls[0].answer_code.as_deref(), Some("html"));
    // A page with another status, from Rust.
    fake.fail_next(FaultSpec::ip_ban_page().with_status(403));
    let response = http
        .post(format!("{base}/topapi/v2/user/get?access_token={token}"))
        .json(&json!({"userid": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);

    // getupdatedata takes the day as `yyyy-MM-dd HH:mm:ss`, as DingTalk's examples send it.
    fake.set_attendance_update_data(
        "alice",
        "2026-11-02",
        json!({"userid": "alice", "attendance_result_list": [{"time_result": "Late"}]}),
    );
    let path = "/topapi/attendance/getupdatedata";
    let day = old_api(
        &http,
        &base,
        &token,
        path,
        json!({"userid": "alice", "work_date": "2026-11-02 00:00:00"}),
    )
    .await;
    assert_eq!(
        day["result"]["attendance_result_list"][0]["time_result"],
        "Late"
    );
    let other = old_api(
        &http,
        &base,
        &token,
        path,
        json!({"userid": "alice", "work_date": "2026-11-03 00:00:00"}),
    )
    .await;
    assert_eq!(other["result"]["work_date"], "2026-11-03 00:00:00");
    assert_eq!(other["result"]["attendance_result_list"], json!([]));
    for bad in ["2026-11-02", "2026-11-31 00:00:00", "20261102"] {
        let refused = old_api(
            &http,
            &base,
            &token,
            path,
            json!({"userid": "alice", "work_date": bad}),
        )
        .await;
        assert_eq!(refused["errcode"], 40035, "{bad}");
    }

    // The user APIs' own codes: 400002 for a missing parameter, 33012 / 60121 for nobody.
    for (path, body, code) in [
        ("/topapi/v2/user/get", json!({}), 400002),
        ("/topapi/v2/user/get", json!({"userid": "bob"}), 33012),
        ("/topapi/user/getbyunionid", json!({}), 400002),
        (
            "/topapi/user/getbyunionid",
            json!({"unionid": "u-bob"}),
            60121,
        ),
        ("/topapi/v2/user/getbymobile", json!({}), 400002),
        (
            "/topapi/workrecord/getbyuserid",
            json!({"userid": "alice", "offset": -1, "limit": 10, "status": 0}),
            40068,
        ),
        (
            "/topapi/workrecord/getbyuserid",
            json!({"userid": "alice", "offset": 0, "limit": 51, "status": 0}),
            40069,
        ),
    ] {
        let answer = old_api(&http, &base, &token, path, body.clone()).await;
        assert_eq!(answer["errcode"], code, "{path} {body}");
    }
}

/// The binary: `--listen 127.0.0.1:0` logs the URL it took, serves, and exits cleanly on SIGTERM.
#[cfg(unix)]
#[tokio::test]
async fn binary_logs_its_url_and_stops_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-dingtalk"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find("http://127.0.0.1:") {
                let rest = &line[at..];
                let end = rest
                    .char_indices()
                    .skip("http://127.0.0.1:".len())
                    .find(|(_, c)| !c.is_ascii_digit())
                    .map_or(rest.len(), |(i, _)| i);
                return rest[..end].to_owned();
            }
        }
        panic!("the fake exited without logging its URL");
    })
    .await
    .expect("the fake logs its URL");
    assert!(!url.ends_with(":0"), "{url}");

    let state = get_json(&reqwest::Client::new(), format!("{url}/_fake/state")).await;
    assert_eq!(state["calls_recorded"], 0);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the fake stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn binary_refuses_a_bad_listen_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fake-dingtalk"))
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_fake-dingtalk"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--listen"));
}

#[tokio::test]
async fn robot_session_webhooks_take_messages_until_they_expire() {
    let (fake, base) = FakeDingTalk::spawn().await.unwrap();
    let http = reqwest::Client::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // An admin-made session, valid 90 minutes by default, on the fake's own address.
    let (status, made) = post(&http, format!("{base}/_fake/robot/sessions"), "").await;
    assert_eq!(status, 200, "{made}");
    let webhook = made["session_webhook"].as_str().unwrap().to_owned();
    assert!(
        webhook.starts_with(&format!("{base}/robot/sendBySession?session=")),
        "{webhook}"
    );
    let expires = made["expires_at"].as_i64().unwrap();
    assert!(
        (now + 89 * 60_000..=now + 91 * 60_000).contains(&expires),
        "{expires}"
    );
    // No token needed: the session is the credential.
    let text = json!({"msgtype": "text", "text": {"content": "ack"}});
    let answer: Value = http
        .post(&webhook)
        .json(&text)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["errcode"], 0, "{answer}");
    let unreadable: Value = http
        .post(&webhook)
        .json(&json!({"msgtype": "text"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(unreadable["errcode"], 40035, "{unreadable}");
    // Expired and unknown sessions: DingTalk's 300001.
    let (_, expired) = post(
        &http,
        format!("{base}/_fake/robot/sessions"),
        &json!({"expires_at": now - 1}).to_string(),
    )
    .await;
    let expired = expired["session_webhook"].as_str().unwrap().to_owned();
    for url in [expired, format!("{base}/robot/sendBySession?session=nope")] {
        let answer: Value = http
            .post(&url)
            .json(&text)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["errcode"], 300_001, "{answer}");
    }
    let sent = fake.session_messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["body"], text);
    assert_eq!(
        get_json(&http, format!("{base}/_fake/state")).await["session_messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Made from Rust too, with its expiry.
    let url = fake.robot_session(now + 60_000);
    let answer: Value = http
        .post(&url)
        .json(&text)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["errcode"], 0);
    assert_eq!(fake.session_messages().len(), 2);
}

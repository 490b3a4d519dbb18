//! The console's words in English and 简体中文: one table keyed by message id. Every text a
//! page shows goes through it (a test checks that every id the templates use is here).

/// A language the console speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    /// The `lang` cookie's and the switch link's value.
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        }
    }

    /// The `<html lang>` value.
    pub fn html(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Zh => "zh-CN",
        }
    }

    /// The language's own name (the switch link's text).
    pub fn name(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::Zh => "中文",
        }
    }

    pub fn other(self) -> Lang {
        match self {
            Lang::En => Lang::Zh,
            Lang::Zh => Lang::En,
        }
    }

    pub fn parse(code: &str) -> Option<Lang> {
        match code {
            "en" => Some(Lang::En),
            "zh" => Some(Lang::Zh),
            _ => None,
        }
    }

    /// The first language of an `Accept-Language` header that we speak (browsers list them
    /// by preference), else English.
    pub fn from_accept(header: &str) -> Lang {
        header
            .split(',')
            .map(|tag| {
                tag.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .find_map(|tag| {
                if tag == "zh" || tag.starts_with("zh-") {
                    Some(Lang::Zh)
                } else if tag == "en" || tag.starts_with("en-") {
                    Some(Lang::En)
                } else {
                    None
                }
            })
            .unwrap_or(Lang::En)
    }
}

/// Message `id` in `lang`; the id itself when it is missing (a test keeps that from
/// happening).
pub fn text(lang: Lang, id: &str) -> &'static str {
    match MESSAGES.iter().find(|(key, _, _)| *key == id) {
        Some((_, en, zh)) => match lang {
            Lang::En => en,
            Lang::Zh => zh,
        },
        None => "?",
    }
}

/// An event's or delivery's state (`pending`, …) in `lang`.
pub fn state(lang: Lang, state: &str) -> &'static str {
    match state {
        "pending" => text(lang, "state.pending"),
        "running" => text(lang, "state.running"),
        "retry" => text(lang, "state.retry"),
        "done" => text(lang, "state.done"),
        "dead" => text(lang, "state.dead"),
        // How a run ended, besides the states above.
        "released" => text(lang, "state.released"),
        "lease_expired" => text(lang, "state.lease_expired"),
        _ => "?",
    }
}

/// `{n}` in message `id` replaced by `n`.
pub fn count(lang: Lang, id: &str, n: u64) -> String {
    text(lang, id).replace("{n}", &n.to_string())
}

/// (id, English, 简体中文)
pub const MESSAGES: &[(&str, &str, &str)] = &[
    ("skip", "Skip to content", "跳到正文"),
    ("nav.label", "Console sections", "控制台栏目"),
    ("nav.overview", "Overview", "概览"),
    ("nav.events", "Events", "事件"),
    ("nav.dead", "Dead letters", "死信"),
    ("nav.actions", "Actions", "动作"),
    ("nav.routes", "Routes", "路由"),
    ("nav.apps", "Apps", "应用"),
    ("signout", "Sign out", "退出"),
    ("signin.title", "Sign in", "登录"),
    ("signin.help", "Sign in with an API token (api.token or one of [[api.tokens]]). Its scopes and apps decide what you see and may do.", "使用 API 令牌登录（api.token 或 [[api.tokens]] 之一）。令牌的权限和应用决定你能看到和操作的内容。"),
    ("signin.token", "API token", "API 令牌"),
    ("signin.submit", "Sign in", "登录"),
    ("signin.failed", "That token is not valid.", "令牌无效。"),
    ("error.back", "Back to the overview", "返回概览"),
    ("error.400", "Bad request", "请求有误"),
    ("error.401", "Sign in first", "请先登录"),
    ("error.403", "Not allowed", "无权操作"),
    ("error.404", "Not found", "未找到"),
    ("error.500", "Error", "错误"),
    ("error.503", "The store did not answer", "存储暂时无法响应"),
    ("state.pending", "pending", "待处理"),
    ("state.running", "running", "处理中"),
    ("state.retry", "retry", "待重试"),
    ("state.done", "done", "已完成"),
    ("state.dead", "dead", "死信"),
    ("state.released", "given back", "已交回"),
    ("state.lease_expired", "lease ran out", "租约过期"),
    ("overview.title", "Overview", "概览"),
    ("overview.updated", "As of", "更新于"),
    ("overview.dead", "Dead letters", "死信"),
    ("overview.oldest", "Oldest waiting", "最久等待"),
    ("overview.callbacks", "Callbacks per minute, last hour", "每分钟回调（最近一小时）"),
    ("overview.refused_chart", "Refused callbacks per minute, last hour", "每分钟被拒回调（最近一小时）"),
    ("overview.refusals", "Refused in the last hour", "最近一小时被拒"),
    ("overview.quota", "DingTalk calls this month", "本月钉钉调用"),
    ("overview.projected", "projected to month's end", "预计月底"),
    ("overview.quota_warn", "The month's calls will reach the reserve at this pace", "按当前速度，本月调用将触及预留额度"),
    ("overview.no_client", "no app key", "未配置 AppKey"),
    ("overview.recovery", "Recovery", "补偿拉取"),
    ("overview.stream", "Stream", "Stream 连接"),
    ("overview.last_event", "Last event", "最近事件"),
    ("overview.never", "never", "从未"),
    ("overview.off", "off", "关闭"),
    ("overview.push_only", "HTTP push only", "仅 HTTP 推送"),
    ("chart.max", "max", "最大"),
    ("chart.span", "60 min", "60 分钟"),
    ("routes.name", "Route", "路由"),
    ("routes.state", "State", "状态"),
    ("routes.backlog", "Backlog", "积压"),
    ("routes.kind", "Kind", "类型"),
    ("routes.destination", "Destination", "目标"),
    ("routes.apps", "Apps", "应用"),
    ("routes.events", "Event types", "事件类型"),
    ("routes.paused_why", "Paused because", "暂停原因"),
    ("routes.pause", "Pause", "暂停"),
    ("routes.resume", "Resume", "恢复"),
    ("routes.replay_dead", "Deliver the dead ones again", "重新投递死信"),
    ("routes.confirm_pause", "Pause this route? Its deliveries wait until it is resumed.", "暂停此路由？投递会等待，直到恢复。"),
    ("routes.confirm_replay", "Deliver every dead delivery of this route again?", "重新投递此路由的全部死信？"),
    ("routes.last_errors", "Last errors", "最近错误"),
    ("routes.none", "No routes are configured ([[routes]]).", "未配置路由（[[routes]]）。"),
    ("routes.s.delivering", "delivering", "投递中"),
    ("routes.s.idle", "idle", "空闲"),
    ("routes.s.failing", "failing", "失败中"),
    ("routes.s.paused", "paused", "已暂停"),
    ("routes.s.circuit", "circuit open", "熔断中"),
    ("filter.app", "App", "应用"),
    ("filter.any", "any", "全部"),
    ("filter.state", "State", "状态"),
    ("filter.type", "Type", "类型"),
    ("filter.since", "Since", "起始时间"),
    ("filter.q", "eventId or #", "eventId 或编号"),
    ("filter.go", "Search", "搜索"),
    ("events.title", "Events", "事件"),
    ("events.none", "No events match.", "没有匹配的事件。"),
    ("events.select", "Select", "选择"),
    ("events.key", "Key", "去重键"),
    ("events.received", "Received (UTC)", "接收时间（UTC）"),
    ("events.attempts", "Runs", "执行次数"),
    ("events.error", "Error", "错误"),
    ("events.replay_selected", "Replay selected", "重放所选"),
    ("events.replay_matching", "Replay everything matching…", "重放全部匹配项…"),
    ("events.confirm_selected", "Send the selected events back to pending?", "将所选事件重新置为待处理？"),
    ("events.replayed", "{n} event(s) sent back to pending.", "已将 {n} 个事件重新置为待处理。"),
    ("events.search_hint", "Searching by eventId or number: filters other than the app do not apply.", "按 eventId 或编号搜索时，除应用外的筛选条件不生效。"),
    ("pager.label", "Pages", "分页"),
    ("pager.newest", "Newest", "最新"),
    ("pager.older", "Older →", "更早 →"),
    ("dead.title", "Dead letters by reason", "按原因分组的死信"),
    ("dead.replay_group", "Replay this group", "重放本组"),
    ("dead.window", "The newest 500 dead events, grouped by their error.", "最新 500 条死信，按错误分组。"),
    ("dead.discard_group", "Discard this group…", "丢弃本组…"),
    ("dead.discard_title", "Discard dead letters", "丢弃死信"),
    ("dead.discard_question", "Delete {n} dead event(s) for good, with their runs and deliveries? This cannot be undone; an audit record keeps who, when, why and their ids.", "永久删除 {n} 条死信及其执行记录和投递？此操作无法撤销；审计记录会保留操作者、时间、原因和事件编号。"),
    ("dead.discard_reason", "Reason", "原因"),
    ("dead.discard_yes", "Yes, delete them", "确认删除"),
    ("dead.discarded", "{n} dead event(s) deleted.", "已删除 {n} 条死信。"),
    ("event.title", "Event", "事件"),
    ("event.source", "Source", "来源"),
    ("event.updated", "Updated (UTC)", "更新时间（UTC）"),
    ("event.state_now", "State", "状态"),
    ("event.replay", "Replay", "重放"),
    ("event.confirm_replay", "Send this event back to pending? Handlers that have not succeeded run again.", "将此事件重新置为待处理？未成功的处理器会再次执行。"),
    ("event.runs", "Runs", "执行记录"),
    ("event.no_runs", "Not run yet.", "尚未执行。"),
    ("event.run_started", "Started (UTC)", "开始时间（UTC）"),
    ("event.run_at", "Ended (UTC)", "结束时间（UTC）"),
    ("event.run_attempt", "Attempt", "第几次"),
    ("event.worker", "Worker", "执行者"),
    ("event.outcome", "Outcome", "结果"),
    ("event.handled", "Handlers done", "已成功的处理器"),
    ("event.deliveries", "Deliveries", "投递"),
    ("event.no_deliveries", "No route takes this event.", "没有路由接收此事件。"),
    ("event.delivered", "Delivered (UTC)", "投递时间（UTC）"),
    ("event.payload", "Payload (decrypted)", "内容（已解密）"),
    ("confirm.title", "Replay events", "重放事件"),
    ("confirm.question", "Send {n} event(s) back to pending?", "将 {n} 个事件重新置为待处理？"),
    ("confirm.at_least", "Send at least {n} events back to pending? (Every match is replayed, not only these.)", "将至少 {n} 个事件重新置为待处理？（会重放全部匹配项。）"),
    ("confirm.yes", "Yes, replay them", "确认重放"),
    ("confirm.cancel", "Cancel", "取消"),
    ("apps.callback", "Callback URL for DingTalk's console", "填入钉钉开发者后台的回调地址"),
    ("apps.dingtalk", "DingTalk client", "钉钉客户端"),
    ("apps.secrets", "Token, aes_key, app secret", "Token、aes_key、AppSecret"),
    ("apps.set", "set (never shown)", "已设置（不显示）"),
    ("apps.yes", "yes", "有"),
    ("apps.no", "no", "无"),
    ("apps.on", "on", "开启"),
    ("apps.off", "off", "关闭"),
    ("apps.note", "The check sends DingTalk's check_url, signed and encrypted with the app's keys, to this process's own callback listener, and opens the answer: it tests the keys and the route, not what is between DingTalk and you (DNS, TLS, the proxy).", "检查会用应用的密钥签名并加密钉钉的 check_url 事件，发送到本进程自己的回调监听端口，并解密应答：它检验密钥和路由，不检验钉钉与你之间的部分（DNS、TLS、代理）。"),
    ("apps.no_public_url", "Set api.public_url (DINGHOOK_PUBLIC_URL), the address DingTalk reaches dinghook by, such as https://hooks.example.com, to see each app's whole callback URL. Until then: the path to put after that address.", "请设置 api.public_url（DINGHOOK_PUBLIC_URL），即钉钉访问 dinghook 的地址，如 https://hooks.example.com，即可看到各应用完整的回调地址。在此之前，这里只显示要接在该地址后的路径。"),
    ("apps.path", "Callback path", "回调路径"),
    ("apps.check", "Check the callback", "检查回调"),
    ("apps.check_title", "Callback check", "回调检查"),
    ("apps.check_time", "Time taken", "耗时"),
    ("apps.check_reply", "Decrypted reply", "解密后的应答"),
    ("apps.check_ok", "success: DingTalk would accept it", "success：钉钉会接受"),
    ("apps.check_bad", "not success", "不是 success"),
    ("routes.replayed", "{n} delivery(ies) will be delivered again.", "{n} 个投递将重新投递。"),
    ("routes.paused", "The route is paused.", "路由已暂停。"),
    ("routes.resumed", "The route is resumed.", "路由已恢复。"),
    ("actions.title", "Actions (the outbox)", "动作（发件箱）"),
    ("actions.none", "No actions match.", "没有匹配的动作。"),
    ("actions.key", "Idempotency key", "幂等键"),
    ("actions.by", "Asked by", "请求者"),
    ("actions.outcome", "DingTalk's result or the error", "钉钉返回结果或错误"),
    ("actions.s.queued", "queued", "排队中"),
    ("action.title", "Action", "动作"),
    ("action.event", "Its event", "对应事件"),
    ("action.retry", "Retry", "重试"),
    ("action.confirm_retry", "Send this dead action back to the queue? DingTalk is called again for what has not succeeded.", "将此死信动作重新排队？未成功的钉钉调用会再次执行。"),
    ("action.retried", "{n} action(s) sent back to the queue.", "已将 {n} 个动作重新排队。"),
    ("action.result", "DingTalk's result", "钉钉返回结果"),
    ("action.no_result", "No result yet.", "暂无结果。"),
    ("action.request", "Request (session webhooks as [set])", "请求内容（会话 Webhook 显示为 [set]）"),
    ("event.action_link", "its action", "查看动作"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `c.t("…")` of every template has both languages here, and no id is twice.
    #[test]
    fn every_message_the_templates_use_exists() {
        let templates = [
            include_str!("templates/base.html"),
            include_str!("templates/sign_in.html"),
            include_str!("templates/error.html"),
            include_str!("templates/chart.html"),
            include_str!("templates/overview.html"),
            include_str!("templates/events.html"),
            include_str!("templates/event_table.html"),
            include_str!("templates/event.html"),
            include_str!("templates/confirm.html"),
            include_str!("templates/routes.html"),
            include_str!("templates/apps.html"),
            include_str!("templates/actions.html"),
            include_str!("templates/action.html"),
            include_str!("templates/discard.html"),
        ];
        let mut used = Vec::new();
        for t in templates {
            for part in t.split("c.t(\"").skip(1) {
                used.push(part.split('"').next().unwrap().to_owned());
            }
        }
        assert!(used.len() > 50);
        for id in used {
            assert!(
                MESSAGES.iter().any(|(k, _, _)| *k == id),
                "message {id:?} is missing"
            );
        }
        for (i, (id, en, zh)) in MESSAGES.iter().enumerate() {
            assert!(!en.is_empty() && !zh.is_empty(), "{id}");
            assert!(
                MESSAGES[i + 1..].iter().all(|(k, _, _)| k != id),
                "{id} twice"
            );
        }
    }

    #[test]
    fn the_browser_language_is_taken_when_no_cookie_says() {
        assert_eq!(Lang::from_accept("zh-CN,zh;q=0.9,en;q=0.8"), Lang::Zh);
        assert_eq!(Lang::from_accept("en-US,en;q=0.9,zh;q=0.8"), Lang::En);
        assert_eq!(Lang::from_accept("fr-FR, zh-TW;q=0.5"), Lang::Zh);
        assert_eq!(Lang::from_accept(""), Lang::En);
        assert_eq!(text(Lang::Zh, "nav.events"), "事件");
        assert_eq!(
            count(Lang::En, "events.replayed", 3),
            "3 event(s) sent back to pending."
        );
    }
}

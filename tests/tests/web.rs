//! The web console in a real headless Chromium (chromedriver over WebDriver)
//! against a real `mesh bot`, nats-server, listeners and recording gateways:
//! sign-in, the fleet, a message sent and seen delivered without a reload,
//! the kill switch banner and resume, a dead letter replayed (each on its
//! own), an ask answered in place, a hard kill cancelled, another one and
//! its resume confirmed;
//! and the security cases: no session shows only the sign-in page, a viewer
//! gets no action and a forged one is refused (kill, Replay, Cancel; an
//! operator's Replay and Cancel too), agent text is shown as text, a forged
//! dead letter replays nothing, an undecodable one is kept and said so,
//! another site's sign-ins count for nothing, a flood of wrong bearer tokens
//! waits while the browser session works, and an agent chosen in a form
//! stays chosen when it leaves the registry.
//! Each test saves screenshots under `target/web-screenshots/`.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use fantoccini::Locator;
use mesh_listener::config::Selection;
use mesh_protocol::Priority;
use mesh_tests::bot::BotProcess;
use mesh_tests::browser::Browser;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const DIRECTOR_TOKEN: &str = "dana-director-token-0123456789";
const VIEWER_TOKEN: &str = "vic-viewer-token-0123456789";
const OPERATOR_TOKEN: &str = "opal-operator-token-0123456789";

struct Stack {
    nats: TestNats,
    fixture: Fixture,
    gateways: Vec<RecordingGateway>,
    listener: ListenerHandle,
    bot: BotProcess,
}

/// What ada, a chat agent, answers.
const ADA_ANSWERS: &str = "42, said <b>ada</b>";

/// nats-server, three agents behind recording gateways and their listener
/// (nova and kaan woken by webhook, ada a chat agent answering
/// [`ADA_ANSWERS`]), `mesh bot` with the web users dana (director), opal
/// (operator: no `dlq replay`) and vic (viewer).
async fn stack() -> Stack {
    let nats = TestNats::start().await;
    let gateways =
        vec![RecordingGateway::start().await, RecordingGateway::start().await, RecordingGateway::start().await];
    gateways[2].set_chat_reply(ADA_ANSWERS);
    let wake = |id: &str, gateway: &RecordingGateway| {
        serde_json::json!({"gateway": gateway.addr.to_string(), "hooks_token": format!("{id}-hook-token"),
                           "hooks_url": gateway.hooks_url()})
    };
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": wake("nova", &gateways[0]),
        "kaan": wake("kaan", &gateways[1]),
        "ada": {"gateway": gateways[2].addr.to_string(), "gateway_token": "ada-gateway-token",
                "hooks_token": "ada-hook-token", "hooks_url": gateways[2].hooks_url(), "delivery": "chat",
                "model": "test-model"},
    }));
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, Selection::All));
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(
        &permissions,
        serde_json::json!({"director": ["web:dana"], "operator": ["web:opal"], "viewer": ["web:vic"]}).to_string(),
    )
    .unwrap();
    let vic = fixture.secret_file("vic-web-token", VIEWER_TOKEN);
    let users = fixture.dir().join("web-users.json");
    let users_json = serde_json::json!({"dana": "env:MESH_TOKEN_WEB_DANA", "opal": "env:MESH_TOKEN_WEB_OPAL",
                                        "vic": format!("file:{}", vic.display())});
    std::fs::write(&users, users_json.to_string()).unwrap();
    let env = [
        ("MESH_PERMISSIONS", permissions.display().to_string()),
        ("MESH_WEB_USERS", users.display().to_string()),
        ("MESH_TOKEN_WEB_DANA", DIRECTOR_TOKEN.to_owned()),
        ("MESH_TOKEN_WEB_OPAL", OPERATOR_TOKEN.to_owned()),
    ];
    let bot = BotProcess::start(&nats.url(), &fixture.registry, env).await;
    Stack { nats, fixture, gateways, listener, bot }
}

async fn sign_in(browser: &Browser, url: &str, name: &str, token: &str) {
    browser.client.goto(&format!("{url}/login")).await.unwrap();
    browser.find("#name").await.send_keys(name).await.unwrap();
    browser.find("#token").await.send_keys(token).await.unwrap();
    browser.find("#signin button[type=submit]").await.click().await.unwrap();
    browser.find("#fleet").await;
}

/// Waits for the reply in `#result` whose title starts with `title` and
/// which offers Confirm, and gives it the id `id`. (Replies are shown newest
/// first, but an action's answer may land after a later one's when the live
/// stream ran ahead of it, so a prompt is found by its title.)
async fn prompt(browser: &Browser, title: &str, id: &str) {
    let title = serde_json::to_string(title).unwrap();
    browser
        .wait_until(
            &format!("a prompt {title}"),
            &format!(
                "(() => {{ const r = Array.from(document.querySelectorAll('#result .reply')).find(r => \
                 r.querySelector('.title').textContent.startsWith({title}) && r.querySelector('form.confirm')); \
                 if (r) r.id = '{id}'; return !!r; }})()"
            ),
        )
        .await;
}

/// The JavaScript expression: some reply in `#result` has a title containing `text`.
fn reply_says(text: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#result .reply .title')).some(t => t.textContent.includes({}))",
        serde_json::to_string(text).unwrap()
    )
}

/// The JavaScript expression: the fleet row of `agent` shows `state`.
fn agent_state(agent: &str, state: &str) -> String {
    format!("(document.querySelector('#fleet tr[data-agent=\"{agent}\"] td.state') || {{}}).textContent === '{state}'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_mesh_from_the_browser() {
    let stack = stack().await;
    let url = stack.bot.url.clone();
    let browser = Browser::start().await;

    // No session: the sign-in page, and nothing of the fleet.
    browser.client.goto(&url).await.unwrap();
    assert!(browser.client.current_url().await.unwrap().path().ends_with("/login"));
    let source = browser.client.source().await.unwrap();
    assert!(!source.contains("nova") && !source.contains("kaan"), "the sign-in page shows no fleet data");
    browser.screenshot("sign-in").await;

    sign_in(&browser, &url, "dana", DIRECTOR_TOKEN).await;
    for agent in ["nova", "kaan", "ada"] {
        browser.wait_until(&format!("{agent} answers"), &agent_state(agent, "ok")).await;
    }
    browser.screenshot("fleet").await;

    // Send from the traffic page: the row turns delivered with no reload;
    // the agent's markup is shown as text, never run.
    browser.client.goto(&format!("{url}/traffic")).await.unwrap();
    browser.wait_until("the live stream is open", "document.documentElement.dataset.live === 'open'").await;
    browser.client.execute("window.__stay = 42;", Vec::new()).await.unwrap();
    let text = "hello from the browser <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned=2\">";
    browser.find("#send-form select[name=agent] option[value=nova]").await.click().await.unwrap();
    browser.find("#send-form textarea[name=text]").await.send_keys(text).await.unwrap();
    browser.find("#send-form button[type=submit]").await.click().await.unwrap();
    let row = "Array.from(document.querySelectorAll('#traffic tbody tr')).find(r => r.querySelector('td.text').textContent === arguments_text)";
    let row = row.replace("arguments_text", &serde_json::to_string(text).unwrap());
    browser
        .wait_until(
            "the message is shown delivered",
            &format!(
                "({row} || {{querySelector: () => ({{}})}}).querySelector('td.outcome').textContent === 'delivered'"
            ),
        )
        .await;
    let stayed =
        browser.client.execute("return [window.__stay, window.__pwned === undefined];", Vec::new()).await.unwrap();
    assert_eq!(stayed, serde_json::json!([42, true]), "no reload, and the agent text did not run");
    let received = stack.gateways[0].wait_for(1, WAIT).await;
    assert!(received[0].text().contains("hello from the browser <script>"), "{}", received[0].text());
    browser.screenshot("traffic").await;

    // A soft kill shows the banner (live), resume clears it.
    browser.client.goto(&url).await.unwrap();
    browser.wait_until("the live stream is open", "document.documentElement.dataset.live === 'open'").await;
    browser.find("#kill-form input[name=reason]").await.send_keys("browser test").await.unwrap();
    browser.find("#kill-form button[value=soft]").await.click().await.unwrap();
    let banner = "!document.getElementById('kill-banner').hidden && document.getElementById('kill-banner').textContent.includes('SOFT')";
    browser.wait_until("the kill switch banner", banner).await;
    browser
        .wait_until(
            "nova is paused",
            "document.querySelector('#fleet tr[data-agent=\"nova\"] td.paused').textContent === 'paused'",
        )
        .await;
    browser.screenshot("kill-soft").await;
    browser.find("#resume-form button[type=submit]").await.click().await.unwrap();
    browser.wait_until("the banner goes", "document.getElementById('kill-banner').hidden").await;

    // A hard kill's prompt offers Cancel beside Confirm: cancelled, nothing is pulled.
    browser.find("#kill-form button[value=hard]").await.click().await.unwrap();
    prompt(&browser, "to run \"kill hard\"", "hard-prompt").await;
    browser.find("#hard-prompt form.cancel button").await.click().await.unwrap();
    browser.wait_until("the cancel is reported", &reply_says("cancelled by web:dana")).await;
    let fleet: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/api/fleet"))
        .bearer_auth(DIRECTOR_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["kill"], serde_json::json!([]), "a cancelled kill pulls nothing: {fleet}");
    assert!(browser.find("#kill-banner").await.attr("hidden").await.unwrap().is_some());

    // kaan's gateway refuses for good: a dead letter, replayed from its page.
    stack.gateways[1].script([400]);
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    browser.client.goto(&format!("{url}/traffic")).await.unwrap();
    browser.wait_until("the live stream is open", "document.documentElement.dataset.live === 'open'").await;
    browser.find("#send-form select[name=agent] option[value=kaan]").await.click().await.unwrap();
    browser.find("#send-form textarea[name=text]").await.send_keys("refused once, replayed").await.unwrap();
    browser.find("#send-form button[type=submit]").await.click().await.unwrap();
    browser
        .wait_until(
            "the message is shown dead-lettered",
            "Array.from(document.querySelectorAll('#traffic td.outcome')).some(td => td.textContent.startsWith('dead-lettered'))",
        )
        .await;
    assert_eq!(mesh_tests::fixtures::dead_letters(&js).await.len(), 1);
    browser.client.goto(&format!("{url}/dead-letters")).await.unwrap();
    let cell = browser.find("#dead-letters tr[data-agent=kaan] td.text").await;
    assert_eq!(cell.text().await.unwrap(), "refused once, replayed");
    browser.screenshot("dead-letters").await;
    browser.find("#dead-letters tr[data-agent=kaan] form button").await.click().await.unwrap();
    browser.wait_until("the replay is reported", "document.querySelector('#result .reply .title') !== null").await;
    let delivered = stack.gateways[1].wait_for(2, WAIT).await;
    assert!(delivered[1].text().contains("refused once, replayed"), "{}", delivered[1].text());
    browser.client.goto(&format!("{url}/dead-letters")).await.unwrap();
    browser.find("#no-dead-letters").await;

    // Each action is in the audit trail as web:dana from the front end web.
    browser.client.goto(&format!("{url}/audit?who=web:dana&command=kill")).await.unwrap();
    let rows = browser.client.find_all(Locator::Css("#audit tbody tr")).await.unwrap();
    let mut texts = Vec::new();
    for row in rows {
        let text = row.text().await.unwrap();
        assert!(text.contains("web:dana web kill "), "{text}");
        texts.push(text);
    }
    assert!(texts.iter().any(|t| t.contains("kill soft")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("kill hard") && t.contains("confirmation required")), "{texts:?}");
    browser.screenshot("audit").await;
    browser.close().await;
    stack.listener.stop().await.unwrap();
    let (_, output) = stack.bot.stop().await;
    assert!(!output.contains(DIRECTOR_TOKEN) && !output.contains(VIEWER_TOKEN), "no token in the bot's log");
    drop(stack.fixture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_actions_and_forged_ones_are_refused() {
    let stack = stack().await;
    let url = stack.bot.url.clone();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // Without a session or token: the sign-in page only, no fleet data.
    let page = http.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/login");
    let api = http.get(format!("{url}/api/fleet")).send().await.unwrap();
    assert_eq!(api.status(), 401);
    assert!(!api.text().await.unwrap().contains("nova"));
    let forged = http
        .post(format!("{url}/actions/kill"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grade=soft")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let wrong = http.get(format!("{url}/api/fleet")).bearer_auth("not-a-token-0123456789").send().await.unwrap();
    assert_eq!(wrong.status(), 401);

    // A script with the viewer's bearer token reads the fleet (once the bot has pinged it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let fleet = http.get(format!("{url}/api/fleet")).bearer_auth(VIEWER_TOKEN).send().await.unwrap();
        assert_eq!(fleet.status(), 200);
        let fleet: serde_json::Value = fleet.json().await.unwrap();
        if fleet["agents"].as_array().unwrap().len() == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no fleet within {WAIT:?}: {fleet}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let max = mesh_bot::web::auth::MAX_FAILURES;
    let login = |name: &str, token: &str| {
        http.post(format!("{url}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string([("name", name), ("token", token)]).unwrap())
            .send()
    };

    // Another site's page posting sign-ins for dana (its browser says so in
    // Sec-Fetch-Site, or an older one in Origin): 403, before anything is
    // counted, so it cannot lock dana out; a right token from there is refused too.
    let elsewhere: [&[(&str, &str)]; 3] = [
        &[("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")],
        &[("sec-fetch-site", "same-site")],
        &[("origin", "https://evil.example")],
    ];
    for i in 0..max * 2 + 1 {
        let token = if i == max * 2 { DIRECTOR_TOKEN.to_owned() } else { format!("guess-{i}") };
        let mut request = http
            .post(format!("{url}/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string([("name", "dana"), ("token", token.as_str())]).unwrap());
        for (name, value) in elsewhere[i % elsewhere.len()] {
            request = request.header(*name, *value);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 403, "attempt {i} from another site");
        assert!(answer.headers().get("set-cookie").is_none(), "attempt {i}: no session");
    }
    let dana = login("dana", DIRECTOR_TOKEN).await.unwrap();
    assert_eq!(dana.status(), 303, "another site's attempts did not count against dana");

    // Someone guessing dana's token: after MAX_FAILURES dana waits, even with her token; vic signs in below.
    for i in 0..max * 3 {
        let want = if i < max { 401 } else { 429 };
        assert_eq!(login("dana", &format!("guess-{i}")).await.unwrap().status(), want, "attempt {i}");
    }
    let flooded = login("dana", DIRECTOR_TOKEN).await.unwrap();
    assert_eq!(flooded.status(), 429, "the guessed name is limited");
    assert!(flooded.text().await.unwrap().contains("Too many failed sign-ins"));

    let browser = Browser::start().await;
    sign_in(&browser, &url, "vic", VIEWER_TOKEN).await;
    browser.wait_until("nova answers", &agent_state("nova", "ok")).await;
    let forms = browser.client.find_all(Locator::Css("form.action")).await.unwrap();
    assert!(forms.is_empty(), "a viewer gets no action forms");
    browser.screenshot("viewer-fleet").await;

    // The session cookie: HttpOnly (the page's script cannot read it), SameSite=Strict.
    let cookies = browser.client.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|c| c.name() == "mesh_session").expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");
    let visible = browser.client.execute("return document.cookie;", Vec::new()).await.unwrap();
    assert!(!visible.as_str().unwrap().contains("mesh_session"));

    // Forged from the signed-in page: without the CSRF token, then with it (the engine refuses the role).
    let post = |body: &str| {
        format!(
            "return fetch('/actions/kill', {{method: 'POST', headers: {{'Content-Type': 'application/x-www-form-urlencoded', 'Accept': 'application/json'}}, body: {body}}}).then(r => r.status);"
        )
    };
    let no_csrf = browser.client.execute(&post("'grade=soft'"), Vec::new()).await.unwrap();
    assert_eq!(no_csrf, serde_json::json!(403));
    let csrf = "'grade=soft&csrf=' + encodeURIComponent(document.querySelector('form.signout input[name=csrf]').value)";
    let with_csrf = browser.client.execute(&post(csrf), Vec::new()).await.unwrap();
    assert_eq!(with_csrf, serde_json::json!(403), "a viewer may not kill");
    let fleet: serde_json::Value =
        http.get(format!("{url}/api/fleet")).bearer_auth(DIRECTOR_TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(fleet["kill"], serde_json::json!([]), "nothing was pulled: {fleet}");
    let audit: serde_json::Value = http
        .get(format!("{url}/api/audit?who=web:vic"))
        .bearer_auth(DIRECTOR_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let decisions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|r| r["decision"].as_str()).collect();
    assert_eq!(decisions, ["denied"], "the refused kill is audited: {audit}");

    // Forged Replay and Cancel with a valid CSRF token, from vic (a viewer,
    // in the browser) and opal (an operator: no `dlq replay`, and the code is
    // dana's): refused, nothing replayed, nothing cancelled.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let registry = mesh_listener::registry_file::load(&stack.fixture.registry, &Default::default()).unwrap();
    stack.gateways[1].script([400]);
    mesh_bot::publish::send(&js, &registry, "cli:test", "kaan", "stays dead", Priority::Normal).await.unwrap();
    wait_for_dead_letters(&js, 1).await;
    let seq = js.get_stream("MESH_DLQ").await.unwrap().get_info().await.unwrap().state.last_sequence;
    let reached_kaan = stack.gateways[1].requests().len();
    let kill: serde_json::Value = http
        .post(format!("{url}/api/actions/kill"))
        .bearer_auth(DIRECTOR_TOKEN)
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grade=hard&agent=nova")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code = kill["confirmation_code"].as_str().unwrap_or_else(|| panic!("a code: {kill}")).to_owned();
    let forged = [("replay", format!("agent=kaan&dead_letter={seq}")), ("cancel", format!("code={code}"))];
    for (action, body) in &forged {
        let status = browser
            .client
            .execute(
                &format!(
                    "return fetch('/actions/{action}', {{method: 'POST', headers: {{'Content-Type': \
                     'application/x-www-form-urlencoded', 'Accept': 'application/json'}}, body: '{body}&csrf=' + \
                     encodeURIComponent(document.querySelector('form.signout input[name=csrf]').value)}}).then(r => r.status);"
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(status, serde_json::json!(403), "vic's forged {action}");
    }
    let (opal_cookie, opal_csrf) = http_session(&http, &url, "opal", OPERATOR_TOKEN).await;
    for (action, body) in &forged {
        let answer = http
            .post(format!("{url}/actions/{action}"))
            .header("cookie", &opal_cookie)
            .header("accept", "application/json")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("{body}&csrf={opal_csrf}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 403, "opal's forged {action}: {}", answer.text().await.unwrap());
    }
    assert_eq!(mesh_tests::fixtures::dead_letters(&js).await.len(), 1, "nothing was replayed");
    assert_eq!(stack.gateways[1].requests().len(), reached_kaan, "nothing more reached kaan");
    let cancelled: serde_json::Value = http
        .post(format!("{url}/api/actions/cancel"))
        .bearer_auth(DIRECTOR_TOKEN)
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("code={code}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let title = cancelled["reply"]["title"].as_str().unwrap_or_default();
    assert!(title.contains("cancelled by web:dana"), "dana's code was still pending: {cancelled}");

    // A flood of wrong bearer tokens from this address: 429 once
    // MAX_BEARER_FAILURES are counted (one was sent above), then even the
    // right token waits; the browser session is not affected.
    let bearer_max = mesh_bot::web::auth::MAX_BEARER_FAILURES;
    let mut statuses = Vec::new();
    for i in 0..bearer_max + 5 {
        let answer = http.get(format!("{url}/api/fleet")).bearer_auth(format!("guess-{i}-0123456789")).send().await;
        statuses.push(answer.unwrap().status().as_u16());
    }
    let unauthorized = statuses.iter().take_while(|s| **s == 401).count();
    assert_eq!(unauthorized, bearer_max - 1, "{statuses:?}");
    assert!(statuses[unauthorized..].iter().all(|s| *s == 429), "{statuses:?}");
    let right = http.get(format!("{url}/api/fleet")).bearer_auth(DIRECTOR_TOKEN).send().await.unwrap();
    assert_eq!(right.status(), 429, "the right token waits too");
    assert_eq!(right.headers()["retry-after"], "60");
    let action = http
        .post(format!("{url}/api/actions/send"))
        .bearer_auth(DIRECTOR_TOKEN)
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("agent=nova&text=hi")
        .send()
        .await
        .unwrap();
    assert_eq!(action.status(), 429);
    let session = browser.client.execute("return fetch('/api/fleet').then(r => r.status);", Vec::new()).await.unwrap();
    assert_eq!(session, serde_json::json!(200), "a browser session is let in");
    browser.close().await;
    stack.listener.stop().await.unwrap();
    let (_, output) = stack.bot.stop().await;
    for token in [DIRECTOR_TOKEN, VIEWER_TOKEN, OPERATOR_TOKEN] {
        assert!(!output.contains(token), "no token in the bot's log");
    }
    assert!(output.contains("sign-in refused: posted from another site"), "the cross-site sign-ins are logged");
}

/// Signs `name` in over plain HTTP: the session's `Cookie` header value and its CSRF token.
async fn http_session(http: &reqwest::Client, url: &str, name: &str, token: &str) -> (String, String) {
    let signed_in = http
        .post(format!("{url}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string([("name", name), ("token", token)]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "{name} signs in");
    let set = signed_in.headers()["set-cookie"].to_str().unwrap();
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = http.get(format!("{url}/")).header("cookie", &cookie).send().await.unwrap().text().await.unwrap();
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).and_then(|rest| rest.split('"').next());
    (cookie, csrf.unwrap_or_else(|| panic!("a CSRF token in {page}")).to_owned())
}

/// Waits until `MESH_DLQ` holds `n` dead letters; returns them, oldest first.
async fn wait_for_dead_letters(
    js: &async_nats::jetstream::Context,
    n: usize,
) -> Vec<(mesh_protocol::dead_letter::DeadLetter, bytes::Bytes)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stored = mesh_tests::fixtures::dead_letters(js).await;
        if stored.len() == n {
            return stored;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} dead letters, not {n}, within {WAIT:?}", stored.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `dlq_seq` of every dead-letter row on the page, top to bottom.
async fn dead_letter_rows(browser: &Browser) -> Vec<u64> {
    let seqs = browser
        .client
        .execute(
            "return Array.from(document.querySelectorAll('#dead-letters tbody tr')).map(r => r.dataset.seq);",
            Vec::new(),
        )
        .await
        .unwrap();
    seqs.as_array().unwrap().iter().map(|s| s.as_str().unwrap().parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_dead_letter_is_replayed_on_its_own() {
    let stack = stack().await;
    let url = stack.bot.url.clone();
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let registry = mesh_listener::registry_file::load(&stack.fixture.registry, &Default::default()).unwrap();

    // kaan's gateway refuses two messages for good: two dead letters of kaan, the older one first.
    stack.gateways[1].script([400, 400]);
    for (n, text) in [(1, "the older one"), (2, "the newer one")] {
        mesh_bot::publish::send(&js, &registry, "cli:test", "kaan", text, Priority::Normal).await.unwrap();
        wait_for_dead_letters(&js, n).await;
    }
    let browser = Browser::start().await;
    sign_in(&browser, &url, "dana", DIRECTOR_TOKEN).await;
    browser.client.goto(&format!("{url}/dead-letters")).await.unwrap();
    browser.find("#dead-letters tbody tr").await;
    let rows = dead_letter_rows(&browser).await;
    assert_eq!(rows.len(), 2, "both dead letters are listed: {rows:?}");
    let (older, newer) = (*rows.iter().min().unwrap(), *rows.iter().max().unwrap());
    let text = |seq: u64| format!("#dead-letters tr[data-seq=\"{seq}\"] td.text");
    assert_eq!(browser.find(&text(newer)).await.text().await.unwrap(), "the newer one");
    let buttons = browser.client.find_all(Locator::Css("#dead-letters form.replay button")).await.unwrap();
    assert_eq!(buttons.len(), 2, "every dead letter has its own Replay");

    // Replay the newer one: only it reaches kaan; its row goes, the older one stays.
    browser.find(&format!("#dead-letters tr[data-seq=\"{newer}\"] form button")).await.click().await.unwrap();
    browser
        .wait_until(
            "the replay is reported",
            "(document.querySelector('#result .reply .title') || {}).textContent === 'replayed 1 dead letters of kaan'",
        )
        .await;
    let got = stack.gateways[1].wait_for(3, WAIT).await;
    assert!(got[2].text().contains("the newer one"), "{}", got[2].text());
    browser.wait_until("the replayed row goes", &format!("!document.querySelector('{}')", text(newer))).await;
    assert_eq!(dead_letter_rows(&browser).await, [older]);
    browser.screenshot("dead-letter-replayed").await;
    browser.client.goto(&format!("{url}/dead-letters")).await.unwrap();
    browser.find("#dead-letters tbody tr").await;
    assert_eq!(dead_letter_rows(&browser).await, [older], "the older one is still listed");
    assert_eq!(browser.find(&text(older)).await.text().await.unwrap(), "the older one");
    let stored = mesh_tests::fixtures::dead_letters(&js).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.agent.as_str(), "kaan");

    // Forged replays from the signed-in page (with its CSRF token) replay nothing and say why.
    let post = |body: &str| {
        format!(
            "return fetch('/actions/replay', {{method: 'POST', headers: {{'Content-Type': 'application/x-www-form-urlencoded', \
             'X-Mesh-Fragment': '1'}}, body: '{body}&csrf=' + encodeURIComponent(document.querySelector('form.signout \
             input[name=csrf]').value)}}).then(r => r.text().then(t => [r.status, t]));"
        )
    };
    let forged = [
        // Replayed already.
        (format!("agent=kaan&dead_letter={newer}"), 422, "no longer stored"),
        // kaan's dead letter, named as nova's.
        (format!("agent=nova&dead_letter={older}"), 422, "no longer stored"),
        // Never stored.
        ("agent=kaan&dead_letter=999999".to_owned(), 422, "nothing was replayed"),
        ("agent=kaan&dead_letter=-1".to_owned(), 400, "name the dead letter to replay"),
        ("agent=kaan".to_owned(), 400, "name the dead letter to replay"),
    ];
    for (body, status, says) in &forged {
        let answer = browser.client.execute(&post(body), Vec::new()).await.unwrap();
        assert_eq!(answer[0], serde_json::json!(status), "{body}: {answer}");
        assert!(answer[1].as_str().unwrap().contains(says), "{body}: {answer}");
    }
    // And from a script with the director's bearer token.
    let http = reqwest::Client::new();
    let api = http
        .post(format!("{url}/api/actions/replay"))
        .bearer_auth(DIRECTOR_TOKEN)
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("agent=kaan&dead_letter=999999")
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 422);
    let api: serde_json::Value = api.json().await.unwrap();
    assert!(
        api["reply"]["title"].as_str().unwrap().contains("dead letter 999999 of kaan is no longer stored"),
        "{api}"
    );
    assert_eq!(mesh_tests::fixtures::dead_letters(&js).await.len(), 1, "nothing was replayed");
    assert_eq!(stack.gateways[1].requests().len(), 3, "nothing more reached kaan");
    assert!(stack.gateways[0].requests().is_empty(), "nothing reached nova");

    // The replay took the engine's road: audited as web:dana's click on that dead letter.
    let audit: serde_json::Value = http
        .get(format!("{url}/api/audit?who=web:dana&command=dlq replay"))
        .bearer_auth(DIRECTOR_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lines: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|r| r["line"].as_str()).collect();
    assert!(lines.contains(&format!("dlq replay kaan (dead letter {newer}, button)").as_str()), "{audit}");
    browser.close().await;
    stack.listener.stop().await.unwrap();
    drop(stack.bot.stop().await);
    drop(stack.fixture);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_is_answered_in_place_and_a_hard_kill_and_its_resume_are_confirmed() {
    let stack = stack().await;
    let url = stack.bot.url.clone();
    let http = reqwest::Client::new();
    let kills = || async {
        let fleet: serde_json::Value = http
            .get(format!("{url}/api/fleet"))
            .bearer_auth(DIRECTOR_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        fleet["kill"].clone()
    };
    let browser = Browser::start().await;
    sign_in(&browser, &url, "dana", DIRECTOR_TOKEN).await;
    browser.wait_until("ada answers", &agent_state("ada", "ok")).await;
    browser.wait_until("the live stream is open", "document.documentElement.dataset.live === 'open'").await;
    browser.client.execute("window.__stay = 42;", Vec::new()).await.unwrap();

    // An agent added to the registry while the page is open shows in the
    // fleet and in every action form's agent list, without a reload.
    let mut registry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stack.fixture.registry).unwrap()).unwrap();
    registry["zed"] = serde_json::json!({"gateway": stack.gateways[0].addr.to_string(),
                                         "hooks_token": "zed-hook-token", "hooks_url": stack.gateways[0].hooks_url()});
    let written = stack.fixture.dir().join("tokens.json.new");
    std::fs::write(&written, registry.to_string()).unwrap();
    std::fs::rename(&written, &stack.fixture.registry).unwrap();
    browser.wait_until("zed is in the fleet", "document.querySelector('#fleet tr[data-agent=\"zed\"]') !== null").await;
    browser
        .wait_until(
            "zed is in every action form",
            "['send-form', 'ask-form', 'kill-form', 'resume-form'].every(f => \
             document.querySelector('#' + f + ' select[name=agent] option[value=zed]') !== null)",
        )
        .await;

    // zed chosen in the Kill form, then removed from the registry: the live
    // update keeps zed chosen (marked), never widening the kill to all agents.
    browser.find("#kill-form select[name=agent] option[value=zed]").await.click().await.unwrap();
    registry.as_object_mut().unwrap().remove("zed");
    std::fs::write(&written, registry.to_string()).unwrap();
    std::fs::rename(&written, &stack.fixture.registry).unwrap();
    browser
        .wait_until("zed leaves the fleet", "document.querySelector('#fleet tr[data-agent=\"zed\"]') === null")
        .await;
    let kill_target = browser
        .client
        .execute(
            "const s = document.querySelector('#kill-form select[name=agent]'); \
             return [s.value, s.selectedOptions[0].textContent];",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(kill_target, serde_json::json!(["zed", "zed (no longer in the registry)"]));
    browser.screenshot("kill-target-gone").await;

    // Ask ada: the answer appears in place when it comes, as text.
    browser.find("#ask-form select[name=agent] option[value=ada]").await.click().await.unwrap();
    browser.find("#ask-form textarea[name=text]").await.send_keys("6 x 7?").await.unwrap();
    browser.find("#ask-form button[type=submit]").await.click().await.unwrap();
    let answered = format!(
        "Array.from(document.querySelectorAll('#result .reply')).some(r => r.querySelector('.title').textContent === \
         'ada replied' && r.textContent.includes({}))",
        serde_json::to_string(ADA_ANSWERS).unwrap()
    );
    browser.wait_until("ada's answer is shown", &answered).await;
    let stayed = browser.client.execute("return window.__stay;", Vec::new()).await.unwrap();
    assert_eq!(stayed, serde_json::json!(42), "no reload");
    let bold = browser.client.find_all(Locator::Css("#result b")).await.unwrap();
    assert!(bold.is_empty(), "the agent's markup is text");
    let asked = stack.gateways[2].wait_for(1, WAIT).await;
    assert!(asked[0].body.to_string().contains("6 x 7?"), "{}", asked[0].body);
    browser.screenshot("ask").await;

    // kill hard asks for confirmation: nothing is pulled until Confirm (six
    // control commands would pass dana's rate limit of 5 a minute: Cancel is
    // tested in an_operator_runs_the_mesh_from_the_browser).
    browser.find("#kill-form select[name=agent] option[value=nova]").await.click().await.unwrap();
    browser.find("#kill-form input[name=reason]").await.send_keys("hard test").await.unwrap();
    browser.find("#kill-form button[value=hard]").await.click().await.unwrap();
    prompt(&browser, "to run \"kill hard\"", "hard-prompt").await;
    let confirm = browser.find("#hard-prompt form.confirm button").await;
    assert!(confirm.text().await.unwrap().starts_with("Confirm "), "the code is on the button");
    let in_view = "(r => r.top >= 0 && r.bottom <= window.innerHeight)(document.querySelector('#hard-prompt form.confirm \
                   button').getBoundingClientRect())";
    browser.wait_until("the prompt is brought into view", in_view).await;
    assert_eq!(kills().await, serde_json::json!([]), "not pulled before it is confirmed");
    assert!(browser.find("#kill-banner").await.attr("hidden").await.unwrap().is_some());
    browser.screenshot("kill-hard-confirm").await;
    confirm.click().await.unwrap();
    let banner = "!document.getElementById('kill-banner').hidden && document.getElementById('kill-banner').textContent.includes('agent nova: HARD by web:dana')";
    browser.wait_until("the hard kill banner", banner).await;
    browser
        .wait_until(
            "nova is paused",
            "document.querySelector('#fleet tr[data-agent=\"nova\"] td.paused').textContent === 'paused'",
        )
        .await;
    assert_eq!(kills().await[0]["mode"], "hard");
    browser.screenshot("kill-hard").await;

    // Resuming from a hard kill asks for confirmation too; confirmed, it lifts the kill.
    browser.find("#resume-form select[name=agent] option[value=nova]").await.click().await.unwrap();
    browser.find("#resume-form button[type=submit]").await.click().await.unwrap();
    prompt(&browser, "to run \"resume\"", "resume-prompt").await;
    let confirm = browser.find("#resume-prompt form.confirm button").await;
    assert_eq!(kills().await[0]["mode"], "hard", "still pulled before the resume is confirmed");
    confirm.click().await.unwrap();
    browser.wait_until("the banner goes", "document.getElementById('kill-banner').hidden").await;
    assert_eq!(kills().await, serde_json::json!([]));
    browser.screenshot("kill-hard-resumed").await;

    // An undecodable dead letter of kaan's (dana's fifth control command this
    // minute, the last the rate limit allows): its Replay answers an error
    // saying why, and its row and the dead letter stay.
    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await.unwrap());
    let record = mesh_protocol::dead_letter::DeadLetter {
        agent: "kaan".parse().unwrap(),
        reason: "gateway answered HTTP 400; not retried".into(),
        status: Some(400),
        attempts: 1,
        subject: "agents.kaan.inbox".into(),
        stream_seq: 1,
        message_id: uuid::Uuid::new_v4(),
        stored_at: time::OffsetDateTime::now_utc(),
    };
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in record.headers() {
        headers.insert(name, value.as_str());
    }
    let stored = js.publish_with_headers("mesh.dlq.kaan", headers, "{not json".into()).await.unwrap().await.unwrap();
    let row = format!("#dead-letters tr[data-seq=\"{}\"]", stored.sequence);
    browser.client.goto(&format!("{url}/dead-letters")).await.unwrap();
    browser.find(&format!("{row} form button")).await.click().await.unwrap();
    let refused = "Array.from(document.querySelectorAll('#result .reply[data-tone=\"error\"]')).some(r => \
                   r.querySelector('.title').textContent.includes('was not replayed (it is kept)') && \
                   r.textContent.includes('does not decode to a message'))";
    browser.wait_until("the replay is refused, saying why", refused).await;
    assert!(browser.client.find(Locator::Css(&row)).await.is_ok(), "its row stays");
    assert_eq!(mesh_tests::fixtures::dead_letters(&js).await.len(), 1, "the dead letter is still stored");
    browser.screenshot("dead-letter-not-replayed").await;
    browser.close().await;
    stack.listener.stop().await.unwrap();
    drop(stack.bot.stop().await);
    drop(stack.fixture);
}

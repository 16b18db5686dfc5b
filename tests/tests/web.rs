//! The web console in a real headless Chromium (chromedriver over WebDriver)
//! against a real `mesh bot`, nats-server, listeners and recording gateways:
//! sign-in, the fleet, a message sent and seen delivered without a reload,
//! the kill switch banner and resume, a dead letter replayed; and the
//! security cases: no session shows only the sign-in page, a viewer gets no
//! action and a forged one is refused, agent text is shown as text.
//! Each test saves screenshots under `target/web-screenshots/`.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use fantoccini::Locator;
use mesh_listener::config::Selection;
use mesh_tests::bot::BotProcess;
use mesh_tests::browser::Browser;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);
const DIRECTOR_TOKEN: &str = "dana-director-token-0123456789";
const VIEWER_TOKEN: &str = "vic-viewer-token-0123456789";

struct Stack {
    nats: TestNats,
    fixture: Fixture,
    gateways: Vec<RecordingGateway>,
    listener: ListenerHandle,
    bot: BotProcess,
}

/// nats-server, three agents behind recording gateways and their listener,
/// `mesh bot` with the web users dana (director) and vic (viewer).
async fn stack() -> Stack {
    let nats = TestNats::start().await;
    let gateways =
        vec![RecordingGateway::start().await, RecordingGateway::start().await, RecordingGateway::start().await];
    let fixture =
        Fixture::registry(&[("nova", &gateways[0], true), ("kaan", &gateways[1], true), ("ada", &gateways[2], true)]);
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, Selection::All));
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(&permissions, serde_json::json!({"director": ["web:dana"], "viewer": ["web:vic"]}).to_string())
        .unwrap();
    let vic = fixture.secret_file("vic-web-token", VIEWER_TOKEN);
    let users = fixture.dir().join("web-users.json");
    let users_json = serde_json::json!({"dana": "env:MESH_TOKEN_WEB_DANA", "vic": format!("file:{}", vic.display())});
    std::fs::write(&users, users_json.to_string()).unwrap();
    let env = [
        ("MESH_PERMISSIONS", permissions.display().to_string()),
        ("MESH_WEB_USERS", users.display().to_string()),
        ("MESH_TOKEN_WEB_DANA", DIRECTOR_TOKEN.to_owned()),
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
    assert!(!rows.is_empty());
    for row in rows {
        let text = row.text().await.unwrap();
        assert!(text.contains("web:dana") && text.contains("web") && text.contains("kill soft"), "{text}");
    }
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
    browser.close().await;
    stack.listener.stop().await.unwrap();
    drop(stack.bot.stop().await);
}

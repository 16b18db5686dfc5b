//! The web console's HTML, rendered on the server with maud (every
//! interpolated value is escaped: agent text is untrusted). Each page is
//! readable without JavaScript; `console.js` only keeps it live and submits
//! the action forms in place.

use maud::{DOCTYPE, Markup, html};

use super::live::{FleetSnapshot, TrafficRow};
use crate::audit::AuditRecord;
use crate::command::{Reply, Section, Tone};
use crate::dlq::DeadLetterEntry;

/// Who is looking, and what they may do.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The user's name.
    pub user: String,
    /// Their role (`viewer` .. `director`), or `none`.
    pub role: String,
    /// The session's CSRF token, carried by every form.
    pub csrf: String,
    /// What their role allows.
    pub can: Can,
}

/// The actions a role allows (the engine checks again on every action).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Can {
    /// send, broadcast, ask (operator).
    pub send: bool,
    /// kill soft/hard, resume, dead letters (admin).
    pub kill: bool,
    /// kill nuclear (director).
    pub nuclear: bool,
}

/// The pages of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/`.
    Fleet,
    /// `/traffic`.
    Traffic,
    /// `/dead-letters`.
    DeadLetters,
    /// `/audit`.
    Audit,
    /// An action's result.
    Result,
}

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · mesh console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body { (body) }
        }
    }
}

fn page(viewer: &Viewer, current: Page, title: &str, main: Markup) -> Markup {
    let link = |href: &str, label: &str, page: Page| {
        html! { a href=(href) aria-current=[(page == current).then_some("page")] { (label) } }
    };
    layout(
        title,
        html! {
            header {
                nav aria-label="main" {
                    strong { "mesh" }
                    (link("/", "Fleet", Page::Fleet))
                    (link("/traffic", "Live traffic", Page::Traffic))
                    @if viewer.can.kill { (link("/dead-letters", "Dead letters", Page::DeadLetters)) }
                    (link("/audit", "Audit", Page::Audit))
                }
                form.signout method="post" action="/logout" {
                    span #who { (viewer.user) " (" (viewer.role) ")" }
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    button type="submit" { "Sign out" }
                }
            }
            main { h1 { (title) } (main) }
        },
    )
}

/// The sign-in page (the only page without a session).
pub fn sign_in(error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        html! {
            main.narrow {
                h1 { "Sign in to the mesh console" }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form #signin method="post" action="/login" {
                    label for="name" { "User" }
                    input #name name="name" autocomplete="username" required;
                    label for="token" { "Token" }
                    input #token name="token" type="password" autocomplete="current-password" required;
                    button type="submit" { "Sign in" }
                }
                p.hint { "Users and their tokens are listed in the file named by MESH_WEB_USERS." }
            }
        },
    )
}

/// The kill switch banner (hidden when nothing is in force).
pub fn kill_banner(fleet: &FleetSnapshot) -> Markup {
    html! {
        div #kill-banner .banner role="status" hidden[fleet.kill.is_empty()] {
            @for k in &fleet.kill {
                p data-mode=(k.mode) { "Kill switch: " (k.text) }
            }
        }
    }
}

/// `/`: one row per agent, the NATS server, the kill switch, the actions.
pub fn fleet(viewer: &Viewer, fleet: &FleetSnapshot) -> Markup {
    let agents: Vec<&str> = fleet.agents.iter().map(|a| a.agent.as_str()).collect();
    page(
        viewer,
        Page::Fleet,
        "Fleet",
        html! {
            (kill_banner(fleet))
            p #nats {
                "NATS " (fleet.nats.name) " " (fleet.nats.version) ": "
                span #nats-state { @if fleet.nats.connected { "connected" } @else { "disconnected" } }
                " · dead letters: " span #dead-total { (fleet.dead_letters) }
            }
            @if let Some(error) = &fleet.error { p.error { (error) } }
            div.scroll {
                table #fleet {
                    thead { tr {
                        th { "Agent" } th { "Delivery" } th { "Listener" } th { "RTT ms" } th { "Pending" }
                        th { "Last delivery" } th { "Dead letters" } th { "Paused" }
                    } }
                    tbody {
                        @for a in &fleet.agents {
                            tr data-agent=(a.agent) {
                                td { (a.agent) } td { (a.delivery) } td.state { (a.state) }
                                td { (opt(a.rtt_ms)) } td { (opt(a.pending)) }
                                td { @if let Some(l) = &a.last_delivery { (l.outcome) " " (l.at) } @else { "-" } }
                                td { (a.dead_letters) } td.paused { @if a.paused { "paused" } @else { "no" } }
                            }
                        }
                    }
                }
            }
            (actions(viewer, &agents))
            section aria-labelledby="events-h" {
                h2 #events-h { "Events" }
                ul #events aria-live="polite" {}
            }
        },
    )
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn agent_select(agents: &[&str], with_all: bool) -> Markup {
    html! {
        select name="agent" {
            @if with_all { option value="" { "all agents" } }
            @for a in agents { option value=(a) { (a) } }
        }
    }
}

fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(viewer.csrf); }
}

/// The action forms the viewer's role allows (none for a viewer).
pub fn actions(viewer: &Viewer, agents: &[&str]) -> Markup {
    html! {
        @if viewer.can.send || viewer.can.kill {
            section #actions aria-labelledby="actions-h" {
                h2 #actions-h { "Actions" }
                div #result role="status" aria-live="polite" {}
                div.forms {
                    @if viewer.can.send {
                        form.action #send-form method="post" action="/actions/send" {
                            (csrf(viewer))
                            h3 { "Send" }
                            label { "To " (agent_select(agents, false)) }
                            label { "Priority " select name="priority" {
                                option value="normal" { "normal" } option value="low" { "low" }
                                option value="high" { "high" } option value="urgent" { "urgent" }
                            } }
                            label { "Text " textarea name="text" required rows="2" {} }
                            button type="submit" { "Send" }
                        }
                        form.action #broadcast-form method="post" action="/actions/broadcast" {
                            (csrf(viewer))
                            h3 { "Broadcast" }
                            label { "Text " textarea name="text" required rows="2" {} }
                            button type="submit" { "Broadcast" }
                        }
                        form.action #ask-form method="post" action="/actions/ask" {
                            (csrf(viewer))
                            h3 { "Ask" }
                            label { "Agent " (agent_select(agents, false)) }
                            label { "Question " textarea name="text" required rows="2" {} }
                            button type="submit" { "Ask" }
                        }
                    }
                    @if viewer.can.kill {
                        form.action #kill-form method="post" action="/actions/kill" {
                            (csrf(viewer))
                            h3 { "Kill switch" }
                            label { "Scope " (agent_select(agents, true)) }
                            label { "Soft pause for " input name="duration" placeholder="5m" size="5"; }
                            label { "Reason " input name="reason"; }
                            button type="submit" name="grade" value="soft" { "Kill soft" }
                            button type="submit" name="grade" value="hard" { "Kill hard" }
                            @if viewer.can.nuclear {
                                button.danger type="submit" name="grade" value="nuclear" { "Kill nuclear" }
                            }
                        }
                        form.action #resume-form method="post" action="/actions/resume" {
                            (csrf(viewer))
                            h3 { "Resume" }
                            label { "Scope " (agent_select(agents, true)) }
                            button type="submit" { "Resume" }
                        }
                    }
                }
            }
        }
    }
}

/// `/traffic`: messages as they are sent and delivered, newest first.
pub fn traffic(viewer: &Viewer, rows: &[TrafficRow], agents: &[&str]) -> Markup {
    page(
        viewer,
        Page::Traffic,
        "Live traffic",
        html! {
            (actions(viewer, agents))
            div.scroll {
                table #traffic {
                    thead { tr {
                        th { "Stored" } th { "From" } th { "To" } th { "Kind" } th { "Priority" }
                        th { "Text" } th { "Outcome" } th { "Latency ms" }
                    } }
                    tbody { @for r in rows { (traffic_row(r)) } }
                }
            }
        },
    )
}

/// One traffic row (the script builds the same shape).
pub fn traffic_row(r: &TrafficRow) -> Markup {
    html! {
        tr data-id=(r.id) {
            td { (r.at) } td { (r.from) } td { (r.to) } td { (r.kind) } td { (r.priority) }
            td.text { (r.text) } td.outcome { (r.outcome) } td { (opt(r.latency_ms)) }
        }
    }
}

/// `/dead-letters`: each with its own Replay, which replays that dead letter only.
pub fn dead_letters(viewer: &Viewer, entries: &[DeadLetterEntry], error: Option<&str>) -> Markup {
    page(
        viewer,
        Page::DeadLetters,
        "Dead letters",
        html! {
            div #result role="status" aria-live="polite" {}
            @if let Some(error) = error { p.error { (error) } }
            @if entries.is_empty() { p #no-dead-letters { "No dead letters." } }
            div.scroll {
                table #dead-letters {
                    thead { tr {
                        th { "Agent" } th { "Dead-lettered" } th { "Reason" } th { "Status" } th { "Attempts" }
                        th { "Text" } th { "" }
                    } }
                    tbody {
                        @for e in entries {
                            tr data-seq=(e.dlq_seq) data-agent=(e.agent) {
                                td { (e.agent) } td { (crate::killswitch::rfc3339(e.at)) } td { (e.reason) }
                                td { (e.status.map_or_else(|| "-".to_owned(), |s| s.to_string())) }
                                td { (e.attempts) } td.text { (e.text.as_deref().unwrap_or("(undecodable)")) }
                                td {
                                    form.action.replay method="post" action="/actions/replay" {
                                        (csrf(viewer))
                                        input type="hidden" name="agent" value=(e.agent);
                                        input type="hidden" name="dead_letter" value=(e.dlq_seq);
                                        button type="submit"
                                            aria-label={ "Replay dead letter " (e.dlq_seq) " of " (e.agent) } { "Replay" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// `/audit`: newest first, filtered by who and command.
pub fn audit(viewer: &Viewer, records: &[AuditRecord], who: &str, command: &str, error: Option<&str>) -> Markup {
    page(
        viewer,
        Page::Audit,
        "Audit trail",
        html! {
            form #audit-filter method="get" action="/audit" {
                label { "Who " input name="who" value=(who) placeholder="web:alice"; }
                label { "Command " input name="command" value=(command) placeholder="kill"; }
                button type="submit" { "Filter" }
            }
            @if let Some(error) = error { p.error { (error) } }
            div.scroll {
                table #audit {
                    thead { tr {
                        th { "When" } th { "Who" } th { "Front end" } th { "Command" } th { "Decision" } th { "Outcome" }
                    } }
                    tbody {
                        @for r in records {
                            tr {
                                td { (crate::killswitch::rfc3339(r.at)) } td { (r.who) } td { (r.platform) }
                                td { (r.line) } td { (r.decision) } td { (r.outcome) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// An action's reply: the title, its sections, and a Confirm button when a code is pending.
pub fn reply_fragment(viewer: &Viewer, reply: &Reply, code: Option<&str>, follow_up: bool) -> Markup {
    let tone = match reply.tone {
        Tone::Info => "info",
        Tone::Ok => "ok",
        Tone::Warn => "warn",
        Tone::Error => "error",
    };
    html! {
        div.reply data-tone=(tone) {
            p.title { (reply.title) }
            @for section in &reply.sections {
                @match section {
                    Section::Text { heading, lines } => {
                        @if let Some(h) = heading { h4 { (h) } }
                        ul { @for l in lines { li { (l) } } }
                    }
                    Section::Table { heading, columns, rows } => {
                        @if let Some(h) = heading { h4 { (h) } }
                        table {
                            thead { tr { @for c in columns { th { (c) } } } }
                            tbody { @for r in rows { tr { @for c in r { td { (c) } } } } }
                        }
                    }
                }
            }
            @if let Some(code) = code {
                div.choices {
                    form.action.confirm method="post" action="/actions/confirm" {
                        (csrf(viewer))
                        input type="hidden" name="code" value=(code);
                        button.danger type="submit" { "Confirm " (code) }
                    }
                    form.action.confirm.cancel method="post" action="/actions/cancel" {
                        (csrf(viewer))
                        input type="hidden" name="code" value=(code);
                        button type="submit" { "Cancel" }
                    }
                }
            }
            @if follow_up { p.hint { "The answer appears here when it comes (keep this page open)." } }
        }
    }
}

/// A refused action, in place.
pub fn reply_fragment_error(message: &str) -> Markup {
    html! { div.reply data-tone="error" { p.title { (message) } } }
}

/// An action's reply as a page (without JavaScript).
pub fn result(viewer: &Viewer, fragment: Markup) -> Markup {
    page(viewer, Page::Result, "Result", html! { div #result { (fragment) } p { a href="/" { "Back to the fleet" } } })
}

/// A refusal as a page (`403`, `400`).
pub fn refusal(message: &str) -> Markup {
    layout(
        "Refused",
        html! { main.narrow { h1 { "Refused" } p.error role="alert" { (message) } a href="/" { "Back" } } },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer(can: Can) -> Viewer {
        Viewer { user: "alice".into(), role: "viewer".into(), csrf: "c".into(), can }
    }

    #[test]
    fn agent_text_is_escaped() {
        let row = TrafficRow {
            id: "1".into(),
            seq: 1,
            from: "<b>x</b>".into(),
            to: "nova".into(),
            kind: "message".into(),
            priority: "normal".into(),
            text: "<script>alert(1)</script>\"'&".into(),
            at: "t".into(),
            outcome: "pending".into(),
            latency_ms: None,
        };
        let html = traffic_row(&row).into_string();
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"), "{html}");
        assert!(!html.contains("<script>") && !html.contains("<b>"), "{html}");
    }

    #[test]
    fn every_dead_letter_has_its_own_replay() {
        let entry = |seq: u64| DeadLetterEntry {
            dlq_seq: seq,
            agent: "kaan".into(),
            reason: "gateway refused (400)".into(),
            status: Some(400),
            attempts: 1,
            at: time::OffsetDateTime::UNIX_EPOCH,
            text: Some(format!("message {seq}")),
            message_id: None,
            payload: bytes::Bytes::new(),
            identity: None,
        };
        let admin = viewer(Can { send: true, kill: true, nuclear: false });
        let html = dead_letters(&admin, &[entry(7), entry(9)], None).into_string();
        assert_eq!(html.matches("action=\"/actions/replay\"").count(), 2, "{html}");
        for seq in [7, 9] {
            assert!(html.contains(&format!("name=\"dead_letter\" value=\"{seq}\"")), "{html}");
            assert!(html.contains(&format!("aria-label=\"Replay dead letter {seq} of kaan\"")), "{html}");
        }
    }

    #[test]
    fn a_viewer_gets_no_action_forms() {
        let none = actions(&viewer(Can::default()), &["nova"]).into_string();
        assert!(!none.contains("<form"), "{none}");
        let ops = actions(&viewer(Can { send: true, ..Can::default() }), &["nova"]).into_string();
        assert!(ops.contains("/actions/send") && !ops.contains("/actions/kill"), "{ops}");
        let director = actions(&viewer(Can { send: true, kill: true, nuclear: true }), &["nova"]).into_string();
        assert!(director.contains("value=\"nuclear\""));
        assert_eq!(director.matches("name=\"csrf\" value=\"c\"").count(), 5, "every form carries the CSRF token");
    }
}

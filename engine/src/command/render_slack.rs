//! Renders a [`Reply`] as a Slack message with Block Kit blocks. Every text is
//! escaped (`&`, `<`, `>`), so nothing a user or an agent wrote can become a
//! mention, a channel ping or a link; Block Kit limits are respected by
//! splitting long sections and truncating with a visible note.

use serde_json::{Value, json};

use super::pack::chars;
use super::reply::{ActionStyle, Reply, Section, Tone};

/// Longest `text` of a section block, in characters.
pub const MAX_SECTION_CHARS: usize = 3000;
/// Most blocks in one message.
pub const MAX_BLOCKS: usize = 50;
/// Longest table cell shown, in characters.
pub const MAX_CELL_CHARS: usize = 80;
/// What marks a cut.
pub const TRUNCATED: &str = "… (truncated)";
/// Most characters of block text in one post of a message split by
/// [`render_posts`]: well inside what `chat.postMessage` accepts (its `text`
/// is cut past 40,000 characters, and large block payloads are refused).
pub const MAX_POST_CHARS: usize = 12_000;
/// Most blocks in one post of a split message (Slack allows 50).
pub const MAX_POST_BLOCKS: usize = 20;

/// The message payload: `response_type`, a fallback `text` and `blocks`.
pub fn render(reply: &Reply) -> Value {
    let emoji = match reply.tone {
        Tone::Info => "",
        Tone::Ok => ":white_check_mark: ",
        Tone::Warn => ":warning: ",
        Tone::Error => ":x: ",
    };
    let title = fit(&escape(&reply.title), MAX_SECTION_CHARS - emoji.len() - 2);
    let mut texts = vec![format!("{emoji}*{title}*")];
    texts.extend(section_texts(reply, false));
    let mut blocks: Vec<Value> = texts.into_iter().map(section).collect();
    let room = if reply.actions.is_empty() { MAX_BLOCKS } else { MAX_BLOCKS - 1 };
    if blocks.len() > room {
        blocks.truncate(room - 1);
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": TRUNCATED}]}));
    }
    blocks.extend(actions_block(reply));
    json!({
        "response_type": if reply.ephemeral { "ephemeral" } else { "in_channel" },
        "text": title,
        "blocks": blocks,
    })
}

/// The reply's buttons as one `actions` block of `button` elements, if it
/// has any. Each button's `action_id` and `value` are the engine's opaque
/// button id; a click comes back as a `block_actions` payload naming it
/// (Slack's Block Kit reference: the actions block holds up to 25 elements;
/// a button's `style` is `primary`, `danger` or absent).
fn actions_block(reply: &Reply) -> Option<Value> {
    if reply.actions.is_empty() {
        return None;
    }
    let elements: Vec<Value> = reply
        .actions
        .iter()
        .take(25)
        .map(|a| {
            let mut button = json!({
                "type": "button",
                "action_id": a.id,
                "value": a.id,
                "text": {"type": "plain_text", "text": a.label.chars().take(75).collect::<String>()},
            });
            match a.style {
                ActionStyle::Primary => button["style"] = json!("primary"),
                ActionStyle::Danger => button["style"] = json!("danger"),
                ActionStyle::Plain => {}
            }
            button
        })
        .collect();
    Some(json!({"type": "actions", "block_id": "mesh_actions", "elements": elements}))
}

/// The body for a `response_url` that replaces the message a button was
/// clicked on (`replace_original`, so the old buttons go with it), or, with
/// `replace` false, posts beside it (an ephemeral refusal, or a notification
/// button's result).
pub fn render_response(reply: &Reply, replace: bool) -> Value {
    let mut body = render(reply);
    body["replace_original"] = json!(replace);
    body
}

/// The section texts of the reply's body; with `split`, a line too long for
/// one section is split over several instead of cut.
fn section_texts(reply: &Reply, split: bool) -> Vec<String> {
    let mut texts = Vec::new();
    for section in &reply.sections {
        match section {
            Section::Text { heading, lines } => {
                let escaped = lines.iter().map(|l| escape(l));
                let lines: Vec<String> = if split {
                    escaped.flat_map(|l| split_line(&l, MAX_SECTION_CHARS / 2)).collect()
                } else {
                    escaped.collect()
                };
                texts.extend(chunks(heading.as_deref(), &lines, "", ""));
            }
            Section::Table { heading, columns, rows } => {
                texts.extend(chunks(heading.as_deref(), &table(columns, rows), "```\n", "\n```"));
            }
        }
    }
    texts
}

/// The reply as one or more messages for `chat.postMessage`, each within
/// [`MAX_POST_BLOCKS`] blocks and [`MAX_POST_CHARS`] characters: nothing is
/// cut but table cells; long lines are split and what does not fit in one
/// post continues in the next, marked "(part 2 of 3)". One message is
/// [`render`]'s payload.
pub fn render_posts(reply: &Reply) -> Vec<Value> {
    let first = render(reply);
    let texts = section_texts(reply, true);
    let fits = texts.len() < MAX_POST_BLOCKS && texts.iter().map(|t| chars(t)).sum::<usize>() <= MAX_POST_CHARS;
    if fits && !first.to_string().contains(TRUNCATED) {
        return vec![first];
    }
    let mut posts: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0;
    for text in texts {
        let current = posts.last().map_or(0, Vec::len);
        if current > 0 && (current + 2 > MAX_POST_BLOCKS || size + chars(&text) > MAX_POST_CHARS) {
            posts.push(Vec::new());
            size = 0;
        }
        size += chars(&text);
        if let Some(post) = posts.last_mut() {
            post.push(text);
        }
    }
    let count = posts.len();
    let title = first["text"].as_str().unwrap_or_default().to_owned();
    let actions = actions_block(reply);
    posts
        .into_iter()
        .enumerate()
        .map(|(i, texts)| {
            let mut blocks = Vec::with_capacity(texts.len() + 1);
            if i == 0 {
                blocks.push(first["blocks"][0].clone());
            } else {
                let part = format!("(part {} of {count})", i + 1);
                blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": part}]}));
            }
            blocks.extend(texts.into_iter().map(section));
            // The buttons go under the last part.
            if i + 1 == count {
                blocks.extend(actions.clone());
            }
            json!({
                "response_type": first["response_type"],
                "text": format!("{title} (part {} of {count})", i + 1),
                "blocks": blocks,
            })
        })
        .collect()
}

/// Splits an escaped line into pieces of at most `max` characters, at a
/// space when one is near the end, never inside an entity (`&amp;`).
fn split_line(line: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while chars(rest) > max {
        let end = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let mut cut = &rest[..end];
        if let Some(amp) = cut.rfind('&')
            && !cut[amp..].contains(';')
            && amp > 0
        {
            cut = &cut[..amp];
        }
        if let Some(space) = cut.rfind(' ')
            && space > cut.len() * 4 / 5
        {
            cut = &cut[..space + 1];
        }
        out.push(cut.to_owned());
        rest = &rest[cut.len()..];
    }
    out.push(rest.to_owned());
    out
}

/// Escapes the three characters Slack treats as markup.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn section(text: String) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})
}

/// Packs escaped lines into section texts of at most [`MAX_SECTION_CHARS`],
/// each wrapped in `open` and `close`, the first under the bold heading.
fn chunks(heading: Option<&str>, lines: &[String], open: &str, close: &str) -> Vec<String> {
    let head = heading.map(|h| format!("*{}*\n", escape(h))).unwrap_or_default();
    super::pack::chunks(fit(&head, MAX_SECTION_CHARS / 2), lines, MAX_SECTION_CHARS, open, close, fit)
}

/// The table as escaped, space-aligned lines for a code block.
fn table(columns: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let cell = |c: &String| -> String {
        // A backtick could close the code block the table sits in: shown as a look-alike (ˋ).
        let flat: String = c
            .chars()
            .map(|ch| match ch {
                '`' => '\u{2cb}',
                ch if ch.is_control() => ' ',
                ch => ch,
            })
            .collect();
        let mut shown: String = flat.chars().take(MAX_CELL_CHARS).collect();
        if chars(&flat) > MAX_CELL_CHARS {
            shown.pop();
            shown.push('…');
        }
        shown
    };
    let all: Vec<Vec<String>> =
        std::iter::once(columns).chain(rows.iter().map(Vec::as_slice)).map(|r| r.iter().map(cell).collect()).collect();
    let count = all.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..count).map(|i| all.iter().filter_map(|r| r.get(i)).map(|c| chars(c)).max().unwrap_or(0)).collect();
    all.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                // Pad by what shows: escaping `<` to `&lt;` does not widen it.
                line.push_str(&escape(c));
                line.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(chars(c))));
            }
            line.trim_end().to_owned()
        })
        .collect()
}

/// Cuts escaped `text` to at most `max` characters, never inside an entity,
/// ending with [`TRUNCATED`] when cut.
fn fit(text: &str, max: usize) -> String {
    if chars(text) <= max {
        return text.to_owned();
    }
    let budget = max.saturating_sub(chars(TRUNCATED) + 1);
    let mut out: String = text.chars().take(budget).collect();
    if let Some(amp) = out.rfind('&')
        && !out[amp..].contains(';')
    {
        out.truncate(amp);
    }
    format!("{out} {TRUNCATED}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_texts(value: &Value) -> Vec<String> {
        value["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["text"]["text"].as_str().or(b["elements"][0]["text"].as_str()).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn snapshot_agent_reply_is_escaped() {
        let reply = Reply::ok("nova replied")
            .with_lines(Some("nova"), ["<!channel> deploy done & <@U123> see <https://evil|here>", "line 2"]);
        assert_eq!(
            render(&reply),
            json!({
                "response_type": "in_channel",
                "text": "nova replied",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": ":white_check_mark: *nova replied*"}},
                    {"type": "section", "text": {"type": "mrkdwn", "text":
                        "*nova*\n&lt;!channel&gt; deploy done &amp; &lt;@U123&gt; see &lt;https://evil|here&gt;\nline 2"}}
                ]
            })
        );
    }

    #[test]
    fn snapshot_buttons() {
        let reply = Reply::warn("confirm <it>")
            .with_action("Confirm", "mesh:confirm:K7P2QX", ActionStyle::Danger)
            .with_action("Cancel", "mesh:cancel:K7P2QX", ActionStyle::Plain);
        assert_eq!(
            render(&reply),
            json!({
                "response_type": "in_channel",
                "text": "confirm &lt;it&gt;",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": ":warning: *confirm &lt;it&gt;*"}},
                    {"type": "actions", "block_id": "mesh_actions", "elements": [
                        {"type": "button", "action_id": "mesh:confirm:K7P2QX", "value": "mesh:confirm:K7P2QX",
                         "text": {"type": "plain_text", "text": "Confirm"}, "style": "danger"},
                        {"type": "button", "action_id": "mesh:cancel:K7P2QX", "value": "mesh:cancel:K7P2QX",
                         "text": {"type": "plain_text", "text": "Cancel"}},
                    ]},
                ]
            })
        );
        assert_eq!(render_response(&Reply::info("done"), true)["replace_original"], true);
        assert_eq!(render_posts(&reply), vec![render(&reply)]);
        // A long reply: the buttons under the last part only.
        let lines: Vec<String> = (0..250).map(|i| format!("line {i:05} {}", "x".repeat(100))).collect();
        let long =
            Reply::info("long").with_lines(None, lines).with_action("Replay", "mesh:replay:nova", ActionStyle::Primary);
        let posts = render_posts(&long);
        let with_actions: Vec<usize> = (0..posts.len())
            .filter(|i| posts[*i]["blocks"].as_array().unwrap().iter().any(|b| b["type"] == "actions"))
            .collect();
        assert_eq!(with_actions, vec![posts.len() - 1]);
        let mut many = Reply::info("many");
        for i in 0..80 {
            many = many.with_lines(None, [format!("section {i}")]);
        }
        let many = render(&many.with_action("Ping", "mesh:ping", ActionStyle::Plain));
        let blocks = many["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), MAX_BLOCKS);
        assert_eq!(blocks[MAX_BLOCKS - 1]["type"], "actions", "the buttons survive a cut");
    }

    #[test]
    fn backticks_in_cells_cannot_close_the_code_block() {
        let reply = Reply::info("agents").with_table(
            None,
            ["agent", "note"],
            vec![vec!["nova".into(), "```*bold* <!here>".into()]],
        );
        let texts = block_texts(&render(&reply));
        let table = &texts[1];
        assert!(table.starts_with("```\n") && table.ends_with("\n```"), "{table}");
        assert_eq!(table.matches('`').count(), 6, "only the block's own fences: {table}");
        assert!(table.contains("\u{2cb}\u{2cb}\u{2cb}*bold* &lt;!here&gt;"), "{table}");
    }

    #[test]
    fn long_answers_are_split_over_posts_within_the_limits() {
        let mut lines: Vec<String> = (0..250).map(|i| format!("line {i:05} {}", "x".repeat(100))).collect();
        lines.push(format!("{} & end", "y".repeat(5000)));
        let reply = Reply::info("ada replied").with_lines(None, lines);
        let posts = render_posts(&reply);
        assert!(posts.len() >= 3, "{} posts", posts.len());
        let mut all = String::new();
        for (i, post) in posts.iter().enumerate() {
            let texts = block_texts(post);
            assert!(texts.len() <= MAX_POST_BLOCKS, "post {i}: {} blocks", texts.len());
            assert!(texts.iter().all(|t| chars(t) <= MAX_SECTION_CHARS));
            assert!(texts.iter().map(|t| chars(t)).sum::<usize>() <= MAX_POST_CHARS + 100, "post {i}");
            assert!(!post.to_string().contains(TRUNCATED), "post {i} was cut");
            all.push_str(&texts.join("\n"));
        }
        for i in 0..250 {
            assert_eq!(all.matches(&format!("line {i:05} ")).count(), 1, "line {i}");
        }
        assert_eq!(all.matches('y').count(), 5000);
        assert!(all.contains("&amp; end"), "entities are never split");
        assert_eq!(posts[1]["text"], format!("ada replied (part 2 of {})", posts.len()));
        let short = Reply::info("ok").with_lines(None, ["short"]);
        assert_eq!(render_posts(&short), vec![render(&short)]);
    }

    #[test]
    fn snapshot_table() {
        let reply = Reply::info("agents").with_table(
            None,
            ["agent", "status", "last seen"],
            vec![
                vec!["nova".into(), "active".into(), "2s ago".into()],
                vec!["kaan".into(), "paused <soft>".into(), "".into()],
            ],
        );
        assert_eq!(
            render(&reply),
            json!({
                "response_type": "in_channel",
                "text": "agents",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": "*agents*"}},
                    {"type": "section", "text": {"type": "mrkdwn", "text":
                        "```\nagent  status         last seen\nnova   active         2s ago\nkaan   paused &lt;soft&gt;\n```"}}
                ]
            })
        );
    }

    #[test]
    fn snapshot_ephemeral_error() {
        let reply =
            Reply::error("unknown command \"sned\"; did you mean \"send\"? usage: send <agent> <text>").ephemeral();
        assert_eq!(
            render(&reply),
            json!({
                "response_type": "ephemeral",
                "text": "unknown command \"sned\"; did you mean \"send\"? usage: send &lt;agent&gt; &lt;text&gt;",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text":
                        ":x: *unknown command \"sned\"; did you mean \"send\"? usage: send &lt;agent&gt; &lt;text&gt;*"}}
                ]
            })
        );
    }

    #[test]
    fn long_sections_split_within_limits() {
        let lines: Vec<String> = (0..400).map(|i| format!("line {i} & more <text>")).collect();
        let out = render(&Reply::info("log").with_lines(Some("entries"), lines.clone()));
        let texts = block_texts(&out);
        assert!(texts.len() > 3, "{}", texts.len());
        assert!(texts.iter().all(|t| chars(t) <= MAX_SECTION_CHARS));
        assert!(texts[1].starts_with("*entries*\nline 0 &amp; more &lt;text&gt;\n"));
        // Nothing lost, nothing cut: every line is in exactly one block.
        let joined: Vec<&str> = texts[1..].iter().flat_map(|t| t.lines()).filter(|l| l.starts_with("line")).collect();
        assert_eq!(joined.len(), 400);

        let rows: Vec<Vec<String>> = (0..300).map(|i| vec![format!("agent-{i}"), "x".repeat(60)]).collect();
        let out = render(&Reply::info("big").with_table(None, ["agent", "note"], rows));
        for t in block_texts(&out).iter().skip(1) {
            assert!(chars(t) <= MAX_SECTION_CHARS);
            assert!(t.starts_with("```\n") && t.ends_with("\n```"), "{t}");
        }
    }

    #[test]
    fn huge_replies_are_truncated_cleanly() {
        let mut reply = Reply::info("many");
        for i in 0..80 {
            reply = reply.with_lines(None, [format!("section {i}")]);
        }
        let out = render(&reply);
        let texts = block_texts(&out);
        assert_eq!(texts.len(), MAX_BLOCKS);
        assert_eq!(texts[MAX_BLOCKS - 1], TRUNCATED);
        assert_eq!(out["blocks"][MAX_BLOCKS - 1]["type"], "context");

        let line = "<".repeat(5000);
        let out = render(&Reply::info("one long line").with_lines(None, [line]));
        let body = &block_texts(&out)[1];
        assert!(chars(body) <= MAX_SECTION_CHARS, "{}", chars(body));
        assert!(body.ends_with("&lt; … (truncated)"), "cut inside an entity: {}", &body[body.len() - 30..]);

        let title = render(&Reply::error("&".repeat(4000)));
        let t = title["text"].as_str().unwrap();
        assert!(chars(t) <= MAX_SECTION_CHARS && t.ends_with("&amp; … (truncated)"));
    }

    #[test]
    fn long_cells_are_shortened() {
        let out = render(&Reply::info("t").with_table(None, ["a"], vec![vec!["y".repeat(200)]]));
        let body = &block_texts(&out)[1];
        assert!(body.contains(&format!("{}…", "y".repeat(MAX_CELL_CHARS - 1))), "{body}");
    }
}

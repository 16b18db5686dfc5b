//! Renders a [`Reply`] as a Discord message body: embeds, with
//! `allowed_mentions` empty so nothing a user or an agent wrote can ping
//! `@everyone`, a role or a user. Markdown in such text is escaped, and
//! Discord's limits (title 256, description 4096, 6000 characters and 10
//! embeds per message) are kept by splitting sections and truncating with a
//! visible note.

use serde_json::{Value, json};

use super::pack::chars;
use super::reply::{ActionStyle, Reply, Section, Tone};

/// Longest embed title, in characters.
pub const MAX_TITLE_CHARS: usize = 256;
/// Longest embed description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4096;
/// Most characters of all embeds of one message together.
pub const MAX_MESSAGE_CHARS: usize = 6000;
/// Most embeds in one message.
pub const MAX_EMBEDS: usize = 10;
/// Longest table cell shown, in characters.
pub const MAX_CELL_CHARS: usize = 80;
/// What marks a cut.
pub const TRUNCATED: &str = "… (truncated)";
/// The message flag that shows an interaction answer only to its user.
pub const EPHEMERAL_FLAG: u64 = 1 << 6;

/// The embed colour of a tone.
pub fn colour(tone: Tone) -> u32 {
    match tone {
        Tone::Info => 0x5865F2,
        Tone::Ok => 0x2ECC71,
        Tone::Warn => 0xF1C40F,
        Tone::Error => 0xE74C3C,
    }
}

/// A message body for a channel post or a webhook edit: `embeds` and empty
/// `allowed_mentions` (and no `content`, so nothing in it can mention anyone).
pub fn render(reply: &Reply) -> Value {
    let (title, descriptions) = parts(reply, false);
    let mut body = json!({
        "embeds": embeds(reply.tone, title, descriptions),
        "allowed_mentions": {"parse": []},
    });
    if !reply.actions.is_empty() {
        body["components"] = components(reply);
    }
    body
}

/// The body that replaces the message a button was clicked on (an
/// interaction answer of type 7, or an edit of `@original` after a type 6):
/// `components` is always present, empty when the reply has no buttons,
/// since an edit that leaves it out keeps the old buttons.
pub fn render_update(reply: &Reply) -> Value {
    let mut body = render(reply);
    body["components"] = components(reply);
    body
}

/// Most buttons in one action row, and rows in one message (Discord's limits).
const BUTTONS_PER_ROW: usize = 5;
const MAX_ROWS: usize = 5;

/// The reply's buttons as action rows (component type 1) of buttons
/// (type 2) whose `custom_id` is the engine's opaque button id (at most 100
/// characters); a click arrives as an interaction of type 3 carrying it
/// (Discord's message components reference). Styles: 1 primary, 2
/// secondary, 4 danger.
fn components(reply: &Reply) -> Value {
    let rows: Vec<Value> = reply
        .actions
        .chunks(BUTTONS_PER_ROW)
        .take(MAX_ROWS)
        .map(|row| {
            let buttons: Vec<Value> = row
                .iter()
                .map(|a| {
                    let style = match a.style {
                        ActionStyle::Primary => 1,
                        ActionStyle::Plain => 2,
                        ActionStyle::Danger => 4,
                    };
                    json!({"type": 2, "style": style, "label": a.label.chars().take(80).collect::<String>(),
                           "custom_id": a.id.chars().take(100).collect::<String>()})
                })
                .collect();
            json!({"type": 1, "components": buttons})
        })
        .collect();
    Value::Array(rows)
}

/// The title and the description parts of a reply; with `split`, a line too
/// long for one part is split over several instead of cut.
fn parts(reply: &Reply, split: bool) -> (String, Vec<String>) {
    let title_text = escape(&reply.title);
    let mut descriptions = Vec::new();
    let title = if chars(&title_text) > MAX_TITLE_CHARS {
        // A long title (an error with its usage, say) is shown whole in the body.
        descriptions.push(format!("**{}**", fit(&title_text, DESCRIPTION_ROOM - 4)));
        fit(&title_text, MAX_TITLE_CHARS)
    } else {
        title_text
    };
    for section in &reply.sections {
        match section {
            Section::Text { heading, lines } => {
                let escaped = lines.iter().map(|l| escape(l));
                let lines: Vec<String> = if split {
                    escaped.flat_map(|l| split_line(&l, MAX_LINE_PIECE)).collect()
                } else {
                    escaped.collect()
                };
                descriptions.extend(chunks(heading.as_deref(), &lines, "", ""));
            }
            Section::Table { heading, columns, rows } => {
                descriptions.extend(chunks(heading.as_deref(), &table(columns, rows), "```\n", "\n```"));
            }
        }
    }
    (title, descriptions)
}

/// Longest piece of a split line, in characters.
const MAX_LINE_PIECE: usize = 2000;
/// Most description characters packed into one message of a split reply
/// (under [`MAX_MESSAGE_CHARS`] with the title and the part note).
const MESSAGE_ROOM: usize = MAX_MESSAGE_CHARS - MAX_TITLE_CHARS - 2 * NOTE_ROOM;

/// The reply as one or more messages: what [`render`] would cut continues
/// in the next message (titled "(part 2 of 3)"), so a long answer arrives
/// whole. One message is [`render`]'s body.
pub fn render_messages(reply: &Reply) -> Vec<Value> {
    let whole = render(reply);
    if !whole.to_string().contains(TRUNCATED) {
        return vec![whole];
    }
    let (title, descriptions) = parts(reply, true);
    let mut groups: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0;
    for part in descriptions {
        let current = groups.last().map_or(0, Vec::len);
        if current > 0 && (current == MAX_EMBEDS || size + 2 + chars(&part) > MESSAGE_ROOM) {
            groups.push(Vec::new());
            size = 0;
        }
        size += 2 + chars(&part);
        if let Some(group) = groups.last_mut() {
            group.push(part);
        }
    }
    let count = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, group)| {
            let note = format!(" (part {} of {count})", i + 1);
            let title = format!("{}{note}", fit(&title, MAX_TITLE_CHARS - chars(&note)));
            let mut body = json!({"embeds": embeds(reply.tone, title, group), "allowed_mentions": {"parse": []}});
            // The buttons go under the last part.
            if i + 1 == count && !reply.actions.is_empty() {
                body["components"] = components(reply);
            }
            body
        })
        .collect()
}

/// Splits an escaped line into pieces of at most `max` characters, at a
/// space when one is near the end, never right after an escaping backslash.
fn split_line(line: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while chars(rest) > max {
        let end = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let mut cut = &rest[..end];
        if let Some(space) = cut.rfind(' ')
            && space > cut.len() * 4 / 5
        {
            cut = &cut[..space + 1];
        }
        while cut.len() > 1 && cut.ends_with('\\') {
            cut = &cut[..cut.len() - 1];
        }
        out.push(cut.to_owned());
        rest = &rest[cut.len()..];
    }
    out.push(rest.to_owned());
    out
}

/// The `data` of an interaction answer: the message body, with the ephemeral
/// flag when only the person who ran the command should see it.
pub fn interaction_data(reply: &Reply) -> Value {
    let mut body = render(reply);
    if reply.ephemeral {
        body["flags"] = json!(EPHEMERAL_FLAG);
    }
    body
}

/// Room kept at the end of a message for the cut note (`\n` + [`TRUNCATED`]), in characters.
const NOTE_ROOM: usize = 14;
/// Longest description part, leaving room for the cut note.
const DESCRIPTION_ROOM: usize = MAX_DESCRIPTION_CHARS - NOTE_ROOM;

/// Packs the description parts into embeds: each description up to
/// [`MAX_DESCRIPTION_CHARS`], at most [`MAX_EMBEDS`] embeds and
/// [`MAX_MESSAGE_CHARS`] in all. What does not fit is cut at a line boundary
/// (a code block it opened closed again) and marked with [`TRUNCATED`].
fn embeds(tone: Tone, title: String, parts: Vec<String>) -> Vec<Value> {
    let colour = colour(tone);
    let mut budget = MAX_MESSAGE_CHARS - chars(&title) - NOTE_ROOM;
    let mut descriptions: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut cut = false;
    for part in parts {
        if !current.is_empty() && chars(&current) + 2 + chars(&part) > DESCRIPTION_ROOM {
            descriptions.push(std::mem::take(&mut current));
        }
        if current.is_empty() && descriptions.len() == MAX_EMBEDS {
            cut = true;
            break;
        }
        let sep = if current.is_empty() { 0 } else { 2 };
        let fits = sep + chars(&part) <= budget;
        let part = if fits { part } else { whole_lines(&part, budget.saturating_sub(sep)) };
        if !part.is_empty() {
            if sep > 0 {
                current.push_str("\n\n");
            }
            current.push_str(&part);
            budget -= sep + chars(&part);
        }
        if !fits {
            cut = true;
            break;
        }
    }
    if !current.is_empty() {
        descriptions.push(current);
    }
    if cut {
        match descriptions.last_mut() {
            Some(last) => {
                last.push('\n');
                last.push_str(TRUNCATED);
            }
            None => descriptions.push(TRUNCATED.to_owned()),
        }
    }
    let mut out = Vec::new();
    for (i, description) in descriptions.into_iter().enumerate() {
        let mut embed = json!({"description": description, "color": colour});
        if i == 0 {
            embed["title"] = json!(title);
        }
        out.push(embed);
    }
    if out.is_empty() {
        out.push(json!({"title": title, "color": colour}));
    }
    out
}

/// The longest run of whole lines from the start of `part` within `max`
/// characters; a code block it opened is closed again.
fn whole_lines(part: &str, max: usize) -> String {
    const FENCE: &str = "\n```";
    let mut out = String::new();
    for line in part.split('\n') {
        let add = chars(line) + usize::from(!out.is_empty());
        if chars(&out) + add + FENCE.len() > max {
            break;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    if out.matches("```").count() % 2 == 1 {
        out.push_str(FENCE);
    }
    out
}

/// Escapes Discord markdown, so text from users or agents shows as typed.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut line_start = true;
    for c in text.chars() {
        if matches!(c, '\\' | '*' | '_' | '~' | '`' | '|' | '>' | '#' | '[' | ']' | '<') || (line_start && c == '-') {
            out.push('\\');
        }
        out.push(c);
        line_start = c == '\n';
    }
    out
}

/// Packs escaped lines into descriptions of at most [`DESCRIPTION_ROOM`] characters,
/// each wrapped in `open` and `close`, the first under the bold heading.
fn chunks(heading: Option<&str>, lines: &[String], open: &str, close: &str) -> Vec<String> {
    let head = heading.map(|h| format!("**{}**\n", escape(h))).unwrap_or_default();
    super::pack::chunks(fit(&head, MAX_TITLE_CHARS), lines, DESCRIPTION_ROOM, open, close, fit)
}

/// The table as space-aligned lines for a code block. Markdown is inert in a
/// code block, but a backtick could close it, so backticks become `ˋ`.
fn table(columns: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let cell = |c: &String| -> String {
        let flat: String = c
            .chars()
            .map(|ch| match ch {
                '`' => 'ˋ',
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
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(chars(c))));
            }
            line.trim_end().to_owned()
        })
        .collect()
}

/// Cuts escaped `text` to at most `max` characters, never after a lone
/// escaping backslash, ending with [`TRUNCATED`] when cut.
fn fit(text: &str, max: usize) -> String {
    if chars(text) <= max {
        return text.to_owned();
    }
    let budget = max.saturating_sub(chars(TRUNCATED) + 1);
    let mut out: String = text.chars().take(budget).collect();
    let trailing = out.chars().rev().take_while(|c| *c == '\\').count();
    if trailing % 2 == 1 {
        out.pop();
    }
    format!("{out} {TRUNCATED}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_chars(body: &Value) -> usize {
        body["embeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["title"].as_str().map_or(0, chars) + e["description"].as_str().map_or(0, chars))
            .sum()
    }

    #[test]
    fn snapshot_agent_reply_cannot_ping_or_format() {
        let reply = Reply::ok("nova replied")
            .with_lines(Some("nova"), ["@everyone deploy *done* <@&123> see [x](https://evil)", "line 2"]);
        assert_eq!(
            render(&reply),
            json!({
                "embeds": [{
                    "title": "nova replied",
                    "description": "**nova**\n@everyone deploy \\*done\\* \\<@&123\\> see \\[x\\](https://evil)\nline 2",
                    "color": 0x2ECC71,
                }],
                "allowed_mentions": {"parse": []},
            })
        );
    }

    #[test]
    fn snapshot_buttons_and_updates() {
        let reply = Reply::warn("confirm @everyone")
            .with_action("Confirm", "mesh:confirm:K7P2QX", ActionStyle::Danger)
            .with_action("Cancel", "mesh:cancel:K7P2QX", ActionStyle::Plain);
        assert_eq!(
            render(&reply),
            json!({
                "embeds": [{"title": "confirm @everyone", "color": 0xF1C40F}],
                "allowed_mentions": {"parse": []},
                "components": [{"type": 1, "components": [
                    {"type": 2, "style": 4, "label": "Confirm", "custom_id": "mesh:confirm:K7P2QX"},
                    {"type": 2, "style": 2, "label": "Cancel", "custom_id": "mesh:cancel:K7P2QX"},
                ]}],
            })
        );
        let done = render_update(&Reply::ok("confirmed"));
        assert_eq!(done["components"], json!([]), "an update always removes the old buttons");
        assert_eq!(done["allowed_mentions"], json!({"parse": []}));
        assert!(render(&Reply::ok("plain")).get("components").is_none());
        let mut many = Reply::info("many");
        for i in 0..12 {
            many = many.with_action(format!("b{i}"), format!("mesh:ping{i}"), ActionStyle::Primary);
        }
        let rows = render(&many)["components"].as_array().unwrap().clone();
        assert_eq!(rows.iter().map(|r| r["components"].as_array().unwrap().len()).collect::<Vec<_>>(), [5, 5, 2]);
    }

    #[test]
    fn snapshot_table_and_ephemeral_error() {
        let reply = Reply::info("agents").with_table(
            None,
            ["agent", "status"],
            vec![vec!["nova".into(), "active".into()], vec!["ka`an".into(), "paused <soft>".into()]],
        );
        assert_eq!(
            render(&reply),
            json!({
                "embeds": [{
                    "title": "agents",
                    "description": "```\nagent  status\nnova   active\nkaˋan  paused <soft>\n```",
                    "color": 0x5865F2,
                }],
                "allowed_mentions": {"parse": []},
            })
        );
        let error = Reply::error("unknown agent \"nvoa\" (known: nova)").ephemeral();
        assert_eq!(
            interaction_data(&error),
            json!({
                "embeds": [{"title": "unknown agent \"nvoa\" (known: nova)", "color": 0xE74C3C}],
                "allowed_mentions": {"parse": []},
                "flags": 64,
            })
        );
        assert!(render(&error).get("flags").is_none(), "channel posts never carry the ephemeral flag");
    }

    #[test]
    fn long_output_splits_into_embeds_within_limits() {
        let lines: Vec<String> = (0..250).map(|i| format!("line {i} of the log")).collect();
        let body = render(&Reply::info("log").with_lines(Some("entries"), lines));
        let embeds = body["embeds"].as_array().unwrap();
        assert!(embeds.len() >= 2, "{}", embeds.len());
        assert!(embeds.len() <= MAX_EMBEDS);
        assert!(embeds.iter().all(|e| chars(e["description"].as_str().unwrap()) <= MAX_DESCRIPTION_CHARS));
        assert!(total_chars(&body) <= MAX_MESSAGE_CHARS, "{}", total_chars(&body));
        let text: String = embeds.iter().map(|e| e["description"].as_str().unwrap()).collect::<Vec<_>>().join("\n");
        assert_eq!(text.lines().filter(|l| l.starts_with("line ")).count(), 250, "nothing lost when it fits");
        assert!(!text.contains(TRUNCATED));
    }

    #[test]
    fn long_output_continues_in_more_messages() {
        let mut lines: Vec<String> = (0..300).map(|i| format!("line {i:05} {}", "x".repeat(100))).collect();
        lines.push(format!("{} *end*", "y".repeat(5000)));
        let reply = Reply::info("ada replied").with_lines(None, lines);
        let messages = render_messages(&reply);
        assert!(messages.len() >= 6, "{} messages", messages.len());
        let mut all = String::new();
        for (i, message) in messages.iter().enumerate() {
            let embeds = message["embeds"].as_array().unwrap();
            assert!(embeds.len() <= MAX_EMBEDS);
            let size: usize = embeds
                .iter()
                .map(|e| chars(e["title"].as_str().unwrap_or("")) + chars(e["description"].as_str().unwrap_or("")))
                .sum();
            assert!(size <= MAX_MESSAGE_CHARS, "message {i}: {size} characters");
            assert!(embeds.iter().all(|e| chars(e["description"].as_str().unwrap_or("")) <= MAX_DESCRIPTION_CHARS));
            assert!(!message.to_string().contains(TRUNCATED), "message {i} was cut");
            assert_eq!(message["allowed_mentions"], json!({"parse": []}));
            all.push_str(&message.to_string());
        }
        for i in 0..300 {
            assert_eq!(all.matches(&format!("line {i:05} ")).count(), 1, "line {i}");
        }
        assert_eq!(all.matches('y').count(), 5000, "the long line whole");
        assert!(all.contains(r"\\*end\\*"), "escapes are never split");
        assert_eq!(messages[1]["embeds"][0]["title"], format!("ada replied (part 2 of {})", messages.len()));
        let short = Reply::info("ok").with_lines(None, ["short"]);
        assert_eq!(render_messages(&short), vec![render(&short)]);
    }

    #[test]
    fn huge_output_is_truncated_cleanly() {
        let rows: Vec<Vec<String>> = (0..500).map(|i| vec![format!("agent-{i}"), "x".repeat(40)]).collect();
        let body = render(&Reply::info("big").with_table(Some("fleet"), ["agent", "note"], rows));
        assert!(total_chars(&body) <= MAX_MESSAGE_CHARS, "{}", total_chars(&body));
        assert!(total_chars(&body) > MAX_MESSAGE_CHARS - 100, "cut late, at a row: {}", total_chars(&body));
        assert_eq!(NOTE_ROOM, 1 + chars(TRUNCATED));
        let embeds = body["embeds"].as_array().unwrap();
        let last = embeds.last().unwrap()["description"].as_str().unwrap();
        assert!(last.ends_with(TRUNCATED), "{last}");
        for embed in embeds {
            let d = embed["description"].as_str().unwrap();
            assert!(chars(d) <= MAX_DESCRIPTION_CHARS);
            assert_eq!(d.matches("```").count() % 2, 0, "a code block left open: {d}");
        }

        let long_line = "*".repeat(5000);
        let body = render(&Reply::info("one line").with_lines(None, [long_line]));
        let d = body["embeds"][0]["description"].as_str().unwrap();
        assert!(chars(d) <= MAX_DESCRIPTION_CHARS);
        assert!(d.ends_with(&format!("\\* {TRUNCATED}")), "cut inside an escape: {}", &d[d.len() - 30..]);

        let title = "e".repeat(300);
        let body = render(&Reply::error(title.clone()));
        assert_eq!(chars(body["embeds"][0]["title"].as_str().unwrap()), MAX_TITLE_CHARS);
        assert_eq!(body["embeds"][0]["description"], format!("**{title}**"), "the whole title is kept in the body");
    }
}

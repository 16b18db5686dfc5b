//! Renders a [`Reply`] as plain terminal text. Control characters and bidi
//! overrides in text from users or agents are shown escaped, so an agent's
//! reply cannot move the cursor, recolour the terminal or reorder a line.

use super::reply::{Reply, Section, Tone};

/// The reply as lines of terminal text, ending with a newline.
pub fn render(reply: &Reply) -> String {
    let prefix = match reply.tone {
        Tone::Info | Tone::Ok => "",
        Tone::Warn => "warning: ",
        Tone::Error => "error: ",
    };
    let mut out = format!("{prefix}{}\n", clean(&reply.title, true));
    for section in &reply.sections {
        out.push('\n');
        match section {
            Section::Text { heading, lines } => {
                let indent = if heading.is_some() { "  " } else { "" };
                if let Some(h) = heading {
                    out.push_str(&format!("{}\n", clean(h, false)));
                }
                for line in lines {
                    for part in clean(line, true).split('\n') {
                        out.push_str(&format!("{indent}{part}\n"));
                    }
                }
            }
            Section::Table { heading, columns, rows } => {
                if let Some(h) = heading {
                    out.push_str(&format!("{}\n", clean(h, false)));
                }
                out.push_str(&table(columns, rows));
            }
        }
    }
    out
}

/// Columns padded to the widest cell, two spaces apart, no trailing spaces.
fn table(columns: &[String], rows: &[Vec<String>]) -> String {
    let all: Vec<Vec<String>> = std::iter::once(columns)
        .chain(rows.iter().map(Vec::as_slice))
        .map(|r| r.iter().map(|c| clean(c, false)).collect())
        .collect();
    let count = all.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..count).map(|i| all.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', widths[i].saturating_sub(cell.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Escapes what a terminal would act on instead of show. `keep_newlines`
/// keeps `\n` (and tabs) for free text; table cells escape them too.
fn clean(text: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' if keep_newlines => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || matches!(c as u32, 0x202A..=0x202E | 0x2066..=0x2069) => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(reply: Reply, want: &str) {
        assert_eq!(render(&reply), want);
    }

    #[test]
    fn renders_titles_sections_and_tables() {
        check(Reply::ok("sent to nova"), "sent to nova\n");
        check(Reply::error("unknown agent \"nvoa\""), "error: unknown agent \"nvoa\"\n");
        check(Reply::warn("12/14 delivered"), "warning: 12/14 delivered\n");
        check(
            Reply::info("agents")
                .with_table(
                    Some("registry"),
                    ["agent", "status", "mode"],
                    vec![
                        vec!["nova".into(), "active".into(), "wake".into()],
                        vec!["kaan-long-name".into(), "inactive".into(), "".into()],
                    ],
                )
                .with_lines(None, ["2 agents"])
                .with_lines(Some("hints"), ["try ping", "multi\nline"]),
            "agents\n\
             \n\
             registry\n\
             agent           status    mode\n\
             nova            active    wake\n\
             kaan-long-name  inactive\n\
             \n\
             2 agents\n\
             \n\
             hints\n  try ping\n  multi\n  line\n",
        );
    }

    #[test]
    fn terminal_controls_are_shown_not_obeyed() {
        check(
            Reply::info("reply").with_lines(None, ["\u{1b}[2Jcleared \u{202e}evil\ttab"]),
            "reply\n\n\\u{001b}[2Jcleared \\u{202e}evil\ttab\n",
        );
        check(Reply::info("t").with_table(None, ["a"], vec![vec!["x\ny\u{7}".into()]]), "t\n\na\nx\\ny\\u{0007}\n");
        check(Reply::info("שלום <!channel> & é"), "שלום <!channel> & é\n");
    }
}

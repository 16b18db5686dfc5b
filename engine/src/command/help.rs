//! The help reply, generated from the command table so it cannot drift from
//! what the parser accepts and the permission check enforces.

use super::confirm::CONFIRM_WINDOW;
use super::reply::Reply;
use super::table::{self, COMMANDS, CommandSpec};

/// `help` (every command) or `help <topic>` (one command, or a family such as
/// `kill`). The topic is a name from the table, as [`super::Command::Help`] carries it.
pub fn help(topic: Option<&str>) -> Reply {
    match topic {
        None => overview(),
        Some(topic) => details(topic),
    }
}

fn overview() -> Reply {
    let rows = COMMANDS
        .iter()
        .map(|s| {
            let summary = if s.confirm { format!("{} (asks for a code)", s.summary) } else { s.summary.to_owned() };
            vec![s.usage.to_owned(), s.access.to_string(), s.front.as_str().to_owned(), summary]
        })
        .collect();
    Reply::info("mesh commands")
        .with_table(None, ["command", "who", "where", "what"], rows)
        .with_lines(
            None,
            [
                "type \"help <command>\" for the rules of one command, such as \"help kill soft\"",
                "an agent may be written bare (nova) or as agent=<id> (agent=nova)",
                "terminal commands run as `mesh <command>` on the host, with the terminal's role",
            ],
        )
        .ephemeral()
}

fn details(topic: &str) -> Reply {
    let mut reply = Reply::info(format!("help: {topic}")).ephemeral();
    for spec in table::family(topic) {
        reply = reply.with_lines(Some(spec.usage), lines(spec));
    }
    reply
}

fn lines(spec: &CommandSpec) -> Vec<String> {
    let mut lines = vec![spec.summary.to_owned()];
    lines.extend(spec.notes.iter().map(|n| (*n).to_owned()));
    lines.push(format!("who: {}", spec.access));
    if spec.front == table::Front::Terminal {
        lines.push(format!("terminal only: mesh {}", spec.usage));
    }
    if spec.confirm {
        lines.push(format!(
            "asks for a one-time code first: type \"confirm <code>\" within {}s",
            CONFIRM_WINDOW.whole_seconds()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::grammar::{self, DEFAULT_AUDIT, DEFAULT_REPLAY, MAX_AUDIT, MAX_REPLAY, format_duration};
    use crate::command::render_text::render;

    #[track_caller]
    fn check(topic: Option<&str>, want: &str) {
        assert_eq!(render(&help(topic)), want);
    }

    #[test]
    fn help_for_one_command_and_a_family() {
        check(
            Some("send"),
            "help: send\n\
             \n\
             send <agent> <text>\n  \
               send a message to one agent\n  \
               the text is sent exactly as typed: quotes, mentions, emoji and spacing included\n  \
               --ttl 5m (before the agent and text, 1s to 24h): not delivered by then, the message becomes a dead letter with reason expired\n  \
               who: operator\n",
        );
        check(
            Some("kill nuclear"),
            "help: kill nuclear\n\
             \n\
             kill nuclear [--purge]\n  \
               tear the whole mesh down: containers (with --purge also volumes and networks)\n  \
               with the two-person rule on, a different director must confirm\n  \
               who: director\n  \
               asks for a one-time code first: type \"confirm <code>\" within 60s\n",
        );
        let kill = render(&help(Some("kill")));
        for usage in ["kill soft [duration]", "kill hard [agent]", "kill nuclear"] {
            assert!(kill.contains(usage), "{kill}");
        }
        assert!(render(&help(Some("resume"))).contains("who: admin; director while a hard kill is in force"));
    }

    #[test]
    fn overview_lists_every_command_from_the_table() {
        let reply = help(None);
        assert!(reply.ephemeral);
        let text = render(&reply);
        for spec in COMMANDS.iter() {
            let row =
                text.lines().find(|l| l.starts_with(spec.usage)).unwrap_or_else(|| panic!("no row for {}", spec.name));
            assert!(row.contains(&format!("  {}  ", spec.access)), "{row}");
            assert!(row.contains(spec.summary), "{row}");
            assert_eq!(row.contains("(asks for a code)"), spec.confirm, "{row}");
            assert!(row.contains(&format!("  {}  ", spec.front.as_str())), "{row}");
        }
        // Every topic `help <topic>` accepts has something to show.
        for spec in COMMANDS.iter() {
            let topic = grammar::parse(&format!("help {}", spec.name)).unwrap();
            assert!(matches!(topic, grammar::Command::Help { topic: Some(t) } if !help(Some(t)).sections.is_empty()));
        }
    }

    #[test]
    fn numbers_in_the_table_match_the_constants() {
        let text = render(&help(None)) + &render(&help(Some("kill soft")));
        assert!(text.contains(&format!("default {}, at most 24h", format_duration(grammar::DEFAULT_SOFT_KILL))));
        assert!(text.contains(&format!("default {DEFAULT_REPLAY}, at most {MAX_REPLAY}")));
        assert!(text.contains(&format!("default {DEFAULT_AUDIT}, at most {MAX_AUDIT}")));
        assert_eq!(format_duration(grammar::MAX_SOFT_KILL), "24h");
    }
}

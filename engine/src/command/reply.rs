//! The platform-neutral reply the command core returns: a title, a tone, and
//! sections of text lines or table rows. Each platform renders it its own way
//! (`render_text`, `render_slack`); all text in it is plain, never markup.

/// How a reply should look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tone {
    /// Neutral information (help, status).
    #[default]
    Info,
    /// The action was done.
    Ok,
    /// Done, or readable, but something needs attention.
    Warn,
    /// Nothing was done.
    Error,
}

/// A block of a reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Section {
    /// Lines of plain text under an optional heading.
    Text {
        /// The heading, if any.
        heading: Option<String>,
        /// The lines, plain text.
        lines: Vec<String>,
    },
    /// A table under an optional heading.
    Table {
        /// The heading, if any.
        heading: Option<String>,
        /// Column names.
        columns: Vec<String>,
        /// Rows of cells, one cell per column.
        rows: Vec<Vec<String>>,
    },
}

/// How a button looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionStyle {
    /// The platform's plain button.
    #[default]
    Plain,
    /// The button that goes ahead (green on Discord, `primary` on Slack).
    Primary,
    /// The dangerous or cancelling button (red).
    Danger,
}

/// A button under a reply: what it shows and the opaque id a click brings
/// back ([`super::button::ButtonId`]), never a command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Action {
    /// The button's label, plain text.
    pub label: String,
    /// What a click sends back (at most 100 characters: Discord's `custom_id` limit).
    pub id: String,
    /// How it looks.
    pub style: ActionStyle,
}

/// What a command answers.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Reply {
    /// One line saying what happened.
    pub title: String,
    /// How it should look.
    pub tone: Tone,
    /// The body.
    pub sections: Vec<Section>,
    /// True when only the person who ran the command should see it.
    pub ephemeral: bool,
    /// The command's result as data, for `--json` (documented per command in
    /// README); renderers show only the title and sections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Buttons under the reply (a confirmation's Confirm and Cancel, a
    /// notification's Resume or Replay); chat renderers show them, the
    /// terminal shows none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<Action>,
}

impl Reply {
    /// A reply with a title and nothing else.
    pub fn new(tone: Tone, title: impl Into<String>) -> Self {
        Self { title: title.into(), tone, sections: Vec::new(), ephemeral: false, data: None, actions: Vec::new() }
    }

    /// A neutral reply.
    pub fn info(title: impl Into<String>) -> Self {
        Self::new(Tone::Info, title)
    }

    /// A reply saying the action was done.
    pub fn ok(title: impl Into<String>) -> Self {
        Self::new(Tone::Ok, title)
    }

    /// A reply that needs attention.
    pub fn warn(title: impl Into<String>) -> Self {
        Self::new(Tone::Warn, title)
    }

    /// A reply saying nothing was done.
    pub fn error(title: impl Into<String>) -> Self {
        Self::new(Tone::Error, title)
    }

    /// An error reply showing only to the person who ran the command, for
    /// parse errors, denials and failed confirmations.
    pub fn from_error(error: &dyn std::error::Error) -> Self {
        Self::error(error.to_string()).ephemeral()
    }

    /// Attaches the result as data (shown by `--json`).
    pub fn with_data(mut self, data: impl serde::Serialize) -> Self {
        self.data = serde_json::to_value(data).ok();
        self
    }

    /// Shows the reply only to the person who ran the command.
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Adds a button.
    pub fn with_action(mut self, label: impl Into<String>, id: impl Into<String>, style: ActionStyle) -> Self {
        self.actions.push(Action { label: label.into(), id: id.into(), style });
        self
    }

    /// Adds lines of text under an optional heading.
    pub fn with_lines<L: Into<String>>(mut self, heading: Option<&str>, lines: impl IntoIterator<Item = L>) -> Self {
        self.sections.push(Section::Text {
            heading: heading.map(Into::into),
            lines: lines.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Adds a table under an optional heading.
    pub fn with_table<C: Into<String>>(
        mut self,
        heading: Option<&str>,
        columns: impl IntoIterator<Item = C>,
        rows: Vec<Vec<String>>,
    ) -> Self {
        self.sections.push(Section::Table {
            heading: heading.map(Into::into),
            columns: columns.into_iter().map(Into::into).collect(),
            rows,
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_the_fields() {
        let reply = Reply::ok("sent")
            .with_lines(Some("to"), ["nova"])
            .with_table(None, ["agent", "state"], vec![vec!["nova".into(), "up".into()]])
            .ephemeral();
        assert_eq!(reply.tone, Tone::Ok);
        assert!(reply.ephemeral);
        assert_eq!(
            reply.sections,
            vec![
                Section::Text { heading: Some("to".into()), lines: vec!["nova".into()] },
                Section::Table {
                    heading: None,
                    columns: vec!["agent".into(), "state".into()],
                    rows: vec![vec!["nova".into(), "up".into()]],
                },
            ]
        );
        let err = Reply::from_error(&crate::command::grammar::ParseError::Empty);
        assert_eq!((err.tone, err.ephemeral), (Tone::Error, true));
        assert_eq!(err.title, "no command given; try \"help\" for the list of commands");
    }
}

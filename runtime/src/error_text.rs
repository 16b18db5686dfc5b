//! One line for an error and its causes, each cause said once.
//!
//! Our errors put their cause in their own message (`cannot read the
//! dead-letter stream: {source}`) and also keep it as `source()`; a context
//! added with `anyhow` does not. Printing the chain with `{:#}` would repeat
//! the first kind; printing only the top would drop the second. This joins
//! the chain and skips a cause whose text the line already holds.

use std::error::Error;

/// The messages of `chain` (outermost first) joined with `: `, skipping a
/// cause whose text is already part of the line.
pub fn one_line<'a>(chain: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut line = String::new();
    for error in chain {
        let text = error.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the stream: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let error = anyhow::Error::new(Quoting(std::io::Error::other("timed out")));
        assert_eq!(one_line(error.chain()), "cannot read the stream: timed out");
    }

    #[test]
    fn a_context_keeps_its_cause() {
        let error = anyhow::Error::new(std::io::Error::other("no such file")).context("reading tokens.json");
        assert_eq!(one_line(error.chain()), "reading tokens.json: no such file");
    }
}

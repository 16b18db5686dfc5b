//! Packs rendered lines into chunks of at most a platform's limit (Slack
//! section texts, Discord embed descriptions), each wrapped in a frame such
//! as a code block, the first under a heading.

/// Characters, as the platforms count them.
pub(crate) fn chars(s: &str) -> usize {
    s.chars().count()
}

/// `head` (escaped and cut already) opens the first chunk; `fit` cuts a line
/// that alone would not fit, by the platform's own escaping rules.
pub(crate) fn chunks(
    head: String,
    lines: &[String],
    limit: usize,
    open: &str,
    close: &str,
    fit: impl Fn(&str, usize) -> String,
) -> Vec<String> {
    let frame = chars(open) + chars(close);
    let max_line = limit - frame - chars(&head);
    let mut out = Vec::new();
    let mut current = head;
    let mut body = String::new();
    for line in lines {
        let line = fit(line, max_line);
        let needed = chars(&line) + usize::from(!body.is_empty());
        let room = limit - frame - chars(&current);
        if needed > room.saturating_sub(chars(&body)) && !body.is_empty() {
            out.push(format!("{current}{open}{body}{close}"));
            current = String::new();
            body.clear();
        }
        if !body.is_empty() {
            body.push('\n');
        }
        body.push_str(&line);
    }
    if !body.is_empty() {
        out.push(format!("{current}{open}{body}{close}"));
    } else if !current.is_empty() {
        out.push(current.trim_end().to_owned());
    }
    out
}

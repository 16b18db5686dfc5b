//! The console's stylesheet and script, embedded in the binary (no CDN, no
//! build step): served with their types and a short cache lifetime.

use axum::http::header;
use axum::response::IntoResponse;

/// The stylesheet.
pub const CSS: &str = include_str!("assets/console.css");
/// The script: live updates over `/api/events` and in-place form submission.
pub const JS: &str = include_str!("assets/console.js");

/// `GET /assets/console.css`.
pub async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")], CSS)
}

/// `GET /assets/console.js`.
pub async fn js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=300")], JS)
}

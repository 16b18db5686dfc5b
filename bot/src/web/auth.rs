//! Who a web console request comes from: the users of `MESH_WEB_USERS` and
//! their tokens, sign-in sessions (in this process's memory), the CSRF token
//! of each session, the session cookie's attributes, the
//! `Authorization: Bearer` tokens scripts send to `/api/`, and the limits on
//! guessing: failed sign-ins per name, wrong bearer tokens per client
//! address, no sign-in posted from another site.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use mesh_protocol::Secret;
use subtle::ConstantTimeEq as _;

/// The session cookie's name.
pub const COOKIE: &str = "mesh_session";
/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; sign-in is refused (503) beyond, until some expire.
pub const MAX_SESSIONS: usize = 10_000;
/// The shortest token a web user may have.
pub const MIN_TOKEN_LEN: usize = 16;
/// Failed sign-ins allowed per user name per [`FAILURE_WINDOW`] before every
/// attempt with that name gets 429 (even the right token): someone guessing
/// one user's token waits, the other users sign in as usual.
pub const MAX_FAILURES: usize = 10;
/// The window of [`MAX_FAILURES`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// User names whose recent failures are remembered at most; beyond, the
/// name whose last failure is oldest is forgotten (memory stays bounded
/// whatever names are tried).
pub const FAILURE_NAMES: usize = 10_000;
/// Wrong `Authorization: Bearer` tokens allowed per client address per
/// [`FAILURE_WINDOW`] before every bearer token from that address gets 429
/// (even a right one); browser sessions are not affected.
pub const MAX_BEARER_FAILURES: usize = 10;
/// Client addresses whose recent wrong bearer tokens are remembered at most
/// (as [`FAILURE_NAMES`]).
pub const FAILURE_PEERS: usize = 10_000;
/// The characters of a name that count (longer names are cut: no user name
/// is longer than 32).
const NAME_KEY_CHARS: usize = 64;

/// The web console's users: name -> token (resolved at start).
#[derive(Clone, Default)]
pub struct WebUsers {
    users: Vec<(String, Secret)>,
}

impl std::fmt::Debug for WebUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.users.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("WebUsers").field("names", &names).finish()
    }
}

/// Why the web users cannot be used (the bot refuses to start: fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebUsersError {
    /// A name that is not `a-z`, `0-9`, `-`, `_` (1 to 32).
    #[error("web user name {0:?} is invalid; use 1 to 32 of a-z, 0-9, - and _ (it becomes web:<name>)")]
    BadName(String),
    /// A token too short to resist guessing.
    #[error("the token of web user {0} is shorter than {MIN_TOKEN_LEN} characters; use a long random one")]
    ShortToken(String),
    /// Two users with one token: a sign-in could not tell them apart.
    #[error("web users {0} and {1} have the same token; give each their own")]
    SharedToken(String, String),
}

impl WebUsers {
    /// Checks names and tokens.
    pub fn new(users: Vec<(String, Secret)>) -> Result<Self, WebUsersError> {
        for (i, (name, token)) in users.iter().enumerate() {
            if !crate::command::is_web_name(name) {
                return Err(WebUsersError::BadName(name.chars().take(40).collect()));
            }
            if token.expose().chars().count() < MIN_TOKEN_LEN {
                return Err(WebUsersError::ShortToken(name.clone()));
            }
            if let Some((other, _)) = users[..i].iter().find(|(_, t)| same(t.expose(), token.expose())) {
                return Err(WebUsersError::SharedToken(other.clone(), name.clone()));
            }
        }
        Ok(Self { users })
    }

    /// True when `name` is a user whose token is `token` (constant time in the token).
    pub fn check(&self, name: &str, token: &str) -> bool {
        self.users.iter().any(|(n, t)| n == name && same(t.expose(), token))
    }

    /// The user whose token is `token`: every token is compared, in constant time each.
    pub fn by_token(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (name, secret) in &self.users {
            if same(secret.expose(), token) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The user names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.iter().map(|(n, _)| n.as_str())
    }
}

fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The user.
    pub user: String,
    /// The token every form of this session carries.
    pub csrf: String,
    expires: Instant,
}

/// Recent failures per key (a user name tried, a client address), bounded:
/// beyond `cap` keys, the one whose last failure is oldest is forgotten.
#[derive(Debug)]
struct FailureLog<K> {
    map: Mutex<HashMap<K, VecDeque<Instant>>>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone> FailureLog<K> {
    fn new(cap: usize) -> Self {
        Self { map: Mutex::new(HashMap::new()), cap }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, VecDeque<Instant>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failures of `key` within [`FAILURE_WINDOW`] of `now`.
    fn recent(times: &mut VecDeque<Instant>, now: Instant) -> usize {
        while times.front().is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW) {
            times.pop_front();
        }
        times.len()
    }

    /// Runs `check` unless `key` has `max` failures or more within the
    /// window; a check that finds nothing is counted as a failure of `key`.
    /// The lock is held throughout, so parallel attempts cannot all slip
    /// under `max` (the checks are constant-time comparisons, quick).
    fn attempt<T>(&self, key: K, max: usize, now: Instant, check: impl FnOnce() -> Option<T>) -> Attempt<T> {
        let mut map = self.lock();
        if map.get_mut(&key).map_or(0, |times| Self::recent(times, now)) >= max {
            return Attempt::Throttled;
        }
        match check() {
            Some(found) => Attempt::Right(found),
            None => {
                Self::record(&mut map, self.cap, key, now);
                Attempt::Wrong
            }
        }
    }

    /// Counts a failure of `key`, forgetting the stalest key beyond `cap`.
    fn record(map: &mut HashMap<K, VecDeque<Instant>>, cap: usize, key: K, now: Instant) {
        if !map.contains_key(&key) && map.len() >= cap {
            map.retain(|_, times| Self::recent(times, now) > 0);
            if map.len() >= cap {
                let oldest = map.iter().min_by_key(|(_, times)| times.back().copied()).map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        map.entry(key).or_default().push_back(now);
    }
}

/// What an attempt against a [`FailureLog`] came to.
enum Attempt<T> {
    /// Too many failures lately: not checked.
    Throttled,
    /// Checked, and wrong (counted).
    Wrong,
    /// Checked, and right.
    Right(T),
}

/// The sessions of this bot process (a restart signs everyone out).
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    /// Recent failed sign-ins per name tried (known user or not: a refusal
    /// tells nothing about whether the name exists).
    failures: FailureLog<String>,
    /// Recent wrong bearer tokens per client address ([`client_key`]).
    bearer_failures: FailureLog<Option<IpAddr>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            failures: FailureLog::new(FAILURE_NAMES),
            bearer_failures: FailureLog::new(FAILURE_PEERS),
        }
    }
}

/// Why a sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInRefused {
    /// Wrong name or token.
    Wrong,
    /// Too many failures lately: wait.
    Throttled,
    /// Too many sessions.
    Full,
}

impl Sessions {
    /// Signs `name` in with `token`: the new session's id and CSRF token.
    /// After [`MAX_FAILURES`] failures for `name` within [`FAILURE_WINDOW`],
    /// every attempt for `name` is refused until the oldest leaves the window.
    pub fn sign_in(&self, users: &WebUsers, name: &str, token: &str) -> Result<(String, Session), SignInRefused> {
        let now = Instant::now();
        let key: String = name.chars().take(NAME_KEY_CHARS).collect();
        match self.failures.attempt(key, MAX_FAILURES, now, || users.check(name, token).then_some(())) {
            Attempt::Throttled => return Err(SignInRefused::Throttled),
            Attempt::Wrong => return Err(SignInRefused::Wrong),
            Attempt::Right(()) => {}
        }
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires > now);
            if map.len() >= MAX_SESSIONS {
                return Err(SignInRefused::Full);
            }
        }
        let id = random_token();
        let session = Session { user: name.to_owned(), csrf: random_token(), expires: now + SESSION_TTL };
        map.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The user whose bearer token is `token`, for a request from `client`
    /// ([`client_key`]): after [`MAX_BEARER_FAILURES`] wrong tokens from
    /// `client` within [`FAILURE_WINDOW`], every bearer token from it is
    /// refused (the right one too: a guesser learns nothing) until the
    /// oldest failure leaves the window.
    pub fn bearer(&self, users: &WebUsers, client: Option<IpAddr>, token: &str) -> Result<String, NoCaller> {
        let now = Instant::now();
        match self.bearer_failures.attempt(client, MAX_BEARER_FAILURES, now, || users.by_token(token)) {
            Attempt::Throttled => Err(NoCaller::Throttled),
            Attempt::Wrong => Err(NoCaller::Unknown),
            Attempt::Right(user) => Ok(user.to_owned()),
        }
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn sign_out(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// 244 random bits (two v4 UUIDs from the OS generator), as 64 hex digits.
fn random_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A browser with a session cookie.
    Session {
        /// The session id (from the cookie).
        id: String,
        /// The session.
        session: Session,
    },
    /// A script with `Authorization: Bearer <token>`.
    Bearer {
        /// The user whose token it is.
        user: String,
    },
}

impl Caller {
    /// The user's name.
    pub fn user(&self) -> &str {
        match self {
            Self::Session { session, .. } => &session.user,
            Self::Bearer { user } => user,
        }
    }

    /// The engine's identity of the user (`web:<name>`).
    pub fn identity(&self) -> crate::command::Identity {
        crate::command::Identity::Web { name: self.user().to_owned() }
    }

    /// True when `csrf` is this caller's token; a bearer caller needs none
    /// (a browser never adds the header by itself).
    pub fn csrf_ok(&self, csrf: Option<&str>) -> bool {
        match self {
            Self::Session { session, .. } => csrf.is_some_and(|c| same(&session.csrf, c)),
            Self::Bearer { .. } => true,
        }
    }
}

/// Why a request has no caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCaller {
    /// No session and no (right) bearer token.
    Unknown,
    /// Too many wrong bearer tokens from this client lately: wait.
    Throttled,
}

/// The caller of a request from `client` ([`client_key`]): its session
/// cookie, else its bearer token (wrong ones counted per client).
pub fn caller(
    headers: &HeaderMap,
    client: Option<IpAddr>,
    users: &WebUsers,
    sessions: &Sessions,
) -> Result<Caller, NoCaller> {
    if let Some(id) = cookie(headers, COOKIE)
        && let Some(session) = sessions.get(id)
    {
        return Ok(Caller::Session { id: id.to_owned(), session });
    }
    let auth = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(token) = auth.and_then(|a| a.strip_prefix("Bearer ")).map(str::trim) else {
        return Err(NoCaller::Unknown);
    };
    sessions.bearer(users, client, token).map(|user| Caller::Bearer { user })
}

/// The address wrong bearer tokens are counted against: the peer, or when
/// the peer is one of the `trusted` proxies, the last address it appended
/// to `X-Forwarded-For`. An IPv6 address counts as its /64 (one host
/// usually holds a whole /64).
pub fn client_key(trusted: &[IpAddr], peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
    let forwarded = || {
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .last()
            .and_then(|a| a.trim().parse::<IpAddr>().ok())
    };
    let client = match peer {
        Some(p) if trusted.contains(&p) => forwarded().or(peer),
        _ => peer,
    };
    client.map(|ip| match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    })
}

/// True when a form POST comes from another site's page: `Sec-Fetch-Site`
/// (sent by every current browser) other than `same-origin` or `none`
/// (typed, bookmarked); without it, an `Origin` that is not this host's.
/// A request with neither (a script, an old browser) is not cross-site.
pub fn cross_site(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site.trim().to_ascii_lowercase().as_str(), "same-origin" | "none");
    }
    let Some(origin) = header("origin") else { return false };
    let authority = origin.split_once("://").map(|(_, rest)| rest.trim_end_matches('/'));
    match (authority, header("host")) {
        (Some(authority), Some(host)) => !authority.eq_ignore_ascii_case(host.trim()),
        _ => true,
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// True when the session cookie must be `Secure`: the request came through
/// one of the `trusted` proxies and it says the browser used https.
pub fn secure_cookie(trusted: &[IpAddr], peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
    let from_trusted = peer.is_some_and(|p| trusted.contains(&p));
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').next().is_some_and(|first| first.trim().eq_ignore_ascii_case("https")));
    from_trusted && https
}

/// The `Set-Cookie` value of a new session.
pub fn session_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", SESSION_TTL.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn cleared_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn users() -> WebUsers {
        WebUsers::new(vec![
            ("alice".into(), Secret::new("alice-token-0123456789")),
            ("bob".into(), Secret::new("bob-token-0123456789xx")),
        ])
        .unwrap()
    }

    #[test]
    fn users_are_checked_at_start() {
        let bad = |name: &str, token: &str| WebUsers::new(vec![(name.into(), Secret::new(token))]).unwrap_err();
        assert_eq!(bad("Alice", "0123456789abcdefgh"), WebUsersError::BadName("Alice".into()));
        assert_eq!(bad("alice", "short"), WebUsersError::ShortToken("alice".into()));
        let shared = WebUsers::new(vec![
            ("a".into(), Secret::new("same-token-0123456789")),
            ("b".into(), Secret::new("same-token-0123456789")),
        ]);
        assert_eq!(shared.unwrap_err(), WebUsersError::SharedToken("a".into(), "b".into()));
        assert!(!format!("{:?}", users()).contains("token-0123"), "tokens never reach Debug");
    }

    #[test]
    fn sign_in_needs_the_users_own_token_and_throttles_guessing() {
        let (users, sessions) = (users(), Sessions::default());
        assert_eq!(sessions.sign_in(&users, "alice", "bob-token-0123456789xx"), Err(SignInRefused::Wrong));
        let (id, session) = sessions.sign_in(&users, "alice", "alice-token-0123456789").unwrap();
        assert_eq!(session.user, "alice");
        assert_eq!((id.len(), session.csrf.len()), (64, 64));
        assert_eq!(sessions.get(&id).unwrap().user, "alice");
        sessions.sign_out(&id);
        assert!(sessions.get(&id).is_none());
        for _ in 0..MAX_FAILURES {
            assert_eq!(sessions.sign_in(&users, "bob", "guess"), Err(SignInRefused::Wrong));
        }
        // Even the right token waits once bob's window is full of failures.
        assert_eq!(sessions.sign_in(&users, "bob", "bob-token-0123456789xx"), Err(SignInRefused::Throttled));
        assert_eq!(sessions.sign_in(&users, "bob", "guess"), Err(SignInRefused::Throttled));
    }

    #[test]
    fn guessing_one_name_does_not_lock_the_others_out() {
        let (users, sessions) = (users(), Sessions::default());
        // A flood of bad sign-ins for bob, and for names no one has.
        for i in 0..MAX_FAILURES * 5 {
            let _ = sessions.sign_in(&users, "bob", &format!("guess-{i}"));
            let _ = sessions.sign_in(&users, &format!("nobody{i}"), "guess");
        }
        assert_eq!(sessions.sign_in(&users, "bob", "bob-token-0123456789xx"), Err(SignInRefused::Throttled));
        // alice signs in; her own mistakes count for her only.
        assert_eq!(sessions.sign_in(&users, "alice", "typo"), Err(SignInRefused::Wrong));
        assert!(sessions.sign_in(&users, "alice", "alice-token-0123456789").is_ok());
        // A name is a name up to its first 64 characters.
        let long = "x".repeat(200);
        for _ in 0..MAX_FAILURES {
            assert_eq!(sessions.sign_in(&users, &long, "guess"), Err(SignInRefused::Wrong));
        }
        assert_eq!(sessions.sign_in(&users, &format!("{long}y"), "guess"), Err(SignInRefused::Throttled));
    }

    #[test]
    fn the_names_remembered_are_bounded() {
        let (users, sessions) = (users(), Sessions::default());
        for _ in 0..MAX_FAILURES {
            let _ = sessions.sign_in(&users, "bob", "guess");
        }
        for i in 0..FAILURE_NAMES + 10 {
            let _ = sessions.sign_in(&users, &format!("n{i}"), "guess");
        }
        let failures = sessions.failures.lock();
        assert_eq!(failures.len(), FAILURE_NAMES, "the oldest names are forgotten");
        assert!(!failures.contains_key("bob"), "bob's failures were the oldest");
    }

    #[test]
    fn callers_come_from_the_cookie_or_a_bearer_token() {
        let (users, sessions) = (users(), Sessions::default());
        let (id, session) = sessions.sign_in(&users, "bob", "bob-token-0123456789xx").unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(caller(&headers, None, &users, &sessions), Err(NoCaller::Unknown));
        headers.insert("cookie", format!("theme=dark; {COOKIE}={id}").parse().unwrap());
        let by_cookie = caller(&headers, None, &users, &sessions).unwrap();
        assert_eq!(by_cookie.user(), "bob");
        assert!(by_cookie.csrf_ok(Some(&session.csrf)));
        assert!(!by_cookie.csrf_ok(Some("forged")) && !by_cookie.csrf_ok(None));
        let mut headers = HeaderMap::new();
        headers.insert("cookie", format!("{COOKIE}=not-a-session").parse().unwrap());
        assert_eq!(caller(&headers, None, &users, &sessions), Err(NoCaller::Unknown));
        headers.insert("authorization", "Bearer alice-token-0123456789".parse().unwrap());
        assert_eq!(caller(&headers, None, &users, &sessions), Ok(Caller::Bearer { user: "alice".into() }));
        headers.insert("authorization", "Bearer alice-token-012345678".parse().unwrap());
        assert_eq!(caller(&headers, None, &users, &sessions), Err(NoCaller::Unknown));
    }

    #[test]
    fn wrong_bearer_tokens_are_limited_per_client_and_sessions_are_not() {
        let (users, sessions) = (users(), Sessions::default());
        let (id, _) = sessions.sign_in(&users, "bob", "bob-token-0123456789xx").unwrap();
        let (guesser, other): (IpAddr, IpAddr) = ("10.0.0.7".parse().unwrap(), "10.0.0.8".parse().unwrap());
        let bearer = |token: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
            headers
        };
        for _ in 0..MAX_BEARER_FAILURES {
            assert_eq!(caller(&bearer("guess"), Some(guesser), &users, &sessions), Err(NoCaller::Unknown));
        }
        let right = bearer("alice-token-0123456789");
        assert_eq!(caller(&bearer("guess"), Some(guesser), &users, &sessions), Err(NoCaller::Throttled));
        assert_eq!(caller(&right, Some(guesser), &users, &sessions), Err(NoCaller::Throttled), "even the right one");
        assert_eq!(caller(&right, Some(other), &users, &sessions), Ok(Caller::Bearer { user: "alice".into() }));
        let mut browser = bearer("guess");
        browser.insert("cookie", format!("{COOKIE}={id}").parse().unwrap());
        assert_eq!(caller(&browser, Some(guesser), &users, &sessions).unwrap().user(), "bob", "a session is let in");
    }

    #[test]
    fn the_client_is_the_peer_or_what_a_trusted_proxy_forwarded() {
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(client_key(&[proxy], Some(proxy), &headers), ip("5.6.7.8"), "the address the proxy appended");
        assert_eq!(client_key(&[proxy], ip("9.9.9.9"), &headers), ip("9.9.9.9"), "anyone may send the header");
        assert_eq!(client_key(&[], ip("2001:db8::1:2:3:4"), &headers), ip("2001:db8::"), "an IPv6 /64");
        assert_eq!(client_key(&[], ip("::ffff:1.2.3.4"), &headers), ip("1.2.3.4"));
        assert_eq!(client_key(&[], None, &headers), None);
    }

    #[test]
    fn a_sign_in_from_another_site_is_cross_site() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            headers.insert("host", "console.example:8080".parse().unwrap());
            for (name, value) in pairs {
                headers.insert(*name, value.parse().unwrap());
            }
            headers
        };
        assert!(!cross_site(&headers(&[])), "a script sends neither header");
        assert!(!cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!cross_site(&headers(&[("sec-fetch-site", "none")])));
        for site in ["cross-site", "same-site"] {
            let with_origin = headers(&[("sec-fetch-site", site), ("origin", "http://console.example:8080")]);
            assert!(cross_site(&with_origin), "{site}: Sec-Fetch-Site decides");
        }
        assert!(!cross_site(&headers(&[("origin", "https://console.example:8080")])));
        assert!(cross_site(&headers(&[("origin", "https://evil.example")])));
        assert!(cross_site(&headers(&[("origin", "null")])));
    }

    #[test]
    fn the_cookie_is_secure_only_behind_a_trusted_https_proxy() {
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let mut https = HeaderMap::new();
        https.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(secure_cookie(&[proxy], Some(proxy), &https));
        assert!(!secure_cookie(&[proxy], Some("10.0.0.6".parse().unwrap()), &https), "anyone may send the header");
        assert!(!secure_cookie(&[proxy], Some(proxy), &HeaderMap::new()));
        let cookie = session_cookie("abc", true);
        assert_eq!(cookie, "mesh_session=abc; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200; Secure");
        assert!(!session_cookie("abc", false).contains("Secure"));
    }
}

//! Confirmation of dangerous actions: `kill hard` and `kill nuclear` get a
//! one-time code, and only `confirm <code>` from the right person within the
//! window runs them. Pure: the caller supplies the clock and the randomness.

use std::collections::BTreeMap;

use time::{Duration, OffsetDateTime};

use super::grammar::Command;
use super::permission::{Identity, Role};

/// How long a code stays valid.
pub const CONFIRM_WINDOW: Duration = Duration::seconds(60);
/// Characters in a code.
pub const CODE_LEN: usize = 6;
/// What codes are made of: no 0/O, 1/I/L, so a code read aloud or retyped
/// from a phone is not mistaken.
pub const CODE_ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
/// Pending actions kept at most; the oldest is dropped to make room.
pub const MAX_PENDING: usize = 256;

/// Upper-cases `raw` and checks it is shaped like a code.
pub fn normalize_code(raw: &str) -> Option<String> {
    let code = raw.to_ascii_uppercase();
    (code.len() == CODE_LEN && code.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(code)
}

/// How confirmation behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmConfig {
    /// How long a code stays valid.
    pub window: Duration,
    /// When on, `kill nuclear` must be confirmed by a different director than
    /// the one who asked for it.
    pub two_person_nuclear: bool,
}

impl Default for ConfirmConfig {
    fn default() -> Self {
        Self { window: CONFIRM_WINDOW, two_person_nuclear: false }
    }
}

/// What is done with a pending action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Run it (`confirm <code>`, or the Confirm button).
    Confirm,
    /// Drop it (the Cancel button): the person who asked may, and under the
    /// two-person rule any director, since any other director could confirm it.
    Cancel,
}

/// Who may confirm a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Confirmer {
    /// The person who asked.
    SameUser,
    /// A director other than the person who asked (two-person rule).
    OtherDirector,
}

/// What the person who asked is told: the code and who must confirm it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The one-time code.
    pub code: String,
    /// The command's name (`kill hard`).
    pub command: &'static str,
    /// Until when `confirm <code>` works.
    pub expires_at: OffsetDateTime,
    /// Who may confirm.
    pub confirmer: Confirmer,
}

impl Challenge {
    /// One line telling people what to type.
    pub fn instruction(&self, window: Duration) -> String {
        let secs = window.whole_seconds();
        match self.confirmer {
            Confirmer::SameUser => {
                format!("to run {:?}, type \"confirm {}\" within {secs}s", self.command, self.code)
            }
            Confirmer::OtherDirector => format!(
                "two-person rule: another director must type \"confirm {}\" within {secs}s to run {:?}",
                self.code, self.command
            ),
        }
    }
}

/// An action waiting for its code, returned by a successful confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAction {
    /// What to run.
    pub command: Command,
    /// Who asked for it.
    pub requested_by: Identity,
    /// When they asked.
    pub requested_at: OffsetDateTime,
    /// When the code stops working.
    pub expires_at: OffsetDateTime,
}

/// Why a confirm did not run anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// Not shaped like a code.
    #[error("{0:?} is not a confirmation code; codes are 6 letters and digits such as K7P2QX")]
    Malformed(String),
    /// No pending action has this code (never issued, used, or expired long ago).
    #[error(
        "no action is waiting for code {0:?}; a code works once and only for a short time, so run the command again"
    )]
    Unknown(String),
    /// The code's window has passed; the code is gone now.
    #[error("code {code:?} for {command:?} expired {ago}s ago; run {command:?} again for a new code")]
    Expired {
        /// The code.
        code: String,
        /// The command it was for.
        command: &'static str,
        /// Seconds since it expired.
        ago: i64,
    },
    /// Someone other than the person who asked tried to confirm.
    #[error("code {code:?} for {command:?} was asked for by someone else; only they can confirm it")]
    NotRequester {
        /// The code.
        code: String,
        /// The command it was for.
        command: &'static str,
    },
    /// The two-person rule: the director who asked tried to confirm.
    #[error("two-person rule: {command:?} must be confirmed by a different director than the one who asked")]
    SamePerson {
        /// The command it was for.
        command: &'static str,
    },
    /// The two-person rule: the confirmer is not a director.
    #[error("two-person rule: {command:?} must be confirmed by a director; you have {}", have.map_or("no role", |r| r.as_str()))]
    NotDirector {
        /// The command it was for.
        command: &'static str,
        /// The confirmer's role.
        have: Option<Role>,
    },
}

/// The actions waiting for a code.
#[derive(Debug, Clone, Default)]
pub struct Confirmations {
    config: ConfirmConfig,
    pending: BTreeMap<String, PendingAction>,
    /// Codes whose window passed undecided, by when it ended (at most
    /// [`MAX_PENDING`], the oldest dropped): a late click or `confirm` is
    /// told the code expired, and the prompt's expiry timer finds it.
    lapsed: BTreeMap<String, (&'static str, OffsetDateTime)>,
}

impl Confirmations {
    /// No pending actions.
    pub fn new(config: ConfirmConfig) -> Self {
        Self { config, pending: BTreeMap::new(), lapsed: BTreeMap::new() }
    }

    /// The config in force.
    pub fn config(&self) -> ConfirmConfig {
        self.config
    }

    /// Parks `command` for `who` and returns its code, made from `random`
    /// (any random `u64`; a code that is already pending is never reused).
    pub fn request(&mut self, who: &Identity, command: Command, now: OffsetDateTime, random: u64) -> Challenge {
        self.collect_garbage(now);
        while self.pending.len() >= MAX_PENDING {
            let oldest = self.pending.iter().min_by_key(|(_, p)| p.requested_at).map(|(code, _)| code.clone());
            match oldest {
                Some(code) => self.pending.remove(&code),
                None => break,
            };
        }
        let mut state = random;
        let code = loop {
            let code = code_from(splitmix64(&mut state));
            if !self.pending.contains_key(&code) && !self.lapsed.contains_key(&code) {
                break code;
            }
        };
        let confirmer = if matches!(command, Command::KillNuclear { .. }) && self.config.two_person_nuclear {
            Confirmer::OtherDirector
        } else {
            Confirmer::SameUser
        };
        let expires_at = now + self.config.window;
        let challenge = Challenge { code: code.clone(), command: command.spec().name, expires_at, confirmer };
        self.pending.insert(code, PendingAction { command, requested_by: who.clone(), requested_at: now, expires_at });
        challenge
    }

    /// Takes the action waiting for `code` if `who` (holding `role`) may
    /// confirm it now. A code works once; an expired code is removed.
    pub fn confirm(
        &mut self,
        who: &Identity,
        role: Option<Role>,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<PendingAction, ConfirmError> {
        self.decide(who, role, code, now, Decision::Confirm)
    }

    /// Takes the action waiting for `code` if `who` (holding `role`) may make
    /// `decision` on it now: the rules of [`Confirmations::confirm`], and for
    /// a cancel also the person who asked under the two-person rule.
    pub fn decide(
        &mut self,
        who: &Identity,
        role: Option<Role>,
        code: &str,
        now: OffsetDateTime,
        decision: Decision,
    ) -> Result<PendingAction, ConfirmError> {
        let outcome = match self.check(who, role, code, now, decision) {
            Ok(code) => self.pending.remove(&code).ok_or(ConfirmError::Unknown(code)),
            Err(e) => {
                if let ConfirmError::Expired { code, .. } = &e
                    && let Some(action) = self.pending.remove(code)
                {
                    self.lapse_into(code.clone(), &action);
                }
                Err(e)
            }
        };
        self.collect_garbage(now);
        outcome
    }

    /// Checks a confirm and returns the normalized code it may take.
    fn check(
        &self,
        who: &Identity,
        role: Option<Role>,
        raw: &str,
        now: OffsetDateTime,
        decision: Decision,
    ) -> Result<String, ConfirmError> {
        let code = normalize_code(raw).ok_or_else(|| ConfirmError::Malformed(raw.chars().take(40).collect()))?;
        if let Some((command, expired_at)) = self.lapsed.get(&code) {
            let ago = (now - *expired_at).whole_seconds();
            return Err(ConfirmError::Expired { code, command, ago });
        }
        let action = self.pending.get(&code).ok_or_else(|| ConfirmError::Unknown(code.clone()))?;
        let command = action.command.spec().name;
        if now > action.expires_at {
            return Err(ConfirmError::Expired { code, command, ago: (now - action.expires_at).whole_seconds() });
        }
        let same = action.requested_by.is_same_person(who);
        if decision == Decision::Cancel && same {
            return Ok(code);
        }
        if matches!(action.command, Command::KillNuclear { .. }) && self.config.two_person_nuclear {
            if same {
                return Err(ConfirmError::SamePerson { command });
            }
            if role != Some(Role::Director) {
                return Err(ConfirmError::NotDirector { command, have: role });
            }
        } else if !same {
            return Err(ConfirmError::NotRequester { code, command });
        }
        Ok(code)
    }

    /// Holds `action` under `code` unless that code is pending here already:
    /// a code another bot replica issued, so [`Confirmations::confirm`]
    /// applies the same rules to it. A malformed code is ignored.
    pub fn adopt(&mut self, code: &str, action: PendingAction) {
        let Some(code) = normalize_code(code) else { return };
        if !self.pending.contains_key(&code) && self.pending.len() < MAX_PENDING {
            self.pending.insert(code, action);
        }
    }

    /// Drops every action whose code has expired (remembering the code as
    /// lapsed); returns how many.
    pub fn collect_garbage(&mut self, now: OffsetDateTime) -> usize {
        let expired: Vec<String> =
            self.pending.iter().filter(|(_, p)| now > p.expires_at).map(|(code, _)| code.clone()).collect();
        for code in &expired {
            if let Some(action) = self.pending.remove(code) {
                self.lapse_into(code.clone(), &action);
            }
        }
        expired.len()
    }

    /// The command of `code` if its window has passed without a decision
    /// (it is then lapsed, and stays so); `None` when it was decided, is
    /// still open, or was never issued here. What a prompt's expiry timer asks.
    pub fn lapse(&mut self, code: &str, now: OffsetDateTime) -> Option<&'static str> {
        let code = normalize_code(code)?;
        if let Some(action) = self.pending.get(&code).filter(|a| now > a.expires_at).cloned() {
            self.pending.remove(&code);
            self.lapse_into(code.clone(), &action);
        }
        self.lapsed.get(&code).map(|(command, _)| *command)
    }

    fn lapse_into(&mut self, code: String, action: &PendingAction) {
        while self.lapsed.len() >= MAX_PENDING {
            let oldest = self.lapsed.iter().min_by_key(|(_, (_, at))| *at).map(|(code, _)| code.clone());
            match oldest {
                Some(oldest) => self.lapsed.remove(&oldest),
                None => break,
            };
        }
        self.lapsed.insert(code, (action.command.spec().name, action.expires_at));
    }

    /// Actions waiting for a code.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing waits for a code.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A well-mixed 64-bit step, so a poor `random` still spreads over all codes.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn code_from(mut n: u64) -> String {
    let base = CODE_ALPHABET.len() as u64;
    (0..CODE_LEN)
        .map(|_| {
            let c = CODE_ALPHABET[(n % base) as usize] as char;
            n /= base;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-03-01 12:00:00 UTC);

    fn slack(user: &str) -> Identity {
        Identity::Slack { user: user.into() }
    }

    fn hard() -> Command {
        Command::KillHard { agent: None, reason: Some("leak".into()) }
    }

    fn secs(s: i64) -> OffsetDateTime {
        T0 + Duration::seconds(s)
    }

    #[track_caller]
    fn check(
        config: ConfirmConfig,
        command: Command,
        confirm_as: (&Identity, Option<Role>),
        after: i64,
        want: Result<(), &str>,
    ) {
        let alice = slack("UALICE");
        let mut c = Confirmations::new(config);
        let challenge = c.request(&alice, command.clone(), T0, 42);
        let got = c.confirm(confirm_as.0, confirm_as.1, &challenge.code.to_lowercase(), secs(after));
        match (got, want) {
            (Ok(action), Ok(())) => {
                assert_eq!(action.command, command);
                assert_eq!(action.requested_by, alice);
                assert_eq!(action.requested_at, T0);
                assert!(c.is_empty(), "a used code must be gone");
            }
            (Err(e), Err(want)) => {
                let msg = e.to_string().replace(&challenge.code, "CODE");
                assert_eq!(msg, want);
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn who_may_confirm_and_when() {
        let one = ConfirmConfig::default();
        let two = ConfirmConfig { two_person_nuclear: true, ..one };
        let alice = slack("UALICE");
        let bob = slack("UBOB");
        let dir = Some(Role::Director);
        let admin = Some(Role::Admin);

        check(one, hard(), (&alice, admin), 0, Ok(()));
        check(one, hard(), (&alice, admin), 60, Ok(()));
        check(
            one,
            hard(),
            (&alice, admin),
            61,
            Err("code \"CODE\" for \"kill hard\" expired 1s ago; run \"kill hard\" again for a new code"),
        );
        check(
            one,
            hard(),
            (&bob, dir),
            5,
            Err("code \"CODE\" for \"kill hard\" was asked for by someone else; only they can confirm it"),
        );
        check(one, Command::KillNuclear { purge: false }, (&alice, dir), 5, Ok(()));
        check(
            one,
            Command::KillNuclear { purge: false },
            (&bob, dir),
            5,
            Err("code \"CODE\" for \"kill nuclear\" was asked for by someone else; only they can confirm it"),
        );
        check(two, Command::KillNuclear { purge: false }, (&bob, dir), 5, Ok(()));
        check(
            two,
            Command::KillNuclear { purge: false },
            (&alice, dir),
            5,
            Err("two-person rule: \"kill nuclear\" must be confirmed by a different director than the one who asked"),
        );
        check(
            two,
            Command::KillNuclear { purge: false },
            (&bob, admin),
            5,
            Err("two-person rule: \"kill nuclear\" must be confirmed by a director; you have admin"),
        );
        check(
            two,
            Command::KillNuclear { purge: false },
            (&bob, None),
            5,
            Err("two-person rule: \"kill nuclear\" must be confirmed by a director; you have no role"),
        );
        check(two, hard(), (&alice, admin), 5, Ok(()));
        check(
            two,
            Command::KillNuclear { purge: false },
            (&bob, dir),
            61,
            Err("code \"CODE\" for \"kill nuclear\" expired 1s ago; run \"kill nuclear\" again for a new code"),
        );
    }

    #[test]
    fn codes_work_once_and_expired_ones_are_collected() {
        let alice = slack("UALICE");
        let mut c = Confirmations::new(ConfirmConfig::default());
        let first = c.request(&alice, hard(), T0, 1);
        assert_eq!(
            first.instruction(CONFIRM_WINDOW),
            format!("to run \"kill hard\", type \"confirm {}\" within 60s", first.code)
        );
        assert_eq!(first.expires_at, secs(60));
        assert!(c.confirm(&alice, None, &first.code, secs(1)).is_ok());
        assert_eq!(
            c.confirm(&alice, None, &first.code, secs(2)).unwrap_err(),
            ConfirmError::Unknown(first.code.clone())
        );

        // A stranger's wrong attempt does not burn the code.
        let second = c.request(&alice, hard(), T0, 2);
        assert!(c.confirm(&slack("UEVE"), Some(Role::Director), &second.code, secs(1)).is_err());
        assert_eq!(c.len(), 1);

        // Expired: rejected with a clear message, then no longer pending (and still said to be expired).
        assert!(matches!(c.confirm(&alice, None, &second.code, secs(70)), Err(ConfirmError::Expired { ago: 10, .. })));
        assert!(c.is_empty());
        assert!(matches!(c.confirm(&alice, None, &second.code, secs(71)), Err(ConfirmError::Expired { ago: 11, .. })));
        assert_eq!(c.lapse(&second.code, secs(71)), Some("kill hard"));

        // Garbage collection drops only the expired ones.
        c.request(&alice, hard(), T0, 3);
        let late = c.request(&alice, hard(), secs(30), 4);
        assert_eq!(c.collect_garbage(secs(61)), 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c.lapse(&late.code, secs(61)), None, "still open");
        assert!(c.confirm(&alice, None, &late.code, secs(61)).is_ok());
        assert_eq!(c.lapse(&late.code, secs(100)), None, "decided: not lapsed");
        // The expiry timer finds a code left undecided, whether collected already or not.
        let left = c.request(&alice, hard(), secs(100), 5);
        assert_eq!(c.lapse(&left.code, secs(160)), None, "not yet");
        assert_eq!(c.lapse(&left.code, secs(161)), Some("kill hard"));
        assert!(matches!(c.confirm(&alice, None, &left.code, secs(162)), Err(ConfirmError::Expired { .. })));

        assert_eq!(
            c.confirm(&alice, None, "12", T0).unwrap_err().to_string(),
            "\"12\" is not a confirmation code; codes are 6 letters and digits such as K7P2QX"
        );
        assert!(c.confirm(&alice, None, "ZZZZZZ", T0).unwrap_err().to_string().contains("no action is waiting"));
    }

    #[test]
    fn who_may_cancel() {
        let alice = slack("UALICE");
        let bob = slack("UBOB");
        let two = ConfirmConfig { two_person_nuclear: true, ..Default::default() };
        let nuclear = Command::KillNuclear { purge: false };
        let cases: [(ConfirmConfig, Command, &Identity, Option<Role>, bool); 6] = [
            (ConfirmConfig::default(), hard(), &alice, Some(Role::Admin), true),
            (ConfirmConfig::default(), hard(), &bob, Some(Role::Director), false),
            (two, nuclear.clone(), &alice, Some(Role::Director), true),
            (two, nuclear.clone(), &bob, Some(Role::Director), true),
            (two, nuclear.clone(), &bob, Some(Role::Admin), false),
            (ConfirmConfig::default(), nuclear, &bob, Some(Role::Director), false),
        ];
        for (i, (config, command, who, role, allowed)) in cases.into_iter().enumerate() {
            let mut c = Confirmations::new(config);
            let challenge = c.request(&alice, command, T0, 5);
            let got = c.decide(who, role, &challenge.code, secs(1), Decision::Cancel);
            assert_eq!(got.is_ok(), allowed, "case {i}: {got:?}");
            assert_eq!(c.is_empty(), allowed, "case {i}: a refused cancel leaves the code");
        }
        let mut c = Confirmations::new(ConfirmConfig::default());
        let challenge = c.request(&alice, hard(), T0, 6);
        assert!(matches!(
            c.decide(&alice, None, &challenge.code, secs(61), Decision::Cancel),
            Err(ConfirmError::Expired { .. })
        ));
    }

    #[test]
    fn codes_are_unambiguous_distinct_and_bounded() {
        let alice = slack("UALICE");
        let mut c = Confirmations::new(ConfirmConfig::default());
        let mut seen = std::collections::BTreeSet::new();
        let a = c.request(&alice, hard(), T0, 7);
        let b = c.request(&alice, hard(), T0, 7);
        assert_ne!(a.code, b.code, "the same random value must still give a fresh code");
        seen.extend([a.code, b.code]);
        for i in 0..MAX_PENDING as u64 + 8 {
            let ch = c.request(&alice, hard(), T0 + Duration::milliseconds(i as i64 + 1), i / 2);
            assert_eq!(normalize_code(&ch.code).as_deref(), Some(ch.code.as_str()));
            assert!(!ch.code.contains(['0', 'O', '1', 'I', 'L']), "{}", ch.code);
            seen.insert(ch.code);
        }
        assert_eq!(seen.len(), MAX_PENDING + 10);
        assert_eq!(c.len(), MAX_PENDING);
        let two = Confirmations::new(ConfirmConfig { two_person_nuclear: true, ..Default::default() }).request(
            &alice,
            Command::KillNuclear { purge: false },
            T0,
            9,
        );
        assert_eq!(two.confirmer, Confirmer::OtherDirector);
        assert!(two.instruction(CONFIRM_WINDOW).starts_with("two-person rule: another director must type"));
    }
}

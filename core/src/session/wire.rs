//! What travels between a session holder and the authority.
//!
//! Same rules as [`crate::wire`]: these types are the protocol, not an encoding; postcard is
//! not self-describing, so variants are only ever appended and fields never reordered.
//!
//! Every request carries the session's [`Secret`] and a [`Seq`] that strictly increases per
//! session. The authority refuses a wrong secret without changing anything and ignores a seq
//! it has already seen (or one too old to tell), so a replayed or forged frame can neither
//! grant, nor renew, nor release.

use core::fmt;

use crate::time::Duration;
use crate::wire::{Fence, Key, Reject};

/// An authority-issued session number, drawn from a counter the authority persists: ids are
/// never reused, so a late reply to a dead session can never be mistaken for a live one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SessionId(pub u64);

impl SessionId {
    /// No session yet: what an [`SessionOp::Open`] request carries.
    pub const NONE: SessionId = SessionId(0);
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// A per-session sequence number. Strictly increasing per session; echoed in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Seq(pub u64);

/// The session's credential: 128 random bits chosen by the authority's caller at open.
///
/// It authorises everything the session does, so it never leaves the holder and the
/// authority: `Debug` prints no byte of it, and comparison takes the same time whichever
/// byte differs, so response timing does not reveal a prefix.
#[derive(Clone, Copy, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Secret([u8; 16]);

impl Secret {
    /// What an [`SessionOp::Open`] request carries: it has no secret yet.
    pub const NONE: Secret = Secret([0; 16]);

    /// A secret from 16 random bytes (from the platform's CSPRNG; the core has none).
    pub const fn from_bytes(bytes: [u8; 16]) -> Secret {
        Secret(bytes)
    }

    /// The bytes, for a transport that must encode them.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Equality in constant time: every byte is looked at whatever the first difference.
    pub fn ct_eq(&self, other: &Secret) -> bool {
        let diff = self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // Through black_box so the optimiser cannot turn the fold back into an early exit.
        core::hint::black_box(diff) == 0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.ct_eq(other)
    }
}
impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Secret {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "Secret(..)")
    }
}

/// The longest holder label, in bytes.
pub const MAX_LABEL_LEN: usize = 32;

/// The public name of a session's holder (a host name, a process name): what status and
/// list endpoints show instead of anything that authorises.
pub type Label = heapless::String<MAX_LABEL_LEN>;

/// Why a label is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum LabelError {
    /// The label is longer than [`MAX_LABEL_LEN`] bytes.
    TooLong,
    /// The label has a byte outside printable ASCII at this index.
    BadByte(usize),
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelError::TooLong => write!(f, "label is longer than {MAX_LABEL_LEN} bytes"),
            LabelError::BadByte(i) => write!(f, "label has a byte outside printable ASCII at byte {i}"),
        }
    }
}

impl core::error::Error for LabelError {}

/// Checks a label: at most [`MAX_LABEL_LEN`] bytes of printable ASCII, so a status page
/// or terminal shows it as it is.
pub fn parse_label(s: &str) -> Result<Label, LabelError> {
    if s.len() > MAX_LABEL_LEN {
        return Err(LabelError::TooLong);
    }
    if let Some(i) = s.bytes().position(|b| !(b' '..=b'~').contains(&b)) {
        return Err(LabelError::BadByte(i));
    }
    let mut label = Label::new();
    // Cannot fail: the length was checked above.
    let _ = label.push_str(s);
    Ok(label)
}

/// A request within a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct SessionRequest {
    /// The session ([`SessionId::NONE`] for [`SessionOp::Open`]).
    pub session: SessionId,
    /// Its secret ([`Secret::NONE`] for [`SessionOp::Open`]).
    pub secret: Secret,
    /// Strictly increasing per session; echoed in the reply.
    pub seq: Seq,
    /// What is asked.
    pub op: SessionOp,
}

impl SessionRequest {
    /// The response carrying `reply` to this request.
    pub fn answer(&self, reply: SessionReply) -> SessionResponse {
        SessionResponse { session: self.session, seq: self.seq, reply }
    }
}

/// The operations of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub enum SessionOp {
    /// Start a session of `ttl` for the holder called `label`.
    Open {
        /// Requested session length.
        ttl: Duration,
        /// The holder's public name.
        label: Label,
    },
    /// Renew the session, and with it every key it holds, for its ttl from now. The reply
    /// carries grants made to the session while it waited.
    KeepAlive,
    /// Grant `key` to the session if it is free or already the session's (then with its
    /// current fence). If it is held: queue for it (`wait`) or say how long it stays held.
    Acquire {
        /// The key.
        key: Key,
        /// Queue (FIFO) until the key is granted, instead of answering `Busy`.
        wait: bool,
    },
    /// Give back the session's grant of `key` under `fence`. With [`Fence::NONE`]: leave the
    /// key's queue (a grant already made is reported, never released, by this form).
    Release {
        /// The key.
        key: Key,
        /// The fence being given back, or [`Fence::NONE`] to stop waiting.
        fence: Fence,
    },
    /// End the session: every key it holds is free at once and it leaves every queue.
    Close,
    /// [`SessionOp::Acquire`] of a semaphore: up to `limit` sessions may hold `key` at once,
    /// each under its own fence. Every holder and waiter of the key must ask for the same
    /// limit (else `Rejected(LimitMismatch)`); `Acquire` is this with a limit of 1.
    AcquireWithLimit {
        /// The key.
        key: Key,
        /// Queue (FIFO) until a slot is granted, instead of answering `Busy`.
        wait: bool,
        /// How many sessions may hold the key at once; at least 1.
        limit: u16,
    },
    /// [`Acquire`](SessionOp::Acquire), and when this acquisition is granted (at once or from
    /// the queue) the holding carries `value`, which observers of the key are told with the
    /// holder. The value is fixed for the holding: asking again while holding or queued
    /// keeps the first one.
    AcquireWithValue {
        /// The key.
        key: Key,
        /// Queue (FIFO) until the key is granted, instead of answering `Busy`.
        wait: bool,
        /// What observers are told with the holder (e.g. the holder's address).
        value: Value,
    },
    /// Follow `key`'s holder: every change (a new holder, or free) is reported in this
    /// session's keepalive replies ([`SessionReply::AliveObserved`]), in order, the current
    /// state first. Answered [`SessionReply::Observing`], or `Rejected(Capacity)` when the
    /// authority tracks as many observers as it can.
    Observe {
        /// The key.
        key: Key,
    },
    /// Stop following `key`. Answered [`SessionReply::Unobserved`].
    Unobserve {
        /// The key.
        key: Key,
    },
    /// [`KeepAlive`](SessionOp::KeepAlive), and acknowledge the observed changes of `key` up
    /// to `change`: the authority reports the next one after it.
    KeepAliveSeen {
        /// The observed key.
        key: Key,
        /// The highest change of it received.
        change: u64,
    },
}

/// A grant to a session, as reported in [`SessionReply::Alive`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Grant {
    /// The key granted.
    pub key: Key,
    /// Its fence.
    pub fence: Fence,
    /// The seq of the session's [`SessionOp::Acquire`] that this grant answers. A holder that
    /// gave the key back and asked again since (with a higher seq) knows a report of an
    /// older grant for a stale one, whatever order the network delivered the replies in.
    pub asked: Seq,
}

/// The authority's answer to the request with the same session and seq.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct SessionResponse {
    /// The session of the request answered.
    pub session: SessionId,
    /// The seq of the request answered.
    pub seq: Seq,
    /// The answer.
    pub reply: SessionReply,
}

/// The answers an authority gives within a session.
// AliveObserved carries a label, a key and a value inline: without a heap there is nothing to
// box them in, and a reply lives only between the authority and the transport.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub enum SessionReply {
    /// A session was opened: it lives for `ttl` from the moment the authority acted.
    Opened {
        /// Its id.
        session: SessionId,
        /// Its credential; keep it to yourself.
        secret: Secret,
        /// The ttl granted; may be shorter than requested.
        ttl: Duration,
    },
    /// A keepalive renewed the session for `ttl` from the moment the authority acted.
    Alive {
        /// The session's ttl.
        ttl: Duration,
        /// A grant made to the session that it has not confirmed yet (pushed hand-off).
        granted: Option<Grant>,
        /// More such grants are waiting: keep alive again at once to hear of them.
        more: bool,
    },
    /// The key is the session's under `fence` for as long as the session lives.
    Granted {
        /// The key.
        key: Key,
        /// Its fence (for a key already held: unchanged).
        fence: Fence,
    },
    /// The key is held; the session waits at `position` (1: next) and is told of the grant
    /// in a later [`SessionReply::Alive`].
    Queued {
        /// The key.
        key: Key,
        /// Place in the queue, 1 being the head.
        position: u16,
    },
    /// The key is held by another session for at least `expires_in` more (unless released);
    /// for a semaphore, every slot is, the first to end in at least `expires_in`.
    Busy {
        /// The key.
        key: Key,
        /// The holder's session's remaining time on the authority's clock.
        expires_in: Duration,
    },
    /// The release (or the end of the wait) took effect.
    Released {
        /// The key.
        key: Key,
    },
    /// A release of a grant that is not (or no longer) the session's.
    NotHolder {
        /// The key.
        key: Key,
    },
    /// The session is closed.
    Closed,
    /// No such session: it expired, was closed, or never existed.
    Expired,
    /// The seq was seen already or is too old to tell: the request was ignored.
    Replayed,
    /// The request can never succeed as sent.
    Rejected(Reject),
    /// [`Alive`](SessionReply::Alive), with a change of an observed key the session has not
    /// acknowledged yet (the oldest the authority still has).
    AliveObserved {
        /// The session's ttl.
        ttl: Duration,
        /// As in [`Alive`](SessionReply::Alive).
        granted: Option<Grant>,
        /// More grants or changes are waiting: keep alive again at once to hear of them.
        more: bool,
        /// The change.
        observed: Observed,
    },
    /// The session observes the key; its current state comes in a keepalive's reply.
    Observing {
        /// The key.
        key: Key,
    },
    /// The session no longer observes the key.
    Unobserved {
        /// The key.
        key: Key,
    },
}

/// The longest value a holder may set, in bytes.
pub const MAX_VALUE_LEN: usize = 64;

/// What a holder tells observers of its key (an address, a port, a version): at most
/// [`MAX_VALUE_LEN`] bytes of printable ASCII, so status lines and JSON show it as it is.
pub type Value = heapless::String<MAX_VALUE_LEN>;

/// Why a value is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ValueError {
    /// The value is longer than [`MAX_VALUE_LEN`] bytes.
    TooLong,
    /// The value has a byte outside printable ASCII at this index.
    BadByte(usize),
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueError::TooLong => write!(f, "value is longer than {MAX_VALUE_LEN} bytes"),
            ValueError::BadByte(i) => write!(f, "value has a byte outside printable ASCII at byte {i}"),
        }
    }
}

impl core::error::Error for ValueError {}

/// Checks a value: at most [`MAX_VALUE_LEN`] bytes of printable ASCII (space to `~`).
pub fn parse_value(s: &str) -> Result<Value, ValueError> {
    if s.len() > MAX_VALUE_LEN {
        return Err(ValueError::TooLong);
    }
    if let Some(i) = s.bytes().position(|b| !(b' '..=b'~').contains(&b)) {
        return Err(ValueError::BadByte(i));
    }
    let mut value = Value::new();
    // Cannot fail: the length was checked above.
    let _ = value.push_str(s);
    Ok(value)
}

/// A key's holder as observers are told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct ObservedHolder {
    /// The holding session.
    pub session: SessionId,
    /// Its label.
    pub label: Label,
    /// The grant's fence.
    pub fence: Fence,
    /// The value the holder acquired with (empty if none).
    pub value: Value,
}

/// One change of an observed key's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Observed {
    /// The key.
    pub key: Key,
    /// The change's number, counted per key from 1 since the key's first observer: an
    /// observer that receives change `n + 2` after `n` knows it missed one (the authority
    /// keeps the last [`OBSERVED_HISTORY`] changes of each key for observers that lag).
    pub change: u64,
    /// The holder after the change, or `None`: the key became free.
    pub holder: Option<ObservedHolder>,
}

/// How many changes of each observed key the authority keeps for observers that have not
/// acknowledged them yet; an observer further behind is reported the oldest kept.
pub const OBSERVED_HISTORY: usize = 8;

//! What travels between a lease holder and the authority.
//!
//! These types are the protocol, not an encoding: the serial link carries them as postcard,
//! the HTTP adapter maps them to JSON or to a store's own API. postcard is not
//! self-describing, so variants are only ever appended and fields never reordered.
//!
//! A [`Request`] carries no key: one [`Lease`](crate::Lease) serves one key, and the adapter that
//! drives it adds the key when it addresses the request, as a socket adds the destination.

use core::fmt;

use crate::time::Duration;

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;

/// A lease key, bounded so it fits a device's buffers.
pub type Key = heapless::String<MAX_KEY_LEN>;

/// A fence token: strictly increasing per key over every grant the authority ever makes,
/// across restarts. A resource that remembers the highest fence it has seen and refuses lower
/// ones cannot be written by a holder that has silently lost its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Fence(pub u64);

impl Fence {
    /// No grant yet. The first grant of a key is fence 1.
    pub const NONE: Fence = Fence(0);

    /// The fence after this one, or `None` when the counter is exhausted.
    pub const fn next(self) -> Option<Fence> {
        match self.0.checked_add(1) {
            Some(n) => Some(Fence(n)),
            None => None,
        }
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who asks. Unique per lease incarnation: a process that restarts takes a new one, so it
/// cannot renew a grant it no longer remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct OwnerId(pub u64);

/// Decimal, as the built-in server's JSON, etcd's values and DynamoDB's items store it, so an
/// id printed by one tool can be looked up in the others as it is.
impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Matches a [`Response`] to the [`Request`] it answers. Only the newest request of a lease is
/// ever believed; replies to older ones are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RequestId(pub u32);

/// A request from a holder (or would-be holder) to the authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Request {
    /// Echoed in the response.
    pub id: RequestId,
    /// The asking lease.
    pub owner: OwnerId,
    /// What is asked.
    pub op: Op,
}

/// The operations a holder asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub enum Op {
    /// Grant the key to me if it is free (or already mine), with a new fence.
    Acquire {
        /// Requested lease length.
        ttl: Duration,
    },
    /// Compare-and-set stores: grant the key to me if its record is still at `version`, which
    /// I observed and then waited out. Server-timed authorities treat it as [`Op::Acquire`].
    Takeover {
        /// The record version observed in [`Reply::Observed`].
        version: u64,
        /// Requested lease length.
        ttl: Duration,
    },
    /// Extend my grant of `fence` by `ttl` from now.
    Renew {
        /// The fence being renewed.
        fence: Fence,
        /// Requested extension.
        ttl: Duration,
    },
    /// Give up my grant of `fence`. Idempotent.
    Release {
        /// The fence being released.
        fence: Fence,
    },
}

/// The authority's answer to the request with the same id and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct Response {
    /// The id of the request answered.
    pub id: RequestId,
    /// The owner of the request answered. A lease ignores replies to any other owner, so a
    /// restarted holder cannot mistake its previous incarnation's late reply for its own.
    pub owner: OwnerId,
    /// The answer.
    pub reply: Reply,
}

/// The answers an authority gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub enum Reply {
    /// Acquire, takeover or renewal succeeded: the key is mine under `fence` for `ttl` from the
    /// moment the authority acted (the holder counts from when it sent the request).
    Granted {
        /// The fence of the grant (for a renewal: unchanged).
        fence: Fence,
        /// The ttl granted; may be shorter than requested.
        ttl: Duration,
    },
    /// Server-timed authority: someone else holds the key; ask again after `retry_after`.
    Busy {
        /// The authority's estimate of the holder's remaining time.
        retry_after: Duration,
    },
    /// Compare-and-set store: the record is held at `version` with lease length `ttl`. Wait
    /// `ttl·(1+ε)` from receiving this, then send [`Op::Takeover`] of that version.
    Observed {
        /// The record's version as read.
        version: u64,
        /// The holder's lease length as recorded.
        ttl: Duration,
    },
    /// Renew or release of a grant that is not (or no longer) the asker's.
    NotHolder,
    /// The release took effect.
    Released,
    /// The request can never succeed as sent.
    Rejected(Reject),
    /// A transient failure (throttled, overloaded, store unreachable): retry later.
    Unavailable,
    /// Like [`Reply::Granted`], and the previous holder's lease ended by *expiry*, not by
    /// release: it may have stopped half-way through its work, so the new holder should run
    /// recovery before trusting the resource's state. [`Reply::Granted`] means the key was
    /// free, released, or already the asker's, or that the authority cannot tell.
    ///
    /// A variant of its own, appended, rather than a field of `Granted`: postcard encodings of
    /// every existing reply stay byte-for-byte the same.
    GrantedAfterExpiry {
        /// The fence of the new grant.
        fence: Fence,
        /// The ttl granted; may be shorter than requested.
        ttl: Duration,
    },
}

impl Reply {
    /// The fence and ttl of a grant ([`Reply::Granted`] or [`Reply::GrantedAfterExpiry`]).
    pub const fn grant(&self) -> Option<(Fence, Duration)> {
        match *self {
            Reply::Granted { fence, ttl } | Reply::GrantedAfterExpiry { fence, ttl } => Some((fence, ttl)),
            _ => None,
        }
    }
}

/// Why an authority refuses a request outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Reject {
    /// The ttl is zero, too short or too long for this authority.
    InvalidTtl,
    /// The key is empty, too long or has characters outside `[A-Za-z0-9._:/-]`.
    InvalidKey,
    /// Missing or wrong credentials.
    Unauthorized,
    /// The request could not be parsed.
    Malformed,
    /// The authority speaks another protocol version.
    UnsupportedVersion,
    /// The authority cannot track more keys.
    Capacity,
    /// The key's fence counter reached its maximum.
    FenceExhausted,
    /// The authority is misconfigured (for example, a missing table).
    Misconfigured,
    /// The key is held or awaited under another holder limit (a semaphore's size): every
    /// holder and waiter of a key must ask for the same.
    LimitMismatch,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reject::InvalidTtl => "ttl out of the authority's accepted range",
            Reject::InvalidKey => {
                "key is empty, longer than 64 bytes, or has characters outside [A-Za-z0-9._:/-]"
            }
            Reject::Unauthorized => "missing or wrong credentials",
            Reject::Malformed => "request could not be parsed",
            Reject::UnsupportedVersion => "unsupported protocol version",
            Reject::Capacity => "authority cannot track more keys",
            Reject::FenceExhausted => "fence counter exhausted",
            Reject::Misconfigured => "authority is misconfigured",
            Reject::LimitMismatch => "key is held or awaited under another holder limit",
        })
    }
}

/// Why a key is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    TooLong,
    /// The key has a byte outside `[A-Za-z0-9._:/-]` at this index.
    BadByte(usize),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("key is empty"),
            KeyError::TooLong => write!(f, "key is longer than {MAX_KEY_LEN} bytes"),
            KeyError::BadByte(i) => write!(f, "key has a character outside [A-Za-z0-9._:/-] at byte {i}"),
        }
    }
}

impl core::error::Error for KeyError {}

/// Checks a key and returns it as a bounded [`Key`]. The character set keeps keys safe in
/// URLs, file names and shell commands without escaping.
pub fn parse_key(s: &str) -> Result<Key, KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    if s.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if let Some(i) =
        s.bytes().position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-')))
    {
        return Err(KeyError::BadByte(i));
    }
    let mut key = Key::new();
    // Cannot fail: the length was checked above.
    let _ = key.push_str(s);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_ids_print_in_decimal_as_every_store_keeps_them() {
        let shown = |o: OwnerId| {
            let mut s = heapless::String::<20>::new();
            fmt::Write::write_fmt(&mut s, format_args!("{o}")).unwrap();
            s
        };
        assert_eq!(shown(OwnerId(255)), "255");
        assert_eq!(shown(OwnerId(u64::MAX)), "18446744073709551615");
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(parse_key("pump").unwrap().as_str(), "pump");
        assert_eq!(parse_key("a/b:c.d-e_f9").unwrap().as_str(), "a/b:c.d-e_f9");
        assert_eq!(parse_key(""), Err(KeyError::Empty));
        assert_eq!(parse_key(&"k".repeat(65)), Err(KeyError::TooLong));
        assert!(parse_key(&"k".repeat(64)).is_ok());
        assert_eq!(parse_key("a b"), Err(KeyError::BadByte(1)));
        assert_eq!(parse_key("é"), Err(KeyError::BadByte(0)));
    }

    #[test]
    fn fence_counter_does_not_wrap() {
        assert_eq!(Fence::NONE.next(), Some(Fence(1)));
        assert_eq!(Fence(u64::MAX).next(), None);
    }
}

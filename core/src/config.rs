//! Lease timing: how long a grant lasts, when to renew, and how much the clocks may disagree.

use core::fmt;

use crate::time::{Duration, Instant};

/// One million, the denominator of [`Drift`].
const PPM: u64 = 1_000_000;

/// The longest lease the machine accepts: one day. Longer leases make a crashed holder block
/// everyone for longer than any operator would want, and hint at a unit mistake.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest supported clock-rate disagreement ε: 10 % (100 000 ppm).
pub const MAX_DRIFT: Drift = Drift(100_000);

/// ε: a bound on how fast any party's clock may run relative to any other party's.
///
/// While one party's clock advances by `T`, every other party's clock advances by at most
/// `T·(1+ε)` (and so by at least `T/(1+ε)`). Only rates are bounded; the clocks need no common
/// origin and are never synchronised. Stored in parts per million: quartz is typically within
/// 100 ppm, virtual machines and cheap RC oscillators much worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Drift(u32);

impl Drift {
    /// ε as parts per million.
    pub const fn from_ppm(ppm: u32) -> Self {
        Drift(ppm)
    }
    /// ε as parts per million.
    pub const fn as_ppm(self) -> u32 {
        self.0
    }
    /// `d·(1−ε)`, rounded down: the most of a span one may count on another party's clock.
    pub const fn shrink(self, d: Duration) -> Duration {
        d.mul_div_floor(PPM.saturating_sub(self.0 as u64), PPM)
    }
    /// `d·(1+ε)`, rounded up: enough local time that another party's clock has surely run `d`.
    pub const fn stretch(self, d: Duration) -> Duration {
        d.mul_div_ceil(PPM + self.0 as u64, PPM)
    }
}

/// Deliberately broken timing, so tests can prove the simulator's checker catches it.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Fault {
    /// Correct behaviour.
    #[default]
    None,
    /// Anchor validity at the moment the reply was *received* (the classic bug).
    AnchorAtReceive,
    /// Trust the ttl in full, as if clocks could not drift.
    IgnoreDrift,
}

/// Timing of one lease. Build with [`Config::new`], adjust the public fields, and let
/// [`Lease::new`](crate::Lease::new) (or [`Config::validate`]) check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Config {
    /// How long the authority keeps a grant without renewal.
    pub ttl: Duration,
    /// Send a renewal this long after the request that granted or last renewed the lease was
    /// *sent*.
    pub renew_every: Duration,
    /// ε, the clock-rate bound between any two parties.
    pub drift: Drift,
    /// Extra time given up at the end of every validity window and added to every
    /// observe-and-wait, on top of what ε requires: room for the caller to act on `remaining()`.
    pub margin: Duration,
    /// A request with no reply after this long is presumed lost and retried.
    pub request_timeout: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub backoff_min: Duration,
    /// Cap on the retry delay.
    pub backoff_max: Duration,
    /// Seed for retry jitter, so that a run replays exactly. Mixed with the owner id.
    pub jitter_seed: u64,
    /// Test-only deliberate bug; see [`Fault`].
    #[cfg(feature = "fault-injection")]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub fault: Fault,
}

/// Why a [`Config`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigError {
    /// The ttl is zero.
    ZeroTtl,
    /// The ttl is longer than [`MAX_TTL`].
    TtlTooLong,
    /// ε is larger than [`MAX_DRIFT`].
    DriftTooLarge,
    /// `ttl·(1−ε) − margin` leaves no validity at all.
    NoValidity,
    /// The renewal interval is zero.
    ZeroRenewInterval,
    /// A renewal sent at `renew_every` and timing out after `request_timeout` would not be
    /// answered before the local validity ends: there is no room to renew.
    RenewTooLate,
    /// The request timeout is zero.
    ZeroRequestTimeout,
    /// `backoff_min` is zero or larger than `backoff_max`.
    BadBackoff,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::ZeroTtl => "ttl must be greater than zero",
            ConfigError::TtlTooLong => "ttl must be at most one day",
            ConfigError::DriftTooLarge => "clock drift bound must be at most 10% (100000 ppm)",
            ConfigError::NoValidity => "ttl*(1-drift) - margin leaves no validity",
            ConfigError::ZeroRenewInterval => "renewal interval must be greater than zero",
            ConfigError::RenewTooLate => {
                "renewal interval plus request timeout must end before the local validity does"
            }
            ConfigError::ZeroRequestTimeout => "request timeout must be greater than zero",
            ConfigError::BadBackoff => "backoff must satisfy 0 < backoff_min <= backoff_max",
        })
    }
}

impl core::error::Error for ConfigError {}

impl Config {
    /// Defaults for a lease of `ttl`: renew every ttl/3, ε = 1 %, margin ttl/100, request
    /// timeout ttl/6, retry backoff from ttl/64 to ttl/8. Call [`Config::validate`] (or let
    /// [`Lease::new`](crate::Lease::new) do it) after changing anything.
    pub const fn new(ttl: Duration) -> Self {
        Config {
            ttl,
            renew_every: ttl.mul_div_floor(1, 3),
            drift: Drift::from_ppm(10_000),
            margin: ttl.mul_div_floor(1, 100),
            request_timeout: ttl.mul_div_floor(1, 6),
            backoff_min: ttl.mul_div_floor(1, 64),
            backoff_max: ttl.mul_div_floor(1, 8),
            jitter_seed: 0,
            #[cfg(feature = "fault-injection")]
            fault: Fault::None,
        }
    }

    /// Checks that the timing can keep its safety promise and still renew in time.
    pub const fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::ZeroTtl);
        }
        if self.ttl.as_micros() > MAX_TTL.as_micros() {
            return Err(ConfigError::TtlTooLong);
        }
        if self.drift.0 > MAX_DRIFT.0 {
            return Err(ConfigError::DriftTooLarge);
        }
        let validity = self.validity(self.ttl);
        if validity.is_zero() {
            return Err(ConfigError::NoValidity);
        }
        if self.renew_every.is_zero() {
            return Err(ConfigError::ZeroRenewInterval);
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::ZeroRequestTimeout);
        }
        if self.renew_every.saturating_add(self.request_timeout).as_micros() >= validity.as_micros() {
            return Err(ConfigError::RenewTooLate);
        }
        if self.backoff_min.is_zero() || self.backoff_min.as_micros() > self.backoff_max.as_micros() {
            return Err(ConfigError::BadBackoff);
        }
        Ok(())
    }

    /// How long after *sending* a granting request the holder may rely on a grant of `ttl`:
    /// `ttl·(1−ε) − margin`.
    pub const fn validity(&self, ttl: Duration) -> Duration {
        #[cfg(feature = "fault-injection")]
        if matches!(self.fault, Fault::IgnoreDrift) {
            return ttl;
        }
        self.drift.shrink(ttl).saturating_sub(self.margin)
    }

    /// Where a grant's validity is counted from: the send time of the request that obtained
    /// it (in tests, optionally the reply's receipt: the classic bug the simulator must catch).
    #[allow(unused_variables)]
    pub(crate) fn anchor(&self, sent_at: Instant, received_at: Instant) -> Instant {
        #[cfg(feature = "fault-injection")]
        if matches!(self.fault, Fault::AnchorAtReceive) {
            return received_at;
        }
        sent_at
    }

    /// How long after *receiving* an observation "held at version v with ttl d" a contender
    /// must wait before a takeover of v is safe: `d·(1+ε) + margin`.
    pub const fn observe_wait(&self, d: Duration) -> Duration {
        #[cfg(feature = "fault-injection")]
        if matches!(self.fault, Fault::IgnoreDrift) {
            return d;
        }
        self.drift.stretch(d).saturating_add(self.margin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_across_sane_ttls() {
        for ms in [10, 100, 1_000, 15_000, 3_600_000] {
            assert_eq!(Config::new(Duration::from_millis(ms)).validate(), Ok(()), "{ms}ms");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = Config::new(Duration::from_secs(15));
        let with = |f: fn(&mut Config)| {
            let mut c = ok;
            f(&mut c);
            c.validate()
        };
        assert_eq!(with(|c| c.ttl = Duration::ZERO), Err(ConfigError::ZeroTtl));
        assert_eq!(with(|c| c.ttl = Duration::from_secs(86_401)), Err(ConfigError::TtlTooLong));
        assert_eq!(with(|c| c.drift = Drift::from_ppm(100_001)), Err(ConfigError::DriftTooLarge));
        assert_eq!(with(|c| c.margin = Duration::from_secs(15)), Err(ConfigError::NoValidity));
        assert_eq!(with(|c| c.renew_every = Duration::ZERO), Err(ConfigError::ZeroRenewInterval));
        assert_eq!(with(|c| c.renew_every = Duration::from_secs(13)), Err(ConfigError::RenewTooLate));
        assert_eq!(with(|c| c.request_timeout = Duration::ZERO), Err(ConfigError::ZeroRequestTimeout));
        assert_eq!(with(|c| c.backoff_min = Duration::ZERO), Err(ConfigError::BadBackoff));
        assert_eq!(with(|c| c.backoff_max = Duration::from_micros(1)), Err(ConfigError::BadBackoff));
    }

    #[test]
    fn validity_and_wait_bracket_the_ttl() {
        let mut c = Config::new(Duration::from_secs(10));
        c.margin = Duration::ZERO;
        c.drift = Drift::from_ppm(10_000);
        assert_eq!(c.validity(c.ttl), Duration::from_millis(9_900));
        assert_eq!(c.observe_wait(c.ttl), Duration::from_millis(10_100));
    }
}

//! Property tests: arbitrary inputs into one `Lease`.

use leasehold_core::{
    Config, Duration, Fence, Health, Instant, Lease, Op, OwnerId, Reject, Reply, Request, RequestId,
    Response, State,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Input {
    Acquire,
    TryAcquire,
    AcquireUntil(u64),
    Release,
    /// Let time pass and fire the timer if due.
    Advance(u64),
    /// A spurious timer call.
    Timeout,
    /// Answer the n-th most recent request.
    Respond(usize, Reply),
    /// The n-th most recent request failed in transport.
    TransportError(usize),
    /// A reply to a request nobody sent, possibly for another owner.
    Forged(u32, u64, Reply),
}

fn reply() -> impl Strategy<Value = Reply> {
    let duration = prop_oneof![
        Just(Duration::ZERO),
        (0u64..20_000_000).prop_map(Duration::from_micros),
        Just(Duration::MAX),
    ];
    let fence = (0u64..6).prop_map(Fence);
    prop_oneof![
        (fence, duration.clone()).prop_map(|(fence, ttl)| Reply::Granted { fence, ttl }),
        duration.clone().prop_map(|retry_after| Reply::Busy { retry_after }),
        (any::<u64>(), duration).prop_map(|(version, ttl)| Reply::Observed { version, ttl }),
        Just(Reply::NotHolder),
        Just(Reply::Released),
        Just(Reply::Rejected(Reject::InvalidTtl)),
        Just(Reply::Unavailable),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        2 => Just(Input::Acquire),
        1 => Just(Input::TryAcquire),
        1 => (0u64..30_000_000).prop_map(Input::AcquireUntil),
        1 => Just(Input::Release),
        4 => prop_oneof![0u64..100_000, 0u64..20_000_000, Just(u64::MAX / 4)].prop_map(Input::Advance),
        1 => Just(Input::Timeout),
        6 => (0usize..3, reply()).prop_map(|(n, r)| Input::Respond(n, r)),
        1 => (0usize..3).prop_map(Input::TransportError),
        1 => (any::<u32>(), prop_oneof![Just(7u64), any::<u64>()], reply()).prop_map(|(id, o, r)| Input::Forged(id, o, r)),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (100u64..60_000, 0u32..=100_000, any::<u64>()).prop_map(|(ttl_ms, ppm, seed)| {
        let mut c = Config::new(Duration::from_millis(ttl_ms));
        c.drift = leasehold_core::Drift::from_ppm(ppm);
        c.jitter_seed = seed;
        c
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Never panics; belief never outlives `ttl·(1−ε) − margin` past the newest granting send;
    /// after every drain the timer is never in the past, and pending work always has a timer.
    #[test]
    fn arbitrary_inputs_keep_the_contract(config in config(), inputs in prop::collection::vec(input(), 1..80)) {
        let mut lease = Lease::new(OwnerId(7), config).unwrap();
        let mut now = Instant::from_secs(1);
        let mut sent: Vec<(Request, Instant)> = Vec::new();
        let mut last_granting_send: Option<Instant> = None;
        let validity = config.validity(config.ttl);

        for input in inputs {
            match input {
                Input::Acquire => { let _ = lease.acquire(now); }
                Input::TryAcquire => { let _ = lease.try_acquire(now); }
                Input::AcquireUntil(d) => { let _ = lease.acquire_until(now, now + Duration::from_micros(d)); }
                Input::Release => { let _ = lease.release(now); }
                Input::Advance(d) => {
                    now += Duration::from_micros(d);
                    if lease.poll_timeout().is_some_and(|t| t <= now) {
                        lease.handle_timeout(now);
                    }
                }
                Input::Timeout => lease.handle_timeout(now),
                Input::Respond(n, reply) => {
                    if let Some((r, _)) = sent.iter().rev().nth(n) {
                        lease.handle_response(now, Response { id: r.id, owner: r.owner, reply });
                    }
                }
                Input::TransportError(n) => {
                    if let Some((r, _)) = sent.iter().rev().nth(n) {
                        lease.handle_transport_error(now, r.id);
                    }
                }
                Input::Forged(id, owner, reply) => {
                    lease.handle_response(now, Response { id: RequestId(id), owner: OwnerId(owner), reply });
                }
            }
            // Drain.
            while let Some(r) = lease.poll_transmit() {
                if matches!(r.op, Op::Acquire { .. } | Op::Takeover { .. } | Op::Renew { .. }) {
                    last_granting_send = Some(now);
                }
                sent.push((r, now));
            }
            while lease.poll_event().is_some() {}

            if let Some(rem) = lease.remaining(now) {
                let s = last_granting_send.expect("believes without ever having asked");
                prop_assert!(now + rem <= s + validity,
                    "belief until {} exceeds newest granting send {} + validity {}", now + rem, s, validity);
                prop_assert!(lease.fence().is_some());
            }
            match lease.poll_timeout() {
                Some(t) => prop_assert!(t >= now, "timer {} in the past at {}", t, now),
                None => prop_assert!(lease.state() == State::Idle, "{:?} with no timer", lease.state()),
            }
            if lease.state() == State::Held && lease.remaining(now).is_none() {
                // Held past validity only until the next call notices: the timer must be due.
                prop_assert!(lease.poll_timeout().is_some_and(|t| t <= now));
                prop_assert_eq!(lease.health(now), Health::Lost);
            }
        }
    }
}

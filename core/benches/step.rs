//! One event step: a renewal reply handled and the machine drained.
use criterion::{criterion_group, criterion_main, Criterion};
use leasehold_core::{Config, Duration, Fence, Instant, Lease, OwnerId, Reply, Response};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let ttl = Duration::from_secs(15);
    let mut lease = Lease::new(OwnerId(1), Config::new(ttl)).unwrap();
    let mut now = Instant::from_secs(1);
    lease.acquire(now).unwrap();
    let req = lease.poll_transmit().unwrap();
    lease.handle_response(
        now,
        Response { id: req.id, owner: req.owner, reply: Reply::Granted { fence: Fence(1), ttl } },
    );
    while lease.poll_event().is_some() {}

    // Steady state of a holder: timer fires, renewal goes out, reply comes back.
    c.bench_function("renew_cycle: handle_timeout + poll_transmit + handle_response + drain", |b| {
        b.iter(|| {
            now = lease.poll_timeout().unwrap();
            lease.handle_timeout(black_box(now));
            let req = lease.poll_transmit().unwrap();
            lease.handle_response(
                now,
                black_box(Response {
                    id: req.id,
                    owner: req.owner,
                    reply: Reply::Granted { fence: Fence(1), ttl },
                }),
            );
            while let Some(e) = lease.poll_event() {
                black_box(e);
            }
            black_box(lease.poll_timeout())
        })
    });

    c.bench_function("handle_response (stale id) + drain", |b| {
        b.iter(|| {
            lease.handle_response(
                now,
                black_box(Response {
                    id: leasehold_core::RequestId(u32::MAX),
                    owner: OwnerId(1),
                    reply: Reply::Unavailable,
                }),
            );
            while let Some(e) = lease.poll_event() {
                black_box(e);
            }
            black_box(lease.poll_timeout())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

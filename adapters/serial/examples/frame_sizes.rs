//! Prints the encoded size of typical frames, delimiters included.
//!
//! `cargo run -p leasehold-serial --example frame_sizes`

use leasehold_core::session::wire::{
    parse_label, Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{parse_key, Duration, Fence, Op, OwnerId, Reply, Request, RequestId, Response};
use leasehold_serial::{Body, Frame, MAX_FRAME};

fn size(frame: &Frame) -> usize {
    let mut buf = [0u8; MAX_FRAME];
    frame.encode(&mut buf).map(<[u8]>::len).unwrap_or(usize::MAX)
}

fn main() {
    let ttl = Duration::from_secs(5);
    let fence = Fence(3);
    // Typical: a short key, small ids, a device id under 128, a 5 s ttl.
    let typical = [
        ("acquire request", Op::Acquire { ttl }),
        ("renew request", Op::Renew { fence, ttl }),
        ("release request", Op::Release { fence }),
    ];
    println!("frame                        key 'pump'  key 64 bytes, max ids");
    let long_key = parse_key(&"k".repeat(64)).expect("64 key bytes are allowed");
    for (name, op) in typical {
        let small = Request { id: RequestId(12), owner: OwnerId(0xd1), op };
        let big = Request { id: RequestId(u32::MAX), owner: OwnerId(u64::MAX), op: max(op) };
        let a =
            Frame::new(12, 7, Body::Request { key: parse_key("pump").expect("valid key"), request: small });
        let b = Frame::new(u16::MAX, u32::MAX, Body::Request { key: long_key.clone(), request: big });
        println!("{name:<28} {:>9}  {:>21}", size(&a), size(&b));
    }
    let replies = [
        ("granted response", Reply::Granted { fence, ttl }),
        ("released response", Reply::Released),
        ("busy response", Reply::Busy { retry_after: ttl }),
    ];
    for (name, reply) in replies {
        let a =
            Frame::new(12, 7, Body::Response(Response { id: RequestId(12), owner: OwnerId(0xd1), reply }));
        let big = Response { id: RequestId(u32::MAX), owner: OwnerId(u64::MAX), reply: max_reply(reply) };
        let b = Frame::new(u16::MAX, u32::MAX, Body::Response(big));
        println!("{name:<28} {:>9}  {:>21}", size(&a), size(&b));
    }
    let takeover = Request {
        id: RequestId(u32::MAX),
        owner: OwnerId(u64::MAX),
        op: Op::Takeover { version: u64::MAX, ttl: Duration::from_micros(u64::MAX) },
    };
    let worst = Frame::new(u16::MAX, u32::MAX, Body::Request { key: long_key, request: takeover });
    println!("largest possible v1 frame: {} bytes", size(&worst));
    sessions();
}

/// Protocol v2 frames: typical (session 3, seq 40, key 'pump') and at their largest.
fn sessions() {
    let pump = parse_key("pump").expect("valid key");
    let long_key = parse_key(&"k".repeat(64)).expect("64 key bytes are allowed");
    let secret = Secret::from_bytes([0x5a; 16]);
    let max = Duration::from_micros(u64::MAX);
    let ttl = Duration::from_secs(5);
    let request = |session, seq, op| Body::SessionRequest(SessionRequest { session, secret, seq, op });
    let requests = [
        (
            "session open",
            SessionOp::Open { ttl, label: parse_label("pump-1").expect("label") },
            SessionOp::Open { ttl: max, label: parse_label(&"l".repeat(32)).expect("label") },
        ),
        ("session keepalive (all keys)", SessionOp::KeepAlive, SessionOp::KeepAlive),
        (
            "session acquire (wait)",
            SessionOp::Acquire { key: pump.clone(), wait: true },
            SessionOp::Acquire { key: long_key.clone(), wait: true },
        ),
        (
            "session release",
            SessionOp::Release { key: pump.clone(), fence: Fence(3) },
            SessionOp::Release { key: long_key.clone(), fence: Fence(u64::MAX) },
        ),
    ];
    for (name, small, big) in requests {
        let a = Frame::new(12, 7, request(SessionId(3), Seq(40), small));
        let b = Frame::new(u16::MAX, u32::MAX, request(SessionId(u64::MAX), Seq(u64::MAX), big));
        println!("{name:<28} {:>9}  {:>21}", size(&a), size(&b));
    }
    let response = |session, seq, reply| Body::SessionResponse(SessionResponse { session, seq, reply });
    let replies = [
        (
            "session opened",
            SessionReply::Opened { session: SessionId(3), secret, ttl },
            SessionReply::Opened { session: SessionId(u64::MAX), secret, ttl: max },
        ),
        (
            "session alive",
            SessionReply::Alive { ttl, granted: None, more: false },
            SessionReply::Alive { ttl: max, granted: None, more: false },
        ),
        (
            "session alive + pushed grant",
            SessionReply::Alive {
                ttl,
                granted: Some(Grant { key: pump.clone(), fence: Fence(3), asked: Seq(38) }),
                more: false,
            },
            SessionReply::Alive {
                ttl: max,
                granted: Some(Grant { key: long_key.clone(), fence: Fence(u64::MAX), asked: Seq(u64::MAX) }),
                more: true,
            },
        ),
        (
            "session granted",
            SessionReply::Granted { key: pump.clone(), fence: Fence(3) },
            SessionReply::Granted { key: long_key, fence: Fence(u64::MAX) },
        ),
    ];
    for (name, small, big) in replies {
        let a = Frame::new(12, 7, response(SessionId(3), Seq(40), small));
        let b = Frame::new(u16::MAX, u32::MAX, response(SessionId(u64::MAX), Seq(u64::MAX), big));
        println!("{name:<28} {:>9}  {:>21}", size(&a), size(&b));
    }
    let why = leasehold_serial::SessionRefusal::WrongLink;
    let refused = Frame::new(12, 7, Body::SessionRefused { session: SessionId(3), seq: Seq(40), why });
    println!("{:<28} {:>9}", "session refused (any reason)", size(&refused));
    println!("MAX_FRAME = {MAX_FRAME}");
}

fn max(op: Op) -> Op {
    let ttl = Duration::from_micros(u64::MAX);
    match op {
        Op::Acquire { .. } => Op::Acquire { ttl },
        Op::Renew { .. } => Op::Renew { fence: Fence(u64::MAX), ttl },
        Op::Release { .. } => Op::Release { fence: Fence(u64::MAX) },
        other => other,
    }
}

fn max_reply(reply: Reply) -> Reply {
    let ttl = Duration::from_micros(u64::MAX);
    match reply {
        Reply::Granted { .. } => Reply::Granted { fence: Fence(u64::MAX), ttl },
        Reply::Busy { .. } => Reply::Busy { retry_after: ttl },
        other => other,
    }
}

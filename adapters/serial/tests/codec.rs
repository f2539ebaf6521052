//! Wire encoding: golden bytes, round trips, resynchronisation.

use leasehold_core::session::wire::{
    parse_label, Grant, Secret, Seq, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::{parse_key, Duration, Fence, Op, OwnerId, Reject, Reply, Request, RequestId, Response};
use leasehold_serial::{Body, DecodeError, Frame, FrameDecoder, Header, SessionRefusal, MAX_FRAME};
use proptest::prelude::*;

fn acquire_frame() -> Frame {
    let request =
        Request { id: RequestId(1), owner: OwnerId(7), op: Op::Acquire { ttl: Duration::from_secs(5) } };
    Frame::new(1, 42, Body::Request { key: parse_key("pump").unwrap(), request })
}

fn granted_frame() -> Frame {
    let response = Response {
        id: RequestId(1),
        owner: OwnerId(7),
        reply: Reply::Granted { fence: Fence(3), ttl: Duration::from_secs(5) },
    };
    Frame::new(1, 42, Body::Response(response))
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME];
    f.encode(&mut buf).unwrap().to_vec()
}

fn decode_all(bytes: &[u8]) -> (Vec<Result<Frame, DecodeError>>, FrameDecoder) {
    let mut d = FrameDecoder::new();
    let out = bytes.iter().filter_map(|&b| d.push(b)).collect();
    (out, d)
}

/// Pinned: postcard is not self-describing, so any change here breaks deployed devices.
#[test]
fn golden_bytes() {
    assert_eq!(
        encode(&acquire_frame()),
        [0, 4, 1, 1, 42, 8, 4, b'p', b'u', b'm', b'p', 1, 7, 5, 0xc0, 0x96, 0xb1, 2, 0]
    );
    assert_eq!(encode(&granted_frame()), [0, 7, 1, 1, 42, 1, 1, 7, 6, 3, 0xc0, 0x96, 0xb1, 2, 0]);
    let mismatch = Frame::new(9, 42, Body::VersionMismatch { supported: 1 });
    assert_eq!(encode(&mismatch), [0, 6, 1, 9, 42, 2, 1, 0]);
    assert_eq!(
        encode(&request_frame(2, Op::Renew { fence: Fence(3), ttl: Duration::from_secs(5) })),
        [0, 4, 1, 2, 42, 14, 4, b'p', b'u', b'm', b'p', 2, 7, 2, 3, 0xc0, 0x96, 0xb1, 2, 0]
    );
    assert_eq!(
        encode(&request_frame(3, Op::Release { fence: Fence(3) })),
        [0, 4, 1, 3, 42, 10, 4, b'p', b'u', b'm', b'p', 3, 7, 3, 3, 0]
    );
    assert_eq!(encode(&response_frame(3, Reply::Released)), [0, 8, 1, 3, 42, 1, 3, 7, 4, 0]);
    assert_eq!(
        encode(&response_frame(1, Reply::Busy { retry_after: Duration::from_millis(250) })),
        [0, 11, 1, 1, 42, 1, 1, 7, 1, 0x90, 0xa1, 0x0f, 0]
    );
    assert_eq!(
        encode(&response_frame(1, Reply::Rejected(Reject::UnsupportedVersion))),
        [0, 9, 1, 1, 42, 1, 1, 7, 5, 4, 0]
    );
    // Appended in the fencing work (variant 7): every encoding above is unchanged by it.
    assert_eq!(
        encode(&response_frame(
            1,
            Reply::GrantedAfterExpiry { fence: Fence(3), ttl: Duration::from_secs(5) }
        )),
        [0, 13, 1, 1, 42, 1, 1, 7, 7, 3, 0xc0, 0x96, 0xb1, 2, 0]
    );
    // Multi-byte varints in the header: seq 300, device 70000.
    let mut f = response_frame(1, Reply::NotHolder);
    f.header.seq = 300;
    f.header.device = 70_000;
    assert_eq!(encode(&f), [0, 11, 1, 0xac, 2, 0xf0, 0xa2, 4, 1, 1, 7, 3, 0]);
}

fn session_frame(op: SessionOp) -> Frame {
    let secret = Secret::from_bytes([0xA5; 16]);
    Frame::new(9, 42, Body::SessionRequest(SessionRequest { session: SessionId(3), secret, seq: Seq(5), op }))
}

fn session_reply_frame(reply: SessionReply) -> Frame {
    Frame::new(9, 42, Body::SessionResponse(SessionResponse { session: SessionId(3), seq: Seq(5), reply }))
}

/// Pinned like the v1 frames: the session bodies are variants 3, 4 and 5, appended after
/// every v1 variant, whose bytes (above) they leave as they were.
#[test]
fn golden_bytes_of_session_frames() {
    let secret = [0xA5u8; 16];
    let mut keepalive = vec![0, 24, 1, 9, 42, 3, 3];
    keepalive.extend_from_slice(&secret);
    keepalive.extend_from_slice(&[5, 1, 0]);
    assert_eq!(encode(&session_frame(SessionOp::KeepAlive)), keepalive);
    let mut acquire = vec![0, 30, 1, 9, 42, 3, 3];
    acquire.extend_from_slice(&secret);
    acquire.extend_from_slice(&[5, 2, 4, b'p', b'u', b'm', b'p', 1, 0]);
    assert_eq!(
        encode(&session_frame(SessionOp::Acquire { key: parse_key("pump").unwrap(), wait: true })),
        acquire
    );
    let mut release = vec![0, 30, 1, 9, 42, 3, 3];
    release.extend_from_slice(&secret);
    release.extend_from_slice(&[5, 3, 4, b'p', b'u', b'm', b'p', 7, 0]);
    assert_eq!(
        encode(&session_frame(SessionOp::Release { key: parse_key("pump").unwrap(), fence: Fence(7) })),
        release
    );
    // Open: no session and no secret yet (zeros, so COBS codes), a 5 s ttl, label "d1".
    let open = SessionOp::Open { ttl: Duration::from_secs(5), label: parse_label("d1").unwrap() };
    let mut f = session_frame(open);
    let Body::SessionRequest(r) = &mut f.body else { unreachable!() };
    (r.session, r.secret) = (SessionId::NONE, Secret::NONE);
    let mut expected = vec![0, 5, 1, 9, 42, 3];
    expected.extend_from_slice(&[1; 16]);
    expected.extend_from_slice(&[2, 5, 8, 0xc0, 0x96, 0xb1, 2, 2, b'd', b'1', 0]);
    assert_eq!(encode(&f), expected);
    // Alive pushing a grant of "pump" under fence 7, asked at seq 4, nothing more waiting.
    let alive = SessionReply::Alive {
        ttl: Duration::from_secs(5),
        granted: Some(Grant { key: parse_key("pump").unwrap(), fence: Fence(7), asked: Seq(4) }),
        more: false,
    };
    assert_eq!(
        encode(&session_reply_frame(alive)),
        [0, 20, 1, 9, 42, 4, 3, 5, 1, 0xc0, 0x96, 0xb1, 2, 1, 4, b'p', b'u', b'm', b'p', 7, 4, 1, 0]
    );
    assert_eq!(encode(&session_reply_frame(SessionReply::Replayed)), [0, 8, 1, 9, 42, 4, 3, 5, 9, 0]);
    assert_eq!(
        encode(&session_reply_frame(SessionReply::Rejected(Reject::Unauthorized))),
        [0, 9, 1, 9, 42, 4, 3, 5, 10, 2, 0]
    );
    let refused = |why| Frame::new(9, 42, Body::SessionRefused { session: SessionId(3), seq: Seq(5), why });
    assert_eq!(encode(&refused(SessionRefusal::WrongLink)), [0, 7, 1, 9, 42, 5, 3, 5, 1, 0]);
    assert_eq!(encode(&refused(SessionRefusal::Unreachable)), [0, 8, 1, 9, 42, 5, 3, 5, 1, 0]);
    assert_eq!(encode(&refused(SessionRefusal::Forged)), [0, 8, 1, 9, 42, 5, 3, 5, 2, 0]);
}

/// The largest session frames fit `MAX_FRAME`: a 64-byte key and every integer at its maximum.
#[test]
fn the_largest_session_frames_fit() {
    let key = parse_key(&"k".repeat(64)).unwrap();
    let max = Duration::from_micros(u64::MAX);
    let label = parse_label(&"l".repeat(32)).unwrap();
    let secret = Secret::from_bytes([0xFF; 16]);
    let ops = [
        SessionOp::Open { ttl: max, label },
        SessionOp::Acquire { key: key.clone(), wait: true },
        SessionOp::Release { key: key.clone(), fence: Fence(u64::MAX) },
    ];
    let replies = [
        SessionReply::Alive {
            ttl: max,
            granted: Some(Grant { key: key.clone(), fence: Fence(u64::MAX), asked: Seq(u64::MAX) }),
            more: true,
        },
        SessionReply::Opened { session: SessionId(u64::MAX), secret, ttl: max },
        SessionReply::Busy { key: key.clone(), expires_in: max },
        SessionReply::Queued { key: key.clone(), position: u16::MAX },
        SessionReply::Granted { key, fence: Fence(u64::MAX) },
    ];
    let big = |body| Frame::new(u16::MAX, u32::MAX, body);
    let mut frames: Vec<Frame> = ops
        .into_iter()
        .map(|op| {
            big(Body::SessionRequest(SessionRequest {
                session: SessionId(u64::MAX),
                secret,
                seq: Seq(u64::MAX),
                op,
            }))
        })
        .collect();
    frames.extend(replies.into_iter().map(|reply| {
        big(Body::SessionResponse(SessionResponse {
            session: SessionId(u64::MAX),
            seq: Seq(u64::MAX),
            reply,
        }))
    }));
    let mut largest = 0;
    for f in frames {
        let bytes = encode(&f);
        largest = largest.max(bytes.len());
        let (out, _) = decode_all(&bytes);
        assert_eq!(out, vec![Ok(f)]);
    }
    assert_eq!(largest, 131, "update MAX_FRAME's documentation");
    assert!(largest <= MAX_FRAME);
}

fn request_frame(seq: u16, op: Op) -> Frame {
    let request = Request { id: RequestId(u32::from(seq)), owner: OwnerId(7), op };
    Frame::new(seq, 42, Body::Request { key: parse_key("pump").unwrap(), request })
}

fn response_frame(seq: u16, reply: Reply) -> Frame {
    Frame::new(seq, 42, Body::Response(Response { id: RequestId(u32::from(seq)), owner: OwnerId(7), reply }))
}

#[test]
fn every_variant_round_trips() {
    let t = Duration::from_millis(1500);
    let ops = [
        Op::Acquire { ttl: t },
        Op::Takeover { version: u64::MAX, ttl: t },
        Op::Renew { fence: Fence(9), ttl: t },
        Op::Release { fence: Fence(u64::MAX) },
    ];
    let replies = [
        Reply::Granted { fence: Fence(1), ttl: t },
        Reply::Busy { retry_after: t },
        Reply::Observed { version: 3, ttl: t },
        Reply::NotHolder,
        Reply::Released,
        Reply::Rejected(Reject::InvalidTtl),
        Reply::Rejected(Reject::InvalidKey),
        Reply::Rejected(Reject::Unauthorized),
        Reply::Rejected(Reject::Malformed),
        Reply::Rejected(Reject::UnsupportedVersion),
        Reply::Rejected(Reject::Capacity),
        Reply::Rejected(Reject::FenceExhausted),
        Reply::Rejected(Reject::Misconfigured),
        Reply::Unavailable,
        Reply::GrantedAfterExpiry { fence: Fence(2), ttl: t },
    ];
    // A new core variant must be added here (and appended, never inserted, in the core).
    for r in &replies {
        match r {
            Reply::Granted { .. }
            | Reply::Busy { .. }
            | Reply::Observed { .. }
            | Reply::NotHolder
            | Reply::Released
            | Reply::Unavailable
            | Reply::GrantedAfterExpiry { .. } => {}
            Reply::Rejected(
                Reject::InvalidTtl
                | Reject::InvalidKey
                | Reject::Unauthorized
                | Reject::Malformed
                | Reject::UnsupportedVersion
                | Reject::Capacity
                | Reject::FenceExhausted
                | Reject::Misconfigured,
            ) => {}
        }
    }
    let key = parse_key(&"k".repeat(64)).unwrap();
    let mut frames: Vec<Frame> = ops
        .iter()
        .map(|&op| {
            let request = Request { id: RequestId(u32::MAX), owner: OwnerId(u64::MAX), op };
            Frame::new(u16::MAX, u32::MAX, Body::Request { key: key.clone(), request })
        })
        .collect();
    frames.extend(replies.iter().map(|&reply| {
        Frame::new(7, 8, Body::Response(Response { id: RequestId(5), owner: OwnerId(6), reply }))
    }));
    for f in frames {
        let bytes = encode(&f);
        assert!(bytes.len() <= MAX_FRAME);
        let (out, _) = decode_all(&bytes);
        assert_eq!(out, vec![Ok(f)]);
    }
}

#[test]
fn garbage_truncation_oversize_and_versions_are_counted_and_survived() {
    let good = encode(&acquire_frame());
    let mut stream = Vec::new();
    stream.extend_from_slice(b"\x13\x37 noise");
    stream.extend_from_slice(&good); // leading zero ends the noise run
    stream.extend_from_slice(&good[..good.len() / 2]); // truncated: sender reset mid-frame
    stream.extend_from_slice(&good);
    stream.extend_from_slice(&[0x55; 300]); // oversize run
    stream.extend_from_slice(&good);
    // A frame from a future protocol version.
    let mut future = acquire_frame();
    future.header.version = 2;
    let mut buf = [0u8; MAX_FRAME];
    stream.extend_from_slice(future.encode(&mut buf).unwrap());
    stream.extend_from_slice(&[0x02, 0x01, 0x00]); // valid COBS, not a frame
    stream.extend_from_slice(&good);

    let (out, d) = decode_all(&stream);
    let frames: Vec<&Frame> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
    // The leading delimiter of the frame after the truncated one saves it.
    assert_eq!(frames.len(), 4, "{out:?}");
    assert!(frames.iter().all(|f| **f == acquire_frame()));
    let s = d.stats();
    assert_eq!(s.frames, 4);
    assert_eq!(s.oversize, 1);
    assert_eq!(s.wrong_version, 1);
    assert_eq!(s.cobs + s.malformed, 3, "{s:?}"); // noise, truncated, non-frame
    assert!(out.contains(&Err(DecodeError::WrongVersion(Header { version: 2, seq: 1, device: 42 }))));
}

#[test]
fn an_oversize_frame_is_refused_at_encoding() {
    // Keys are bounded, so every frame fits; the check still guards the buffer.
    let f = acquire_frame();
    let mut buf = [0u8; MAX_FRAME];
    assert!(f.encode(&mut buf).is_ok());
}

#[test]
fn only_wrong_versions_are_counted_as_such() {
    let mut stream = Vec::new();
    for v in [0u8, 2, 255] {
        let mut f = acquire_frame();
        f.header.version = v;
        stream.extend(encode(&f));
    }
    stream.extend(encode(&acquire_frame()));
    let (out, d) = decode_all(&stream);
    assert_eq!(out.len(), 4);
    assert_eq!(out[3], Ok(acquire_frame()));
    let s = d.stats();
    assert_eq!((s.frames, s.wrong_version, s.errors()), (1, 3, 3));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    /// Pure noise: never a panic, and every run a delimiter ends is accounted for exactly once.
    #[test]
    fn noise_is_counted_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2_000)) {
        let (out, d) = decode_all(&bytes);
        let s = d.stats();
        prop_assert_eq!(out.len() as u32, s.frames + s.errors());
        prop_assert_eq!(out.iter().filter(|r| r.is_ok()).count() as u32, s.frames);
        let runs = bytes.split(|&b| b == 0).count() - 1; // runs ended by a delimiter
        prop_assert!(out.len() <= runs);
    }

    /// Each of the other side's kinds of frames, cut anywhere, still lets the next one through.
    #[test]
    fn a_cut_frame_costs_only_itself(cut in 0usize..19, seq in any::<u16>()) {
        let f = acquire_frame();
        let bytes = encode(&f);
        let mut stream = bytes[..cut.min(bytes.len())].to_vec();
        let mut next = f.clone();
        next.header.seq = seq;
        stream.extend(encode(&next));
        let (out, _) = decode_all(&stream);
        prop_assert_eq!(out.last(), Some(&Ok(next)));
    }

    /// Random bytes with valid frames spliced in: every valid frame comes out, in order.
    #[test]
    fn valid_frames_survive_any_noise(
        chunks in prop::collection::vec((prop::collection::vec(any::<u8>(), 0..200), any::<u16>(), any::<u64>()), 1..12)
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (noise, seq, owner) in &chunks {
            stream.extend_from_slice(noise);
            let request = Request { id: RequestId(*seq as u32), owner: OwnerId(*owner), op: Op::Release { fence: Fence(*owner) } };
            let f = Frame::new(*seq, 1, Body::Request { key: parse_key("k").unwrap(), request });
            stream.extend_from_slice(&encode(&f));
            expected.push(f);
        }
        let (out, _) = decode_all(&stream);
        let got: Vec<Frame> = out.into_iter().filter_map(Result::ok).collect();
        // Noise may by chance decode as a frame too, so the expected frames form a subsequence.
        let mut it = got.iter();
        for f in &expected {
            prop_assert!(it.any(|g| g == f), "frame {:?} lost", f);
        }
    }
}

// ----- The hand-written codec against postcard, the reference for the wire format -----

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![any::<u64>(), 0u64..20_000_000].prop_map(Duration::from_micros)
}

fn any_u64() -> impl Strategy<Value = u64> {
    // Small values and every varint length.
    prop_oneof![0u64..300, any::<u64>(), (0u32..64).prop_map(|s| 1u64 << s), Just(u64::MAX)]
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any_duration().prop_map(|ttl| Op::Acquire { ttl }),
        (any_u64(), any_duration()).prop_map(|(version, ttl)| Op::Takeover { version, ttl }),
        (any_u64(), any_duration()).prop_map(|(f, ttl)| Op::Renew { fence: Fence(f), ttl }),
        any_u64().prop_map(|f| Op::Release { fence: Fence(f) }),
    ]
}

fn any_reject() -> impl Strategy<Value = Reject> {
    prop::sample::select(vec![
        Reject::InvalidTtl,
        Reject::InvalidKey,
        Reject::Unauthorized,
        Reject::Malformed,
        Reject::UnsupportedVersion,
        Reject::Capacity,
        Reject::FenceExhausted,
        Reject::Misconfigured,
    ])
}

fn any_reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any_u64(), any_duration()).prop_map(|(f, ttl)| Reply::Granted { fence: Fence(f), ttl }),
        any_duration().prop_map(|retry_after| Reply::Busy { retry_after }),
        (any_u64(), any_duration()).prop_map(|(version, ttl)| Reply::Observed { version, ttl }),
        Just(Reply::NotHolder),
        Just(Reply::Released),
        any_reject().prop_map(Reply::Rejected),
        Just(Reply::Unavailable),
    ]
}

fn any_key() -> impl Strategy<Value = leasehold_core::Key> {
    "[a-z0-9._:/-]{1,64}|\\PC{1,16}"
        .prop_filter_map("fits a key", |s| leasehold_core::Key::try_from(s.as_str()).ok())
}

fn any_secret() -> impl Strategy<Value = Secret> {
    prop_oneof![Just([0u8; 16]), any::<[u8; 16]>()].prop_map(Secret::from_bytes)
}

fn any_session_request() -> impl Strategy<Value = SessionRequest> {
    let label = "[ -~]{0,32}".prop_map(|s| parse_label(&s).unwrap());
    let op = prop_oneof![
        (any_duration(), label).prop_map(|(ttl, label)| SessionOp::Open { ttl, label }),
        Just(SessionOp::KeepAlive),
        (any_key(), any::<bool>()).prop_map(|(key, wait)| SessionOp::Acquire { key, wait }),
        (any_key(), any_u64()).prop_map(|(key, f)| SessionOp::Release { key, fence: Fence(f) }),
        Just(SessionOp::Close),
    ];
    (any_u64(), any_secret(), any_u64(), op).prop_map(|(s, secret, q, op)| SessionRequest {
        session: SessionId(s),
        secret,
        seq: Seq(q),
        op,
    })
}

fn any_session_response() -> impl Strategy<Value = SessionResponse> {
    let grant = (any_key(), any_u64(), any_u64()).prop_map(|(key, f, a)| Grant {
        key,
        fence: Fence(f),
        asked: Seq(a),
    });
    let reply = prop_oneof![
        (any_u64(), any_secret(), any_duration()).prop_map(|(s, secret, ttl)| SessionReply::Opened {
            session: SessionId(s),
            secret,
            ttl
        }),
        (any_duration(), prop::option::of(grant), any::<bool>())
            .prop_map(|(ttl, granted, more)| SessionReply::Alive { ttl, granted, more }),
        (any_key(), any_u64()).prop_map(|(key, f)| SessionReply::Granted { key, fence: Fence(f) }),
        (any_key(), any::<u16>()).prop_map(|(key, position)| SessionReply::Queued { key, position }),
        (any_key(), any_duration()).prop_map(|(key, expires_in)| SessionReply::Busy { key, expires_in }),
        any_key().prop_map(|key| SessionReply::Released { key }),
        any_key().prop_map(|key| SessionReply::NotHolder { key }),
        Just(SessionReply::Closed),
        Just(SessionReply::Expired),
        Just(SessionReply::Replayed),
        any_reject().prop_map(SessionReply::Rejected),
    ];
    (any_u64(), any_u64(), reply).prop_map(|(s, q, reply)| SessionResponse {
        session: SessionId(s),
        seq: Seq(q),
        reply,
    })
}

fn any_frame() -> impl Strategy<Value = Frame> {
    // Any UTF-8 a key can hold (the codec does not check the key's character set; the
    // authority does), up to the 64-byte limit.
    let key = "[a-z0-9._:/-]{1,64}|\\PC{1,16}"
        .prop_filter_map("fits a key", |s| leasehold_core::Key::try_from(s.as_str()).ok());
    let body = prop_oneof![
        (key, any::<u32>(), any_u64(), any_op()).prop_map(|(key, id, owner, op)| Body::Request {
            key,
            request: Request { id: RequestId(id), owner: OwnerId(owner), op }
        }),
        (any::<u32>(), any_u64(), any_reply()).prop_map(|(id, owner, reply)| Body::Response(Response {
            id: RequestId(id),
            owner: OwnerId(owner),
            reply
        })),
        any::<u8>().prop_map(|supported| Body::VersionMismatch { supported }),
        any_session_request().prop_map(Body::SessionRequest),
        any_session_response().prop_map(Body::SessionResponse),
        (
            any_u64(),
            any_u64(),
            prop::sample::select(vec![
                SessionRefusal::WrongLink,
                SessionRefusal::Unreachable,
                SessionRefusal::Forged
            ])
        )
            .prop_map(|(s, q, why)| Body::SessionRefused { session: SessionId(s), seq: Seq(q), why }),
    ];
    (any::<u16>(), any::<u32>(), body).prop_map(|(seq, device, body)| Frame::new(seq, device, body))
}

/// Plain COBS with a closing zero, written out so the tests trust neither encoder.
fn cobs(src: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0];
    let mut code_at = 1;
    for &b in src {
        if b != 0 {
            out.push(b);
        }
        if b == 0 || out.len() - code_at == 0xFF {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
        }
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

/// What postcard makes of a payload: the frame the decoder must return, if any.
fn postcard_reading(payload: &[u8]) -> Result<Frame, DecodeError> {
    let Ok((header, _)) = postcard::take_from_bytes::<Header>(payload) else {
        return Err(DecodeError::Malformed);
    };
    if header.version != leasehold_serial::VERSION {
        return Err(DecodeError::WrongVersion(header));
    }
    match postcard::take_from_bytes::<Frame>(payload) {
        Ok((frame, [])) => Ok(frame),
        _ => Err(DecodeError::Malformed),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// The bytes are postcard's, COBS-framed, with a leading delimiter; and they decode back.
    #[test]
    fn encoding_is_postcards(f in any_frame()) {
        let mut raw = [0u8; 256];
        let raw = postcard::to_slice(&f, &mut raw).unwrap();
        let ours = encode(&f);
        prop_assert_eq!(&ours[1..], &cobs(raw)[1..]);
        prop_assert_eq!(ours[0], 0);
        prop_assert!(ours.len() <= MAX_FRAME);
        let (out, _) = decode_all(&ours);
        prop_assert_eq!(out, vec![Ok(f)]);
    }

    /// A valid frame's payload with one byte changed, dropped, added or cut off: the decoder
    /// reads it exactly as postcard would (the same frame, or no frame).
    #[test]
    fn damaged_payloads_are_read_as_postcard_reads_them(
        f in any_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        how in 0u8..4,
    ) {
        let mut raw = [0u8; 256];
        let mut payload = postcard::to_slice(&f, &mut raw).unwrap().to_vec();
        let i = at.index(payload.len());
        match how {
            0 => payload[i] = byte,
            1 => { payload.remove(i); }
            2 => payload.insert(i, byte),
            _ => payload.truncate(i),
        }
        let stream = cobs(&payload);
        // Too long for the decoder's buffer is refused as oversize, whatever postcard says.
        prop_assume!(stream.len() - 2 <= MAX_FRAME - 2);
        let (out, _) = decode_all(&stream);
        prop_assert_eq!(out, vec![postcard_reading(&payload)]);
    }
}

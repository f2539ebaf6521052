//! The device side of protocol v2: one session for every key a device holds.
//!
//! A [`SessionLink`] drives the core's [`Session`] over a blocking UART. One keepalive frame
//! renews every key the session holds; every request carries the session's secret and a seq
//! that strictly increases, so the authority ignores a frame replayed from the line and
//! refuses one forged without the secret. The gateway holds a device's keepalive open while
//! the device waits for a key, and answers it the moment the key is handed over: the grant is
//! pushed to the device as a frame, without polling.
//!
//! ```
//! use std::cell::RefCell;
//! use std::collections::VecDeque;
//! use std::rc::Rc;
//!
//! use leasehold_core::session::wire::{parse_label, Secret, SessionOp, SessionReply};
//! use leasehold_core::session::{SessionAuthority, SessionEvent, SessionLimits};
//! use leasehold_core::{parse_key, Config, Duration, Instant};
//! use leasehold_serial::{Body, Clock, Frame, FrameDecoder, SessionLink, MAX_FRAME};
//!
//! // A UART looped through an in-memory pipe; the "gateway" below answers from the core's
//! // own authority rules, as the built-in server would.
//! #[derive(Clone, Default)]
//! struct Pipe(Rc<RefCell<(VecDeque<u8>, VecDeque<u8>)>>);
//! impl embedded_io::ErrorType for Pipe {
//!     type Error = embedded_io::ErrorKind;
//! }
//! impl embedded_io::ReadReady for Pipe {
//!     fn read_ready(&mut self) -> Result<bool, Self::Error> {
//!         Ok(!self.0.borrow().0.is_empty())
//!     }
//! }
//! impl embedded_io::Read for Pipe {
//!     fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
//!         let rx = &mut self.0.borrow_mut().0;
//!         let n = buf.len().min(rx.len());
//!         buf.iter_mut().zip(rx.drain(..n)).for_each(|(b, x)| *b = x);
//!         Ok(n)
//!     }
//! }
//! impl embedded_io::Write for Pipe {
//!     fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
//!         self.0.borrow_mut().1.extend(buf);
//!         Ok(buf.len())
//!     }
//!     fn flush(&mut self) -> Result<(), Self::Error> {
//!         Ok(())
//!     }
//! }
//! struct Fixed;
//! impl Clock for Fixed {
//!     fn now(&self) -> Instant {
//!         Instant::from_micros(1_000)
//!     }
//! }
//!
//! let pipe = Pipe::default();
//! let session = leasehold_core::session::Session::<4>::new(
//!     parse_label("pump-1").unwrap(),
//!     Config::new(Duration::from_secs(5)),
//! )
//! .unwrap();
//! let mut link = SessionLink::new(pipe.clone(), Fixed, session, 7);
//! let mut authority = SessionAuthority::new(SessionLimits::default());
//! let mut decoder = FrameDecoder::new();
//! let mut gateway = |authority: &mut SessionAuthority<16, 16, 16>| {
//!     let sent: Vec<u8> = pipe.0.borrow_mut().1.drain(..).collect();
//!     for frame in sent.iter().filter_map(|&b| decoder.push(b)) {
//!         let Ok(Frame { header, body: Body::SessionRequest(request) }) = frame else { continue };
//!         let now = Instant::from_micros(1_000);
//!         let reply = match &request.op {
//!             SessionOp::Open { ttl, label } => authority.open(now, *ttl, label, Secret::from_bytes([9; 16])),
//!             _ => authority.handle(now, &request),
//!         };
//!         let answer = Frame::new(header.seq, header.device, Body::SessionResponse(request.answer(reply)));
//!         let mut buf = [0u8; MAX_FRAME];
//!         pipe.0.borrow_mut().0.extend(answer.encode(&mut buf).unwrap());
//!     }
//! };
//!
//! link.open().unwrap();
//! link.poll().unwrap(); // sends the open
//! gateway(&mut authority);
//! assert!(matches!(link.poll().unwrap(), Some(SessionEvent::Opened { .. })));
//! link.acquire(parse_key("pump").unwrap(), true).unwrap();
//! link.poll().unwrap();
//! gateway(&mut authority);
//! assert!(matches!(link.poll().unwrap(), Some(SessionEvent::Acquired { .. })));
//! assert!(link.remaining(&parse_key("pump").unwrap()).is_some());
//! ```

use embassy_futures::select::{select, Either};
use embedded_hal_async::delay::DelayNs;
use embedded_io::{Read, ReadReady, Write};
use leasehold_core::session::holder::{AcquireError, CloseError, OpenError, ReleaseError};
use leasehold_core::session::wire::{Seq, SessionReply};
use leasehold_core::session::{Session, SessionEvent, SessionState};
use leasehold_core::{Duration, Instant, Key};

use crate::decode::{DecodeError, DecodeStats, FrameDecoder};
use crate::device::Clock;
use crate::frame::{Body, Frame, SessionRefusal, MAX_FRAME};
use crate::outbox::{send_all, Outbox, Sending};
use crate::watch::SessionWatch;

/// How many of the link's last frames it remembers, to tell the machine which request a
/// version-mismatch notice (which echoes the frame, not the request) was about. A device
/// has at most one keepalive and one request per key out at once.
const SENT_RING: usize = 8;

/// What a session link saw besides decoded frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub struct SessionLinkStats {
    /// The decoder's counts (frames, and errors by kind).
    pub decoder: DecodeStats,
    /// Well-formed frames not for this device (another device's responses on a shared line,
    /// requests echoed back).
    pub foreign: u32,
    /// Explicit "I speak another protocol version" replies from the gateway.
    pub version_mismatches: u32,
    /// Requests the gateway refused because this link did not open the session (after a
    /// reconnect, or a gateway restart): the machine retries until the session expires.
    pub wrong_link: u32,
    /// Requests the gateway forwarded and got no answer for (retried by the machine).
    pub unreachable: u32,
    /// Refusals of frames sent with a wrong secret (someone else's, on this line): ignored.
    pub forged: u32,
    /// Requests whose frame could not be written (reported to the machine as transport errors).
    pub write_errors: u32,
}

/// What the blocking and async session links share: the machine, the codec, the bookkeeping.
#[derive(Debug)]
struct SessionCore<const K: usize, const O: usize> {
    session: Session<K, O>,
    device: u32,
    /// The link's frame counter (the header's seq; the session's own seq is in the body).
    frame_seq: u16,
    /// The last frames sent: (frame seq, session seq).
    sent: [(u16, Seq); SENT_RING],
    sent_next: usize,
    /// Keys we are queued for: while there are any, a keepalive is kept out to bring the grant.
    waiting: heapless::Vec<Key, K>,
    decoder: FrameDecoder,
    stats: SessionLinkStats,
}

impl<const K: usize, const O: usize> Outbox for SessionCore<K, O> {
    type Tag = Seq;

    fn next_frame<'b>(&mut self, now: Instant, buf: &'b mut [u8; MAX_FRAME]) -> Option<(Seq, &'b [u8])> {
        SessionCore::next_frame(self, now, buf)
    }

    fn write_failed(&mut self, now: Instant, seq: Seq) {
        SessionCore::write_failed(self, now, seq)
    }
}

impl<const K: usize, const O: usize> SessionCore<K, O> {
    fn new(session: Session<K, O>, device: u32) -> Self {
        SessionCore {
            session,
            device,
            frame_seq: 0,
            sent: [(0, Seq(0)); SENT_RING],
            sent_next: 0,
            waiting: heapless::Vec::new(),
            decoder: FrameDecoder::new(),
            stats: SessionLinkStats::default(),
        }
    }

    fn stats(&self) -> SessionLinkStats {
        SessionLinkStats { decoder: self.decoder.stats(), ..self.stats }
    }

    fn close(&mut self, now: Instant) -> Result<(), CloseError> {
        self.waiting.clear();
        self.session.close(now)
    }

    /// Fires due timers, and keeps a keepalive out while a key is waited for.
    fn due(&mut self, now: Instant) {
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        if !self.waiting.is_empty() {
            self.session.keep_alive_now(now);
        }
    }

    /// The next request as a frame in `buf`, if the machine has one: its seq and bytes.
    fn next_frame<'b>(&mut self, now: Instant, buf: &'b mut [u8; MAX_FRAME]) -> Option<(Seq, &'b [u8])> {
        loop {
            let request = self.session.poll_transmit()?;
            self.frame_seq = self.frame_seq.wrapping_add(1);
            let seq = request.seq;
            let frame = Frame::new(self.frame_seq, self.device, Body::SessionRequest(request));
            // Every session frame fits (see MAX_FRAME); if one did not, the request is
            // reported lost, as if the line had dropped it.
            let n = match frame.encode(buf) {
                Ok(bytes) => bytes.len(),
                Err(_) => {
                    self.write_failed(now, seq);
                    continue;
                }
            };
            debug!("sending session seq {} as frame {}", seq.0, self.frame_seq);
            if let Some(slot) = self.sent.get_mut(self.sent_next) {
                *slot = (self.frame_seq, seq);
            }
            self.sent_next = (self.sent_next + 1) % SENT_RING;
            return Some((seq, buf.get(..n).unwrap_or(&[])));
        }
    }

    fn write_failed(&mut self, now: Instant, seq: Seq) {
        warn!("session request {} not sent", seq.0);
        self.stats.write_errors = self.stats.write_errors.wrapping_add(1);
        self.session.handle_transport_error(now, seq);
    }

    fn feed(&mut self, now: Instant, bytes: &[u8]) {
        for &b in bytes {
            if let Some(frame) = self.decoder.push(b) {
                self.on_frame(now, frame);
            }
        }
    }

    fn on_frame(&mut self, now: Instant, frame: Result<Frame, DecodeError>) {
        let ours = |f: &Frame| f.header.device == self.device;
        match frame {
            Ok(f) if !ours(&f) => self.stats.foreign = self.stats.foreign.wrapping_add(1),
            Ok(Frame { body: Body::SessionResponse(r), .. }) => {
                self.session.handle_response(now, &r);
                // A held keepalive came back without the grant (the gateway's hold ended):
                // send the next one at once, so one is always out while we wait.
                if matches!(r.reply, SessionReply::Alive { .. }) && !self.waiting.is_empty() {
                    self.session.keep_alive_now(now);
                }
            }
            Ok(Frame { header, body: Body::VersionMismatch { supported } }) => {
                warn!("gateway speaks protocol version {}", supported);
                let _ = supported;
                self.stats.version_mismatches = self.stats.version_mismatches.wrapping_add(1);
                // That request will never be answered: say so now rather than let the machine
                // wait out its request timeout.
                if let Some(&(_, seq)) = self.sent.iter().find(|(f, s)| *f == header.seq && s.0 != 0) {
                    self.session.handle_transport_error(now, seq);
                }
            }
            Ok(Frame { body: Body::SessionRefused { seq, why, .. }, .. }) => {
                warn!("gateway refused session request {}: {}", seq.0, why);
                let counter = match why {
                    SessionRefusal::WrongLink => &mut self.stats.wrong_link,
                    SessionRefusal::Unreachable => &mut self.stats.unreachable,
                    SessionRefusal::Forged => &mut self.stats.forged,
                };
                *counter = counter.wrapping_add(1);
                // A forged request is someone else's, never ours: the real request of that
                // seq (if any) gets its own answer. The others will not be answered: the
                // machine retries after its backoff (and ignores a seq it is not waiting for).
                if why != SessionRefusal::Forged {
                    self.session.handle_transport_error(now, seq);
                }
            }
            Ok(_) => self.stats.foreign = self.stats.foreign.wrapping_add(1),
            Err(DecodeError::WrongVersion(h)) => {
                warn!("frame of protocol version {}", h.version);
                let _ = h;
            }
            Err(_) => {}
        }
    }

    /// The next event, with the link's bookkeeping of waited-for keys.
    fn poll_event(&mut self, now: Instant) -> Option<SessionEvent> {
        let event = self.session.poll_event();
        match &event {
            Some(SessionEvent::Queued { key, .. }) => {
                if !self.waiting.contains(key) {
                    // Cannot be full: the machine tracks at most K keys too.
                    let _ = self.waiting.push(key.clone());
                }
                // The keepalive that will bring the grant goes out with the next frames.
                self.session.keep_alive_now(now);
            }
            Some(
                SessionEvent::Acquired { key, .. }
                | SessionEvent::NotAcquired { key, .. }
                | SessionEvent::Lost { key, .. },
            ) => self.waiting.retain(|k| k != key),
            Some(SessionEvent::SessionLost { .. } | SessionEvent::Closed { .. }) => self.waiting.clear(),
            _ => {}
        }
        event
    }
}

/// A device's protocol-v2 session over a blocking UART (`embedded_io::{Read, ReadReady,
/// Write}`), for up to `K` keys and `O` observed keys at once (a device that observes none
/// says `O = 0`, and its session machine is a sixth the size: 1.3 KB rather than 7.4 KB for
/// two keys, `cargo run -p leasehold-core --example sizes`).
///
/// Call [`poll`](SessionLink::poll) often (from the main loop, or when the UART interrupt or
/// the timer at [`poll_timeout`](SessionLink::poll_timeout) fires). The link moves bytes,
/// time and wake-ups; every lease decision is the core [`Session`]'s. While any key is queued
/// for, the link keeps a keepalive out at all times, so the gateway can answer it with the
/// grant the moment the key is released (configure the machine as
/// `leasehold_client::Options::session` does: keepalive every ttl/4, request timeout ttl/3,
/// which is longer than the gateway holds a keepalive).
#[derive(Debug)]
pub struct SessionLink<U, C, const K: usize, const O: usize = 16> {
    uart: U,
    clock: C,
    core: SessionCore<K, O>,
    tx: [u8; MAX_FRAME],
}

impl<U: Read + ReadReady + Write, C: Clock, const K: usize, const O: usize> SessionLink<U, C, K, O> {
    /// A link driving `session` (not yet opened), identifying itself as `device`.
    pub fn new(uart: U, clock: C, session: Session<K, O>, device: u32) -> Self {
        SessionLink { uart, clock, core: SessionCore::new(session, device), tx: [0; MAX_FRAME] }
    }

    /// The session machine, for its getters.
    pub fn session(&self) -> &Session<K, O> {
        &self.core.session
    }

    /// The clock's reading now.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// What the session is doing.
    pub fn state(&self) -> SessionState {
        self.core.session.state()
    }

    /// How long `key` may still be relied on; `None` once it may not.
    pub fn remaining(&self, key: &Key) -> Option<Duration> {
        self.core.session.remaining(self.clock.now(), key)
    }

    /// Opens the session; see [`Session::open`].
    pub fn open(&mut self) -> Result<(), OpenError> {
        self.core.session.open(self.clock.now())
    }

    /// Acquires `key`, queueing for it if `wait`; see [`Session::acquire`].
    pub fn acquire(&mut self, key: Key, wait: bool) -> Result<(), AcquireError> {
        self.core.session.acquire(self.clock.now(), key, wait)
    }

    /// Gives `key` back (or stops waiting for it); see [`Session::release`].
    pub fn release(&mut self, key: &Key) -> Result<(), ReleaseError> {
        self.core.session.release(self.clock.now(), key)
    }

    /// Ends the session, giving up every key; see [`Session::close`].
    pub fn close(&mut self) -> Result<(), CloseError> {
        self.core.close(self.clock.now())
    }

    /// When `poll` must next run even if no byte arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.session.poll_timeout()
    }

    /// The decoder's counts and the link's own.
    pub fn stats(&self) -> SessionLinkStats {
        self.core.stats()
    }

    /// Reads what the UART has, fires due timers, sends what the machine wants sent, and
    /// returns the next event. Never blocks on reading.
    ///
    /// Events come one per call: call again while it returns `Ok(Some(_))`. A UART error is
    /// returned after this call's timers and transmissions have run, so a noisy line cannot
    /// stall the machine; a failed write is also reported to the machine as a lost request.
    pub fn poll(&mut self) -> Result<Option<SessionEvent>, U::Error> {
        let now = self.clock.now();
        let read_error = self.read_available(now).err();
        self.core.due(now);
        self.transmit(now)?;
        if let Some(e) = read_error {
            return Err(e);
        }
        let event = self.core.poll_event(now);
        // A Queued event asked for a keepalive: send it now, not at the next call.
        self.transmit(now)?;
        Ok(event)
    }

    fn transmit(&mut self, now: Instant) -> Result<(), U::Error> {
        while let Some((seq, bytes)) = self.core.next_frame(now, &mut self.tx) {
            if let Err(e) = self.uart.write_all(bytes).and_then(|_| self.uart.flush()) {
                self.core.write_failed(now, seq);
                return Err(e);
            }
        }
        Ok(())
    }

    fn read_available(&mut self, now: Instant) -> Result<(), U::Error> {
        let mut chunk = [0u8; 32];
        while self.uart.read_ready()? {
            let n = self.uart.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            self.core.feed(now, chunk.get(..n).unwrap_or(&[]));
        }
        Ok(())
    }
}

/// A device's protocol-v2 session over an async UART (`embedded_io_async::{Read, Write}`,
/// e.g. embassy's `BufferedUart`), for up to `K` keys and `O` observed keys at once; `delay` sleeps until the
/// machine's next deadline. The same link as [`SessionLink`], driven by
/// [`next_event`](AsyncSessionLink::next_event).
#[derive(Debug)]
pub struct AsyncSessionLink<U, C, D, const K: usize, const O: usize = 16> {
    uart: U,
    clock: C,
    delay: D,
    core: SessionCore<K, O>,
    tx: [u8; MAX_FRAME],
    /// The frame in `tx` still being written: its seq, its length, bytes written so far.
    /// Kept across calls so that a cancelled `next_event` resumes it instead of losing it.
    sending: Sending<Seq>,
    watch: Option<&'static SessionWatch<K>>,
}

impl<
        U: embedded_io_async::Read + embedded_io_async::Write,
        C: Clock,
        D: DelayNs,
        const K: usize,
        const O: usize,
    > AsyncSessionLink<U, C, D, K, O>
{
    /// A link driving `session` (not yet opened), identifying itself as `device`.
    pub fn new(uart: U, clock: C, delay: D, session: Session<K, O>, device: u32) -> Self {
        AsyncSessionLink {
            uart,
            clock,
            delay,
            core: SessionCore::new(session, device),
            tx: [0; MAX_FRAME],
            sending: None,
            watch: None,
        }
    }

    /// From now on, keeps `watch` up to date with the keys held, their fences and the
    /// session's validity, for other tasks to read while this one waits in
    /// [`next_event`](AsyncSessionLink::next_event).
    pub fn publish_to(&mut self, watch: &'static SessionWatch<K>) {
        self.watch = Some(watch);
        self.publish();
    }

    fn publish(&self) {
        if let Some(w) = self.watch {
            w.publish(&self.core.session, self.clock.now());
        }
    }

    /// The session machine, for its getters.
    pub fn session(&self) -> &Session<K, O> {
        &self.core.session
    }

    /// How long `key` may still be relied on; `None` once it may not.
    pub fn remaining(&self, key: &Key) -> Option<Duration> {
        self.core.session.remaining(self.clock.now(), key)
    }

    /// Opens the session; see [`Session::open`].
    pub fn open(&mut self) -> Result<(), OpenError> {
        let r = self.core.session.open(self.clock.now());
        self.publish();
        r
    }

    /// Acquires `key`, queueing for it if `wait`; see [`Session::acquire`].
    pub fn acquire(&mut self, key: Key, wait: bool) -> Result<(), AcquireError> {
        let r = self.core.session.acquire(self.clock.now(), key, wait);
        self.publish();
        r
    }

    /// Gives `key` back (or stops waiting for it); see [`Session::release`].
    pub fn release(&mut self, key: &Key) -> Result<(), ReleaseError> {
        let r = self.core.session.release(self.clock.now(), key);
        self.publish();
        r
    }

    /// Ends the session, giving up every key; see [`Session::close`].
    pub fn close(&mut self) -> Result<(), CloseError> {
        let r = self.core.close(self.clock.now());
        self.publish();
        r
    }

    /// The decoder's counts and the link's own.
    pub fn stats(&self) -> SessionLinkStats {
        self.core.stats()
    }

    /// Drives the link until the next event. Cancel-safe on the same terms as
    /// [`AsyncDeviceLink::next_event`](crate::AsyncDeviceLink::next_event): events leave the
    /// machine only when returned, bytes are fed as soon as a read completes, and a frame
    /// being sent stays in the link for the next call to finish.
    pub async fn next_event(&mut self) -> Result<SessionEvent, U::Error> {
        let mut chunk = [0u8; 32];
        loop {
            let now = self.clock.now();
            self.core.due(now);
            self.publish();
            self.send(now).await?;
            if let Some(e) = self.core.poll_event(now) {
                return Ok(e);
            }
            let wait = self.core.session.poll_timeout().map(|t| t.saturating_duration_since(now));
            let wait_us = wait.map_or(u32::MAX, |d| d.as_micros().min(u64::from(u32::MAX)) as u32);
            match select(self.uart.read(&mut chunk), self.delay.delay_us(wait_us)).await {
                Either::First(Ok(n)) => {
                    self.core.feed(self.clock.now(), chunk.get(..n).unwrap_or(&chunk));
                    self.publish();
                }
                Either::First(Err(e)) => return Err(e),
                Either::Second(()) => {}
            }
        }
    }

    /// Writes the frame in progress, then every frame the machine wants sent.
    async fn send(&mut self, now: Instant) -> Result<(), U::Error> {
        send_all(&mut self.uart, &mut self.tx, &mut self.sending, &mut self.core, now).await
    }
}

//! Writing a link's frames to an async UART so that a cancelled call loses none.

use embedded_io_async::Write;
use leasehold_core::Instant;

use crate::frame::MAX_FRAME;

/// A link's machine side, as the writer sees it: its next request as a frame, and word that
/// one could not be written.
pub(crate) trait Outbox {
    /// What names a request to its machine (a v1 request id, a session seq).
    type Tag: Copy;

    /// The next request as a frame in `buf`, if the machine has one.
    fn next_frame<'b>(&mut self, now: Instant, buf: &'b mut [u8; MAX_FRAME])
        -> Option<(Self::Tag, &'b [u8])>;

    /// The request `tag` did not reach the wire: its machine treats it as lost.
    fn write_failed(&mut self, now: Instant, tag: Self::Tag);
}

/// The frame in a link's `tx` still being written: its tag, its length, the bytes written so
/// far. Kept across calls, so that a cancelled call resumes it instead of losing it.
pub(crate) type Sending<T> = Option<(T, usize, usize)>;

/// Writes the frame in progress, then every frame `outbox` wants sent.
pub(crate) async fn send_all<U: Write, O: Outbox>(
    uart: &mut U,
    tx: &mut [u8; MAX_FRAME],
    sending: &mut Sending<O::Tag>,
    outbox: &mut O,
    now: Instant,
) -> Result<(), U::Error> {
    loop {
        let (tag, len, done) = match *sending {
            Some(s) => s,
            None => match outbox.next_frame(now, tx) {
                Some((tag, bytes)) => (tag, bytes.len(), 0),
                None => return Ok(()),
            },
        };
        *sending = Some((tag, len, done));
        let rest = tx.get(done..len).unwrap_or(&[]);
        if rest.is_empty() {
            *sending = None;
            continue;
        }
        match uart.write(rest).await {
            // A write of nothing to a non-empty buffer would repeat forever: the frame is lost.
            Ok(0) => {
                *sending = None;
                outbox.write_failed(now, tag);
            }
            Ok(n) => *sending = Some((tag, len, done.saturating_add(n))),
            Err(e) => {
                *sending = None;
                outbox.write_failed(now, tag);
                return Err(e);
            }
        }
    }
}

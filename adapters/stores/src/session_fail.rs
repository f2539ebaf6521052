//! How the etcd and DynamoDB session backends end an exchange that could not finish: the
//! store says the session is gone (answered `Expired`, once the session is forgotten
//! locally), or it gave no usable answer (a transport error, the driver's to retry).

use leasehold_core::session::wire::{SessionId, SessionReply, SessionRequest, SessionResponse};
use leasehold_http::TransportError;

/// Why an exchange ended without the value needed.
pub(crate) enum Fail {
    /// The session is gone at the store: its lease expired (etcd), or a key of it was taken
    /// over, which is only possible once its validity had ended (DynamoDB).
    Expired,
    /// No usable answer.
    Transport(TransportError),
}

impl From<TransportError> for Fail {
    fn from(e: TransportError) -> Fail {
        Fail::Transport(e)
    }
}

/// The response to `req` from what handling it came to. An expired session is `forget`-ten
/// before it is answered, so the next request of it finds no session rather than asking the
/// store again.
pub(crate) fn respond(
    req: &SessionRequest,
    r: Result<SessionReply, Fail>,
    forget: impl FnOnce(SessionId),
) -> Result<SessionResponse, TransportError> {
    match r {
        Ok(reply) => Ok(req.answer(reply)),
        Err(Fail::Expired) => {
            forget(req.session);
            Ok(req.answer(SessionReply::Expired))
        }
        Err(Fail::Transport(e)) => Err(e),
    }
}

//! How the etcd and DynamoDB session backends begin and end an exchange. Both keep each
//! session's secret in this process (the store never sees it), so a request is checked
//! against it first. An exchange that could not finish ends in one of two ways: the store
//! says the session is gone (answered `Expired`, once the session is forgotten locally), or
//! it gave no usable answer (a transport error, the driver's to retry).

use leasehold_core::session::wire::{
    Secret, SessionId, SessionOp, SessionReply, SessionRequest, SessionResponse,
};
use leasehold_core::Reject;
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

/// The session `req` is for: `Ok(None)` for an `Open` (there is none yet), `Ok(Some)` if
/// `local` knows it and `req` carries its `secret`, else why not (see [`Unknown::reply`] for
/// the answer).
pub(crate) fn session_of<L>(
    req: &SessionRequest,
    local: impl FnOnce(SessionId) -> Option<L>,
    secret: impl Fn(&L) -> &Secret,
) -> Result<Option<L>, Unknown> {
    if let SessionOp::Open { .. } = req.op {
        return Ok(None);
    }
    match local(req.session) {
        Some(l) if secret(&l).ct_eq(&req.secret) => Ok(Some(l)),
        Some(_) => Err(Unknown::WrongSecret),
        None => Err(Unknown::Gone),
    }
}

/// Why [`session_of`] found no session for a request.
pub(crate) enum Unknown {
    /// The session is kept here, but the request carries another secret.
    WrongSecret,
    /// No such session here: it ended, or this process never opened it.
    Gone,
}

impl Unknown {
    /// What the request is answered.
    pub(crate) fn reply(self) -> SessionReply {
        match self {
            Unknown::WrongSecret => SessionReply::Rejected(Reject::Unauthorized),
            Unknown::Gone => SessionReply::Expired,
        }
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

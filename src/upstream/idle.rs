//! A backend's kept-alive HTTP/1.1 client connections for plain requests (`http:
//! proxy` routes), bounded in number and age. A leaf within `upstream`: the pool holds
//! one per backend, `plain` takes and returns them.

use std::error::Error as StdError;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

/// What a request body's error is: any error, boxed.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// A request body as the backend gets it (the client's, streamed and capped).
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// An error of the client's request body (cut at `max_request_body`, aborted, malformed):
/// the client's doing, so an exchange failing with it is not the backend's failure.
#[derive(Debug)]
pub struct ClientBodyError(pub BoxError);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl StdError for ClientBodyError {}

/// Kept-alive connections kept per backend; beyond, a finished one is closed.
pub const MAX_IDLE_PER_BACKEND: usize = 32;
/// An idle connection older than this is closed rather than reused: below the common
/// backend keep-alive timeouts (Node and uvicorn 5 s, gunicorn 2 s is the exception), so
/// a reused connection is rarely one the backend is closing at that moment.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub(super) type Sender = SendRequest<RequestBody>;

/// A backend's idle kept-alive connections, newest last.
#[derive(Default)]
pub struct IdleConns(Mutex<Vec<(Sender, Instant)>>);

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        f.debug_struct("IdleConns").field("idle", &n).finish()
    }
}

impl IdleConns {
    /// The newest idle connection still open and young enough.
    pub(super) fn take(&self) -> Option<Sender> {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((sender, at)) = idle.pop() {
            if !sender.is_closed() && at.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    pub(super) fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|(s, at)| !s.is_closed() && at.elapsed() < IDLE_TIMEOUT);
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push((sender, Instant::now()));
        }
    }
}

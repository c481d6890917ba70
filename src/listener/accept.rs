//! The accept loop and admission at accept (SPEC §3 "Admission before work").
//!
//! A handshake slot (`max_pending_handshakes`) is taken before accepting (once a
//! connection is queued), so beyond the bound connections wait in the kernel's queue
//! rather than becoming tasks. When the peer is the client, the process cap, the handshake
//! rate and the per-IP cap are judged from its address at once, and a refused connection
//! costs an `accept`, one tally lookup and its answer: a reset for an address refused more
//! than ten times its handshake rate in the current second, a close without TLS on a TLS
//! listener — neither ever registered with the reactor nor made a task — or a 429/503 on a
//! plain listener, after which the first ten refusals a second of an address may wait (in
//! a small task, at most a second, 1,024 at once) for the client's FIN, so that the
//! answer is not lost to a reset.
//! Accepting yields to the runtime every few connections, so the relays of established
//! connections never queue behind an accept storm.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{ConnTask, Endpoint, Prefixed};
use crate::admission::ip_limit::IpPermit;
use crate::admission::pending::HandshakeSlot;
use crate::config::Config;
use crate::handshake::{self, Refused, Refusing, admit::admit_at_accept};
use crate::observe::metrics::AcceptRefusals;
use crate::outcome::Refusal;
use crate::shared::Shared;

/// Pause after an accept failed for want of resources (file descriptors, memory), so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections accepted before the loop yields to the runtime: refusing one costs a few
/// microseconds, so a batch of this many keeps the relays' wake-ups waiting well under
/// 100 µs even when the accept queue never empties.
const ACCEPTS_PER_TURN: u32 = 16;

/// Answered refusals whose close waits for the client's FIN (so the answer is not lost to
/// a reset); beyond this many at once the socket is closed at once.
const MAX_LINGERING: usize = 1024;

/// How long an answered refusal waits for the client to close, and how much it reads.
const LINGER_FOR: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// The listening socket: a std listener, so an accepted connection stays a plain file
/// descriptor (not registered with the reactor) until it is admitted.
pub(super) type Socket = AsyncFd<std::net::TcpListener>;

/// Puts a std listener under the reactor for readiness only: the sockets it accepts stay
/// plain descriptors until admitted, so a refused one costs no reactor registration (an
/// `epoll_ctl` add and delete, and a slab entry: a fifth of a refusal's cost at accept).
pub(super) fn register(listener: std::net::TcpListener) -> io::Result<Socket> {
    // SAFETY: `register` requires that the descriptor stay open and the same for the
    // `AsyncFd`'s life. The listener owns its descriptor and is moved into the `AsyncFd`,
    // its only owner until `into_inner`; nothing else closes or replaces it.
    let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
    registered.map_err(|e| e.into_parts().1)
}

/// Accepts until the listener's `Running` is dropped. A slot is taken only once a
/// connection is waiting (so an idle listener holds none, and several listeners share the
/// bound), and kept across refusals until the queue is empty.
pub(super) async fn accept_loop(
    shared: Weak<Shared>,
    listener: Socket,
    endpoint: Endpoint,
    mut stopped: watch::Receiver<()>,
) {
    let mut slot: Option<HandshakeSlot> = None;
    let mut this_turn = 0u32;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let next = tokio::select! {
            a = accept(&listener, &strong, &mut slot) => a,
            _ = stopped.changed() => return serve_backlog(&strong, listener, &endpoint),
        };
        match next {
            Ok((stream, peer)) => {
                slot = on_accept(&strong, &endpoint, stream, peer, slot.take());
            }
            Err(e) => accept_failed(&endpoint, &e).await,
        }
        drop(strong);
        this_turn += 1;
        if this_turn >= ACCEPTS_PER_TURN {
            this_turn = 0;
            tokio::task::yield_now().await;
        }
    }
}

/// One `accept(2)`: waits until a connection is queued, then for a handshake slot (kept
/// in `slot`; given back when the queue turns out empty), then accepts.
async fn accept(
    listener: &Socket,
    shared: &Shared,
    slot: &mut Option<HandshakeSlot>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if slot.is_none() {
            *slot = Some(shared.handshake_slots.acquire().await);
        }
        match ready.try_io(|l| l.get_ref().accept()) {
            Ok(accepted) => return accepted,
            Err(_would_block) => *slot = None,
        }
    }
}

/// Out of descriptors or memory: back off (and say so, within the warning budget).
/// Anything else (a connection reset while queued) concerns that connection only.
async fn accept_failed(endpoint: &Endpoint, e: &io::Error) {
    let scarce = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !scarce {
        tracing::debug!(listener = %endpoint.listener, error = %e, "accept failed");
        return;
    }
    if crate::log_budget::warn_budget() {
        tracing::warn!(listener = %endpoint.listener, error = %e, "accept failed; backing off");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Judges a new connection and starts its task, or refuses it. Returns the slot when no
/// task took it (the next accept reuses it).
fn on_accept(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Option<HandshakeSlot>,
) -> Option<HandshakeSlot> {
    let active = shared.active.fetch_add(1, Ordering::Relaxed) + 1;
    let config = shared.config.load();
    let judged = judge(shared, endpoint, &config, peer, active);
    let early = match judged {
        Ok(early) => early,
        Err(refusal) => {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            refuse(shared, endpoint, &config, stream, peer, refusal);
            return slot;
        }
    };
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
    {
        Ok(stream) => stream,
        Err(e) => {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%peer, error = %e, "accepted socket unusable");
            return slot;
        }
    };
    let task = ConnTask::new(
        shared.clone(),
        endpoint.clone(),
        stream,
        peer,
        active,
        early,
        slot,
    );
    tokio::spawn(task);
    None
}

/// The judgement at accept when the peer is the client; `Ok(None)` when it is known
/// later (behind a PROXY header or a trusted proxy).
fn judge(
    shared: &Shared,
    endpoint: &Endpoint,
    config: &Config,
    peer: SocketAddr,
    active: u64,
) -> Result<Option<IpPermit>, Refusal> {
    if endpoint.proxy_protocol || config.trusted_proxies.contains(peer.ip()) {
        return Ok(None);
    }
    let rate = shared.handshake_rate.load();
    admit_at_accept(
        peer.ip(),
        active > config.limits.max_connections,
        config,
        &shared.per_ip,
        &rate,
    )
    .map(Some)
}

/// Refuses a connection judged at accept: counted, logged within the address's budget,
/// then answered (plain), closed (TLS) or reset (far over its rate).
fn refuse(
    shared: &Shared,
    endpoint: &Endpoint,
    config: &Config,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    refusal: Refusal,
) {
    endpoint.refusals.count(refusal);
    let tls = endpoint.tls.is_some();
    // A TLS connection gets no answer: status 0, as for a head that never came.
    let status = if tls { 0 } else { refusal.status().as_u16() };
    let refused = Refused {
        client: peer.ip(),
        listener: &endpoint.listener,
        tls,
        refusing: Refusing {
            refusal,
            status,
            reset_after: reset_threshold(config),
        },
    };
    let noted = handshake::note_refusal(shared, refused);
    if noted.reset {
        // Dropping a socket with linger 0 sends RST and frees it at once (no TIME_WAIT).
        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        return;
    }
    if noted.log {
        handshake::log_at_accept(shared, &endpoint.listener, peer, tls, refusal, status);
    }
    if !tls {
        // Only the refusals logged one by one may wait for the client's FIN: a flood of
        // answered refusals from one address cannot take the lingering budget.
        answer(stream, &refusal.raw_response(), noted.log);
    }
}

/// Refusals of one address in one second beyond which it is reset rather than answered:
/// ten times its handshake rate per second (at least ten).
pub(super) fn reset_threshold(config: &Config) -> u32 {
    let policy = config.limits.handshakes_per_ip;
    let per_second = f64::from(policy.rate) / policy.per.as_secs_f64().max(1e-9);
    (per_second.ceil() as u32).max(1).saturating_mul(10)
}

/// Sends the answer of a refusal made at accept, then closes so the answer is not lost to
/// a reset: half-close, read what the client already sent, and if more may come and
/// `may_linger`, wait for its FIN in the background (bounded in number, time and bytes).
fn answer(stream: std::net::TcpStream, answer: &[u8], may_linger: bool) {
    let sock = SockRef::from(&stream);
    let sent = sock.send_with_flags(answer, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    if sent.is_err() {
        return;
    }
    let _ = sock.shutdown(Shutdown::Write);
    if !drained_now(&sock) && may_linger {
        linger(stream);
    }
}

/// Reads what has arrived without waiting; true when the client has closed (or failed),
/// so closing now sends a FIN rather than a reset.
fn drained_now(sock: &SockRef<'_>) -> bool {
    let mut sink = [MaybeUninit::<u8>::uninit(); 2048];
    for _ in 0..8 {
        match sock.recv_with_flags(&mut sink, libc::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}

/// Waits in the background for the client to close after its answer.
fn linger(stream: std::net::TcpStream) {
    let taken = LINGERING.fetch_add(1, Ordering::AcqRel);
    if taken >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let stream = stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream));
    let Ok(mut stream) = stream else {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
        return;
    };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(LINGER_FOR, async {
            let mut sink = [0u8; 512];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    });
}

/// A connection refused once a PROXY header named its client (after accept, before TLS).
pub(super) struct RefusedAfterHeader<'a> {
    pub(super) shared: &'a Shared,
    pub(super) config: &'a Config,
    pub(super) listener: &'a Arc<str>,
    pub(super) peer: SocketAddr,
    pub(super) tls: bool,
    pub(super) refusals: &'a AcceptRefusals,
}

impl RefusedAfterHeader<'_> {
    /// Counts, logs within the address's budget, and answers as at accept. Only the
    /// refusals logged one by one wait for the client's FIN (holding their handshake
    /// slot); the rest are answered and closed.
    pub(super) async fn answer(self, refusal: Refusal, mut stream: Prefixed<TcpStream>) {
        self.refusals.count(refusal);
        let status = if self.tls {
            0
        } else {
            refusal.status().as_u16()
        };
        let refused = Refused {
            client: self.peer.ip(),
            listener: self.listener,
            tls: self.tls,
            refusing: Refusing {
                refusal,
                status,
                reset_after: reset_threshold(self.config),
            },
        };
        let noted = handshake::note_refusal(self.shared, refused);
        if noted.reset {
            let _ = SockRef::from(stream.get_ref()).set_linger(Some(Duration::ZERO));
            return;
        }
        if noted.log {
            let (shared, listener) = (self.shared, self.listener);
            handshake::log_at_accept(shared, listener, self.peer, self.tls, refusal, status);
        }
        if self.tls {
            return;
        }
        let answer = refusal.raw_response();
        let linger = noted.log;
        let _ = tokio::time::timeout(LINGER_FOR, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            if !linger {
                return Ok(());
            }
            let mut sink = [0u8; 512];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok::<(), io::Error>(())
        })
        .await;
    }
}

/// Serves what the kernel already accepted into the backlog before the socket closes:
/// closing a listener resets those connections, which would turn a zero-downtime restart
/// into refused clients. Asks the kernel directly until its queue is empty. These were
/// accepted by the kernel before the stop, so they are not held to the handshake slots.
fn serve_backlog(shared: &Arc<Shared>, listener: Socket, endpoint: &Endpoint) {
    let listener = listener.into_inner();
    for _ in 0..super::BACKLOG {
        let Ok((stream, peer)) = listener.accept() else {
            return;
        };
        let slot = shared.handshake_slots.try_acquire();
        on_accept(shared, endpoint, stream, peer, slot);
    }
}

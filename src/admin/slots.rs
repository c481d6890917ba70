//! The admin listener's bounds on connections, so that one client cannot take the port
//! from the probes and scrapers that need it:
//! - at most [`MAX_CONNECTIONS`] at once;
//! - at most [`PER_ADDRESS`] from one source address (IPv4-mapped IPv6 counts as IPv4), so
//!   one address holds at most an eighth of the listener;
//! - [`LOOPBACK_ONLY`] of them only loopback peers may take, so an in-pod probe (`exec`,
//!   a sidecar) still gets in when remote addresses have taken every other slot;
//! - each connection ends when a write to it stalls for [`WRITE_STALL`] (a client that
//!   pipelines requests and never reads the answers), and in any case after
//!   [`DEADLINE`].

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::admission::client_ip::normalise;
use crate::admission::ip_limit::{ConnLimiter, ConnPermit};

/// Admin connections served at once (SPEC §7).
pub const MAX_CONNECTIONS: usize = 64;
/// Admin connections one source address may hold at once.
pub const PER_ADDRESS: usize = 8;
/// Of [`MAX_CONNECTIONS`], how many only loopback peers may take.
pub const LOOPBACK_ONLY: usize = 8;
/// A write to an admin client making no progress for this long ends its connection.
pub const WRITE_STALL: Duration = Duration::from_secs(5);
/// No admin connection lives longer than this: at the deadline it is asked to finish
/// its answer in progress (up to [`WRITE_STALL`] more), then closed.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Its address holds [`PER_ADDRESS`] connections already.
    Address,
    /// Every slot it may take is taken.
    Listener,
}

/// The admin listener's slots.
pub struct Slots {
    shared: Arc<Semaphore>,
    loopback: Arc<Semaphore>,
    per_address: Arc<ConnLimiter<IpAddr>>,
}

/// One connection's slot, released when dropped.
pub struct Slot {
    _address: ConnPermit<IpAddr>,
    _slot: OwnedSemaphorePermit,
}

impl Slots {
    pub fn new() -> Slots {
        Slots {
            shared: Arc::new(Semaphore::new(MAX_CONNECTIONS - LOOPBACK_ONLY)),
            loopback: Arc::new(Semaphore::new(LOOPBACK_ONLY)),
            per_address: ConnLimiter::new(),
        }
    }

    /// A slot for a connection from `peer`.
    pub fn take(&self, peer: IpAddr) -> Result<Slot, Busy> {
        let peer = normalise(peer);
        let cap = u32::try_from(PER_ADDRESS).unwrap_or(u32::MAX);
        let address = self
            .per_address
            .try_acquire(peer, cap)
            .ok_or(Busy::Address)?;
        let slot = match self.shared.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) if peer.is_loopback() => self
                .loopback
                .clone()
                .try_acquire_owned()
                .map_err(|_| Busy::Listener)?,
            Err(_) => return Err(Busy::Listener),
        };
        Ok(Slot {
            _address: address,
            _slot: slot,
        })
    }
}

/// An admin connection's socket whose writes fail once one stalls for [`WRITE_STALL`].
pub struct StallGuard<S> {
    inner: S,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S) -> StallGuard<S> {
        StallGuard {
            inner,
            stalled: None,
        }
    }

    /// `poll`'s answer, or an error once it has been pending for [`WRITE_STALL`].
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn remote(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))
    }

    #[test]
    fn one_address_holds_at_most_its_share() {
        let slots = Slots::new();
        let held: Vec<_> = (0..PER_ADDRESS).map(|_| slots.take(remote(1))).collect();
        assert!(held.iter().all(Result::is_ok));
        assert_eq!(slots.take(remote(1)).err(), Some(Busy::Address));
        // The same address through a dual-stack socket is the same address.
        let mapped = "::ffff:192.0.2.1".parse().unwrap_or(remote(0));
        assert_eq!(slots.take(mapped).err(), Some(Busy::Address));
        assert!(slots.take(remote(2)).is_ok(), "another address gets in");
        drop(held);
        assert!(slots.take(remote(1)).is_ok(), "released slots are reused");
    }

    #[test]
    fn loopback_keeps_slots_of_its_own_when_remote_addresses_take_the_rest() {
        let slots = Slots::new();
        let shared = MAX_CONNECTIONS - LOOPBACK_ONLY;
        let mut held = Vec::new();
        for i in 0..shared {
            let from = remote(u8::try_from(i / PER_ADDRESS).unwrap_or(u8::MAX));
            held.push(slots.take(from));
        }
        assert!(held.iter().all(Result::is_ok));
        assert_eq!(slots.take(remote(200)).err(), Some(Busy::Listener));
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let probes: Vec<_> = (0..PER_ADDRESS).map(|_| slots.take(lo)).collect();
        assert!(probes.iter().all(Result::is_ok));
        assert!(
            slots.take("::1".parse().unwrap_or(lo)).is_err(),
            "all 64 taken"
        );
        drop(probes);
        assert!(slots.take("::1".parse().unwrap_or(lo)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_stalls_fails_after_the_stall_limit() {
        use tokio::io::AsyncWriteExt;
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(server);
        let started = tokio::time::Instant::now();
        let wrote = guarded.write_all(&[0u8; 1024]).await;
        assert_eq!(wrote.err().map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert_eq!(started.elapsed(), WRITE_STALL);
        drop(client);
    }
}

//! `tunnel`: the cheapest possible relay, as a floor to measure proxies against.
//!
//! A byte tunnel with no parsing, no timers, no logging and no limits: whatever a proxy
//! adds on top of it is its own cost, and what a tunnel costs is the price of the
//! kernel's sockets on this machine. Two engines, one thread each:
//! - `epoll`: level-triggered epoll, one `recv` and one `send` per chunk, as nginx and
//!   wsgate do;
//! - `uring`: io_uring with registered file descriptors; receives and sends of all
//!   connections go to the kernel in one `io_uring_enter` per loop, so system calls are
//!   amortised over every connection that is ready at once;
//! - `tokio`: `copy_bidirectional` on a current-thread tokio runtime, what the runtime
//!   wsgate is built on costs before wsgate does anything.
//!
//! Not a product: it stops relaying a pair at the first error or end of stream; the
//! `uring` engine never reuses its slots (at most 2,048 connections per process), and
//! the `epoll` engine treats a short write as the end of the pair (64 B and 16 KiB
//! messages always fit the socket buffer in these runs).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};

const BUF: usize = 16 * 1024 + 14;

pub fn run(bind: SocketAddr, upstream: SocketAddr, engine: &str) -> Result<()> {
    let listener = TcpListener::bind(bind).with_context(|| format!("bind {bind}"))?;
    eprintln!("tunnel ({engine}) on {bind} -> {upstream}");
    match engine {
        "epoll" => epoll::run(listener, upstream),
        "uring" => uring::run(listener, upstream),
        "tokio" => tokio_copy::run(listener, upstream),
        other => bail!("unknown engine {other} (epoll, uring or tokio)"),
    }
}

/// Accepts one client and connects its upstream, both with TCP_NODELAY.
fn pair(listener: &TcpListener, upstream: SocketAddr) -> Result<(TcpStream, TcpStream)> {
    let (client, _) = listener.accept().context("accept")?;
    let up = TcpStream::connect(upstream).context("connect upstream")?;
    client.set_nodelay(true)?;
    up.set_nodelay(true)?;
    Ok((client, up))
}

mod epoll {
    use super::*;

    /// Index 0 is the listener; a stream `i` relays to `peer[i]`.
    struct Streams {
        socks: Vec<Option<TcpStream>>,
        peer: Vec<usize>,
    }

    fn ctl(ep: i32, op: i32, fd: i32, token: u64, events: u32) -> Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
            bail!("epoll_ctl: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> Result<()> {
        // SAFETY: plain system call; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            0,
            libc::EPOLLIN as u32,
        )?;
        let mut s = Streams {
            socks: vec![None],
            peer: vec![0],
        };
        let mut buf = vec![0u8; BUF];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            // SAFETY: events has room for 256 entries.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, -1) };
            if n < 0 {
                continue; // EINTR
            }
            for ev in &events[..n as usize] {
                let i = ev.u64 as usize;
                if i == 0 {
                    let (c, u) = pair(&listener, upstream)?;
                    c.set_nonblocking(true)?;
                    u.set_nonblocking(true)?;
                    let (ci, ui) = (s.socks.len(), s.socks.len() + 1);
                    ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        c.as_raw_fd(),
                        ci as u64,
                        libc::EPOLLIN as u32,
                    )?;
                    ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        u.as_raw_fd(),
                        ui as u64,
                        libc::EPOLLIN as u32,
                    )?;
                    s.socks.extend([Some(c), Some(u)]);
                    s.peer.extend([ui, ci]);
                } else if !relay_once(&mut s, i, &mut buf) {
                    s.socks[i] = None;
                    let p = s.peer[i];
                    s.socks[p] = None;
                }
            }
        }
    }

    /// One read and one blocking-free write; false ends the pair.
    fn relay_once(s: &mut Streams, i: usize, buf: &mut [u8]) -> bool {
        let Some(src) = s.socks[i].as_mut() else {
            return true;
        };
        let n = match src.read(buf) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        };
        let Some(dst) = s.socks[s.peer[i]].as_mut() else {
            return false;
        };
        // The benchmark's messages fit the socket buffer: a short write is a failure here.
        matches!(dst.write(&buf[..n]), Ok(w) if w == n)
    }
}

/// tokio's current-thread runtime and `copy_bidirectional`: what the runtime alone costs.
mod tokio_copy {
    use super::*;

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> Result<()> {
        // All drivers, as wsgate's runtime has (timers, signals).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            loop {
                let (mut c, _) = listener.accept().await?;
                let mut u = tokio::net::TcpStream::connect(upstream).await?;
                c.set_nodelay(true)?;
                u.set_nodelay(true)?;
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                });
            }
        })
    }
}

mod uring {
    use super::*;
    use io_uring::{IoUring, opcode, types};

    const ACCEPT: u64 = u64::MAX;

    /// user_data: slot index × 2, plus 1 for a send.
    struct Slot {
        buf: Box<[u8]>,
        peer: u32,
        alive: bool,
        /// Bytes of `buf` received and not yet sent to the peer: `sent..len`.
        sent: u32,
        len: u32,
    }

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> Result<()> {
        // Task work runs only when this thread enters the ring: no interrupts of the
        // loop, and completions are reaped in batches.
        let mut ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(1024)
            .context("io_uring")?;
        ring.submitter()
            .register_files_sparse(4096)
            .context("register files")?;
        let mut slots: Vec<Slot> = Vec::new();
        let mut streams: Vec<TcpStream> = Vec::new();
        let lfd = listener.as_raw_fd();
        push(
            &mut ring,
            opcode::PollAdd::new(types::Fd(lfd), libc::POLLIN as u32)
                .build()
                .user_data(ACCEPT),
        )?;
        loop {
            ring.submit_and_wait(1).context("io_uring_enter")?;
            let done: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in done {
                if ud == ACCEPT {
                    let (c, u) = pair(&listener, upstream)?;
                    let base = slots.len() as u32;
                    let fds = [c.as_raw_fd(), u.as_raw_fd()];
                    ring.submitter()
                        .register_files_update(base, &fds)
                        .context("register_files_update")?;
                    streams.extend([c, u]);
                    for (k, peer) in [(base, base + 1), (base + 1, base)] {
                        slots.push(Slot {
                            buf: vec![0u8; BUF].into_boxed_slice(),
                            peer,
                            alive: true,
                            sent: 0,
                            len: 0,
                        });
                        recv(&mut ring, &mut slots, k)?;
                    }
                    push(
                        &mut ring,
                        opcode::PollAdd::new(types::Fd(lfd), libc::POLLIN as u32)
                            .build()
                            .user_data(ACCEPT),
                    )?;
                    continue;
                }
                let k = (ud / 2) as u32;
                if !slots[k as usize].alive {
                    continue;
                }
                if res <= 0 {
                    let p = slots[k as usize].peer;
                    slots[k as usize].alive = false;
                    slots[p as usize].alive = false;
                } else if ud % 2 == 0 {
                    let slot = &mut slots[k as usize];
                    (slot.sent, slot.len) = (0, res as u32);
                    send(&mut ring, &mut slots, k)?;
                } else {
                    let slot = &mut slots[k as usize];
                    slot.sent += res as u32;
                    if slot.sent < slot.len {
                        send(&mut ring, &mut slots, k)?;
                    } else {
                        recv(&mut ring, &mut slots, k)?;
                    }
                }
            }
        }
    }

    fn push(ring: &mut IoUring, e: io_uring::squeue::Entry) -> Result<()> {
        // SAFETY: every buffer an entry points at lives in a Slot that is never freed
        // while the ring exists.
        while unsafe { ring.submission().push(&e) }.is_err() {
            ring.submit().context("io_uring_enter")?;
        }
        Ok(())
    }

    fn recv(ring: &mut IoUring, slots: &mut [Slot], k: u32) -> Result<()> {
        let b = &mut slots[k as usize].buf;
        let e = opcode::Recv::new(types::Fixed(k), b.as_mut_ptr(), b.len() as u32)
            .build()
            .user_data(u64::from(k) * 2);
        push(ring, e)
    }

    /// Sends the rest of what slot k received to its peer; once all is sent, k's
    /// receive is re-armed.
    fn send(ring: &mut IoUring, slots: &mut [Slot], k: u32) -> Result<()> {
        let s = &slots[k as usize];
        let rest = &s.buf[s.sent as usize..s.len as usize];
        let e = opcode::Send::new(types::Fixed(s.peer), rest.as_ptr(), rest.len() as u32)
            .build()
            .user_data(u64::from(k) * 2 + 1);
        push(ring, e)
    }
}
